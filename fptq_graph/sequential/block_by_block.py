"""The block-by-block run from the structural prefix to the lowered graph (api.quantize calls it when
sequential/mode.py says so).

    prefix (whole graph, structure only)   plan_statistics -> canonicalize_weights -> insert_observers
    blocks                                 sequential/blocks.py (a BlockCutError: the whole-graph run
                                           if it fits, else the error)
    per block                              sequential/run.py (calibrate, plan, fold, quantize; saved)
    lowering (whole graph)                 the form's emitter, from the finished blocks' codes; then the
                                           untied embedding tables (passes/lower/emit_embeddings.py)
    output SQNR (per block)                sequential/output_sqnr.py: float and quantized blocks side by side

Resident: see run.py; the work folder (work_folder.py) holds the finished blocks until the caller
has written the output and removes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph import __version__
from fptq_graph.errors import FptqError
from fptq_graph.ir.residency import is_spent
from fptq_graph.files.run_outputs import model_files
from fptq_graph.passes.base import PassRecord, Pipeline
from fptq_graph.passes.lower.emit_embeddings import EmitEmbeddings
from fptq_graph.passes.pipeline import EMITTERS, default_pipeline
from fptq_graph.sequential.blocks import BlockCutError
from fptq_graph.sequential.output_sqnr import measure_output_sqnr_by_block
from fptq_graph.sequential.run import BlockRun, plan_blocks, quantize_blocks
from fptq_graph.sequential.runners import make_runner
from fptq_graph.sequential.work_folder import WorkFolder


def run_block_by_block(state, mode, source: str, log=None, work_dir: str | os.PathLike | None = None,
                       resume: bool = False, workers: int | None = None,
                       ray_address: str | None = None) -> tuple[list[PassRecord], dict, WorkFolder | None]:
    """Runs the rest of the default pipeline (after the passes that find the linears) block by block over `state`.
    Returns the pass records, the report's "run" section and the work folder (None when the run fell
    back to the whole graph); the caller removes the folder once the output is written."""
    form = state.config.format
    passes = list(default_pipeline(form).after("linears"))
    names = [p.name for p in passes]
    prefix = Pipeline(passes[:names.index("calibrate")], given=state.facts)
    records = prefix.run(state, log=log)
    try:
        blocks = plan_blocks(state)
    except BlockCutError as exc:
        if mode.budget_bytes is not None and mode.estimate_bytes > mode.budget_bytes:
            raise FptqError(f"{source}: cannot go block by block ({exc}), and the whole graph would not fit "
                            f"({mode.estimate_bytes / 2**20:.0f} MiB, over {mode.budget_bytes / 2**20:.0f} MiB)") from None
        if log:
            log(f"[blocks] {exc}: quantizing the whole graph instead")
        rest = Pipeline(passes[names.index("calibrate"):], given=state.facts)
        run = {**mode.to_dict(), "mode": "whole graph", "why": f"no block structure ({exc}); the whole graph fits"}
        return records + rest.run(state, log=log), run, None
    if log:
        kinds = [b.kind for b in blocks]
        log(f"[blocks] {len(blocks)} blocks ({kinds.count('embedding')} embedding, {kinds.count('layer')} layer, "
            f"{kinds.count('head')} head), cut on the residual stream; {mode.why}")
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="fptq-blocks-"))
    work = WorkFolder(folder, fingerprint(state, source, blocks), len(blocks))
    work.open(resume, log=log)
    run = BlockRun(why=mode.why)
    runner = make_runner(workers, ray_address, log=log)
    try:
        records += quantize_blocks(state, form, blocks, work, run, runner=runner, log=log)
    finally:
        runner.close()
    run.workers, run.weight_tasks = runner.workers, runner.tasks
    if work_dir is None:
        work.remove_when_dropped()
    emit = Pipeline([EMITTERS[form](), EmitEmbeddings()], given=state.facts)
    records += emit.run(state, log=log)
    left = [t.name for t in state.graph.tensors().values() if isinstance(t, gs.Constant) and is_spent(t._values)]
    if left:   # a spent weight still in the graph would be written as zeros: never
        raise FptqError(f"internal error: the lowered graph still reads released float weights ({', '.join(left[:3])})")
    records.append(measure_output_sqnr_by_block(state, blocks, log=log))
    if log:
        log(f"[{records[-1].name}] {records[-1].summary}")
    return records, {**mode.to_dict(), **run.to_dict()}, work


def fingerprint(state, source: str, blocks) -> str:
    """What makes a finished block reusable: this version, the input's files, the calibration data, the
    settings (not the progress display) and the block cut."""
    digest = hashlib.sha256()
    # how the run goes (progress display, the mode decision) does not change what a block decides
    config = {k: v for k, v in state.config.to_dict().items() if k not in ("progress", "sequential", "memory_budget_mib")}
    files = []
    if Path(source).is_file():
        for path in model_files(source):
            st = path.stat()
            files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    digest.update(json.dumps({"version": __version__, "config": config, "files": files, "source": source,
                              "blocks": [[b.kind, b.linears] for b in blocks]}, sort_keys=True, default=str).encode())
    calib = state.calibration
    if hasattr(calib, "tokens"):
        digest.update(np.ascontiguousarray(calib.tokens).tobytes())
        digest.update(str(calib.batch_size).encode())
    else:
        for feeds in getattr(calib, "feeds", []):
            for name in sorted(feeds):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(feeds[name]).tobytes())
    return digest.hexdigest()
