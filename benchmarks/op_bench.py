"""One linear layer, four ways, timed in ONNX Runtime: float MatMul, MatMulNBits (4 bits, block 128),
the qdq W4A8 graph, and the bundled fptq::W4A8MatMul (static and per-token activations).

Median microseconds per Run with inputs and outputs bound on the device (io binding), so transfers
are not timed. On CUDA the float baseline is fp16; on CPU it is fp32 (ORT's CPU MatMul has no fp16
kernel worth comparing) and MatMulNBits is also run with accuracy_level=4 (int8 activations).

    python benchmarks/op_bench.py                       # CPU, a grid sized for a small machine
    python benchmarks/op_bench.py --provider cuda       # the issue's full grid on a GPU
    python benchmarks/op_bench.py --m 1 16 --n 4096 --json out.json

Prints a markdown table and writes JSON (default docs/op_bench-<provider>.json).
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
from fptq_graph.int4 import pack_int4, quantize_groupwise  # noqa: E402
from fptq_graph.w4a8_op import DOMAIN, OP_TYPE, pack_weight  # noqa: E402

GROUP = 128


def _model(nodes, inits, elem, K, N, opsets):
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("X", elem, ["M", K])],
                              [helper.make_tensor_value_info("Y", elem, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 10
    return model


def variants(K: int, N: int, cuda: bool, seed: int = 0) -> dict[str, onnx.ModelProto]:
    """name -> single-layer model, all over the same random INT4 weights."""
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
    for level in ([0] if cuda else [0, 4]):
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


def time_run(model: onnx.ModelProto, x: np.ndarray, cuda: bool, min_seconds: float, max_iters: int) -> float:
    """Median µs of run_with_iobinding over repeated runs (after warm-up), inputs and outputs on the device."""
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    sess = runtime.session(model, providers=providers)
    device = "cuda" if cuda else "cpu"
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output("Y", device)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    samples, start = [], time.perf_counter()
    while len(samples) < max_iters and (len(samples) < 5 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


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
                   help="default: 1 16 128 1024 4096 on cuda; 1 16 128 on cpu (larger M takes minutes per row there)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="time each case at least this long")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.provider == "cuda"
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        p.error(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider")
    ms = args.m or ([1, 16, 128, 1024, 4096] if cuda else [1, 16, 128])
    ns = args.n or [4096, 11008]
    rows = []
    for n in ns:
        models = variants(args.k, n, cuda)
        for m in ms:
            x = (np.random.default_rng(m).standard_normal((m, args.k))).astype(np.float16 if cuda else np.float32)
            row = {"M": m, "K": args.k, "N": n}
            for name, model in models.items():
                row[name] = round(time_run(model, x, cuda, args.min_seconds, args.max_iters), 1)
                print(f"  M={m} N={n} {name}: {row[name]} µs", file=sys.stderr, flush=True)
            rows.append(row)
    names = list(models)
    base = names[0]
    header = ["M", "N", "K"] + names + [f"W4A8MatMul static vs {base}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        speed = r[base] / r["W4A8MatMul static"]
        lines.append("| " + " | ".join(str(r[h]) for h in ["M", "N", "K"] + names) + f" | {speed:.2f}x |")
    meta = {"device": device_name(cuda), "provider": args.provider, "date": datetime.date.today().isoformat(),
            "onnxruntime": ort.__version__, "unit": "median microseconds per Run (io binding)", "group_size": GROUP,
            "library": runtime.library_info()}
    print(f"\n{meta['device']} · onnxruntime {meta['onnxruntime']} · {meta['date']} · median µs per Run\n")
    print("\n".join(lines))
    path = args.json or ROOT / "docs" / f"op_bench-{args.provider}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
