"""Peak memory and wall time of `fptq-graph export` on a safetensors checkpoint, against the largest tensor.

A random-weight LLaMA checkpoint is written from a config without ever holding the model: the tensor
names and shapes come from the model built on torch's meta device, and each shard of random float16 (or
bfloat16, float32) tensors is generated and written on its own with safetensors' save_file, then an
index (model.safetensors.index.json) and config.json. The export runs as `python -m fptq_graph.cli export
DIR -o OUT.onnx` in a child process; the parent reads its wall time and peak resident set size
(os.wait4's ru_maxrss), and the target the exporter aims at: 2 GiB + the largest tensor.

    python benchmarks/export_memory.py --size 0.5b [7b ...] [--dtype float16] [--export-dtype auto]
                                       [--work /work/scratch/export-memory] [--json out.json] [--keep]

Sizes: 0.5b (hidden 1536, intermediate 4096, 16 layers, 12 heads), 1.5b, 7b (hidden 4096, intermediate
11008, 32 layers, 32 heads), all with vocab 32000 and an untied LM head; "tiny" for a quick check. The
checkpoint and the ONNX are deleted after each size unless --keep (a 7B needs about 27 GB of disk: the
float16 checkpoint and the ONNX). --run also runs the exported graph once in ONNX Runtime (in another
child, 1 x 8 tokens) and records that the logits are finite; --baseline also measures export_hf (the
whole model in float32) on the same checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12),
    "1.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=26, num_attention_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}
SHARD_BYTES = 2 * 2**30
DTYPES = ("float16", "bfloat16", "float32")


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
                       architectures=["LlamaForCausalLM"], **SIZES[size])


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors (state_dict names and shapes) of LlamaForCausalLM(config), built on meta."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_checkpoint(size: str, folder: Path, dtype: str) -> dict:
    """Random weights (normal, std 0.02; norms 1), a shard at a time; returns sizes for the report."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(size)
    config.dtype = dtype
    config.save_pretrained(folder)
    shapes = tensor_shapes(config)
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    torch_dtype = getattr(torch, dtype)
    shards, current, current_bytes = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if current and current_bytes + nbytes > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch_dtype)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    largest = max(int(np.prod(s)) for s in shapes.values()) * itemsize
    return {"parameters": sum(int(np.prod(s)) for s in shapes.values()), "checkpoint_bytes": total,
            "largest_tensor_bytes": largest, "shards": len(shards)}


