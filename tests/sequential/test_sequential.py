"""Block by block (issue 21): the blocks are found from the graph alone, a block-by-block run writes the
whole-graph run's model byte for byte where both fit (MiniLM, SmolLM2, a GenAI builder folder), spilled
activations and Ray workers change nothing, a killed run resumes to the same model, and the run says
which way it went and why."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import numpy as np
import pytest

import fingerprints as F
from fptq_graph.api import quantize
from fptq_graph.config import Config
from fptq_graph.errors import FptqError

EXPECTED = F.recorded()   # this CPU class's (fingerprints.py); whole_graph() computes a case it lacks
SMALL = dict(F.CALIBRATION)


def case(model: str, recipe: str = "fptq", form: str = "qdq", group: int = 128, symmetric: bool = True) -> dict:
    return dict(model=model, recipe=recipe, format=form, ort_accuracy_level=0, group_size=group, symmetric=symmetric)


def whole_graph(models, c: dict) -> str:
    """The whole-graph run's fingerprint of case `c`: as recorded on this CPU class, else computed here."""
    key = F.case_key(c)
    return EXPECTED[key] if key in EXPECTED else F.fingerprint_case(models[c["model"]], c)


def sequential_fingerprint(path, c: dict, **kwargs) -> tuple[str, object]:
    cfg = {k: v for k, v in c.items() if k != "model"}
    result = quantize(path, str(F.CALIB_TEXT), Config(**cfg, **SMALL, sequential=True), **kwargs)
    return F.graph_fingerprint(result.model), result


@pytest.fixture(scope="module")
def models(minilm_onnx, smollm2_onnx):
    return {"minilm": minilm_onnx, "smollm2": smollm2_onnx}


def test_blocks_are_found_from_the_structure(models):
    """MiniLM: the embedding, then its 6 layers of 6 linears; SmolLM2: the embedding, 30 layers of 7 linears
    (q, k, v, o, gate, up, down) and the LM head on its own."""
    from fptq_graph.api import _prepare
    from fptq_graph.passes.pipeline import default_pipeline
    from fptq_graph.sequential.run import plan_blocks

    for name, layers, per_layer in (("minilm", 6, 6), ("smollm2", 30, 7)):
        state, _ = _prepare(models[name], str(F.CALIB_TEXT), Config(**SMALL), None)
        default_pipeline("qdq").until("observed_model").run(state)
        blocks = plan_blocks(state)
        kinds = [b.kind for b in blocks]
        assert kinds[0] == "embedding" and not blocks[0].linears
        assert kinds.count("layer") == layers
        assert all(len(b.linears) == per_layer for b in blocks if b.kind == "layer")
        assert sum(len(b.linears) for b in blocks) == len(state.linears)
        if name == "smollm2":
            assert kinds[-1] == "head" and blocks[-1].linears == ["lm_head"]
        # past the first layer (which also hands on side tensors first made there: mask, rotary), a
        # block hands over exactly one tensor, the residual stream
        assert all(len(b.hand_over) == 1 for b in blocks[2:-1])


@pytest.mark.parametrize("c", [case("minilm"), case("minilm", "fptq-measured", "w4a8"), case("minilm", "fptq-awq", "ort", 32),
                               case("minilm", "smoothquant-w4a8", "qdq", 32, False), case("minilm", "w8a8-smoothquant"),
                               case("minilm", "fptq", "ort", 32, False)], ids=F.case_key)
def test_minilm_block_by_block_equals_the_whole_graph(models, c):
    fingerprint, result = sequential_fingerprint(models["minilm"], c)
    assert fingerprint == whole_graph(models, c)
    assert result.run["mode"] == "block by block" and len(result.run["blocks"]) == 7


@pytest.mark.parametrize("c", [case("smollm2"), case("smollm2", "fptq-paper", "w4a8", 32)], ids=F.case_key)
def test_smollm2_block_by_block_equals_the_whole_graph(models, c):
    """With its tied int8 LM head (the table the embedding block reads is quantized in the head block)."""
    fingerprint, result = sequential_fingerprint(models["smollm2"], c)
    assert fingerprint == whole_graph(models, c)
    assert result.run["blocks"][-1]["kind"] == "head"


