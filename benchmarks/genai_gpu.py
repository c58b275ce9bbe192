"""A 1.1B LLaMA in onnxruntime-genai on the GPU, as users deploy it: the GenAI model builder's CUDA folders
(fp16 and int4) beside fptq-graph's `w4a8` and `ort` folders made from the builder's fp16 folder (issue 32).

The model is TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads) with random weights and the
vocabulary of the tokenizer given (--tokenizer: a folder with tokenizer.json; default, SmolLM2's, exported
from the packaged GGUF). Everything is built on the machine that measures: the Hugging Face folder, the
builder's folders (`-e cuda -p fp16`, `-p int4`), ours (`fptq-graph quantize FP16_FOLDER -o OUT --format
w4a8|ort --recipe fptq-paper`: speed depends on the form, not on how the weights were chosen). Each
measurement runs in a fresh process (its own peak memory), folders taking turns round by round:
- prefill: one prompt of --prefill tokens, empty past (ms to its first token);
- decode: tokens/s over --new-tokens greedy tokens after a --past-token prompt, batch 1 and batch --batch;
- peak device memory of the process (nvidia-smi per process; on the CPU its peak RSS);
- with the folder's own settings and again with `enable_cuda_graph` on, where genai accepts it (an error
  is recorded, not fatal).

    python benchmarks/genai_gpu.py --work /tmp/genai-gpu --json docs/genai-gpu.json     # the GPU machine
    python benchmarks/genai_gpu.py --dry-run                                            # here: tiny, -e cpu

Prints a table (ratios to the builder's int4 and fp16) and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CALIB = ROOT / "samples" / "text" / "python-docstrings.calib.txt"
SHAPES = {   # TinyLlama-1.1B's, and a tiny one for the dry run
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),
}


def tokenizer_folder(given: str | None, work: Path) -> Path:
    if given:
        return Path(given)
    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from fptq_graph.exporters.packaged import packaged_model

        gguf = packaged_model("smollm2")
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def hf_folder(size: str, tokenizer: Path, work: Path) -> Path:
    out = work / f"hf-{size}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **SHAPES[size]))
    model.save_pretrained(str(out))
    for item in tokenizer.iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    return out


def builder(hf: Path, out: Path, precision: str, device: str) -> Path:
    if not (out / "genai_config.json").is_file():
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                               "-p", precision, "-e", device, "-c", str(out.parent / "builder-cache")],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            raise RuntimeError(f"the GenAI builder ({precision}, {device}) failed:\n{done.stderr[-3000:]}")
    return out


def ours(source: Path, out: Path, form: str) -> Path:
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "fptq_graph.cli", "quantize", str(source), "-o", str(out), "--calib", str(CALIB),
                        "--calib-samples", "8", "--seq-len", "256", "--format", form, "--recipe", "fptq-paper",
                        "--sqnr-samples", "0", "-q"], check=True)
    return out


def with_cuda_graph(folder: Path) -> Path:
    """A copy of the folder's config (its other files linked) with enable_cuda_graph on."""
    out = folder.with_name(folder.name + "-cudagraph")
    out.mkdir(exist_ok=True)
    for item in folder.iterdir():
        if item.name != "genai_config.json" and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "genai_config.json").read_text())
    for entry in config["model"]["decoder"]["session_options"].get("provider_options", []):
        if "cuda" in entry:
            entry["cuda"]["enable_cuda_graph"] = "1"
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


