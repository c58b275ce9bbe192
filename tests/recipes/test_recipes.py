"""Recipes as data (recipes.py), the measured classifier, and the massive-activation model where FPTQ's
bands must beat naive and SmoothQuant W4A8 and match per-token W4A8."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.errors import FptqError
from fptq_graph.passes.analysis.classify import CLASSIFIERS, measured_sqnr
from fptq_graph.recipes import (CLASSIFIERS as CLASSIFIER_NAMES, RECIPE_TABLE, RECIPES, describe, observers_needed,
                                recipe_row, run_row)
from fptq_graph.runtime import session
from helpers import run_until
from swiglu_block import forward, swiglu_block, swiglu_feeds


def test_table_holds_every_recipe_and_the_old_names():
    for name in ("fptq", "naive-w4a8", "dynamic-w4a8", "smoothquant-w4a8", "w8a8-smoothquant", "rtn-w4a16"):
        assert name in RECIPES
    assert RECIPES == tuple(RECIPE_TABLE) and [r.name for r in RECIPE_TABLE.values() if r.weight_bits == 8] == ["w8a8-smoothquant"]
    assert set(CLASSIFIERS) == set(CLASSIFIER_NAMES)   # every classifier a row can name has its function
    assert RECIPE_TABLE["fptq-paper"].weights == "rtn" and not RECIPE_TABLE["fptq-paper"].awq   # the paper's numerics
    assert RECIPE_TABLE["fptq"].weights == "gptq-clip" and RECIPE_TABLE["fptq"].awq           # the measured best
    assert run_row(Config(gptq=True)).weights == "gptq"
    assert run_row(Config(recipe="fptq-awq")).weights == "clip"
    assert run_row(Config(recipe="fptq-awq", weight_quantizer="rtn")).weights == "rtn"
    assert recipe_row("fptq") is RECIPE_TABLE["fptq"]
    assert observers_needed(run_row(Config(recipe="fptq-paper"))) == set()
    assert observers_needed(run_row(Config())) == {"gram", "rows"}   # the default: AWQ + GPTQ-clip
    assert observers_needed(run_row(Config(recipe="fptq-paper", weight_quantizer="clip"))) == {"diag"}
    assert observers_needed(run_row(Config(recipe="fptq-paper", weight_quantizer="gptq"))) == {"gram", "rows"}
    assert observers_needed(run_row(Config(recipe="fptq-awq"))) == {"gram", "rows"}
    assert observers_needed(run_row(Config(recipe="fptq-measured"))) == {"diag", "rows", "token_max"}
    with pytest.raises(FptqError, match="weight quantizer"):
        Config(weight_quantizer="awq").validate()
    with pytest.raises(FptqError, match="contradicts"):
        Config(gptq=True, weight_quantizer="clip").validate()
    assert all(name in describe() for name in RECIPES)


def test_statistics_over_the_budget_trade_awq_and_gptq_for_clipping():
    """The default row needs X^T X; over Config.statistics_budget_mib it falls back to clipping, says so, and
    records only diag(X^T X); a weight quantizer the user asked for is kept."""
    model, _ = C.ln_block(1.0, np.random.default_rng(0))
    feeds = C.feeds(np.random.default_rng(1), 2)
    small = Config(group_size=16, sqnr_samples=0, progress=False, statistics_budget_mib=0)
    state, _ = run_until(model, feeds, small, "calibrate")
    assert state.recipe.weights == "clip" and not state.recipe.awq
    assert state.statistics_note.endswith("AWQ and GPTQ traded for the clipping search")
    assert all(set(o.sums) == {"diag"} for o in state.observers.values())   # no full X^T X
    assert all(s.gram is None and s.diag is not None for s in state.stats.values())
    state, _ = run_until(model, feeds, Config(group_size=16, sqnr_samples=0, progress=False), "calibrate")
    assert state.recipe.weights == "gptq-clip" and state.recipe.awq and state.stats["y"].gram is not None
    asked = Config(group_size=16, sqnr_samples=0, progress=False, statistics_budget_mib=0, recipe="fptq-paper",
                   weight_quantizer="gptq")
    state, _ = run_until(model, feeds, asked, "calibrate")
    assert state.recipe.weights == "gptq" and state.stats["y"].gram is not None
    # a row with GPTQ and no AWQ: the note names only what was traded
    no_awq = replace(recipe_row("fptq"), name="gptq-only", awq=False)
    state, _ = run_until(model, feeds, Config(group_size=16, sqnr_samples=0, progress=False, statistics_budget_mib=0,
                                              recipe=no_awq), "calibrate")
    assert state.recipe.weights == "clip" and state.statistics_note.endswith(": GPTQ traded for the clipping search")


def test_cli_lists_the_recipes():
    out = subprocess.run([sys.executable, "-m", "fptq_graph.cli", "quantize", "--recipe", "list"],
                         capture_output=True, text=True)
    if out.returncode != 0 and "No module named" in out.stderr:
        out = subprocess.run([sys.executable, "-c", "import sys; from fptq_graph.cli import main; sys.exit(main())",
                              "quantize", "--recipe", "list"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["recipe", "activations", "equalizer", "awq", "weights"]
    assert {line.split()[0] for line in lines[1:]} == set(RECIPES)


@pytest.mark.parametrize("recipe", list(RECIPE_TABLE))
def test_every_recipe_runs_and_reports_its_choices(recipe):
    rng = np.random.default_rng(17)
    model, w = C.ln_block(5.0, rng)
    calib = C.feeds(rng, 2)
    result = quantize(model, calib, Config(recipe=recipe, group_size=32, progress=False, lm_head="float"))
    row = RECIPE_TABLE[recipe]
    schemes = {r["name"]: r["scheme"] for r in result.layers}
    if row.classifier == "float":
        assert set(schemes.values()) == {"float"}
    if row.classifier == "dynamic":
        assert set(schemes.values()) == {"dynamic"}
    if row.weights == "clip":
        assert all(result.plan[name].weight.quantizer == "clip" for name in result.plan)
    if row.awq:
        assert result.stats("plan_equalization")["awq_groups"] > 0
    # the classifier the run settled: a LayerNorm block is never rotated, so a row's unrotated_classifier decides
    assert result.plan.recipe.classifier == (row.unrotated_classifier or row.classifier)
    if result.plan.recipe.classifier == "measured":
        assert all(r["reason"].startswith("measured: est. token-mean output SQNR") for r in result.layers)
    test = C.feeds(np.random.default_rng(18), 1)[0]
    fl = C.float_forward(w, test["x"], test["u"])
    out = dict(zip(["h", "b", "c"], session(result.model).run(None, test)))
    assert C.rel_err(out["b"], fl["b"]) < 0.3


def test_measured_estimates_follow_the_real_output_error():
    """The classifier's static / per-token SQNR estimates against the error measured in numpy on the
    calibration data itself (fake-quant activations, the INT4 weights round to nearest)."""
    rng = np.random.default_rng(21)
    model, w = swiglu_block(rng, gamma_scale=1.0, outlier=10.0)
    calib = swiglu_feeds(rng, 4, outlier_token=True)
    state, _ = run_until(model, calib, Config(recipe="fptq-measured", group_size=32, progress=False, lm_head="float"),
                         "classify")
    p = np.concatenate([forward(w, f["x"])["p"].reshape(-1, 96) for f in calib])
    est = measured_sqnr(state, state.linears["down_proj"].sibling_tensor, per_token=False)
    wq = C.ref_int4(w["Wd"], 32)
    ref = p @ w["Wd"].astype(np.float64)
    real = {"static": C.fake_quant_static(p, np.abs(p).max() / 127) @ wq, "dynamic": C.fake_quant_per_token(p) @ wq}
    for scheme, out in real.items():
        db = 10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2))
        print(scheme, f"estimated {est[scheme]:.2f} dB, measured {db:.2f} dB")
        assert est[scheme] == pytest.approx(db, abs=1.5)
    # the total energy is the massive tokens': there static costs little. Token by token it does not:
    tok = measured_sqnr(state, state.linears["down_proj"].sibling_tensor)
    for scheme, out in real.items():
        db = -10 * np.log10(np.mean(np.sum((out - ref) ** 2, -1) / np.sum(ref ** 2, -1)))
        print(scheme, f"token mean: estimated {tok[scheme]:.2f} dB, measured {db:.2f} dB")
        assert tok[scheme] == pytest.approx(db, abs=3.0)
    assert tok["dynamic"] > tok["static"] + 10 > est["static"] - est["dynamic"] + 10
    # the rule on these estimates: static within the tolerance of the best, else LAE (not foldable here), else per token
    scheme, reason = state.draft.activation["down_proj"]
    assert scheme == "dynamic", reason
    assert f"static {tok['static']:.1f} dB" in reason and "LAE not foldable" in reason


def token_error(out, ref):
    """Mean over tokens of each token's relative error: every token counts, not only the massive ones."""
    out, ref = out.reshape(-1, out.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1])
    return float(np.mean(np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)))


