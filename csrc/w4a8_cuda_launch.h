// The CUDA side of fptq::W4A8MatMul as plain C++ (no ONNX Runtime types): w4a8_cuda_op.cc checks
// the inputs and calls this; w4a8_cuda.cu implements it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "w4a8_layout.h"

namespace fptq {

// Bytes of device workspace one Run needs (int8 X and the row scales); at least 16-byte aligned.
size_t W4A8WorkspaceBytes(const W4A8Dims& dims);

// Runs Y = W4A8MatMul(X) on `stream` (a cudaStream_t). All pointers are device pointers.
// static_scale > 0: per-tensor activation scale; otherwise per-token dynamic. bias may be null.
// x_half: X and Y are float16, else float32. workspace: W4A8WorkspaceBytes(dims) bytes, used by the
// work queued on `stream` only (it may be handed to later work on the same stream once this returns).
// Returns null, or CUDA's error text.
const char* LaunchW4A8(const W4A8Dims& dims, const void* x, bool x_half, const uint8_t* weight,
                       const float* scales, float static_scale, const float* bias, void* y, void* workspace,
                       void* stream);

}  // namespace fptq
