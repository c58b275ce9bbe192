"""The passes on crafted graphs: band choice, LAE fold equivalence, and the qdq form against numpy."""
import numpy as np
import onnx
import pytest

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.runtime import session
from helpers import run_until


def layers_by_name(result):
    return {row["name"]: row for row in result.layers}


@pytest.mark.parametrize("gamma_scale,expected", [(0.5, "static"), (5.0, "lae"), (60.0, "dynamic")])
def test_default_bands_pick_the_specified_scheme(gamma_scale, expected):
    rng = np.random.default_rng(7)
    model, w = C.ln_block(gamma_scale, rng)
    calib = C.feeds(rng, 3)
    v = C.numpy_maxima(w, calib)["y"].max()
    # The crafted range really is in the band under test (15 and 150 are the paper's bounds).
    assert {"static": v <= 15, "lae": 15 < v <= 150, "dynamic": v > 150}[expected], v
    rows = layers_by_name(quantize(model, calib, Config(recipe="fptq-paper", progress=False)))
    for name in ("lin_a", "lin_b"):
        assert rows[name]["scheme"] == expected, rows[name]
        assert rows[name]["act_max_before"] == pytest.approx(v, rel=1e-4)
    if expected == "lae":
        # after LAE the range is max_j log2(2 + m_j) <= log2(2 + v)
        assert rows["lin_a"]["act_max_after"] <= np.log2(2 + v) + 1e-4
        assert "LAE into LayerNormalization 'ln'" in rows["lin_a"]["reason"]


def test_lae_band_without_foldable_producer_falls_back_to_dynamic():
    rng = np.random.default_rng(3)
    model, w = C.ln_block(2.0, rng)
    calib = C.feeds(rng, 2)
    v = {k: m.max() for k, m in C.numpy_maxima(w, calib).items()}
    # bounds chosen so both the LN output and the residual sum are in the LAE band
    cfg = Config(recipe="fptq-paper", static_bound=0.5 * min(v["y"], v["r"]), dynamic_bound=2 * max(v["y"], v["r"]), progress=False)
    rows = layers_by_name(quantize(model, calib, cfg))
    assert rows["lin_a"]["scheme"] == rows["lin_b"]["scheme"] == "lae"
    assert rows["lin_h"]["scheme"] == "dynamic"
    assert "no foldable producer" in rows["lin_h"]["reason"]


def test_residual_consumer_without_compensation_falls_back():
    rng = np.random.default_rng(4)
    model, _ = C.ln_block(5.0, rng)
    calib = C.feeds(rng, 2)
    rows = layers_by_name(quantize(model, calib, Config(recipe="fptq-paper", compensate_residual=False, progress=False)))
    for name in ("lin_a", "lin_b"):
        assert rows[name]["scheme"] == "dynamic"
        assert "also feeds residual" in rows[name]["reason"]


