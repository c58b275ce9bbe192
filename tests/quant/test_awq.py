"""AWQ scales: the search against a float64 brute force, and the fold (norm gains; a SwiGLU product's
up_proj columns) leaves the float model's outputs unchanged."""
import numpy as np
import pytest

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.quant.awq import AWQ_ALPHAS, search_awq
from fptq_graph.runtime import session
from helpers import run_until
from swiglu_block import forward, swiglu_block, swiglu_feeds
from test_weight_quantizers import correlated_inputs


def ref_awq(weights, x, base, group, act_max=None):
    """Every alpha of 0, 0.1, ..., 1: s = base * r^alpha (r_j = RMS of channel j, normalised to geometric
    mean 1), ΔW = W - diag(1/s) INT4(diag(s) W), error sum tr(ΔWᵀ XᵀX ΔW) (+ with act_max, the static
    int8 noise of X / s as uniform rounding: sum_j min(T (s_j v'/127)^2 / 12, sum_t x_tj^2) |W_j|^2)."""
    x = np.asarray(x, np.float64)
    t = x.shape[0]
    h = x.T @ x
    r = np.sqrt(np.diag(h) / t)
    out = []
    for alpha in [i / 10 for i in range(11)]:
        f = r ** alpha
        f /= np.exp(np.mean(np.log(f)))
        s = (base * f).astype(np.float32).astype(np.float64)
        err = 0.0
        for w in weights:
            w = np.asarray(w, np.float64)
            dw = w - C.ref_int4((w * s[:, None]).astype(np.float32), group) / s[:, None]
            err += np.trace(dw.T @ h @ dw)
        if act_max is not None:
            step = (act_max / s).max() / 127
            w2 = sum(np.sum(np.asarray(w, np.float64) ** 2, axis=1) for w in weights)
            err += np.sum(np.minimum(t * (s * step) ** 2 / 12, np.diag(h)) * w2)
        out.append((err, alpha, s))
    return min(out, key=lambda e: e[0]), out


@pytest.mark.parametrize("static", [False, True])
def test_awq_search_equals_brute_force(static):
    assert AWQ_ALPHAS == tuple(i / 10 for i in range(11))
    rng = np.random.default_rng(2 + static)
    k = 64
    x = correlated_inputs(rng, 1024, k)
    x[:, [3, 17]] *= 12.0                      # salient channels, as AWQ assumes
    weights = [rng.standard_normal((k, 24)).astype(np.float32), rng.standard_normal((k, 16)).astype(np.float32)]
    base = np.where(np.arange(k) % 2, 1.5, 1.0)
    act_max = np.abs(x).max(0) if static else None
    (err, alpha, s), table = ref_awq(weights, x, base, 32, act_max)
    ours = search_awq(weights, x.T @ x, float(len(x)), base, 32, True, act_max, columns=None)
    assert ours.alpha == alpha and 0 < alpha
    np.testing.assert_allclose(ours.scale, s, rtol=1e-6)
    assert ours.error == pytest.approx(err, rel=1e-3)
    assert ours.base_error == pytest.approx(table[0][0], rel=1e-3)
    # the strided column subset (the default) picks an alpha whose true error is near the best
    sub = search_awq(weights, x.T @ x, float(len(x)), base, 32, True, act_max, columns=12)
    assert dict((a, e) for e, a, _ in table)[sub.alpha] <= 1.15 * err


def test_awq_fold_keeps_the_float_model():
    """Fold only (no quantization): norm gain, q/gate/up rows, up_proj's columns and down_proj's rows."""
    rng = np.random.default_rng(5)
    model, w = swiglu_block(rng, outlier=30.0)
    calib = swiglu_feeds(rng, 4, outlier_token=True)
    state, folded = run_until(model, calib, Config(recipe="fptq-awq", group_size=32, progress=False, lm_head="float"),
                              "fold_equalization")
    down, up = state.plan["down_proj"], state.plan["up_proj"]
    assert down.eq_scale is not None and up.equalization.column_scale is not None
    assert state.plan.product_folds == (("up_proj", ("down_proj",)),)
    np.testing.assert_array_equal(up.equalization.column_scale, down.eq_scale)
    assert state.plan["q_proj"].eq_scale is not None
    weights = {i.name: i for i in folded.graph.initializer}
    up_w = next(v for n, v in weights.items() if n.startswith("up_proj"))
    from onnx import numpy_helper
    # up_proj's weight: rows by the norm group's s, columns by 1/s of down_proj's
    np.testing.assert_allclose(numpy_helper.to_array(up_w),
                               w["Wu"] * state.plan["up_proj"].eq_scale[:, None] / down.eq_scale[None, :], rtol=1e-5)
    test = swiglu_feeds(np.random.default_rng(6), 1, outlier_token=True)[0]
    ref = session(model).run(None, test)
    out = session(folded).run(None, test)
    for o, r in zip(out, ref):
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-5
    # and the numpy forward agrees with the original graph (the test is of the fold, not of ORT)
    fw = forward(w, test["x"])
    assert C.rel_err(ref[1], fw["d"]) < 1e-5


def test_awq_lowers_the_output_error():
    """A block with a few salient channels: AWQ on top of LAE beats the same recipe without it, W4A8 and W4A16."""
    rng = np.random.default_rng(8)
    model, w = swiglu_block(rng, gamma_scale=6.0, salient=8.0)
    calib = swiglu_feeds(rng, 8, seq=32)
    test = swiglu_feeds(np.random.default_rng(9), 2)
    errors = {}
    for name, cfg in {"fptq, clip": dict(recipe="fptq-paper", weight_quantizer="clip"), "fptq-awq": dict(recipe="fptq-awq"),
                      "w4a16, clip": dict(recipe="rtn-w4a16", weight_quantizer="clip"), "awq-w4a16": dict(recipe="awq-w4a16")}.items():
        result = quantize(model, calib, Config(group_size=32, progress=False, lm_head="float", **cfg))
        sess = session(result.model)
        errors[name] = sum(np.mean([C.rel_err(sess.run(None, t)[j], forward(w, t["x"])["qd"[j]]) for t in test]) for j in (0, 1))
    print(errors)
    assert errors["fptq-awq"] < 0.95 * errors["fptq, clip"]
    assert errors["awq-w4a16"] < 0.95 * errors["w4a16, clip"]
