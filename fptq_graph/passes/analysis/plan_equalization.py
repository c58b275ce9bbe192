"""Choose every sibling group's equalization scale (an analysis: the graph is not touched).

For a producer whose linears were classified for equalization, one scale s [K] from the siblings'
shared per-channel max|X| (m): LAE's s_j = m_j / log2(2 + m_j), or SmoothQuant's (quant/equalization.py).
With the recipe's AWQ (quant/awq.py), each sibling group that can take a scale gets s = s0 * r^alpha
(s0 the LAE/SmoothQuant scale or 1, alpha searched on the recorded X^T X); a linear reading a SwiGLU
product a * b, where b is another linear's output read by nothing else, takes AWQ's s into its rows and
1/s into the columns of the linear producing b (W_up diag(1/s): its INT4 groups run along K, so a
column scale scales their scales and costs the up projection nothing). fold_equalization folds what
this pass decides, in the same order, so the searches here see exactly the weights the fold makes.

No AWQ for a group whose input rotate_residual rotated (state.rotation["rotated_inputs"]: the readers of
the rotated stream's norms, and with --rotate-ffn the down projections): the rotation spread every
channel's energy over all of them, and AWQ's per-channel scales, searched against round-to-nearest INT4,
put channel scale back where GPTQ (which sees X^T X) then does better without it. Measured on SmolLM2 at
group 128 with --rotate-ffn (docs/accuracy.md, "Rotation"): 24.35 perplexity with AWQ on the rotated
inputs, 24.00 without. Inputs the rotation does not reach (a down projection without --rotate-ffn) keep it.

Resident: the scales ([K] float32 a group) and, while its own group is searched, the column-scaled
copy of one product's up projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.passes.analysis.find_linears import foldable
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.patterns.graph_match import producer
from fptq_graph.quant.awq import AWQChoice, search_awq
from fptq_graph.quant.equalization import divide_columns, lae_scale, smoothquant_scale


@dataclass(frozen=True)
class ProductGroup:
    """Linears reading a SwiGLU-style product, and the linear whose output columns can carry 1/s."""

    readers: tuple
    source: object


class PlanEqualization(Pass):
    name = "plan_equalization"
    kind = "analysis"
    requires = frozenset({"activation_specs", "head_plan", "statistics"})
    ensures = frozenset({"equalization_specs"})

    def run(self, state) -> PassResult:
        cfg, draft = state.config, state.draft
        awq = state.recipe.awq and cfg.weight_bits == 4
        rotated = set(state.rotation.get("rotated_inputs", ()))
        skipped = 0                      # AWQ groups left out because their input is rotated
        searched: list[float] = []      # AWQ: the alpha chosen per group
        column_divided: dict[str, np.ndarray] = {}   # a product source's weight with 1/s in its columns
        products = product_groups(state) if awq else []
        searched_products = 0            # product groups are searched in graph order, each before its source's group
        outputs = {t.name for t in state.graph.outputs}
        head = draft.head.linear if draft.head is not None else None
        equalized = 0

        def weight(linear) -> np.ndarray:
            return column_divided.get(linear.name, linear.node.inputs[1].values)

        def skip(linears) -> None:
            nonlocal skipped
            skipped += 1
            for linear in linears:
                draft.note(linear.name, "no AWQ: its input is rotated")

        def search_products(until: int) -> None:
            """The product groups (in graph order) up to index `until`, before any group reads their source."""
            nonlocal equalized, searched_products
            while searched_products < len(products) and searched_products <= until:
                group = products[searched_products]
                searched_products += 1
                if any(l.name in rotated for l in group.readers):
                    skip(group.readers)
                    continue
                choice = self._search(state, group.readers, None, np.max([state.act_max(l) for l in group.readers], axis=0),
                                      weight)
                if choice is None:
                    continue
                searched.append(choice.alpha)
                if choice.alpha == 0:
                    continue
                s = choice.scale
                source = group.source
                draft.column_scale[source.name] = s
                draft.product_folds.append((source.name, tuple(l.name for l in group.readers)))
                column_divided[source.name] = divide_columns(weight(source), s)
                draft.note(source.name, f"output columns carry 1/s of AWQ for {', '.join(l.name for l in group.readers)}")
                for linear in group.readers:
                    draft.row_scale[linear.name] = s
                    equalized += 1

        for norm in state.producers.values():
            linears = [state.linears[name] for name in norm.linears]
            last = max((i for i, g in enumerate(products) if any(g.source is l for l in linears)), default=-1)
            search_products(last)
            equalizations = {draft.equalization(l.name) for l in linears} - {"none"}
            act_max = np.max([state.act_max(l) for l in linears], axis=0)
            s = None
            if equalizations == {"lae"}:
                s = lae_scale(act_max)
            elif equalizations:
                weight_max = np.max([np.abs(weight(l)).max(axis=1) for l in linears], axis=0)
                s = smoothquant_scale(act_max, weight_max, cfg.smooth_alpha)
            if awq and any(l.name in rotated for l in linears):
                skip(linears)
            elif awq and all(l.name != head for l in linears) and not foldable(norm, outputs, cfg.compensate_residual):
                choice = self._search(state, linears, s, act_max, weight)
                if choice is not None:
                    searched.append(choice.alpha)
                    s = choice.scale if choice.alpha > 0 else s
            for linear in linears:
                column_divided.pop(linear.name, None)
            if s is None:
                continue
            for linear in linears:
                draft.row_scale[linear.name] = s
                equalized += 1
        search_products(len(products))
        stats = {"equalized": equalized, "awq_groups": len(searched), "awq_moved": sum(1 for a in searched if a > 0),
                 "awq_skipped_rotated": skipped}
        awq_note = ""
        if awq:
            awq_note = (f"; AWQ searched {len(searched)} groups, {stats['awq_moved']} with alpha > 0"
                        + (f" (mean alpha {np.mean(searched):.2f})" if searched else "")
                        + (f"; {skipped} groups reading a rotated input left without AWQ" if skipped else ""))
        return PassResult(f"equalization scales for {equalized} linears{awq_note}", stats=stats)

    @staticmethod
    def _search(state, linears: list, base: np.ndarray | None, act_max: np.ndarray, weight) -> AWQChoice | None:
        """Searches AWQ's alpha for sibling linears; notes the choice in their reasons. None: no X^T X."""
        cfg = state.config
        stats = state.stats[linears[0].activation.name]
        hessian, tokens = stats.gram, stats.tokens
        if hessian is None or tokens is None:
            return None
        static = state.draft.quantization(linears[0].name) == "static"
        choice = search_awq([weight(l) for l in linears], hessian, tokens, base, cfg.group_size,
                            cfg.symmetric, act_max if static else None)
        gain = 100 * (1 - choice.error / choice.base_error) if choice.base_error > 0 else 0.0
        for linear in linears:
            state.draft.note(linear.name, f"AWQ alpha={choice.alpha:g} (est. output error -{gain:.0f}%"
                                          f"{' incl. int8 activation noise' if static else ''})")
        return choice


def product_groups(state) -> list[ProductGroup]:
    """Linears without a normalization producer that read an elementwise product a * b, where b is
    another MatMul's output read by nothing else (SwiGLU: down_proj reads act(gate) * up), in graph order."""
    outputs = {t.name for t in state.graph.outputs}
    by_output = {l.output: l for l in state.linears.values()}
    groups: dict[str, list] = {}
    for linear in state.linears.values():
        if linear.producer is None:
            groups.setdefault(linear.activation.name, []).append(linear)
    found = []
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
        found.append(ProductGroup(tuple(linears), source))
    return found
