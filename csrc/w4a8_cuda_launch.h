// The CUDA side of fptq::W4A8MatMul as plain C++ (no ONNX Runtime types): w4a8_cuda_op.cc checks
// the inputs and calls this; w4a8_cuda.cu implements it.
#pragma once

#include <cstdint>

#include "w4a8_layout.h"

namespace fptq {

// Runs Y = W4A8MatMul(X) on `stream` (a cudaStream_t). All pointers are device pointers.
// static_scale > 0: per-tensor activation scale; otherwise per-token dynamic. bias may be null.
// x_half: X and Y are float16, else float32. Returns null, or CUDA's error text.
const char* LaunchW4A8(const W4A8Dims& dims, const void* x, bool x_half, const uint8_t* weight,
                       const float* scales, float static_scale, const float* bias, void* y, void* stream);

}  // namespace fptq
