"""How cost grows with model size: wall time and peak memory of export, calibrate and quantize, against
ONNX Runtime's quantize_static and MatMulNBits quantizer on the same models.

LLaMA-architecture decoders are built from a config with random weights (float32, untied LM head) at
three sizes, about 0.1B, 0.5B and 1.5B parameters, and exported by `fptq_graph.exporters.export_hf`
(the logits graph); `--sizes 262k-vocab` adds a model whose tied 262144-token table is most of its
weights (Gemma-3-270M's shape: there one calibration batch's logits outweigh the weights). Every step runs in its own process; the parent reads the child's wall time and
peak resident set size (wait4's ru_maxrss), so one step's memory never hides in another's. Steps:

- export:            build the model in torch and export it to ONNX (external data above 2 GB);
- float inference:   the floor: a default onnxruntime session running the float model on one
                     calibration batch (8 x 256 tokens, logits out);
- calibrate:         `fptq_graph.calibrate`, our pipeline up to and including calibration (observers,
                     32 x 256 tokens in batches of 8); "calibrate 4x samples" the same on 128 x 256;
- quantize:          `fptq_graph.quantize` to the qdq form and save, calibration included; "quantize, no
                     SQNR" the same without the report's output-SQNR analysis (--sqnr-samples 0);
- ort static:        onnxruntime.quantization.quantize_static (QDQ, MinMax, U8S8, per tensor), same
                     32 x 256 tokens in batches of 8, CalibMaxIntermediateOutputs=3 (ORT's option that
                     bounds calibration memory), external data when the model needs it;
- ort matmul_nbits:  MatMulNBitsQuantizer (4 bits, block 128, symmetric: weights only, no calibration);
- eval:              `fptq_graph.evaluate.perplexity` of the quantized model (the block-by-block output if
                     there is one, else a whole-graph one) on EVAL_WINDOWS windows of 512 random tokens,
                     in our session (the memory is the point: random weights make the perplexity meaningless).

    python benchmarks/scale.py [--sizes 0.1b 0.5b 1.5b] [--steps ...] [--work out/scale] [--json docs/scale.json]

Prints the table and writes the JSON after every step; a rerun reuses steps the JSON already holds
(--fresh redoes the chosen steps and keeps the others). A step that fails or is killed (out of
memory) is recorded with its error.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# hidden, intermediate, layers, heads (kv heads = heads); vocab 32000 and an untied LM head unless given.
# "262k-vocab": a Gemma-3-270M-like shape (tied 262144 x 640 table, most of the weights): the size where
# the LM head, its logits and the embedding table dominate memory rather than the layers.
SIZES = {
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12),
    "1.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=26, num_attention_heads=16),
    # OpenLLaMA-3B's and LLaMA-2-7B's shapes; exported from a safetensors checkpoint (steps "checkpoint",
    # "stream export"), "-fp16" sizes as float16 (half the disk and the float weights).
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "7b-fp16": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    # two of the 7B's layers: its per-block peak and time in minutes rather than an hour and a half
    "7b-fp16-2layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32),
    "7b-2layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32),
    "262k-vocab": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=4,
                       vocab_size=262144, tie_word_embeddings=True),
}
DEFAULT_SIZES = ("0.1b", "0.5b", "1.5b")
STEPS = ("export", "float inference", "calibrate", "calibrate 4x samples", "quantize", "quantize, no SQNR", "ort static",
         "ort matmul_nbits", "checkpoint", "stream export", "quantize block by block", "quantize block by block, 2 workers",
         "eval")
EVAL_WINDOWS, EVAL_TOKENS = 4, 512
# The block-by-block steps calibrate on less (8 x 256 tokens) so that a 7B on 2 cores takes under an hour;
# the whole-graph steps keep CALIB_SAMPLES.
BLOCK_SAMPLES = 8
CALIB_SAMPLES, CALIB_TOKENS, CALIB_BATCH = 32, 256, 8
OUTPUTS = {"quantize": "fptq", "quantize, no SQNR": "fptq-nosqnr", "ort static": "ort-static",
           "ort matmul_nbits": "ort-nbits", "quantize block by block": "fptq-blocks",
           "quantize block by block, 2 workers": "fptq-blocks-2w"}   # step -> file tag


def dtype_of(size: str) -> str:
    return "float16" if "-fp16" in size else "float32"


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(**{"vocab_size": 32000, "tie_word_embeddings": False, **SIZES[size]}, max_position_embeddings=2048)


def vocab(size: str) -> int:
    return SIZES[size].get("vocab_size", 32000)


def float_bytes(size: str) -> int:
    return (2 if dtype_of(size) == "float16" else 4) * parameters(size)


def parameters(size: str) -> int:
    c = SIZES[size]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    tables = 1 if c.get("tie_word_embeddings") else 2
    return tables * vocab(size) * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), choices=list(SIZES))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--work", default=str(ROOT / "out" / "scale"), help="where models are written")
    parser.add_argument("--json", default=str(ROOT / "docs" / "scale.json"))
    parser.add_argument("--fresh", action="store_true", help="redo the chosen steps even if the JSON holds them")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds one step may take")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "STEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so measure_child stops its step too
    work = Path(args.work)
    if args.child:
        run_step(*args.child, work)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"), calibration=f"{CALIB_SAMPLES} x {CALIB_TOKENS} tokens, batch {CALIB_BATCH}")
    rows = results.setdefault("rows", {})
    for size in args.sizes:
        row = rows.setdefault(size, {"parameters": parameters(size), "float_weight_bytes": float_bytes(size),
                                     "dtype": dtype_of(size)})
        for step in args.steps:
            if step in row and "error" not in row[step] and not args.fresh:
                continue
            if step == "stream export" and not (work / f"llama-{size}-hf").is_dir():
                row[step] = {"error": "no checkpoint (run the checkpoint step)"}
                continue
            if step not in ("export", "checkpoint", "stream export") and not (work / f"llama-{size}.onnx").is_file():
                row[step] = {"error": "no exported model (run the export step)"}
                continue
            print(f"{size} {step} ...", flush=True)
            row[step] = measure_child(size, step, work, args.timeout)
            if step.startswith("quantize block by block") and "error" not in row[step]:
                # hashed here, not in the measured child: loading the output would count in its peak
                row[step]["sha256_graph"] = _graph_hash(work / f"llama-{size}.{OUTPUTS[step]}.onnx")
            print(f"  {row[step]}", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
    print_table(results)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


def measure_child(size: str, step: str, work: Path, timeout: float) -> dict:
    """Runs one step in a child process; its wall time, peak RSS and, on failure, the error's last line."""
    command = [sys.executable, __file__, "--work", str(work), "--child", size, step]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = start + timeout
    lines = []
    try:
        while True:   # stream the child's output (progress), keep its tail for the error message
            line = child.stdout.readline()
            if not line:
                break
            lines = (lines + [line.rstrip()])[-20:]
            print(f"    | {line.rstrip()}", flush=True)
            if time.perf_counter() > deadline:
                child.kill()
                lines.append(f"killed after {timeout:.0f} s")
                break
    except BaseException:   # stopped (Ctrl-C, SIGTERM): a step left running would share the work folder
        child.kill()
        child.wait()
        raise
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    out = {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        out["error"] = ("killed by signal %d (out of memory?)" % -code) if code < 0 else (lines[-1] if lines else f"exit {code}")
    else:
        for line in lines:
            if line.startswith("RESULT "):
                out.update(json.loads(line[len("RESULT "):]))
    return out


def run_step(size: str, step: str, work: Path) -> None:
    source = work / f"llama-{size}.onnx"
    info: dict = {}
    for stale in work.glob(f"llama-{size}.{OUTPUTS.get(step, '-')}.onnx*"):
        stale.unlink()   # an earlier run's external data would otherwise count in the size
    if step == "export":
        import torch
        from transformers import LlamaForCausalLM

        from fptq_graph.exporters import export_hf

        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(size)).eval()
        export_hf(model, source)
        info["onnx_bytes"] = file_bytes(source)
    elif step == "checkpoint":   # a safetensors folder of random weights, written a shard at a time
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from export_memory import SIZES as CHECKPOINT_SIZES, write_checkpoint

        CHECKPOINT_SIZES[size] = SIZES[size]
        info.update(write_checkpoint(size, work / f"llama-{size}-hf", dtype_of(size)))
    elif step == "stream export":   # fptq-graph export of that folder (exporters/streaming.py)
        from fptq_graph.cli import main as cli

        code = cli(["export", str(work / f"llama-{size}-hf"), "-o", str(source)])
        if code:
            raise SystemExit(code)
        info["onnx_bytes"] = file_bytes(source)
    elif step.startswith("quantize block by block"):
        import fptq_graph as fq

        config = fq.Config(calib_samples=BLOCK_SAMPLES, calib_seq_len=CALIB_TOKENS, calib_batch_size=CALIB_BATCH,
                           sqnr_samples=0, progress=False, sequential=True)
        workers = 2 if "2 workers" in step else None
        result = fq.quantize(source, BLOCK_SAMPLES, config, workers=workers,
                             work_dir=work / f"llama-{size}.{OUTPUTS[step]}.work", resume=True,
                             log=lambda line: print(line, flush=True))
        out = result.save(work / f"llama-{size}.{OUTPUTS[step]}.onnx")
        info["passes"] = {p.name: round(p.seconds, 1) for p in result.passes}
        info["onnx_bytes"] = file_bytes(out)
        info["recipe"] = {"awq": bool(result.plan.recipe.awq), "weights": result.plan.recipe.weights,
                          "traded": result.plan.statistics_note or None}
        blocks = result.run["blocks"]
        info["blocks"] = len(blocks)
        info["block_seconds"] = [b["seconds"] for b in blocks]
        info["block_peak_rss_mib"] = max(b["peak_rss_mib"] for b in blocks)
        info["largest_block_gram_mib"] = max(b["gram_mib"] for b in blocks)
        info["calibration"] = f"{BLOCK_SAMPLES} x {CALIB_TOKENS} random tokens, batch {CALIB_BATCH}"
    elif step == "float inference":
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        feeds = next(calibration_batches(source, size))
        start = time.perf_counter()
        sess.run(None, feeds)
        info["passes"] = {"run": round(time.perf_counter() - start, 1)}
    elif step.startswith(("calibrate", "quantize")):
        import fptq_graph as fq

        samples = CALIB_SAMPLES * (4 if "4x" in step else 1)
        config = fq.Config(calib_samples=samples, calib_seq_len=CALIB_TOKENS, calib_batch_size=CALIB_BATCH,
                           sqnr_samples=0 if "no SQNR" in step else 2, progress=False)
        if step.startswith("calibrate"):
            start = time.perf_counter()
            fq.calibrate(source, samples, config)
            info["passes"] = {"calibrate": round(time.perf_counter() - start, 1)}
        else:
            result = fq.quantize(source, CALIB_SAMPLES, config)
            out = result.save(work / f"llama-{size}.{OUTPUTS[step]}.onnx")
            info["passes"] = {p.name: round(p.seconds, 1) for p in result.passes}
            info["onnx_bytes"] = file_bytes(out)
            info["recipe"] = {"awq": bool(result.plan.recipe.awq), "weights": result.plan.recipe.weights,
                              "traded": result.plan.statistics_note or None}
            info["mode"] = {k: result.run[k] for k in ("mode", "why") if k in result.run}
    elif step == "eval":
        import numpy as np

        from fptq_graph.evaluate import perplexity
        from fptq_graph.runtime import session

        tags = [OUTPUTS[s] for s in ("quantize block by block", "quantize", "quantize, no SQNR")]
        model = next((p for p in (work / f"llama-{size}.{tag}.onnx" for tag in tags) if p.is_file()), None)
        if model is None:
            raise SystemExit(f"eval: no quantized llama-{size} in {work}: run a quantize step first")
        ids = np.random.default_rng(0).integers(0, vocab(size), EVAL_WINDOWS * EVAL_TOKENS)
        start = time.perf_counter()
        value = perplexity(session(str(model), mem_pattern=False), ids, EVAL_TOKENS)
        info["passes"] = {"perplexity": round(time.perf_counter() - start, 1)}
        info["evaluated"] = f"{model.name}: {EVAL_WINDOWS} windows of {EVAL_TOKENS} random tokens, perplexity {value:.4g}"
    elif step == "ort static":
        info["onnx_bytes"] = file_bytes(ort_static(source, work / f"llama-{size}.{OUTPUTS[step]}.onnx", size))
    elif step == "ort matmul_nbits":
        info["onnx_bytes"] = file_bytes(ort_nbits(source, work / f"llama-{size}.{OUTPUTS[step]}.onnx"))
    print("RESULT " + json.dumps(info), flush=True)


