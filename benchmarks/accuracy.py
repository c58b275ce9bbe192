"""Accuracy of every recipe against the float model and ONNX Runtime's own quantizers, on real models.

For each real pretrained model the project can load offline (fptq_graph.exporters.packaged):
- smollm2 (SmolLM2-135M-Instruct, LLaMA decoder): perplexity on held-out text, lower is better;
- minilm (all-MiniLM-L6-v2, BERT encoder, no LM head): sentence-embedding cosine to the float model
  and nearest-neighbour agreement on held-out passages, higher is better.

Every row runs at every INT4 group size of --groups (default 128 and 32; ONNX Runtime's rows at the
same block size). Rows (RECIPES): our recipes (recipes.py) and each weight quantizer with FPTQ, all in
the qdq form run by fptq_graph.runtime.session, LM head float unless the row says so; and ONNX
Runtime's tools on the same float ONNX, the same calibration windows and the same linears:
`quantize_static` (QDQ, int8 per-channel weights, uint8 MinMax activations: ORT's recommended U8S8;
its int8-activation output fails ORT's own type check in 1.31; group-free, run once) and
`MatMulNBitsQuantizer` (4 bits, symmetric) at accuracy_level 0 (float activations: W4A16) and 4 (int8
activations per block: ORT's W4A8 on CPU), and at level 4 with the LM head quantized to 4 bits at the
same block, as the GenAI model builder's int4 models store it. With --builder-folders DIR..., the
models of GenAI builder folders (benchmarks/genai_decode.py makes them) are scored on the same tokens
too. Evaluation text is held out: calibration never sees it; windows start with BOS when the
tokenizer adds one (calibration.leading_bos).

    python benchmarks/accuracy.py [--models smollm2 minilm] [--groups 128 32] [--json docs/accuracy.json]

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

# label -> Config fields (group_size comes from --groups). Every row uses the same calibration windows;
# "groups": the group sizes a row runs at when not all of --groups (None: group-free, run once).
RECIPES = {
    "fptq (default: AWQ + gptq-clip)": {"recipe": "fptq"},
    "fptq-rot (Hadamard + fptq, no AWQ on rotated inputs)": {"recipe": "fptq-rot"},
    "fptq-rot, online FFN rotation (--rotate-ffn)": {"recipe": "fptq-rot", "rotate_ffn": True},
    # the measured classifier on the rotated stream (fptq where the rotation falls back)
    "fptq-rot-measured (fptq-rot, measured classifier)": {"recipe": "fptq-rot-measured"},
    "fptq-rot-measured, online FFN rotation (--rotate-ffn)": {"recipe": "fptq-rot-measured", "rotate_ffn": True},
    # what that classifier does on the stream unrotated (why the row falls back to the bands there)
    "measured classifier + AWQ + gptq-clip, unrotated": {"recipe": str(ROOT / "benchmarks" / "recipes" / "measured-awq.toml")},
    # what fptq-rot --rotate-ffn stands on: the same rotations and GPTQ with activations float (the weights'
    # floor), then per-token int8 on every linear (what the activations cost with a scale per token)
    "w4a16 gptq-clip, rotated + --rotate-ffn": {"recipe": "rtn-w4a16", "rotate": "hadamard", "rotate_ffn": True,
                                                "weight_quantizer": "gptq-clip"},
    "dynamic-w4a8 gptq-clip, rotated + --rotate-ffn": {"recipe": "dynamic-w4a8", "rotate": "hadamard", "rotate_ffn": True,
                                                       "weight_quantizer": "gptq-clip"},
    "fptq-paper (RTN)": {"recipe": "fptq-paper"},
    "fptq-paper, rotated (RTN)": {"recipe": "fptq-paper", "rotate": "hadamard"},
    "dynamic-w4a8 (per token, RTN)": {"recipe": "dynamic-w4a8"},
    "rtn-w4a16": {"recipe": "rtn-w4a16"},
    "rtn-w4a16, rotated": {"recipe": "rtn-w4a16", "rotate": "hadamard"},
    "dynamic-w4a8, rotated (RTN)": {"recipe": "dynamic-w4a8", "rotate": "hadamard"},
    "fptq-measured (clip)": {"recipe": "fptq-measured"},
    "dynamic-w4a8, clip": {"recipe": "dynamic-w4a8", "weight_quantizer": "clip"},
    "fptq-measured, gptq-clip": {"recipe": "fptq-measured", "weight_quantizer": "gptq-clip"},
    "dynamic-w4a8, gptq-clip": {"recipe": "dynamic-w4a8", "weight_quantizer": "gptq-clip"},
    "fptq-awq (AWQ + clip)": {"recipe": "fptq-awq"},
    "fptq-paper, clip": {"recipe": "fptq-paper", "weight_quantizer": "clip"},
    "fptq-paper, gptq-clip": {"recipe": "fptq-paper", "weight_quantizer": "gptq-clip"},
    "fptq, int8 LM head (CLI default)": {"recipe": "fptq", "lm_head": "int8"},
    "fptq, int4 LM head": {"recipe": "fptq", "lm_head": "int4"},
    "fptq, int8 embedding tables (CLI default)": {"recipe": "fptq", "embedding": "int8"},
    "fptq, int4 embedding tables": {"recipe": "fptq", "embedding": "int4"},
    "fptq, ort form, accuracy_level 4": {"recipe": "fptq", "format": "ort", "ort_accuracy_level": 4},
    "awq-w4a16 (AWQ + clip)": {"recipe": "awq-w4a16"},
    # block by block with float inputs is the default row to the byte (tests/sequential/test_sequential.py); this one
    # feeds each block what the quantized blocks before it give (GPTQ's and llm-compressor's sequential)
    "fptq, block by block, quantized inputs": {"recipe": "fptq", "sequential": True, "block_inputs": "quantized"},
    "fptq-paper, gptq act-order": {"recipe": "fptq-paper", "weight_quantizer": "gptq", "act_order": True, "groups": (128,)},
    "naive-w4a8": {"recipe": "naive-w4a8"},
    "smoothquant-w4a8": {"recipe": "smoothquant-w4a8"},
    "w8a8-smoothquant": {"recipe": "w8a8-smoothquant", "groups": None},
    "fptq-paper, gptq": {"recipe": "fptq-paper", "weight_quantizer": "gptq"},
}
# Per model: calibration (samples x tokens) and what is evaluated.
MODELS = {
    "smollm2": {"kind": "decoder", "calib_samples": 32, "seq_len": 512, "eval_tokens": 4096},
    "minilm": {"kind": "encoder", "calib_samples": 128, "seq_len": 256},
}
STATIC = "ort quantize_static (W8A8 QDQ)"
NBITS = "ort MatMulNBits acc {level}"
NBITS_HEAD = "ort MatMulNBits acc 4, int4 LM head (builder-style)"
GROUP_FREE = "-"   # the rows key of group-free rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--groups", nargs="+", type=int, default=[128, 32], help="INT4 group sizes (default 128 32)")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's quantizers")
    parser.add_argument("--builder-folders", nargs="*", type=Path, default=[],
                        help="GenAI builder folders (genai_config.json) whose models are scored too (decoders)")
    parser.add_argument("--calib-samples", type=int, help="override every model's calibration sample count")
    parser.add_argument("--eval-tokens", type=int, help="override the decoder's evaluated token count")
    parser.add_argument("--out", default=str(ROOT / "out" / "accuracy"), help="work folder for the models")
    parser.add_argument("--json", default=str(ROOT / "out" / "accuracy" / "accuracy.json"), help="result JSON")
    parser.add_argument("--fresh", action="store_true", help="ignore rows the JSON already holds")
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
        done = results["models"].get(name, {})
        if done.get("settings") != settings:
            done = {}
        results["models"][name] = {"settings": settings, "rows": done.get("rows", {})}
        run_model(name, results["models"][name], args, out, lambda: write_json(json_path, results))
        print_table(name, results["models"][name], args.groups)
    print(f"\nwrote {args.json}")
    return 0


def run_model(name: str, result: dict, args, out: Path, save) -> None:
    """Fills result["rows"] ({group key: {label: row}}), skipping rows it already has; save() after each."""
    import fptq_graph as fq
    from fptq_graph.exporters import export_hf
    from fptq_graph.exporters.packaged import packaged_model

    settings, rows = result["settings"], result["rows"]
    float_path = out / f"{name}.onnx"
    if not float_path.is_file():
        print(f"exporting {name} ...", flush=True)
        export_hf(packaged_model(name), float_path)
    metric = Metric(settings, float_path)
    result["bos"] = metric.bos
    # the float row always runs: an encoder's metric compares with the float embeddings it computes
    rows.setdefault(GROUP_FREE, {})["float"] = {**metric(float_path, ours=True), "bytes": float_path.stat().st_size}
    print(f"{name} float: {fmt(rows[GROUP_FREE]['float'])}", flush=True)
    save()
    # the baselines first: ONNX Runtime's quantizers and the builder's models, then our rows
    if not args.no_ort:
        for key, label, path in ort_quantized(name, float_path, metric, settings, args.groups, out, rows):
            rows.setdefault(key, {})[label] = {**metric(path, ours=False), "bytes": model_bytes(path)}
            print(f"{name} {label} {key}: {fmt(rows[key][label])}", flush=True)
            save()
    if settings["kind"] == "decoder":
        for folder in args.builder_folders:
            model = folder / json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
            label = f"GenAI builder: {folder.name}"
            rows[GROUP_FREE][label] = {**metric(model, ours=False), "bytes": model_bytes(model)}
            print(f"{name} {label}: {fmt(rows[GROUP_FREE][label])}", flush=True)
            save()
    for label in args.recipes:
        fields = dict(RECIPES[label])
        groups = fields.pop("groups", tuple(args.groups))
        if "lm_head" in fields and settings["kind"] != "decoder":
            continue   # no LM head: the row would repeat the one above
        if "embedding" in fields and settings["kind"] == "decoder":
            continue   # SmolLM2's table is tied: the int8 head's row stores it (a float head keeps it float)
        for group in (groups or (None,)):
            if group is not None and group not in args.groups:
                continue
            key = GROUP_FREE if group is None else f"g{group}"
            table = rows.setdefault(key, {})
            if label in table:
                print(f"{name} {label} {key}: {fmt(table[label])} (from the JSON)", flush=True)
                continue
            config = fq.Config(**{"lm_head": "float", **fields}, **({"group_size": group} if group else {}),
                               calib_samples=settings["calib_samples"], calib_seq_len=settings["seq_len"],
                               progress=False, sqnr_samples=0)
            start = time.perf_counter()
            quantized = fq.quantize(float_path, str(CALIB), config)
            stem = label.split(" (")[0].replace(", ", "-").replace(" ", "-")
            path = quantized.save(out / f"{name}.{stem}.{key}.onnx")
            seconds = time.perf_counter() - start
            schemes = {}
            for layer in quantized.layers:
                schemes[layer["scheme"]] = schemes.get(layer["scheme"], 0) + 1
            # each row its own date: the file's top-level date is the last run's, and rows are kept across runs
            table[label] = {**metric(path, ours=True), "schemes": schemes, "quantize_seconds": round(seconds, 1),
                            "bytes": model_bytes(path), "date": time.strftime("%Y-%m-%d")}
            print(f"{name} {label} {key}: {fmt(table[label])} ({seconds:.0f} s to quantize)", flush=True)
            save()


def model_bytes(path: Path) -> int:
    """The model file and its external data."""
    from fptq_graph.files.run_outputs import model_files

    return sum(Path(p).stat().st_size for p in model_files(path))


class Metric:
    """Perplexity (decoder) or embedding agreement with the float model (encoder) on held-out text."""

    def __init__(self, settings: dict, float_path: Path):
        from transformers import AutoTokenizer

        from fptq_graph.calibration import leading_bos

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(str(float_path.with_name(float_path.stem + ".tokenizer")))
        self.bos = leading_bos(self.tokenizer)
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
        from fptq_graph.ir.load import load_split
        from fptq_graph.runtime import session

        # Ours through our session (reference numerics, op library); ORT's models as ORT runs them.
        sess = session(path) if ours else ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        if self.settings["kind"] == "decoder":
            # the graph's inputs with any KV cache sizes the loader fills in (a builder model's head_dim)
            inputs = load_split(path).proto.graph.input
            value = perplexity(sess, self.ids, self.settings["seq_len"], max_tokens=self.settings["eval_tokens"],
                               bos=self.bos, inputs=inputs)
            return {"perplexity": round(value, 4), "eval_seconds": round(time.perf_counter() - start, 1)}
        emb = sentence_embeddings(sess, self.tokenizer, self.texts)
        if self.reference is None:
            self.reference = emb
        score = embedding_agreement(self.reference, emb).as_dict()
        return {k: round(v, 4) for k, v in score.items()} | {"eval_seconds": round(time.perf_counter() - start, 1)}


def our_linears(model, lm_head: str) -> list[str]:
    """The linears our pipeline quantizes in `model` (the LM head among them unless lm_head is "float")."""
    import onnx_graphsurgeon as gs

    from fptq_graph import Config
    from fptq_graph.passes import FindQuantizableLinears
    from fptq_graph.passes.state import State

    state = State(graph=gs.import_onnx(model), config=Config(lm_head=lm_head))
    FindQuantizableLinears().run(state)
    return list(state.linears)


def ort_quantized(name: str, float_path: Path, metric: Metric, settings: dict, groups: list[int], out: Path,
                  rows: dict):
    """ONNX Runtime's static QDQ quantizer and its MatMulNBits quantizer on the linears we quantize;
    yields (group key, label, path) for each row `rows` does not hold yet."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from fptq_graph.calibration import read_token_ids, windows_of
    from fptq_graph.ir.load import load_model
    model = load_model(float_path)
    linears = our_linears(model, "float")
    with_head = our_linears(model, "int4")
    if STATIC not in rows.get(GROUP_FREE, {}):
        calib = windows_of(read_token_ids(CALIB, lambda: metric.tokenizer), settings["seq_len"],
                           settings["calib_samples"], 1, str(CALIB), bos=metric.bos)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = calib.feed_batches(model.graph.input)

            def get_next(self):
                return next(self.batches, None)

        path = out / f"{name}.ort-static.onnx"
        start = time.perf_counter()
        # Ranges are folded every `chunk` batches to bound memory. onnxruntime 1.31 raises "No data is
        # collected" when the batch count is a multiple of the chunk (its last fold leaves nothing): avoid that.
        chunk = next(c for c in (8, 7, 6, 5, 3) if calib.num_samples % c)
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=linears,
                        extra_options={"CalibMaxIntermediateOutputs": chunk})
        fix_ir_version(path)
        print(f"{name}: quantize_static took {time.perf_counter() - start:.0f} s", flush=True)
        yield GROUP_FREE, STATIC, path
    variants = [(NBITS.format(level=0), 0, linears), (NBITS.format(level=4), 4, linears)]
    if len(with_head) > len(linears):   # a model with an LM head
        variants.append((NBITS_HEAD, 4, with_head))
    for block in groups:
        key = f"g{block}"
        for label, level, nodes in variants:
            if label in rows.get(key, {}):
                continue
            path = out / f"{name}.ort-nbits-acc{level}{'-head' if nodes is with_head else ''}.{key}.onnx"
            source = onnx.load(str(float_path))
            if nodes is with_head:
                constant_head_weight(source, [n for n in with_head if n not in linears])
            quantizer = MatMulNBitsQuantizer(source, bits=4, block_size=block, is_symmetric=True,
                                             accuracy_level=level, nodes_to_include=nodes)
            quantizer.process()
            quantizer.model.model.ir_version = 10
            quantizer.model.save_model_to_file(str(path))
            yield key, label, path


