// fptq::W4A8MatMul and fptq::W8A8MatMul as ONNX Runtime custom ops: one op class, instantiated per
// weight width and per execution provider with that provider's kernel (CPU always, CUDA when the
// library was built with nvcc).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <string>

#include "w4a8_layout.h"

namespace fptq {

// The node's attributes, read and checked once when ORT creates the kernel.
struct W4A8Attrs {
  const char* op = "W4A8MatMul";  // the op's name, for error messages
  std::string node;               // node name, for error messages
  int bits = 4;                   // weight width: 4 (W4A8MatMul) or 8 (W8A8MatMul)
  int64_t K = 0, N = 0, group = 0;
};

// The op's name for a weight width.
constexpr const char* OpName(int bits) { return bits == 8 ? "W8A8MatMul" : "W4A8MatMul"; }

// Every error goes back to ORT as a status naming the op and node (never an exception across the C ABI).
OrtStatusPtr Error(const char* op, const std::string& node, const std::string& message);
inline OrtStatusPtr Error(const W4A8Attrs& attrs, const std::string& message) {
  return Error(attrs.op, attrs.node, message);
}

std::string TypeName(ONNXTensorElementDataType type);

OrtStatusPtr ReadAttrs(const OrtKernelInfo* info, W4A8Attrs& attrs);

// One Run's inputs, checked, and its output, allocated: what a kernel computes from.
struct W4A8Run {
  W4A8Dims dims;
  bool x_half = false;            // X and Y are float16 (else float32)
  const void* x = nullptr;
  const void* weight = nullptr;   // uint8 packed int4 (bits 4) or int8 (bits 8), [N, Kp * bits / 8]
  const float* scales = nullptr;
  float static_scale = 0.f;       // > 0: per-tensor; 0: per-token dynamic (act_scale absent)
  const float* bias = nullptr;    // may be null
  void* y = nullptr;
};

// Checks the inputs against the attributes (shapes, element types, optional inputs, a positive
// finite act_scale, which both kernels ask for in host memory) and allocates Y [..., N].
OrtStatusPtr ReadRun(const W4A8Attrs& attrs, Ort::KernelContext& ctx, W4A8Run& run);

// The frame both kernels' ComputeV2 share: read and check the Run, skip empty inputs, compute, and
// turn any exception into a status (nothing may be thrown across ORT's C ABI).
template <typename Compute>
OrtStatusPtr ComputeChecked(const W4A8Attrs& attrs, OrtKernelContext* context, Compute&& compute) {
  try {
    Ort::KernelContext ctx(context);
    W4A8Run run;
    if (OrtStatusPtr status = ReadRun(attrs, ctx, run)) return status;
    if (run.dims.M == 0) return nullptr;
    return compute(ctx, run);
  } catch (const std::exception& e) {
    return Error(attrs, e.what());
  }
}

// Bits: the weights' width, 4 (fptq::W4A8MatMul: packed uint8) or 8 (fptq::W8A8MatMul: int8).
template <typename Kernel, int Bits = 4>
struct W4A8MatMulOp : Ort::CustomOpBase<W4A8MatMulOp<Kernel, Bits>, Kernel, /*WithStatus=*/true> {
  static_assert(Bits == 4 || Bits == 8, "weights are 4 or 8 bits wide");
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    W4A8Attrs attrs;
    attrs.op = OpName(Bits);
    attrs.bits = Bits;
    if (OrtStatusPtr status = ReadAttrs(info, attrs)) return status;
    if (OrtStatusPtr status = Kernel::CheckAttrs(attrs)) return status;
    try {
      auto created = std::make_unique<Kernel>(attrs);
      if (OrtStatusPtr status = created->Init(info)) return status;
      *kernel = created.release();
      return nullptr;
    } catch (const std::exception& e) {
      return Error(attrs, e.what());
    }
  }

  const char* GetName() const { return OpName(Bits); }
  const char* GetExecutionProviderType() const { return Kernel::kProvider; }

  // X's type is left open (float or float16, dispatched at Run); the output takes X's type.
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      case 1: return Bits == 8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
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

  // Y's type and shape for ORT's graph checks and buffer planning: X's type, [..., K] -> [..., N].
  // Set here, not through CustomOpBase's InferOutputShape hook: that hook's SetOutputShape declares
  // the output float32 unless given a type, and the hook cannot read X's type. fp16 models whose Y was
  // declared float16 then failed to load where that float32 won (X of unknown rank, as a block model's
  // cut inputs are declared, or fully fixed shapes; symbolic ones passed): "Type (tensor(float16)) of
  // output arg ... does not match expected type (tensor(float))".
  W4A8MatMulOp() { this->OrtCustomOp::InferOutputShapeFn = &InferOutputTypeShape; }

  static OrtStatusPtr InferOutputTypeShape(const OrtCustomOp* /*op*/, OrtShapeInferContext* context) {
    try {
      const OrtApi& api = Ort::GetApi();
      OrtTensorTypeAndShapeInfo* x_info = nullptr;   // owned by the context
      if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(context, 0, &x_info)) return status;
      ONNXTensorElementDataType x_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      if (OrtStatusPtr status = api.GetTensorElementType(x_info, &x_type)) return status;
      Ort::ShapeInferContext ctx(&api, context);
      Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
      // Rank 0 is X's shape unknown (a MatMul input has rank >= 1): say nothing rather than declare Y a
      // scalar; ORT then gives Y the type of the op's one open input, X's.
      if (shape.empty()) return nullptr;
      shape.back() = Ort::ShapeInferContext::SymbolicInteger(ctx.GetAttrInt("N"));
      const bool half = x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      return ctx.SetOutputShape(0, shape, half ? x_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT).release();
    } catch (const std::exception& e) {
      return Error(OpName(Bits), "", e.what());
    }
  }
};

}  // namespace fptq
