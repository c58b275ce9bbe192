"""The contract of the bundled ops `fptq::W4A8MatMul` and `fptq::W8A8MatMul` on the Python side: weight
packing, ONNX schemas (so onnx.checker and shape inference accept the nodes) and float64 numpy
references that onnx's ReferenceEvaluator can run (the independent check on the C++ and CUDA kernels).

    Y[m, n] = a_m * sum_g ws[n, g] * sum_{k in group g} xq[m, k] * wq[n, k]   (+ bias[n])

Inputs: X [..., K] float or float16; W uint8 [N, Kp/2] (Kp = ceil(K/g)*g; row n holds wq[n, :] as
signed int4, element k in byte k//2, even k in the low nibble, zero padded past K); weight scales
float32 [N, ceil(K/g)]; optional act_scale float32 scalar (absent: per-token dynamic, a_m =
max|X[m]|/127); optional bias float32 [N]. Attributes K, N, group_size. Output [..., N] in X's type.
X is quantized as xq = clip(round_half_even(X / a_m), -128, 127), as the qdq form does.

fptq::W8A8MatMul is the same product over int8 weights (the int8 LM head): W int8 [N, Kp], row n
holding wq[n, :] in [-128, 127], zero past K, any group_size >= 1 (K: per output channel). Its rows are
an embedding table's rows, so a tied lookup Gathers the same initializer. CPU and CUDA kernels (CUDA:
group_size a multiple of 32).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx.reference.op_run import OpRun

from fptq_graph.quant.int4 import pack_int4

DOMAIN = "fptq"
OP_TYPE = "W4A8MatMul"
OP_TYPE_INT8 = "W8A8MatMul"
MIN_TOKEN_SCALE = 1e-12    # the same floor as the qdq form's per-token scale (emit_qdq)
MAX_INT8_GROUP = 131071    # 128 * 128 * group < 2**31: an int8 group's sum fits int32 (w4a8_layout.h)


def pack_weight(q: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] int4 values (int8 in [-8, 7]) -> the op's uint8 [N, Kp/2] layout."""
    k, n = q.shape
    kp = -(-k // group_size) * group_size
    rows = np.zeros((n, kp), dtype=np.int8)
    rows[:, :k] = q.T
    return np.frombuffer(pack_int4(rows), dtype=np.uint8).reshape(n, kp // 2)


def unpack_weight(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_weight: uint8 [N, Kp/2] -> int8 [K, N]."""
    lo = (packed & 0xF).astype(np.int16)
    hi = (packed >> 4).astype(np.int16)
    rows = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)
    rows = np.where(rows > 7, rows - 16, rows)
    return rows[:, :k].T.astype(np.int8)


def pack_weight_int8(q: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] int8 codes -> W8A8MatMul's int8 [N, Kp] layout (rows per output channel, zero padded)."""
    k, n = q.shape
    kp = -(-k // group_size) * group_size
    rows = np.zeros((n, kp), dtype=np.int8)
    rows[:, :k] = q.T
    return rows


def reference(x, packed, scales, act_scale, bias, K: int, N: int, group_size: int) -> np.ndarray:
    """W4A8MatMul's semantics in numpy; the product is computed in float64 from exact integers."""
    return _reference(x, unpack_weight(np.asarray(packed), K), scales, act_scale, bias, K, N, group_size)


def reference_int8(x, weight, scales, act_scale, bias, K: int, N: int, group_size: int) -> np.ndarray:
    """W8A8MatMul's semantics in numpy (weight int8 [N, Kp])."""
    return _reference(x, np.asarray(weight)[:, :K].T, scales, act_scale, bias, K, N, group_size)


def _reference(x, wq_kn, scales, act_scale, bias, K: int, N: int, group_size: int) -> np.ndarray:
    x32 = np.asarray(x).astype(np.float32)
    rows = x32.reshape(-1, K)
    if act_scale is None:
        a = np.maximum(np.abs(rows).max(axis=1, keepdims=True) / np.float32(127), np.float32(MIN_TOKEN_SCALE))
    else:
        a = np.full((rows.shape[0], 1), np.float32(np.asarray(act_scale).reshape(())), dtype=np.float32)
    xq = np.clip(np.round(rows / a), -128, 127).astype(np.float64)      # np.round is half to even
    wq = wq_kn.astype(np.float64)                                       # [K, N]
    g = group_size
    out = np.zeros((rows.shape[0], N), dtype=np.float64)
    for grp in range(np.asarray(scales).shape[1]):
        part = xq[:, grp * g:(grp + 1) * g] @ wq[grp * g:(grp + 1) * g]   # exact: integers < 2**53
        out += part * np.asarray(scales, dtype=np.float64)[:, grp]
    out *= a.astype(np.float64)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)
    return out.reshape(*np.asarray(x).shape[:-1], N)


class W4A8MatMulReference(OpRun):
    """fptq::W4A8MatMul for onnx.reference.ReferenceEvaluator(model, new_ops=[W4A8MatMulReference])."""

    op_domain = DOMAIN

    def _run(self, x, packed, scales, act_scale=None, bias=None, K=None, N=None, group_size=None):
        return (reference(x, packed, scales, act_scale, bias, K, N, group_size).astype(x.dtype),)


class W8A8MatMulReference(OpRun):
    """fptq::W8A8MatMul for onnx.reference.ReferenceEvaluator(model, new_ops=[W8A8MatMulReference])."""

    op_domain = DOMAIN

    def _run(self, x, weight, scales, act_scale=None, bias=None, K=None, N=None, group_size=None):
        return (reference_int8(x, weight, scales, act_scale, bias, K, N, group_size).astype(x.dtype),)


W4A8MatMulReference.__name__ = OP_TYPE   # ReferenceEvaluator matches custom ops by class name
W8A8MatMulReference.__name__ = OP_TYPE_INT8


def _register_schema(op_type: str, weight_type: str, doc: str) -> None:
    """Tell onnx about the op so check_model(full_check=True) and shape inference work on our output."""
    try:
        onnx.defs.get_schema(op_type, 1, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    O = onnx.defs.OpSchema
    schema = O(
        op_type, DOMAIN, 1,
        doc=doc,
        inputs=[
            O.FormalParameter("X", "T"),
            O.FormalParameter("W", weight_type),
            O.FormalParameter("scales", "tensor(float)"),
            O.FormalParameter("act_scale", "tensor(float)", param_option=O.FormalParameterOption.Optional),
            O.FormalParameter("bias", "tensor(float)", param_option=O.FormalParameterOption.Optional),
        ],
        outputs=[O.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activation type")],
        attributes=[O.Attribute(name, O.AttrType.INT, required=True) for name in ("K", "N", "group_size")],
    )
    onnx.defs.register_schema(schema)


_register_schema(OP_TYPE, "tensor(uint8)", "int8 activations x group-wise int4 weights, int32 accumulation per group (fptq-graph)")
_register_schema(OP_TYPE_INT8, "tensor(int8)", "int8 activations x int8 weights (per group or per output channel), "
                 "int32 accumulation per group (fptq-graph)")
