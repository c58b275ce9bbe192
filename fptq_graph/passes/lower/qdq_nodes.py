"""The node patterns every form shares: int8 activation QDQ per tensor and per token, and a quantized
weight written as DequantizeLinear (INT4 blocked along K, or int8 per output channel).

Per-token dynamic quantization is written as its elementwise equivalent, s = max(|x|) / 127 over
the last axis, then Round(x / s) clipped to [-128, 127]: QuantizeLinear takes no run-time per-row
scale without the blocked form, which onnxruntime's CPU kernels don't all accept for a computed
scale. Round is half-to-even in both, so the values are those QuantizeLinear would give.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.ir.split_model import PackedTensor
from fptq_graph.quant.int4 import pack_int4
# A per-token scale floor so an all-zero token row quantizes to zeros instead of dividing by zero
# (shared with the w4a8 op, whose kernels use the same floor).
from fptq_graph.runtime.w4a8_op import MIN_TOKEN_SCALE


def const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def activation_dtype(linear) -> np.dtype:
    """The float type the linear computes in (float32 unless the model is float16)."""
    return np.dtype(linear.activation.dtype) if linear.activation.dtype is not None else np.dtype(np.float32)


def per_tensor_qdq(graph: gs.Graph, linear, scale: float) -> gs.Variable:
    """QuantizeLinear -> DequantizeLinear of the linear's input with one static int8 scale."""
    x = linear.activation
    tag = f"{linear.name}.act"
    scale_c = gs.Constant(f"{tag}_scale", np.array(scale, dtype=activation_dtype(linear)))
    zero = gs.Constant(f"{tag}_zero_point", np.array(0, dtype=np.int8))
    q = graph.layer(op="QuantizeLinear", name=f"{tag}_q", inputs=[x, scale_c, zero],
                    outputs=[gs.Variable(f"{tag}_int8", dtype=np.int8, shape=x.shape)])[0]
    return graph.layer(op="DequantizeLinear", name=f"{tag}_dq", inputs=[q, scale_c, zero],
                       outputs=[gs.Variable(f"{tag}_qdq", dtype=activation_dtype(linear), shape=x.shape)])[0]


def per_token_int8(graph: gs.Graph, x: gs.Tensor, tag: str, dtype: np.dtype) -> tuple[gs.Variable, gs.Variable]:
    """The int8 values (still in `dtype`, in [-128, 127]) of x per token, and the token scale [..., 1]."""
    # The scale floor must stay above zero in the activation's precision (1e-12 is 0 in float16).
    floor = max(MIN_TOKEN_SCALE, float(np.finfo(dtype).smallest_subnormal))

    def var(suffix):
        return gs.Variable(f"{tag}_{suffix}", dtype=dtype)

    def const(suffix, value):
        return gs.Constant(f"{tag}_{suffix}", np.array(value, dtype=dtype))

    absx = graph.layer(op="Abs", name=f"{tag}_abs", inputs=[x], outputs=[var("abs")])[0]
    amax = graph.layer(op="ReduceMax", name=f"{tag}_amax", attrs={"keepdims": 1},
                       inputs=[absx, gs.Constant(f"{tag}_last_axis", np.array([-1], dtype=np.int64))],
                       outputs=[var("amax")])[0]
    scale = graph.layer(op="Div", name=f"{tag}_scale", inputs=[amax, const("127", 127.0)], outputs=[var("scale_raw")])[0]
    scale = graph.layer(op="Max", name=f"{tag}_scale_floor", inputs=[scale, const("min_scale", floor)],
                        outputs=[var("token_scale")])[0]
    q = graph.layer(op="Div", name=f"{tag}_div", inputs=[x, scale], outputs=[var("scaled")])[0]
    q = graph.layer(op="Round", name=f"{tag}_round", inputs=[q], outputs=[var("rounded")])[0]
    q = graph.layer(op="Clip", name=f"{tag}_clip", inputs=[q, const("lo", -128.0), const("hi", 127.0)],
                    outputs=[var("int8_values")])[0]
    return q, scale


def per_token_qdq(graph: gs.Graph, linear) -> gs.Variable:
    """The linear's input quantized to int8 per token and dequantized (values x scale)."""
    x = linear.activation
    tag = f"{linear.name}.act"
    dtype = activation_dtype(linear)
    q, scale = per_token_int8(graph, x, tag, dtype)
    return graph.layer(op="Mul", name=f"{tag}_dequant", inputs=[q, scale],
                       outputs=[gs.Variable(f"{tag}_qdq", dtype=dtype, shape=x.shape)])[0]


def dequantized_weight(graph: gs.Graph, linear, qw) -> tuple[gs.Variable, int]:
    """INT4 initializer (and zero point) -> DequantizeLinear(axis=0, block_size=g): the float [K, N] weight.
    Int8 per-channel weights -> DequantizeLinear(axis=1) with one scale per output channel. Returns the
    dequantized tensor and the codes' bytes."""
    k, n = qw.shape
    dtype = activation_dtype(linear)   # the dequantized weight meets the activation in one MatMul
    if qw.bits == 8:
        weight = gs.Constant(f"{linear.name}.weight_int8", qw.codes)
        out = graph.layer(op="DequantizeLinear", name=f"{linear.name}.weight_dq",
                          inputs=[weight, gs.Constant(f"{linear.name}.weight_scale", qw.scale.reshape(n).astype(dtype))],
                          outputs=[gs.Variable(f"{linear.name}.weight_dq", dtype=dtype, shape=[k, n])],
                          attrs={"axis": 1})[0]
        return out, qw.codes.nbytes
    symmetric = qw.zero_point is None
    kind = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    # The codes are already packed in ONNX's INT4 layout: the constant shares them (no copy).
    weight = gs.Constant(f"{linear.name}.weight_int4", PackedTensor(qw.codes, [k, n], kind))
    inputs = [weight, gs.Constant(f"{linear.name}.weight_scale", qw.scale.astype(dtype))]
    if not symmetric:
        zp = qw.zero_point
        inputs.append(gs.Constant(f"{linear.name}.weight_zero_point", PackedTensor(
            np.frombuffer(pack_int4(zp), dtype=np.uint8), list(zp.shape), onnx.TensorProto.UINT4)))
    out = graph.layer(op="DequantizeLinear", name=f"{linear.name}.weight_dq", inputs=inputs,
                      outputs=[gs.Variable(f"{linear.name}.weight_dq", dtype=dtype, shape=[k, n])],
                      attrs={"axis": 0, "block_size": qw.group_size})[0]
    return out, qw.codes.nbytes


def replace_linear(graph: gs.Graph, linear, op: gs.Node, add_bias: gs.Tensor | None = None) -> None:
    """Puts `op` (its inputs set, no outputs yet) where the linear's node was, producing the same tensor,
    and `add_bias` after it as an Add when the op does not take the bias itself."""
    node = linear.node
    outputs = list(node.outputs)
    node.outputs.clear()
    node.inputs.clear()
    if add_bias is not None:
        product = gs.Variable(f"{linear.name}.product", dtype=outputs[0].dtype)
        graph.layer(op="Add", name=f"{linear.name}.bias_add", inputs=[product, add_bias], outputs=outputs)
        outputs = [product]
    op.name = node.name or linear.name
    op.outputs = outputs
    graph.nodes.append(op)
