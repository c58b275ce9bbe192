"""The one check that weights are finite (calibrate runs it on the float weights, quantize_weights on
what it is about to quantize, after any equalization fold)."""
from __future__ import annotations

import numpy as np

from fptq_graph.errors import FptqError


def check_weights_finite(linears) -> None:
    """Raises FptqError naming the first linear (in graph order) whose constant weight holds NaN or Inf:
    before calibration such a weight would show up as a non-finite activation of the *next* linear,
    and be blamed on it."""
    for linear in linears:
        values = getattr(linear.node.inputs[1], "values", None)
        if values is not None and not np.all(np.isfinite(values)):
            raise FptqError(f"weight of linear '{linear.name}' contains NaN or Inf")
