"""Int8 per-output-channel weights, for the W8A8 reference recipe (w8a8-smoothquant).

Symmetric, one scale per output channel (max|w| / 127 over K): a QuantizedWeight whose one group
spans all of K, so everything that dequantizes INT4 groups dequantizes these too.
"""
from __future__ import annotations

import numpy as np

from fptq_graph.quant.int4 import MIN_SCALE, QuantizedWeight


# Columns a step: float64 temporaries of about 32 MiB whatever the weight's size (an LM head over a
# 262k vocabulary is 0.7 GB in float32; whole-array float64 temporaries took quantize's peak to 7x it).
CHUNK_ELEMENTS = 1 << 22


def quantize_per_channel_int8(w: np.ndarray) -> QuantizedWeight:
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    step = max(1, CHUNK_ELEMENTS // max(1, k))
    scale = np.empty((1, n), np.float64)
    q = np.empty((k, n), np.int8)
    for start in range(0, n, step):
        cols = slice(start, start + step)
        block = w[:, cols].astype(np.float64)
        amax = np.abs(block).max(axis=0, keepdims=True)
        scale[:, cols] = np.where(amax > 0, np.maximum(amax / 127.0, MIN_SCALE), 1.0)
        q[:, cols] = np.clip(np.round(block / scale[:, cols]), -127, 127)
    return QuantizedWeight.from_codes(q, scale.astype(np.float32), None, k, bits=8)
