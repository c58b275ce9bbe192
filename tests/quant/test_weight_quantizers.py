"""Int8 per-channel weights (w8a8-smoothquant) and GPTQ, against independent numpy references."""
import numpy as np
import onnx
import pytest

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.quant.gptq import gptq_quantize
from fptq_graph.quant.int4 import quantize_groupwise
from fptq_graph.runtime import session


def textbook_gptq(w, h, group, damp=0.01):
    """GPTQ as the paper states it, one row at a time with the explicit inverse Hessian: after row i is
    quantized, its error updates every later row through H^-1, and row/column i is eliminated from
    H^-1. No Cholesky factor, no lazy blocks. Symmetric int4, a group's scale from its rows as they
    stand when the group starts. Returns the dequantized weight."""
    W = np.asarray(w, np.float64).copy()
    H = np.asarray(h, np.float64).copy()
    k = W.shape[0]
    dead = np.diag(H) <= 0   # never excited: no feedback to or from them, rounded to nearest (kept, not zeroed)
    live_mean = np.mean(np.diag(H)[~dead])
    H[dead, dead] = 1.0
    H += damp * live_mean * np.eye(k)
    Hinv = np.linalg.inv(H)
    out = np.zeros_like(W)
    for i in range(k):
        if i % group == 0:
            block = W[i:i + group]
            scale = block[np.abs(block).argmax(0), np.arange(block.shape[1])] / -8.0
            scale[scale == 0] = 1.0
        out[i] = np.clip(np.round(W[i] / scale), -8, 7) * scale
        err = (W[i] - out[i]) / Hinv[i, i]
        W[i + 1:] -= np.outer(Hinv[i + 1:, i], err)
        Hinv -= np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return out


def correlated_inputs(rng, tokens, k):
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 2.0 * mix)
    x[:, 5] *= 6.0
    return x


@pytest.mark.parametrize("k,group", [(96, 32), (100, 32), (64, 64)])
def test_gptq_equals_the_textbook_algorithm(k, group):
    rng = np.random.default_rng(k + group)
    x = correlated_inputs(rng, 512, k)
    w = rng.standard_normal((k, 24))
    q = gptq_quantize(w.astype(np.float32), x.T @ x, group, symmetric=True, block=32)
    np.testing.assert_allclose(q.dequantize(), textbook_gptq(w.astype(np.float32), x.T @ x, group), rtol=1e-5, atol=1e-6)
    assert q.q.min() >= -8 and q.q.max() <= 7


def test_unit_upper_factor_reconstructs_the_hessian_in_place():
    """H = R D R^T with R unit upper triangular, computed in H's own memory (float64 reference:
    numpy's Cholesky of the reversed matrix), for sizes that are and are not a multiple of the panel."""
    import tracemalloc
    from fptq_graph.quant import gptq

    rng = np.random.default_rng(21)
    for k in (7, 256, 300, 613):
        x = correlated_inputs(rng, 2 * k + 50, k)
        h = x.T @ x
        ours = h.copy()
        tracemalloc.start()
        out = gptq.unit_upper_factor(ours)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out is ours
        # temporaries: a panel and a slice of rows, never a second [K, K] array
        assert peak < 0.5 * h.nbytes + 2 * gptq.FACTOR_BLOCK * k * 8 + (1 << 16), (k, peak, h.nbytes)
        R = np.triu(ours)
        np.testing.assert_allclose(np.diag(R), 1.0, rtol=0, atol=1e-12)
        L = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
        d = np.diag(L) ** 2
        np.testing.assert_allclose((R * d) @ R.T, h, rtol=0, atol=1e-10 * np.abs(h).max())
        np.testing.assert_allclose(R, L / np.diag(L), rtol=0, atol=1e-9)
    with pytest.raises(np.linalg.LinAlgError):
        gptq.unit_upper_factor(-np.eye(5))


