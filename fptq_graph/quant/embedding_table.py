"""Embedding tables quantized a row at a time: int8 with one scale per row (a token's vector, as the
int8 LM head has one per output channel), or INT4 in groups along the row (the linears' symmetric grid,
quant/int4.py, the group's largest-magnitude value on -8).

A table row is a [K, 1] weight column to the linears' quantizers (the table transposed is a [D, V]
weight whose output channels are tokens), so the codes and scales are the ones those quantizers
compute: nothing here has its own rounding rule. Resident: the [V, D] int8 codes (one byte a value),
the scales, and float64 temporaries of one slab of rows (about 32 MiB whatever the table's size); the
float table itself is read a slab at a time from wherever it lives (a memory-mapped input included).
"""
from __future__ import annotations

import numpy as np

from fptq_graph.quant.int4 import quantize_groupwise
from fptq_graph.quant.int8 import quantize_per_channel_int8

SLAB_ELEMENTS = 1 << 22


def quantize_table(rows, shape: tuple[int, int], bits: int, group: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Codes int8 [V, D] ([-127, 127] for bits 8, [-8, 7] for bits 4), float32 scales [V, blocks]
    (one block a row for bits 8, ceil(D / group) for bits 4) and the table's SQNR in dB (inf when
    exact). `rows(start, stop)` returns rows start..stop of the float table; `shape` is [V, D]."""
    if bits not in (4, 8):
        raise ValueError(f"embedding tables are quantized to 4 or 8 bits, not {bits}")
    v, d = shape
    blocks = 1 if bits == 8 else -(-d // group)
    codes = np.empty((v, d), np.int8)
    scales = np.empty((v, blocks), np.float32)
    step = max(1, SLAB_ELEMENTS // max(1, d))
    signal = noise = 0.0
    for start in range(0, v, step):
        stop = min(v, start + step)
        columns = np.asarray(rows(start, stop), dtype=np.float32).T   # [D, rows]: each token an output channel
        qw = quantize_per_channel_int8(columns) if bits == 8 else quantize_groupwise(columns, group)
        codes[start:stop] = qw.q.T
        scales[start:stop] = qw.scale.T
        signal += float(np.square(columns, dtype=np.float64).sum())
        noise += float(np.square(columns - qw.dequantize(), dtype=np.float64).sum())
    sqnr = float("inf") if noise == 0 else (10.0 * np.log10(signal / noise) if signal > 0 else float("-inf"))
    return codes, scales, sqnr

