// The library's one exported symbol: ONNX Runtime calls RegisterCustomOps when a session's options
// register this library (SessionOptions.register_custom_ops_library in Python).
#include "w4a8_cpu.h"
#ifdef FPTQ_WITH_CUDA
#include "w4a8_cuda.h"
#endif

#include <mutex>

namespace {

// ORT keeps pointers to the domain and ops for the life of every session: they live for the process.
Ort::CustomOpDomain& Domain() {
  static fptq::W4A8MatMulOp<fptq::W4A8CpuKernel> cpu_op;
  static fptq::W4A8MatMulOp<fptq::W4A8CpuKernel, 8> cpu_op8;   // W8A8MatMul
#ifdef FPTQ_WITH_CUDA
  static fptq::W4A8MatMulOp<fptq::W4A8CudaKernel> cuda_op;
  static fptq::W4A8MatMulOp<fptq::W4A8CudaKernel, 8> cuda_op8;
#endif
  static Ort::CustomOpDomain domain{"fptq"};
  static std::once_flag added;
  std::call_once(added, [] {
    domain.Add(&cpu_op);
    domain.Add(&cpu_op8);
#ifdef FPTQ_WITH_CUDA
    domain.Add(&cuda_op);
    domain.Add(&cuda_op8);
#endif
  });
  return domain;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // Version 1 of the API always exists and is enough to say why we cannot load.
    std::string message = std::string("fptq op library needs ONNX Runtime with C API version >= ") +
                          std::to_string(ORT_API_VERSION) + ", this runtime is " + api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    Ort::UnownedSessionOptions(options).Add(Domain());
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
