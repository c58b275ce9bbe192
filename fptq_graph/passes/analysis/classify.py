"""Choose each linear's activation scheme by the recipe's classifier (recipes.py; FPTQ's layer-wise
strategy is the "bands" classifier). A classifier is a function in CLASSIFIERS; a recipe row names one.

The "measured" classifier estimates, per sibling group (the linears reading one tensor), the output
SQNR each scheme gives on the calibration data, without another forward pass, as the mean over tokens
of each token's noise relative to its own output: a total-energy SQNR is dominated by the few tokens
with massive activations, for which a static scale is fine, and hides what it costs every other token.
With d_j = sum_t x_tj^2 (the diagonal of X^T X), T tokens, w2_j = sum_n W_jn^2 over the siblings and
ΔW the INT4 rounding error (round to nearest):
  signal of token t   c |x_t|^2, c = sum_j d_j w2_j / sum_j d_j (the product's mean gain)
  weight noise        relative, sum_j d_j |ΔW_j|^2 / sum_j d_j w2_j (the same share on every token)
  activation noise    int8 rounding as uniform noise of step Δ: Δ^2 / 12 sum_j w2_j on token t, with
    static            Δ = v / 127: relative, capped at 1 per token (a step can at most round a token
                      to zero), averaged over tokens via a recorded histogram of |x_t|^2
    per token         Δ_t = max_j |x_tj| / 127: via sum_t max_j x_tj^2 / |x_t|^2 (recorded)
    LAE               Δ = max_j(m_j / s_j) / 127 on X / s (s_j^2 w2_j per channel), and ΔW of diag(s) W
and the estimate -10 log10(relative weight noise + relative activation noise). With `best` the highest
of the three (LAE only where a producer takes it), it picks static when its estimate is within
Config.measured_tolerance_db of best (the cheapest scheme at run time), else LAE when that is, else
per token; the reason states the three estimates. (LAE's can beat per-token's: diag(s) W also changes
the INT4 rounding.) measured_sqnr(per_token=False) gives the total-energy version.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.analysis.find_linears import foldable
from fptq_graph.plan.plan import SCHEMES
from fptq_graph.plan.statistics import capped_relative_noise, hessian_diag
from fptq_graph.quant.equalization import lae_scale
from fptq_graph.quant.int4 import quantize_groupwise


class ClassifyActivations(Pass):
    name = "classify"
    kind = "analysis"
    requires = frozenset({"statistics", "statistics_plan"})
    ensures = frozenset({"activation_specs"})

    def run(self, state) -> PassResult:
        cfg = state.config
        row = state.recipe
        classify = CLASSIFIERS[row.classifier]
        outputs = {t.name for t in state.graph.outputs}
        # Siblings read the same tensor (up to a reshape): one shared v, so one shared band.
        group_v: dict[str, float] = {}
        for linear in state.linears.values():
            group_v[linear.sibling_tensor] = max(group_v.get(linear.sibling_tensor, 0.0), float(state.act_max(linear).max()))
        memo: dict[str, tuple[str, str]] = {}
        for linear in state.linears.values():
            blocked = foldable(linear.producer, outputs, cfg.compensate_residual) if linear.producer else \
                "input not from a normalization"
            if group_v[linear.sibling_tensor] == 0.0:
                # No static scale can come from an input that was zero throughout calibration (its step
                # would be the floor, and the first real input saturates): scales per token, at run time.
                scheme, reason = "dynamic", "v=0: calibration never saw this input non-zero; per-token scales at run time"
            else:
                scheme, reason = classify(state, linear, group_v[linear.sibling_tensor], blocked, memo)
            state.draft.set_activation(linear.name, scheme, reason)
        counts = Counter(state.draft.scheme(name) for name in state.linears)
        return PassResult(", ".join(f"{counts.get(s, 0)} {s}" for s in SCHEMES if counts.get(s)),
                          stats={s: counts.get(s, 0) for s in SCHEMES})


# A classifier: (state, linear, the sibling group's v, why its producer cannot take a fold or "", a
# per-run memo) -> (scheme, reason). The recipe row's `classifier` names one (recipes.CLASSIFIERS).

def _float(state, linear, v, blocked, memo):
    return "float", f"{state.recipe.name} recipe: weights only, activations stay float"


def _dynamic(state, linear, v, blocked, memo):
    return "dynamic", f"{state.recipe.name} recipe: every linear per-token dynamic"


def _static(state, linear, v, blocked, memo):
    return "static", f"{state.recipe.name} recipe: every linear per-tensor static"


def _smooth(state, linear, v, blocked, memo):
    if blocked:
        return "static", f"SmoothQuant not foldable ({blocked}): plain static"
    return "smooth", f"SmoothQuant (alpha={state.config.smooth_alpha:g}) into {linear.producer.kind} '{linear.producer.node.name}'"


def _bands(state, linear, v, blocked, memo):
    cfg = state.config
    if v <= cfg.static_bound:
        return "static", f"v={v:.3g} <= {cfg.static_bound:g}"
    if v > cfg.dynamic_bound:
        return "dynamic", f"v={v:.3g} > {cfg.dynamic_bound:g}"
    if blocked:
        return "dynamic", f"v={v:.3g} in LAE band but no foldable producer ({blocked}): fell back to dynamic"
    return "lae", (f"v={v:.3g} in ({cfg.static_bound:g}, {cfg.dynamic_bound:g}]: LAE into {linear.producer.kind} "
                   f"'{linear.producer.node.name}'")


def _measured(state, linear, v, blocked, memo):
    group = linear.sibling_tensor
    if group not in memo:
        tolerance = state.config.measured_tolerance_db
        first = state.siblings(group)[0]
        estimates = measured_sqnr(state, group)
        static, token, lae = estimates["static"], estimates["dynamic"], estimates["lae"]
        text = f"est. token-mean output SQNR static {static:.1f} dB, LAE {lae:.1f}, per token {token:.1f} (tolerance {tolerance:g} dB)"
        best = max(static, token, lae if not blocked else -np.inf)
        if static >= best - tolerance:
            memo[group] = "static", f"measured: {text}: static"
        elif not blocked and lae >= best - tolerance:
            memo[group] = "lae", f"measured: {text}: LAE into {first.producer.kind} '{first.producer.node.name}'"
        else:
            why = "" if not blocked else f"; LAE not foldable ({blocked})"
            memo[group] = "dynamic", f"measured: {text}: per token{why}"
    return memo[group]


CLASSIFIERS = {"bands": _bands, "measured": _measured, "static": _static, "smooth": _smooth, "dynamic": _dynamic,
               "float": _float}


def measured_sqnr(state, group: str, per_token: bool = True) -> dict[str, float]:
    """Estimated output SQNR (dB) of the sibling group under static, per-token and LAE activations: the
    token mean of each token's noise over its own signal (per_token, what the classifier decides on), or
    the total noise over the total signal."""
    cfg = state.config
    siblings = state.siblings(group)
    activation = siblings[0].activation.name
    stats = state.stats[activation]
    m = np.max([state.act_max(l) for l in siblings], axis=0).astype(np.float64)
    d = hessian_diag(stats)
    tokens = stats.tokens
    energy, inv_norm, max_ratio = (stats.scalar(key) for key in ("token_max", "inv_norm", "max_ratio"))
    if d is None or tokens is None or energy is None:
        raise ValueError(f"the measured classifier needs diag(X^T X), the token count and the per-token maxima of '{activation}'")
    d = np.maximum(d, 0.0)
    weights = [np.asarray(l.node.inputs[1].values, np.float64) for l in siblings]
    w2 = sum(np.sum(w * w, axis=1) for w in weights)

    def weight_noise(s: np.ndarray | None) -> float:
        total = 0.0
        for w in weights:
            scaled = w if s is None else w * s[:, None]
            err = scaled - quantize_groupwise(scaled, cfg.group_size, cfg.symmetric).dequantize()
            if s is not None:
                err = err / s[:, None]
            total += float(np.sum(d * np.sum(err * err, axis=1)))
        return total

    signal = float(np.sum(d * w2))
    v = float(m.max())
    s = lae_scale(m).astype(np.float64)
    v_lae = float((m / s).max())
    if not per_token:
        def act_noise(step2: float, per_channel: np.ndarray | None = None) -> float:
            scale2 = np.ones_like(d) if per_channel is None else per_channel ** 2
            return float(np.sum(np.minimum(tokens * step2 * scale2 / 12.0, d) * w2))

        noise = {"static": act_noise((v / 127) ** 2), "dynamic": act_noise(energy / tokens / 127 ** 2),
                 "lae": act_noise((v_lae / 127) ** 2, s)}
        nw = {"static": weight_noise(None), "lae": weight_noise(s)}
        nw["dynamic"] = nw["static"]
        return {k: _db(signal / (nw[k] + noise[k])) for k in noise}
    # Token t's signal taken as c |x_t|^2 with c = S / sum_j d_j (the product's mean gain); its activation
    # noise is step_t^2 / 12 sum_j w2_j (s_j^2 w2_j under LAE): relative noise averaged over tokens.
    gain = signal / max(float(np.sum(d)), 1e-300)
    w2_sum = float(np.sum(w2))
    # A static step can at most round a whole token to zero: each token's relative noise is capped at 1.
    a_static = (v / 127) ** 2 / 12 * w2_sum / gain
    a_lae = (v_lae / 127) ** 2 / 12 * float(np.sum(s * s * w2)) / gain
    rel = {"static": capped_relative_noise(stats, a_static),
           "dynamic": w2_sum / (12 * 127 ** 2) / gain * max_ratio / tokens,
           "lae": capped_relative_noise(stats, a_lae)}
    rw = weight_noise(None) / signal if signal > 0 else 0.0
    rw_lae = weight_noise(s) / signal if signal > 0 else 0.0
    return {"static": _db(1 / (rw + rel["static"])), "dynamic": _db(1 / (rw + rel["dynamic"])),
            "lae": _db(1 / (rw_lae + rel["lae"]))}


def _db(ratio: float) -> float:
    return 10 * np.log10(ratio) if np.isfinite(ratio) and ratio > 0 else float("inf")
