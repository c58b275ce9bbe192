"""Fold per-channel equalization scales into normalizations and weights (a float-exact rewrite).

For a producer whose linears were classified for equalization, one scale s [K] is computed from
the siblings' shared per-channel max|X| (m) and applied as X' = X / s, W' = diag(s) W:
- LAE (FPTQ):   s_j = m_j / log2(2 + m_j); it looks only at activations and shrinks the range to
                max_j log2(2 + m_j).
- SmoothQuant:  s_j = m_j^a / w_j^(1-a), w_j = max|W_j| over the row j of every sibling weight.
The producer's gain and bias are divided by s and each sibling's weight row j multiplied by s_j, so
every product is unchanged. A consumer of the normalized tensor that is not one of those linears
(a post-LN residual add in BERT) gets a Mul by s in front, which restores exactly what it read.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_match import constant_value
from ..state import EQUALIZED, NormProducer, State


def lae_scale(act_max: np.ndarray) -> np.ndarray:
    m = act_max.astype(np.float64)
    return np.where(m > 0, m / np.log2(2.0 + m), 1.0).astype(np.float32)


def smoothquant_scale(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    m, w = act_max.astype(np.float64), weight_max.astype(np.float64)
    ok = (m > 0) & (w > 0)
    s = np.where(ok, np.power(np.where(ok, m, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1.0 - alpha), 1.0)
    return np.clip(s, 1e-5, None).astype(np.float32)


class FoldEqualizationScales:
    name = "fold_equalization"

    def run(self, state: State) -> str:
        folded = compensated = 0
        for norm in state.producers.values():
            linears = [state.linears[name] for name in norm.linears]
            schemes = {l.scheme for l in linears} & set(EQUALIZED)
            if not schemes:
                continue
            act_max = np.max([l.act_max for l in linears], axis=0)
            if schemes == {"lae"}:
                s = lae_scale(act_max)
            else:
                weight_max = np.max([np.abs(l.node.inputs[1].values).max(axis=1) for l in linears], axis=0)
                s = smoothquant_scale(act_max, weight_max, state.config.smooth_alpha)
            self._scale_producer(norm, s)
            for linear in linears:
                weight = linear.node.inputs[1].values
                scaled = (weight.astype(np.float64) * s[:, None].astype(np.float64)).astype(weight.dtype)
                linear.node.inputs[1] = gs.Constant(f"{linear.name}.weight_equalized", scaled)
                linear.eq_scale = s
                folded += 1
            compensated += self._compensate(state.graph, norm, s)
        state.graph.cleanup()
        return f"equalization folded into {folded} linears; {compensated} residual consumers compensated with Mul(s)"

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
