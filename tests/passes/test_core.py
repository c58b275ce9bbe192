"""The compiler's core: the pass contract, the frozen plan, recipes as data (TOML), and the report fixes
that came with them (an LM head's own group size; a linear in an If body is not called the LM head)."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import bad_models
import crafted as C
from fptq_graph import Config, FptqError, quantize
from fptq_graph.cli import main
from fptq_graph.passes import (Calibrate, ClassifyActivations, FindQuantizableLinears, InsertObservers, PassResult,
                               Pipeline, PlanStatistics)
from fptq_graph.passes.base import PassContractError
from fptq_graph.passes.pipeline import calibration_pipeline, default_pipeline
from fptq_graph.plan.plan import PlanFrozenError
from fptq_graph.recipes import RECIPE_TABLE, recipe_row, to_toml
from fptq_graph.report import REPORT_KEY
from fingerprints import graph_fingerprint

FAST = dict(group_size=16, sqnr_samples=0, progress=False)


def test_a_pipeline_in_the_wrong_order_is_refused_before_any_work():
    with pytest.raises(PassContractError, match="pass 'calibrate' requires observed_model"):
        Pipeline([FindQuantizableLinears(), PlanStatistics(), Calibrate()])
    with pytest.raises(PassContractError, match="'classify' requires"):
        Pipeline([FindQuantizableLinears(), ClassifyActivations()])
    with pytest.raises(PassContractError, match="'insert_observers' requires .*canonical_weights"):
        Pipeline([FindQuantizableLinears(), PlanStatistics(), InsertObservers()])


def test_calibration_is_a_prefix_of_the_default_pipeline():
    for form in ("qdq", "w4a8", "ort"):
        full = default_pipeline(form)
        assert full.names[:len(calibration_pipeline())] == calibration_pipeline().names
        assert full.until("statistics").names == calibration_pipeline().names
        kinds = [p.kind for p in full]
        # analysis before the plan is frozen; after it only rewrites, the lowering (the form's emitter, then
        # the embedding tables) and measurements
        frozen = full.names.index("freeze_plan")
        assert set(kinds[frozen + 1:]) <= {"rewrite", "lower", "measure"}
        assert [p.name for p in full if p.kind == "lower"] == [f"emit_{form}", "emit_embeddings"]


def test_every_pass_returns_a_result_with_numbers():
    model, _ = C.ln_block(5.0, np.random.default_rng(0))
    result = quantize(model, C.feeds(np.random.default_rng(1), 2), Config(recipe="fptq-paper", **FAST))
    assert [p.name for p in result.passes] == default_pipeline().names
    assert all(isinstance(p.result, PassResult) and p.stats for p in result.passes)
    assert result.stats("find_linears")["linears"] == len(result.layers) == 4   # lin_a, lin_b, lin_h, lin_c
    assert sum(result.stats("classify").values()) == 4
    # analysis passes say they left the graph alone; the emitter rewrote it
    assert not any(p.result.modified for p in result.passes if p.kind == "analysis")
    assert next(p for p in result.passes if p.name == "emit_qdq").result.modified
    report = result.report()
    found = next(p for p in report["passes"] if p["name"] == "find_linears")
    assert found["stats"]["linears"] == 4 and json.dumps(report, allow_nan=False)
    assert report["rotation"] == {"method": "none"}   # the recipe rotates nothing, and the report says so


def test_the_plan_is_frozen_and_matches_the_report():
    model, _ = C.ln_block(5.0, np.random.default_rng(0))
    result = quantize(model, C.feeds(np.random.default_rng(1), 2), Config(recipe="fptq-paper", **FAST))
    plan = result.plan
    with pytest.raises(PlanFrozenError):
        plan.head = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan["lin_a"].activation.scheme = "dynamic"
    with pytest.raises(TypeError):
        plan._linears["lin_a"] = None                       # a read-only mapping
    s = plan["lin_a"].eq_scale
    assert s is not None and not s.flags.writeable          # the LAE scale cannot be changed in place
    rows = {r["name"]: r for r in result.layers}
    for name, p in plan.items():
        assert rows[name]["scheme"] == p.scheme and rows[name]["group_size"] == p.weight.group_size == 16
        assert rows[name]["act_scale"] == (None if p.activation.scale is None else pytest.approx(p.activation.scale, rel=1e-4))
        assert rows[name]["reason"].startswith(p.reason)


def test_the_report_gives_the_lm_head_its_own_group():
    model = bad_models.token_model(vocab=40)
    ids = bad_models_ids(40)
    int4 = quantize(model, [{"input_ids": ids}], Config(lm_head="int4", lm_head_group_size=8, **FAST))
    rows = {r["name"]: r for r in int4.layers}
    assert rows["lm_head"]["group_size"] == 8 and int4.plan.head.group_size == 8
    assert all(r["group_size"] == 16 for name, r in rows.items() if name != "lm_head")
    int8 = quantize(model, [{"input_ids": ids}], Config(**FAST))
    assert {r["name"]: r for r in int8.layers}["lm_head"]["group_size"] is None   # per output channel


def bad_models_ids(vocab):
    return np.random.default_rng(0).integers(0, vocab, (2, 8)).astype(np.int64)


def test_a_linear_in_an_if_body_is_not_called_the_lm_head(tmp_path, capsys):
    path = Path(bad_models.save(bad_models.matmul_in_if(), tmp_path / "branchy.onnx"))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--calib-random", "2", "--seq-len", "8", "--group-size", "8",
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LM head kept float" not in text and "in control-flow bodies kept float (inner)" in text
    report = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == REPORT_KEY))
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "find_linears")
    assert stats["in_bodies_kept_float"] == 1 and stats["head_kept_float"] == 0


def test_a_toml_recipe_is_the_row_it_prints(tmp_path):
    """`--recipe show NAME` round-trips: the TOML of a built-in row loads as the same row and gives the
    same graph, byte for byte."""
    model, _ = C.ln_block(5.0, np.random.default_rng(0))
    feeds = C.feeds(np.random.default_rng(1), 2)
    for name in ("fptq", "smoothquant-w4a8", "fptq-measured"):
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(RECIPE_TABLE[name]))
        assert recipe_row(str(path)) == RECIPE_TABLE[name]
        ours = quantize(model, feeds, Config(recipe=str(path), **FAST))
        theirs = quantize(model, feeds, Config(recipe=name, **FAST))
        assert graph_fingerprint(ours.model) == graph_fingerprint(theirs.model)


def test_a_toml_recipe_changes_what_it_says(tmp_path):
    model, _ = C.ln_block(5.0, np.random.default_rng(0))
    feeds = C.feeds(np.random.default_rng(1), 2)
    path = tmp_path / "mine.toml"
    path.write_text('classifier = "bands"\nequalizer = "lae"\nawq = false\nweights = "clip"\nweight_bits = 4\n'
                    '[options]\nstatic_bound = 0.0\ndynamic_bound = 1e9\n')
    result = quantize(model, feeds, Config(recipe=str(path), **FAST))
    assert result.plan.recipe.name == "mine" and result.config.static_bound == 0.0
    assert {p.weight.quantizer for p in result.plan.values()} == {"clip"}
    assert result.plan["lin_a"].scheme == result.plan["lin_b"].scheme == "lae"   # every foldable linear in the band
    explicit = quantize(model, feeds, Config(recipe=str(path), static_bound=1e8, dynamic_bound=1e9, **FAST))
    assert {p.scheme for p in explicit.plan.values()} == {"static"}               # the user's value wins


def test_an_explicit_default_wins_over_the_recipe_options(tmp_path, capsys):
    """Issue 33: a TOML recipe's [options] fill in only what the caller did not give; a value the caller
    set wins even where it is the default (before, the recipe's won wherever the value equalled it)."""
    path = tmp_path / "mine.toml"
    path.write_text('classifier = "bands"\nequalizer = "lae"\nawq = false\nweights = "rtn"\nweight_bits = 4\n'
                    '[options]\nstatic_bound = 0.0\nsmooth_alpha = 0.25\n')
    assert Config(recipe=str(path)).with_recipe_options().static_bound == 0.0
    mine = Config(recipe=str(path), static_bound=15.0).with_recipe_options()
    assert mine.static_bound == 15.0 == Config().static_bound and mine.smooth_alpha == 0.25
    assert Config(recipe=str(path)).evolve(smooth_alpha=0.5).with_recipe_options().smooth_alpha == 0.5
    model = tmp_path / "m.onnx"
    C.save(C.ln_block(1.0, np.random.default_rng(0))[0], model)
    for extra, bound in (([], 0.0), (["--static-bound", "15"], 15.0)):   # the command line: what it was given
        out = tmp_path / f"q{len(extra)}.onnx"
        assert main(["quantize", str(model), "-o", str(out), "--calib-random", "2", "--seq-len", "8", "--group-size", "8",
                     "--recipe", str(path), "--report", str(out) + ".json", "-q", *extra]) == 0
        assert json.loads(Path(str(out) + ".json").read_text())["config"]["static_bound"] == bound


def test_a_config_is_checked_when_made_and_frozen():
    """Issue 33: an invalid combination is refused on construction (API and CLI alike), and a Config never changes."""
    import dataclasses

    with pytest.raises(FptqError, match="format 'w4a8' needs symmetric int4 weights"):
        Config(format="w4a8", symmetric=False)
    config = Config(group_size=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group_size = 64
    assert config.evolve(format="w4a8").given == {"group_size", "format"}
    with pytest.raises(FptqError, match="group_size must be an even number"):
        config.evolve(group_size=7)


@pytest.mark.parametrize("text,problem", [
    ('classifier = "bands"\nequalizer = "lae"\nawq = false\nweights = "rtn"\nweight_bits = 4\ncolour = 3\n', "unknown key 'colour'"),
    ('classifier = "bands"\nequalizer = "lae"\nawq = false\nweights = "rtn"\n', "missing key 'weight_bits'"),
    ('classifier = "vibes"\nequalizer = "lae"\nawq = false\nweights = "rtn"\nweight_bits = 4\n', "classifier = 'vibes'"),
    ('classifier = "bands"\nequalizer = "lae"\nawq = "yes"\nweights = "rtn"\nweight_bits = 4\n', "awq must be a bool"),
    ('classifier = "bands"\nequalizer = "lae"\nawq = false\nweights = "rtn"\nweight_bits = 4\n[options]\nalpha = 1.0\n',
     "unknown option 'alpha'"),
    ('classifier = "bands"\nequalizer = \n', "not valid TOML"),
])
def test_a_bad_toml_recipe_is_one_line_naming_the_key(tmp_path, capsys, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FptqError, match=problem):
        Config(recipe=str(path)).validate()
    model = tmp_path / "m.onnx"
    C.save(C.ln_block(1.0, np.random.default_rng(0))[0], model)
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib-random", "2", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem.split("'")[0] in err and str(path) in err
    assert not (tmp_path / "q.onnx").exists()


def test_recipe_show_prints_toml(capsys):
    assert main(["quantize", "--recipe", "show", "fptq"]) == 0
    out = capsys.readouterr().out
    assert 'weights = "gptq-clip"' in out and "awq = true" in out
    assert main(["quantize", "--recipe", "show", "nope"]) == 2


def test_the_pre_subpackage_module_names_are_gone():
    """Issue 33: the module aliases of before issue 20 (fptq_graph.w4a8_op, fptq_graph.model_io, ...), which
    only a test used, are removed; their modules live in the subpackages (README's layout)."""
    import importlib

    for old in ("fptq_graph.w4a8_op", "fptq_graph.model_io", "fptq_graph.run_outputs", "fptq_graph.compat"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    from fptq_graph.runtime.w4a8_op import pack_weight   # noqa: F401  (where they are)


def test_a_later_analysis_refines_classify_only_through_a_recorded_step():
    """Issue 33's plan discipline: plan_lm_head changes classify's scheme for a tied head through
    PlanDraft.refine_activation, which refuses a linear classify has not decided and records the change."""
    from fptq_graph.plan.plan import PlanDraft

    draft = PlanDraft()
    with pytest.raises(ValueError, match="cannot refine the activation scheme of 'lm_head': classify has not decided"):
        draft.refine_activation("lm_head", "dynamic", "tied", by="plan_lm_head")
    draft.set_activation("lm_head", "lae", "v=40")
    draft.refine_activation("lm_head", "dynamic", "v=40: tied embedding table", by="plan_lm_head")
    assert draft.scheme("lm_head") == "dynamic"
    assert draft.notes["lm_head"] == ["plan_lm_head refined classify's lae to dynamic"]


def test_a_linear_plan_holds_quantization_and_equalization_as_separate_axes():
    """Issue 33's plan discipline: how an input is quantized and what it is equalized by are two fields;
    the scheme is only the name of an allowed pair, and a pair no scheme names (per token with an LAE
    fold, a static input without its scale) is refused when the spec is made."""
    from fptq_graph.plan.plan import SCHEMES, ActivationSpec, PlanDraft

    lae = ActivationSpec.of("lae", 0.5, "v=40")
    assert (lae.quantization, lae.equalization, lae.scheme) == ("static", "lae", "lae")
    dynamic = ActivationSpec.of("dynamic", None, "v=400")
    assert (dynamic.quantization, dynamic.equalization, dynamic.scheme) == ("per_token", "none", "dynamic")
    assert {ActivationSpec(*axes, 1.0 if axes[0] == "static" else None, "").scheme for axes in SCHEMES.values()} == set(SCHEMES)
    with pytest.raises(ValueError, match="no activation scheme quantizes per_token with lae"):
        ActivationSpec("per_token", "lae", None, "")
    with pytest.raises(ValueError, match="a static activation needs a static scale"):
        ActivationSpec("static", "none", None, "")
    with pytest.raises(ValueError, match="unknown scheme 'lae-dynamic'"):
        ActivationSpec.of("lae-dynamic", None, "")
    draft = PlanDraft()
    draft.set_activation("q", "smooth", "why")
    assert (draft.quantization("q"), draft.equalization("q")) == ("static", "smooth")


def test_a_plan_piece_round_trips_as_json_and_names_only_plan_types(tmp_path):
    """Issue 33: a finished block's plan piece is JSON plus arrays (no pickle: loading one runs no code);
    numbers keep their numpy type, arrays come back as read-only views, and a piece naming anything but
    the plan's own types is refused."""
    from fptq_graph.passes.base import PassRecord
    from fptq_graph.plan.plan import ActivationSpec, EqualizationSpec, HeadPlan, LinearPlan, WeightSpec
    from fptq_graph.sequential.plan_piece import PieceError, decode, encode

    arrays = []

    def write(array):
        arrays.append(np.array(array))
        return [len(arrays) - 1, array.dtype.str, list(array.shape)]

    def read(index, dtype, shape):
        view = arrays[index].view()
        view.flags.writeable = False
        return view

    scale = np.array([0.5, 2.0, 3.25], np.float32)
    plan = LinearPlan("q", ActivationSpec.of("lae", np.float32(0.0123), "why"), EqualizationSpec(scale, None),
                      WeightSpec(4, 128, True, "gptq-clip"), "reason", float("nan"), 1e-45)
    piece = {"plans": {"q": plan}, "head": HeadPlan("int8", "lm_head"), "folds": (("up", ("down",)),),
             "records": [PassRecord("classify", "analysis", PassResult("s", False, {"lowest_db": np.float64(-np.inf)}), 0.5)]}
    back = decode(json.loads(json.dumps(encode(piece, write))), read)
    got = back["plans"]["q"]
    assert type(got.activation.scale) is np.float32 and got.activation.scale == plan.activation.scale
    assert np.array_equal(got.equalization.scale, scale) and not got.equalization.scale.flags.writeable
    assert np.isnan(got.v) and got.v_after == 1e-45 and got.weight == plan.weight
    assert back["head"] == piece["head"] and back["folds"] == piece["folds"]
    assert back["records"][0].stats["lowest_db"] == -np.inf and back["records"][0].seconds == 0.5
    with pytest.raises(PieceError, match="unknown type 'Popen'"):
        decode({"type": "Popen", "fields": {"args": "rm -rf /"}}, read)
    with pytest.raises(PieceError, match="cannot hold a set"):
        encode({"x": {1, 2}}, write)