def _graph_hash(path: Path) -> str:
    """SHA-256 of the graph's nodes and initializer data (tests/fingerprints.py's), taken by the parent
    after the step: the block-by-block steps with 1 and 2 workers must agree."""
    sys.path.insert(0, str(ROOT / "tests"))
    import onnx
    from fingerprints import graph_fingerprint

    return graph_fingerprint(onnx.load(path))


def calibration_batches(model_path: Path, size: str):
    from fptq_graph.calibration import from_random
    from fptq_graph.ir.load import load_split
    inputs = load_split(model_path).proto.graph.input   # the weights stay in the file: no RSS for them
    return from_random(CALIB_SAMPLES, vocab(size), CALIB_TOKENS, CALIB_BATCH).feed_batches(inputs)


def ort_static(source: Path, out: Path, size: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calibration_batches(source, size)

        def get_next(self):
            return next(self.batches, None)

    # 4 batches; CalibMaxIntermediateOutputs must not divide the batch count (onnxruntime 1.31 then
    # raises "No data is collected"), hence 3.
    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False,
                    op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=file_bytes(source) > 2**31 - 2**24,
                    extra_options={"CalibMaxIntermediateOutputs": 3})
    return out


def ort_nbits(source: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=128, is_symmetric=True)
    quantizer.process()
    quantizer.model.model.ir_version = 10
    quantizer.model.save_model_to_file(str(out), use_external_data_format=file_bytes(source) > 2**31 - 2**24)
    return out


