"""Messages name the user's file, node and cause (issue 22): no temporary file of the run, no
"please report it" for what is a mistake in the model or the flags."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from fptq_graph import Config, quantize
from test_degenerate_statistics import K, N, one_linear


def test_ort_load_errors_name_the_node_not_a_temporary_file():
    from fptq_graph.errors import ModelLoadError
    from fptq_graph.ir.split_model import SplitModel
    from fptq_graph.runtime.sessions import session

    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="add_mixed")], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [2])], [helper.make_tensor_value_info("y", T.FLOAT, [2])],
                              [numpy_helper.from_array(np.ones(2, np.float16), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    for given in (model, SplitModel(model, {})):   # from bytes, and through a temporary file
        with pytest.raises(ModelLoadError) as caught:
            session(given)
        text = str(caught.value)
        assert "node (add_mixed)" in text and "fptq-" not in text and "model.onnx" not in text, text
        assert not text.split(": ", 1)[1].startswith(("FAIL", "[ONNXRuntimeError]")), text


def test_a_group_larger_than_k_says_it_became_per_channel():
    result = quantize(one_linear(), [{"x": np.random.default_rng(9).standard_normal((2, 16, K)).astype(np.float32)}],
                      Config(group_size=128, sqnr_samples=0, progress=False, weight_quantizer="rtn"))
    row = next(r for r in result.layers if r["name"] == "linear")
    assert "group 128 > K 64: one group spans K (per output channel)" in row["reason"], row["reason"]


def test_contradictory_lm_head_flags_are_refused(tmp_path, capsys):
    import bad_models as B
    from fptq_graph.cli import main

    B.save(B.token_model(), tmp_path / "in.onnx")
    code = main(["quantize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib-random", "2",
                 "--seq-len", "8", "--lm-head", "float", "--quantize-lm-head"])
    err = capsys.readouterr().err
    assert code == 2 and "--quantize-lm-head (the older switch for --lm-head int4) contradicts --lm-head float" in err, err
    assert not (tmp_path / "q.onnx").exists()
    assert main(["quantize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib-random", "2",
                 "--seq-len", "8", "--lm-head", "int4", "--quantize-lm-head", "-q"]) == 0


def test_a_shape_mismatch_in_the_users_model_names_the_node(tmp_path, capsys):
    """Inner dimensions that differ: one line naming the node and both sizes, not a reshape failure from
    inside calibration with 'please report it'."""
    from fptq_graph.cli import main

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="first"), helper.make_node("MatMul", ["y", "w2"], ["z"], name="second")],
        "g", [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", K])], [helper.make_tensor_value_info("z", T.FLOAT, ["b", "s", 8])],
        [numpy_helper.from_array(np.ones((K, N), np.float32), "w"), numpy_helper.from_array(np.ones((40, 8), np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "bad.onnx"))
    code = main(["quantize", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib-random", "2", "--seq-len", "8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == (f"fptq-graph: error: MatMul 'second' multiplies 'y' (last dimension {N}) by a [40, 8] "
                                 "weight: the inner dimensions differ, so the model cannot run"), err


def expand_positions_model() -> onnx.ModelProto:
    """ids [b, s] -> Expand of a [1, 16] position table to the ids' shape (fails past 16 tokens, or on 0)."""
    graph = helper.make_graph([helper.make_node("Shape", ["ids"], ["shape"]),
                               helper.make_node("Expand", ["table", "shape"], ["y"], name="expand_positions")], "g",
                              [helper.make_tensor_value_info("ids", T.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((1, 16), np.float32), "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_a_sequence_past_the_position_table_says_so():
    """ORT's 'invalid expand shape' (a [1, P] position table expanded to [batch, S]) with the sequence
    length and what to change."""
    from fptq_graph.errors import CalibrationError
    from fptq_graph.runtime import ort_errors
    from fptq_graph.runtime.sessions import session

    model = expand_positions_model()
    with pytest.raises(CalibrationError, match=r"expand_positions.*a sequence \(32 tokens\) longer than the model's "
                                               r"position table.*lower --seq-len"):
        ort_errors.run(session(model), ["y"], {"ids": np.zeros((2, 32), np.int64)}, "calibration batch 0")



def test_a_zero_size_input_is_named_with_all_of_ort_detail():
    """An input with an empty axis: the message names the input and its shape, and keeps every line of ORT's
    own message (the node and its shapes); an empty KV past (the prompt step) is not blamed."""
    from fptq_graph.errors import CalibrationError
    from fptq_graph.runtime import ort_errors
    from fptq_graph.runtime.sessions import session

    model = expand_positions_model()
    with pytest.raises(CalibrationError, match=r"expand_positions.*input 'ids' \[2, 0\] has a zero-size dimension") as caught:
        ort_errors.run(session(model), ["y"], {"ids": np.zeros((2, 0), np.int64)}, "calibration batch 0")
    assert "\n" not in str(caught.value)
    failure = ort_errors.run_failure(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : node 'attn'\nindex 3 out of [0, 2]"),
                                     "eval window 0", {"input_ids": np.zeros((1, 4), np.int64),
                                                       "past_key_values.0.key": np.zeros((1, 2, 0, 8), np.float32)})
    assert "node 'attn' index 3 out of [0, 2]" in str(failure) and "zero-size" not in str(failure)
