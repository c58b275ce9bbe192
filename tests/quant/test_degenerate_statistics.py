"""Degenerate calibration statistics and float16 range (issue 22): no model that computes garbage.

Each case is a crafted model whose calibration leaves X^T X zero, indefinite or partly dead, or whose
float16 weights sit near float16's maximum. The expectations are numpy references: the float model's
output in float64, round-to-nearest INT4 from quant/int4.py's formulas restated here, X^T X in float64.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from fptq_graph import Config, quantize
from fptq_graph.plan.plan import WeightSpec
from fptq_graph.plan.statistics import ActivationStats
from fptq_graph.quant.gptq import HessianUnusable, calibration_error, gptq
from fptq_graph.quant.int4 import QuantizedWeight, keep_within, quantize_groupwise
from fptq_graph.runtime import session

K, N = 64, 48


def one_linear(dtype=np.float32, weight=None, seed: int = 0) -> onnx.ModelProto:
    """x [b, s, K] -> MatMul(w) -> y, in `dtype`."""
    rng = np.random.default_rng(seed)
    w = weight if weight is not None else rng.standard_normal((K, N)) * 0.2
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "one_linear",
        [helper.make_tensor_value_info("x", elem, ["b", "s", K])],
        [helper.make_tensor_value_info("y", elem, ["b", "s", N])],
        [numpy_helper.from_array(np.asarray(w, dtype=dtype), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"x": x})[0]


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def config(**kw) -> Config:
    return Config(group_size=32, sqnr_samples=0, progress=False, **kw)


@pytest.mark.parametrize("quantizer", [None, "gptq", "gptq-clip"])
def test_all_zero_calibration_does_not_zero_the_weights(quantizer):
    """Calibration inputs all zero: X^T X carries no information. The weights must still be quantized
    (not zeroed, as GPTQ's dead-channel rule did to every row), and the report must say GPTQ was not used."""
    model = one_linear()
    zeros = [{"x": np.zeros((2, 16, K), np.float32)} for _ in range(2)]
    result = quantize(model, zeros, config(weight_quantizer=quantizer))
    x = np.random.default_rng(1).standard_normal((2, 16, K)).astype(np.float32)
    reference = x.astype(np.float64) @ numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    assert rel_err(run(result.model, x), reference) < 0.2   # int4 g32 + int8 activations: about 0.1; zeroed: 1.0
    row = next(r for r in result.layers if r["name"] == "linear")
    assert row["weight_sqnr_db"] > 10.0
    assert "GPTQ not used (X^T X is zero" in row["reason"], row["reason"]


def test_dead_channels_are_rounded_not_zeroed():
    """Channels calibration never excited keep their weights (round to nearest, no feedback either way);
    the live channels get GPTQ as before (against the float64 textbook form in test_weight_quantizers)."""
    from test_weight_quantizers import textbook_gptq

    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, K))
    x[:, [2, 7, 40]] = 0.0
    w = (rng.standard_normal((K, N)) * 0.2).astype(np.float32)
    qw, note = gptq(w, x.T @ x, 32)
    dq = qw.dequantize()
    assert np.all(np.abs(dq[[2, 7, 40]]).sum(axis=1) > 0)
    np.testing.assert_allclose(dq, textbook_gptq(w, x.T @ x, 32), rtol=1e-5, atol=1e-6)
    assert note == "3 of 64 input channels never excited in calibration: rounded to nearest"


def test_an_indefinite_hessian_falls_back_to_the_clipping_search():
    """X^T X not positive definite even after damping (summed in too low a precision, say): the weight
    gets the diag(X^T X)-weighted clipping search, and the note says why."""
    from fptq_graph.passes.rewrite.quantize_weights import quantize_weight
    from fptq_graph.quant.clipping import quantize_groupwise_clipped

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((K, N)) * 0.2).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((K, K)))[0]
    eigen = np.concatenate([np.full(K - 4, 1.0), np.full(4, -5.0)])   # four eigenvalues far below zero
    h = basis @ np.diag(eigen) @ basis.T + np.eye(K) * 2.0
    assert np.all(np.diag(h) > 0) and np.linalg.eigvalsh(h).min() < -1.0
    with pytest.raises(HessianUnusable, match="not positive definite"):
        gptq(w, h, 32)

    class Plan:
        name, eq_scale = "linear", None
        weight = WeightSpec(bits=4, group_size=32, symmetric=True, quantizer="gptq")

    qw, note = quantize_weight(w, Plan(), ActivationStats(gram=h.copy()))
    assert note.startswith("GPTQ not used (X^T X is not positive definite")
    expected = quantize_groupwise_clipped(w, 32, True, np.diag(h)).dequantize()
    np.testing.assert_array_equal(qw.dequantize(), expected)


def test_a_non_finite_hessian_is_refused_by_gptq():
    h = np.eye(K)
    h[3, 5] = h[5, 3] = np.inf
    with pytest.raises(HessianUnusable, match="NaN or Inf"):
        gptq(np.ones((K, N), np.float32), h, 32)


