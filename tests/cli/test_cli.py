"""The command line: the happy path on a crafted model, inspect, and every bad input the issue lists."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import crafted as C
from conftest import CALIB_TEXT as CALIB
from fptq_graph.cli import main


def token_model(tmp_path, nan: bool = False, with_linear: bool = True) -> str:
    """input_ids -> Gather(embedding) -> [Sqrt (NaN for negative entries)] -> LayerNorm -> MatMul."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="embed")]
    last = "h0"
    if nan:
        nodes.append(helper.make_node("Sqrt", ["h0"], ["h1"], name="sqrt"))
        last = "h1"
    nodes.append(helper.make_node("LayerNormalization", [last, "g", "b"], ["y"], name="ln", axis=-1))
    inits = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(np.ones(16, np.float32), "g"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b")]
    if with_linear:
        nodes.append(helper.make_node("MatMul", ["y", "w"], ["out"], name="proj"))
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"))
    else:
        nodes.append(helper.make_node("Relu", ["y"], ["out"], name="relu"))
    graph = helper.make_graph(nodes, "tok", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 8 if with_linear else 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / ("nan.onnx" if nan else "tok.onnx" if with_linear else "nolinear.onnx")
    return C.save(model, path)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, out_path, *needles):
    assert code != 0
    # Progress lines may precede it; the error itself is exactly one line, the last, and no traceback.
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("fptq-graph: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert not out_path.exists()
    assert not [p for p in out_path.parent.iterdir() if p.name.startswith("." + out_path.name)], "temp file left"


@pytest.mark.parametrize("recipe", ["fptq", "naive-w4a8", "dynamic-w4a8", "smoothquant-w4a8", "w8a8-smoothquant", "rtn-w4a16"])
def test_every_recipe_from_the_command_line(recipe, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code, _, _ = run_cli(["quantize", token_model(tmp_path), "-o", out, "--calib-random", "4", "--seq-len", "8",
                          "--group-size", "16", "--recipe", recipe, "-q"], capsys)
    assert code == 0
    onnx.checker.check_model(str(out), full_check=True)
    scheme = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["fptq_graph.report"])["layers"][0]["scheme"]
    # The token model's LN output has v about 3 (unit gain), so FPTQ makes it static.
    expected = {"fptq": "static", "naive-w4a8": "static", "dynamic-w4a8": "dynamic", "smoothquant-w4a8": "smooth",
                "w8a8-smoothquant": "smooth", "rtn-w4a16": "float"}
    assert scheme == expected[recipe]


def test_quantize_report_and_inspect(tmp_path, capsys):
    src = token_model(tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, _ = run_cli(["quantize", src, "-o", out, "--calib-random", "6", "--seq-len", "12",
                               "--group-size", "32", "--report", report, "-q"], capsys)
    assert code == 0 and out.is_file()
    data = json.loads(report.read_text())
    (layer,) = data["layers"]
    assert layer["name"] == "proj" and layer["K"] == 16 and layer["N"] == 8 and layer["group_size"] == 32
    assert layer["scheme"] in ("static", "lae", "dynamic") and layer["reason"]
    assert {"act_max_before", "act_max_after"} <= set(layer)
    code, stdout, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and "proj" in stdout and layer["scheme"] in stdout and "find_linears" in stdout
    code, stdout, _ = run_cli(["inspect", src], capsys)
    assert code == 0 and "not quantized" in stdout and "proj" in stdout


@pytest.mark.parametrize("recipe", ["fptq", "dynamic-w4a8", "rtn-w4a16"])
def test_format_w4a8_from_the_command_line(recipe, tmp_path, capsys):
    src, out = token_model(tmp_path), tmp_path / "w4a8.onnx"
    code, stdout, _ = run_cli(["quantize", src, "-o", out, "--calib-random", "4", "--seq-len", "8",
                               "--group-size", "16", "--recipe", recipe, "--format", "w4a8", "-q"], capsys)
    assert code == 0, stdout
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    # weights-only layers keep the qdq weight form: the op quantizes its input to int8 by definition
    assert ops.count("W4A8MatMul") == (0 if recipe == "rtn-w4a16" else 1), ops
    assert ("fptq", 1) in [(o.domain, o.version) for o in model.opset_import] or recipe == "rtn-w4a16"
    ids = np.random.default_rng(1).integers(0, 50, (2, 5))
    from fptq_graph.runtime import session
    assert np.all(np.isfinite(session(out).run(None, {"input_ids": ids})[0]))
    code, stdout, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and "proj" in stdout and "emit_w4a8" in stdout


def test_format_w4a8_with_asymmetric_weights_is_refused(tmp_path, capsys):
    out = tmp_path / "w4a8.onnx"
    code, _, err = run_cli(["quantize", token_model(tmp_path), "-o", out, "--calib-random", "2", "--format", "w4a8",
                            "--asymmetric"], capsys)
    assert_clean_failure(code, err, out, "symmetric")


def _not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a protobuf\n" * 20)
    return bad


def _truncated(tmp_path):
    data = open(token_model(tmp_path), "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _empty_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    return empty


# (case, model maker, calibration arguments, words the one-line error must contain)
BAD_INPUTS = [
    ("not onnx", _not_onnx, lambda t: ["--calib-random", "2"], ["notes.onnx", "not a readable ONNX model"]),
    ("truncated", _truncated, lambda t: ["--calib-random", "2"], ["cut.onnx"]),
    ("missing", lambda t: t / "nope.onnx", lambda t: ["--calib-random", "2"], ["nope.onnx", "no such file"]),
    ("no linear", lambda t: token_model(t, with_linear=False), lambda t: ["--calib-random", "2"], ["no quantizable linear"]),
    ("empty text", token_model, lambda t: ["--calib", _empty_text(t), "--tokenizer", t], ["empty.txt", "empty"]),
    ("zero samples", token_model, lambda t: ["--calib-random", "0"], ["at least one"]),
    ("bad tokenizer", token_model, lambda t: ["--calib", CALIB, "--tokenizer", t], ["could not load a tokenizer"]),
    ("nan", lambda t: token_model(t, nan=True), lambda t: ["--calib-random", "4", "--seq-len", "8"], ["NaN or Inf", "proj"]),
]


@pytest.mark.parametrize("case,make_model,calib_args,needles", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_cleanly(case, make_model, calib_args, needles, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["quantize", make_model(tmp_path), "-o", out, *calib_args(tmp_path)], capsys)
    assert_clean_failure(code, err, out, *needles)


def test_text_that_tokenizes_to_nothing(minilm_onnx, tmp_path, capsys):
    text = tmp_path / "controls.txt"
    text.write_text("\x01\x02\x03 \x04\x05 \u200b\x06\n" * 10)   # BERT's tokenizer drops control characters
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["quantize", minilm_onnx, "-o", out, "--calib", text], capsys)
    assert_clean_failure(code, err, out, "tokenizes to nothing")


def test_nan_during_calibration(tmp_path, capsys):
    src = token_model(tmp_path, nan=True)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["quantize", src, "-o", out, "--calib-random", "4", "--seq-len", "8"], capsys)
    assert_clean_failure(code, err, out, "NaN or Inf", "proj")


def test_real_process_exit_code_and_help(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "fptq_graph.cli", "quantize", str(bad), "-o", str(out),
                           "--calib-random", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and not out.exists()
    for cmd in ("export", "quantize", "inspect"):
        proc = subprocess.run([sys.executable, "-m", "fptq_graph.cli", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: fptq-graph " + cmd in proc.stdout


def test_generate_on_a_corrupt_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x0a\x3a\xff\xff\xff\x0fgarbage")   # a graph field whose length runs past the end
    code, _, err = run_cli(["generate", bad, "--prompt", "hello"], capsys)
    assert_clean_failure(code, err, tmp_path / "none", "broken.onnx", "not a readable ONNX model")
