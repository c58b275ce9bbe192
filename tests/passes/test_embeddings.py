"""Untied embedding tables quantized (Config.embedding / --embedding), every form against numpy.

The reference is numpy in float64, independent of fptq_graph: int8 with one scale per row
(s = max|row| / 127, q = round(row / s) in [-127, 127]) and symmetric INT4 in groups along the row (the
group's largest-magnitude value m on -8: s = m / -8, q = round(x / s) clipped to [-8, 7]), the scale
stored in the table's type, dequantized q * s in that type. Every form writes that product, so the
lookups equal the reference exactly (tolerance 0).
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from fptq_graph import Config, FptqError, quantize
from fptq_graph.runtime import session
from test_lm_head import tied_model, token_ids

VOCAB, HIDDEN, POSITIONS, OUT = 300, 72, 40, 64   # 72: not a multiple of 32, so the last group is partial


def untied_model(dtype=np.float32, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """Word and position lookups (their own tables, as BERT's) -> Add -> LayerNorm -> linear; the lookups are
    outputs too."""
    rng = np.random.default_rng(seed)
    w = {"emb": (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(dtype),
         "pos": (rng.standard_normal((POSITIONS, HIDDEN)) * 0.1).astype(dtype),
         "w1": (rng.standard_normal((HIDDEN, OUT)) * 0.3).astype(dtype),
         "gamma": (1 + rng.random(HIDDEN)).astype(dtype)}
    w["emb"][7] = 0   # a row of zeros (a padding token): scale 1, codes 0
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["pos", "position_ids"], ["p"], name="embed_positions"),
             helper.make_node("Add", ["e", "p"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma"], ["n"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["n", "w1"], ["y"], name="fc")]
    tt = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "untied", [helper.make_tensor_value_info("input_ids", T.INT64, ["b", "s"]),
                                                helper.make_tensor_value_info("position_ids", T.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", tt, ["b", "s", OUT])]
                              + [helper.make_tensor_value_info(name, tt, ["b", "s", HIDDEN]) for name in ("e", "p")],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def feeds(count: int = 4, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (2, 8)), "position_ids": np.tile(np.arange(8), (2, 1))}
            for _ in range(count)]


def ref_table(table: np.ndarray, bits: int, group: int) -> np.ndarray:
    """The dequantized table as the module docstring defines it, in the table's type."""
    t = table.astype(np.float64)
    if bits == 8:
        scale = np.abs(t).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(t / scale), -127, 127)
    else:
        q, scale = np.empty_like(t), np.empty((t.shape[0], -(-t.shape[1] // group)))
        for b, start in enumerate(range(0, t.shape[1], group)):
            block = t[:, start:start + group]
            extreme = np.take_along_axis(block, np.abs(block).argmax(axis=1)[:, None], axis=1)[:, 0]
            scale[:, b] = np.where(extreme != 0, -extreme / 8.0, 1.0)
            q[:, start:start + group] = np.clip(np.round(block / scale[:, b:b + 1]), -8, 7)
        scale = np.repeat(scale, group, axis=1)[:, :t.shape[1]]
    stored = scale.astype(np.float32).astype(table.dtype)   # float32 scales, then the table's type
    return q.astype(table.dtype) * stored


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("form", ["qdq", "w4a8", "ort"])
def test_lookups_equal_numpy_reference(form, mode, dtype, tmp_path):
    model, w = untied_model(dtype)
    before = model.SerializeToString()
    calib = feeds()
    result = quantize(model, calib, Config(format=form, embedding=mode, group_size=32, calib_samples=4, progress=False))
    assert model.SerializeToString() == before   # the input is never modified
    result.save(tmp_path / "q.onnx")
    saved = onnx.load(str(tmp_path / "q.onnx"))
    floats = {i.name for i in saved.graph.initializer if i.data_type in (T.FLOAT, T.FLOAT16) and len(i.dims) == 2}
    assert not floats & {"emb", "pos"}, "a float table is still in the file"
    bits = 8 if mode == "int8" else 4
    emb, pos = ref_table(w["emb"], bits, 32), ref_table(w["pos"], bits, 32)
    run = session(str(tmp_path / "q.onnx"))
    for feed in calib[:2]:
        e, p = run.run(["e", "p"], feed)
        assert e.dtype == p.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(e, emb[feed["input_ids"]])
        np.testing.assert_array_equal(p, pos[feed["position_ids"]])
    rows = {r["table"]: r for r in result.embeddings}
    assert rows["emb"]["mode"] == mode and rows["emb"]["shape"] == [VOCAB, HIDDEN]
    # shrinks (the ort form pads a row of 72 to whole blocks of 32 and repeats an int8 row's scale per block)
    assert rows["emb"]["bytes"] < rows["emb"]["float_bytes"] * (0.75 if dtype == np.float16 else 0.5)
    error = ref_table(w["emb"], bits, 32).astype(np.float64) - w["emb"]
    sqnr = 10 * np.log10(np.square(w["emb"].astype(np.float64)).sum() / np.square(error).sum())
    assert rows["emb"]["sqnr_db"] == pytest.approx(sqnr, abs=0.5)   # float16 tables: its scales' rounding
    assert result.report()["embeddings"] == result.embeddings


def test_default_follows_the_head(tmp_path):
    model, _ = untied_model()
    default = quantize(model, feeds(), Config(calib_samples=4, progress=False))
    assert {r["table"]: r["mode"] for r in default.embeddings} == {"emb": "int8", "pos": "int8"}
    kept = quantize(model, feeds(), Config(lm_head="float", calib_samples=4, progress=False))
    assert kept.embeddings == [] and kept.stats("emit_embeddings")["tables"] == 0
    four = quantize(model, feeds(), Config(lm_head="int8", embedding="int4", group_size=32, calib_samples=4, progress=False))
    assert {r["mode"] for r in four.embeddings} == {"int4"}


def test_table_read_by_a_float_head_stays_float():
    """A tied table whose float head (lm_head='float' with embedding='int8') also reads it: a quantized copy
    would add to the file, so it stays float and the report says why."""
    model, _ = tied_model()
    calib = [{"input_ids": token_ids(512, seed=s)} for s in range(3)]
    result = quantize(model, calib, Config(lm_head="float", embedding="int8", calib_samples=3, progress=False))
    (row,) = result.embeddings
    assert row["table"] == "emb" and row["mode"] == "float" and "lm_head" in row["note"]
    assert result.stats("emit_embeddings")["tables"] == 0


def test_tied_int8_head_keeps_its_one_table():
    """With the int8 head the tied lookup already reads the head's codes: no second table is written."""
    model, _ = tied_model()
    calib = [{"input_ids": token_ids(512, seed=s)} for s in range(3)]
    result = quantize(model, calib, Config(calib_samples=3, progress=False))
    assert result.embeddings == []
    assert result.stats("emit_qdq")["tied_lookups"] == 1


@pytest.mark.parametrize("cfg, message", [
    (dict(embedding="int2"), "unknown embedding 'int2'"),
    (dict(format="ort", embedding="int4", group_size=128, lm_head_group_size=48), "GatherBlockQuantized"),
    # An odd group is refused for what it is before any form's list of sizes is looked at.
    (dict(format="ort", group_size=7), "group_size must be an even number >= 2, got 7"),
    (dict(lm_head="int4", lm_head_group_size=7), "lm_head_group_size must be an even number >= 2, got 7"),
    (dict(lm_head="float", embedding="int4", lm_head_group_size=7), "the embedding's INT4 group .* got 7"),
])
def test_bad_settings_are_refused(cfg, message):
    with pytest.raises(FptqError, match=message):
        Config(**cfg).validate()


def test_an_unused_head_group_is_not_checked():
    """A float head and float tables never use lm_head_group, so an odd one is no error; an int8 head
    (per output channel) has no group either."""
    Config(lm_head="float", embedding="float", lm_head_group_size=7).validate()
    Config(lm_head="int8", embedding="int8", lm_head_group_size=7, format="ort").validate()


def test_cli_takes_embedding(tmp_path, capsys):
    from fptq_graph.cli import main

    model, _ = untied_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    calib = tmp_path / "calib.npz"
    f = feeds(1)[0]
    np.savez(calib, **f)
    code = main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                 "--embedding", "int4", "--group-size", "32", "--calib-samples", "2", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 embedding table(s) int4" in captured.out + captured.err


def test_inspect_lists_the_tables(tmp_path, capsys):
    from fptq_graph.cli import main

    model, _ = untied_model()
    result = quantize(model, feeds(), Config(calib_samples=4, progress=False))
    result.save(tmp_path / "q.onnx")
    assert main(["inspect", str(tmp_path / "q.onnx"), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "embedding emb 300x72: int8 per row" in out and "embedding pos 40x72" in out
    assert 'id="embeddings"' in (tmp_path / "r.html").read_text()


def test_a_rotary_cache_lookup_stays_float():
    """A constant table gathered by position whose rows no linear reads (a rotary cos cache) is not a token
    embedding: it stays float, and the report says why."""
    model, w = untied_model()
    cache = np.cos(np.arange(POSITIONS)[:, None] * np.linspace(0.1, 1, 12)[None]).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(cache, "cos_cache"))
    model.graph.node.append(helper.make_node("Gather", ["cos_cache", "position_ids"], ["cos"], name="rotary"))
    model.graph.output.append(helper.make_tensor_value_info("cos", T.FLOAT, ["b", "s", 12]))
    result = quantize(model, feeds(), Config(calib_samples=4, progress=False))
    rows = {r["table"]: r for r in result.embeddings}
    assert rows["cos_cache"]["mode"] == "float" and "not a token embedding" in rows["cos_cache"]["note"]
    assert rows["emb"]["mode"] == "int8"