def file_bytes(path: Path) -> int:
    """The model file plus its external data files."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) if path.is_file() else 0


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import onnxruntime

    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


def print_table(results: dict) -> None:
    print(f"\n{results['machine']}, {results['date']}; calibration {results['calibration']}")
    print("| size | params | float weights | step | wall s | peak RSS GiB | RSS / float weights | note |")
    print("|---|---|---|---|---|---|---|---|")
    for size, row in results["rows"].items():
        weights = row["float_weight_bytes"]
        for step in STEPS:
            cell = row.get(step)
            if not cell:
                continue
            rss = cell["peak_rss_bytes"]
            note = cell.get("error", "")
            if not note and "blocks" in cell:
                recipe = cell["recipe"]
                per_block = sorted(cell["block_seconds"])[len(cell["block_seconds"]) // 2]
                note = (f"{cell['blocks']} blocks, median {per_block:.0f} s a block; "
                        f"{'AWQ + ' if recipe['awq'] else ''}{recipe['weights']} weights"
                        f"{'; traded: ' + recipe['traded'] if recipe['traded'] else ''}")
            elif not note and "passes" in cell and isinstance(cell["passes"], dict) and "calibrate" in cell["passes"]:
                note = f"calibration {cell['passes']['calibrate']} s"
            print(f"| {size} | {row['parameters'] / 1e9:.2f} B | {weights / 2**30:.2f} GiB | {step} | {cell['seconds']:.0f} | "
                  f"{rss / 2**30:.2f} | {rss / weights:.2f} | {note} |")


if __name__ == "__main__":
    sys.exit(main())
