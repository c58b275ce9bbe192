"""GPTQ (Frantar et al., arXiv 2210.17323) for group-wise INT4 weights laid out [K, N].

Input channels (rows of W) are quantized in order; each row's rounding error is pushed onto the rows
not yet quantized through the inverse calibration Hessian H = X^T X, so that X W stays as close as
it can to the float product. A group's scale (and zero point) is taken from the group's rows as they
stand when the group starts, i.e. after the error of the groups before it has been absorbed.
Updates are applied lazily in blocks of rows, the usual way to keep the work in matrix products.

The feedback is computed from the factor H = R D R^T (unit_upper_factor, made in H's own memory), not
from H^-1 and its Cholesky factor as the paper writes it: the same algorithm (tests hold it to the
paper's one-row-at-a-time form), no inverse, one [K, K] array instead of three (7B down_proj, K = 11008
on this project's 2-core machine: 25 s instead of 71 s, 0.6 GiB above H instead of 3.0 GiB).
Resident: H (overwritten by R), W in float64, the codes; temporaries of one block of rows.

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
    """The weight of gptq() alone."""
    return gptq(w, hessian, group_size, symmetric, damp, block, clip, act_order, overwrite_hessian)[0]


def gptq(w: np.ndarray, hessian: np.ndarray, group_size: int, symmetric: bool = True, damp: float = 0.01,
         block: int = 128, clip: bool = False, act_order: bool = False,
         overwrite_hessian: bool = False) -> tuple[QuantizedWeight, str]:
    """GPTQ of w [K, N] with X^T X `hessian` [K, K]; returns the weight and a note on what was not plain
    GPTQ ("" when nothing). Raises HessianUnusable when X^T X cannot drive it (the caller falls back)."""
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian of shape {hessian.shape} does not match a weight with K={k}")
    W = np.array(w, dtype=np.float64)          # one copy each (astype().copy() made two: 2 x K^2 float64 at once)
    # overwrite_hessian: the caller's float64 array is a temporary (an equalized copy): work in it
    H = hessian if overwrite_hessian and hessian.dtype == np.float64 else np.array(hessian, dtype=np.float64)
    # Channels calibration never saw non-zero: their error is invisible to X W, so they get no feedback
    # (their rows and columns of H are zero) and are rounded to nearest, not zeroed as the paper's code
    # does: a channel that calibration did not excite may well be excited in use.
    if not np.isfinite(H.sum()):   # a NaN or Inf anywhere shows in the sum (no [K, K] temporary)
        raise HessianUnusable("X^T X holds NaN or Inf")
    dead = np.diag(H) <= 0
    live = ~dead
    if not live.any():
        raise HessianUnusable("X^T X is zero: calibration never excited this input")
    H[dead, dead] = 1.0
    raw_diag = np.diag(H).copy()         # what the clipping search weighs each row's error with
    # damping relative to the excited channels' energy (the dead ones' stand-in 1.0 would set its scale)
    damping = damp * float(np.mean(raw_diag[live]))

    def fit(rows: np.ndarray, lo: int) -> QuantizedWeight:
        if clip:
            return quantize_groupwise_clipped(rows, group_size, symmetric, raw_diag[lo:lo + len(rows)])
        return quantize_groupwise(rows, group_size, symmetric)

    groups = -(-k // group_size)
    scale = np.zeros((groups, n), dtype=np.float32)
    zero = None if symmetric else np.zeros((groups, n), dtype=np.uint8)
    perm = np.arange(k)
    notes = []
    if dead.any():
        notes.append(f"{int(dead.sum())} of {k} input channels never excited in calibration: rounded to nearest")
    if act_order:
        static = []
        for g in range(groups):
            fitted = fit(W[g * group_size:(g + 1) * group_size], g * group_size)
            scale[g] = fitted.scale[0]
            if zero is not None:
                zero[g] = fitted.zero_point[0]
            static.append(fitted)
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[perm], H[perm][:, perm]
    H[np.diag_indices(k)] += damping
    # GPTQ's feedback needs only the unit upper factor of H = R D R^T, made in H's own memory (see
    # unit_upper_factor): no inverse Hessian, no second [K, K] array (7B down_proj: 0.9 GiB each).
    try:
        R = unit_upper_factor(H)
    except np.linalg.LinAlgError:
        raise HessianUnusable(f"X^T X is not positive definite even with damping {damp:g} x its mean diagonal") from None
    del H
    lo, hi = (-8, 7) if symmetric else (0, 15)
    q = np.zeros((k, n), dtype=np.int8)
    step = max(group_size, block - block % group_size)   # blocks hold whole groups
    for b0 in range(0, k, step):
        b1 = min(b0 + step, k)
        rows = perm[b0:b1]
        original = np.array(w[rows], dtype=np.float64)   # the rows as given, in this order
        miss = np.empty((b1 - b0, n))                      # original row - its dequantized codes
        for i in range(b0, b1):
            row = perm[i]
            g = row // group_size
            if not act_order and i % group_size == 0:
                fitted = fit(rows_at_group_start(W, original, R, i, min(i + group_size, k), b0), i)
                scale[g] = fitted.scale[0]
                if zero is not None:
                    zero[g] = fitted.zero_point[0]
            zp = 0.0 if zero is None else zero[g].astype(np.float64)
            qi = np.clip(np.round(W[i] / scale[g]) + zp, lo, hi)
            q[row] = qi
            miss[i - b0] = original[i - b0] - (qi - zp) * scale[g]
            W[i + 1:b1] += np.outer(R[i, i + 1:b1], miss[i - b0])
        for r0 in range(b1, k, UPDATE_ROWS):             # the rows after the block, a slice at a time
            r1 = min(r0 + UPDATE_ROWS, k)
            W[r0:r1] += R[b0:b1, r0:r1].T @ miss
    result = QuantizedWeight.from_codes(q, scale, zero, group_size)
    if act_order:
        # Act order fixes every group's scale from the weights as given, before the feedback moves them;
        # where the feedback then runs past those ranges (an ill-conditioned X^T X), the codes clip and
        # GPTQ can do worse than the static groups rounded to nearest. Keep whichever has the lower
        # calibration error tr(E^T H E) (the original H: the permuted copy and R are gone by now).
        rounded = QuantizedWeight.from_codes(np.concatenate([f.q for f in static]), scale, zero, group_size)
        gptq_error, rtn_error = (calibration_error(w, candidate, hessian, dead) for candidate in (result, rounded))
        if rtn_error < gptq_error:
            notes.append(f"act order's GPTQ worse than its static groups rounded to nearest on calibration "
                         f"({gptq_error:.3g} > {rtn_error:.3g}): rounded kept")
            result = rounded
    return result, "; ".join(notes)


def calibration_error(w: np.ndarray, approx: QuantizedWeight, hessian: np.ndarray, dead: np.ndarray) -> float:
    """tr(E^T H E) = ||X E||^2 over the calibration tokens, E = w - approx (dead channels left out: their
    rows of H are zero; only their diagonal was set to 1)."""
    error = np.asarray(w, dtype=np.float64) - approx.dequantize()
    error[dead] = 0.0
    return float(np.einsum("kn,kn->", error, hessian @ error))


class HessianUnusable(ValueError):
    """X^T X cannot drive GPTQ for this weight (no channel excited, not positive definite after damping):
    the caller quantizes the weight another way and says why."""


def rows_at_group_start(W: np.ndarray, original: np.ndarray, R: np.ndarray, lo: int, hi: int, b0: int) -> np.ndarray:
    """Rows lo..hi as the paper's GPTQ holds them when their group starts: the original rows plus the
    optimal compensation for the errors of rows 0..lo-1 alone, which its scale is fitted on.

    W[j] here is w_j + sum_{i<lo} R_ij (w_i - q_i), the full feedback's partial sum: right for row j
    once every row before j is quantized, not for the rows of a group still waiting. The compensation
    the paper's updates leave there is -H_FF^-1 H_FP (q_P - w_P) for the done rows P and free rows F;
    with H = L L^T (L upper) that is L_FF^-T L_PF^T (w_P - q_P), whose first rows need only the group's
    own triangle: solve R_gg^T y = W_g - w_g."""
    start = original[lo - b0:hi - b0]
    return start + np.linalg.solve(np.triu(R[lo:hi, lo:hi]).T, W[lo:hi] - start)


UPDATE_ROWS = 512      # rows of W updated per product after a block: a [512, N] float64 temporary, not [K, N]
FACTOR_BLOCK = 256     # the blocked factorization's panel width (256: 8.5 s for K = 11008 here, numpy's Cholesky 9.7 s)


def unit_upper_factor(h: np.ndarray) -> np.ndarray:
    """Overwrite h's upper triangle with the unit upper triangular R of h = R D R^T (D diagonal,
    positive) and return h; its strict lower triangle is left holding scratch values.

    Why this factor: the paper's GPTQ pushes row i's error e_i = (w_i - q_i) / U_ii onto the later rows
    through U = chol(H^-1)^T. With H = L L^T taken from the bottom right corner (L upper, the Cholesky
    factor of H with rows and columns reversed), U = L^-1, and then the feedback of all earlier rows
    onto row j, once unrolled, is  w~_j = w_j + sum_{i<j} (L_ij / L_jj) (w_i - q_i), with w the original
    rows and q their dequantized codes. R = L diag(L)^-1 is that matrix of ratios. Same algorithm, no
    inverse: 1/7 of the float operations of inv + Cholesky (7B down_proj: 9 s instead of 59 s here).

    Blocked from the last FACTOR_BLOCK columns backwards, in place: each diagonal block by numpy's
    Cholesky (reversed), the panel above it by a triangular solve, then the remaining top-left
    corner's upper triangle lowered by the panel's outer product, a slice of rows at a time.
    Raises numpy.linalg.LinAlgError when h is not positive definite."""
    k = h.shape[0]
    for c1 in range(k, 0, -FACTOR_BLOCK):
        c0 = max(0, c1 - FACTOR_BLOCK)
        corner = np.triu(h[c0:c1, c0:c1])
        corner += np.triu(corner, 1).T                  # only the upper triangle is current
        tail = np.linalg.cholesky(corner[::-1, ::-1])[::-1, ::-1]   # upper: tail tail^T = corner
        h[c0:c1, c0:c1] = tail
        if c0 == 0:
            break
        panel = np.linalg.solve(tail, h[:c0, c0:c1].T).T   # panel tail^T = the block above
        h[:c0, c0:c1] = panel
        for r0 in range(0, c0, FACTOR_BLOCK):
            r1 = min(r0 + FACTOR_BLOCK, c0)
            h[r0:r1, r0:c0] -= panel[r0:r1] @ panel[r0:c0].T
    h /= np.diag(h).copy()                                 # columns scaled: unit diagonal
    return h
