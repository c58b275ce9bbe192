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

An int8 LM head (Config.lm_head) is MatMulNBits(bits=8) over uint8 codes + 128 laid out [N, K/b, b]
(nbits8_head; b the largest of 256..16 dividing K, else 32 with the last block zero padded), each block
repeating its channel's scale (per-channel int8 in MatMulNBits' blocked layout), accuracy_level 4 when
the head's activations are int8 (ORT 1.31's 8-bit kernel at level 0 dequantizes the whole weight every
run: 210 ms a token on this CPU; at 4 it re-quantizes the already-int8 activations per block of b,
within half a step of the per-token grid), 0 for float ones. Its tied embedding lookups are
com.microsoft.GatherBlockQuantized(bits=8, quantize_axis=2) on the very initializer the MatMulNBits
reads, its scales a Reshape of the same scales (tie_to_nbits_codes; ORT folds it at load).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.passes.base import PassResult
from fptq_graph.passes.lower.emit_qdq import EmitQDQ
from fptq_graph.passes.lower.lookup_nodes import gather_block_quantized, replace_gathers
from fptq_graph.passes.lower.qdq_nodes import activation_dtype, const, replace_linear
from fptq_graph.patterns.bias import gemm_bias


NBITS_BLOCKS = (256, 128, 64, 32, 16)


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
    kind = "lower"
    integer_int8_head = False   # an int8 head is MatMulNBits(bits=8) (emit_weight)

    def run(self, state) -> PassResult:
        self.accuracy_level = state.config.ort_accuracy_level
        result = super().run(state)
        return PassResult(result.summary + f"; MatMulNBits accuracy_level {self.accuracy_level}", modified=True,
                          stats={**result.stats, "accuracy_level": self.accuracy_level})

    def quantizes_input(self, linear) -> bool:
        return self.accuracy_level == 0   # at 4 MatMulNBits quantizes its input itself

    def emit_weight(self, state, linear) -> int:
        # Config.validate has refused int8 weights (but an int8 LM head's) and groups MatMulNBits cannot take.
        graph, qw = state.graph, state.quantized[linear.name]
        if qw.bits == 8:
            codes, scale, _, nbytes = nbits8_head(graph, linear, qw, state.plan[linear.name].activation.quantization)
            self._head_tables = (codes, scale)
            return nbytes
        node = linear.node
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
        bias = gemm_bias(node)
        replace_linear(graph, linear, gs.Node(op="MatMulNBits", domain="com.microsoft", inputs=inputs,
                                              attrs={"K": k, "N": n, "bits": 4, "block_size": g,
                                                     "accuracy_level": self.accuracy_level}),
                       bias)
        return packed.nbytes

    def tie_embeddings(self, state, head, gathers: list[gs.Node]) -> None:
        codes, scale = self._head_tables
        tie_to_nbits_codes(state.graph, head, gathers, codes, scale, head.k)


def nbits_block(k: int) -> int:
    return next((b for b in NBITS_BLOCKS if k % b == 0), 32)


def nbits8_head(graph: gs.Graph, linear, qw, quantization: str) -> tuple[gs.Constant, gs.Constant, int, int]:
    """The ort form's int8 head: com.microsoft.MatMulNBits(bits=8), accuracy_level 4 when its activations
    are int8 (see the module docstring), 0 for float ones. Returns the codes [N, K/b, b] and scales
    [N, K/b] constants, the block and the codes' bytes."""
    node = linear.node
    k, n = qw.shape
    b = nbits_block(k)
    blocks = -(-k // b)
    codes = np.full((n, blocks * b), 128, dtype=np.uint8)   # padding decodes to 0
    codes[:, :k] = (qw.codes.T.astype(np.int16) + 128).astype(np.uint8)
    codes_c = gs.Constant(f"{linear.name}.weight_nbits8", codes.reshape(n, blocks, b))
    per_channel = qw.scale.reshape(n).astype(activation_dtype(linear))
    scale_c = gs.Constant(f"{linear.name}.weight_scale", np.ascontiguousarray(np.repeat(per_channel[:, None], blocks, axis=1)))
    level = 0 if quantization == "float" else 4
    bias = gemm_bias(node)
    replace_linear(graph, linear, gs.Node(op="MatMulNBits", domain="com.microsoft", inputs=[node.inputs[0], codes_c, scale_c],
                                          attrs={"K": k, "N": n, "bits": 8, "block_size": b, "accuracy_level": level}),
                   bias)
    return codes_c, scale_c, b, codes.nbytes


def tie_to_nbits_codes(graph: gs.Graph, linear, gathers: list[gs.Node], codes: gs.Constant,
                       scale: gs.Constant, k: int) -> None:
    """Each tied Gather becomes com.microsoft.GatherBlockQuantized(bits=8) over the MatMulNBits codes
    [N, K/b, b] (gather_axis 0, quantize_axis 2), its scales [N, K/b, 1] a Reshape of the head's."""
    n, blocks, b = codes.values.shape
    dtype = np.dtype(scale.values.dtype)
    tag = f"{linear.name}.embedding_scale"
    scales3 = graph.layer(op="Reshape", name=f"{tag}_3d", inputs=[scale, const(f"{tag}_shape", np.array([n, blocks, 1], np.int64))],
                          outputs=[gs.Variable(f"{tag}_3d", dtype=dtype)])[0]
    # The tail constant is named _kp here (the padded K), as it always was: outputs stay byte-identical.
    replace_gathers(gathers, f"{linear.name}.embedding",
                    lambda tag, ids, out: gather_block_quantized(graph, tag, codes, ids, scales3, 8, k, out, tail_name="kp"))
