"""Quantize a model block by block: calibrate one block over every calibration batch, plan and
quantize its linears, write what it decided to the work folder, free it, go on; then lower the whole
graph once from the finished blocks.

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
import time
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from fptq_graph.errors import FptqError
from fptq_graph.ir.bodies import needed_nodes
from fptq_graph.ir.split_model import export_split
from fptq_graph.ir.residency import is_spent, release_pages, reset_peak, resident_bytes, spent, trim_heap
from fptq_graph.passes.analysis.calibrate import StatisticsSum, observer_outputs
from fptq_graph.passes.base import PassRecord, PassResult, Pipeline
from fptq_graph.passes.pipeline import default_pipeline
from fptq_graph.plan.plan import HeadPlan, Plan, PlanDraft
from fptq_graph.quant.finite import check_weights_finite
from fptq_graph.sequential.runners import LocalRunner
from fptq_graph.sequential.block_model import block_model
from fptq_graph.sequential.blocks import Block, find_blocks
from fptq_graph.sequential.cut_store import CutStore
from fptq_graph.sequential.work_folder import BlockResult, WorkFolder

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
    readers: dict[str, list[str]] = {}
    for linear in state.linears.values():
        readers.setdefault(linear.activation.name, []).append(linear.name)
    structure = export_split(state.graph).proto   # the graph before observers: no weight is copied
    return find_blocks(structure, state.observed_model.proto, list(state.linears), observer_tensors(state), readers)


def block_pipeline(form: str, given) -> Pipeline:
    """The default pipeline's planning and rewriting passes (after calibrate, before the emitter)."""
    passes = list(default_pipeline(form))
    start = next(i for i, p in enumerate(passes) if p.name == "calibrate") + 1
    end = next(i for i, p in enumerate(passes) if p.kind == "lower")
    return Pipeline(passes[start:end], given=given)


def quantize_blocks(state, form: str, blocks: list[Block], work: WorkFolder, run: BlockRun,
                    runner=None, log=None) -> list[PassRecord]:
    """Calibrates, plans and quantizes `blocks` one after another (after the structural prefix has run
    on `state`); leaves state.plan, state.quantized, weight notes and SQNRs for all linears, the graph
    folded, and returns the block passes' records, summed over the blocks."""
    cfg = state.config
    calib = state.calibration
    observed = state.observed_model
    runner = runner or LocalRunner()
    per_block = block_pipeline(form, given=state.facts | {"statistics"})
    graph_inputs = list(observed.proto.graph.input)
    graph_input_names = {v.name for v in graph_inputs}
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
    calibrate_seconds = 0.0
    todo = [b for b in blocks if not work.finished(b.index)]
    last_needed = max((b.index for b in todo), default=-1)   # blocks after it need no hand-over
    node_by_output = {node.outputs[0].name: node for node in state.graph.nodes if node.outputs}
    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=not cfg.progress)
    started = time.perf_counter()
    try:
        for block in blocks:
            t0 = time.perf_counter()
            reset_peak()
            names = [name for name in block.inputs if name not in graph_input_names]
            finished = work.finished(block.index)
            view_linears = {n: state.linears[n] for n in block.linears}
            if finished:
                result = work.load(block.index, node_by_output)
                run.resumed += 1
                if block.index < last_needed:
                    _forward(runner, work.fingerprint[:16], observed, block, store, calib, graph_inputs, names, result, cfg, view_linears)
            else:
                check_weights_finite(view_linears.values())
                model = block_model(observed, block, store.dtypes())
                observers = {a: state.observers[a] for a in block.observers}
                fetch = observer_outputs(observers)
                hand_over = list(block.hand_over)
                accumulate = StatisticsSum(observers, view_linears)
                for index, values in runner.run_block(f"{work.fingerprint[:16]}/calibrate/{block.index}", model,
                                                      fetch + hand_over, _batches(calib, graph_inputs, block, store, names),
                                                      f"block {block.index} ({block.label})", early_reductions=True):
                    observed_values, handed = dict(zip(fetch, values[:len(fetch)])), values[len(fetch):]
                    del values   # StatisticsSum frees each output once summed: no other reference
                    accumulate(observed_values, index)
                    if cfg.block_inputs == "float":
                        for name, value in zip(hand_over, handed):
                            store.put(index, name, value)
                    del observed_values, handed
                calibrate_seconds += time.perf_counter() - t0
                stats_pending.update(accumulate.result())
                del accumulate   # else this block's X^T X would live on into the next block's calibration
                result = _plan_and_quantize(state, block, view_linears, stats_pending, per_block, runner)
                work.save(block.index, result)
                _maybe_stop(block.index)
                # the codes from here on are the saved ones, mapped: a finished block holds no memory
                result = replace(work.load(block.index, node_by_output), records=result.records,
                                 gram_bytes=result.gram_bytes)
                if cfg.block_inputs == "quantized" and block.index < last_needed:
                    _forward(runner, work.fingerprint[:16], observed, block, store, calib, graph_inputs, names, result, cfg, view_linears)
                release_pages(model.arrays.values())
            for linear in view_linears.values():
                readers_left[linear.activation.name] -= 1
                if readers_left[linear.activation.name] == 0:
                    stats_pending.pop(linear.activation.name, None)
            if finished:
                _refold(state, view_linears, result, per_block)
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
            if log and not cfg.progress:
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
    state.facts |= per_block.ensures | {"statistics"}
    summed = [PassRecord("calibrate", "analysis", PassResult(
        f"{calib.num_samples} samples in {len(calib)} batches from {calib.source}, block by block "
        f"({len(blocks)} blocks, {cfg.block_inputs} inputs)", stats={"samples": calib.num_samples, "batches": len(calib),
                                                                     "blocks": len(blocks)}), calibrate_seconds)]
    return summed + [_sum_records(name, recs, len(blocks)) for name, recs in records.items()]


