#pragma once

#include "w4a8_op.h"

namespace fptq {

// The CUDA kernel: runs on ORT's compute stream. act_scale (input 3) is asked for in host memory:
// it is one float, and the kernels take it by value.
class W4A8CudaKernel {
 public:
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  static OrtMemType InputMemoryType(size_t index) { return index == 3 ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
  // The tensor-core path steps through K 32 values at a time and must not straddle a group.
  static OrtStatusPtr CheckAttrs(const W4A8Attrs& attrs) {
    if (attrs.bits != 4) return Error(attrs, "has no CUDA kernel (int4 weights only)");
    if (attrs.group % 32) {
      return Error(attrs, "the CUDA kernel needs group_size to be a multiple of 32, got " + std::to_string(attrs.group));
    }
    return nullptr;
  }

  explicit W4A8CudaKernel(const W4A8Attrs& attrs) : attrs_(attrs) {}
  OrtStatusPtr Init(const OrtKernelInfo* /*info*/) { return nullptr; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  W4A8Attrs attrs_;
};

}  // namespace fptq
