#pragma once

#include "w4a8_cuda_launch.h"
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
    if (attrs.group % 32) {
      return Error(attrs, "the CUDA kernel needs group_size to be a multiple of 32, got " + std::to_string(attrs.group));
    }
    return nullptr;
  }

  explicit W4A8CudaKernel(const W4A8Attrs& attrs) : attrs_(attrs) {}
  // The device's compute capability, and the path FPTQ_CUDA_KERNEL forces (an error if it names none,
  // or one this GPU cannot run).
  OrtStatusPtr Init(const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  W4A8Attrs attrs_;
  int sm_ = 0;
  const CudaPath* forced_ = nullptr;   // null: each Run takes the first path that fits it
};

}  // namespace fptq
