"""The one driver of every quantize run (run_scopes): the whole graph as one block, or the model block
by block: calibrate one block over every calibration batch, plan and quantize its linears, write what it
decided to the work folder, free it, go on; then lower the whole graph once from the finished blocks.

The passes are the default pipeline's (passes/pipeline.py), in its order: the structural prefix
(find linears, plan statistics, canonicalize weights, insert observers) runs once over the whole
graph, which holds no weight data of its own (the weights stay mapped from the input); then, per
block of sequential/blocks.py, the block's own session computes its observers on the activations the
blocks before it handed over (cut_store.py), and the planning and rewriting passes (classify ... quantize
weights) run over a view of the state that holds only that block's linears and statistics. Every
decision the passes make is local to a block (sibling groups and SwiGLU products never cross a
residual cut), so fed with the float model's activations a block-by-block run makes the whole-graph
run's decisions. With Config.block_inputs = "quantized" each block is instead fed what the already
quantized blocks before it give (their weights dequantized, activations float: GPTQ's and
llm-compressor's sequential mode).

Resident: the graph's structure, one block's weights (mapped pages, advised away after the block)
and its folded copies, that block's statistics (X^T X of its inputs), the cut activations (or their
mapped spill files), and the quantized codes of the finished blocks, mapped from the work folder.
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from fptq_graph.errors import FptqError
from fptq_graph.ir.bodies import needed_nodes
from fptq_graph.ir.split_model import export_split
from fptq_graph.ir.residency import is_spent, release_pages, reset_peak, resident_bytes, spent, trim_heap
from fptq_graph.passes.base import PassRecord, PassResult, Pipeline
from fptq_graph.plan.plan import HeadPlan, Plan, PlanDraft
from fptq_graph.sequential.block_model import block_model
from fptq_graph.sequential.blocks import Block, BlockCutError, find_blocks
from fptq_graph.sequential.cut_store import CutStore
from fptq_graph.sequential.runners import LocalRunner, make_runner
from fptq_graph.sequential.scope import Scope, graph_block
from fptq_graph.sequential.work_folder import BlockResult, WorkFolder, run_fingerprint

MIB = 2**20
# Cut activations held in memory before they go to files of the work folder.
CUT_MEMORY_LIMIT = 512 * MIB


@dataclass
class BlockRun:
    """What the report says of a block-by-block run."""

    why: str
    blocks: list[dict] = field(default_factory=list)
    resumed: int = 0
    spilled_bytes: int = 0
    workers: int = 1
    weight_tasks: int = 0      # linears whose weights were quantized as Ray tasks

    def to_dict(self) -> dict:
        return {"mode": "block by block", "why": self.why, "workers": self.workers, "weight_tasks": self.weight_tasks,
                "resumed_blocks": self.resumed,
                "spilled_activation_mib": round(self.spilled_bytes / MIB, 1), "blocks": self.blocks}


def observer_tensors(state) -> dict[str, str]:
    """Every tensor the observers made -> the activation it observes (the observed model's extra tensors)."""
    original = set(state.graph.tensors())
    made: dict[str, str] = {}
    for node in state.observed_model.proto.graph.node:
        if not node.output or node.output[0] in original:
            continue
        activation = next((made[name] if name in made else name for name in node.input
                           if name in made or (name in original and name in state.observers)), None)
        for out in node.output:
            made[out] = activation
    return made


def plan_blocks(state) -> list[Block]:
    """The blocks of the observed model, cut on its residual stream (blocks.py; BlockCutError if none)."""
    readers: dict[str, list[str]] = {}
    for linear in state.linears.values():
        readers.setdefault(linear.activation.name, []).append(linear.name)
    structure = export_split(state.graph).proto   # the graph before observers: no weight is copied
    return find_blocks(structure, state.observed_model.proto, list(state.linears), observer_tensors(state), readers)


def run_scopes(state, pipeline: Pipeline, mode, source: str, log=None, work_dir: str | os.PathLike | None = None,
               resume: bool = False, workers: int | None = None,
               ray_address: str | None = None) -> tuple[list[PassRecord], dict, WorkFolder]:
    """The one driver: runs `pipeline` (the passes after find_linears) over `state`, the whole graph as
    one scope or block by block as `mode` (sequential/mode.py) says.

        structure (whole graph, once)   the passes up to the observed model (plan_statistics,
                                        canonicalize_weights, insert_observers)
        scopes (each block in turn)     the passes before the first "lower" one (calibrate ... quantize
                                        weights), over a view holding one block; saved to the work folder
        lowering and measurement        the rest, once, over the whole graph (the measurement passes walk
                                        the blocks: sequential/block_chain.py)

    Returns the pass records, the report's "run" section and the work folder, which the caller removes
    once the output is written (a temporary one also goes when the folder object is dropped)."""
    # plan_statistics (a structural pass) decides what X^T X may cost from the way the run goes: say it first
    state.sequential = mode.sequential
    records = pipeline.until("observed_model").run(state, log=log)
    rest = pipeline.after("observed_model")
    per_scope, after = rest.before_kind("lower"), rest.from_kind("lower")
    report = mode.to_dict()
    blocks = []
    if mode.sequential:
        try:
            blocks = plan_blocks(state)
        except BlockCutError as exc:
            if mode.budget_bytes is not None and mode.estimate_bytes > mode.budget_bytes:
                raise FptqError(f"{source}: cannot go block by block ({exc}), and the whole graph would not fit "
                                f"({mode.estimate_bytes / MIB:.0f} MiB, over {mode.budget_bytes / MIB:.0f} MiB)") from None
            if log:
                log(f"[blocks] {exc}: quantizing the whole graph instead")
            report = {**report, "mode": "whole graph", "why": f"no block structure ({exc}); the whole graph fits"}
        else:
            if log:
                kinds = [b.kind for b in blocks]
                log(f"[blocks] {len(blocks)} blocks ({kinds.count('embedding')} embedding, {kinds.count('layer')} layer, "
                    f"{kinds.count('head')} head), cut on the residual stream; {mode.why}")
    elif log:
        log(f"[mode] whole graph: {mode.why}")
    blocks = blocks or [graph_block(state)]
    state.blocks = blocks
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="fptq-blocks-"))
    work = WorkFolder(folder, run_fingerprint(state, source, blocks), len(blocks))
    work.open(resume, log=log)
    run = BlockRun(why=mode.why)
    try:
        records += _run_in(work, run, state, per_scope, after, blocks, workers, ray_address, log)
    except BaseException:
        if work_dir is None:   # a temporary folder no one can resume from
            work.remove()
        raise
    if work_dir is None:
        work.remove_when_dropped()
    run_dict = run.to_dict()
    if len(blocks) > 1:
        return records, {**report, **run_dict}, work
    # one scope: the whole graph's report, with what a block-by-block run would say of its one block
    return records, {**report, **{k: v for k, v in run_dict.items() if k not in ("mode", "why")}}, work