def test_builder_folder_block_by_block_equals_the_whole_graph(builder_folder):
    """The GenAI builder's graph (SkipSimplifiedLayerNormalization, GroupQueryAttention, fused qkv)."""
    model = builder_folder / "model.onnx"
    outs = {}
    for sequential in (False, True):
        result = quantize(model, str(F.CALIB_TEXT), Config(**SMALL, sequential=sequential), tokenizer=str(builder_folder))
        outs[sequential] = F.graph_fingerprint(result.model)
        if sequential:
            assert result.run["mode"] == "block by block" and len(result.run["blocks"]) >= 3
    assert outs[True] == outs[False]


@pytest.mark.parametrize("form", ["qdq", "w4a8", "ort"])
def test_float16_model_block_by_block_equals_the_whole_graph(form, tmp_path):
    """A float16 LLaMA (how the 7B exports: exporters/streaming), every form. The w4a8 form once failed
    at the end of a block-by-block run: its output-SQNR block models declare cut inputs without a shape,
    and the W4A8 op then declared its outputs float32 (tests/runtime/test_w4a8_op.py holds the op's side).

    Not byte for byte: the whole-graph session runs the fp16 graph through ONNX Runtime's inserted float32
    Casts, some of which it fuses away across what is a block's edge here, where the residual stream is
    handed over as the fp16 tensor the graph says. Measured (2026-12-03): the same nodes and codes, and
    two activation scales of the second layer one fp16 step apart (5.3e-4 relative)."""
    import torch

    from tiny_models import tiny_llama

    from fptq_graph.exporters import export_hf_streaming
    from fptq_graph.runtime import session

    hf = tiny_llama(vocab=300, max_position_embeddings=2048)
    hf.to(torch.float16).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "m.onnx"
    export_hf_streaming(tmp_path / "hf", path)
    common = dict(recipe="fptq-paper", format=form, group_size=32, calib_samples=2, calib_seq_len=64, calib_batch_size=2,
                  sqnr_samples=1, progress=False)
    whole = quantize(path, 2, Config(**common, sequential=False))   # 2 random-token sequences (fixed seed)
    blocks = quantize(path, 2, Config(**common, sequential=True))
    assert blocks.run["mode"] == "block by block"
    assert [n.SerializeToString() for n in blocks.model.graph.node] == [n.SerializeToString() for n in whole.model.graph.node]
    got = {i.name: onnx.numpy_helper.to_array(i) for i in blocks.model.graph.initializer}
    want = {i.name: onnx.numpy_helper.to_array(i) for i in whole.model.graph.initializer}
    assert got.keys() == want.keys()
    for name, ref in want.items():
        if ref.dtype.kind == "f":   # within two fp16 steps
            assert np.allclose(got[name].astype(np.float64), ref, rtol=2 ** -9, atol=0), name
        else:                       # codes, packed weights, zero points: equal
            assert np.array_equal(got[name], ref), name
    ids = np.random.default_rng(0).integers(0, 300, (1, 16))
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64)}
    logits = session(blocks.save(tmp_path / f"q.{form}.onnx")).run(["logits"], feeds)[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


def test_spilled_activations_change_nothing(models, monkeypatch):
    """Every cut activation through a file of the work folder (memory limit 0): the same model."""
    from fptq_graph.sequential import run as run_module

    monkeypatch.setattr(run_module, "CUT_MEMORY_LIMIT", 0)
    c = case("minilm")
    fingerprint, result = sequential_fingerprint(models["minilm"], c)
    assert fingerprint == whole_graph(models, c)
    assert result.run["spilled_activation_mib"] > 0


def test_a_temporary_work_folder_goes_with_the_result(models):
    """Without --work-dir the finished blocks live in a temporary folder: it is removed once the result
    is dropped, even if the model was never saved, and the model taken from it beforehand stays whole
    (its codes were mapped from files that are gone)."""
    import gc

    c = case("minilm")
    result = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**{k: v for k, v in c.items() if k != "model"},
                                                                    **SMALL, sequential=True))
    folder, split = result.work.path, result.split
    assert folder.is_dir() and any(folder.glob("block-*"))
    del result
    gc.collect()
    assert not folder.exists()
    assert F.graph_fingerprint(split.full()) == whole_graph(models, c)


