"""The clipping search and GPTQ's options (clipped scales, act order) against textbook float64 references."""
import numpy as np
import pytest

import crafted as C
from fptq_graph.quant.gptq import gptq_quantize
from fptq_graph.quant.int4 import quantize_groupwise
from fptq_graph.quant.clipping import CLIP_GRID, clipped_groupwise, quantize_groupwise_clipped
from test_weight_quantizers import correlated_inputs, textbook_gptq

RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def ref_quant_column(w, r, symmetric):
    """One group of one column on the grid shrunk by r, float64, as docs/FPTQ.md section 4 states it."""
    if symmetric:
        m = w[np.argmax(np.abs(w))]
        scale = r * m / -8.0 if m != 0 else 1.0
        return np.clip(np.round(w / scale), -8, 7) * scale
    lo, hi = min(w.min(), 0.0) * r, max(w.max(), 0.0) * r
    scale = (hi - lo) / 15.0 if hi > lo else 1.0
    zp = np.clip(np.round(-lo / scale), 0, 15)
    return (np.clip(np.round(w / scale) + zp, 0, 15) - zp) * scale


def ref_clip(w, group, d, symmetric=True):
    """Brute force: every group of every column, every ratio; keep the least sum_i d_i (w_i - q_i)^2."""
    w = np.asarray(w, np.float64)
    out = np.empty_like(w)
    for start in range(0, w.shape[0], group):
        rows = slice(start, start + group)
        for j in range(w.shape[1]):
            best = None
            for r in RATIOS:
                q = ref_quant_column(w[rows, j], r, symmetric)
                err = float(np.sum(d[rows] * (w[rows, j] - q) ** 2))
                if best is None or err < best[0] - 1e-12 * abs(best[0]):
                    best = (err, q)
            out[rows, j] = best[1]
    return out


def weighted_error(w, dq, d):
    return float(np.sum(d[:, None] * (np.asarray(w, np.float64) - dq) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,group", [(96, 32), (100, 32)])
def test_clip_search_equals_brute_force(symmetric, k, group):
    assert tuple(CLIP_GRID) == RATIOS
    rng = np.random.default_rng(k + symmetric)
    w = (rng.standard_t(3, (k, 20)) * 0.1).astype(np.float32)       # heavy tails: clipping pays
    d = rng.random(k) ** 2 * 10
    ours = quantize_groupwise_clipped(w, group, symmetric, d).dequantize().astype(np.float64)
    ref = ref_clip(w, group, d, symmetric)
    # the same choice in (nearly) every group; where float32 ties differ, the same error
    same = np.isclose(ours, ref, rtol=1e-5, atol=1e-7).all(axis=0).mean()
    assert same >= 0.95, same
    assert weighted_error(w, ours, d) <= weighted_error(w, ref, d) * (1 + 1e-5)
    # and it is a real search: below round-to-nearest (ratio 1 only)
    rtn = quantize_groupwise(w, group, symmetric).dequantize()
    assert weighted_error(w, ours, d) < 0.97 * weighted_error(w, rtn, d)


def test_clip_ratios_and_codes():
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, (64, 16)) * 0.1).astype(np.float32)
    qw, ratio = clipped_groupwise(w, 32, True, np.ones(64))
    assert ratio.shape == (2, 16) and set(np.unique(ratio)) <= set(RATIOS) and (ratio < 1).any()
    assert qw.q.min() >= -8 and qw.q.max() <= 7
    # full-Hessian blocks weigh errors too (the GPTQ-free option), and unweighted works without data
    x = correlated_inputs(rng, 256, 64)
    assert quantize_groupwise_clipped(w, 32, True, x.T @ x).dequantize().shape == (64, 16)
    assert quantize_groupwise_clipped(w, 32, False, None).zero_point.shape == (2, 16)


