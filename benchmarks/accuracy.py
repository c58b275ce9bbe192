"""Accuracy of every recipe against the float model and ONNX Runtime's own quantizers, on real models.

For each real pretrained model the project can load offline (fptq_graph.exporters.packaged):
- smollm2 (SmolLM2-135M-Instruct, LLaMA decoder): perplexity on held-out text, lower is better;
- minilm (all-MiniLM-L6-v2, BERT encoder, no LM head): sentence-embedding cosine to the float model
  and nearest-neighbour agreement on held-out passages, higher is better.

Rows: float; our recipes (fptq, fptq with GPTQ weights, naive-w4a8, smoothquant-w4a8, dynamic-w4a8,
w8a8-smoothquant, rtn-w4a16), all in the qdq form run by fptq_graph.runtime.session; and ONNX
Runtime's tools on the same float ONNX, the same calibration windows and the same linears:
`quantize_static` (QDQ, int8 per-channel weights, uint8 MinMax activations: ORT's recommended U8S8;
its int8-activation output fails ORT's own type check in 1.31) and `MatMulNBitsQuantizer`
(4 bits, block 128, symmetric) run at accuracy_level 0 (float activations: W4A16) and 4 (int8
activations per block: ORT's W4A8 on CPU). Evaluation text is held out: calibration never sees it.

    python benchmarks/accuracy.py [--models smollm2 minilm] [--out out/accuracy] [--json docs/accuracy.json]

Prints one table per model and writes the JSON (the tables in docs/accuracy.md come from it) after
every row; a rerun with the same settings reuses the rows its JSON already holds (--fresh: redo all).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the sample text ships in samples/text; ../shared/data/text beside the checkout is a fallback
TEXT = next((d for d in (ROOT / "samples" / "text", ROOT.parent / "shared" / "data" / "text")
             if (d / "python-docstrings.calib.txt").is_file()), ROOT / "samples" / "text")
CALIB = TEXT / "python-docstrings.calib.txt"
HELDOUT = TEXT / "python-docstrings.heldout.txt"

# label -> Config fields; every recipe runs with the same calibration windows.
RECIPES = {
    "fptq": {"recipe": "fptq"},
    "fptq + gptq": {"recipe": "fptq", "gptq": True},
    "naive-w4a8": {"recipe": "naive-w4a8"},
    "smoothquant-w4a8": {"recipe": "smoothquant-w4a8"},
    "dynamic-w4a8": {"recipe": "dynamic-w4a8"},
    "w8a8-smoothquant": {"recipe": "w8a8-smoothquant"},
    "rtn-w4a16": {"recipe": "rtn-w4a16"},
    # SmolLM2's packaged weights are GGUF Q4_1 (asymmetric, blocks of 32): the matching grid
    "fptq, g32 asym": {"recipe": "fptq", "group_size": 32, "symmetric": False},
    # issue 15: weight quantizers (recipes.py) and AWQ / measured classification
    "fptq, clip": {"recipe": "fptq", "weight_quantizer": "clip"},
    "fptq, gptq-clip": {"recipe": "fptq", "weight_quantizer": "gptq-clip"},
    "fptq, gptq act-order": {"recipe": "fptq", "weight_quantizer": "gptq", "act_order": True},
    "fptq-awq": {"recipe": "fptq-awq"},
    "fptq-awq, gptq-clip": {"recipe": "fptq-awq", "weight_quantizer": "gptq-clip"},
    "fptq-measured": {"recipe": "fptq-measured"},
    "awq-w4a16": {"recipe": "awq-w4a16"},
    "fptq, g32": {"recipe": "fptq", "group_size": 32},
    "fptq, clip, g32": {"recipe": "fptq", "weight_quantizer": "clip", "group_size": 32},
    "fptq + gptq, g32": {"recipe": "fptq", "gptq": True, "group_size": 32},
    "fptq-awq, g32": {"recipe": "fptq-awq", "group_size": 32},
    "dynamic-w4a8, g32": {"recipe": "dynamic-w4a8", "group_size": 32},
    "rtn-w4a16, g32": {"recipe": "rtn-w4a16", "group_size": 32},
}
# Per model: calibration (samples x tokens) and what is evaluated.
MODELS = {
    "smollm2": {"kind": "decoder", "calib_samples": 64, "seq_len": 512, "eval_tokens": 8192},
    "minilm": {"kind": "encoder", "calib_samples": 128, "seq_len": 256},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's quantizers")
    parser.add_argument("--calib-samples", type=int, help="override every model's calibration sample count")
    parser.add_argument("--eval-tokens", type=int, help="override the decoder's evaluated token count")
    parser.add_argument("--out", default=str(ROOT / "out" / "accuracy"), help="work folder for the models")
    parser.add_argument("--json", default=str(ROOT / "out" / "accuracy" / "accuracy.json"), help="result JSON")
    parser.add_argument("--fresh", action="store_true", help="ignore rows the JSON already holds")
    parser.add_argument("--lm-head", choices=("float", "int8", "int4"), default="float",
                        help="the LM head of every row of ours (default float: ONNX Runtime's rows keep it float too)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in (CALIB, HELDOUT):
        if not path.is_file():
            sys.exit(f"missing {path} (the sample text ships in samples/text)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json)
    previous = {} if args.fresh or not json_path.is_file() else json.loads(json_path.read_text())
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "calibration_text": CALIB.name, "heldout_text": HELDOUT.name,
               "models": previous.get("models", {})}
    for name in args.models:
        settings = dict(MODELS[name])
        if args.calib_samples:
            settings["calib_samples"] = args.calib_samples
        if args.eval_tokens and settings["kind"] == "decoder":
            settings["eval_tokens"] = args.eval_tokens
        settings["lm_head"] = args.lm_head
        done = results["models"].get(name, {})
        if done.get("settings") != settings:
            done = {}
        results["models"][name] = {"settings": settings, "rows": done.get("rows", {})}
        run_model(name, results["models"][name]["rows"], settings, args.recipes, not args.no_ort, out,
                  lambda: write_json(json_path, results))
        print_table(name, results["models"][name])
    print(f"\nwrote {args.json}")
    return 0


def run_model(name: str, rows: dict, settings: dict, recipes: list[str], with_ort: bool, out: Path, save) -> None:
    """Fills `rows` (label -> result), skipping labels it already has; calls save() after each row."""
    import fptq_graph as fq
    from fptq_graph.exporters import export_hf
    from fptq_graph.exporters.packaged import packaged_model

    float_path = out / f"{name}.onnx"
    if not float_path.is_file():
        print(f"exporting {name} ...", flush=True)
        export_hf(packaged_model(name), float_path)
    metric = Metric(settings, float_path)
    # the float row always runs: an encoder's metric compares with the float embeddings it computes
    rows["float"] = {**metric(float_path, ours=True), "bytes": float_path.stat().st_size}
    print(f"{name} float: {fmt(rows['float'])}", flush=True)
    save()
    quantized_names = None
    for label in recipes:
        if label in rows:
            print(f"{name} {label}: {fmt(rows[label])} (from the JSON)", flush=True)
            continue
        config = fq.Config(**{"lm_head": settings.get("lm_head", "float"), **RECIPES[label]}, calib_samples=settings["calib_samples"], calib_seq_len=settings["seq_len"],
                           progress=False, sqnr_samples=0)
        start = time.perf_counter()
        result = fq.quantize(float_path, str(CALIB), config)
        path = result.save(out / f"{name}.{label.replace(' + ', '-').replace(', ', '-').replace(' ', '-')}.onnx")
        seconds = time.perf_counter() - start
        schemes = {}
        for layer in result.layers:
            schemes[layer["scheme"]] = schemes.get(layer["scheme"], 0) + 1
        quantized_names = [layer["name"] for layer in result.layers]
        rows[label] = {**metric(path, ours=True), "schemes": schemes, "quantize_seconds": round(seconds, 1),
                       "bytes": path.stat().st_size}
        print(f"{name} {label}: {fmt(rows[label])} ({seconds:.0f} s to quantize)", flush=True)
        save()
    if with_ort:
        if quantized_names is None:   # the same linears as ours: ask the pipeline which they are
            quantized_names = our_linears(float_path)
        for label, path in ort_quantized(name, float_path, metric.tokenizer, settings, quantized_names, out,
                                         skip=set(rows)):
            rows[label] = {**metric(path, ours=False), "bytes": path.stat().st_size}
            print(f"{name} {label}: {fmt(rows[label])}", flush=True)
            save()


class Metric:
    """Perplexity (decoder) or embedding agreement with the float model (encoder) on held-out text."""

    def __init__(self, settings: dict, float_path: Path):
        from transformers import AutoTokenizer

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(str(float_path.with_name(float_path.stem + ".tokenizer")))
        self.reference = None
        if settings["kind"] == "decoder":
            from fptq_graph.calibration import read_token_ids

            self.ids = read_token_ids(HELDOUT, lambda: self.tokenizer, role="evaluation text")
        else:
            from fptq_graph.evaluate import heldout_passages

            self.texts = heldout_passages(HELDOUT)

    def __call__(self, path: Path, ours: bool) -> dict:
        import onnxruntime as ort

        from fptq_graph.evaluate import embedding_agreement, perplexity, sentence_embeddings
        from fptq_graph.runtime import session

        # Ours through our session (reference numerics, op library); ORT's models as ORT runs them.
        sess = session(path) if ours else ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        if self.settings["kind"] == "decoder":
            value = perplexity(sess, self.ids, self.settings["seq_len"], max_tokens=self.settings["eval_tokens"])
            return {"perplexity": round(value, 4), "eval_seconds": round(time.perf_counter() - start, 1)}
        emb = sentence_embeddings(sess, self.tokenizer, self.texts)
        if self.reference is None:
            self.reference = emb
        score = embedding_agreement(self.reference, emb).as_dict()
        return {k: round(v, 4) for k, v in score.items()} | {"eval_seconds": round(time.perf_counter() - start, 1)}


def our_linears(float_path: Path) -> list[str]:
    import onnx_graphsurgeon as gs

    from fptq_graph import Config
    from fptq_graph.model_io import load_model
    from fptq_graph.passes import FindQuantizableLinears
    from fptq_graph.state import State

    state = State(graph=gs.import_onnx(load_model(float_path)), config=Config())
    FindQuantizableLinears().run(state)
    return list(state.linears)


STATIC = "ort quantize_static (W8A8 QDQ)"
NBITS = "ort MatMulNBits 4-bit b128, accuracy_level {}"


def ort_quantized(name: str, float_path: Path, tokenizer, settings: dict, linears: list[str], out: Path, skip: set):
    """ONNX Runtime's static QDQ quantizer and its MatMulNBits quantizer, on the linears we quantize."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from fptq_graph.calibration import read_token_ids, windows_of
    from fptq_graph.model_io import load_model

    model = load_model(float_path)
    calib = windows_of(read_token_ids(CALIB, lambda: tokenizer), settings["seq_len"], settings["calib_samples"], 1,
                       str(CALIB))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calib.feed_batches(model.graph.input)

        def get_next(self):
            return next(self.batches, None)

    path = out / f"{name}.ort-static.onnx"
    start = time.perf_counter()
    if STATIC in skip:
        path = None
    # Ranges are folded every `chunk` batches to bound memory. onnxruntime 1.31 raises "No data is
    # collected" when the batch count is a multiple of the chunk (its last fold leaves nothing): avoid that.
    chunk = next(c for c in (8, 7, 6, 5, 3) if calib.num_samples % c)
    if path is not None:
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=linears,
                        extra_options={"CalibMaxIntermediateOutputs": chunk})
        fix_ir_version(path)
        print(f"{name}: quantize_static took {time.perf_counter() - start:.0f} s", flush=True)
        yield STATIC, path
    for level in (0, 4):
        if NBITS.format(level) in skip:
            continue
        path = out / f"{name}.ort-nbits-acc{level}.onnx"
        quantizer = MatMulNBitsQuantizer(onnx.load(str(float_path)), bits=4, block_size=128, is_symmetric=True,
                                         accuracy_level=level, nodes_to_include=linears)
        quantizer.process()
        quantizer.model.model.ir_version = 10
        quantizer.model.save_model_to_file(str(path))
        yield NBITS.format(level), path