def _run_in(work: WorkFolder, run: BlockRun, state, per_scope: Pipeline, after: Pipeline, blocks: list[Block],
            workers, ray_address, log) -> list[PassRecord]:
    """The scopes one after another, then lowering and measurement (`run` collects what the report says)."""
    runner = make_runner(workers, ray_address, log=log)
    try:
        records = quantize_blocks(state, per_scope, blocks, work, run, runner=runner, log=log)
    finally:
        runner.close()
    run.workers, run.weight_tasks = runner.workers, runner.tasks
    records += Pipeline(after, given=state.facts).run(state, log=log)
    left = [t.name for t in state.graph.tensors().values() if isinstance(t, gs.Constant) and is_spent(t._values)]
    if left:   # a spent weight still in the graph would be written as zeros: never
        raise FptqError(f"internal error: the lowered graph still reads released float weights ({', '.join(left[:3])})")
    return records


def quantize_blocks(state, per_scope: Pipeline, blocks: list[Block], work: WorkFolder, run: BlockRun,
                    runner=None, log=None) -> list[PassRecord]:
    """Runs the scope passes (`per_scope`: calibrate ... quantize weights) over `blocks` one after
    another (after the structural prefix has run on `state`), each block as a scope; leaves state.plan,
    state.quantized, weight notes and SQNRs for all linears, the graph folded, and returns the scope
    passes' records (as they are for one block, summed over several)."""
    cfg = state.config
    calib = state.calibration
    observed = state.observed_model
    runner = runner or LocalRunner()
    one = len(blocks) == 1
    graph_inputs = list(observed.proto.graph.input)
    last_reader = {}
    for block in blocks:
        for name in block.inputs:
            last_reader[name] = block.index
    store = CutStore(work.path / "activations", CUT_MEMORY_LIMIT)
    stats_pending: dict[str, object] = {}
    readers_left = {}
    for linear in state.linears.values():
        readers_left[linear.activation.name] = readers_left.get(linear.activation.name, 0) + 1
    plans, quantized, notes, sqnr, folds = {}, {}, {}, {}, []
    head = HeadPlan(cfg.lm_head_mode)
    records: dict[str, list[PassRecord]] = {}
    todo = [b for b in blocks if not work.finished(b.index)]
    last_needed = max((b.index for b in todo), default=-1)   # blocks after it need no hand-over
    node_by_output = {node.outputs[0].name: node for node in state.graph.nodes if node.outputs}
    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not cfg.progress or one)
    started = time.perf_counter()
    try:
        for block in blocks:
            t0 = time.perf_counter()
            reset_peak()
            finished = work.finished(block.index)
            view_linears = {n: state.linears[n] for n in block.linears}
            scope = Scope(block, blocks=len(blocks), runner=runner, store=store, key=work.fingerprint[:16],
                          keep_hand_over=cfg.block_inputs == "float", carried=stats_pending)
            if finished:
                result = work.load(block.index, node_by_output)
                run.resumed += 1
                if block.index < last_needed:
                    _forward(observed, scope, calib, graph_inputs, result, cfg, view_linears)
            else:
                result = _plan_and_quantize(state, scope, view_linears, per_scope, runner, None if not one else log)
                stats_pending.update(scope.observed)
                work.save(block.index, result)
                _maybe_stop(block.index)
                # the codes from here on are the saved ones, mapped: a finished block holds no memory
                result = replace(work.load(block.index, node_by_output), records=result.records,
                                 gram_bytes=result.gram_bytes)
                if cfg.block_inputs == "quantized" and block.index < last_needed:
                    _forward(observed, scope, calib, graph_inputs, result, cfg, view_linears)
            for linear in view_linears.values():
                readers_left[linear.activation.name] -= 1
                if readers_left[linear.activation.name] == 0:
                    stats_pending.pop(linear.activation.name, None)
            if finished:
                _replay(state, view_linears, result, per_scope)
            _spend(view_linears.values())
            plans.update(result.plans)
            quantized.update(result.quantized)
            notes.update(result.notes)
            sqnr.update(result.weight_sqnr)
            folds += list(result.product_folds)
            if result.head is not None and result.head.linear is not None:
                head = result.head
            for record in result.records:
                records.setdefault(record.name, []).append(record)
            store.drop({name for name, last in last_reader.items() if last <= block.index})
            store.release()
            trim_heap()
            seconds = time.perf_counter() - t0
            current, peak = resident_bytes()
            run.blocks.append({"index": block.index, "kind": block.kind, "linears": len(block.linears),
                               "first": block.linears[0] if block.linears else None,
                               "seconds": round(seconds, 2), "resumed": finished,
                               "peak_rss_mib": round(peak / MIB, 1), "gram_mib": round(result.gram_bytes / MIB, 1),
                               "weights_mib": round(sum(4 * l.k * l.n for l in view_linears.values()) / MIB, 1)})
            bar.update(1)
            done = len(run.blocks)
            rate = (time.perf_counter() - started) / done
            bar.set_postfix_str(f"{seconds:.1f} s/block, peak {peak / 2**30:.2f} GiB")
            if log and not cfg.progress and not one:
                log(f"[block {block.index + 1}/{len(blocks)}] {block.label}: {len(block.linears)} linears, "
                    f"{seconds:.1f} s{' (resumed)' if finished else ''}, peak RSS {peak / MIB:.0f} MiB, "
                    f"about {rate * (len(blocks) - done):.0f} s left")
    finally:
        bar.close()
        run.spilled_bytes = store.spilled
        store.clear()
    state.stats = {}
    state.plan = Plan(plans, head, state.recipe, state.statistics_note, tuple(folds))
    state.quantized, state.weight_notes, state.weight_sqnr = quantized, notes, sqnr
    state.facts |= per_scope.ensures
    if one:
        return _records_of_one(per_scope, records)
    passes = {p.name: p for p in per_scope}
    return [_sum_records(passes[name], recs, len(blocks), f"{cfg.block_inputs} inputs") for name, recs in records.items()]