def test_gptq_in_the_callers_hessian_holds_one_k_by_k_array():
    """overwrite_hessian: GPTQ's factor takes the caller's H's memory; the rest is [K, N]-sized."""
    import tracemalloc

    rng = np.random.default_rng(22)
    k, n = 2048, 32          # wide enough that a panel of the factorization is a small share of H
    x = correlated_inputs(rng, 2100, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    expected = gptq_quantize(w, x.T @ x, 32).dequantize()
    h = x.T @ x
    tracemalloc.start()
    got = gptq_quantize(w, h, 32, overwrite_hessian=True).dequantize()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(got, expected)
    assert peak < 0.5 * h.nbytes, (peak, h.nbytes)


def test_equalized_in_place_gives_the_same_quotients():
    from fptq_graph.plan.statistics import equalized

    rng = np.random.default_rng(23)
    x = correlated_inputs(rng, 600, 300)
    h, s = x.T @ x, rng.uniform(0.2, 5.0, 300).astype(np.float32)
    expected = equalized(h, s)
    inside = h.copy()
    assert equalized(inside, s, in_place=True) is inside
    np.testing.assert_array_equal(inside, expected)
    np.testing.assert_allclose(expected, h / np.outer(s.astype(np.float64), s), rtol=1e-15)


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 2048, 128)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    ref = x @ w
    for symmetric in (True, False):
        rtn = quantize_groupwise(w, 32, symmetric).dequantize()
        gptq = gptq_quantize(w, x.T @ x, 32, symmetric).dequantize()
        err_rtn, err_gptq = C.rel_err(x @ rtn, ref), C.rel_err(x @ gptq, ref)
        print(f"output error, symmetric={symmetric}: RTN {err_rtn:.4f}, GPTQ {err_gptq:.4f}")
        assert err_gptq < 0.8 * err_rtn


def test_gptq_recipe_end_to_end_matches_its_weights():
    """--gptq: calibration records X^T X (for the LAE-scaled input), the model carries GPTQ weights."""
    rng = np.random.default_rng(8)
    model, w = C.ln_block(5.0, rng)
    calib = C.feeds(rng, 3)
    result = quantize(model, calib, Config(group_size=32, gptq=True, progress=False))
    assert result.stats("insert_observers")["gram"] > 0
    assert all(result.plan[name].weight.quantizer == "gptq" for name in result.plan)
    rows = {r["name"]: r for r in result.layers}
    # lin_c reads a plain input (no equalization): its weight is GPTQ over the numpy X^T X
    us = np.concatenate([(f["u"] * w["u_scale"]).reshape(-1, C.K2) for f in calib]).astype(np.float64)
    dq_c = textbook_gptq(w["W4"], us.T @ us, 32)
    test = C.feeds(np.random.default_rng(9), 1)[0]
    c = dict(zip(["h", "b", "c"], session(result.model).run(None, test)))["c"]
    ref = C.fake_quant_static(test["u"] * w["u_scale"], rows["lin_c"]["act_scale"]) @ dq_c
    assert C.rel_err(c, ref) <= 1e-4


def test_w8a8_smoothquant_has_int8_per_channel_weights():
    rng = np.random.default_rng(12)
    model, w = C.ln_block(5.0, rng, u_scale=0.7)
    result = quantize(model, C.feeds(rng, 2), Config(recipe="w8a8-smoothquant", progress=False))
    dq = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(".weight_dq")]
    assert len(dq) == 4 and all(a.name == "axis" and a.i == 1 for n in dq for a in n.attribute)
    inits = {i.name: i for i in result.model.graph.initializer}
    assert inits["lin_c.weight_int8"].data_type == 3   # INT8
    rows = {r["name"]: r for r in result.layers}
    assert rows["lin_c"]["scheme"] == "static" and rows["lin_a"]["scheme"] == "smooth"
    # lin_c: plain input, int8 weights per output channel (max|w|/127), static int8 activations
    scale = np.abs(w["W4"].astype(np.float64)).max(0) / 127.0
    dq_c = np.clip(np.round(w["W4"] / scale), -127, 127) * scale
    test = C.feeds(np.random.default_rng(13), 1)[0]
    c = dict(zip(["h", "b", "c"], session(result.model).run(None, test)))["c"]
    act_scale = float(np.asarray(onnx.numpy_helper.to_array(inits["lin_c.act_scale"])))
    ref = C.fake_quant_static(test["u"] * w["u_scale"], act_scale) @ dq_c
    assert C.rel_err(c, ref) <= 1e-4
    # int8 weights are far closer to float than INT4's
    assert rows["lin_c"]["weight_sqnr_db"] > 35


def test_w8a8_recipe_refuses_the_w4a8_op_form():
    from fptq_graph.errors import FptqError

    with pytest.raises(FptqError, match="INT4 weights.*w8a8-smoothquant"):
        Config(recipe="w8a8-smoothquant", format="w4a8").validate()
