"""Issue 14: the ONNX models users already have. ONNX Runtime's contrib ops (GenAI builder decoders:
SimplifiedLayerNormalization in the default domain, SkipSimplifiedLayerNormalization,
GroupQueryAttention), every norm form as an LAE producer, optimum's fp16 RMSNorm with Casts, KV caches
with symbolic head_dim, honest opsets, and the bundled sample text.

References are independent of the package: numpy float64 norms and fake quantization (crafted.py),
onnx.checker, and ONNX Runtime running the float model as given.
"""
import hashlib
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import crafted as C
from conftest import CALIB_TEXT, HELDOUT_TEXT, ROOT, SHARED
from fptq_graph import Config, FptqError, quantize
from fptq_graph.errors import ModelLoadError
from fptq_graph.exporters.kv_layout import infer_past_dims, past_problem
from fptq_graph.ir.load import load_model, load_split, validate_model
from fptq_graph.ir.opset import upgrade_opset
from fptq_graph.ir.save import finish_model
from fptq_graph.runtime import session
from helpers import run_until

# The paper's FPTQ (round-to-nearest weights): what the numpy references compute.
FAST = dict(sqnr_samples=0, progress=False, recipe="fptq-paper")


def outputs(model, feeds) -> dict:
    model = model if isinstance(model, (str, onnx.ModelProto)) else str(model)
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def stats(result, name: str) -> dict:
    return result.stats(name)


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


# ---- 1. loading what ONNX Runtime runs ------------------------------------------------------------

