"""Clipped INT4 group scales: per (group, output channel), the clipping ratio r of a grid that minimises
the output error the group's rounding causes, instead of always r = 1 (max-abs).

For a group's weights w (g rows of one output column) and a candidate r, the grid is the round-to-nearest
one of int4.quantize_groupwise with its range shrunk by r: symmetric, the extreme weight m lands on
-8 r (scale r m / -8), weights beyond the range clip to -8 or 7; asymmetric, [r lo, r hi] maps to
[0, 15]. The error of a candidate is dwᵀ H_gg dw, dw = w - dequantized(w), with H_gg the group's
block of the calibration Hessian H = XᵀX (the output error the group's rounding adds, ignoring its
interaction with the other groups), or sum_i d_i dw_i² with d = diag(H) when only the diagonal was
recorded (the cheap observer), or plain sum dw_i² without calibration data. r = 1 is on the grid,
so the chosen error is never above round-to-nearest's.
"""
from __future__ import annotations

import numpy as np

from fptq_graph.quant.int4 import MIN_SCALE, QuantizedWeight

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _blocks(w: np.ndarray, group_size: int):
    k, n = w.shape
    groups = -(-k // group_size)
    padded = np.zeros((groups * group_size, n), dtype=np.float32)
    padded[:k] = w
    valid = (np.arange(groups * group_size) < k).reshape(groups, group_size, 1)
    return padded.reshape(groups, group_size, n), valid


def _weights(hessian: np.ndarray | None, k: int, groups: int, group_size: int):
    """Per-group error weighting: [G, g, g] blocks of H, [G, g, 1] of diag(H), or None (unweighted)."""
    if hessian is None:
        return None
    h = np.asarray(hessian, dtype=np.float64)
    size = groups * group_size
    if h.ndim == 1:
        d = np.zeros(size)
        d[:k] = np.maximum(h, 0.0)
        d /= max(float(d.max()), 1e-30)            # the choice is scale free; keep float32 in range
        return d.reshape(groups, group_size, 1).astype(np.float32)
    blocks = np.zeros((groups, group_size, group_size))
    for g in range(groups):
        lo, hi = g * group_size, min((g + 1) * group_size, k)
        blocks[g, : hi - lo, : hi - lo] = h[lo:hi, lo:hi]
    return (blocks / max(float(np.abs(blocks).max()), 1e-30)).astype(np.float32)


def _error(delta: np.ndarray, weights) -> np.ndarray:
    """[G, N]: the weighted squared error of each (group, column)."""
    if weights is None:
        return np.einsum("gin,gin->gn", delta, delta)
    if weights.shape[-1] == 1:
        return np.einsum("gin,gin,gi->gn", delta, delta, weights[:, :, 0], optimize=True)
    return np.einsum("gin,gin->gn", delta, np.matmul(weights, delta))


class _Range:
    """What every ratio's grid starts from: the group's extreme (symmetric) or [lo, hi] (asymmetric)."""

    def __init__(self, blocks: np.ndarray, valid: np.ndarray, symmetric: bool):
        self.symmetric = symmetric
        if symmetric:
            extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
            self.magnitude = np.abs(extreme).astype(np.float64) / 8.0
            self.sign = np.where(extreme != 0, -np.sign(extreme), 0.0)
        else:
            self.lo = np.where(valid, blocks, np.inf).min(axis=1).clip(max=0.0).astype(np.float64)
            self.hi = np.where(valid, blocks, -np.inf).max(axis=1).clip(min=0.0).astype(np.float64)


def _grid(blocks: np.ndarray, rng: _Range, r: float):
    """(scale [G, N], zero point [G, N] or None, dequantized blocks, codes) for the range shrunk by r."""
    if rng.symmetric:
        scale = np.where(rng.sign != 0, rng.sign * np.maximum(r * rng.magnitude, MIN_SCALE), 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7)
        return scale, None, q * scale[:, None, :], q
    lo, hi = rng.lo * r, rng.hi * r
    scale = np.where(hi > lo, np.maximum((hi - lo) / 15.0, MIN_SCALE), 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]) + zero[:, None, :], 0, 15)
    return scale, zero, (q - zero[:, None, :]) * scale[:, None, :], q


def clipped_groupwise(w: np.ndarray, group_size: int, symmetric: bool = True, hessian: np.ndarray | None = None,
                      grid=CLIP_GRID) -> tuple[QuantizedWeight, np.ndarray]:
    """(the quantized weight, the chosen ratio per (group, column) [G, N])."""
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    blocks, valid = _blocks(w, group_size)
    weights = _weights(hessian, k, blocks.shape[0], group_size)
    rng = _Range(blocks, valid, symmetric)
    best_err = best_scale = best_zero = best_q = None
    ratio = np.ones(blocks.shape[::2])
    for r in grid:
        scale, zero, dq, q = _grid(blocks, rng, float(r))
        err = _error(blocks - dq, weights)   # padded rows are 0 and quantize to 0: no error
        if best_err is None:
            best_err, best_scale, best_zero, best_q = err, scale, zero, q
            ratio[:] = r
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        if zero is not None:
            best_zero = np.where(better, zero, best_zero)
        best_q = np.where(better[:, None, :], q, best_q)
        ratio = np.where(better, r, ratio)
    codes = best_q.reshape(-1, n)[:k].astype(np.int8)
    zp = None if symmetric else best_zero.astype(np.uint8)
    return QuantizedWeight.from_codes(codes, best_scale.astype(np.float32), zp, group_size), ratio


def quantize_groupwise_clipped(w: np.ndarray, group_size: int, symmetric: bool = True,
                               hessian: np.ndarray | None = None, grid=CLIP_GRID) -> QuantizedWeight:
    """Group-wise INT4 with each (group, column)'s clipping ratio searched on `grid` (see the module doc)."""
    return clipped_groupwise(w, group_size, symmetric, hessian, grid)[0]
