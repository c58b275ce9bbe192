"""Run the observed model over the calibration set and keep the running per-channel max|X|."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .. import ort_errors
from ..errors import CalibrationError, FptqError
from ..runtime import session
from ..state import State


class Calibrate:
    name = "calibrate"

    def run(self, state: State) -> str:
        if state.calibration is None:
            raise CalibrationError("no calibration set given")
        _check_weights_finite(state)
        model = state.observed_model
        sess = session(model, early_reductions=True)   # each observer runs as soon as its input exists
        names = [name for pair in state.observers.values() for name in pair] + list(state.gram_observers.values())
        running: dict[str, np.ndarray] = {}
        bar = tqdm(state.calibration.feed_batches(model.proto.graph.input), total=len(state.calibration),
                   desc="calibrating", unit="batch", disable=not state.config.progress)
        for index, feeds in enumerate(bar):
            results = dict(zip(names, ort_errors.run(sess, names, feeds, f"calibration batch {index}")))
            for activation, (max_name, finite_name) in state.observers.items():
                if np.isnan(results[finite_name]) or not np.all(np.isfinite(results[max_name])):
                    users = [l.name for l in state.linears.values() if l.activation.name == activation]
                    raise CalibrationError(
                        f"NaN or Inf during calibration (batch {index}) in '{activation}', the input of {', '.join(users)}"
                    )
                batch_max = results[max_name].astype(np.float32)
                running[activation] = batch_max if activation not in running else np.maximum(running[activation], batch_max)
            for activation, gram_name in state.gram_observers.items():
                gram = results[gram_name].astype(np.float64)
                state.gram[activation] = gram if activation not in state.gram else state.gram[activation] + gram
        state.act_max = running
        for linear in state.linears.values():
            linear.act_max = running[linear.activation.name]
        return f"{state.calibration.num_samples} samples in {len(state.calibration)} batches from {state.calibration.source}"


def _check_weights_finite(state: State) -> None:
    """A NaN or Inf weight would show up as a non-finite activation of the *next* linear, and be
    blamed on it: check the weights themselves first, in graph order."""
    for linear in state.linears.values():
        weight = linear.node.inputs[1]
        values = getattr(weight, "values", None)
        if values is not None and not np.all(np.isfinite(values)):
            raise FptqError(f"weight of linear '{linear.name}' contains NaN or Inf")
