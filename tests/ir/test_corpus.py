"""Issue 5's robustness corpus, beyond test_cli's bad inputs: each case quantizes correctly (checked
against the numpy reference) or fails with one clear message, and never leaves a partial output."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import crafted as C
from fptq_graph import Config, FptqError, quantize
from fptq_graph.runtime import session


def linear_model(weights: dict, nodes: list, k: int, outputs: list[tuple[str, int]], opset: int = 21,
                 shape=("b", "s", None), dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    dims = [d if d is not None else k for d in shape] if shape is not None else None
    graph = helper.make_graph(nodes, "corpus", [helper.make_tensor_value_info("x", dtype, dims)],
                              [helper.make_tensor_value_info(name, dtype, [] if n is None else ["d0", "d1", n]) for name, n in outputs],
                              [numpy_helper.from_array(v, name) for name, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    return model


def calib(k, rng, batches=2):
    return [{"x": rng.standard_normal((2, 6, k)).astype(np.float32)} for _ in range(batches)]


def expected(x, w, act_scale, group):
    return C.fake_quant_static(x, act_scale) @ C.ref_int4(w, group)


def check_against_reference(result, feeds, outputs: dict):
    """outputs: model output -> (weight it was made from, linear name, group)."""
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    got = dict(zip([o.name for o in result.model.graph.output], session(result.model).run(None, feeds)))
    for name, (w, linear, group) in outputs.items():
        ref = expected(feeds["x"], w, float(inits[f"{linear}.act_scale"]), group)
        assert C.rel_err(got[name], ref) <= 1e-4, name


def test_weight_shared_by_two_matmuls_is_quantized_for_each():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("Relu", ["x"], ["xr"]), helper.make_node("MatMul", ["xr", "w"], ["b"], name="second")]
    model = linear_model({"w": w}, nodes, 16, [("a", 8), ("b", 8)])
    result = quantize(model, calib(16, rng), Config(recipe="fptq-paper", group_size=8, sqnr_samples=0, progress=False))
    assert [r["name"] for r in result.layers] == ["first", "second"]
    test = calib(16, np.random.default_rng(2), 1)[0]
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    got = session(result.model).run(None, test)
    ref_a = expected(test["x"], w, float(inits["first.act_scale"]), 8)
    ref_b = expected(np.maximum(test["x"], 0), w, float(inits["second.act_scale"]), 8)
    assert C.rel_err(got[0], ref_a) <= 1e-4 and C.rel_err(got[1], ref_b) <= 1e-4


def test_weight_also_read_by_a_non_linear_op_stays_for_it():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="lin"),
             helper.make_node("ReduceSum", ["w"], ["wsum"], keepdims=0)]   # reads the float weight itself
    model = linear_model({"w": w}, nodes, 16, [("a", 16), ("wsum", None)])
    result = quantize(model, calib(16, rng), Config(recipe="fptq-paper", group_size=16, sqnr_samples=0, progress=False))
    test = calib(16, np.random.default_rng(4), 1)[0]
    a, wsum = session(result.model).run(None, test)
    np.testing.assert_allclose(wsum, w.sum(), rtol=1e-5)             # the other user sees the float weight
    check_against_reference(result, test, {"a": (w, "lin", 16)})


@pytest.mark.parametrize("k,group", [(40, 128), (40, 32), (7, 4)])
def test_group_larger_than_k_or_not_dividing_it(k, group):
    rng = np.random.default_rng(k + group)
    w = rng.standard_normal((k, 5)).astype(np.float32)
    model = linear_model({"w": w}, [helper.make_node("MatMul", ["x", "w"], ["a"], name="lin")], k, [("a", 5)])
    result = quantize(model, calib(k, rng), Config(recipe="fptq-paper", group_size=group, sqnr_samples=0, progress=False))
    check_against_reference(result, calib(k, np.random.default_rng(9), 1)[0], {"a": (w, "lin", group)})


@pytest.mark.parametrize("shape", [None, ("b", "s", None), ("n0", "n1", "n2")], ids=["no shape", "dynamic", "all symbolic"])
def test_inputs_without_shapes_or_with_symbolic_dims(shape):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 6)).astype(np.float32)
    model = linear_model({"w": w}, [helper.make_node("MatMul", ["x", "w"], ["a"], name="lin")], 12, [("a", 6)],
                         shape=shape)
    result = quantize(model, calib(12, rng), Config(recipe="fptq-paper", group_size=4, sqnr_samples=0, progress=False))
    check_against_reference(result, calib(12, np.random.default_rng(6), 1)[0], {"a": (w, "lin", 4)})


def test_old_opset_is_upgraded():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    model = linear_model({"w": w}, [helper.make_node("MatMul", ["x", "w"], ["a"], name="lin")], 16, [("a", 4)],
                         opset=13)
    result = quantize(model, calib(16, rng), Config(recipe="fptq-paper", group_size=8, sqnr_samples=0, progress=False))
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 21
    assert result.model.ir_version == 10
    check_against_reference(result, calib(16, np.random.default_rng(8), 1)[0], {"a": (w, "lin", 8)})


def test_model_with_a_newer_ir_version_than_we_write(tmp_path):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    model = linear_model({"w": w}, [helper.make_node("MatMul", ["x", "w"], ["a"], name="lin")], 16, [("a", 4)])
    model.ir_version = 13   # what onnx 1.23 writes by default; onnxruntime 1.31 would refuse to load it
    path = tmp_path / "ir13.onnx"
    onnx.save(model, str(path))
    result = quantize(path, calib(16, rng), Config(recipe="fptq-paper", group_size=8, sqnr_samples=0, progress=False))
    assert result.model.ir_version == 10


def test_unknown_ir_version_is_refused_clearly(tmp_path):
    model = linear_model({"w": np.ones((4, 2), np.float32)}, [helper.make_node("MatMul", ["x", "w"], ["a"])], 4,
                         [("a", 2)])
    model.ir_version = 99
    path = tmp_path / "ir99.onnx"
    onnx.save(model, str(path))
    with pytest.raises(FptqError, match="ir99.onnx"):
        quantize(path, calib(4, np.random.default_rng(0)), Config(recipe="fptq-paper", progress=False))


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_inf_or_nan_in_a_weight_names_the_linear(bad):
    w = np.ones((8, 4), np.float32)
    w[3, 1] = bad
    model = linear_model({"w": w}, [helper.make_node("MatMul", ["x", "w"], ["a"], name="proj")], 8, [("a", 4)])
    with pytest.raises(FptqError, match="weight of linear 'proj' contains NaN or Inf"):
        quantize(model, calib(8, np.random.default_rng(0)), Config(recipe="fptq-paper", group_size=4, progress=False))


def test_bfloat16_model_fails_clearly():
    w = np.ones((8, 4), np.float32)
    model = linear_model({}, [helper.make_node("MatMul", ["x", "w"], ["a"], name="proj")], 8, [("a", 4)],
                         dtype=TensorProto.BFLOAT16)
    model.graph.initializer.append(helper.make_tensor("w", TensorProto.BFLOAT16, [8, 4], w.reshape(-1).tolist()))
    with pytest.raises(FptqError) as info:
        quantize(model, 2, Config(recipe="fptq-paper", progress=False))
    print(info.value)
    assert "bfloat16" in str(info.value)


def test_read_only_output_directory(tmp_path):
    if os.geteuid() == 0:
        # root writes through directory permissions: make the "directory" a file instead
        target_dir = tmp_path / "not-a-dir"
        target_dir.write_text("")
    else:
        target_dir = tmp_path / "ro"
        target_dir.mkdir()
        target_dir.chmod(0o500)
    rng = np.random.default_rng(0)
    model = linear_model({"w": rng.standard_normal((8, 4)).astype(np.float32)},
                         [helper.make_node("MatMul", ["x", "w"], ["a"], name="lin")], 8, [("a", 4)])
    result = quantize(model, calib(8, rng), Config(recipe="fptq-paper", group_size=4, sqnr_samples=0, progress=False))
    with pytest.raises(FptqError, match="output directory"):
        result.save(target_dir / "q.onnx")


KILLED_WRITER = r"""
import sys, numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
import fptq_graph.ir.save as io
k = 2048
w = numpy_helper.from_array(np.ones((k, 8192), np.float32), "w")
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["a"])], "big",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                      [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", 8192])], [w])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
print("writing", flush=True)
while True:
    io.save_model(m, sys.argv[1])
"""


def test_killed_mid_write_leaves_no_partial_file(tmp_path):
    """A 64 MiB model saved over and over; SIGKILL lands during some write. The target is either
    absent or a complete, loadable model: never a partial file."""
    target = tmp_path / "out.onnx"
    for delay in (0.05, 0.3, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            onnx.checker.check_model(onnx.load(str(target)))   # complete: a rename put it there whole
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]
        for p in staged:   # a killed writer's staging folder: hidden, never the requested name
            assert p.is_dir() and p.name != "out.onnx"


@pytest.mark.parametrize("ids_type", [TensorProto.INT32, TensorProto.INT64], ids=["int32", "int64"])
def test_embedding_tables_of_odd_shapes(ids_type):
    """Issue 22's tables: int32 ids, a table looked up both as stored and transposed (kept float, with the
    reason), and a table whose row width no linear reads (kept float): the quantized ones equal numpy's
    per-row int8 q * s exactly, the float ones their float rows."""
    rng = np.random.default_rng(4)
    k, v = 32, 32   # "both" is square, so its transposed lookups take the same ids
    w = {"emb": rng.standard_normal((v, k)).astype(np.float32), "both": rng.standard_normal((v, v)).astype(np.float32),
         "narrow": rng.standard_normal((v, 8)).astype(np.float32), "w": rng.standard_normal((k, 16)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="lookup"),
             helper.make_node("Gather", ["both", "ids"], ["b0"], name="as_stored"),
             helper.make_node("Transpose", ["both"], ["both_t"], perm=[1, 0]),
             helper.make_node("Gather", ["both_t", "ids"], ["b1"], name="transposed"),
             helper.make_node("Gather", ["narrow", "ids"], ["n"], name="narrow_lookup"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="linear")]
    graph = helper.make_graph(nodes, "tables", [helper.make_tensor_value_info("ids", ids_type, ["b", "s"])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "e", "b0", "b1", "n")],
                              [numpy_helper.from_array(a, name) for name, a in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    np_ids = helper.tensor_dtype_to_np_dtype(ids_type)
    feeds = [{"ids": rng.integers(0, v, (2, 6)).astype(np_ids)} for _ in range(2)]
    result = quantize(model, feeds, Config(group_size=16, progress=False))
    rows = {r["table"]: r for r in result.embeddings}
    assert rows["emb"]["mode"] == "int8"
    assert rows["both"]["mode"] == "float" and "both as stored and transposed" in rows["both"]["note"]
    assert rows["narrow"]["mode"] == "float" and "not a token embedding" in rows["narrow"]["note"]
    e, b0, b1, n = session(result.model).run(["e", "b0", "b1", "n"], feeds[0])
    table = w["emb"].astype(np.float64)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    ref = (np.clip(np.round(table / scale), -127, 127) * scale.astype(np.float32)).astype(np.float32)
    ids = feeds[0]["ids"]
    np.testing.assert_array_equal(e, ref[ids])
    np.testing.assert_array_equal(b0, w["both"][ids])
    np.testing.assert_array_equal(b1, w["both"].T[ids])
    np.testing.assert_array_equal(n, w["narrow"][ids])