def run_child(command: list[str], log: Path) -> dict:
    """Runs `command`, its output to `log`; wall time, peak RSS (wait4), exit code."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    result = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
              "exit": os.waitstatus_to_exitcode(status)}
    if result["exit"] != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        result["error"] = lines[-1] if lines else f"exit {result['exit']}"
    return result


RUN_ONCE = """
import sys, numpy as np
from fptq_graph.runtime import session
sess = session(sys.argv[1])
ids = np.arange(1, 9, dtype=np.int64)[None, :]
logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
print("RESULT", logits.dtype, logits.shape, bool(np.isfinite(logits).all()))
"""


BASELINE = """
import sys
from fptq_graph.exporters import export_hf
export_hf(sys.argv[1], sys.argv[2])
"""


def measure(size: str, dtype: str, export_dtype: str, work: Path, keep: bool, run: bool, baseline: bool) -> dict:
    folder, onnx_path = work / f"llama-{size}-{dtype}", work / f"llama-{size}-{dtype}.onnx"
    print(f"{size} {dtype}: writing the checkpoint to {folder} ...", flush=True)
    start = time.perf_counter()
    # In a child: this process stays small (no torch), because a child's ru_maxrss starts from the RSS of
    # the process it was forked from (Linux records the old address space's high-water mark at exec).
    try:
        written = subprocess.run([sys.executable, __file__, "--write-checkpoint", size, str(folder), dtype],
                                 capture_output=True, text=True, cwd=ROOT)
        if written.returncode != 0:
            raise SystemExit(f"writing the checkpoint failed: {written.stderr.strip().splitlines()[-1:]}")
        info = json.loads(next(line for line in written.stdout.splitlines() if line.startswith("{")))
        row = {"size": size, "checkpoint_dtype": dtype, "export_dtype": export_dtype, **info}
        row["checkpoint_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{size} {dtype}: exporting ...", flush=True)
        command = [sys.executable, "-m", "fptq_graph.cli", "export", str(folder), "-o", str(onnx_path),
                   "--dtype", export_dtype]
        row["export"] = run_child(command, work / f"llama-{size}-{dtype}.export.log")
        print(f"  {row['export']}", flush=True)
        if baseline:   # the whole-model path the streaming export replaces, for comparison
            print(f"{size} {dtype}: export_hf (baseline) ...", flush=True)
            base = onnx_path.with_name(onnx_path.stem + ".export_hf.onnx")
            row["export_hf"] = run_child([sys.executable, "-c", BASELINE, str(folder), str(base)],
                                         work / f"llama-{size}-{dtype}.export_hf.log")
            print(f"  {row['export_hf']}", flush=True)
            for path in (base, base.with_name(base.name + ".data")):
                path.unlink(missing_ok=True)
        if row["export"]["exit"] == 0:
            data = onnx_path.with_name(onnx_path.name + ".data")
            row["onnx_bytes"] = onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
            if run:
                row["ort_run"] = run_child([sys.executable, "-c", RUN_ONCE, str(onnx_path)],
                                           work / f"llama-{size}-{dtype}.run.log")
                tail = (work / f"llama-{size}-{dtype}.run.log").read_text(errors="replace").strip().splitlines()
                row["ort_run"]["result"] = next((l for l in reversed(tail) if l.startswith("RESULT")), None)
                print(f"  ort: {row['ort_run']}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
            for path in work.glob(f"llama-{size}-{dtype}.*"):
                if path.suffix != ".log":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return row


def print_table(rows: list[dict]) -> None:
    gib, mib = 2**30, 2**20
    header = (f"{'size':>5} {'ckpt':>8} {'params':>7} {'ckpt GiB':>8} {'largest MiB':>11} {'export s':>8} "
              f"{'peak RSS MiB':>12} {'target MiB':>10} {'ONNX GiB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        e = r.get("export", {})
        target = 2 * 1024 + r["largest_tensor_bytes"] / mib
        print(f"{r['size']:>5} {r['checkpoint_dtype']:>8} {r['parameters'] / 1e9:>6.2f}B {r['checkpoint_bytes'] / gib:>8.2f} "
              f"{r['largest_tensor_bytes'] / mib:>11.1f} {e.get('seconds', float('nan')):>8.1f} "
              f"{e.get('peak_rss_bytes', 0) / mib:>12.0f} {target:>10.0f} {r.get('onnx_bytes', 0) / gib:>8.2f}"
              + (f"  ERROR {e['error']}" if "error" in e else ""))
        if "export_hf" in r:
            b = r["export_hf"]
            print(f"{'':>5} {'export_hf (baseline):':>38} {b['seconds']:>8.1f} {b['peak_rss_bytes'] / mib:>12.0f}"
                  + (f"  ERROR {b['error']}" if "error" in b else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["0.5b"], choices=list(SIZES))
    parser.add_argument("--dtype", default="float16", choices=DTYPES, help="the checkpoint's dtype (default %(default)s)")
    parser.add_argument("--export-dtype", default="auto", choices=("auto", "float32", "float16"),
                        help="export --dtype (default %(default)s)")
    parser.add_argument("--work", default="/work/scratch/export-memory", help="where the checkpoint and ONNX go")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the ONNX")
    parser.add_argument("--run", action="store_true", help="also run the exported graph once in ONNX Runtime")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure export_hf (the whole model in float32) on the same checkpoint")
    parser.add_argument("--write-checkpoint", nargs=3, metavar=("SIZE", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        size, folder, dtype = args.write_checkpoint
        print(json.dumps(write_checkpoint(size, Path(folder), dtype)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.size:
        rows.append(measure(size, args.dtype, args.export_dtype, work, args.keep, args.run, args.baseline))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                                   "rows": rows}, indent=2))
    print_table(rows)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(r.get("export", {}).get("exit") == 0 for r in rows) else 1


def machine() -> dict:
    from importlib.metadata import version   # not importing them: this process stays small (see measure)

    return {"cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
            "onnxruntime": version("onnxruntime")}


if __name__ == "__main__":
    sys.exit(main())
