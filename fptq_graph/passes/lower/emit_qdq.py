"""Emit the `qdq` form: INT4 weight initializers -> DequantizeLinear(axis=0, block_size=g) (int8
weights of the w8a8 recipe: per output channel, axis=1), and int8 activation quantize/dequantize per
tensor (static) or per token (dynamic), as the plan says (qdq_nodes.py).

An int8 LM head with int8 activations (one quantization: q = round(w / s_n) in [-127, 127],
s_n = max|w_:,n| / 127) is the integer product in standard ONNX (integer_head): activations to uint8
codes + 128 (QuantizeLinear with zero point 128, or the per-token codes + 128), MatMulInteger with the
head's codes + 128 [K, N] (both zero points 128) -> Cast -> Mul(s_n [x the static scale]) [-> Mul(the
token scale)]. The same integers as QDQ -> MatMul, so the same values to float rounding, and the one
way ONNX Runtime runs it both exact and fast on every x86 CPU: MLAS's u8 x u8 kernel widens to int16
(exact), where its u8 x s8 kernel saturates without VNNI and its s8 x s8 path is a portable loop, and
DequantizeLinear -> MatMul dequantizes the whole head every Run (SmolLM2's head, 1 x 576 @ 576 x 49152
on 2 cores: float 9 ms, this 3-5 ms, QDQ -> MatMul 92-112 ms; docs/benchmarks.md, issue 30). A
weights-only int8 head (float activations) stays codes int8 [K, N] -> DequantizeLinear(axis=1) -> MatMul.

Tied embedding lookups of such a head (qdq form; the w4a8 form's weights-only head) replace
Gather(table, ids) by Gather(codes, ids, axis=1) -> Transpose -> Cast [-> Sub(128)] ->
Mul(Gather(scales, ids)) on the head's own [K, N] codes (tie_to_kn_codes): ONNX Gather takes no
int4/8-bit blocked table.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.lower.qdq_nodes import (activation_dtype, const, dequantized_weight, per_tensor_qdq, per_token_int8,
                                               per_token_qdq)
from fptq_graph.patterns.bias import gemm_bias
from fptq_graph.patterns.lm_head import source_dtype


class EmitQDQ(Pass):
    name = "emit_qdq"
    kind = "lower"
    requires = frozenset({"plan", "quantized_weights"})
    ensures = frozenset({"lowered"})

    # Whether an int8 head with int8 activations is written as integer_head (qdq) or left to emit_weight (ort).
    integer_int8_head = True

    def run(self, state) -> PassResult:
        graph, plan = state.graph, state.plan
        shared: dict[tuple[str, str], gs.Variable] = {}   # (activation, scheme) -> quantized activation
        weight_bytes = 0
        head = plan.head.linear if plan.head.mode == "int8" else None
        self._integer_head = None
        for linear in state.linears.values():
            spec = plan[linear.name].activation
            if linear.name == head and spec.quantization != "float" and self.integer_int8_head:
                self._integer_head = integer_head(graph, linear, state.quantized[linear.name], spec.scale)
                weight_bytes += self._integer_head[0].values.nbytes
                continue
            if spec.quantization != "float" and self.quantizes_input(linear):
                # Siblings read the same tensor with the same scheme (and, under LAE, the same s): one QDQ.
                key = (linear.activation.name, spec.scheme)
                if key not in shared:
                    shared[key] = (per_token_qdq(graph, linear) if spec.quantization == "per_token"
                                   else per_tensor_qdq(graph, linear, spec.scale))
                linear.node.inputs[0] = shared[key]
            weight_bytes += self.emit_weight(state, linear)
        tied = plan.head.tied if plan.head.mode == "int8" else ()
        if tied:
            self.tie_embeddings(state, state.linears[plan.head.linear], list(tied))
        graph.cleanup().toposort()
        kind = "int8" if state.config.weight_bits == 8 else "INT4"
        tied_note = f"; {len(tied)} embedding lookup(s) read the int8 LM head's table" if tied else ""
        return PassResult(f"{len(state.linears)} linears emitted; {kind} weights {weight_bytes / 2**20:.2f} MiB packed{tied_note}",
                          modified=True, stats={"linears": len(state.linears), "weight_bytes": weight_bytes,
                                                "tied_lookups": len(tied)})

    def quantizes_input(self, linear) -> bool:
        """Whether the graph quantizes this linear's input itself (int8 QDQ by its scheme): always, here."""
        return True

    def tie_embeddings(self, state, head, gathers: list[gs.Node]) -> None:
        """The tied lookups read the int8 head's codes and scales (integer_head's, or its DequantizeLinear's)."""
        if self._integer_head is not None:
            codes, scale = self._integer_head
            tie_to_kn_codes(state.graph, head, gathers, codes, scale, offset=128)
            return
        dq = head.node.inputs[1].inputs[0]
        tie_to_kn_codes(state.graph, head, gathers, dq.inputs[0], dq.inputs[1])

    def emit_weight(self, state, linear) -> int:
        """Rewires the linear to its quantized weight; returns the packed bytes."""
        linear.node.inputs[1], nbytes = dequantized_weight(state.graph, linear, state.quantized[linear.name])
        return nbytes