def _records_of_one(per_scope: Pipeline, records: dict[str, list[PassRecord]]) -> list[PassRecord]:
    """The records of a one-block run, in pass order (a resumed block's are those it stored)."""
    return [recs[0] for name in per_scope.names for recs in [records.get(name)] if recs]


# Fault injection for the tests: the run kills itself (SIGKILL, nothing cleaned up) right after saving
# this block, as a run killed by the user or the out-of-memory killer would stop.
STOP_ENV = "FPTQ_TEST_KILL_AFTER_BLOCK"


def _maybe_stop(index: int) -> None:
    if os.environ.get(STOP_ENV) == str(index):
        os.kill(os.getpid(), signal.SIGKILL)


def _plan_and_quantize(state, scope: Scope, linears: dict, per_scope: Pipeline, runner, log) -> BlockResult:
    """The scope passes over a view of `state` that holds only this block (`scope`); the weight
    quantizer's calls go to the runner's tasks where it has them (Ray workers)."""
    view = replace(state, linears=linears, producers=_block_producers(state, set(linears)), stats={},
                   draft=PlanDraft(), plan=None, quantized={}, weight_notes={}, weight_sqnr={}, output_sqnr={},
                   facts=set(state.facts), map_tasks=getattr(runner, "map_tasks", None), scope=scope)
    if linears:
        records = per_scope.run(view, log=log)
    else:   # a block without linears (the embedding) only calibrates what it hands on
        records = Pipeline([p for p in per_scope if "statistics" in p.ensures], given=state.facts).run(view)
    gram_bytes = scope.gram_bytes   # counted before the passes: the last reader of an X^T X may overwrite it
    plan = view.plan
    return BlockResult(plans=dict(plan) if plan is not None else {}, head=plan.head if plan is not None else None,
                       product_folds=tuple(plan.product_folds) if plan is not None else (),
                       quantized=view.quantized, notes=view.weight_notes, weight_sqnr=view.weight_sqnr,
                       records=records, gram_bytes=gram_bytes)


