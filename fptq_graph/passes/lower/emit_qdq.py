"""Emit the `qdq` form: INT4 weight initializers -> DequantizeLinear(axis=0, block_size=g) (int8
weights of the w8a8 recipe and an int8 LM head: per output channel, axis=1), and int8 activation
quantize/dequantize per tensor (static) or per token (dynamic), as the plan says (qdq_nodes.py).

An int8 LM head (one quantization: q = round(w / s_n) in [-127, 127], s_n = max|w_:,n| / 127) is codes
int8 [K, N] -> DequantizeLinear(axis=1, scale [N]) -> MatMul. Its tied embedding lookups (qdq and w4a8
forms) replace Gather(table, ids) by Gather(codes, ids, axis=1) -> Transpose -> Cast ->
Mul(Gather(scales, ids)) on the head's own [K, N] codes (tie_to_kn_codes): ONNX Gather takes no
int4/8-bit blocked table, and DequantizeLinear -> Transpose -> MatMul would keep ORT from fusing the head.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.lower.qdq_nodes import const, dequantized_weight, per_tensor_qdq, per_token_qdq
from fptq_graph.patterns.lm_head import source_dtype


class EmitQDQ(Pass):
    name = "emit_qdq"
    kind = "lower"
    requires = frozenset({"plan", "quantized_weights"})
    ensures = frozenset({"lowered"})

    def run(self, state) -> PassResult:
        graph, plan = state.graph, state.plan
        shared: dict[tuple[str, str], gs.Variable] = {}   # (activation, scheme) -> quantized activation
        weight_bytes = 0
        for linear in state.linears.values():
            spec = plan[linear.name].activation
            if spec.scheme != "float" and self.quantizes_input(linear):
                # Siblings read the same tensor with the same scheme (and, under LAE, the same s): one QDQ.
                key = (linear.activation.name, spec.scheme)
                if key not in shared:
                    shared[key] = (per_token_qdq(graph, linear) if spec.scheme == "dynamic"
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
        """The tied lookups read the int8 head's codes and scales (its DequantizeLinear's inputs)."""
        dq = head.node.inputs[1].inputs[0]
        tie_to_kn_codes(state.graph, head, gathers, dq.inputs[0], dq.inputs[1])

    def emit_weight(self, state, linear) -> int:
        """Rewires the linear to its quantized weight; returns the packed bytes."""
        linear.node.inputs[1], nbytes = dequantized_weight(state.graph, linear, state.quantized[linear.name])
        return nbytes


def tie_to_kn_codes(graph: gs.Graph, linear, gathers: list[gs.Node], codes: gs.Constant,
                    scale: gs.Constant) -> None:
    """Each tied Gather(table [N, K], ids) becomes the dequantized rows of the head's int8 [K, N] codes:
    Gather(codes, ids, axis=1) -> Transpose -> Cast -> Mul(Gather(scale [N], ids)), shaped ids.shape + [K]."""
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
        rows = graph.layer(op="Gather", name=f"{tag}_gather", attrs={"axis": 1}, inputs=[codes, flat],
                           outputs=[var("codes_kt", np.int8)])[0]
        rows = graph.layer(op="Transpose", name=f"{tag}_transpose", attrs={"perm": [1, 0]}, inputs=[rows],
                           outputs=[var("codes_tk", np.int8)])[0]
        rows = graph.layer(op="Cast", name=f"{tag}_cast", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)},
                           inputs=[rows], outputs=[var("codes_float")])[0]
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