def test_act_order_keeps_whichever_is_better_on_calibration():
    """Act order's static groups rounded to nearest are kept where GPTQ's feedback did worse on the
    calibration objective tr(E^T H E); either way the result is never worse than them."""
    rng = np.random.default_rng(5)
    for rank in (2, 8, 64):
        x = rng.standard_normal((256, rank)) @ rng.standard_normal((rank, K)) * (0.1 + 3 * rng.random(K))
        w = (rng.standard_t(3, (K, N)) * 0.2).astype(np.float32)
        h = x.T @ x
        qw, note = gptq(w, h, 32, act_order=True)
        static = quantize_groupwise(w, 32)   # act order's static groups: the scales of the weights as given
        dead = np.zeros(K, bool)
        assert calibration_error(w, qw, h, dead) <= calibration_error(w, static, h, dead) * (1 + 1e-12)


def test_float16_dequantized_weights_stay_finite():
    """A float16 weight near float16's maximum, zero points: the grid reaches half a step past the
    group's range, which dequantized to Inf and made every output NaN. Codes are stepped back inside."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)) * 0.2
    w[0, 0], w[1, 0] = -65000.0, 64000.0        # one group spanning almost float16's whole range
    w[2, 1] = 65500.0
    qw = quantize_groupwise(w.astype(np.float32), 32, symmetric=False)
    limit = float(np.finfo(np.float16).max)
    assert np.abs(qw.dequantize().astype(np.float64)).max() > limit     # the case exists
    kept, moved = keep_within(qw, limit)
    dq = kept.dequantize().astype(np.float64)
    assert moved >= 1 and np.abs(dq).max() <= limit
    changed = kept.q != qw.q
    assert changed.sum() == moved and np.all(np.abs(kept.q[changed].astype(int) - qw.q[changed]) == 1)

    model = one_linear(np.float16, weight=w.astype(np.float16))
    calib = [{"x": rng.standard_normal((2, 16, K)).astype(np.float16)} for _ in range(2)]
    result = quantize(model, calib, config(weight_quantizer="rtn", symmetric=False))
    x = rng.standard_normal((2, 16, K)).astype(np.float16) * 1e-4   # keep the float output finite too
    out = run(result.model, x)
    assert np.all(np.isfinite(run(model, x))) and np.all(np.isfinite(out))
    row = next(r for r in result.layers if r["name"] == "linear")
    assert "codes moved a step toward zero" in row["reason"]


def test_float16_statistics_are_summed_in_float32():
    """X^T X of float16 activations: a channel of magnitude 100 over 512 tokens sums past float16's
    maximum. Calibration must record it finite and equal to float64's within float32 rounding."""
    from fptq_graph.api import _prepare
    from fptq_graph.passes.pipeline import calibration_pipeline

    rng = np.random.default_rng(7)
    batches = []
    for _ in range(2):
        x = rng.standard_normal((2, 256, K)).astype(np.float16)
        x[..., 9] *= 100.0
        batches.append({"x": x})
    state, _ = _prepare(one_linear(np.float16), batches, config(weight_quantizer="gptq"), None)
    calibration_pipeline().run(state)
    stats = state.stats["x"]
    rows = np.concatenate([b["x"].reshape(-1, K).astype(np.float64) for b in batches])
    assert np.all(np.isfinite(stats.gram))
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-5, atol=1e-3 * np.abs(rows.T @ rows).max() * 1e-3)


def test_a_result_that_computes_inf_is_refused_naming_the_linear(monkeypatch, tmp_path):
    """Were a non-finite weight to slip through (keep_within disabled here), quantize must fail naming
    the first linear whose output went non-finite, and write nothing."""
    from fptq_graph.errors import FptqError
    from fptq_graph.passes.rewrite import quantize_weights

    monkeypatch.setattr(quantize_weights, "keep_within", lambda qw, limit: (qw, 0))
    rng = np.random.default_rng(8)
    w = rng.standard_normal((K, N)) * 0.2
    w[0, 0], w[1, 0] = -65000.0, 64000.0
    model = one_linear(np.float16, weight=w.astype(np.float16))
    calib = [{"x": (rng.standard_normal((2, 16, K)) * 1e-3).astype(np.float16)} for _ in range(2)]
    assert np.all(np.isfinite(run(model, calib[0]["x"][:1])))
    with pytest.raises(FptqError, match=r"NaN or Inf in output 'y'.*first linear whose output went non-finite: 'linear'"):
        quantize(model, calib, config(weight_quantizer="rtn", symmetric=False))



@pytest.mark.parametrize("tokens, warned", [(32, True), (128, False)])
def test_gptq_on_fewer_tokens_than_k_is_said(tokens, warned):
    """X^T X from fewer tokens than K has rank at most that count: the report says so for the linear and the
    pass summary warns; with enough tokens nothing is said."""
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((1, tokens, K)).astype(np.float32)}]
    result = quantize(one_linear(), calib, config(weight_quantizer="gptq", calib_samples=1, calib_batch_size=1))
    (row,) = result.layers
    summary = result.stats("quantize_weights")
    assert ("fewer tokens than K" in row["reason"]) is warned, row["reason"]
    assert summary["few_tokens"] == int(warned)
    if warned:
        assert f"({tokens} < K {K})" in row["reason"]