def test_quantized_block_inputs_differ_and_repeat(models):
    """--block-inputs quantized feeds each block what the quantized blocks before it give: another model
    (later blocks see other activations), the same one on every run."""
    c = {k: v for k, v in case("minilm").items() if k != "model"}
    prints = []
    for _ in range(2):
        r = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **SMALL, sequential=True, block_inputs="quantized"))
        prints.append(F.graph_fingerprint(r.model))
    assert prints[0] == prints[1] != whole_graph(models, case("minilm"))


def test_the_run_says_which_way_it_went_and_why(models):
    """...and its per-layer output SQNR (float and quantized blocks side by side) is the whole models'."""
    c = {k: v for k, v in case("minilm").items() if k != "model"}
    small = {**SMALL, "sqnr_samples": 2}
    whole = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **small))
    assert whole.run["mode"] == "whole graph" and "fits" in whole.run["why"]
    tight = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **small, memory_budget_mib=64))
    assert tight.run["mode"] == "block by block" and "over the memory budget 64 MiB" in tight.run["why"]
    assert F.graph_fingerprint(tight.model) == F.graph_fingerprint(whole.model)
    block = tight.run["blocks"][1]
    assert block["linears"] == 6 and block["seconds"] > 0 and block["peak_rss_mib"] > 0 and block["gram_mib"] > 0
    assert tight.report()["run"]["mode"] == "block by block"
    assert tight.stats("calibrate")["blocks"] == 7
    assert "block by block" in next(p for p in tight.passes if p.name == "measure_output_sqnr").summary
    by_block = {row["name"]: row["output_sqnr_db"] for row in tight.layers}
    whole_models = {row["name"]: row["output_sqnr_db"] for row in whole.layers}
    assert len(by_block) == 36 and all(np.isfinite(v) and v > 5 for v in by_block.values())
    # the same ONNX Runtime kernels on the same tensors, sums in the same order: equal to float64 rounding
    assert max(abs(by_block[k] - whole_models[k]) for k in whole_models) <= 1e-6


def test_statistics_are_never_traded_for_memory_by_default(models, monkeypatch):
    """Where the whole-graph run would trade AWQ and GPTQ for the clipping search (X^T X over its budget),
    the default goes block by block and keeps them."""
    from fptq_graph.passes.analysis import plan_statistics
    from fptq_graph.sequential import mode

    # the 1 GiB floor of the statistics budget becomes 1 MiB, in the mode decision and in plan_statistics
    # (which must know the run goes block by block before it decides: it runs before the blocks are cut)
    monkeypatch.setattr(mode, "MIB", 2**10)
    monkeypatch.setattr(plan_statistics, "MIB", 2**10)
    r = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**SMALL))
    assert r.run["mode"] == "block by block" and "keeps AWQ and GPTQ" in r.run["why"]
    assert not r.plan.statistics_note and r.plan.recipe.weights == "gptq-clip" and r.plan.recipe.awq


def test_no_block_structure_falls_back_or_fails(models, monkeypatch):
    from fptq_graph.sequential import run as run_module
    from fptq_graph.sequential.blocks import BlockCutError

    def no_cut(*args):
        raise BlockCutError("no residual stream to cut at (no clean cut before 'x')")

    monkeypatch.setattr(run_module, "find_blocks", no_cut)
    c = {k: v for k, v in case("minilm").items() if k != "model"}
    r = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **SMALL, sequential=True))
    assert r.run["mode"] == "whole graph" and "no block structure" in r.run["why"]
    assert F.graph_fingerprint(r.model) == whole_graph(models, case("minilm"))
    with pytest.raises(FptqError, match="cannot go block by block .*no clean cut before 'x'.* would not fit"):
        quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **SMALL, memory_budget_mib=1))


