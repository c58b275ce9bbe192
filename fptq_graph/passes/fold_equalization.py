"""Fold per-channel equalization scales into normalizations and weights (a float-exact rewrite).

For a producer whose linears were classified for equalization, one scale s [K] is computed from
the siblings' shared per-channel max|X| (m) and applied as X' = X / s, W' = diag(s) W:
- LAE (FPTQ):   s_j = m_j / log2(2 + m_j); it looks only at activations and shrinks the range to
                max_j log2(2 + m_j).
- SmoothQuant:  s_j = m_j^a / w_j^(1-a), w_j = max|W_j| over the row j of every sibling weight.
The producer's gain and bias are divided by s and each sibling's weight row j multiplied by s_j, so
every product is unchanged. With the recipe's AWQ (awq.py), each sibling group that can take a scale
gets s = s0 * r^alpha (s0 the LAE/SmoothQuant scale or 1, alpha searched), folded the same way; a
linear reading a SwiGLU product takes it into the columns of the linear producing the product's
`up` factor instead. A consumer of the normalized tensor that is not one of those linears
(a post-LN residual add in BERT) gets a Mul by s in front, which restores exactly what it read.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..awq import AWQChoice, search_awq
from ..graph_match import constant_value, producer
from ..hessians import token_count
from ..recipes import effective
from ..state import EQUALIZED, NormProducer, State
from .find_linears import foldable
from .plan_lm_head import find_lm_head


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
        cfg = state.config
        awq = effective(state).awq and cfg.weight_bits == 4
        folded = compensated = 0
        searched: list[float] = []      # AWQ: the alpha chosen per group
        if awq:
            folded += self._awq_products(state, searched)
        outputs = {t.name for t in state.graph.outputs}
        head = find_lm_head(state) if cfg.lm_head_mode != "float" else None
        for norm in state.producers.values():
            linears = [state.linears[name] for name in norm.linears]
            schemes = {l.scheme for l in linears} & set(EQUALIZED)
            act_max = np.max([l.act_max for l in linears], axis=0)
            s = None
            if schemes == {"lae"}:
                s = lae_scale(act_max)
            elif schemes:
                weight_max = np.max([np.abs(l.node.inputs[1].values).max(axis=1) for l in linears], axis=0)
                s = smoothquant_scale(act_max, weight_max, cfg.smooth_alpha)
            if awq and all(l is not head for l in linears) and not foldable(norm, outputs, cfg.compensate_residual):
                choice = self._awq_search(state, linears, s, act_max)
                if choice is not None:
                    searched.append(choice.alpha)
                    s = choice.scale if choice.alpha > 0 else s
            if s is None:
                continue
            self._scale_producer(norm, s)
            for linear in linears:
                weight = linear.node.inputs[1].values
                scaled = (weight.astype(np.float64) * s[:, None].astype(np.float64)).astype(weight.dtype)
                linear.node.inputs[1] = gs.Constant(f"{linear.name}.weight_equalized", scaled)
                linear.eq_scale = s
                folded += 1
            compensated += self._compensate(state.graph, norm, s)
        state.graph.cleanup()
        awq_note = ""
        if awq:
            moved = sum(1 for a in searched if a > 0)
            awq_note = (f"; AWQ searched {len(searched)} groups, {moved} with alpha > 0"
                        + (f" (mean alpha {np.mean(searched):.2f})" if searched else ""))
        return f"equalization folded into {folded} linears; {compensated} residual consumers compensated with Mul(s){awq_note}"

    @staticmethod
    def _awq_search(state: State, linears: list, base: np.ndarray | None, act_max: np.ndarray) -> AWQChoice | None:
        """Searches AWQ's alpha for sibling linears; notes the choice in their reasons. None: no X^T X."""
        cfg = state.config
        activation = linears[0].activation.name
        hessian, tokens = state.gram.get(activation), token_count(state, activation)
        if hessian is None or tokens is None:
            return None
        static = linears[0].scheme in ("static", "lae", "smooth")
        choice = search_awq([l.node.inputs[1].values for l in linears], hessian, tokens, base, cfg.group_size,
                            cfg.symmetric, act_max if static else None)
        gain = 100 * (1 - choice.error / choice.base_error) if choice.base_error > 0 else 0.0
        for linear in linears:
            linear.reason += (f"; AWQ alpha={choice.alpha:g} (est. output error -{gain:.0f}%"
                              f"{' incl. int8 activation noise' if static else ''})")
        return choice

    def _awq_products(self, state: State, searched: list) -> int:
        """AWQ for linears reading an elementwise product a * b where b is another linear's output read
        by nothing else (SwiGLU: down_proj reads act(gate) * up): 1/s folds into that linear's output
        columns (W_up diag(1/s): its INT4 groups run along K, so a column scale scales their scales and
        costs the up projection nothing), s into the reader's rows."""
        outputs = {t.name for t in state.graph.outputs}
        by_output = {l.output: l for l in state.linears.values()}
        groups: dict[str, list] = {}
        for linear in state.linears.values():
            if linear.producer is None:
                groups.setdefault(linear.activation.name, []).append(linear)
        folded = 0
        for activation, linears in groups.items():
            tensor = linears[0].activation
            mul = producer(tensor)
            if mul is None or mul.op != "Mul" or tensor.name in outputs or len(mul.inputs) != 2:
                continue
            if {id(c) for c in tensor.outputs} != {id(l.node) for l in linears}:
                continue   # the product feeds something that is not one of these linears
            source = next((by_output[t.name] for t in mul.inputs
                           if t.name in by_output and len(t.outputs) == 1 and t.name not in outputs
                           and by_output[t.name].node.op == "MatMul"
                           and isinstance(by_output[t.name].node.inputs[1], gs.Constant)), None)
            if source is None or any(source is l for l in linears):
                continue
            choice = self._awq_search(state, linears, None, np.max([l.act_max for l in linears], axis=0))
            if choice is None:
                continue
            searched.append(choice.alpha)
            if choice.alpha == 0:
                continue
            s = choice.scale
            weight = source.node.inputs[1].values
            source.node.inputs[1] = gs.Constant(f"{source.name}.weight_awq_columns",
                                                (weight.astype(np.float64) / s[None, :].astype(np.float64)).astype(weight.dtype))
            source.reason += f"; output columns carry 1/s of AWQ for {', '.join(l.name for l in linears)}"
            for linear in linears:
                weight = linear.node.inputs[1].values
                linear.node.inputs[1] = gs.Constant(f"{linear.name}.weight_equalized",
                                                    (weight.astype(np.float64) * s[:, None].astype(np.float64)).astype(weight.dtype))
                linear.eq_scale = s
                folded += 1
        return folded

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
