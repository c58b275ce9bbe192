"""Fold the plan's equalization scales into normalizations and weights (a float-exact rewrite).

For every scale s [K] the plan holds (plan_equalization chose it: LAE, SmoothQuant or AWQ), X' = X / s
and W' = diag(s) W: the producer's gain and bias are divided by s and each sibling's weight row j
multiplied by s_j, so every product is unchanged. AWQ's scale for linears reading a SwiGLU product goes
into their rows and its 1/s into the columns of the linear producing the product's `up` factor; those
folds come first, in the plan's order, so each weight gets the same arithmetic plan_equalization
searched on. A consumer of the normalized tensor that is not one of those linears (a post-LN residual
add in BERT) gets a Mul by s in front, which restores exactly what it read.

Resident: one new weight at a time (the folded copy replaces the old constant in the graph).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.state import NormProducer
from fptq_graph.patterns.graph_match import constant_value
from fptq_graph.quant.equalization import divide_columns, scale_rows


class FoldEqualizationScales(Pass):
    name = "fold_equalization"
    kind = "rewrite"
    requires = frozenset({"plan", "canonical_weights"})
    ensures = frozenset({"equalization_folded"})
    replay_on_resume = True   # the folded norms live in the graph; a finished block stores only its plan

    def run(self, state) -> PassResult:
        plan = state.plan
        folded = compensated = 0
        for source_name, readers in plan.product_folds:
            source = state.linears[source_name]
            s = plan[source_name].equalization.column_scale
            source.node.inputs[1] = gs.Constant(f"{source.name}.weight_awq_columns",
                                                divide_columns(source.node.inputs[1].values, s))
            for name in readers:
                linear = state.linears[name]
                linear.node.inputs[1] = gs.Constant(f"{linear.name}.weight_equalized",
                                                    scale_rows(linear.node.inputs[1].values, plan[name].eq_scale))
                folded += 1
        for norm in state.producers.values():
            linears = [state.linears[name] for name in norm.linears]
            s = plan[linears[0].name].eq_scale
            if s is None:
                continue
            self._scale_producer(norm, s)
            for linear in linears:
                linear.node.inputs[1] = gs.Constant(f"{linear.name}.weight_equalized",
                                                    scale_rows(linear.node.inputs[1].values, s))
                folded += 1
            compensated += self._compensate(state.graph, norm, s)
        state.graph.cleanup()
        return PassResult(f"equalization folded into {folded} linears; {compensated} residual consumers compensated with Mul(s)",
                          modified=folded > 0, stats={"folded": folded, "compensated": compensated})

    @staticmethod
    def _scale_producer(norm: NormProducer, s: np.ndarray) -> None:
        # New constants, never the old ones in place: an initializer may be shared with another node.
        for index, tag in ((norm.gamma_index, "gamma"), (norm.beta_index, "beta")):
            if index is None:
                continue
            value = constant_value(norm.node.inputs[index])
            norm.node.inputs[index] = gs.Constant(f"{norm.node.name or norm.output.name}.{tag}_equalized",
                                                  (value.astype(np.float64) / s).astype(value.dtype))

    @staticmethod
    def _compensate(graph: gs.Graph, norm: NormProducer, s: np.ndarray) -> int:
        restored: dict[str, gs.Variable] = {}
        for consumer, tensor in norm.other_consumers:
            if tensor.name not in restored:
                scale = gs.Constant(f"{tensor.name}.equalization_restore_scale", s.astype(tensor.dtype or np.float32))
                restored[tensor.name] = graph.layer(op="Mul", inputs=[tensor, scale],
                                                    outputs=[gs.Variable(f"{tensor.name}.restored", dtype=tensor.dtype, shape=tensor.shape)],
                                                    name=f"{tensor.name}.equalization_restore")[0]
            for index, current in enumerate(consumer.inputs):
                if current is tensor:
                    consumer.inputs[index] = restored[tensor.name]
        return len(norm.other_consumers)