# Fault injection for the tests: the run kills itself (SIGKILL, nothing cleaned up) right after saving
# this block, as a run killed by the user or the out-of-memory killer would stop.
STOP_ENV = "FPTQ_TEST_KILL_AFTER_BLOCK"


def _maybe_stop(index: int) -> None:
    if os.environ.get(STOP_ENV) == str(index):
        os.kill(os.getpid(), signal.SIGKILL)


def _plan_and_quantize(state, block: Block, linears: dict, stats: dict, per_block: Pipeline, runner) -> BlockResult:
    """The planning and rewriting passes over a view of `state` that holds only this block; the weight
    quantizer's calls go to the runner's tasks where it has them (Ray workers)."""
    names = set(linears)
    view = replace(state, linears=linears,
                   producers=_block_producers(state, names),
                   stats={a: s for a, s in stats.items() if any(l.activation.name == a for l in linears.values())},
                   draft=PlanDraft(), plan=None, quantized={}, weight_notes={}, weight_sqnr={}, output_sqnr={},
                   facts=set(state.facts) | {"statistics"}, map_tasks=getattr(runner, "map_tasks", None))
    gram_bytes = sum(s.gram.nbytes for s in view.stats.values() if s.gram is not None)
    records = per_block.run(view) if linears else []
    plan = view.plan
    return BlockResult(plans=dict(plan) if plan is not None else {}, head=plan.head if plan is not None else None,
                       product_folds=tuple(plan.product_folds) if plan is not None else (),
                       quantized=view.quantized, notes=view.weight_notes, weight_sqnr=view.weight_sqnr,
                       records=records, gram_bytes=gram_bytes)


def _block_producers(state, linears) -> dict:
    """The normalization producers whose linears are in this block (a producer's linears never straddle a cut)."""
    return {k: p for k, p in state.producers.items() if p.linears and p.linears[0] in linears}


def _refold(state, linears: dict, result: BlockResult, per_block: Pipeline) -> None:
    """A resumed block's equalization folded into the graph again, from its stored plan (the fold is
    deterministic: the same scales give the same weights and norms)."""
    if not linears:
        return
    fold = next(p for p in per_block if p.name == "fold_equalization")
    view = replace(state, linears=linears,
                   producers=_block_producers(state, linears),
                   plan=Plan(result.plans, result.head or HeadPlan(state.config.lm_head_mode), state.recipe,
                             state.statistics_note, result.product_folds))
    fold.run(view)


def _spend(linears) -> None:
    """The block's float weights (folded copies or mapped input) are replaced by stand-ins: their codes
    are what the emitters write, and nothing may hold 2 bytes a weight for a finished block."""
    for linear in linears:
        weight = linear.node.inputs[1]
        if not is_spent(weight.values):
            values = weight.values
            release_pages([values])
            weight.values = spent(values)


def _forward(runner, key: str, observed, block: Block, store: CutStore, calib, graph_inputs, names: list[str],
             result: BlockResult, cfg, linears: dict) -> None:
    """Runs a block only for what it hands over (resumed blocks; and, with quantized block inputs, a
    quantized block again with its weights dequantized)."""
    hand_over = list(block.hand_over)
    overrides = {}
    if cfg.block_inputs == "quantized":
        overrides = _dequantized_weights(observed, linears, result)
    pruned = replace(block, outputs=hand_over, nodes=needed_nodes(observed.proto.graph.node, hand_over, among=block.nodes))
    model = block_model(observed, pruned, store.dtypes(), overrides)
    for index, values in runner.run_block(f"{key}/forward/{block.index}", model, hand_over,
                                          _batches(calib, graph_inputs, pruned, store, names),
                                          f"block {block.index} ({block.label})"):
        for name, value in zip(hand_over, values):
            store.put(index, name, value)
    release_pages(model.arrays.values())


def _batches(calib, graph_inputs, block: Block, store: CutStore, names: list[str]):
    """(index, feeds) of every calibration batch for `block`: the model inputs it reads and the cut
    tensors earlier blocks handed over."""
    for index, feeds in enumerate(calib.feed_batches(graph_inputs)):
        yield index, {n: feeds[n] for n in block.inputs if n in feeds} | store.feeds(index, names)


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


def _sum_records(name: str, records: list[PassRecord], blocks: int) -> PassRecord:
    """One record for a pass run once per block: times and counts summed, "lowest" values the least,
    and the summary of the block that holds the least (else of the last block)."""
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