def test_builder_decoder_is_refused_by_the_checker_and_loads_through_onnxruntime(tmp_path):
    model, _ = C.builder_decoder(np.random.default_rng(0))
    path = C.save(model, tmp_path / "builder.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(model)           # the old loader's only test
    assert validate_model(path) == "onnxruntime"
    split = load_split(path)
    assert len(split.proto.graph.node) == len(model.graph.node)
    assert len(load_model(path).graph.node) == len(model.graph.node)


def test_a_model_neither_accepts_is_refused_in_one_line(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    g = helper.make_graph([helper.make_node("FancyNorm", ["x", "w"], ["n"]), helper.make_node("MatMul", ["n", "w2"], ["y"])],
                          "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                          [numpy_helper.from_array(np.ones(8, np.float32), "w"),
                           numpy_helper.from_array(np.ones((8, 4), np.float32), "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    path = C.save(model, tmp_path / "fancy.onnx")
    for load in (load_split, load_model, validate_model):
        with pytest.raises(ModelLoadError) as info:
            load(path)
        text = str(info.value)
        assert "\n" not in text and "fancy.onnx" in text and "FancyNorm" in text, text
    # Invalid for both for a reason other than an unknown op: the checker's words and ORT's, one line.
    model.graph.node[0].op_type = "LayerNormalization"   # every op defined now; the IR version is not
    model.ir_version = 99
    path = tmp_path / "ir99.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_split(path)
    assert "\n" not in str(info.value) and "ir99.onnx" in str(info.value)


def test_a_valid_onnx_model_is_still_decided_by_the_checker(tmp_path):
    model, _ = C.ln_block(1.0, np.random.default_rng(0))
    assert validate_model(C.save(model, tmp_path / "ln.onnx")) == "onnx.checker"


# ---- 2. every norm form is a foldable LAE producer -----------------------------------------------

@pytest.mark.parametrize("op", list(C.NORM_FORMS))
def test_norm_form_folds_lae_and_matches_the_numpy_reference(op):
    model, w = C.norm_block(op, np.random.default_rng(0))
    calib = C.norm_feeds(op, np.random.default_rng(1), 3)
    result = quantize(model, calib, Config(group_size=16, **FAST))
    assert (stats(result, "find_linears")["linears"], stats(result, "find_linears")["producers"]) == (2, 1)
    assert stats(result, "fold_equalization")["folded"] == 2
    assert [(r["scheme"], r["producer"]) for r in result.layers] == [("lae", f"{op} 'norm'")] * 2

    # the reference: the norm in float64, LAE s from its calibration maxima, fake-quantized int8 x INT4
    maxima = np.max([np.abs(C.ref_norm(op, w, f)[0]).reshape(-1, C.K).max(0) for f in calib], axis=0)
    s = C.ref_lae_scale(maxima)
    act_scale = float(init(result.model, "lin_a.act_scale"))    # siblings share one quantized input
    assert act_scale == pytest.approx((maxima / s).max() / 127, rel=1e-5)
    test = C.norm_feeds(op, np.random.default_rng(2), 1)[0]
    got, float_out = outputs(result.model, test), outputs(model, test)
    n, residual = C.ref_norm(op, w, test)
    for out, weight in (("a", w["W1"]), ("b", w["W2"])):
        ref = C.fake_quant_static(n / s, act_scale) @ C.ref_int4(weight * s[:, None], 16)
        assert C.rel_err(got[out], ref) <= 1e-4, out
    if residual is not None:   # output 3, the residual sum: untouched by the fold, bit for bit
        assert np.array_equal(bits(got["r"]), bits(float_out["r"]))
        assert C.rel_err(got["r"], residual) <= 1e-6


def test_simplified_layernorm_in_the_microsoft_domain_is_a_producer():
    from fptq_graph.passes.analysis.find_linears import FindQuantizableLinears
    from fptq_graph.passes.state import State

    model, _ = C.norm_block("SimplifiedLayerNormalization", np.random.default_rng(0))
    model.graph.node[0].domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    state = State(graph=gs.import_onnx(model), config=Config())
    FindQuantizableLinears().run(state)
    assert [(p.kind, p.gamma_index, p.beta_index) for p in state.producers.values()] == [
        ("SimplifiedLayerNormalization", 1, None)]
    model.graph.node[0].domain = "org.other"   # the same name elsewhere is not ORT's op
    state = State(graph=gs.import_onnx(model), config=Config())
    FindQuantizableLinears().run(state)
    assert not state.producers


@pytest.mark.parametrize("form", ["reciprocal", "div"])
def test_optimum_fp16_rmsnorm_with_casts_folds(form):
    model, w = C.optimum_rmsnorm(np.random.default_rng(0), form)
    rng = np.random.default_rng(1)
    calib = []
    for _ in range(3):
        x = rng.standard_normal((2, 8, C.K)).astype(np.float32)
        x[..., 7] *= 6.0
        calib.append({"x": x.astype(np.float16)})
    cfg = Config(group_size=16, **FAST)
    state, folded = run_until(model, calib, cfg, "fold_equalization")
    assert [p.kind for p in state.producers.values()] == ["RMSNorm (decomposed)"]
    assert {p.scheme for p in state.plan.values()} == {"lae"}
    # the gain is divided by s from the float64 reference's maxima; the weights' rows multiplied by it
    maxima = np.max([np.abs(C.ref_rmsnorm(f["x"].astype(np.float32), w["gain"])).reshape(-1, C.K).max(0)
                     for f in calib], axis=0)
    s = C.ref_lae_scale(maxima)
    gain = next(numpy_helper.to_array(i) for i in folded.graph.initializer if i.name.endswith("gamma_equalized"))
    np.testing.assert_allclose(gain.astype(np.float64), w["gain"].astype(np.float64) / s, rtol=2e-3)
    test = {"x": rng.standard_normal((2, 8, C.K)).astype(np.float16)}
    before, after = outputs(model, test), outputs(folded, test)
    for name in ("q", "k", "v"):
        assert C.rel_err(after[name], before[name]) <= 3e-3, name   # float-exact up to fp16 rounding
    result = quantize(model, calib, cfg)
    assert stats(result, "fold_equalization")["folded"] == 3
    ref = C.fake_quant_static(C.ref_rmsnorm(test["x"].astype(np.float32), w["gain"]) / s,
                              float(init(result.model, "q_proj.act_scale"))) @ C.ref_int4(w["Wq"].astype(np.float64) * s[:, None], 16)
    assert C.rel_err(outputs(result.model, test)["q"], ref) <= 2e-2   # fp16 activations and scales


# ---- the builder decoder end to end: contrib norms, fused QKV, GQA, KV cache with symbolic head_dim ----

@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    model, w = C.builder_decoder(np.random.default_rng(0))
    path = C.save(model, tmp_path_factory.mktemp("builder") / "builder.onnx")
    # token calibration: random ids fill input_ids, and an empty past [batch, 3, 0, head_dim] the KV inputs
    # embedding float: the residual is compared bit for bit with the float model's (the fold's exactness)
    config = Config(group_size=32, calib_seq_len=16, calib_batch_size=4, quantize_lm_head=True, embedding="float", **FAST)
    return model, w, path, quantize(path, 8, config)


def test_builder_decoder_quantizes_with_its_norms_as_lae_producers(builder):
    _, _, _, result = builder
    assert (stats(result, "find_linears")["linears"], stats(result, "find_linears")["producers"]) == (6, 3)
    assert stats(result, "fold_equalization")["folded"] == 4
    rows = {r["name"]: r for r in result.layers}
    assert {name: (r["scheme"], r["producer"]) for name, r in rows.items() if r["scheme"] == "lae"} == {
        "layers.0.attn.qkv_proj": ("lae", "SkipSimplifiedLayerNormalization 'layers.0.input_layernorm'"),
        "layers.0.mlp.gate_proj": ("lae", "SkipSimplifiedLayerNormalization 'layers.0.post_attention_layernorm'"),
        "layers.0.mlp.up_proj": ("lae", "SkipSimplifiedLayerNormalization 'layers.0.post_attention_layernorm'"),
        "lm_head": ("lae", "SimplifiedLayerNormalization 'norm'")}
    assert rows["layers.0.attn.qkv_proj"]["N"] == C.B_HEADS * C.B_HEAD_DIM + 2 * C.B_KV_HEADS * C.B_HEAD_DIM
    assert validate_model(result.split, "builder.w4a8.onnx") == "onnxruntime"   # outputs check the same way


def test_builder_decoder_fused_qkv_takes_one_scale_into_the_gain_only(builder):
    model, w, _, result = builder
    gain = init(result.model, "layers.0.input_layernorm.gamma_equalized").astype(np.float64)
    s = w["g0"] / gain                                  # the one s of the fused QKV linear
    # its weight was scaled by the same s, row by row, before INT4: dequantize and compare per group
    assert np.all(s > 1) and np.isfinite(s).all()
    names = {i.name for i in result.model.graph.initializer}
    assert "bias0" in names and np.array_equal(init(result.model, "bias0"), w["bias0"])   # the bias is not scaled
    # s is LAE's formula on the numpy float64 maxima of the normalized tensor, over the calibration tokens
    from fptq_graph.calibration import from_random

    tokens = np.concatenate(list(from_random(8, C.B_VOCAB, 16, 4).batches()))
    x = w["embed"][tokens].astype(np.float64) + w["positions"][np.arange(16)] + w["bias0"]
    n = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w["g0"]
    np.testing.assert_allclose(s, C.ref_lae_scale(np.abs(n).reshape(-1, C.B_HIDDEN).max(0)), rtol=1e-4)


def test_builder_decoder_residual_sum_is_bit_identical(builder):
    model, _, path, result = builder
    for step in (C.builder_feeds(np.random.default_rng(5)), C.builder_feeds(np.random.default_rng(6), seq=1, past=4)):
        got, ref = outputs(result.model, step), outputs(path, step)
        assert np.array_equal(bits(got["residual.0"]), bits(ref["residual.0"]))
        assert got["present.0.key"].shape == ref["present.0.key"].shape
        # random weights: the logits show plumbing (the fold's exactness is tested below), not accuracy
        assert got["logits"].shape == ref["logits"].shape and np.isfinite(got["logits"]).all()


def test_builder_decoder_fold_is_float_exact():
    model, _ = C.builder_decoder(np.random.default_rng(0))
    calib = [C.builder_feeds(np.random.default_rng(i)) for i in range(2)]
    _, folded = run_until(model, calib, Config(group_size=32, quantize_lm_head=True, progress=False), "fold_equalization")
    test = C.builder_feeds(np.random.default_rng(9), batch=1, seq=3, past=5)
    before, after = outputs(model, test), outputs(folded, test)
    for name, value in before.items():
        assert C.rel_err(after[name], value) <= 1e-5, name


# ---- 3. KV caches of any exporter ------------------------------------------------------------------

def test_kv_head_dim_is_taken_from_the_attention_op(tmp_path):
    model, _ = C.builder_decoder(np.random.default_rng(0))
    assert infer_past_dims(model) == {f"past_key_values.0.{kind}": {3: C.B_HEAD_DIM} for kind in ("key", "value")}
    loaded = load_split(C.save(model, tmp_path / "b.onnx")).proto
    past = next(v for v in loaded.graph.input if v.name == "past_key_values.0.key")
    dims = [d.dim_value or d.dim_param for d in past.type.tensor_type.shape.dim]
    assert dims == ["batch_size", C.B_KV_HEADS, "past_sequence_length", C.B_HEAD_DIM]


def _unattended_past(heads):
    """A past input whose head_dim nothing in the graph tells (it only flows to an output)."""
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", heads, "past", "head_dim"])
    g = helper.make_graph([helper.make_node("Identity", ["past_key_values.0.key"], ["present_copy"]),
                           helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]), past],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2]),
                           helper.make_tensor_value_info("present_copy", TensorProto.FLOAT, ["batch", heads, "past", "head_dim"])],
                          [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_kv_error_names_the_dimension_that_is_wrong_and_config_json_tells_it(tmp_path):
    model = _unattended_past(3)
    value = model.graph.input[1]
    problem = past_problem(value)
    assert "'past_key_values.0.key'" in problem and "head_dim (axis 3)" in problem and "kv_heads" not in problem
    assert "kv_heads (axis 1)" in past_problem(_unattended_past("heads").graph.input[1])
    path = C.save(model, tmp_path / "m.onnx")
    assert infer_past_dims(load_model(path), path) == {}
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 6,
                                                     "num_key_value_heads": 3}))
    loaded = load_split(path).proto
    assert past_problem(loaded.graph.input[1]) == ""
    assert [d.dim_value or d.dim_param for d in loaded.graph.input[1].type.tensor_type.shape.dim] == ["batch", 3, "past", 8]


