// The CUDA side of fptq::W4A8MatMul and fptq::W8A8MatMul as plain C++ (no ONNX Runtime types):
// w4a8_cuda_op.cc checks the inputs and calls this; w4a8_cuda.cu implements it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "w4a8_layout.h"

namespace fptq {

// The CUDA kernel paths, best first: a Run takes the first whose architecture and row count fit
// (w4a8_cuda.cu describes each). FPTQ_CUDA_KERNEL=<name> forces one (read when ONNX Runtime creates the
// kernel); rows it does not take go to the reference, which takes any.
struct CudaPath {
  const char* name;   // FPTQ_CUDA_KERNEL's value
  int min_sm;         // the lowest compute capability it runs on, major * 10 + minor
  int64_t max_rows;   // the most rows (M) it takes; 0: any
};
constexpr int kPathDecode = 0, kPathReference = 1;
inline constexpr CudaPath kCudaPaths[] = {
    {"decode", 80, 16},
    {"reference", 80, 0},
};
constexpr int kCudaPathCount = sizeof(kCudaPaths) / sizeof(kCudaPaths[0]);

// The current device's compute capability (major * 10 + minor) in *sm; null, or CUDA's error text.
const char* CudaDeviceSm(int* sm);

// The path (an index into kCudaPaths) a Run of `dims` takes on `sm`; forced: one of kCudaPaths, or null.
inline int CudaPathFor(const CudaPath* forced, int sm, const W4A8Dims& dims) {
  for (int i = 0; i < kCudaPathCount; ++i) {
    const CudaPath& p = kCudaPaths[i];
    if (forced && forced != &p) continue;
    if (sm >= p.min_sm && (p.max_rows == 0 || dims.M <= p.max_rows)) return i;
  }
  return kPathReference;   // a forced path that cannot take these rows: the reference, which takes any
}

// Bytes of device workspace one Run needs (int8 X and the row scales); at least 16-byte aligned.
size_t W4A8WorkspaceBytes(const W4A8Dims& dims);

// Runs Y = W4A8MatMul(X) (dims.bits 8: W8A8MatMul) on `stream` (a cudaStream_t) by path `path`. All
// pointers are device pointers. static_scale > 0: per-tensor activation scale; otherwise per-token
// dynamic. bias may be null. x_half: X and Y are float16, else float32. workspace:
// W4A8WorkspaceBytes(dims) bytes, used by the work queued on `stream` only (it may be handed to later
// work on the same stream once this returns). Returns null, or CUDA's error text.
const char* LaunchW4A8(const W4A8Dims& dims, const void* x, bool x_half, const uint8_t* weight,
                       const float* scales, float static_scale, const float* bias, void* y, void* workspace,
                       void* stream, int path);

}  // namespace fptq
