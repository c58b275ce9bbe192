"""The LM head quantized (Config.lm_head / --lm-head) and tied embeddings held once.

References are numpy, independent of fptq_graph: int8 per-output-channel symmetric weights
(s_n = max|W[:, n]| / 127, q = round(W / s_n) in [-127, 127]) and the head's activation scheme as
classified (tests/crafted.py's fake quantizers), in float64.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import bad_models
from crafted import fake_quant_per_token, fake_quant_static, rel_err
from fptq_graph.plan.plan import WeightSpec
from fptq_graph import Config, FptqError, quantize
from crafted import ort_requantize
from fptq_graph.runtime import session

FORMS = ("qdq", "w4a8", "ort")
# Every form computes the reference's products up to float32 rounding (w4a8 in integers). The ort form's
# MatMulNBits(bits=8, accuracy_level=4) re-quantizes the already-int8 activations per block of K (ONNX
# Runtime's kernel; passes/lower/emit_ort.py), so its reference does that too (ort_requantize).
TOLERANCE = 1e-5


def ref_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes [K, N] int8 and scales [N] float32 of symmetric per-output-channel int8 (codes rounded against the
    float64 scale, which is then stored as float32: the w8a8 recipe's definition, tests/quant/test_weight_quantizers.py)."""
    scale = np.abs(w.astype(np.float64)).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(w.astype(np.float64) / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    return out


def loaded(result, tmp_path, name="q.onnx") -> onnx.ModelProto:
    path = tmp_path / name
    result.save(path)
    return onnx.load(str(path))


def act_scale(model: onnx.ModelProto) -> np.float32:
    """The head's static activation scale as stored (the report rounds it)."""
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "lm_head.act_scale"))


