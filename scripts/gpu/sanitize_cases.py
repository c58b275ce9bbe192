"""A few W4A8MatMul and W8A8MatMul cases on CUDA, small enough to run under compute-sanitizer (memcheck,
racecheck): every CUDA path (decode up to 16 rows with and without its fused quantization, and the
reference: gemv below 16 rows, tensor cores above; FPTQ_CUDA_KERNEL forces it), a partial last group,
odd N, fp16, static and per-token, int8 weights per output channel. Exits 1 if any output differs from
the float64 reference by more than 1e-3 relative.

    compute-sanitizer --tool memcheck python3 scripts/gpu/sanitize_cases.py [--provider cuda]
    python3 scripts/gpu/sanitize_cases.py --provider cpu     # the same cases on the CPU (runbook's dry run)"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path[:0] = [str(TESTS / "runtime"), str(TESTS)]   # the op tests (tests/runtime/) and the shared helpers
from test_w4a8_op import op_model, rel_err  # noqa: E402
from test_w8a8_op import op_model as int8_model  # noqa: E402

from fptq_graph import runtime  # noqa: E402
from fptq_graph.runtime.w4a8_op import reference, reference_int8  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[parser.parse_args().provider]
worst = 0.0
CASES = [(1, 200, 33, 64, False, np.float32, 4), (3, 256, 65, 128, True, np.float16, 4),
         (7, 256, 65, 128, True, np.float16, 4), (16, 200, 33, 64, True, np.float32, 4),
         (100, 300, 77, 128, False, np.float16, 4), (1, 576, 77, 576, False, np.float16, 8),
         (5, 192, 40, 96, True, np.float32, 8), (40, 192, 40, 192, False, np.float32, 8)]
for path in ("auto", "reference"):
    os.environ["FPTQ_CUDA_KERNEL"] = "" if path == "auto" else path   # read at session creation
    for M, K, N, group, static, dtype, bits in CASES:
        if bits == 8:
            model, w = int8_model(K, N, group, static=static, dtype=dtype, seed=M)
            ref = reference_int8
        else:
            model, w = op_model(K, N, group, static=static, bias=True, rank=2, dtype=dtype)
            ref = reference
        x = np.random.default_rng(M).standard_normal((M, K)).astype(dtype)
        sess = runtime.session(model, providers=[provider])
        sess.disable_fallback()
        err = rel_err(sess.run(None, {"X": x})[0], ref(x, w["W"], w["S"], w.get("A"), w["B"], K, N, group))
        print(f"{provider} {path} bits={bits} M={M} K={K} N={N} g={group} static={static} {np.dtype(dtype).name}: "
              f"rel err {err:.2e}")
        worst = max(worst, err)
sys.exit(0 if worst <= 1e-3 else 1)