def constant_head_weight(model, heads: list[str]) -> None:
    """A tied LM head reads Transpose(embedding table); MatMulNBitsQuantizer skips a MatMul whose weight
    is not an initializer, so the head gets the transposed table as its own initializer (what the GenAI
    builder writes for a tied head before quantizing it)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in heads or node.input[1] in inits:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
            raise SystemExit(f"{node.name}: its weight is neither an initializer nor Transpose(initializer)")
        table = numpy_helper.to_array(inits[transpose.input[0]])
        weight = numpy_helper.from_array(table.T.copy(), node.name + ".weight_t")
        model.graph.initializer.append(weight)
        node.input[1] = weight.name


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


def print_table(name: str, result: dict, groups: list[int]) -> None:
    """One line a row, one column group a group size (group-free rows in the first group's columns)."""
    rows, s = result["rows"], result["settings"]
    decoder = s["kind"] == "decoder"
    print(f"\n## {name}: calibration {s['calib_samples']} x {s['seq_len']} tokens of {CALIB.name}; "
          + (f"perplexity over {s['eval_tokens']} held-out tokens" if decoder else "held-out passages")
          + f"; BOS {'first' if result.get('bos') is not None else 'not added (the tokenizer adds none)'}")
    base = rows[GROUP_FREE]["float"].get("perplexity")
    cols = (["perplexity", "× float"] if decoder else ["mean cos", "min cos", "NN agr."])
    keys = [f"g{g}" for g in groups]
    print("| row | " + " | ".join(f"{c}, {k}" for k in keys for c in cols) + " | schemes | MiB, " + keys[0] + " |")
    print("|" + "---|" * (len(cols) * len(keys) + 3))
    held = set(rows[GROUP_FREE]).union(*(rows.get(k, {}) for k in keys))
    # float, our rows in RECIPES' order, then ONNX Runtime's and the builder's
    labels = ["float"] + [l for l in RECIPES if l in held] + sorted(held - set(RECIPES) - {"float"})
    for label in labels:
        cells, first = [], None
        for key in keys:
            row = rows.get(key, {}).get(label) or (rows[GROUP_FREE].get(label) if key == keys[0] else None)
            first = first or row
            if row is None:
                cells += [""] * len(cols)
            elif decoder:
                cells += [f"{row['perplexity']:.3f}", f"{row['perplexity'] / base:.3f}"]
            else:
                cells += [f"{row['mean_cosine']:.4f}", f"{row['min_cosine']:.4f}", f"{row['nn_agreement']:.3f}"]
        schemes = " / ".join(f"{v} {k}" for k, v in first.get("schemes", {}).items()) or "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {schemes} | {first['bytes'] / 2**20:.1f} |")


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
