"""Emit the `w4a8` form: every linear with int8 activations becomes one fptq::W4A8MatMul node (the
bundled op library's CPU and CUDA kernels), keeping its classified scheme: a static act_scale input
for static and equalized layers, none (per-token dynamic) for the rest.

Weights-only layers (scheme "float", e.g. the rtn-w4a16 recipe) keep the qdq weight form: the op
quantizes its input to int8 by definition. An int8 LM head (Config.lm_head) goes through ONNX Runtime's
integer MatMulIntegerToFloat with the same activation scheme (passes/plan_lm_head.py), its tied
embedding lookups reading the same codes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import FptqError
from ..graph_match import constant_value
from ..state import Linear, State
from ..w4a8_op import DOMAIN, OP_TYPE, pack_weight
from .emit_qdq import activation_scale, dequantized_weight
from .plan_lm_head import find_lm_head, integer_head, tie_to_kn_codes, tied_gathers


class EmitW4A8:
    name = "emit_w4a8"

    def run(self, state: State) -> str:
        if not state.config.symmetric:
            raise FptqError("format 'w4a8' needs symmetric int4 weights (its kernels take no zero points); "
                            "drop --asymmetric or use --format qdq")
        graph = state.graph
        fused = weights_only = 0
        int4_bytes = int8_bytes = 0
        head = find_lm_head(state) if state.config.lm_head_mode == "int8" else None
        tied = tied_gathers(graph, head) if head is not None else []
        for linear in state.linears.values():
            if linear is head:   # int8 weights: the integer MatMul (or qdq weights when weights-only)
                if linear.scheme == "float":
                    dq_out, int8_bytes = dequantized_weight(graph, linear)
                    linear.node.inputs[1] = dq_out
                    dq = dq_out.inputs[0]
                    codes, scale = dq.inputs[0], dq.inputs[1]
                else:
                    linear.act_scale = activation_scale(linear)
                    codes, scale, int8_bytes = integer_head(graph, linear)
                if tied:
                    tie_to_kn_codes(graph, linear, tied, codes, scale)
                continue
            if linear.scheme == "float":
                linear.node.inputs[1], nbytes = dequantized_weight(graph, linear)
                weights_only += 1
            else:
                linear.act_scale = activation_scale(linear)
                nbytes = self._replace(graph, linear)
                fused += 1
            int4_bytes += nbytes
        graph.cleanup().toposort()
        summary = f"{fused} linears to {DOMAIN}::{OP_TYPE}; INT4 weights {int4_bytes / 2**20:.2f} MiB packed"
        if head is not None:
            summary += (f"; int8 LM head '{head.name}' through com.microsoft.MatMulIntegerToFloat "
                        f"({int8_bytes / 2**20:.2f} MiB)") if head.scheme != "float" else \
                f"; int8 LM head '{head.name}' as qdq weights ({int8_bytes / 2**20:.2f} MiB)"
            summary += f", its table shared by {len(tied)} embedding lookup(s)" if tied else ""
        return summary + (f"; {weights_only} weights-only layers kept as qdq weights" if weights_only else "")

    @staticmethod
    def _replace(graph: gs.Graph, linear: Linear) -> int:
        node, qw = linear.node, linear.quantized
        k, n = qw.shape
        packed = pack_weight(qw.q, qw.group_size)
        inputs = [node.inputs[0],
                  gs.Constant(f"{linear.name}.weight_w4", packed),
                  gs.Constant(f"{linear.name}.weight_scale", np.ascontiguousarray(qw.scale.T, dtype=np.float32)),
                  gs.Variable.empty() if linear.act_scale is None
                  else gs.Constant(f"{linear.name}.act_scale", np.array(linear.act_scale, dtype=np.float32))]
        add_bias = None
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_value(node.inputs[2])
            if bias is not None and bias.size == n:   # a per-channel bias goes into the op
                inputs.append(gs.Constant(f"{linear.name}.bias", bias.reshape(n).astype(np.float32)))
            else:                                     # anything else stays an Add after it
                add_bias = node.inputs[2]
        while isinstance(inputs[-1], gs.Variable) and not inputs[-1].name:
            inputs.pop()                              # no trailing empty optional inputs
        replace_linear(graph, linear, gs.Node(op=OP_TYPE, domain=DOMAIN, inputs=inputs,
                                              attrs={"K": k, "N": n, "group_size": qw.group_size}), add_bias)
        return packed.nbytes


def replace_linear(graph: gs.Graph, linear: Linear, op: gs.Node, add_bias: gs.Tensor | None = None) -> None:
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
