"""GPTQ (Frantar et al., arXiv 2210.17323) for group-wise INT4 weights laid out [K, N].

Input channels (rows of W) are quantized in order; each row's rounding error is pushed onto the rows
not yet quantized through the inverse calibration Hessian H = X^T X, so that X W stays as close as
it can to the float product. A group's scale (and zero point) is taken from the group's rows as they
stand when the group starts, i.e. after the error of the groups before it has been absorbed.
Updates are applied lazily in blocks of rows, the usual way to keep the work in matrix products.

Options:
- clip: each group's scale by the clipping search of weight_clipping.py (the ratio on CLIP_GRID that
  minimises the group's diag(H)-weighted error, on the rows as they stand when the group starts)
  instead of max-abs.
- act_order: rows are quantized in order of decreasing diag(H) (the channels with the most input
  energy first, while the most rows remain to absorb their error). Groups stay runs of consecutive
  rows (what DequantizeLinear's blocked form and MatMulNBits store), so every group's scale is fixed
  before the feedback starts, from the weights as given ("static groups").
"""
from __future__ import annotations

import numpy as np

from fptq_graph.quant.int4 import QuantizedWeight, quantize_groupwise
from fptq_graph.quant.clipping import quantize_groupwise_clipped


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, group_size: int, symmetric: bool = True,
                  damp: float = 0.01, block: int = 128, clip: bool = False, act_order: bool = False,
                  overwrite_hessian: bool = False) -> QuantizedWeight:
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian of shape {hessian.shape} does not match a weight with K={k}")
    W = np.array(w, dtype=np.float64)          # one copy each (astype().copy() made two: 2 x K^2 float64 at once)
    # overwrite_hessian: the caller's float64 array is a temporary (an equalized copy): work in it
    H = hessian if overwrite_hessian and hessian.dtype == np.float64 else np.array(hessian, dtype=np.float64)
    dead = np.diag(H) <= 0              # channels calibration never saw non-zero: nothing to preserve
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    raw_diag = np.diag(H).copy()         # what the clipping search weighs each row's error with

    def fit(rows: np.ndarray, lo: int) -> QuantizedWeight:
        if clip:
            return quantize_groupwise_clipped(rows, group_size, symmetric, raw_diag[lo:lo + len(rows)])
        return quantize_groupwise(rows, group_size, symmetric)

    groups = -(-k // group_size)
    scale = np.zeros((groups, n), dtype=np.float32)
    zero = None if symmetric else np.zeros((groups, n), dtype=np.uint8)
    perm = np.arange(k)
    if act_order:
        for g in range(groups):
            fitted = fit(W[g * group_size:(g + 1) * group_size], g * group_size)
            scale[g] = fitted.scale[0]
            if zero is not None:
                zero[g] = fitted.zero_point[0]
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[perm], H[perm][:, perm]
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    # Upper Cholesky factor of H^-1: row i holds what the error of row i does to rows i+1..K.
    inverse = np.linalg.inv(H)
    del H                                # at most two [K, K] float64 arrays at once (7B down_proj: 0.9 GiB each)
    U = np.linalg.cholesky(inverse).T
    del inverse
    lo, hi = (-8, 7) if symmetric else (0, 15)
    q = np.zeros((k, n), dtype=np.int8)
    step = max(group_size, block - block % group_size)   # blocks hold whole groups
    for b0 in range(0, k, step):
        b1 = min(b0 + step, k)
        err = np.zeros((b1 - b0, n))
        for i in range(b0, b1):
            row = perm[i]
            g = row // group_size
            if not act_order and i % group_size == 0:
                fitted = fit(W[i:min(i + group_size, k)], i)
                scale[g] = fitted.scale[0]
                if zero is not None:
                    zero[g] = fitted.zero_point[0]
            zp = 0.0 if zero is None else zero[g].astype(np.float64)
            qi = np.clip(np.round(W[i] / scale[g]) + zp, lo, hi)
            q[row] = qi
            e = (W[i] - (qi - zp) * scale[g]) / U[i, i]
            W[i + 1:b1] -= np.outer(U[i, i + 1:b1], e)
            err[i - b0] = e
        W[b1:] -= U[b0:b1, b1:].T @ err
    return QuantizedWeight.from_codes(q, scale, zero, group_size)
