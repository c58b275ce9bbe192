"""Emit the `qdq` form: INT4 weight initializers -> DequantizeLinear(axis=0, block_size=g) (int8
weights of the w8a8 recipe: per output channel, axis=1), and int8 activation quantize/dequantize
per tensor (static) or per token (dynamic).

Per-token dynamic quantization is written as its elementwise equivalent, s = max(|x|) / 127 over
the last axis, then Round(x / s) clipped to [-128, 127], times s: QuantizeLinear takes no run-time
per-row scale without the blocked form, which onnxruntime's CPU kernels don't all accept for a
computed scale. Round is half-to-even in both, so the values are those QuantizeLinear would give.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..int4 import pack_int4
from ..split_model import PackedTensor
from ..state import Linear, State
from .plan_lm_head import find_lm_head, tie_to_kn_codes, tied_gathers
# A per-token scale floor so an all-zero token row quantizes to zeros instead of dividing by zero
# (shared with the w4a8 op, whose kernels use the same floor).
from ..w4a8_op import MIN_TOKEN_SCALE


class EmitQDQ:
    name = "emit_qdq"

    def run(self, state: State) -> str:
        graph = state.graph
        shared: dict[tuple[str, str], gs.Variable] = {}   # (activation, scheme) -> quantized activation
        weight_bytes = 0
        # An int8 LM head whose weight is an embedding table too: found while its weight is still float.
        head = find_lm_head(state) if state.config.lm_head_mode == "int8" else None
        tied = tied_gathers(graph, head) if head is not None else []
        for linear in state.linears.values():
            if linear.scheme != "float":
                linear.act_scale = activation_scale(linear)
                # Siblings read the same tensor with the same scheme (and, under LAE, the same s): one QDQ.
                key = (linear.activation.name, linear.scheme)
                if self.quantizes_input(linear):
                    if key not in shared:
                        shared[key] = (self._per_token(graph, linear) if linear.scheme == "dynamic"
                                       else self._per_tensor(graph, linear, linear.act_scale))
                    linear.node.inputs[0] = shared[key]
            weight_bytes += self.emit_weight(graph, linear)
        if tied:
            self.tie_embeddings(graph, head, tied)
        graph.cleanup().toposort()
        kind = "int8" if state.config.weight_bits == 8 else "INT4"
        tied_note = f"; {len(tied)} embedding lookup(s) read the int8 LM head's table" if tied else ""
        return f"{len(state.linears)} linears emitted; {kind} weights {weight_bytes / 2**20:.2f} MiB packed{tied_note}"

    def quantizes_input(self, linear: Linear) -> bool:
        """Whether the graph quantizes this linear's input itself (int8 QDQ by its scheme): always, here."""
        return True

    @staticmethod
    def tie_embeddings(graph: gs.Graph, head: Linear, gathers: list[gs.Node]) -> None:
        """The tied lookups read the int8 head's codes and scales (its DequantizeLinear's inputs)."""
        dq = head.node.inputs[1].inputs[0]
        tie_to_kn_codes(graph, head, gathers, dq.inputs[0], dq.inputs[1])

    def emit_weight(self, graph: gs.Graph, linear: Linear) -> int:
        """Rewires the linear to its quantized weight; returns the packed bytes."""
        linear.node.inputs[1], nbytes = dequantized_weight(graph, linear)
        return nbytes

    @staticmethod
    def _per_tensor(graph: gs.Graph, linear: Linear, scale: float) -> gs.Variable:
        x = linear.activation
        tag = f"{linear.name}.act"
        scale_c = gs.Constant(f"{tag}_scale", np.array(scale, dtype=activation_dtype(linear)))
        zero = gs.Constant(f"{tag}_zero_point", np.array(0, dtype=np.int8))
        q = graph.layer(op="QuantizeLinear", name=f"{tag}_q", inputs=[x, scale_c, zero],
                        outputs=[gs.Variable(f"{tag}_int8", dtype=np.int8, shape=x.shape)])[0]
        return graph.layer(op="DequantizeLinear", name=f"{tag}_dq", inputs=[q, scale_c, zero],
                           outputs=[gs.Variable(f"{tag}_qdq", dtype=activation_dtype(linear), shape=x.shape)])[0]

    @staticmethod
    def _per_token(graph: gs.Graph, linear: Linear) -> gs.Variable:
        x = linear.activation
        tag = f"{linear.name}.act"
        dtype = activation_dtype(linear)
        # The scale floor must stay above zero in the activation's precision (1e-12 is 0 in float16).
        floor = max(MIN_TOKEN_SCALE, float(np.finfo(dtype).smallest_subnormal))

        def var(suffix, shape=None):
            return gs.Variable(f"{tag}_{suffix}", dtype=dtype, shape=shape)

        def const(suffix, value):
            return gs.Constant(f"{tag}_{suffix}", np.array(value, dtype=dtype))

        amax = graph.layer(op="ReduceMax", name=f"{tag}_amax", attrs={"keepdims": 1},
                           inputs=[graph.layer(op="Abs", name=f"{tag}_abs", inputs=[x], outputs=[var("abs")])[0],
                                   gs.Constant(f"{tag}_last_axis", np.array([-1], dtype=np.int64))],
                           outputs=[var("amax")])[0]
        scale = graph.layer(op="Div", name=f"{tag}_scale", inputs=[amax, const("127", 127.0)], outputs=[var("scale_raw")])[0]
        scale = graph.layer(op="Max", name=f"{tag}_scale_floor", inputs=[scale, const("min_scale", floor)],
                            outputs=[var("token_scale")])[0]
        q = graph.layer(op="Div", name=f"{tag}_div", inputs=[x, scale], outputs=[var("scaled")])[0]
        q = graph.layer(op="Round", name=f"{tag}_round", inputs=[q], outputs=[var("rounded")])[0]
        q = graph.layer(op="Clip", name=f"{tag}_clip", inputs=[q, const("lo", -128.0), const("hi", 127.0)],
                        outputs=[var("int8_values")])[0]
        return graph.layer(op="Mul", name=f"{tag}_dequant", inputs=[q, scale], outputs=[var("qdq", x.shape)])[0]


def dequantized_weight(graph: gs.Graph, linear: Linear) -> tuple[gs.Variable, int]:
    """INT4 initializer (and zero point) -> DequantizeLinear(axis=0, block_size=g): the float [K, N] weight.
    Int8 per-channel weights -> DequantizeLinear(axis=1) with one scale per output channel."""
    qw = linear.quantized
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


def activation_dtype(linear: Linear) -> np.dtype:
    """The float type the linear computes in (float32 unless the model is float16)."""
    return np.dtype(linear.activation.dtype) if linear.activation.dtype is not None else np.dtype(np.float32)


def activation_scale(linear: Linear) -> float | None:
    """The static int8 scale a linear's activations get, or None when they are per-token dynamic."""
    return None if linear.scheme == "dynamic" else static_scale(linear.v_after)


def static_scale(v: float) -> float:
    """Per-tensor int8 scale from a calibrated max (a zero max gets scale 1: all inputs are zero)."""
    return float(v) / 127.0 if v > 0 else 1.0
