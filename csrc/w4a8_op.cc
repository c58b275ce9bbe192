#include "w4a8_op.h"

#include <cmath>
#include <sstream>
#include <vector>

namespace fptq {

OrtStatusPtr Error(const char* op, const std::string& node, const std::string& message) {
  std::string text = std::string("fptq::") + op;
  if (!node.empty()) text += " '" + node + "'";
  text += ": " + message;
  return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, text.c_str());
}

OrtStatusPtr ReadAttrs(const OrtKernelInfo* info, W4A8Attrs& attrs) {
  Ort::ConstKernelInfo kernel_info(info);
  try {
    attrs.node = kernel_info.GetNodeName();
  } catch (const std::exception&) {
    attrs.node.clear();
  }
  for (auto [name, field] : {std::pair<const char*, int64_t*>{"K", &attrs.K}, {"N", &attrs.N}, {"group_size", &attrs.group}}) {
    try {
      *field = kernel_info.GetAttribute<int64_t>(name);
    } catch (const std::exception&) {
      return Error(attrs, std::string("missing integer attribute '") + name + "'");
    }
  }
  if (attrs.K < 1 || attrs.N < 1) {
    return Error(attrs, "attributes K and N must be >= 1, got K=" + std::to_string(attrs.K) + " N=" + std::to_string(attrs.N));
  }
  if (attrs.bits == 4 && (attrs.group < 2 || attrs.group % 2)) {
    return Error(attrs, "group_size must be an even number >= 2, got " + std::to_string(attrs.group));
  }
  if (attrs.bits == 8 && (attrs.group < 1 || attrs.group > kMaxInt8Group)) {
    return Error(attrs, "group_size must be in [1, " + std::to_string(kMaxInt8Group) +
                            "] (larger int8 group sums could overflow int32), got " + std::to_string(attrs.group));
  }
  return nullptr;
}

std::string TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

OrtStatusPtr ExpectTensor(const W4A8Attrs& attrs, const Ort::ConstValue& value, const char* what,
                          ONNXTensorElementDataType type, const std::vector<int64_t>& shape) {
  auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type) {
    return Error(attrs, std::string(what) + " is " + TypeName(info.GetElementType()) + ", expected " + TypeName(type));
  }
  std::vector<int64_t> got = info.GetShape();
  if (got != shape) {
    return Error(attrs, std::string(what) + " has shape " + ShapeText(got) + ", expected " + ShapeText(shape) +
                                 " for K=" + std::to_string(attrs.K) + ", N=" + std::to_string(attrs.N) +
                                 ", group_size=" + std::to_string(attrs.group));
  }
  return nullptr;
}

}  // namespace

OrtStatusPtr ReadRun(const W4A8Attrs& attrs, Ort::KernelContext& ctx, W4A8Run& run) {
  try {
    Ort::ConstValue x = ctx.GetInput(0);
    auto x_info = x.GetTensorTypeAndShapeInfo();
    const ONNXTensorElementDataType x_type = x_info.GetElementType();
    if (x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      return Error(attrs, "X must be float32 or float16, got " + TypeName(x_type));
    }
    std::vector<int64_t> shape = x_info.GetShape();
    if (shape.empty() || shape.back() != attrs.K) {
      return Error(attrs, "X has shape " + ShapeText(shape) + " but its last dimension must be K=" + std::to_string(attrs.K));
    }
    W4A8Dims& dims = run.dims;
    dims.K = attrs.K;
    dims.N = attrs.N;
    dims.group = attrs.group;
    dims.groups = (attrs.K + attrs.group - 1) / attrs.group;
    dims.Kp = dims.groups * attrs.group;
    dims.bits = attrs.bits;
    dims.M = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) dims.M *= shape[i];

    if (attrs.bits == 8) {
      if (OrtStatusPtr s = ExpectTensor(attrs, ctx.GetInput(1), "int8 weight (input 1)", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, {dims.N, dims.Kp})) return s;
    } else {
      if (OrtStatusPtr s = ExpectTensor(attrs, ctx.GetInput(1), "packed weight (input 1)", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {dims.N, dims.Kp / 2})) return s;
    }
    if (OrtStatusPtr s = ExpectTensor(attrs, ctx.GetInput(2), "weight scales (input 2)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {dims.N, dims.groups})) return s;
    run.static_scale = 0.f;
    if (ctx.GetInputCount() > 3 && ctx.GetInput(3)) {
      Ort::ConstValue act_scale = ctx.GetInput(3);
      auto info = act_scale.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || info.GetElementCount() != 1) {
        return Error(attrs, "act_scale (input 3) must be one float32 value, got " + std::to_string(info.GetElementCount()) +
                                     " " + TypeName(info.GetElementType()) + " values");
      }
      run.static_scale = *act_scale.GetTensorData<float>();
      if (!(std::isfinite(run.static_scale) && run.static_scale > 0.f)) {
        return Error(attrs, "act_scale must be a positive finite number, got " + std::to_string(run.static_scale));
      }
    }
    run.bias = nullptr;
    if (ctx.GetInputCount() > 4 && ctx.GetInput(4)) {
      Ort::ConstValue bias = ctx.GetInput(4);
      if (OrtStatusPtr s = ExpectTensor(attrs, bias, "bias (input 4)", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {dims.N})) return s;
      run.bias = bias.GetTensorData<float>();
    }
    run.x_half = x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    run.x = x.GetTensorRawData();
    run.weight = ctx.GetInput(1).GetTensorRawData();
    run.scales = ctx.GetInput(2).GetTensorData<float>();
    shape.back() = attrs.N;
    run.y = ctx.GetOutput(0, shape).GetTensorMutableRawData();
    return nullptr;
  } catch (const std::exception& e) {
    return Error(attrs, e.what());
  }
}

}  // namespace fptq
