"""Activation-aware weight scales (AWQ, arXiv 2306.00978; SmoothQuant+), searched per sibling group on
the recorded X^T X, with no extra forward pass.

For siblings W_l [K, N] reading one input X (Hessian H = X^T X over T tokens, per-channel RMS
r_j = sqrt(H_jj / T), per-channel max m_j) and a base scale s0 (FPTQ's LAE scale, or 1), candidate scales
are s(alpha) = s0 * r^alpha (alpha on AWQ_ALPHAS; the r^alpha factor normalised to geometric mean 1),
applied as X' = X / s, W' = diag(s) W. Each candidate is scored by the group's estimated W4A8 output
error, in the units of the original product:
  weight part      sum_l tr(ΔW_lᵀ H ΔW_l),  ΔW_l = W_l - diag(1/s) Q(diag(s) W_l)  (Q: round-to-nearest INT4)
  activation part  (static int8 activations only: schemes static / lae / smooth) the int8 rounding of
                   X / s as uniform noise of step Δ = max_j(m_j / s_j) / 127, i.e. s_j Δ on channel j:
                   sum_j min(T (s_j Δ)^2 / 12, H_jj) sum_l |W_l,j|^2
alpha = 0 is s0 itself (LAE, or no scale), so the search never picks a scale it estimates worse than
FPTQ's own. How this composes with LAE: LAE fixes the static int8 range of the band 15-150; AWQ may
move it only where the activation part says the int8 noise it adds is paid back by the INT4 weights
(the equalized max is part of the objective instead of a hard budget). Per-token layers (dynamic) and
float activations are scored on the weight part alone (their int8 step follows each token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fptq_graph.quant.int4 import quantize_groupwise

AWQ_ALPHAS = tuple(i / 10 for i in range(11))
# The search scores each candidate on every (N / AWQ_COLUMNS)-th output column of each sibling: the weight
# error is a sum of independent per-column terms, so a strided subset estimates it (the fold then applies
# the chosen s to every column). 128 keeps SmolLM2's search to seconds (its full 576..1536 columns: minutes).
AWQ_COLUMNS = 128


@dataclass
class AWQChoice:
    scale: np.ndarray        # s = s0 * factor [K], float32
    alpha: float
    error: float             # estimated output error at the chosen alpha
    base_error: float        # ... at alpha = 0 (s0 alone)


def awq_factor(hessian_diag: np.ndarray, tokens: float, alpha: float) -> np.ndarray:
    r = np.sqrt(np.maximum(np.asarray(hessian_diag, np.float64), 0.0) / max(tokens, 1.0))
    live = r > 0
    f = np.ones_like(r)
    if alpha == 0 or not live.any():
        return f
    f[live] = r[live] ** alpha
    f[live] /= np.exp(np.mean(np.log(f[live])))   # geometric mean 1: the product is unchanged anyway
    return f


class _Siblings:
    """What every candidate alpha's score shares, made once per search (it was made per alpha: a
    float32 copy of H and float64 copies of each whole weight, 11 times; 7B down_proj: 0.45 GiB and
    0.34 GiB each): H in float32, the scored columns in float64, sum_l |W_l,j|^2, diag(H).
    Resident while the search runs: that float32 H and the scored columns."""

    def __init__(self, weights: list[np.ndarray], hessian: np.ndarray, columns: int | None, need_w2: bool):
        self.h32 = hessian.astype(np.float32)
        self.diag = np.maximum(np.diag(hessian), 0.0)
        self.subs, self.factors = [], []
        self.w2 = np.zeros(hessian.shape[0])
        for w in weights:
            stride = max(1, -(-w.shape[1] // columns)) if columns else 1
            self.subs.append(np.asarray(w[:, ::stride], np.float64))
            self.factors.append(w.shape[1] / self.subs[-1].shape[1])
            if need_w2:
                for r0 in range(0, w.shape[0], 256):    # rows a slice at a time: no float64 copy of W
                    rows = np.asarray(w[r0:r0 + 256], np.float64)
                    self.w2[r0:r0 + 256] += np.sum(rows * rows, axis=1)

    def error(self, s: np.ndarray, group_size: int, symmetric: bool, act_max: np.ndarray | None,
              tokens: float) -> float:
        s = s.astype(np.float64)
        total = 0.0
        for sub, factor in zip(self.subs, self.factors):
            scaled = (sub * s[:, None]).astype(np.float32)
            delta = (sub - quantize_groupwise(scaled, group_size, symmetric).dequantize().astype(np.float64) / s[:, None])
            delta = delta.astype(np.float32)
            total += float(np.einsum("kn,kn->", delta, self.h32 @ delta, dtype=np.float64)) * factor
        if act_max is not None:
            step = float((act_max / s).max()) / 127.0
            total += float(np.sum(np.minimum(tokens * (s * step) ** 2 / 12.0, self.diag) * self.w2))
        return total


def search_awq(weights: list[np.ndarray], hessian: np.ndarray, tokens: float, base: np.ndarray | None,
               group_size: int, symmetric: bool, act_max: np.ndarray | None, alphas=AWQ_ALPHAS,
               columns: int | None = AWQ_COLUMNS) -> AWQChoice:
    """The alpha (and scale) of least estimated error; act_max given for static int8 activations."""
    k = hessian.shape[0]
    s0 = np.ones(k) if base is None else np.asarray(base, np.float64)
    diag = np.diag(hessian)
    best = None
    base_error = None
    siblings = _Siblings(weights, hessian, columns, act_max is not None)
    for alpha in alphas:
        s = (s0 * awq_factor(diag, tokens, alpha)).astype(np.float32)
        err = siblings.error(s, group_size, symmetric, None if act_max is None else np.asarray(act_max, np.float64),
                             tokens)
        if alpha == 0:
            base_error = err
        if best is None or err < best.error:
            best = AWQChoice(scale=s, alpha=float(alpha), error=err, base_error=err)
    best.base_error = base_error if base_error is not None else best.error
    return best
