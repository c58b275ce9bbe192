"""Choose each linear's activation scheme from its calibrated max (FPTQ's layer-wise strategy)."""
from __future__ import annotations

from collections import Counter

from ..state import SCHEMES, State
from .find_linears import foldable


class ClassifyActivations:
    name = "classify"

    def run(self, state: State) -> str:
        cfg = state.config
        outputs = {t.name for t in state.graph.outputs}
        # Siblings read the same tensor (up to a reshape): one shared v, so one shared band.
        group_v: dict[str, float] = {}
        for linear in state.linears.values():
            group_v[linear.group] = max(group_v.get(linear.group, 0.0), float(linear.act_max.max()))
        for linear in state.linears.values():
            v = group_v[linear.group]
            blocked = foldable(linear.producer, outputs, cfg.compensate_residual) if linear.producer else \
                "input not from a normalization"
            if cfg.recipe == "rtn-w4a16":
                linear.scheme, linear.reason = "float", "rtn-w4a16 recipe: weights only, activations stay float"
            elif cfg.recipe == "dynamic-w4a8":
                linear.scheme, linear.reason = "dynamic", "dynamic-w4a8 recipe: every linear per-token dynamic"
            elif cfg.recipe in ("smoothquant-w4a8", "w8a8-smoothquant"):
                if blocked:
                    linear.scheme, linear.reason = "static", f"SmoothQuant not foldable ({blocked}): plain static"
                else:
                    linear.scheme = "smooth"
                    linear.reason = f"SmoothQuant (alpha={cfg.smooth_alpha:g}) into {linear.producer.kind} '{linear.producer.node.name}'"
            elif cfg.recipe == "naive-w4a8":
                linear.scheme, linear.reason = "static", "naive-w4a8 recipe: every linear per-tensor static"
            elif v <= cfg.static_bound:
                linear.scheme, linear.reason = "static", f"v={v:.3g} <= {cfg.static_bound:g}"
            elif v > cfg.dynamic_bound:
                linear.scheme, linear.reason = "dynamic", f"v={v:.3g} > {cfg.dynamic_bound:g}"
            elif blocked:
                linear.scheme = "dynamic"
                linear.reason = f"v={v:.3g} in LAE band but no foldable producer ({blocked}): fell back to dynamic"
            else:
                linear.scheme = "lae"
                linear.reason = f"v={v:.3g} in ({cfg.static_bound:g}, {cfg.dynamic_bound:g}]: LAE into {linear.producer.kind} '{linear.producer.node.name}'"
        counts = Counter(l.scheme for l in state.linears.values())
        return ", ".join(f"{counts.get(s, 0)} {s}" for s in SCHEMES if counts.get(s))
