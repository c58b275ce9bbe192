"""The split model: weights mapped from the input file (inline or external data), never copied into a
protobuf message, handed to ONNX Runtime in place and streamed into the output file. Each check compares
against onnx's own loader and serializer (the independent reference)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fptq_graph import Config, quantize
from fptq_graph.errors import ModelLoadError
from fptq_graph.ir.load import load_split
from fptq_graph.ir.save import save_model
from fptq_graph.ir.protobuf_wire import read_varint, varint
from fptq_graph.runtime import session
from fptq_graph.ir.residency import mapping_of
from fptq_graph.ir.split_model import IN_MEMORY, SplitModel, is_in_memory, open_split, split_proto, write_external


def model_with_weights(rng):
    """x [b, 64] -> MatMul(w0, float32) -> Add(bias, small, stays inline) -> MatMul(w1) -> y, plus a
    float16 table and an int64 tensor read by Gather (types other than float32 map too)."""
    w0 = rng.standard_normal((64, 48)).astype(np.float32)
    w1 = rng.standard_normal((48, 40)).astype(np.float32)
    table = rng.standard_normal((100, 16)).astype(np.float16)
    index = rng.integers(0, 100, size=300).astype(np.int64)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(np.ones(48, np.float32), "bias"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(index, "index")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="lin0"),
             helper.make_node("Add", ["h", "bias"], ["hb"]),
             helper.make_node("MatMul", ["hb", "w1"], ["y"], name="lin1"),
             helper.make_node("Gather", ["table", "index"], ["rows"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40]),
                               helper.make_tensor_value_info("rows", TensorProto.FLOAT16, [300, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def values(model: onnx.ModelProto, base_dir=None) -> dict:
    if base_dir is not None:
        onnx.load_external_data_for_model(model, str(base_dir))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def save_inline_or_external(model: onnx.ModelProto, path, external: bool):
    """onnx's own writer: every tensor inline, or every one in `<name>.data` beside it."""
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("external", [False, True])
def test_open_split_maps_weights_read_only(tmp_path, external):
    model = model_with_weights(np.random.default_rng(0))
    expected = values(model)
    path = save_inline_or_external(model, tmp_path / "m.onnx", external)
    split = open_split(path)
    # Inline, the 192-byte bias stays in the proto; external data is mapped whatever its size.
    assert set(split.arrays) == {"w0", "w1", "table", "index"} | ({"bias"} if external else set())
    for name, array in split.arrays.items():
        assert mapping_of(array) is not None and not array.flags.writeable, name   # mapped, not read
        np.testing.assert_array_equal(array, expected[name])
        init = next(i for i in split.proto.graph.initializer if i.name == name)
        assert is_in_memory(init) and not init.raw_data
    full = values(split.full())
    assert full.keys() == expected.keys() and all(np.array_equal(full[k], expected[k]) for k in expected)
    with pytest.raises(ValueError):
        split.arrays["w0"][0, 0] = 1.0                                   # the input cannot be written


def test_streamed_inline_file_equals_onnx_serialization(tmp_path):
    model = model_with_weights(np.random.default_rng(1))
    split = split_proto(model)
    out = save_model(split, tmp_path / "out.onnx")
    reread = onnx.load(str(out))
    onnx.checker.check_model(reread, full_check=True)
    got, expected = values(reread), values(model)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert [n.SerializeToString() for n in reread.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert not (tmp_path / "out.onnx.data").exists()
    assert all(i.data_location == TensorProto.DEFAULT for i in reread.graph.initializer)


def test_external_writer_aligns_and_round_trips(tmp_path):
    model = model_with_weights(np.random.default_rng(2))
    write_external(split_proto(model), tmp_path / "ext.onnx", "ext.onnx.data")
    header = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    offsets = [int(e.value) for i in header.graph.initializer for e in i.external_data if e.key == "offset"]
    assert len(offsets) == 4 and all(o % 4096 == 0 for o in offsets)
    got, expected = values(header, tmp_path), values(model)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_session_uses_arrays_in_place_and_matches_onnx(tmp_path):
    rng = np.random.default_rng(3)
    model = model_with_weights(rng)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    expected = session(model).run(None, {"x": x})
    got = session(split_proto(model)).run(None, {"x": x})
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_split_proto_leaves_the_input_alone():
    model = model_with_weights(np.random.default_rng(4))
    before = model.SerializeToString()
    split = split_proto(model)
    assert model.SerializeToString() == before
    assert isinstance(split, SplitModel) and all(is_in_memory(i) for i in split.proto.graph.initializer if i.name in split.arrays)


def test_quantize_from_a_path_leaves_the_file_untouched(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "m.onnx"
    onnx.save_model(model_with_weights(rng), str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    calib = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(2)]
    result = quantize(path, calib, Config(group_size=16, progress=False))
    out = result.save(tmp_path / "q.onnx")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    reread = onnx.load(str(out))
    onnx.checker.check_model(reread, full_check=True)
    assert not any(e.value == IN_MEMORY for i in reread.graph.initializer for e in i.external_data)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y_file = session(out).run(["y"], {"x": x})[0]
    y_object = session(result.model).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(y_file, y_object)
    assert len(result.layers) == 2 and all(r["output_sqnr_db"] > 10 for r in result.layers)


def test_truncated_inline_file_is_refused_by_name(tmp_path):
    path = tmp_path / "cut.onnx"
    data = model_with_weights(np.random.default_rng(6)).SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        load_split(path)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**35 + 5, 2**63 - 1])