def tied_model(vocab: int = 512, hidden: int = 64, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """input_ids -> Gather(emb) -> hidden linear -> LayerNorm -> MatMul(Transpose(emb)) -> logits: the LM head's
    weight is the embedding table (tied), as SmolLM2's export writes it."""
    rng = np.random.default_rng(seed)
    w = {"emb": (rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float32),
         "w_hidden": (rng.standard_normal((hidden, hidden)) * 0.3).astype(np.float32),
         "gamma": (1.0 + rng.random(hidden)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "w_hidden"], ["hid"], name="hidden"),
             helper.make_node("LayerNormalization", ["hid", "gamma"], ["normed"], name="final_norm", axis=-1),
             helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["normed", "emb_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("input_ids", T.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["b", "s", vocab])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def token_ids(vocab: int, shape=(4, 16), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_int8_head_equals_numpy_reference(form, scheme, tmp_path):
    """bad_models.token_model: Gather -> hidden linear -> LM head 'lm_head' -> logits (head weight not tied)."""
    vocab = 96
    model = bad_models.token_model(vocab=vocab, seed=3)
    w_head = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_head"))
    bounds = {"static": dict(static_bound=1e6, dynamic_bound=2e6), "dynamic": dict(static_bound=0.0, dynamic_bound=1e-3)}
    ids = token_ids(vocab)
    # embedding float: the head's input stays inside its calibrated range, which the reference's clip assumes
    result = quantize(model, [{"input_ids": ids}], Config(lm_head="int8", embedding="float", format=form, group_size=16,
                                                          progress=False, **bounds[scheme]))
    row = next(r for r in result.layers if r["name"] == "lm_head")
    assert row["scheme"] == scheme and result.plan["lm_head"].weight == WeightSpec(8, None, True, "rtn")
    q = loaded(result, tmp_path)
    # The head's input in the quantized model (the hidden linear's output), then the logits.
    x, logits = session(with_outputs(q, ["hid"])).run(["hid", "logits"], {"input_ids": ids})
    codes, scale = ref_int8_per_channel(w_head)
    xq = fake_quant_static(x, act_scale(q)) if scheme == "static" else fake_quant_per_token(x)
    weight = codes.astype(np.float64) * scale.astype(np.float64)
    ref = xq @ weight
    err = rel_err(logits, ref)
    if form == "ort":   # K = 16: one MatMulNBits block a row
        exact, err = err, rel_err(logits, ort_requantize(xq, 16) @ weight)
        print(f"\nort {scheme}: against the scheme's reference alone {exact:.2e} (ORT re-quantizes per block)")
        assert exact <= 2e-2
    print(f"\n{form} {scheme}: int8 head vs numpy reference, relative error {err:.2e}")
    assert err <= TOLERANCE
    # The weights in the file are the reference's codes, whatever the layout.
    stored = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    if form == "ort":
        nbits = next(v for k, v in stored.items() if k.endswith("weight_nbits8"))
        assert np.array_equal(nbits.reshape(vocab, -1)[:, :w_head.shape[0]].astype(np.int16) - 128, codes.T)
    elif form == "qdq":   # codes + 128: MatMulInteger's uint8 operand (emit_qdq.integer_head)
        assert np.array_equal(stored["lm_head.weight_uint8"].astype(np.int16) - 128, codes)
    else:                 # W8A8MatMul's rows, one per output channel
        assert np.array_equal(stored["lm_head.weight_int8"], codes.T)
    assert not any(v.shape == w_head.shape and np.array_equal(v, w_head) for v in stored.values())   # no float copy


@pytest.mark.parametrize("form", FORMS)
def test_tied_embedding_table_is_stored_once_quantized(form, tmp_path):
    vocab, hidden = 2048, 64
    model, w = tied_model(vocab, hidden)
    float_path = tmp_path / "float.onnx"
    onnx.save(model, str(float_path))
    ids = token_ids(vocab)
    result = quantize(model, [{"input_ids": ids}], Config(lm_head="int8", format=form, group_size=32, progress=False))
    path = tmp_path / "q.onnx"
    result.save(path)
    q = onnx.load(str(path))
    stored = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    table_sized = {k: v for k, v in stored.items() if v.size >= vocab * hidden}
    # One copy of the table, 8-bit; no float one.
    assert len(table_sized) == 1 and next(iter(table_sized.values())).dtype.itemsize == 1, \
        {k: (v.dtype, v.shape) for k, v in table_sized.items()}
    assert not any(v.dtype.kind == "f" and v.size >= vocab * hidden // 2 for v in stored.values())
    # float: 4 bytes a table entry; now 1, plus one float32 scale per row (ort: one per block of 64 of a row).
    scale_bytes = vocab * 4 * (hidden // 64 if form == "ort" else 1)
    saved = float_path.stat().st_size - path.stat().st_size
    expected = vocab * hidden * 3 - scale_bytes
    print(f"\n{form}: float {float_path.stat().st_size} B, int8 tied {path.stat().st_size} B, saved {saved} (table alone: {expected})")
    assert expected - 16 * 1024 <= saved <= expected + 16 * 1024
    # The lookup returns exactly numpy's dequantized rows of the table, the head's own codes and scales.
    codes, scale = ref_int8_per_channel(w["emb"].T)   # the head's [K, N] weight is emb.T
    rows = (codes.T.astype(np.float32) * scale[:, None])[ids]
    h = session(with_outputs(q, ["h"])).run(["h"], {"input_ids": ids})[0]
    assert h.dtype == np.float32 and np.array_equal(h, rows)
    # The head: the same dequantized table, activations per token (a tied head leaves the LAE band as dynamic).
    row = next(r for r in result.layers if r["name"] == "lm_head")
    assert [g.name for g in result.plan.head.tied] == ["embed"]
    normed, logits = session(with_outputs(q, ["normed"])).run(["normed", "logits"], {"input_ids": ids})
    xq = fake_quant_static(normed, act_scale(q)) if row["scheme"] == "static" else fake_quant_per_token(normed)
    if form == "ort":   # K = 64: one MatMulNBits block a row
        xq = ort_requantize(xq, 64)
    ref = xq @ (codes.astype(np.float64) * scale.astype(np.float64))
    assert rel_err(logits, ref) <= TOLERANCE


def test_tied_head_in_the_lae_band_goes_per_token_and_keeps_the_table(tmp_path):
    model, w = tied_model()
    ids = token_ids(512)
    cfg = dict(static_bound=0.1, dynamic_bound=1e6, progress=False)   # the head's input lands in the LAE band
    untied = quantize(model, [{"input_ids": ids}], Config(lm_head="int4", **cfg))
    assert next(r for r in untied.layers if r["name"] == "lm_head")["scheme"] == "lae"
    tied = quantize(model, [{"input_ids": ids}], Config(lm_head="int8", **cfg))
    row = next(r for r in tied.layers if r["name"] == "lm_head")
    assert row["scheme"] == "dynamic" and tied.plan.head.tied and "tied embedding table" in row["reason"]   # the report says why


def test_int8_default_float_and_int4_alias():
    model = bad_models.token_model(vocab=40)
    ids = token_ids(40)
    default = quantize(model, [{"input_ids": ids}], Config(group_size=16, progress=False))
    assert Config().lm_head == "int8" and not default.kept_float
    assert default.plan.head.mode == "int8" and default.plan["lm_head"].weight.bits == 8
    kept = quantize(model, [{"input_ids": ids}], Config(lm_head="float", group_size=16, progress=False))
    assert [k["name"] for k in kept.kept_float] == ["lm_head"] and "lm_head" not in {r["name"] for r in kept.layers}
    for cfg in (Config(quantize_lm_head=True), Config(lm_head="int4")):
        assert cfg.lm_head_mode == "int4"
        result = quantize(model, [{"input_ids": ids}], Config(**{**cfg.to_dict(), "group_size": 16, "progress": False}))
        row = next(r for r in result.layers if r["name"] == "lm_head")
        assert not result.kept_float and result.plan["lm_head"].weight.group_size == row["group_size"] == 16
    with pytest.raises(FptqError, match="unknown lm_head"):
        Config(lm_head="int2").validate()
    with pytest.raises(FptqError, match="for the LM head"):
        Config(lm_head="int4", lm_head_group_size=48, format="ort", group_size=32).validate()


def test_cli_lm_head(tmp_path, capsys):
    from fptq_graph.cli import main

    model, _ = tied_model()
    src = tmp_path / "tied.onnx"
    onnx.save(model, str(src))
    for choice in ("int8", "int4", "float"):
        out = tmp_path / f"{choice}.onnx"
        assert main(["quantize", str(src), "-o", str(out), "--calib-random", "4", "--seq-len", "16",
                     "--group-size", "32", "--lm-head", choice, "-q"]) == 0
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert main(["inspect", str(out)]) == 0
        shown = capsys.readouterr().out
        if choice == "float":
            assert "kept float: lm_head" in shown
        else:
            assert "\nlm_head " in shown and ("Gather" in ops) and (("DequantizeLinear" in ops))
    assert main(["quantize", str(src), "-o", str(tmp_path / "alias.onnx"), "--calib-random", "4", "--seq-len", "16",
                 "--group-size", "32", "--quantize-lm-head", "-q"]) == 0
    with pytest.raises(SystemExit):   # argparse refuses a choice it does not know
        main(["quantize", str(src), "-o", str(tmp_path / "bad.onnx"), "--calib-random", "4", "--lm-head", "int2"])
