#pragma once

#include <memory>

#include "w4a8_cpu_kernels.h"
#include "w4a8_op.h"

namespace fptq {

// The CPU kernel. At creation it picks the instruction set (w4a8_cpu_dispatch.cc) and, when W and
// scales are constant initializers, repacks them once into that kernel's layout. Each Run quantizes
// X to int8 (rows in parallel), then computes fixed tiles of (rows, output channels) on ORT's
// intra-op thread pool; every output element is computed by one task in one fixed order, so Y does
// not depend on the thread count, nor on which instruction set ran.
class W4A8CpuKernel {
 public:
  static constexpr const char* kProvider = "CPUExecutionProvider";
  static OrtMemType InputMemoryType(size_t /*index*/) { return OrtMemTypeDefault; }
  static OrtStatusPtr CheckAttrs(const W4A8Attrs& /*attrs*/) { return nullptr; }

  explicit W4A8CpuKernel(const W4A8Attrs& attrs) : attrs_(attrs) {}
  // Picks the kernels (an error if FPTQ_CPU_ISA asks for one this CPU lacks) and prepacks.
  OrtStatusPtr Init(const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  W4A8Attrs attrs_;
  const CpuKernels* kernels_ = nullptr;
  std::unique_ptr<PackedWeights> packed_;  // null: W or scales is not a constant, pack per Run
};

}  // namespace fptq
