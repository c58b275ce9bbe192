#!/usr/bin/env bash
# Every GPU check and benchmark of the W4A8 op in one device call (DEVELOPERS.md, "GPU checks").
# Runs on the GPU machine in the repository root, after onnxruntime-gpu was installed into
# /root/site (../shared/tools/gpu-ort-parts) and with build/ort-headers and .whl carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/root/site
if compgen -G ".whl/*.whl" >/dev/null; then   # onnx-graphsurgeon: the image lacks it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$OUT/device.txt"

# Build the library as the package's install does, with the carried headers, into the package folder.
cmake -S . -B /tmp/fptq-build -G Ninja -DFPTQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" \
  -DORT_INCLUDE_DIR="$PWD/build/ort-headers/usr/include/onnxruntime" >"$OUT/build.log" 2>&1 \
  && cmake --build /tmp/fptq-build >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
cp /tmp/fptq-build/libfptq_ops.so /tmp/fptq-build/fptq_ops_build.json fptq_graph/

status=0
echo "== pytest tests/test_w4a8_op.py (CUDA against CPU and float64)"
python3 -m pytest -q -p no:cacheprovider tests/test_w4a8_op.py -k "cuda or cpu_kernel" 2>&1 | tee "$OUT/pytest.log" | tail -15 || status=1
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 3 python3 scripts/gpu/sanitize_cases.py 2>&1 \
    | tee "$OUT/sanitizer-$tool.log" | tail -8 || status=1
done
echo "== benchmarks/op_bench.py --provider cuda"
python3 benchmarks/op_bench.py --provider cuda --json "$OUT/op_bench-cuda.json" 2>"$OUT/op_bench.err" | tee "$OUT/op_bench.md" || status=1
exit $status
