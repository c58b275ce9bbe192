#!/usr/bin/env bash
# Issue 6's end-to-end benchmark in one device call: a 1.1B LLaMA (random weights) in fp16, ort and
# w4a8 forms, prefill and decode latency and weight memory on the GPU (benchmarks/e2e_gpu.py).
# Run after scripts/gpu/checks.sh in the same warm machine (it builds the op library with CUDA), with
# .whl carrying the pure-Python wheels the image lacks (DEVELOPERS.md, "GPU checks").
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/root/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
[ -f fptq_graph/libfptq_ops.so ] || { echo "build the op library first (scripts/gpu/checks.sh)"; exit 1; }
python3 benchmarks/e2e_gpu.py --provider cuda --size 1b --out /tmp/e2e --json "$OUT/e2e_gpu.json" 2>"$OUT/e2e.err" \
  | tee "$OUT/e2e_gpu.md"
status=${PIPESTATUS[0]}
tail -20 "$OUT/e2e.err"
exit "$status"