def tie_to_kn_codes(graph: gs.Graph, linear, gathers: list[gs.Node], codes: gs.Constant,
                    scale: gs.Constant, offset: int = 0) -> None:
    """Each tied Gather(table [N, K], ids) becomes the dequantized rows of the head's [K, N] codes (int8, or
    uint8 codes + `offset`): Gather(codes, ids, axis=1) -> Transpose -> Cast [-> Sub(offset)] ->
    Mul(Gather(scale [N], ids)), shaped ids.shape + [K]."""
    k = codes.values.shape[0]
    for index, node in enumerate(gathers):
        tag = f"{node.name or linear.name + '.embedding'}.q{index or ''}"
        ids, out = node.inputs[1], node.outputs[0]
        dtype = np.dtype(source_dtype(node.inputs[0]))   # the table's type, which the lookup keeps
        node.outputs.clear()
        node.inputs.clear()

        def var(suffix, kind=None):
            return gs.Variable(f"{tag}_{suffix}", dtype=kind or dtype)

        flat = graph.layer(op="Reshape", name=f"{tag}_flat", inputs=[ids, const(f"{tag}_minus1", np.array([-1], np.int64))],
                           outputs=[var("ids", ids.dtype or np.int64)])[0]
        kind = codes.values.dtype
        rows = graph.layer(op="Gather", name=f"{tag}_gather", attrs={"axis": 1}, inputs=[codes, flat],
                           outputs=[var("codes_kt", kind)])[0]
        rows = graph.layer(op="Transpose", name=f"{tag}_transpose", attrs={"perm": [1, 0]}, inputs=[rows],
                           outputs=[var("codes_tk", kind)])[0]
        rows = graph.layer(op="Cast", name=f"{tag}_cast", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)},
                           inputs=[rows], outputs=[var("codes_float")])[0]
        if offset:
            rows = graph.layer(op="Sub", name=f"{tag}_signed", inputs=[rows, const(f"{tag}_offset", np.array(offset, dtype))],
                               outputs=[var("codes_signed")])[0]
        scales = graph.layer(op="Gather", name=f"{tag}_scale_gather", attrs={"axis": 0}, inputs=[scale, flat],
                             outputs=[var("scale_t", scale.values.dtype)])[0]
        if np.dtype(scale.values.dtype) != dtype:   # the w4a8 form's float32 scales in a float16 model
            scales = graph.layer(op="Cast", name=f"{tag}_scale_cast", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)},
                                 inputs=[scales], outputs=[var("scale_t_cast")])[0]
        scales = graph.layer(op="Unsqueeze", name=f"{tag}_scale_column",
                             inputs=[scales, const(f"{tag}_axis1", np.array([1], np.int64))], outputs=[var("scale_t1")])[0]
        rows = graph.layer(op="Mul", name=f"{tag}_dequant", inputs=[rows, scales], outputs=[var("rows")])[0]
        shape = graph.layer(op="Shape", name=f"{tag}_ids_shape", inputs=[ids], outputs=[var("ids_shape", np.int64)])[0]
        shape = graph.layer(op="Concat", name=f"{tag}_shape", attrs={"axis": 0},
                            inputs=[shape, const(f"{tag}_k", np.array([k], np.int64))], outputs=[var("shape", np.int64)])[0]
        graph.layer(op="Reshape", name=f"{tag}_reshape", inputs=[rows, shape], outputs=[out])