def test_disk_full_while_spilling_names_the_folder(models, tmp_path, monkeypatch):
    from fptq_graph.sequential import cut_store
    from fptq_graph.sequential import run as run_module

    monkeypatch.setattr(run_module, "CUT_MEMORY_LIMIT", 0)

    def full(path, array):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cut_store, "write_file", full)
    before = models["minilm"].read_bytes()
    work = tmp_path / "work"
    c = {k: v for k, v in case("minilm").items() if k != "model"}
    with pytest.raises(FptqError, match=f"{work}.*no space left on the disk.*--resume"):
        quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **SMALL, sequential=True), work_dir=work)
    assert models["minilm"].read_bytes() == before
    assert not list(work.glob("activations/*")), "a partial spill file was left behind"
    assert (work / "manifest.json").is_file()


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fptq_graph.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_killed_run_resumes_to_the_same_model(models, tmp_path):
    """SIGKILL right after block 3 of 7 is saved; the same command with --resume finishes from block 4 and
    writes the model an uninterrupted run writes; a work folder of another run is refused."""
    args = ["quantize", str(models["minilm"]), "--calib", str(F.CALIB_TEXT), "--calib-samples", "2", "--seq-len", "64",
            "--batch-size", "2", "--sqnr-samples", "0", "--sequential"]
    out = tmp_path / "m.onnx"
    killed = _cli(args + ["-o", str(out)], {"FPTQ_TEST_KILL_AFTER_BLOCK": "3"})
    assert killed.returncode == -9
    work = tmp_path / ".m.onnx.fptq-work"
    assert sorted(p.name for p in work.glob("block-*")) == [f"block-{i:05d}" for i in range(4)]
    assert not out.exists()
    other = _cli(args[:5] + ["3"] + args[6:] + ["-o", str(out), "--resume"])
    assert other.returncode == 2 and "belongs to another run" in other.stderr
    resumed = _cli(args + ["-o", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "4 of 7 blocks finished earlier; going on from block 5" in resumed.stderr
    assert not work.exists()
    whole = _cli(args[:-1] + ["--no-sequential", "-o", str(tmp_path / "whole.onnx")])
    assert whole.returncode == 0, whole.stderr
    assert F.graph_fingerprint(onnx.load(out)) == F.graph_fingerprint(onnx.load(tmp_path / "whole.onnx"))
    report = json.loads(next(p.value for p in onnx.load(out, load_external_data=False).metadata_props
                             if p.key == "fptq_graph.report"))
    assert report["run"]["resumed_blocks"] == 4


def test_workers_without_ray_say_what_to_install(models, tmp_path, monkeypatch, capsys):
    from fptq_graph.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["quantize", str(models["minilm"]), "-o", str(tmp_path / "m.onnx"), "--calib-random", "2",
                 "--seq-len", "16", "--workers", "2", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'fptq-graph[distributed]'" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_ray_workers_give_the_same_model_and_survive_a_killed_worker(models, tmp_path, monkeypatch):
    """Two local Ray workers; the worker running block 2's first batch exits (once) mid-run: Ray restarts
    it and retries the call, and the model is the one-process model, byte for byte, with every linear's
    weights quantized (GPTQ-clip) as a Ray task."""
    pytest.importorskip("ray", reason="ray is a test dependency (scripts/setup.sh installs fptq-graph[distributed])")
    from fptq_graph.sequential import ray_workers

    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_workers.KILL_ENV, "2:0")
    monkeypatch.setenv(ray_workers.KILL_MARKER_ENV, str(marker))
    c = case("minilm")
    fingerprint, result = sequential_fingerprint(models["minilm"], c, workers=2)
    assert marker.exists(), "the fault was not injected: the test proves nothing"
    assert fingerprint == whole_graph(models, c)
    assert result.run["workers"] == 2
    assert result.run["weight_tasks"] == 36


def test_ray_workers_run_a_whole_graph_run_too(models):
    """Issue 33: workers are not a block-by-block option; the whole graph's one block spreads its batches
    and its weight tasks over them, and the model is the one-process model."""
    pytest.importorskip("ray", reason="ray is a test dependency (scripts/setup.sh installs fptq-graph[distributed])")
    c = case("minilm")
    cfg = {k: v for k, v in c.items() if k != "model"}
    result = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**cfg, **SMALL, sequential=False), workers=2)
    assert result.run["mode"] == "whole graph" and result.run["workers"] == 2 and result.run["weight_tasks"] == 36
    assert F.graph_fingerprint(result.model) == whole_graph(models, c)