def _block_producers(state, linears) -> dict:
    """The normalization producers whose linears are in this block (a producer's linears never straddle a cut)."""
    return {k: p for k, p in state.producers.items() if p.linears and p.linears[0] in linears}


def _replay(state, linears: dict, result: BlockResult, per_scope: Pipeline) -> None:
    """A resumed block's rewrites that live only in the graph (replay_on_resume: the equalization fold)
    run again from its stored plan (deterministic: the same scales give the same weights and norms)."""
    if not linears:
        return
    view = replace(state, linears=linears,
                   producers=_block_producers(state, linears),
                   plan=Plan(result.plans, result.head or HeadPlan(state.config.lm_head_mode), state.recipe,
                             state.statistics_note, result.product_folds))
    for p in per_scope:
        if p.replay_on_resume:
            p.run(view)


def _spend(linears) -> None:
    """The block's float weights (folded copies or mapped input) are replaced by stand-ins: their codes
    are what the emitters write, and nothing may hold 2 bytes a weight for a finished block."""
    for linear in linears:
        weight = linear.node.inputs[1]
        if not is_spent(weight.values):
            values = weight.values
            release_pages([values])
            weight.values = spent(values)


def _forward(observed, scope: Scope, calib, graph_inputs, result: BlockResult, cfg, linears: dict) -> None:
    """Runs a block only for what it hands over (resumed blocks; and, with quantized block inputs, a
    quantized block again with its weights dequantized)."""
    block = scope.block
    hand_over = list(block.hand_over)
    overrides = {}
    if cfg.block_inputs == "quantized":
        overrides = _dequantized_weights(observed, linears, result)
    pruned = replace(block, outputs=hand_over, nodes=needed_nodes(observed.proto.graph.node, hand_over, among=block.nodes))
    model = block_model(observed, pruned, scope.input_dtypes(), overrides)
    for index, values in scope.runner.run_block(f"{scope.key}/forward/{block.index}", model, hand_over,
                                          replace(scope, block=pruned).batches(calib, graph_inputs), scope.label):
        for name, value in zip(hand_over, values):
            scope.store.put(index, name, value)
    release_pages(model.arrays.values())


