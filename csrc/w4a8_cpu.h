#pragma once

#include "w4a8_op.h"

namespace fptq {

// The CPU kernel: quantize X to int8 once per Run, then int8 x int4 dot products per group over
// tiles of (rows of X, output channels), spread over ORT's intra-op thread pool.
class W4A8CpuKernel {
 public:
  static constexpr const char* kProvider = "CPUExecutionProvider";
  static OrtMemType InputMemoryType(size_t /*index*/) { return OrtMemTypeDefault; }
  static OrtStatusPtr CheckAttrs(const W4A8Attrs& /*attrs*/) { return nullptr; }

  explicit W4A8CpuKernel(const W4A8Attrs& attrs) : attrs_(attrs) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  W4A8Attrs attrs_;
};

}  // namespace fptq
