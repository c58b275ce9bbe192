"""End-to-end decoder latency and weight memory in three forms: fp16, `ort` (MatMulNBits) and `w4a8`.

A LLaMA-architecture decoder with random weights from a config (--size 1b: TinyLlama's shape,
1.1B parameters; --size tiny for a plumbing check on any machine) is exported in fp16 with its KV
cache, then quantized by FPTQ (random-token calibration: weights are random, so text means nothing)
into the `ort` form (com.microsoft.MatMulNBits) and the `w4a8` form (fptq::W4A8MatMul). Measured
per form through ONNX Runtime with I/O bound to the device (outputs stay there, no copies timed):
- prefill: batch 1 x 2048 new tokens, empty past (median ms per Run);
- decode: one new token against a past of --context tokens, batch 1 and batch 16 (median ms per step);
- weights: bytes of the graph's initializers (what the device must hold for the weights).

    python benchmarks/e2e_gpu.py --provider cuda [--size 1b] [--json docs/e2e_gpu.json]
    python benchmarks/e2e_gpu.py --provider cpu --size tiny      # the plumbing, anywhere

Prints a table and writes JSON. Targets (issue 6): w4a8 prefill >= 1.3x faster than fp16; decode no
slower than `ort`; weights <= 0.3x fp16.

What this measures on a GPU: the exported graph one ORT Run a step, with unfused attention, rotary and
norms and no CUDA graph: several hundred small kernels a token, so decode here is bound by launches, not
by the linears (H200, 2026-12-04: 7.4-7.9 ms a token for 2.1 GB of fp16 weights, ~15x the memory roof).
How users deploy a decoder on a GPU is onnxruntime-genai over the GenAI builder's CUDA folders:
benchmarks/genai_gpu.py (issue 32) is the deployment figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--prefill", type=int, default=2048, help="prefill tokens (default %(default)s)")
    parser.add_argument("--context", type=int, default=512, help="past length for decode steps (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "out" / "e2e"))
    parser.add_argument("--json", help="result JSON (default: e2e.json in --out)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.json = args.json or str(out / "e2e.json")
    paths = build_forms(args.size, out)
    import onnxruntime as ort

    results = {"device": device_name(args.provider), "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d"),
               "size": args.size, "config": SIZES[args.size], "prefill_tokens": args.prefill,
               "decode_context": args.context, "forms": {}}
    for form, path in paths.items():
        print(f"measuring {form} ...", flush=True)
        results["forms"][form] = measure(path, args)
        print(f"  {results['forms'][form]}", flush=True)
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


def build_forms(size: str, out: Path) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fptq_graph as fq
    from fptq_graph.exporters import export_hf

    paths = {"fp16": out / f"llama-{size}.fp16.onnx", "ort": out / f"llama-{size}.ort.onnx",
             "w4a8": out / f"llama-{size}.w4a8.onnx"}
    if not paths["fp16"].is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).eval().half()
        start = time.perf_counter()
        export_hf(model, paths["fp16"], kv_cache=True)
        print(f"exported fp16 in {time.perf_counter() - start:.0f} s", flush=True)
        del model
    for form in ("ort", "w4a8"):
        if not paths[form].is_file():
            start = time.perf_counter()
            # The LM head is quantized too: with random weights there is no accuracy to keep, and its
            # 32000 x 2048 fp16 weight would otherwise be an eighth of the memory compared.
            config = fq.Config(format=form, calib_seq_len=128, calib_batch_size=4, sqnr_samples=0, progress=False,
                               quantize_lm_head=True)
            fq.quantize(paths["fp16"], 8, config).save(paths[form])
            print(f"quantized {form} in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def measure(path: Path, args) -> dict:
    import onnxruntime as ort

    from fptq_graph.runtime import PROVIDERS, session

    sess = session(path, providers=PROVIDERS[args.provider])
    device = "cuda" if args.provider == "cuda" else "cpu"
    inputs = {i.name: i for i in sess.get_inputs()}
    pasts = [n for n in inputs if n.startswith("past_key_values.")]
    float_type = np.float16 if inputs[pasts[0]].type == "tensor(float16)" else np.float32
    heads, head_dim = inputs[pasts[0]].shape[1], inputs[pasts[0]].shape[3]
    outputs = [o.name for o in sess.get_outputs()]

    def run_timed(batch: int, new: int, past_len: int) -> float:
        rng = np.random.default_rng(0)
        binding = sess.io_binding()
        feeds = {"input_ids": rng.integers(0, 1000, (batch, new), dtype=np.int64),
                 "attention_mask": np.ones((batch, past_len + new), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + new), (batch, new)).astype(np.int64).copy()}
        feeds.update({n: (rng.standard_normal((batch, heads, past_len, head_dim)) * 0.1).astype(float_type) for n in pasts})
        for name, value in feeds.items():   # device-resident inputs: uploaded once, not timed
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
        for name in outputs:
            binding.bind_output(name, device)
        times = []
        for _ in range(args.repeats + 3):
            binding.synchronize_inputs()
            start = time.perf_counter()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:]) * 1e3

    weights = weight_bytes(path)
    return {"prefill_ms": round(run_timed(1, args.prefill, 0), 3),
            "decode_b1_ms": round(run_timed(1, 1, args.context), 3),
            "decode_b16_ms": round(run_timed(16, 1, args.context), 3),
            "weight_mib": round(weights / 2**20, 1)}


def weight_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(init.data_type)
        total += count * bits // 8 if bits else count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def device_name(provider: str) -> str:
    if provider == "cuda":
        try:
            import subprocess

            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, check=True).stdout.strip().splitlines()[0]
        except Exception:
            return "CUDA device"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def print_table(results: dict) -> None:
    forms = results["forms"]
    fp16, ort_form = forms["fp16"], forms["ort"]
    print(f"\n{results['device']}, onnxruntime {results['onnxruntime']}, {results['date']}; LLaMA {results['size']}, "
          f"random weights; prefill 1x{results['prefill_tokens']}, decode against {results['decode_context']} past tokens")
    print("| form | prefill ms | decode b1 ms/token | decode b16 ms/step | weights MiB | prefill vs fp16 | decode b1 vs ort | weights vs fp16 |")
    print("|---|---|---|---|---|---|---|---|")
    for form, r in forms.items():
        print(f"| {form} | {r['prefill_ms']:.2f} | {r['decode_b1_ms']:.3f} | {r['decode_b16_ms']:.3f} | {r['weight_mib']:.1f} | "
              f"{fp16['prefill_ms'] / r['prefill_ms']:.2f}x | {ort_form['decode_b1_ms'] / r['decode_b1_ms']:.2f}x | "
              f"{r['weight_mib'] / fp16['weight_mib']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
