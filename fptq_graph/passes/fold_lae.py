"""Fold Logarithmic Activation Equalization scales into normalizations and weights (float-exact).

For a producer whose linears are in the LAE band: s_j = m_j / log2(2 + m_j) with m the shared
per-channel max|X|. The producer's gain and bias are divided by s, each sibling weight row j is
multiplied by s_j, so every linear's product is unchanged while its input range shrinks to
max_j log2(2 + m_j). A consumer of the normalized tensor that is not one of those linears (a post-LN
residual add in BERT) gets a Mul by s in front, which restores exactly what it read before.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_match import constant_value
from ..state import NormProducer, State


def lae_scale(act_max: np.ndarray) -> np.ndarray:
    m = act_max.astype(np.float64)
    s = np.where(m > 0, m / np.log2(2.0 + m), 1.0)
    return s.astype(np.float32)


class FoldLAEScales:
    name = "fold_lae"

    def run(self, state: State) -> str:
        folded = compensated = 0
        for norm in state.producers.values():
            linears = [state.linears[name] for name in norm.linears]
            if not any(l.scheme == "lae" for l in linears):
                continue
            s = lae_scale(np.max([l.act_max for l in linears], axis=0))
            self._scale_producer(norm, s)
            for linear in linears:
                weight = linear.node.inputs[1].values
                scaled = (weight.astype(np.float64) * s[:, None].astype(np.float64)).astype(weight.dtype)
                linear.node.inputs[1] = gs.Constant(f"{linear.name}.weight_lae", scaled)
                linear.lae_scale = s
                folded += 1
            compensated += self._compensate(state.graph, norm, s)
        state.graph.cleanup()
        return f"LAE folded into {folded} linears; {compensated} residual consumers compensated with Mul(s)"

    @staticmethod
    def _scale_producer(norm: NormProducer, s: np.ndarray) -> None:
        # New constants, never the old ones in place: an initializer may be shared with another node.
        for index, tag in ((norm.gamma_index, "gamma"), (norm.beta_index, "beta")):
            if index is None:
                continue
            value = constant_value(norm.node.inputs[index])
            norm.node.inputs[index] = gs.Constant(f"{norm.node.name or norm.output.name}.{tag}_lae",
                                                  (value.astype(np.float64) / s).astype(value.dtype))

    @staticmethod
    def _compensate(graph: gs.Graph, norm: NormProducer, s: np.ndarray) -> int:
        restored: dict[str, gs.Variable] = {}
        for consumer, tensor in norm.other_consumers:
            if tensor.name not in restored:
                scale = gs.Constant(f"{tensor.name}.lae_restore_scale", s.astype(tensor.dtype or np.float32))
                restored[tensor.name] = graph.layer(op="Mul", inputs=[tensor, scale],
                                                    outputs=[gs.Variable(f"{tensor.name}.lae_restored", dtype=tensor.dtype, shape=tensor.shape)],
                                                    name=f"{tensor.name}.lae_restore")[0]
            for index, current in enumerate(consumer.inputs):
                if current is tensor:
                    consumer.inputs[index] = restored[tensor.name]
        return len(norm.other_consumers)
