// fptq::W4A8MatMul as an ONNX Runtime custom op: one op class, instantiated once per execution
// provider with that provider's kernel (CPU always, CUDA when the library was built with nvcc).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>

#include "w4a8_layout.h"

namespace fptq {

// The node's attributes, read and checked once when ORT creates the kernel.
struct W4A8Attrs {
  std::string node;  // node name, for error messages
  int64_t K = 0, N = 0, group = 0;
};

// Every error goes back to ORT as a status naming the op and node (never an exception across the C ABI).
OrtStatusPtr Error(const std::string& node, const std::string& message);

std::string TypeName(ONNXTensorElementDataType type);

OrtStatusPtr ReadAttrs(const OrtKernelInfo* info, W4A8Attrs& attrs);

// Checks one Run's inputs against the attributes (shapes, element types, optional inputs) and
// derives the problem size. `x_type` is X's element type (float or float16).
OrtStatusPtr CheckInputs(const W4A8Attrs& attrs, const Ort::KernelContext& ctx, W4A8Dims& dims,
                         ONNXTensorElementDataType& x_type);

// The output [..., N]: X's shape with its last dimension replaced by N.
Ort::UnownedValue AllocateOutput(const W4A8Attrs& attrs, Ort::KernelContext& ctx);

template <typename Kernel>
struct W4A8MatMulOp : Ort::CustomOpBase<W4A8MatMulOp<Kernel>, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    W4A8Attrs attrs;
    if (OrtStatusPtr status = ReadAttrs(info, attrs)) return status;
    if (OrtStatusPtr status = Kernel::CheckAttrs(attrs)) return status;
    *kernel = new Kernel(attrs);
    return nullptr;
  }

  const char* GetName() const { return "W4A8MatMul"; }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }

  // X's type is left open (float or float16, dispatched at Run); the output takes X's type.
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 3 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t index) const { return Kernel::InputMemoryType(index); }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }

  // Lets ORT plan the output buffer: [..., K] -> [..., N].
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    try {
      Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
      if (!shape.empty()) shape.back() = Ort::ShapeInferContext::SymbolicInteger(ctx.GetAttrInt("N"));
      ctx.SetOutputShape(0, shape);
      return nullptr;
    } catch (const std::exception& e) {
      return Error("", e.what());
    }
  }
};

}  // namespace fptq
