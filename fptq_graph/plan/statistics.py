"""Calibration statistics of each linear's input, typed, and how the weight quantizers and classifiers
read them.

calibrate.py fills one ActivationStats per observed activation, summing each recorded field over the
batches in float64 (the maxima as a running max):
  max          max_j |x_tj| per channel [K]
  gram         X^T X [K, K] (GPTQ, AWQ)
  diag         sum_t x_tj^2 [K], the diagonal of X^T X when the whole is not recorded (clipping search,
               measured classifier)
  rows         the number of token rows T seen
  token_max    sum_t max_j x_tj^2 (the per-token int8 step's energy: measured classifier)
  inv_norm     sum_t 1 / |x_t|^2 (static noise relative to each token: measured classifier)
  max_ratio    sum_t max_j x_tj^2 / |x_t|^2 (per-token noise relative to each token)
  count_above, inv_above   per edge of NORM_EDGES: tokens with |x_t|^2 above it, and their sum of
               1 / |x_t|^2 (to cap each token's relative static noise at 1)
Which are recorded is recipes.observers_needed's answer for the run's recipe row.

Resident: per activation K floats for the maxima and, when recorded, K^2 float64 for X^T X.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

NORM_EDGES = tuple(2.0 ** e for e in range(-30, 31))
# The summed fields, in the order calibration fetches them.
SUMMED = ("gram", "diag", "rows", "token_max", "inv_norm", "max_ratio", "count_above", "inv_above")


@dataclass
class ActivationStats:
    max: np.ndarray | None = None
    gram: np.ndarray | None = None
    diag: np.ndarray | None = None
    rows: np.ndarray | None = None
    token_max: np.ndarray | None = None
    inv_norm: np.ndarray | None = None
    max_ratio: np.ndarray | None = None
    count_above: np.ndarray | None = None
    inv_above: np.ndarray | None = None

    def add(self, field_name: str, value: np.ndarray) -> None:
        """Sums one batch's value of a SUMMED field (float64)."""
        current = getattr(self, field_name)
        if current is None:
            setattr(self, field_name, np.array(value, dtype=np.float64))
        else:   # in place: a [K, K] float64 temporary per batch doubled X^T X's memory
            current += np.asarray(value)

    def scalar(self, field_name: str) -> float | None:
        value = getattr(self, field_name)
        return None if value is None else float(np.asarray(value).reshape(-1)[0])

    @property
    def tokens(self) -> float | None:
        return self.scalar("rows")

    def recorded(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def capped_relative_noise(stats: ActivationStats, a: float) -> float | None:
    """E_t[min(1, a / |x_t|^2)] from the recorded |x_t|^2 histogram (the edge nearest a in log scale)."""
    if stats.count_above is None or stats.inv_above is None or stats.rows is None:
        return None
    t = stats.tokens
    b = int(np.argmin(np.abs(np.log2(NORM_EDGES) - np.log2(max(a, 1e-300)))))
    below = t - float(stats.count_above[b])
    return (below + a * float(stats.inv_above[b])) / max(t, 1.0)


def raw_hessian(stats: ActivationStats) -> np.ndarray | None:
    """X^T X [K, K] if recorded, else its diagonal [K] if recorded, else None."""
    return stats.gram if stats.gram is not None else stats.diag


def hessian_diag(stats: ActivationStats) -> np.ndarray | None:
    h = raw_hessian(stats)
    if h is None:
        return None
    return np.diag(h).copy() if h.ndim == 2 else np.asarray(h, np.float64)


def equalized(h: np.ndarray | None, s: np.ndarray | None, in_place: bool = False) -> np.ndarray | None:
    """The Hessian of X / s: H / (s s^T) (its diagonal / s^2). in_place: the caller is done with h
    (its last reader), so it is divided where it lies, a slice of rows at a time: no second [K, K]
    array (7B down_proj: 0.9 GiB), the same float64 quotients."""
    if h is None or s is None:
        return h
    s = s.astype(np.float64)
    if h.ndim == 1:
        return h / (s * s)
    if in_place and h.dtype == np.float64 and h.flags.writeable:
        for r0 in range(0, len(s), 256):
            h[r0:r0 + 256] /= np.outer(s[r0:r0 + 256], s)
        return h
    out = np.outer(s, s)   # divided in place: one [K, K] float64 array, not two (7B down_proj: 0.9 GiB each)
    return np.divide(h, out, out=out)
