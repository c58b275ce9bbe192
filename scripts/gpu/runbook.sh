#!/usr/bin/env bash
# Every GPU check and benchmark of the W4A8 op in one device call (DEVELOPERS.md, "GPU checks"):
#   1. build the op library with CUDA (sm_80, sm_90) and put it into the package folder
#   2. what the compiler tells (ptxas table, SASS) and the CPU emulation of the kernels
#   3. the CUDA kernel against the CPU kernel and float64 (tests/runtime/test_w4a8_op.py)
#   4. compute-sanitizer memcheck and racecheck on scripts/gpu/sanitize_cases.py
#   5. benchmarks/op_bench.py --provider cuda: K=4096, N 4096 11008, M 1 16 128 1024 4096, each CUDA path
#   6. benchmarks/e2e_gpu.py --provider cuda --size 1b (the end-to-end decoder benchmark)
# Every log and JSON goes to $OUT; $OUT/summary.txt has one line a step (ok, FAILED rc, skipped why).
#
#   bash scripts/gpu/runbook.sh                  # on the GPU machine, after onnxruntime-gpu's install
#   bash scripts/gpu/runbook.sh --steps e2e      # some steps only: build,compiler,pytest,sanitize,bench,e2e
#   bash scripts/gpu/runbook.sh --dry-run        # here: the same steps on a copy of the work tree with the
#                                                # CPU provider and tiny sizes, no sanitizer (FPTQ_GPU_DRY_RUN=1)
#
# On the GPU machine onnxruntime-gpu is in /root/site (../shared/tools/gpu-ort-slim: two device calls, the
# second `bash .ortgpu2/install.sh && bash scripts/gpu/runbook.sh`; it writes the CUDA libraries' folders
# to /root/ldpath) and build/ort-headers and .whl are carried. A device call may run 600 s: the steps run in the order above, each under its own
# time limit, and a step that would not fit in what is left of FPTQ_GPU_BUDGET_S (default 570) is skipped
# and named in the summary, for a second call with --steps.
set -uo pipefail
DRY=${FPTQ_GPU_DRY_RUN:-0}
STEPS=build,compiler,pytest,sanitize,bench,e2e
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --steps) STEPS=$2; shift ;;
    --steps=*) STEPS=${1#--steps=} ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
START=$(date +%s)
BUDGET=${FPTQ_GPU_BUDGET_S:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SRC=$(cd "$(dirname "$0")/../.." && pwd)

if [ "$DRY" = 1 ]; then
  # A copy of the work tree (tracked and untracked, not ignored files: what the device tool sends), so
  # the library can be put into its package folder as on the device without touching this checkout.
  PY=${PYTHON:-$SRC/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  ROOT=$(mktemp -d /tmp/fptq-dry-run.XXXXXX)
  (cd "$SRC" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$ROOT"/) || exit 1
  headers=$(ls -d "$SRC"/build/ort-headers "$SRC"/build/*/ort-headers 2>/dev/null | head -1)
  [ -n "$headers" ] && mkdir -p "$ROOT/build" && ln -s "$headers" "$ROOT/build/ort-headers"
  cd "$ROOT"
  # This checkout's editable install (scikit-build-core) would import fptq_graph from here, not from the
  # copy on PYTHONPATH: its finder steps aside for the build folders named in SKBUILD_EDITABLE_SKIP.
  SKBUILD_EDITABLE_SKIP=$(ls -d "$SRC"/build/*/ 2>/dev/null | sed 's:/$::' | paste -sd:)
  export SKBUILD_EDITABLE_SKIP
  PROVIDER=cpu
  BUILD=$ROOT/build/fptq-build
  echo "dry run in $ROOT with $PY (CPU provider, tiny sizes, no sanitizer)"
else
  PY=${PYTHON:-python3}
  ROOT=$SRC
  cd "$ROOT"
  PROVIDER=cuda
  BUILD=/tmp/fptq-build
  export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
  [ -f /root/ldpath ] && export LD_LIBRARY_PATH=$(cat /root/ldpath)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if compgen -G ".whl/*.whl" >/dev/null; then   # pure-Python wheels the image lacks (onnx-graphsurgeon, ...)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/wheels.log" 2>&1 || { echo "installing .whl failed:"; tail -5 "$OUT/wheels.log"; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
: >"$OUT/summary.txt"
status=0

left() { echo $((BUDGET - ($(date +%s) - START))); }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }
# step NAME LIMIT_S LOG command...: runs the command under `timeout`, its output in $OUT/LOG (and the
# log's tail on the terminal), and records the outcome.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  wanted "$name" || return 0
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "$name: skipped, out of time (run again with --steps $name)" | tee -a "$OUT/summary.txt"
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (at most ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$log"
  if [ $rc = 0 ]; then
    echo "$name: ok ($(($(date +%s) - t0)) s, $log)" >>"$OUT/summary.txt"
  else
    [ $rc = 124 ] && rc="124, time limit"
    echo "$name: FAILED ($rc; $(($(date +%s) - t0)) s, $log)" >>"$OUT/summary.txt"
    status=1
  fi
}

{
  if [ "$DRY" = 1 ]; then echo "dry run: $(nproc) CPU cores, no GPU"; else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  nvcc --version | tail -1
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$OUT/device.txt"
if [ "$DRY" != 1 ] && ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  echo "no onnxruntime with CUDAExecutionProvider in /root/site: install it first (DEVELOPERS.md, GPU checks: ../shared/tools/gpu-ort-slim)"
  exit 1
fi

# 1. The library, as the package's install builds it (CUDA required), into the package folder.
build() {
  local inc
  inc=$(ls -d "$ROOT"/build/ort-headers/usr/include/onnxruntime "$ROOT"/build/*/ort-headers/usr/include/onnxruntime 2>/dev/null | head -1)
  [ -n "$inc" ] || { echo "no ONNX Runtime headers under build/: carry build/ort-headers (bash cmake/fetch_ort_headers.sh build/ort-headers)"; return 1; }
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPTQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" \
    -DORT_INCLUDE_DIR="$inc" && cmake --build "$BUILD" && cp "$BUILD/libfptq_ops.so" "$BUILD/fptq_ops_build.json" "$ROOT/fptq_graph/" \
    && "$PY" -c "
import os, sys, fptq_graph
from fptq_graph import runtime
print(fptq_graph.__file__, runtime.library_path(), runtime.library_info())
sys.exit(0 if str(runtime.library_path()).startswith(os.environ['ROOT']) else 'the package is not imported from ' + os.environ['ROOT'])"
}
export -f build
export ROOT BUILD PY
step build 300 build.log bash -c build

# 2. ptxas / SASS and the CPU emulation: the same answers as on a machine without a GPU (a cross-check of the toolchain).
step compiler 120 compiler.log "$PY" -m pytest -q -s -p no:cacheprovider tests/runtime/test_cuda_build.py tests/runtime/test_cuda_emulation.py

# 3. CUDA against CPU and float64 (in a dry run: the CPU kernel's tests; the CUDA test says why it skips).
step pytest 240 pytest.log "$PY" -m pytest -q -rs -p no:cacheprovider tests/runtime/test_w4a8_op.py -k "cuda or cpu_kernel"

# 4. compute-sanitizer (a dry run runs the cases on the CPU provider, without the sanitizer).
if [ "$DRY" = 1 ]; then
  step sanitize 120 sanitize-cases.log "$PY" scripts/gpu/sanitize_cases.py --provider cpu
else
  for tool in memcheck racecheck; do
    step sanitize 240 "sanitizer-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$PY" scripts/gpu/sanitize_cases.py --provider cuda
  done
fi

# 5. One linear: fp16 MatMul, MatMulNBits, W4A8MatMul static and per token.
if [ "$DRY" = 1 ]; then
  step bench 180 op_bench.log "$PY" benchmarks/op_bench.py --provider cpu --k 256 --n 128 --m 1 16 --isa generic \
    --min-seconds 0.05 --max-iters 5 --json "$OUT/op_bench-$PROVIDER.json"
else
  step bench 300 op_bench.log "$PY" benchmarks/op_bench.py --provider cuda --k 4096 --n 4096 11008 --m 1 16 128 1024 4096 \
    --json "$OUT/op_bench-$PROVIDER.json"
fi

# 6. End to end: a 1.1B LLaMA (random weights) in fp16, ort and w4a8 forms (models cached in /tmp/e2e between calls).
if [ "$DRY" = 1 ]; then
  step e2e 300 e2e.log "$PY" benchmarks/e2e_gpu.py --provider cpu --size tiny --prefill 32 --context 16 --repeats 2 \
    --out "$ROOT/out/e2e" --json "$OUT/e2e-$PROVIDER.json"
else
  step e2e 560 e2e.log "$PY" benchmarks/e2e_gpu.py --provider cuda --size 1b --out /tmp/e2e --json "$OUT/e2e_gpu.json"
fi

echo "== summary ($(($(date +%s) - START)) s)"
cat "$OUT/summary.txt"
[ "$DRY" = 1 ] && rm -rf "$ROOT"
exit $status
