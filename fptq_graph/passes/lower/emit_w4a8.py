"""Emit the `w4a8` form: every INT4 linear with int8 activations becomes the bundled fptq::W4A8MatMul
op (runtime/w4a8_op.py; integer kernels on CPU and CUDA), weights-only layers keep qdq weights, and an
int8 LM head becomes com.microsoft.MatMulIntegerToFloat with the same activation scheme, its tied
embedding lookups reading the same codes (emit_qdq.tie_to_kn_codes).

The int8 head (integer_head): activations to int8 (their int8 codes; the u8 x s8 path saturates on
CPUs without VNNI, see integer_head), a_scale the static scale, or 1 with a per-token Mul after it;
b_scale the per-channel scales. Integer sums, so it equals the qdq form to float rounding. The u8 form
it replaced was ONNX Runtime's fast path on a VNNI CPU (a 1 x 576 @ 576 x 49152 product: 2.3 ms against
8 ms float and 160 ms for the qdq form's per-token head; docs/benchmarks.md); the s8 form's speed is
not measured yet.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.errors import FptqError
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.lower.emit_qdq import tie_to_kn_codes
from fptq_graph.passes.lower.qdq_nodes import activation_dtype, const, dequantized_weight, per_token_int8, replace_linear
from fptq_graph.patterns.bias import gemm_bias
from fptq_graph.patterns.graph_match import constant_value
from fptq_graph.runtime.w4a8_op import DOMAIN, OP_TYPE, pack_weight


class EmitW4A8(Pass):
    name = "emit_w4a8"
    kind = "lower"
    requires = frozenset({"plan", "quantized_weights"})
    ensures = frozenset({"lowered"})

    def run(self, state) -> PassResult:
        if not state.config.symmetric:
            raise FptqError("format 'w4a8' needs symmetric int4 weights (its kernels take no zero points); "
                            "drop --asymmetric or use --format qdq")
        graph, plan = state.graph, state.plan
        fused = weights_only = 0
        int4_bytes = int8_bytes = 0
        head = state.linears[plan.head.linear] if plan.head.mode == "int8" and plan.head.linear else None
        tied = list(plan.head.tied) if head is not None else []
        for linear in state.linears.values():
            spec, qw = plan[linear.name].activation, state.quantized[linear.name]
            if linear is head:   # int8 weights: the integer MatMul (or qdq weights when weights-only)
                if spec.scheme == "float":
                    dq_out, int8_bytes = dequantized_weight(graph, linear, qw)
                    linear.node.inputs[1] = dq_out
                    dq = dq_out.inputs[0]
                    codes, scale = dq.inputs[0], dq.inputs[1]
                else:
                    codes, scale, int8_bytes = integer_head(graph, linear, qw, spec.scale)
                if tied:
                    tie_to_kn_codes(graph, linear, tied, codes, scale)
                continue
            if spec.scheme == "float":
                linear.node.inputs[1], nbytes = dequantized_weight(graph, linear, qw)
                weights_only += 1
            else:
                nbytes = self._replace(graph, linear, qw, spec.scale)
                fused += 1
            int4_bytes += nbytes
        graph.cleanup().toposort()
        summary = f"{fused} linears to {DOMAIN}::{OP_TYPE}; INT4 weights {int4_bytes / 2**20:.2f} MiB packed"
        if head is not None:
            summary += (f"; int8 LM head '{head.name}' through com.microsoft.MatMulIntegerToFloat "
                        f"({int8_bytes / 2**20:.2f} MiB)") if plan[head.name].scheme != "float" else \
                f"; int8 LM head '{head.name}' as qdq weights ({int8_bytes / 2**20:.2f} MiB)"
            summary += f", its table shared by {len(tied)} embedding lookup(s)" if tied else ""
        summary += f"; {weights_only} weights-only layers kept as qdq weights" if weights_only else ""
        return PassResult(summary, modified=True, stats={"fused": fused, "weights_only": weights_only,
                                                         "int4_bytes": int4_bytes, "int8_bytes": int8_bytes,
                                                         "tied_lookups": len(tied)})

    @staticmethod
    def _replace(graph: gs.Graph, linear, qw, act_scale: float | None) -> int:
        node = linear.node
        k, n = qw.shape
        packed = pack_weight(qw.q, qw.group_size)
        inputs = [node.inputs[0],
                  gs.Constant(f"{linear.name}.weight_w4", packed),
                  gs.Constant(f"{linear.name}.weight_scale", np.ascontiguousarray(qw.scale.T, dtype=np.float32)),
                  gs.Variable.empty() if act_scale is None
                  else gs.Constant(f"{linear.name}.act_scale", np.array(act_scale, dtype=np.float32))]
        add_bias = None
        bias_tensor = gemm_bias(node)
        if bias_tensor is not None:
            bias = constant_value(bias_tensor)
            if bias is not None and bias.size == n:   # a per-channel bias goes into the op
                inputs.append(gs.Constant(f"{linear.name}.bias", bias.reshape(n).astype(np.float32)))
            else:                                     # anything else stays an Add after it
                add_bias = bias_tensor
        while isinstance(inputs[-1], gs.Variable) and not inputs[-1].name:
            inputs.pop()                              # no trailing empty optional inputs
        replace_linear(graph, linear, gs.Node(op=OP_TYPE, domain=DOMAIN, inputs=inputs,
                                              attrs={"K": k, "N": n, "group_size": qw.group_size}), add_bias)
        return packed.nbytes


def integer_head(graph: gs.Graph, linear, qw, act_scale: float | None) -> tuple[gs.Constant, gs.Constant, int]:
    """The w4a8 form's int8 head: activations to int8 (the scheme's codes), then
    com.microsoft.MatMulIntegerToFloat over the int8 [K, N] codes; a per-token scale multiplies after it
    (act_scale None). Returns the codes and scale constants (for tied lookups) and the codes' bytes.

    Signed activations, not uint8 with zero point 128: MLAS's u8 x s8 kernel on CPUs without VNNI
    (AVX2 only) sums pairs of u8 x s8 products in int16 (vpmaddubsw), which saturates once an
    activation code + 128 and a weight code are both large: measured on an AVX2-only EPYC with
    onnxruntime 1.31.1, 64 x (255 - 128) x 127 came out 8160 instead of 1032256. Its s8 x s8 path
    is exact there (tests/test_lm_head.py)."""
    node = linear.node
    k, n = qw.shape
    dtype = activation_dtype(linear)
    tag = f"{linear.name}.act"
    x = node.inputs[0]
    codes = gs.Constant(f"{linear.name}.weight_int8", qw.codes)
    scale = gs.Constant(f"{linear.name}.weight_scale", qw.scale.reshape(n).astype(np.float32))

    def var(suffix, kind=None):
        return gs.Variable(f"{tag}_{suffix}", dtype=kind or dtype)

    if act_scale is not None:   # static: QuantizeLinear with zero point 0, int8 QDQ's own codes
        a_scale = const(f"{tag}_scale", np.array(act_scale, np.float32))
        x_scale = a_scale if dtype == np.float32 else const(f"{tag}_scale_{dtype.name}", np.array(act_scale, dtype))
        xq = graph.layer(op="QuantizeLinear", name=f"{tag}_q_s8", inputs=[x, x_scale, const(f"{tag}_zero_point", np.array(0, np.int8))],
                         outputs=[var("int8", np.int8)])[0]
        token_scale = None
    else:                               # per token: the qdq form's ops, then a cast of the codes to int8
        q, token_scale = per_token_int8(graph, x, tag, dtype)
        xq = graph.layer(op="Cast", name=f"{tag}_to_s8", attrs={"to": onnx.TensorProto.INT8}, inputs=[q],
                         outputs=[var("int8", np.int8)])[0]
        a_scale = const(f"{tag}_unit_scale", np.array(1.0, np.float32))
    bias = gemm_bias(node)
    # The linear's node goes; its outputs come from the chain product [-> Cast] [-> Mul(token scale)] [-> Add(bias)].
    outputs = list(node.outputs)
    node.outputs.clear()
    node.inputs.clear()
    steps = []
    if dtype != np.float32:
        steps.append(("Cast", [], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}))
    if token_scale is not None:
        steps.append(("Mul", [token_scale], {}))
    if bias is not None:
        steps.append(("Add", [bias], {}))
    y = gs.Variable(f"{linear.name}.int_product", dtype=np.float32) if steps else outputs[0]
    graph.layer(op="MatMulIntegerToFloat", domain="com.microsoft", name=node.name or linear.name,
                inputs=[xq, codes, a_scale, scale], outputs=[y] if steps else outputs)
    for i, (op, extra, attrs) in enumerate(steps):
        last = i == len(steps) - 1
        y = graph.layer(op=op, name=f"{linear.name}.{op.lower()}_after", attrs=attrs, inputs=[y, *extra],
                        outputs=outputs if last else [gs.Variable(f"{linear.name}.{op.lower()}_after", dtype=dtype)])[0]
    return codes, scale, qw.codes.nbytes