def test_varint_round_trip(value):
    encoded = varint(value)
    assert read_varint(encoded, 0) == (value, len(encoded))


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model = model_with_weights(np.random.default_rng(7))
    (tmp_path / "inner").mkdir()
    onnx.save_model(model, str(tmp_path / "w.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    header = onnx.load(str(tmp_path / "w.onnx"), load_external_data=False)
    for init in header.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    onnx.save_model(header, str(tmp_path / "inner" / "escape.onnx"))
    with pytest.raises(ModelLoadError, match="escape.onnx.*outside the model's folder"):
        load_split(tmp_path / "inner" / "escape.onnx")


# Opening a model maps each file once (split_model._FileMaps): the descriptors it takes do not grow with
# its tensor count. Run in a child process whose RLIMIT_NOFILE is what it already has open plus 48: a
# mapping per tensor (before) needed one descriptor per tensor, hundreds here, and failed.
_LOW_LIMIT = """
import os, resource, sys
import numpy as np
sys.path.insert(0, {tests!r})
from fptq_graph.ir.split_model import open_split
from fptq_graph.runtime import session
{imports}
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
{body}
print("ok")
"""


def _run_low_limit(tmp_path, body: str, imports: str = "") -> None:
    script = tmp_path / "low_limit.py"
    script.write_text(_LOW_LIMIT.format(tests=str(Path(__file__).parents[1]), imports=imports, body=body))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _many_tensor_chain(count: int) -> onnx.ModelProto:
    """x -> MatMul(w_i) -> ... : `count` weights of 16 x 16 float32 (1 KiB each: every one mapped)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(count):
        w = (np.eye(16) + rng.normal(0, 1e-3, (16, 16))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}" if i < count - 1 else "y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("external", [False, True])
def test_thousands_of_tensors_open_twice_under_a_low_descriptor_limit(tmp_path, external):
    model = _many_tensor_chain(3000)
    expected = np.ones((1, 16), np.float32)
    for init in model.graph.initializer:
        expected = expected @ numpy_helper.to_array(init)
    path = save_inline_or_external(model, tmp_path / "chain.onnx", external)
    np.save(tmp_path / "expected.npy", expected)
    _run_low_limit(tmp_path, f"""
first, second = open_split({str(path)!r}), open_split({str(path)!r})   # quantize's float and output models
assert len(first.arrays) == len(second.arrays) == 3000
y = session(second).run(None, {{"x": np.ones((1, 16), np.float32)}})[0]
np.testing.assert_allclose(y, np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-4)
""")


def test_block_by_block_runs_under_a_low_descriptor_limit(tmp_path):
    """A 24-layer LLaMA (170 mapped tensors) quantized block by block with 48 descriptors to spare."""
    from fptq_graph.exporters import export_hf_streaming
    from tiny_models import tiny_llama

    hf = tiny_llama(vocab=300, hidden=32, intermediate=64, layers=24)
    hf.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "m.onnx"
    export_hf_streaming(tmp_path / "hf", path)
    assert len(open_split(path).arrays) > 150
    out = tmp_path / "q.onnx"
    _run_low_limit(tmp_path, f"""
result = quantize({str(path)!r}, 2, Config(recipe="fptq-paper", group_size=32, calib_samples=2, calib_seq_len=32,
                                           calib_batch_size=2, sqnr_samples=1, progress=False, sequential=True))
assert result.run["mode"] == "block by block", result.run
result.save({str(out)!r})
""", imports="from fptq_graph import Config, quantize")
    assert out.stat().st_size > 0
