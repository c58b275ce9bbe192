"""Equalization scales and the weight arithmetic that folds them (shared by the analysis that chooses a
scale and the rewrite that folds it, so both see the same bytes).

- LAE (FPTQ):   s_j = m_j / log2(2 + m_j); it looks only at activations and shrinks the range to
                max_j log2(2 + m_j).
- SmoothQuant:  s_j = m_j^a / w_j^(1-a), w_j = max|W_j| over the row j of every sibling weight.
A scale s [K] is folded as X / s and diag(s) W; AWQ's 1/s for a SwiGLU product goes into the columns
of the linear producing the product's `up` factor (W diag(1/s)).
"""
from __future__ import annotations

import numpy as np


def lae_scale(act_max: np.ndarray) -> np.ndarray:
    m = act_max.astype(np.float64)
    return np.where(m > 0, m / np.log2(2.0 + m), 1.0).astype(np.float32)


def smoothquant_scale(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    m, w = act_max.astype(np.float64), weight_max.astype(np.float64)
    ok = (m > 0) & (w > 0)
    s = np.where(ok, np.power(np.where(ok, m, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1.0 - alpha), 1.0)
    return np.clip(s, 1e-5, None).astype(np.float32)


def scale_rows(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """diag(s) W in float64, back in the weight's type."""
    return (weight.astype(np.float64) * s[:, None].astype(np.float64)).astype(weight.dtype)


def divide_columns(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W diag(1/s) in float64, back in the weight's type."""
    return (weight.astype(np.float64) / s[None, :].astype(np.float64)).astype(weight.dtype)
