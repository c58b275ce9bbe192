"""Issue 12's fuzzer: hypothesis draws small models (good ones and mutated ones) and command lines
(quantize, eval, inspect, with outputs that alias inputs, each other, folders or nothing) and checks,
for every draw, what a user is promised:

- the exit code is 0 (done) or 2 (refused with a message), never a crash;
- stderr holds no Python traceback, and a refusal is one "fptq-graph: error:" line;
- every input's bytes are unchanged;
- a failed run leaves the folder exactly as it was; a successful one adds only the outputs asked for,
  and a written model passes onnx.checker (or loads in ONNX Runtime, for contrib ops).

Seeded and bounded (FUZZ_EXAMPLES draws, tiny models) so that CI runs it in about a minute.
"""
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from onnx import TensorProto as T

import bad_models as B
from fptq_graph.cli import main

FUZZ_EXAMPLES = int(os.environ.get("FPTQ_FUZZ_EXAMPLES", "60"))

MODELS = {
    "tokens": lambda: B.token_model(),
    "tokens fp16": lambda: B.token_model(dtype=T.FLOAT16),
    "tokens float64": lambda: B.token_model(dtype=T.DOUBLE),
    "tokens rank-1": lambda: B.token_model(ids_shape=("s",)),
    "tokens with positions": lambda: B.token_model(positions=8),
    "float input": lambda: B.float_input_model(),
    "inf weight": B.inf_in_first_weight,
    "linear in If": B.matmul_in_if,
    "unsupported linears": B.unsupported_linears,
    "no inputs": B.no_inputs,
}


def mutate(model: onnx.ModelProto, mutation: str, data) -> bytes:
    """The model's bytes after one mutation a real file might have."""
    if mutation == "drop value_info and output shapes":
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")
    elif mutation == "input to int32" and model.graph.input:
        model.graph.input[0].type.tensor_type.elem_type = T.INT32
    elif mutation == "input to bfloat16" and model.graph.input:
        model.graph.input[0].type.tensor_type.elem_type = T.BFLOAT16
    elif mutation == "opset 13":
        model.opset_import[0].version = 13
    elif mutation == "ir version 99":
        model.ir_version = 99
    elif mutation == "no metadata":
        del model.metadata_props[:]
    model.ir_version = model.ir_version or 10
    raw = model.SerializeToString()
    if mutation == "truncated":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut at")]
    elif mutation == "one byte flipped" and raw:
        at = data.draw(st.integers(0, len(raw) - 1), label="byte")
        raw = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]
    return raw


MUTATIONS = ["none"] * 8 + ["drop value_info and output shapes", "input to int32", "input to bfloat16", "opset 13",
             "ir version 99", "no metadata", "truncated", "one byte flipped"]


def output_path(kind: str, folder: Path, fresh: str) -> str:
    return {"fresh": str(folder / fresh), "the input": str(folder / "in.onnx"), "the text": str(folder / "text.txt"),
            "hard link to the input": str(folder / "link.onnx"), "the folder": str(folder), "empty": "",
            "missing folder": str(folder / "missing" / fresh), "symlink to the input": str(folder / "sym.onnx"),
            "shared": str(folder / "shared.out")}[kind]


OUTPUT_KINDS = ["fresh", "fresh", "fresh", "the input", "the text", "hard link to the input", "the folder", "empty",
                "missing folder", "symlink to the input", "shared"]


# Per knob: (value when it is not the one drawn to be wrong, values it takes when it is). One wrong knob
# per draw at most, so most runs get far enough to write something.
QUANTIZE_KNOBS = {
    "-o": ("fresh", OUTPUT_KINDS[3:]),
    "--report": (None, ["fresh", *OUTPUT_KINDS[3:]]),
    "--calib-random": ("2", ["-1", "0", "1", "3"]),
    "--format": ("qdq", ["w4a8", "ort"]),
    "--group-size": ("16", ["8", "32", "512", "3", "0", "-8"]),
    "--recipe": ("fptq", ["dynamic-w4a8", "rtn-w4a16", "smoothquant-w4a8", "w8a8-smoothquant", "naive-w4a8"]),
    "--seq-len": ("8", ["4", "1", "0", "-1", "16"]),
    "--batch-size": ("2", ["1", "0"]),
    "--sqnr-samples": ("0", ["1", "-1"]),
    "--calib": (None, ["text"]),
    "--asymmetric": (False, [True]),
    "--gptq": (False, [True]),
    "--quantize-lm-head": (False, [True]),
}