def _dequantized_weights(observed, linears: dict, result: BlockResult) -> dict[str, np.ndarray]:
    """Each linear's weight initializer (in the observed model, before any fold) -> its quantized weight
    in the float model's basis: diag(1/s) dequant(Q) for a row scale s, dequant(Q) diag(s) for AWQ's
    column scale (a fold moved s; undoing it here leaves the norms and the graph as they are)."""
    out = {}
    by_output = {node.output[0]: node for node in observed.proto.graph.node if node.output}
    for linear in linears.values():
        node = by_output.get(linear.output)
        if node is None or node.input[1] not in observed.arrays:
            continue
        plan, qw = result.plans[linear.name], result.quantized[linear.name]
        weight = qw.dequantize()
        if plan.equalization.scale is not None:
            weight = weight / plan.equalization.scale[:, None]
        if plan.equalization.column_scale is not None:
            weight = weight * plan.equalization.column_scale[None, :]
        original = observed.arrays[node.input[1]]
        if original.shape != weight.shape:
            raise FptqError(f"block inputs 'quantized': '{linear.name}' reads its weight through "
                            f"{linear.weight_source}, which the float block cannot take dequantized; use float inputs")
        out[node.input[1]] = weight.astype(original.dtype)
    return out


def _sum_records(pass_, records: list[PassRecord], blocks: int, scope: str) -> PassRecord:
    """One record for a pass run once per block: the pass's own summary where it has one
    (summarize_blocks), else times and counts summed, "lowest" values the least, and the summary of
    the block that holds the least (else of the last block)."""
    name = pass_.name
    if hasattr(pass_, "summarize_blocks"):
        return PassRecord(name, pass_.kind, pass_.summarize_blocks(records, blocks, scope), sum(r.seconds for r in records))
    stats: dict = {}
    for record in records:
        for key, value in record.stats.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                stats.setdefault(key, value)
            elif key.startswith("lowest"):
                stats[key] = min(stats.get(key, value), value)
            else:
                stats[key] = stats.get(key, 0) + value
    worst = min(records, key=lambda r: r.stats.get("lowest_sqnr_db", np.inf))
    if "lowest_sqnr_db" in worst.stats:
        stats["lowest"] = worst.stats.get("lowest", stats.get("lowest"))
    counts = ", ".join(f"{v} {k}" for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool) and v)
    summary = f"{len(records)} of {blocks} blocks: {counts}" if counts else f"{len(records)} of {blocks} blocks"
    if "lowest_sqnr_db" in stats:
        summary += f"; lowest SQNR {stats['lowest_sqnr_db']:.1f} dB ({stats.get('lowest')})"
    record = records[-1]
    return PassRecord(name, record.kind, PassResult(summary, any(r.result.modified for r in records), stats),
                      sum(r.seconds for r in records))