# ---- 4. opset honesty ------------------------------------------------------------------------------

def _opset18_block():
    """crafted.ln_block at opset 18 (IR 8), with a float part: ReduceMean (axes as an input since 18) of x."""
    model, w = C.ln_block(8.0, np.random.default_rng(3))
    model.graph.node.append(helper.make_node("ReduceMean", ["x", "mean_axes"], ["x_mean"], keepdims=1))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "mean_axes"))
    model.graph.output.append(helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, ["batch", "seq", 1]))
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 18))
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, w


def test_opset18_model_quantizes_to_a_converted_opset(tmp_path):
    model, _ = _opset18_block()
    path = tmp_path / "op18.onnx"
    onnx.save(model, str(path))   # as it is: IR 8, opset 18
    calib = C.feeds(np.random.default_rng(1), 3)
    result = quantize(path, calib, Config(group_size=16, **FAST))
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 21
    out = result.save(tmp_path / "op18.w4a8.onnx")
    onnx.checker.check_model(str(out), full_check=True)           # every op valid at opset 21
    test = C.feeds(np.random.default_rng(2), 1)[0]
    got, ref = outputs(str(out), test), outputs(str(path), test)
    assert np.array_equal(bits(got["x_mean"]), bits(ref["x_mean"]))   # the float part computes the same
    assert {r["scheme"] for r in result.layers} >= {"lae"}