def command(data, folder: Path) -> list[str]:
    which = data.draw(st.sampled_from(["quantize", "quantize", "quantize", "eval", "inspect"]), label="command")
    model = str(folder / "in.onnx")
    if which == "quantize":
        odd = data.draw(st.sampled_from([None, None, None, *QUANTIZE_KNOBS]), label="knob drawn to be unusual")
        value = {k: (data.draw(st.sampled_from(bad), label=k) if k == odd else good)
                 for k, (good, bad) in QUANTIZE_KNOBS.items()}
        args = ["quantize", model, "-o", output_path(value["-o"], folder, "q.onnx")]
        if value["--report"]:
            args += ["--report", output_path(value["--report"], folder, "r.json")]
        if value["--calib"]:
            args += ["--calib", str(folder / "text.txt")]
        else:
            args += ["--calib-random", value["--calib-random"]]
        for flag in ("--format", "--group-size", "--recipe", "--seq-len", "--batch-size", "--sqnr-samples"):
            args += [flag, value[flag]]
        args += [flag for flag in ("--asymmetric", "--gptq", "--quantize-lm-head") if value[flag]]
        return args + ["-q"]
    if which == "eval":
        args = ["eval", model, "--text", str(folder / "text.txt"),
                "--seq-len", str(data.draw(st.sampled_from([4, 4, 2, 1, 0, -3]), label="seq"))]
        if data.draw(st.booleans(), label="max tokens?"):
            args += ["--max-tokens", str(data.draw(st.sampled_from([-100, 0, 1, 8, 100]), label="max"))]
        if data.draw(st.booleans(), label="json?"):
            args += ["--json", output_path(data.draw(st.sampled_from(OUTPUT_KINDS), label="--json"), folder, "e.json")]
        return args
    args = ["inspect", model]
    for flag, name in (("--report", "r.json"), ("--html", "r.html"), ("--plot", "r.png")):
        if data.draw(st.booleans(), label=flag):
            args += [flag, output_path(data.draw(st.sampled_from(OUTPUT_KINDS), label=flag), folder, name)]
    return args


def snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(folder))] = "dir"
    return out


def assert_valid(path: Path) -> None:
    """onnx.checker's approval, or for what it cannot vouch for (contrib ops, an input that already
    lacked what it requires) an ONNX Runtime session: the same rule the loader applies."""
    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except onnx.checker.ValidationError:
        from fptq_graph.runtime import session

        session(path)


def run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exc:   # argparse's own refusals (a missing value, a non-integer)
            code = exc.code
    return code, err.getvalue()


@seed(20261125)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_the_command_line(data):
    folder = Path(tempfile.mkdtemp(prefix="fptq-fuzz-"))
    try:
        name = data.draw(st.sampled_from(["tokens"] * 5 + ["float input"] * 2 + sorted(MODELS)), label="model")
        mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
        (folder / "in.onnx").write_bytes(mutate(MODELS[name](), mutation, data))
        (folder / "text.txt").write_text(data.draw(st.sampled_from(["", "x", "hello world " * 20]), label="text"))
        os.link(folder / "in.onnx", folder / "link.onnx")
        (folder / "sym.onnx").symlink_to(folder / "in.onnx")
        inputs = ["in.onnx", "link.onnx"]   # what the command reads (the hard link: the same file)
        if data.draw(st.sampled_from([False, False, False, True]), label="a quantized model first?"):
            run(["quantize", str(folder / "in.onnx"), "-o", str(folder / "in.q.onnx"), "--calib-random", "2",
                 "--seq-len", "8", "--group-size", "16", "-q"])
            if (folder / "in.q.onnx").exists():
                shutil.move(folder / "in.q.onnx", folder / "pre.onnx")
                os.replace(folder / "pre.onnx", folder / "in.onnx")   # a new inode: the hard link keeps the float model
                inputs.remove("link.onnx")
        args = command(data, folder)
        if str(folder / "text.txt") in args and args[args.index(str(folder / "text.txt")) - 1] in ("--calib", "--text"):
            inputs.append("text.txt")
        before = snapshot(folder)
        code, err = run(args)
        after = snapshot(folder)
        event(f"{args[0]} exit {code}")
        if code == 2 and os.environ.get("FPTQ_FUZZ_EVENTS") and args[0] == "quantize":
            event(err.strip().splitlines()[-1][19:].split(": ", 1)[-1][:60] if err.strip() else "(no message)")

        assert code in (0, 2), (args, code, err)
        assert "Traceback" not in err, (args, err)
        for kept in inputs:
            assert after.get(kept) == before[kept], (args, kept, err)
        if code == 2:
            lines = [l for l in err.splitlines() if l.strip()]
            assert lines and lines[-1].startswith(("fptq-graph: error:", "usage:", "fptq-graph ")) or "error:" in err, (args, err)
            assert after == before, (args, err, set(after) ^ set(before))
            return
        added = set(after) - set(before)
        assert all(not n.startswith(".") for n in added), (args, added)
        for n in added:
            if n.endswith(".onnx"):
                assert_valid(folder / n)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
