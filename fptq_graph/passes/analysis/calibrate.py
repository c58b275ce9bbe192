"""Run the observed model over the calibration set: the running per-channel max|X| and the summed
statistics of every observed activation (plan/statistics.py's ActivationStats).

Resident: one batch's observer outputs and the running statistics (K floats an activation, K^2 float64
where X^T X is recorded).
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from fptq_graph.runtime import ort_errors
from fptq_graph.errors import CalibrationError
from fptq_graph.runtime.sessions import session
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.plan.statistics import ActivationStats
from fptq_graph.quant.finite import check_weights_finite


class Calibrate(Pass):
    name = "calibrate"
    kind = "analysis"
    requires = frozenset({"observed_model"})
    ensures = frozenset({"statistics"})

    def run(self, state) -> PassResult:
        if state.calibration is None:
            raise CalibrationError("no calibration set given")
        check_weights_finite(state.linears.values())
        model = state.observed_model
        sess = session(model, early_reductions=True)   # each observer runs as soon as its input exists
        names = observer_outputs(state.observers)
        accumulate = StatisticsSum(state.observers, state.linears)
        bar = tqdm(state.calibration.feed_batches(model.proto.graph.input), total=len(state.calibration),
                   desc="calibrating", unit="batch", disable=not state.config.progress)
        for index, feeds in enumerate(bar):
            accumulate(dict(zip(names, ort_errors.run(sess, names, feeds, f"calibration batch {index}"))), index)
        stats = accumulate.result()
        state.stats = stats
        calib = state.calibration
        return PassResult(f"{calib.num_samples} samples in {len(calib)} batches from {calib.source}",
                          stats={"samples": calib.num_samples, "batches": len(calib)})


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
