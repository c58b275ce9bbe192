#include "w4a8_cuda.h"

#include "w4a8_cuda_launch.h"

namespace fptq {

OrtStatusPtr W4A8CudaKernel::ComputeV2(OrtKernelContext* context) {
  return ComputeChecked(attrs_, context, [this](Ort::KernelContext& ctx, const W4A8Run& run) -> OrtStatusPtr {
    const char* error = LaunchW4A8(run.dims, run.x, run.x_half, run.weight, run.scales, run.static_scale, run.bias,
                                   run.y, ctx.GetGPUComputeStream());
    return error ? Error(attrs_.node, std::string("CUDA error: ") + error) : nullptr;
  });
}

}  // namespace fptq
