"""Fingerprints of what the compiler writes: one SHA-256 over a quantized graph's nodes and initializers.

`tests/models/test_fingerprints.py` holds `tests/data/fingerprints.json` against them, so a change in what the
compiler writes is deliberate: regenerate with `python tests/fingerprints.py --write` and say why in the
commit. The calibration is fixed (the first windows of the sample text) and small, so the sweep fits CI.

Fingerprints are kept per CPU class (cpu_class): calibration runs the float model on ONNX Runtime, whose
float kernels (MLAS) accumulate differently on AVX-512 and on AVX2, and the last bits of a maximum or of
X^T X move a scale and then codes. Tried on 2026-12-02: HEAD's own fingerprints, recorded on an AVX-512
EPYC, all differed on an AVX2-only one. `--write` records the class of the machine it runs on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINTS = ROOT / "tests" / "data" / "fingerprints.json"
CALIB_TEXT = ROOT / "samples" / "text" / "python-docstrings.calib.txt"
FORMS = (("qdq", 0), ("w4a8", 0), ("ort", 0), ("ort", 4))
GROUPS = (128, 32)
MODELS = ("minilm", "smollm2")
# Fixed and small: two windows of 64 tokens, no SQNR pass (it writes only the report).
CALIBRATION = dict(calib_samples=2, calib_seq_len=64, calib_batch_size=2, sqnr_samples=0, progress=False)


def cpu_class() -> str:
    """The float-kernel family ONNX Runtime dispatches to on this CPU: x86-avx512, x86-avx2, or the machine."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        pass
    if "avx512f" in flags:
        return "x86-avx512"
    if "avx2" in flags and "fma" in flags:
        return "x86-avx2"
    return platform.machine() or "unknown"


def recorded(cpu: str | None = None) -> dict[str, str]:
    """The fingerprints recorded on this CPU class (case key -> SHA-256); empty when none were."""
    data = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.exists() else {}
    return dict(data.get(cpu or cpu_class(), {}))


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 over the serialized nodes, then the initializers, in graph order (the report in metadata_props
    is not part of it: its pass times change every run)."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(node.SerializeToString(deterministic=True))
    h.update(b"--initializers--")
    for init in model.graph.initializer:
        h.update(init.SerializeToString(deterministic=True))
    return h.hexdigest()


def cases(models=MODELS) -> list[dict]:
    """Every recipe x form x group x symmetry the CLI accepts (Config.validate decides)."""
    from fptq_graph.config import RECIPES, Config
    from fptq_graph.errors import FptqError

    out = []
    for model in models:
        for recipe in RECIPES:
            for form, level in FORMS:
                for group in GROUPS:
                    for symmetric in (True, False):
                        cfg = dict(recipe=recipe, format=form, ort_accuracy_level=level, group_size=group,
                                   symmetric=symmetric)
                        try:
                            Config(**cfg, **CALIBRATION).validate()
                        except FptqError:
                            continue
                        out.append(dict(model=model, **cfg))
    return out


def case_key(case: dict) -> str:
    form = case["format"] + (f"-acc{case['ort_accuracy_level']}" if case["ort_accuracy_level"] else "")
    return f"{case['model']}/{case['recipe']}/{form}/g{case['group_size']}/{'sym' if case['symmetric'] else 'asym'}"


def export_models(folder: Path, models=MODELS) -> dict[str, Path]:
    from fptq_graph.exporters import export_hf
    from fptq_graph.exporters.packaged import packaged_model

    paths = {}
    for name in models:
        path = folder / f"{name}.onnx"
        if not path.exists():
            export_hf(packaged_model(name), path, kv_cache=(name == "smollm2"))
        paths[name] = path
    return paths


def fingerprint_case(model_path: Path, case: dict) -> str:
    from fptq_graph.api import quantize
    from fptq_graph.config import Config

    cfg = {k: v for k, v in case.items() if k != "model"}
    result = quantize(model_path, str(CALIB_TEXT), Config(**cfg, **CALIBRATION))
    return graph_fingerprint(result.model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {FINGERPRINTS.relative_to(ROOT)}")
    ap.add_argument("--models-dir", default="/tmp/fptq-fingerprint-models")
    ap.add_argument("--only", help="run the case keys matching this regular expression")
    ap.add_argument("--out", help="write to this file instead (a sweep split over processes; merge after)")
    args = ap.parse_args(argv)
    target = Path(args.out) if args.out else FINGERPRINTS
    folder = Path(args.models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = export_models(folder)
    cpu = cpu_class()
    expected = recorded(cpu)
    print(f"CPU class {cpu}: {len(expected)} fingerprints recorded", flush=True)
    got, bad = {}, 0
    for case in cases():
        key = case_key(case)
        if args.only and not re.search(args.only, key):
            continue
        got[key] = fingerprint_case(paths[case["model"]], case)
        same = expected.get(key) == got[key]
        bad += not same
        print(f"{'same   ' if same else 'CHANGED'} {key} {got[key][:16]}", flush=True)
        if args.write:   # after every case: a long sweep stopped part-way keeps what it measured
            data = json.loads(target.read_text()) if target.exists() else {}
            data[cpu] = dict(sorted({**data.get(cpu, {}), **got}.items()))
            target.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    print(f"{len(got)} cases, {bad} differ from {FINGERPRINTS.name}")
    return 0 if args.write or not bad else 1


if __name__ == "__main__":
    sys.exit(main())