def textbook_gptq_ext(w, h, group, clip_d=None, act_order=False, damp=0.01):
    """textbook_gptq with the two options: act order (rows by decreasing diag(H), every group's scale fixed
    beforehand from the given weights) and clipped scales (ref_clip's choice for the group's current rows,
    weighted by diag(H)). Explicit inverse Hessian, no Cholesky, no lazy blocks."""
    W = np.asarray(w, np.float64).copy()
    H = np.asarray(h, np.float64).copy()
    k = W.shape[0]
    dead = np.diag(H) <= 0   # never excited: no feedback to or from them, rounded to nearest (kept, not zeroed)
    live_mean = np.mean(np.diag(H)[~dead])
    H[dead, dead] = 1.0
    diag = np.diag(H).copy()

    def group_scale(rows, lo):
        if clip_d is None:
            m = rows[np.abs(rows).argmax(0), np.arange(rows.shape[1])]
            s = m / -8.0
            s[s == 0] = 1.0
            return s
        dq = ref_clip(rows, len(rows), diag[lo:lo + len(rows)])
        # recover each column's scale from its dequantized values: the group's largest |q * s| sits on -8 or 7
        m = rows[np.abs(rows).argmax(0), np.arange(rows.shape[1])]
        s = np.empty(rows.shape[1])
        for j in range(rows.shape[1]):
            for r in RATIOS:
                cand = r * m[j] / -8.0 if m[j] != 0 else 1.0
                if np.allclose(np.clip(np.round(rows[:, j] / cand), -8, 7) * cand, dq[:, j], rtol=1e-9, atol=1e-12):
                    s[j] = cand
                    break
        return s

    scales = {}
    if act_order:
        for g0 in range(0, k, group):
            scales[g0 // group] = group_scale(W[g0:g0 + group], g0)
        order = np.argsort(-diag, kind="stable")
    else:
        order = np.arange(k)
    H = H[order][:, order]
    Wp = W[order]
    H += damp * live_mean * np.eye(k)
    Hinv = np.linalg.inv(H)
    out = np.zeros_like(Wp)
    for i in range(k):
        g = order[i] // group
        if not act_order and i % group == 0:
            scales[g] = group_scale(Wp[i:i + group], i)
        out[i] = np.clip(np.round(Wp[i] / scales[g]), -8, 7) * scales[g]
        err = (Wp[i] - out[i]) / Hinv[i, i]
        Wp[i + 1:] -= np.outer(Hinv[i + 1:, i], err)
        Hinv -= np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    result = np.empty_like(out)
    result[order] = out
    return result


def test_textbook_ext_reduces_to_textbook():
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, 256, 64)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    np.testing.assert_allclose(textbook_gptq_ext(w, x.T @ x, 32), textbook_gptq(w, x.T @ x, 32), rtol=1e-12)


@pytest.mark.parametrize("clip,act_order", [(False, True), (True, False), (True, True)])
def test_gptq_options_equal_the_textbook_algorithm(clip, act_order):
    rng = np.random.default_rng(11 + 2 * clip + act_order)
    k, group = 96, 32
    x = correlated_inputs(rng, 512, k)
    x *= (0.2 + 3 * rng.random(k))          # distinct diag(H), so act order really permutes
    w = (rng.standard_t(4, (k, 12)) * 0.3).astype(np.float32)
    h = x.T @ x
    ours = gptq_quantize(w, h, group, symmetric=True, block=32, clip=clip, act_order=act_order).dequantize()
    ref = textbook_gptq_ext(w, h, group, clip_d=np.diag(h) if clip else None, act_order=act_order)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    if act_order:   # the order matters: a different result from plain GPTQ
        assert not np.allclose(ours, gptq_quantize(w, h, group, block=32, clip=clip).dequantize(), atol=1e-4)


def test_clip_and_act_order_lower_gptq_output_error():
    rng = np.random.default_rng(4)
    x = correlated_inputs(rng, 2048, 128)
    x *= (0.2 + 3 * rng.random(128))
    w = (rng.standard_t(4, (128, 64)) * 0.3).astype(np.float32)
    ref = x @ w
    errors = {}
    for name, kw in {"rtn": None, "clip": "clip", "gptq": {}, "gptq-clip": {"clip": True},
                     "gptq act": {"act_order": True}}.items():
        if kw is None:
            dq = quantize_groupwise(w, 32).dequantize()
        elif kw == "clip":
            dq = quantize_groupwise_clipped(w, 32, True, np.sum(x * x, axis=0)).dequantize()
        else:
            dq = gptq_quantize(w, x.T @ x, 32, **kw).dequantize()
        errors[name] = C.rel_err(x @ dq, ref)
    print(errors)
    assert errors["clip"] < 0.95 * errors["rtn"]
    assert errors["gptq-clip"] < errors["gptq"] < errors["rtn"]
    assert errors["gptq act"] < errors["gptq"]