def fix_ir_version(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    if model.ir_version > 10:
        model.ir_version = 10
        onnx.save(model, str(path))


def fmt(row: dict) -> str:
    if "perplexity" in row:
        return f"perplexity {row['perplexity']:.3f}"
    return f"mean cos {row['mean_cosine']:.4f}, min cos {row['min_cosine']:.4f}, NN agreement {row['nn_agreement']:.3f}"


def print_table(name: str, result: dict) -> None:
    rows, s = result["rows"], result["settings"]
    decoder = s["kind"] == "decoder"
    print(f"\n## {name}: calibration {s['calib_samples']} x {s['seq_len']} tokens of {CALIB.name}; "
          + (f"perplexity over {s['eval_tokens']} held-out tokens" if decoder else "held-out passages"))
    head = "| model | perplexity | × float |" if decoder else "| model | mean cos | min cos | NN agreement |"
    print(head + " schemes | MiB |")
    print("|" + "---|" * (head.count("|") + 1))
    base = rows["float"].get("perplexity")
    for label, row in rows.items():
        schemes = " / ".join(f"{v} {k}" for k, v in row.get("schemes", {}).items()) or "-"
        metric = (f"{row['perplexity']:.3f} | {row['perplexity'] / base:.3f}" if decoder
                  else f"{row['mean_cosine']:.4f} | {row['min_cosine']:.4f} | {row['nn_agreement']:.3f}")
        print(f"| {label} | {metric} | {schemes} | {row['bytes'] / 2**20:.1f} |")


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