@pytest.mark.parametrize("kwargs,match", [
    ({"workers": 0}, r"workers must be >= 1, got 0"),
    ({"workers": 2, "ray_address": "auto"}, r"workers starts a local Ray cluster and ray_address joins one"),
])
def test_api_checks_block_options_as_the_cli_does(kwargs, match):
    """quantize() refuses what the CLI refuses, before any work (issue 33: workers=0 went through the API)."""
    from fptq_graph import Config, FptqError, quantize

    with pytest.raises(FptqError, match=match):
        quantize("/nonexistent.onnx", 2, Config(progress=False), **kwargs)


def test_resume_does_not_choose_the_scope(models, tmp_path):
    """Issue 33: resume works for every run (the whole graph is one block), so asking for it no longer
    makes an undecided run block by block (it did: resume only meant something there)."""
    c = {k: v for k, v in case("minilm").items() if k != "model"}
    r = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **SMALL), resume=True, work_dir=tmp_path / "work")
    assert r.run["mode"] == "whole graph" and len(r.run["blocks"]) == 1 and r.run["resumed_blocks"] == 0
    r.discard_work()
    assert not (tmp_path / "work").exists()


def test_a_whole_graph_run_resumes_from_its_one_block(models, tmp_path):
    """Killed right after its one block is saved, a whole-graph run resumes from lowering (the block's
    codes and plan from the work folder, the fold replayed) and writes the uninterrupted run's model."""
    args = ["quantize", str(models["minilm"]), "--calib", str(F.CALIB_TEXT), "--calib-samples", "2", "--seq-len", "64",
            "--batch-size", "2", "--sqnr-samples", "0", "--no-sequential"]
    out, work = tmp_path / "m.onnx", tmp_path / "work"
    killed = _cli(args + ["-o", str(out), "--work-dir", str(work)], {"FPTQ_TEST_KILL_AFTER_BLOCK": "0"})
    assert killed.returncode == -9
    assert [p.name for p in work.glob("block-*")] == ["block-00000"] and not out.exists()
    resumed = _cli(args + ["-o", str(out), "--work-dir", str(work), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "1 of 1 blocks finished earlier" in resumed.stderr and not work.exists()
    whole = _cli(args + ["-o", str(tmp_path / "whole.onnx")])
    assert whole.returncode == 0, whole.stderr
    assert F.graph_fingerprint(onnx.load(out)) == F.graph_fingerprint(onnx.load(tmp_path / "whole.onnx"))
    report = json.loads(next(p.value for p in onnx.load(out, load_external_data=False).metadata_props
                             if p.key == "fptq_graph.report"))
    assert report["run"]["mode"] == "whole graph" and report["run"]["resumed_blocks"] == 1


def test_a_pass_added_once_runs_in_both_runs(models, monkeypatch):
    """Issue 33's one driver: a pass put into the default pipeline once runs over every scope, the whole
    graph's one and each block of a block-by-block run, and sees each linear's statistics exactly once."""
    from fptq_graph import api
    from fptq_graph.passes.base import Pass, PassResult, Pipeline
    from fptq_graph.passes.pipeline import default_pipeline

    seen: list[list[str]] = []

    class CountLinears(Pass):
        name = "count_linears"
        kind = "analysis"
        requires = frozenset({"statistics"})

        def run(self, state):
            assert all(linear.activation.name in state.stats for linear in state.linears.values())
            seen.append(sorted(state.linears))
            return PassResult(f"{len(state.linears)} linears", stats={"linears": len(state.linears)})

    def with_toy(form="qdq"):
        passes = list(default_pipeline(form))
        at = next(i for i, p in enumerate(passes) if p.name == "classify")
        return Pipeline(passes[:at] + [CountLinears()] + passes[at:])

    monkeypatch.setattr(api, "default_pipeline", with_toy)
    c = {k: v for k, v in case("minilm").items() if k != "model"}
    for sequential, scopes in ((False, 1), (True, 6)):   # 7 blocks, the embedding's without linears
        seen.clear()
        r = quantize(models["minilm"], str(F.CALIB_TEXT), Config(**c, **SMALL, sequential=sequential))
        assert len(seen) == scopes
        assert sorted(n for names in seen for n in names) == sorted(row["name"] for row in r.layers)
        assert r.stats("count_linears")["linears"] == 36
        assert F.graph_fingerprint(r.model) == whole_graph(models, case("minilm"))
