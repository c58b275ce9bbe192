"""Run the observed model over the calibration set: the running per-channel max|X| and the summed
statistics of every observed activation (plan/statistics.py's ActivationStats).

It runs over the state's scope (sequential/scope.py): the scope's block of the observed model (the whole
graph, or one block of a block-by-block run fed what the blocks before it handed over), through the
scope's runner (this process, or Ray workers), keeping what the block hands on when the scope asks.

Resident: one batch's observer outputs and the running statistics (K floats an activation, K^2 float64
where X^T X is recorded).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from fptq_graph.errors import CalibrationError
from fptq_graph.ir.residency import release_pages
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.plan.statistics import ActivationStats
from fptq_graph.quant.finite import check_weights_finite
from fptq_graph.sequential.block_model import block_model
from fptq_graph.sequential.scope import scope_of


class Calibrate(Pass):
    name = "calibrate"
    kind = "analysis"
    requires = frozenset({"observed_model"})
    ensures = frozenset({"statistics"})

    def run(self, state) -> PassResult:
        if state.calibration is None:
            raise CalibrationError("no calibration set given")
        check_weights_finite(state.linears.values())
        scope = scope_of(state)
        block, calib = scope.block, state.calibration
        graph_inputs = list(state.observed_model.proto.graph.input)
        model = block_model(state.observed_model, block, scope.input_dtypes())
        observers = {a: state.observers[a] for a in block.observers}
        fetch = observer_outputs(observers)
        hand_over = list(block.hand_over) if scope.keep_hand_over else []
        accumulate = StatisticsSum(observers, state.linears)
        batches = scope.batches(calib, graph_inputs)
        # block by block, the driver shows the blocks instead of the batches
        bar = tqdm(total=len(calib), desc="calibrating", unit="batch", disable=not state.config.progress or scope.blocks > 1)
        # each observer runs as soon as its input exists (early reductions); a block with nothing to
        # observe or hand on (the embedding, with quantized block inputs) is not run at all
        runs = scope.runner.run_block(f"{scope.key}/calibrate/{block.index}", model, fetch + hand_over, batches,
                                      scope.label, early_reductions=True) if fetch or hand_over else ()
        try:
            for index, values in runs:
                observed, handed = dict(zip(fetch, values[:len(fetch)])), values[len(fetch):]
                del values   # StatisticsSum frees each output once summed: no other reference
                accumulate(observed, index)
                for name, value in zip(hand_over, handed):
                    scope.store.put(index, name, value)
                del observed, handed
                bar.update(1)
        finally:
            bar.close()   # before any error is printed: the error stays the last line
        scope.observed = accumulate.result()
        read = {linear.activation.name for linear in state.linears.values()}
        state.stats = {a: s for a, s in (scope.carried | scope.observed).items() if a in read}
        scope.gram_bytes = sum(s.gram.nbytes for s in state.stats.values() if s.gram is not None)
        release_pages(model.arrays.values())
        return PassResult(f"{calib.num_samples} samples in {len(calib)} batches from {calib.source}",
                          stats={"samples": calib.num_samples, "batches": len(calib), "blocks": 1})

    def summarize_blocks(self, records: list, blocks: int, scope: str) -> PassResult:
        """One result for the run's calibration, which ran once per block."""
        first = records[0].result
        return PassResult(f"{first.summary}, block by block ({blocks} blocks, {scope})",
                          stats={**first.stats, "blocks": len(records)})


def observer_outputs(observers: dict) -> list[str]:
    """The observed model's outputs for `observers` (activation -> Observers), in fetch order."""
    return [n for o in observers.values() for n in (o.max, o.finite)] + [n for o in observers.values() for n in o.sums.values()]


class StatisticsSum:
    """Sums one batch's observer outputs after another into ActivationStats: the running per-channel
    max and the float64 sums (the whole-graph and the block-by-block calibration share it)."""

    def __init__(self, observers: dict, linears: dict):
        self.observers, self.linears = observers, linears
        self.running: dict[str, np.ndarray] = {}
        self.stats = {activation: ActivationStats() for activation in observers}

    def __call__(self, results: dict[str, np.ndarray], index: int) -> None:
        """Adds one batch's outputs (observer output name -> array). Consumes `results`: each summed
        output leaves the dict once added, so a batch's [K, K] outputs are freed one by one while the
        float64 sums grow (the caller must hold no other reference to them)."""
        for activation, observed in self.observers.items():
            if np.isnan(results[observed.finite]) or not np.all(np.isfinite(results[observed.max])):
                users = [l.name for l in self.linears.values() if l.activation.name == activation]
                raise CalibrationError(
                    f"NaN or Inf during calibration (batch {index}) in '{activation}', the input of {', '.join(users)}"
                )
            batch_max = results[observed.max].astype(np.float32)
            running = self.running.get(activation)
            self.running[activation] = batch_max if running is None else np.maximum(running, batch_max)
            for field_name, output in observed.sums.items():
                self.stats[activation].add(field_name, results.pop(output))

    def result(self) -> dict:
        for activation, maxima in self.running.items():
            self.stats[activation].max = maxima
        return self.stats
