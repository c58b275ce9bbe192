"""Group-wise INT4 weight quantization and nibble packing (numpy only).

Weights are laid out [K, N] as ONNX MatMul takes them; groups are `group_size` consecutive rows
(input channels) of one column, so scales are [ceil(K/g), N]. Symmetric scales carry a sign (the
group's extreme weight maps to -8), so a scale may be negative; dequantization is q * scale all the same. A last partial group is allowed:
it simply has fewer members, which matches DequantizeLinear's blocked semantics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# Scales are stored as float32: a group of subnormal weights would get a scale that rounds to 0.
# The smallest normal float32 instead: such weights quantize to 0, within half a step.
MIN_SCALE = float(np.finfo(np.float32).tiny)


@dataclass
class QuantizedWeight:
    """A quantized [K, N] weight. 4-bit codes are kept packed two a byte (pack_int4, ONNX's INT4 layout):
    int8 codes for every linear would add a quarter of the float weights to peak memory; `q` unpacks
    one weight's codes when an emitter needs them."""

    codes: np.ndarray        # bits 4: packed uint8 [ceil(K*N/2)]; bits 8: int8 [K, N]
    shape: tuple[int, int]   # [K, N]
    scale: np.ndarray        # [ceil(K/g), N] float32
    zero_point: np.ndarray | None  # [ceil(K/g), N] uint8 in [0, 15], asymmetric only
    group_size: int
    bits: int = 4            # 8 for int8 per-output-channel weights (int8.py): q in [-127, 127], one group of K

    @classmethod
    def from_codes(cls, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, group_size: int,
                   bits: int = 4) -> "QuantizedWeight":
        codes = q.astype(np.int8) if bits == 8 else np.frombuffer(pack_int4(q), dtype=np.uint8)
        return cls(codes=codes, shape=tuple(q.shape), scale=scale, zero_point=zero_point, group_size=group_size, bits=bits)

    @property
    def q(self) -> np.ndarray:
        """[K, N] int8 codes: [-8, 7] (symmetric), [0, 15] (asymmetric) or [-127, 127] (bits 8)."""
        if self.bits == 8:
            return self.codes
        k, n = self.shape
        return unpack_int4(self.codes.tobytes(), k * n, signed=self.zero_point is None).reshape(k, n)

    def dequantize(self, columns: slice = slice(None)) -> np.ndarray:
        """The float32 weight, or the output channels `columns` of it (int8 weights: a wide LM head is
        dequantized a block of columns at a time by whoever would otherwise hold it whole)."""
        k = self.shape[0]
        if self.bits == 8:   # one group spanning K: broadcast the [1, N] scales, no [K, N] copy of them
            return self.codes[:, columns].astype(np.float32) * self.scale[:, columns]
        if columns != slice(None):
            return self.dequantize()[:, columns]
        s = np.repeat(self.scale, self.group_size, axis=0)[:k]
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point, self.group_size, axis=0)[:k].astype(np.float32)
        return q * s


def quantize_groupwise(w: np.ndarray, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest INT4 with one scale per (group of K, output channel)."""
    if w.ndim != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    groups = -(-k // group_size)
    padded = np.zeros((groups * group_size, n), dtype=np.float64)
    padded[:k] = w
    blocks = padded.reshape(groups, group_size, n)
    valid = (np.arange(groups * group_size) < k).reshape(groups, group_size, 1)
    if symmetric:
        # The group's largest-magnitude weight m lands exactly on -8 (scale = m / -8, negative when m is
        # positive), so all 16 codes are used: a step 7/8 the size of max|w|/7's. A weight of the other
        # sign and the same magnitude would need +8 and clips to 7, one step off. (ONNX Runtime's
        # MatMulNBits quantizer uses the same grid.) On MiniLM: mean cosine 0.938 -> 0.951 (W4A16).
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
        magnitude = np.maximum(np.abs(extreme) / 8.0, MIN_SCALE)
        scale = np.where(extreme != 0, -np.sign(extreme) * magnitude, 1.0)
        q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7)
        zero_point = None
    else:
        lo = np.where(valid, blocks, np.inf).min(axis=1).clip(max=0.0)
        hi = np.where(valid, blocks, -np.inf).max(axis=1).clip(min=0.0)
        scale = np.where(hi > lo, np.maximum((hi - lo) / 15.0, MIN_SCALE), 1.0)
        zero_point = np.clip(np.round(-lo / scale), 0, 15)
        q = np.clip(np.round(blocks / scale[:, None, :]) + zero_point[:, None, :], 0, 15)
        zero_point = zero_point.astype(np.uint8)
    q = q.reshape(groups * group_size, n)[:k].astype(np.int8)
    return QuantizedWeight.from_codes(q, scale.astype(np.float32), zero_point, group_size)


def pack_int4(values: np.ndarray) -> bytes:
    """Two values a byte, element order row-major, the first value of each pair in the low nibble."""
    flat = values.astype(np.int16).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of pack_int4: `count` values, sign-extended when `signed`."""
    raw = np.frombuffer(data, dtype=np.uint8)
    flat = np.empty(raw.size * 2, dtype=np.int16)
    flat[0::2] = raw & 0xF
    flat[1::2] = raw >> 4
    flat = flat[:count]
    if signed:
        flat = np.where(flat > 7, flat - 16, flat)
    return flat.astype(np.int8 if signed else np.uint8)


def keep_within(qw: QuantizedWeight, limit: float) -> tuple[QuantizedWeight, int]:
    """qw with every dequantized value inside [-limit, limit] (the activation type's range: float16's
    65504), and how many codes had to move. A weight near that bound can dequantize past it: with zero
    points the grid reaches up to half a step beyond the group's range, and GPTQ's feedback may push a
    row beyond the original weights'; such a value becomes Inf in the model and every output NaN. Each
    offending code steps toward the zero point until it fits (one or two steps: at most 1.5 steps of
    error on those weights, instead of Inf). 8-bit weights (scale = max / 127) never pass the range."""
    reach = 8.0 if qw.zero_point is None else 15.0   # the largest |q - zero point|
    if qw.bits == 8 or float(np.abs(qw.scale).max(initial=0.0)) * reach <= limit:
        return qw, 0   # no code can reach past the limit: nothing dequantized (a 7B down_proj: 0.4 GiB a float64 copy)
    scale = np.repeat(qw.scale.astype(np.float64), qw.group_size, axis=0)[:qw.shape[0]]
    zero = 0.0 if qw.zero_point is None else np.repeat(qw.zero_point, qw.group_size, axis=0)[:qw.shape[0]].astype(np.float64)
    q = qw.q.astype(np.float64)
    over = np.abs((q - zero) * scale) > limit
    moved = int(over.sum())
    if not moved:
        return qw, 0
    while over.any():
        q = np.where(over, q - np.sign(q - zero), q)
        over = np.abs((q - zero) * scale) > limit
    return QuantizedWeight.from_codes(q.astype(np.int8), qw.scale, qw.zero_point, qw.group_size), moved
