"""Emit the `ort` form: every linear becomes ONNX Runtime's contrib com.microsoft.MatMulNBits (4-bit
weights, blocks along K), which stock ONNX Runtime runs on CPU and CUDA with no library of ours.

Activations keep their FPTQ scheme exactly as in the qdq form (int8 QuantizeLinear/DequantizeLinear
per tensor, or per token), so this form computes what the qdq form computes. MatMulNBits layout:
B uint8 [N, ceil(K/g), g/2], codes along K two a byte, the first in the low nibble, the last block
zero padded; scales [N * ceil(K/g)]; unsigned codes with zero point 8 (symmetric: the default, no
input) or the asymmetric zero points, packed two a byte per output channel. accuracy_level is
Config.ort_accuracy_level: 0 (default), and ONNX Runtime computes in float what the graph says; 4, and
its CPU kernel quantizes each linear's input to int8 per block of K itself and multiplies in int8, the
incumbent's fast path. At 4 the graph writes no activation QDQ: the kernel would quantize the QDQ's
output again (a static scale has no use there), and the QDQ nodes cost decode speed (SmolLM2 in
onnxruntime-genai: 0.78-0.80x the builder's int4 model with them, 0.81-0.92x without; docs/benchmarks.md). The activations are then ORT's per-block int8, finer than a per-tensor
scale; the schemes still decide the LAE folds.

An int8 LM head (Config.lm_head) is MatMulNBits with bits=8 and its tied embedding lookups
GatherBlockQuantized over the same codes (passes/plan_lm_head.py, which says why its accuracy_level is 4).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..state import Linear
from .emit_qdq import EmitQDQ, activation_dtype
from .emit_w4a8 import replace_linear
from .plan_lm_head import nbits8_head, tie_to_nbits_codes


def nbits_weight(q: np.ndarray, group: int, offset: int) -> np.ndarray:
    """[K, N] 4-bit codes (int8 values; `offset` makes them unsigned) -> uint8 [N, ceil(K/g), g/2]."""
    k, n = q.shape
    blocks = -(-k // group)
    codes = np.full((n, blocks * group), offset, dtype=np.uint8)   # padding decodes to 0
    codes[:, :k] = (q.T.astype(np.int16) + offset).astype(np.uint8)
    codes = codes.reshape(n, blocks, group // 2, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)


def nbits_zero_points(zero_point: np.ndarray) -> np.ndarray:
    """[ceil(K/g), N] uint4 zero points -> uint8 [N, ceil(blocks/2)], two a byte, low nibble first."""
    zp = zero_point.T.astype(np.uint8)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.full((zp.shape[0], 1), 8, np.uint8)], axis=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


class EmitORT(EmitQDQ):
    name = "emit_ort"

    def run(self, state) -> str:
        self.accuracy_level = state.config.ort_accuracy_level
        return super().run(state) + f"; MatMulNBits accuracy_level {self.accuracy_level}"

    def quantizes_input(self, linear: Linear) -> bool:
        return self.accuracy_level == 0   # at 4 MatMulNBits quantizes its input itself

    def emit_weight(self, graph: gs.Graph, linear: Linear) -> int:
        # Config.validate has refused int8 weights (but an int8 LM head's) and groups MatMulNBits cannot take.
        if linear.quantized.bits == 8:
            codes, scale, _, nbytes = nbits8_head(graph, linear, replace_linear)
            self._head_tables = (codes, scale)
            return nbytes
        node, qw = linear.node, linear.quantized
        k, n = qw.shape
        g = qw.group_size
        symmetric = qw.zero_point is None
        packed = nbits_weight(qw.q, g, 8 if symmetric else 0)
        inputs = [node.inputs[0], gs.Constant(f"{linear.name}.weight_nbits", packed),
                  gs.Constant(f"{linear.name}.weight_scale",   # MatMulNBits: scales in A's type
                              np.ascontiguousarray(qw.scale.T, dtype=activation_dtype(linear)).reshape(-1))]
        if not symmetric:
            inputs.append(gs.Constant(f"{linear.name}.weight_zero_point", nbits_zero_points(qw.zero_point)))
        # A Gemm bias stays an Add after the product (MatMulNBits' own bias input is newer than ORT 1.17).
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        replace_linear(graph, linear, gs.Node(op="MatMulNBits", domain="com.microsoft", inputs=inputs,
                                              attrs={"K": k, "N": n, "bits": 4, "block_size": g,
                                                     "accuracy_level": self.accuracy_level}),
                       bias)
        return packed.nbytes

    def tie_embeddings(self, graph: gs.Graph, head: Linear, gathers: list[gs.Node]) -> None:
        codes, scale = self._head_tables
        tie_to_nbits_codes(graph, head, gathers, codes, scale, head.k)