def test_massive_activations_fptq_beats_naive_and_smoothquant_and_matches_per_token():
    rng = np.random.default_rng(2)
    model, w = swiglu_block(rng, gamma_scale=1.0, outlier=10.0)
    calib = swiglu_feeds(rng, 4, outlier_token=True)
    v = max(np.abs(forward(w, f["x"])["p"]).max() for f in calib)
    assert 300 < v < 5000, v      # down_proj's input: massive on the first token of each sequence
    typical = np.median(np.abs(forward(w, calib[0]["x"])["p"][:, 1:]).max(-1))
    assert v > 50 * typical, (v, typical)
    test = swiglu_feeds(np.random.default_rng(99), 2, outlier_token=True)
    errors, schemes = {}, {}
    # The paper's FPTQ (round-to-nearest weights, as the baselines): the comparison is of activation schemes.
    for recipe in ("fptq-paper", "naive-w4a8", "smoothquant-w4a8", "dynamic-w4a8"):
        result = quantize(model, calib, Config(recipe=recipe, group_size=32, progress=False, lm_head="float"))
        schemes[recipe] = {r["name"]: r["scheme"] for r in result.layers}
        sess = session(result.model)
        errors[recipe] = np.mean([token_error(sess.run(None, t)[1], forward(w, t["x"])["d"]) for t in test])
    print(errors)
    assert schemes["fptq-paper"]["down_proj"] == "dynamic" and schemes["naive-w4a8"]["down_proj"] == "static"
    assert errors["fptq-paper"] < 0.5 * errors["naive-w4a8"]
    assert errors["fptq-paper"] < 0.5 * errors["smoothquant-w4a8"]
    assert errors["fptq-paper"] <= 1.05 * errors["dynamic-w4a8"]