class PeakMemory:
    """This process's peak device memory (MiB), sampled from nvidia-smi every 50 ms; on the CPU, VmHWM."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if device == "cuda" else None

    def _sample(self):
        while not self._stop.is_set():
            try:
                rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.splitlines()
                for row in rows:
                    pid, used = (part.strip() for part in row.split(","))
                    if int(pid) == os.getpid():
                        self.peak = max(self.peak, float(used))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.05)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()
        else:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) / 1024
        return False


def measure(folder: Path, device: str, prefill: int, past: int, new_tokens: int, batch: int) -> dict:
    """Runs in a child process: prefill ms, decode tokens/s at batch 1 and `batch`, peak memory."""
    import numpy as np
    import onnxruntime_genai as og

    with PeakMemory(device) as memory:
        model = og.Model(str(folder))
        vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
        rng = np.random.default_rng(0)

        def run(rows: int, length: int, steps: int) -> tuple[float, float]:
            """(ms to the first token after a prompt of `length`, tokens/s of the next `steps` steps a row)."""
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=length + steps + 1, batch_size=rows, do_sample=False)
            generator = og.Generator(model, params)
            ids = rng.integers(100, vocab - 1, (rows, length)).astype(np.int32)
            start = time.perf_counter()
            generator.append_tokens(ids)
            generator.generate_next_token()
            first = time.perf_counter()
            for _ in range(steps):
                generator.generate_next_token()
            end = time.perf_counter()
            return (first - start) * 1e3, steps / (end - first) if steps else 0.0

        run(1, 16, 4)                                  # warm-up (and CUDA graph capture, where on)
        prefill_ms, _ = run(1, prefill, 0)
        _, decode_b1 = run(1, past, new_tokens)
        _, decode_batch = run(batch, past, new_tokens)
    return {"prefill_ms": prefill_ms, "decode_b1_tok_s": decode_b1, f"decode_b{batch}_steps_s": decode_batch,
            "peak_mib": memory.peak}


def child(folder: Path, args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--device", args.device, "--prefill",
                           str(args.prefill), "--past", str(args.past), "--new-tokens", str(args.new_tokens), "--batch",
                           str(args.batch)], capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def weights_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith((".onnx", ".onnx.data", ".data"))) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/genai-gpu"))
    p.add_argument("--size", choices=list(SHAPES), default="1b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tokenizer", help="a folder with tokenizer.json (default: SmolLM2's, from the packaged GGUF)")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--past", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the enable_cuda_graph settings")
    p.add_argument("--timeout", type=int, default=300, help="seconds one measurement may take")
    p.add_argument("--dry-run", action="store_true", help="tiny model, builder -e cpu, CPU provider, short runs")
    p.add_argument("--json", type=Path)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.device, args.prefill, args.past, args.new_tokens, args.batch)))
        return 0
    if args.dry_run:
        args.size, args.device, args.prefill, args.past, args.new_tokens, args.batch, args.rounds = "tiny", "cpu", 64, 32, 8, 2, 2
        args.no_cuda_graph = True
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    hf = hf_folder(args.size, tokenizer_folder(args.tokenizer, args.work), args.work)
    float_precision = "fp16" if args.device == "cuda" else "fp32"   # the builder's CPU target is fp32
    fp = builder(hf, args.work / f"builder-{float_precision}", float_precision, args.device)
    folders = {f"builder {float_precision}": fp, "builder int4": builder(hf, args.work / "builder-int4", "int4", args.device),
               "fptq w4a8": ours(fp, args.work / "fptq-w4a8", "w4a8"), "fptq ort": ours(fp, args.work / "fptq-ort", "ort")}
    settings = {name: folder for name, folder in folders.items()}
    if not args.no_cuda_graph:
        settings.update({f"{name}, CUDA graph": with_cuda_graph(folder) for name, folder in folders.items()})
    print(f"built in {time.perf_counter() - started:.0f} s; measuring {len(settings)} settings x {args.rounds} rounds",
          flush=True)
    runs = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, folder in settings.items():
            runs[name].append(child(folder, args))
        print(f"round {round_ + 1} of {args.rounds} done", flush=True)
    batch_key = f"decode_b{args.batch}_steps_s"
    results = {}
    for name, rows in runs.items():
        good = [r for r in rows if "error" not in r]
        if not good:
            results[name] = {"error": rows[0]["error"]}
            continue
        results[name] = {key: statistics.median(r[key] for r in good) for key in good[0]}
        results[name]["peak_mib"] = max(r["peak_mib"] for r in good)
        results[name]["weights_mib"] = weights_mib(settings[name])
    base_int4, base_fp = results.get("builder int4", {}), results.get(f"builder {float_precision}", {})
    print(f"\n{args.size} LLaMA (random weights), onnxruntime-genai on {args.device}; prefill {args.prefill}, decode after "
          f"{args.past} tokens, {args.new_tokens} new tokens, batch 1 and {args.batch}; medians of {args.rounds} rounds\n")
    print(f"| setting | prefill ms | decode b1 tok/s | decode b{args.batch} steps/s | b1 x int4 | b1 x {float_precision} | "
          f"b{args.batch} x int4 | prefill x {float_precision} | peak MiB | weights MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} |||||||||")
            continue

        def ratio(base, key, inverse=False):
            if "error" in base or not base.get(key):
                return "-"
            return f"{(base[key] / r[key]) if inverse else (r[key] / base[key]):.2f}"

        print(f"| {name} | {r['prefill_ms']:.1f} | {r['decode_b1_tok_s']:.1f} | {r[batch_key]:.1f} | "
              f"{ratio(base_int4, 'decode_b1_tok_s')} | {ratio(base_fp, 'decode_b1_tok_s')} | {ratio(base_int4, batch_key)} | "
              f"{ratio(base_fp, 'prefill_ms', inverse=True)} | {r['peak_mib']:.0f} | {r['weights_mib']:.0f} |")
    if args.json:
        import onnxruntime
        import onnxruntime_genai

        device = args.device
        if device == "cuda":
            device = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
        args.json.write_text(json.dumps({
            "device": device, "date": time.strftime("%Y-%m-%d"), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__, "size": args.size, "shape": SHAPES[args.size],
            "prefill": args.prefill, "past": args.past, "new_tokens": args.new_tokens, "batch": args.batch,
            "rounds": args.rounds, "results": results, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
