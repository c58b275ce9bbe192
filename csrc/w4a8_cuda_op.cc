#include "w4a8_cuda.h"

#include <cmath>

#include "w4a8_cuda_launch.h"

namespace fptq {

OrtStatusPtr W4A8CudaKernel::ComputeV2(OrtKernelContext* context) {
  try {
    Ort::KernelContext ctx(context);
    W4A8Dims dims;
    ONNXTensorElementDataType x_type;
    if (OrtStatusPtr status = CheckInputs(attrs_, ctx, dims, x_type)) return status;
    float static_scale = 0.f;  // 0: per-token dynamic
    if (ctx.GetInputCount() > 3 && ctx.GetInput(3)) {
      static_scale = *ctx.GetInput(3).GetTensorData<float>();  // host memory (InputMemoryType)
      if (!(std::isfinite(static_scale) && static_scale > 0.f)) {
        return Error(attrs_.node, "act_scale must be a positive finite number, got " + std::to_string(static_scale));
      }
    }
    const float* bias = nullptr;
    if (ctx.GetInputCount() > 4 && ctx.GetInput(4)) bias = ctx.GetInput(4).GetTensorData<float>();
    Ort::UnownedValue y = AllocateOutput(attrs_, ctx);
    if (dims.M == 0) return nullptr;
    const char* error = LaunchW4A8(dims, ctx.GetInput(0).GetTensorRawData(), x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                   ctx.GetInput(1).GetTensorData<uint8_t>(), ctx.GetInput(2).GetTensorData<float>(),
                                   static_scale, bias, y.GetTensorMutableRawData(), ctx.GetGPUComputeStream());
    if (error) return Error(attrs_.node, std::string("CUDA error: ") + error);
    return nullptr;
  } catch (const std::exception& e) {
    return Error(attrs_.node, e.what());
  }
}

}  // namespace fptq
