"""A few W4A8MatMul cases on CUDA, small enough to run under compute-sanitizer (memcheck, racecheck):
both paths (gemv for M < 16, tensor cores above), a partial last group, odd N, fp16, static and
per-token. Exits 1 if any output differs from the float64 reference by more than 1e-3 relative.

    compute-sanitizer --tool memcheck python3 scripts/gpu/sanitize_cases.py [--provider cuda]
    python3 scripts/gpu/sanitize_cases.py --provider cpu     # the same cases on the CPU (runbook's dry run)"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_w4a8_op import op_model, rel_err  # noqa: E402

from fptq_graph import runtime  # noqa: E402
from fptq_graph.runtime.w4a8_op import reference  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[parser.parse_args().provider]
worst = 0.0
for M, K, N, group, static, dtype in [(1, 200, 33, 64, False, np.float32), (7, 256, 65, 128, True, np.float16),
                                      (16, 200, 33, 64, True, np.float32), (100, 300, 77, 128, False, np.float16)]:
    model, w = op_model(K, N, group, static=static, bias=True, rank=2, dtype=dtype)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(dtype)
    sess = runtime.session(model, providers=[provider])
    sess.disable_fallback()
    err = rel_err(sess.run(None, {"X": x})[0], reference(x, w["W"], w["S"], w.get("A"), w["B"], K, N, group))
    print(f"{provider} M={M} K={K} N={N} g={group} static={static} {np.dtype(dtype).name}: rel err {err:.2e}")
    worst = max(worst, err)
sys.exit(0 if worst <= 1e-3 else 1)
