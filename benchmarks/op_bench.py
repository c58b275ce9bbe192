"""One linear layer, timed in ONNX Runtime: float MatMul, MatMulNBits (4 bits, block = our group), the
qdq W4A8 graph, and the bundled fptq::W4A8MatMul (static and per-token activations).

Median microseconds per Run with inputs and outputs bound on the device (io binding), so transfers
are not timed; all variants of a case are timed in alternating rounds (time_rounds), so that on a
shared machine they see the same background load. On CUDA the float baseline is fp16; on CPU it is fp32 (ORT's CPU MatMul has no fp16
kernel worth comparing) and MatMulNBits runs with accuracy_level=4 (int8 activations, its fastest
CPU path). W4A8MatMul is timed once per CPU kernel this machine runs (FPTQ_CPU_ISA set for each
session; --isa picks some), on CUDA once per CUDA path (FPTQ_CUDA_KERNEL: decode, reference), with its speed-up over MatMulNBits acc 4 (= acc 4 time / ours)
and the int8 multiply-accumulates per second it achieves (M·N·K / time).

    python benchmarks/op_bench.py                       # CPU: K 4096, N 4096 11008, M 1 4 16 128 512
    python benchmarks/op_bench.py --provider cuda       # the issue's full grid on a GPU
    python benchmarks/op_bench.py --m 1 16 --n 4096 --isa avx512vnni --threads 2
    python benchmarks/op_bench.py --json docs/op_bench-cpu.json   # what docs/benchmarks.md records

Prints a markdown table; writes JSON only where --json says.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fptq_graph import runtime  # noqa: E402
from fptq_graph.quant.int4 import pack_int4, quantize_groupwise  # noqa: E402
from fptq_graph.runtime.w4a8_op import DOMAIN, OP_TYPE, pack_weight  # noqa: E402

GROUP = 128


def _model(nodes, inits, elem, K, N, opsets):
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("X", elem, ["M", K])],
                              [helper.make_tensor_value_info("Y", elem, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 10
    return model


def variants(K: int, N: int, cuda: bool, seed: int = 0, extra: bool = False) -> dict[str, onnx.ModelProto]:
    """name -> single-layer model, all over the same random INT4 weights. On CPU MatMulNBits acc 0
    and the qdq graph (seconds a Run at large M) only with extra=True."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    qw = quantize_groupwise(w, GROUP)
    act = np.float16 if cuda else np.float32
    elem = TensorProto.FLOAT16 if cuda else TensorProto.FLOAT
    onnx_ops = [("", 21)]
    out = {}
    float_name = "fp16 MatMul" if cuda else "fp32 MatMul"
    out[float_name] = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                             [numpy_helper.from_array(qw.dequantize().astype(act), "W")], elem, K, N, onnx_ops)
    # MatMulNBits: uint4 with the default zero point 8, B [N, K/128, 64], scales [N, K/128] in A's type.
    blocks = K // GROUP
    packed_nbits = np.frombuffer(pack_int4((qw.q.T + 8).astype(np.uint8)), np.uint8).reshape(N, blocks, GROUP // 2)
    for level in ([0] if cuda else [0, 4] if extra else [4]):
        node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=GROUP, accuracy_level=level)
        name = "MatMulNBits" + ("" if cuda else f" (acc {level})")
        out[name] = _model([node], [numpy_helper.from_array(packed_nbits, "B"),
                                    numpy_helper.from_array(np.ascontiguousarray(qw.scale.T).astype(act), "S")],
                           elem, K, N, onnx_ops + [("com.microsoft", 1)])
    # qdq W4A8: static int8 activations, INT4 blocked DequantizeLinear weights, float MatMul.
    a_scale = numpy_helper.from_array(np.array(0.03, act), "a_scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "a_zero")
    w4 = helper.make_tensor("W4", TensorProto.INT4, [K, N], pack_int4(qw.q), raw=True)
    nodes = [helper.make_node("QuantizeLinear", ["X", "a_scale", "a_zero"], ["Xq"]),
             helper.make_node("DequantizeLinear", ["Xq", "a_scale", "a_zero"], ["Xd"]),
             helper.make_node("DequantizeLinear", ["W4", "W_scale"], ["Wd"], axis=0, block_size=GROUP),
             helper.make_node("MatMul", ["Xd", "Wd"], ["Y"])]
    if cuda or extra:
        out["qdq W4A8"] = _model(nodes, [a_scale, zero, w4, numpy_helper.from_array(qw.scale.astype(act), "W_scale")],
                                 elem, K, N, onnx_ops)
    for label, static in (("W4A8MatMul static", True), ("W4A8MatMul dynamic", False)):
        inits = [numpy_helper.from_array(pack_weight(qw.q, GROUP), "Wp"),
                 numpy_helper.from_array(np.ascontiguousarray(qw.scale.T), "Ws")]
        inputs = ["X", "Wp", "Ws"]
        if static:
            inits.append(numpy_helper.from_array(np.array(0.03, np.float32), "A"))
            inputs.append("A")
        node = helper.make_node(OP_TYPE, inputs, ["Y"], domain=DOMAIN, K=K, N=N, group_size=GROUP)
        out[label] = _model([node], inits, elem, K, N, onnx_ops + [(DOMAIN, 1)])
    return out


def bound_session(model: onnx.ModelProto, x: np.ndarray, cuda: bool, threads: int | None = None,
                  isa: str | None = None):
    """(session, io binding) with X and Y bound on the device. isa: the W4A8MatMul CPU kernel
    (FPTQ_CPU_ISA), or on CUDA its path (FPTQ_CUDA_KERNEL), read when the session creates the kernel."""
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    variable = runtime.sessions.CUDA_KERNEL_ENV if cuda else runtime.CPU_ISA_ENV
    saved = os.environ.get(variable)
    if isa:
        os.environ[variable] = isa
    try:
        sess = runtime.session(model, providers=providers, threads=threads)
    finally:
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved
    device = "cuda" if cuda else "cpu"
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output("Y", device)
    return sess, binding


def time_rounds(runs: dict, min_seconds: float, max_iters: int, burst: int = 3) -> dict[str, float]:
    """Median µs per Run of each (session, binding) in `runs`, timed in rounds: each round runs every
    variant once untimed (its weights back in cache) then `burst` times timed, so all variants see
    the same background load (the machine is shared) and each is timed warm. A round's sample is
    its burst's median; the result is the median over rounds (at least 3, until each variant has
    run min_seconds, at most max_iters timed runs each)."""
    samples = {name: [] for name in runs}
    spent = {name: 0.0 for name in runs}
    while True:
        for name, (sess, binding) in runs.items():
            sess.run_with_iobinding(binding)
            burst_times = []
            for _ in range(burst):
                t0 = time.perf_counter()
                sess.run_with_iobinding(binding)
                binding.synchronize_outputs()
                burst_times.append(time.perf_counter() - t0)
            spent[name] += sum(burst_times)
            samples[name].append(statistics.median(burst_times) * 1e6)
        rounds = len(next(iter(samples.values())))
        if rounds >= 3 and (min(spent.values()) >= min_seconds or rounds * burst >= max_iters):
            return {name: statistics.median(v) for name, v in samples.items()}


def device_name(cuda: bool) -> str:
    if cuda:
        try:
            import subprocess
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, check=True).stdout.strip().splitlines()[0]
        except Exception:
            return "CUDA GPU"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, nargs="+", default=None, help="default 4096 11008")
    p.add_argument("--m", type=int, nargs="+", default=None,
                   help="default: 1 16 128 1024 4096 on cuda; 1 4 16 128 512 on cpu")
    p.add_argument("--isa", nargs="+", default=None,
                   help="kernels of W4A8MatMul to time: CPU ones (default: every one this CPU runs, library_info()['cpu_isas']), "
                        "on CUDA its paths (default: library_info()['cuda_kernels'], FPTQ_CUDA_KERNEL per session)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's, one a core)")
    p.add_argument("--extra", action="store_true", help="on CPU also MatMulNBits acc 0 and the qdq W4A8 graph")
    p.add_argument("--min-seconds", type=float, default=0.5, help="time each variant at least this long a case")
    p.add_argument("--max-iters", type=int, default=200, help="at most this many timed runs of a variant a case")
    p.add_argument("--json", type=Path, default=None, help="write the results here (nothing is written without it)")
    args = p.parse_args(argv)
    cuda = args.provider == "cuda"
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        p.error(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider")
    info = runtime.library_info()
    kernels = info["cuda_kernels"] if cuda else info["cpu_isas"]
    isas = args.isa or kernels
    unknown = [i for i in isas if i not in kernels]
    if unknown:
        p.error(f"--isa {' '.join(unknown)}: this {'GPU' if cuda else 'CPU'} and library run {', '.join(kernels)}")
    ms = args.m or ([1, 16, 128, 1024, 4096] if cuda else [1, 4, 16, 128, 512])
    ns = args.n or [4096, 11008]
    ours = ("W4A8MatMul static", "W4A8MatMul dynamic")
    rows = []
    for n in ns:
        models = variants(args.k, n, cuda, extra=args.extra)
        for m in ms:
            x = (np.random.default_rng(m).standard_normal((m, args.k))).astype(np.float16 if cuda else np.float32)
            runs = {(name, None): bound_session(model, x, cuda, args.threads)
                    for name, model in models.items() if name not in ours}
            runs.update({(name, isa): bound_session(models[name], x, cuda, args.threads, isa)
                         for isa in isas for name in ours})
            times = time_rounds(runs, args.min_seconds, args.max_iters)
            del runs
            for (name, isa), t in times.items():
                print(f"  M={m} N={n} {name}{f' [{isa}]' if isa else ''}: {t:.1f} µs", file=sys.stderr, flush=True)
            base = {"M": m, "K": args.k, "N": n}
            base.update({name: round(t, 1) for (name, isa), t in times.items() if name not in ours})
            for isa in isas:
                rows.append({**base, "isa": isa, **{name: round(times[name, isa], 1) for name in ours}})
    names = [n for n in models if n not in ours]
    ref = names[0] if cuda else "MatMulNBits (acc 4)"
    short = {"MatMulNBits (acc 4)": "acc 4", "W4A8MatMul static": "static", "W4A8MatMul dynamic": "dynamic"}
    header = ["M", "N", "kernel"] + names + list(ours) + [f"static / {short.get(ref, ref)}",
                                                            f"dynamic / {short.get(ref, ref)}", "G MAC/s static"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        # speed-up: the reference's time over ours (> 1: ours is faster); int8 MACs a second
        r["static speedup"] = round(r[ref] / r["W4A8MatMul static"], 3)
        r["dynamic speedup"] = round(r[ref] / r["W4A8MatMul dynamic"], 3)
        r["G MAC/s static"] = round(r["M"] * r["N"] * r["K"] / r["W4A8MatMul static"] / 1e3, 1)
        cells = [r["M"], r["N"], r["isa"]] + [r[h] for h in names + list(ours)]
        cells += [f"{r['static speedup']:.2f}x", f"{r['dynamic speedup']:.2f}x", f"{r['G MAC/s static']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    meta = {"device": device_name(cuda), "provider": args.provider, "date": datetime.date.today().isoformat(),
            "onnxruntime": ort.__version__, "unit": "median microseconds per Run (io binding)", "group_size": GROUP,
            "threads": args.threads or "onnxruntime default", "speedup": f"{ref} time / W4A8MatMul time",
            "library": info}
    print(f"\n{meta['device']} · onnxruntime {meta['onnxruntime']} · {meta['date']} · threads {meta['threads']} · "
          f"median µs per Run\n")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
