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
        names = [n for o in state.observers.values() for n in (o.max, o.finite)]
        names += [n for o in state.observers.values() for n in o.sums.values()]
        running: dict[str, np.ndarray] = {}
        stats = {activation: ActivationStats() for activation in state.observers}
        bar = tqdm(state.calibration.feed_batches(model.proto.graph.input), total=len(state.calibration),
                   desc="calibrating", unit="batch", disable=not state.config.progress)
        for index, feeds in enumerate(bar):
            results = dict(zip(names, ort_errors.run(sess, names, feeds, f"calibration batch {index}")))
            for activation, observed in state.observers.items():
                if np.isnan(results[observed.finite]) or not np.all(np.isfinite(results[observed.max])):
                    users = [l.name for l in state.linears.values() if l.activation.name == activation]
                    raise CalibrationError(
                        f"NaN or Inf during calibration (batch {index}) in '{activation}', the input of {', '.join(users)}"
                    )
                batch_max = results[observed.max].astype(np.float32)
                running[activation] = batch_max if activation not in running else np.maximum(running[activation], batch_max)
                for field_name, output in observed.sums.items():
                    stats[activation].add(field_name, results[output])
        for activation, maxima in running.items():
            stats[activation].max = maxima
        state.stats = stats
        calib = state.calibration
        return PassResult(f"{calib.num_samples} samples in {len(calib)} batches from {calib.source}",
                          stats={"samples": calib.num_samples, "batches": len(calib)})
