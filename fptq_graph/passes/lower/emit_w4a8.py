"""Emit the `w4a8` form: every INT4 linear with int8 activations becomes the bundled fptq::W4A8MatMul
op (runtime/w4a8_op.py; integer kernels on CPU and CUDA), weights-only layers keep qdq weights, and an
int8 LM head becomes fptq::W8A8MatMul, the same op over int8 weights, per output channel, with the
head's activation scheme (static scale or per token, inside the op).

The int8 head's weight is int8 [N, K], a row per output channel: an embedding table's layout, so its
tied embedding lookups Gather rows of that very initializer and dequantize only the rows read
(lookup_nodes.int8_rows). Integer sums, so it equals the qdq form to float rounding, on every CPU
kernel of the op (generic, AVX2, AVX-VNNI, AVX-512 VNNI: exact int32 group sums on each).

Why not ONNX Runtime's own integer ops: MatMulIntegerToFloat with int8 activations (exact on every CPU)
runs MLAS's portable s8 x s8 loop, 50 ms for SmolLM2's 1 x 576 @ 576 x 49152 head against 8 ms float on
2 cores; with uint8 activations MLAS's AVX2 kernel (no VNNI) saturates its int16 pair sums on full-range
int8 weights (README, "CPUs without VNNI"). W8A8MatMul runs it in 2.2 ms there (0.8-1.0 ms alone and
warm; docs/benchmarks.md, issue 30), and has CUDA kernels beside W4A8MatMul's.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.errors import FptqError
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.lower.emit_qdq import tie_to_kn_codes
from fptq_graph.passes.lower.lookup_nodes import int8_rows, replace_gathers
from fptq_graph.passes.lower.qdq_nodes import dequantized_weight, replace_linear
from fptq_graph.patterns.bias import gemm_bias
from fptq_graph.patterns.graph_match import constant_value
from fptq_graph.patterns.lm_head import source_dtype
from fptq_graph.runtime.w4a8_op import DOMAIN, OP_TYPE, OP_TYPE_INT8, pack_weight, pack_weight_int8


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
            if linear is head:   # int8 weights: W8A8MatMul (or qdq weights when weights-only)
                if spec.quantization == "float":
                    dq_out, int8_bytes = dequantized_weight(graph, linear, qw)
                    linear.node.inputs[1] = dq_out
                    dq = dq_out.inputs[0]
                    if tied:
                        tie_to_kn_codes(graph, linear, tied, dq.inputs[0], dq.inputs[1])
                else:
                    rows = gs.Constant(f"{linear.name}.weight_int8", pack_weight_int8(qw.codes, linear.k))
                    scale = gs.Constant(f"{linear.name}.weight_scale", qw.scale.reshape(-1, 1).astype(np.float32))
                    int8_bytes = fused_linear(graph, linear, OP_TYPE_INT8, rows, scale, linear.k, spec.scale)
                    if tied:
                        tie_to_rows(graph, linear, tied, rows, scale)
                continue
            if spec.quantization == "float":
                linear.node.inputs[1], nbytes = dequantized_weight(graph, linear, qw)
                weights_only += 1
            else:
                nbytes = fused_linear(graph, linear, OP_TYPE, gs.Constant(f"{linear.name}.weight_w4", pack_weight(qw.q, qw.group_size)),
                                      gs.Constant(f"{linear.name}.weight_scale", np.ascontiguousarray(qw.scale.T, dtype=np.float32)),
                                      qw.group_size, spec.scale)
                fused += 1
            int4_bytes += nbytes
        graph.cleanup().toposort()
        summary = f"{fused} linears to {DOMAIN}::{OP_TYPE}; INT4 weights {int4_bytes / 2**20:.2f} MiB packed"
        if head is not None:
            summary += (f"; int8 LM head '{head.name}' through {DOMAIN}::{OP_TYPE_INT8} "
                        f"({int8_bytes / 2**20:.2f} MiB)") if plan[head.name].activation.quantization != "float" else \
                f"; int8 LM head '{head.name}' as qdq weights ({int8_bytes / 2**20:.2f} MiB)"
            summary += f", its table shared by {len(tied)} embedding lookup(s)" if tied else ""
        summary += f"; {weights_only} weights-only layers kept as qdq weights" if weights_only else ""
        return PassResult(summary, modified=True, stats={"fused": fused, "weights_only": weights_only,
                                                         "int4_bytes": int4_bytes, "int8_bytes": int8_bytes,
                                                         "tied_lookups": len(tied)})


def fused_linear(graph: gs.Graph, linear, op_type: str, weight: gs.Constant, scale: gs.Constant, group: int,
                 act_scale: float | None) -> int:
    """Replaces the linear by one of our ops (W4A8MatMul or W8A8MatMul) over `weight` and `scale`, its
    activations quantized inside the op (act_scale; None: per token), a per-channel bias taken in.
    Returns the weight's bytes."""
    node = linear.node
    n = linear.n
    inputs = [node.inputs[0], weight, scale,
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
    replace_linear(graph, linear, gs.Node(op=op_type, domain=DOMAIN, inputs=inputs,
                                          attrs={"K": linear.k, "N": n, "group_size": group}), add_bias)
    return weight.values.nbytes


def tie_to_rows(graph: gs.Graph, linear, gathers: list[gs.Node], rows: gs.Constant, scale: gs.Constant) -> None:
    """Each tied Gather(table [N, K], ids) reads the head's int8 rows [N, K] and its scales [N, 1] instead,
    in the table's type."""
    dtype = np.dtype(source_dtype(gathers[0].inputs[0]))   # the table's type, which the lookups keep
    replace_gathers(gathers, f"{linear.name}.embedding",
                    lambda tag, ids, out: int8_rows(graph, tag, rows, scale, ids, out, dtype))