def test_no_relabel_without_converting():
    model, _ = _opset18_block()
    state, _ = run_until(model, C.feeds(np.random.default_rng(1), 2), Config(group_size=16, **FAST), "fold_equalization")
    assert next(o.version for o in finish_model(state.graph, model).opset_import if o.domain == "") == 18  # float: kept
    from fptq_graph.passes.pipeline import default_passes, run_passes

    passes = default_passes()
    names = [p.name for p in passes]
    run_passes(state, passes[names.index("quantize_weights"): names.index("emit_qdq") + 1])
    with pytest.raises(FptqError, match="needs opset 21 .* at opset 18"):
        finish_model(state.graph, model)        # INT4 at opset 18 would be a lie: refused, not relabelled


def test_builder_model_at_opset18_converts_around_its_contrib_ops(tmp_path):
    model, _ = C.builder_decoder(np.random.default_rng(0))
    model.opset_import[0].version = 18
    with pytest.raises(Exception, match="SimplifiedLayerNormalization"):
        onnx.version_converter.convert_version(model, 21)           # the converter alone refuses it
    converted = upgrade_opset(model, 21, "b18.onnx")
    assert {(o.domain, o.version) for o in converted.opset_import} == {("", 21), ("com.microsoft", 1)}
    assert [(n.op_type, n.domain) for n in converted.graph.node] == [(n.op_type, n.domain) for n in model.graph.node]
    test = C.builder_feeds(np.random.default_rng(3), batch=1, seq=2, past=3)
    got, ref = outputs(converted, test), outputs(model, test)
    for name, value in ref.items():
        assert np.array_equal(bits(got[name]), bits(value)), name
    result = quantize(converted, [C.builder_feeds(np.random.default_rng(4))], Config(group_size=32, **FAST))
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 21
    assert validate_model(result.split, "b18.w4a8.onnx") == "onnxruntime"


# ---- 5. the sample text ships with the repository ----------------------------------------------------

def test_sample_text_is_in_the_repository():
    for path in (CALIB_TEXT, HELDOUT_TEXT):
        assert path.parent == ROOT / "samples" / "text" and path.is_file()
        shared = SHARED / "data" / "text" / path.name
        if shared.is_file():
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(shared.read_bytes()).digest()
    assert (ROOT / "samples" / "text" / "README.md").is_file()


def test_kv_dims_from_a_torch_style_concat():
    """past [batch, heads?, past, head_dim?] ++ the new keys Transpose(Reshape(x @ Wk, [0, 0, 2, 8])) on axis 2."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", "h", "past", "d"])
    nodes = [helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("Reshape", ["k", "heads_shape"], ["k4"]),
             helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),
             helper.make_node("Concat", ["past_key_values.0.key", "kt"], ["present.0.key"], axis=2)]
    g = helper.make_graph(nodes, "g", [x, past],
                          [helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", "h", "total", "d"])],
                          [numpy_helper.from_array(np.ones((16, 16), np.float32), "Wk"),
                           numpy_helper.from_array(np.array([0, 0, 2, 8], np.int64), "heads_shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert infer_past_dims(model) == {"past_key_values.0.key": {1: 2, 3: 8}}
