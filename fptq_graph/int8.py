"""Int8 per-output-channel weights, for the W8A8 reference recipe (w8a8-smoothquant).

Symmetric, one scale per output channel (max|w| / 127 over K): a QuantizedWeight whose one group
spans all of K, so everything that dequantizes INT4 groups dequantizes these too.
"""
from __future__ import annotations

import numpy as np

from .int4 import MIN_SCALE, QuantizedWeight


def quantize_per_channel_int8(w: np.ndarray) -> QuantizedWeight:
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    amax = np.abs(w.astype(np.float64)).max(axis=0, keepdims=True)
    scale = np.where(amax > 0, np.maximum(amax / 127.0, MIN_SCALE), 1.0)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return QuantizedWeight.from_codes(q, scale.astype(np.float32), None, w.shape[0], bits=8)