@pytest.mark.parametrize("gamma_scale", [5.0, 40.0])
def test_lae_fold_keeps_outputs(gamma_scale):
    rng = np.random.default_rng(11)
    model, _ = C.ln_block(gamma_scale, rng)
    calib = C.feeds(rng, 2)
    cfg = Config(recipe="fptq-paper", static_bound=0.0, dynamic_bound=1e9, progress=False)  # every foldable linear in the LAE band
    state, folded = run_until(model, calib, cfg, "fold_equalization")
    assert state.plan["lin_a"].eq_scale is not None
    assert any(n.op_type == "Mul" and n.name.endswith("equalization_restore") for n in folded.graph.node)
    test = C.feeds(np.random.default_rng(12), 1)[0]
    ref = session(model).run(None, test)
    out = session(folded).run(None, test)
    for o, r in zip(out, ref):
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-4


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, True), (32, False)])
def test_qdq_equals_numpy_fake_quant_reference(group, symmetric, tmp_path):
    rng = np.random.default_rng(21)
    model, w = C.ln_block(3.0, rng, u_scale=0.7)
    calib = C.feeds(rng, 3)
    mx = C.numpy_maxima(w, calib)
    v = {k: m.max() for k, m in mx.items()}
    assert v["us"] < v["y"] < v["r"], v
    cfg = Config(recipe="fptq-paper", static_bound=(v["us"] + v["y"]) / 2, dynamic_bound=(v["y"] + v["r"]) / 2, group_size=group,
                 symmetric=symmetric, progress=False)
    result = quantize(model, calib, cfg)
    path = result.save(tmp_path / "q.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    rows = layers_by_name(result)
    assert [rows[n]["scheme"] for n in ("lin_a", "lin_b", "lin_h", "lin_c")] == ["lae", "lae", "dynamic", "static"]

    # Independent reference: same decisions, numpy formulas.
    s = C.ref_lae_scale(mx["y"])
    lae_scale = (mx["y"] / s).max() / 127.0
    assert rows["lin_a"]["act_scale"] == pytest.approx(lae_scale, rel=1e-4)
    static_scale = v["us"] / 127.0
    assert rows["lin_c"]["act_scale"] == pytest.approx(static_scale, rel=1e-4)
    dq = {name: C.ref_int4(wt, group, symmetric) for name, wt in
          (("W1", w["W1"] * s[:, None]), ("W2", w["W2"] * s[:, None]), ("W3", w["W3"]), ("W4", w["W4"]))}
    test = C.feeds(np.random.default_rng(22), 1)[0]
    y_scaled = C.layer_norm(test["x"], w["gamma"] / s, w["beta"] / s)
    yq = C.fake_quant_static(y_scaled, rows["lin_a"]["act_scale"])
    a, b = yq @ dq["W1"], yq @ dq["W2"]
    r = y_scaled * s + a
    h = C.fake_quant_per_token(r) @ dq["W3"]
    c = C.fake_quant_static(test["u"] * w["u_scale"], rows["lin_c"]["act_scale"]) @ dq["W4"]
    out = dict(zip(["h", "b", "c"], session(path).run(None, test)))
    for name, ref in (("h", h), ("b", b), ("c", c)):
        assert C.rel_err(out[name], ref) <= 1e-4, name
    # and the quantization is real: W4A8 differs from float by far more than the tolerance
    fl = C.float_forward(w, test["x"], test["u"])
    assert C.rel_err(out["h"], fl["h"]) > 1e-3


def test_input_model_is_not_modified():
    rng = np.random.default_rng(5)
    model, _ = C.ln_block(5.0, rng)
    before = model.SerializeToString()
    quantize(model, C.feeds(rng, 1), Config(recipe="fptq-paper", progress=False))
    assert model.SerializeToString() == before


def test_smoothquant_recipe_scale_and_fold_equivalence():
    rng = np.random.default_rng(31)
    model, w = C.ln_block(5.0, rng)
    calib = C.feeds(rng, 2)
    cfg = Config(recipe="smoothquant-w4a8", smooth_alpha=0.6, progress=False)
    state, folded = run_until(model, calib, cfg, "fold_equalization")
    assert state.plan["lin_a"].scheme == state.plan["lin_b"].scheme == "smooth"
    assert state.plan["lin_h"].scheme == "static" and "not foldable" in state.plan["lin_h"].reason
    # s read back from the folded LayerNorm gain equals SmoothQuant's formula over both siblings' rows
    gains = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    ln = next(n for n in folded.graph.node if n.op_type == "LayerNormalization")
    s = w["gamma"].astype(np.float64) / gains[ln.input[1]]
    row_max = np.maximum(np.abs(w["W1"]).max(1), np.abs(w["W2"]).max(1))
    np.testing.assert_allclose(s, C.ref_smoothquant_scale(C.numpy_maxima(w, calib)["y"], row_max, 0.6), rtol=1e-4)
    test = C.feeds(np.random.default_rng(32), 1)[0]
    for o, r in zip(session(folded).run(None, test), session(model).run(None, test)):
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-4


def test_dynamic_recipe_is_per_token_everywhere():
    rng = np.random.default_rng(41)
    model, w = C.ln_block(1.0, rng, u_scale=0.7)
    result = quantize(model, C.feeds(rng, 2), Config(recipe="dynamic-w4a8", group_size=32, progress=False))
    assert {row["scheme"] for row in result.layers} == {"dynamic"}
    test = C.feeds(np.random.default_rng(42), 1)[0]
    c = dict(zip(["h", "b", "c"], session(result.model).run(None, test)))["c"]
    ref = C.fake_quant_per_token(test["u"] * w["u_scale"]) @ C.ref_int4(w["W4"], 32)
    assert C.rel_err(c, ref) <= 1e-4