def integer_head(graph: gs.Graph, linear, qw, act_scale: float | None) -> tuple[gs.Constant, gs.Constant]:
    """The qdq form's int8 head with int8 activations (module docstring): QuantizeLinear (uint8, zero point
    128) or the per-token codes + 128 -> MatMulInteger(x, codes + 128 [K, N], 128, 128) -> Cast(float32) ->
    Mul(s_n x the static scale, or s_n then the token scale) [-> Cast to the model's type] [-> Add(bias)].
    Returns the uint8 codes and the per-channel scales [N] (for tied lookups)."""
    node = linear.node
    n = linear.n
    dtype = activation_dtype(linear)
    tag = f"{linear.name}.act"
    x = node.inputs[0]
    codes = gs.Constant(f"{linear.name}.weight_uint8", (qw.codes.astype(np.int16) + 128).astype(np.uint8))
    channel_scale = gs.Constant(f"{linear.name}.weight_scale", qw.scale.reshape(n).astype(np.float32))
    zero = const(f"{linear.name}.zero_point", np.array(128, np.uint8))

    def var(suffix, kind=dtype):
        return gs.Variable(f"{tag}_{suffix}", dtype=kind)

    if act_scale is not None:   # static: QuantizeLinear's codes, as the QDQ pair would round them
        x_scale = np.array(act_scale, dtype)
        xu = graph.layer(op="QuantizeLinear", name=f"{tag}_q_u8", inputs=[x, const(f"{tag}_scale", x_scale), zero],
                         outputs=[var("uint8", np.uint8)])[0]
        out_scale = gs.Constant(f"{linear.name}.weight_x_act_scale",
                                (channel_scale.values.astype(np.float64) * float(x_scale)).astype(np.float32))
        token_scale = None
    else:                       # per token: the qdq form's own codes, moved to uint8
        q, token_scale = per_token_int8(graph, x, tag, dtype)
        q = graph.layer(op="Add", name=f"{tag}_plus_128", inputs=[q, const(f"{tag}_128", np.array(128, dtype))],
                        outputs=[var("codes_plus_128")])[0]
        xu = graph.layer(op="Cast", name=f"{tag}_to_u8", attrs={"to": onnx.TensorProto.UINT8}, inputs=[q],
                         outputs=[var("uint8", np.uint8)])[0]
        out_scale = channel_scale
    bias = gemm_bias(node)
    outputs = list(node.outputs)
    node.outputs.clear()
    node.inputs.clear()
    # int32 sums -> float32 (float16 would overflow them) -> scales -> the model's type -> bias.
    # (op, extra input, attributes, output type)
    steps = [("Cast", [], {"to": onnx.TensorProto.FLOAT}, np.float32), ("Mul", [out_scale], {}, np.float32)]
    if token_scale is not None:
        if dtype != np.float32:
            token_scale = graph.layer(op="Cast", name=f"{tag}_token_scale_f32", attrs={"to": onnx.TensorProto.FLOAT},
                                      inputs=[token_scale], outputs=[var("token_scale_f32", np.float32)])[0]
        steps.append(("Mul", [token_scale], {}, np.float32))
    if dtype != np.float32:
        steps.append(("Cast", [], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}, dtype))
    if bias is not None:
        steps.append(("Add", [bias], {}, dtype))
    y = graph.layer(op="MatMulInteger", name=node.name or linear.name, inputs=[xu, codes, zero, zero],
                    outputs=[gs.Variable(f"{linear.name}.int_product", dtype=np.int32)])[0]
    for i, (op, extra, attrs, kind) in enumerate(steps):
        last = i == len(steps) - 1
        y = graph.layer(op=op, name=f"{linear.name}.{op.lower()}_{i}", attrs=attrs, inputs=[y, *extra],
                        outputs=outputs if last else [gs.Variable(f"{linear.name}.after_{i}", dtype=kind)])[0]
    return codes, channel_scale
