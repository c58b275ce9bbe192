"""Quantize each linear's [K, N] weight to group-wise INT4 (tensor by tensor, round to nearest)."""
from __future__ import annotations

import numpy as np

from ..errors import FptqError
from ..int4 import quantize_groupwise
from ..state import State


class QuantizeWeightsInt4:
    name = "quantize_weights"

    def run(self, state: State) -> str:
        cfg = state.config
        worst = ("", np.inf)
        for linear in state.linears.values():
            weight = linear.node.inputs[1].values
            if not np.all(np.isfinite(weight)):
                raise FptqError(f"weight of linear '{linear.name}' contains NaN or Inf")
            linear.quantized = quantize_groupwise(weight, cfg.group_size, cfg.symmetric)
            sqnr = weight_sqnr(weight, linear.quantized.dequantize())
            linear.weight_sqnr_db = sqnr
            if sqnr < worst[1]:
                worst = (linear.name, sqnr)
        kind = "symmetric int4" if cfg.symmetric else "asymmetric uint4"
        return f"{len(state.linears)} weights to {kind}, group {cfg.group_size}; lowest SQNR {worst[1]:.1f} dB ({worst[0]})"


def weight_sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
