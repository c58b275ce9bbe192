"""The LM head: which linear it is, whether its weight is also an embedding table (tied embeddings),
and how each form writes an int8 head and the lookup that shares its quantized table.

Config.lm_head ("float", "int8" or "int4"; quantize_lm_head means "int4"): find_linears keeps a float
head out of the linears, quantize_weights gives an int8 head int8 per-output-channel symmetric weights
(an int4 head INT4 at Config.lm_head_group) and the emitters write it. This pass runs after
classification. An int8 head whose [K, N] weight is the transpose of an embedding Gather's [N, K]
table (SmolLM2, most small decoders) keeps that table once: the lookup reads the head's codes and
scales, so the embedding's values are exactly the head weight's dequantized values. An equalization
fold would scale the head's rows (diag(s) W) and part it from the table, so a tied head in the LAE
band falls back as a linear without a foldable producer does: per-token dynamic (static under
SmoothQuant).

How the forms write an int8 head (one quantization: q = round(w / s_n) in [-127, 127], s_n = max|w_:,n| / 127):
- qdq:  codes int8 [K, N] -> DequantizeLinear(axis=1, scale [N]) -> MatMul, activations QDQ by scheme.
- w4a8: the same codes through com.microsoft.MatMulIntegerToFloat: activations quantized to uint8
        (int8 code + 128, the u8 x s8 path ONNX Runtime's CPU kernels take with VNNI; zero point 128),
        a_scale the static scale, or 1 with a per-token Mul after it; b_scale the per-channel scales.
        Integer sums, so it equals the qdq form to float rounding, and it is ONNX Runtime's fast path
        (a 1 x 576 @ 576 x 49152 product: 2.3 ms against 8 ms float and 160 ms for the qdq form's
        per-token head, which ONNX Runtime 1.31 does not fuse; docs/benchmarks.md).
- ort:  com.microsoft.MatMulNBits(bits=8) over uint8 codes + 128 laid out [N, K/b, b] (b the largest
        of 256..16 dividing K, else 32 with the last block zero padded), each block repeating its
        channel's scale (per-channel int8 in MatMulNBits' blocked layout). accuracy_level 4 when the
        head's activations are int8 (ORT 1.31's 8-bit kernel at level 0 dequantizes the whole
        weight every run: 210 ms a token on this CPU; at 4 it re-quantizes the already-int8
        activations per block of b, within half a step of the per-token grid), 0 for float ones.

Tied lookups: qdq and w4a8 replace Gather(table, ids) by Gather(codes, ids, axis=1) -> Transpose ->
Cast -> Mul(Gather(scales, ids)) on the head's own [K, N] codes (ONNX Gather takes no int4/8-bit
blocked table, and DequantizeLinear -> Transpose -> MatMul would keep ORT from fusing the head);
ort uses com.microsoft.GatherBlockQuantized(bits=8, quantize_axis=2) on the very initializer the
MatMulNBits reads, its scales a Reshape of the same scales (ORT folds it at load: 1/64 of the codes).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..state import EQUALIZED, Linear, State
from .find_linears import LOGITS, _feeds_output

NBITS_BLOCKS = (256, 128, 64, 32, 16)


def find_lm_head(state: State) -> Linear | None:
    """The quantizable linear producing the model output `logits` (directly or through reshapes/casts)."""
    outputs = {t.name for t in state.graph.outputs} & {LOGITS}
    return next((l for l in state.linears.values() if _feeds_output(l.node, outputs)), None)


def tied_gathers(graph: gs.Graph, linear: Linear) -> list[gs.Node]:
    """Gathers along axis 0 of an [N, K] table equal to the linear's float [K, N] weight transposed: a
    constant table (a Transpose-tied head, or an exporter that wrote the tied table twice), or a 2-D
    Transpose of a constant [K, N] equal to the weight (the GenAI builder looks its embeddings up in
    Transpose(lm_head weight))."""
    source = linear.node.inputs[1]
    if not isinstance(source, gs.Constant):
        return []
    weight = np.asarray(source.values)
    found = []
    for node in graph.nodes:
        if node.op != "Gather" or int(node.attrs.get("axis", 0)) not in (0, -2) or len(node.inputs) < 2:
            continue
        table, transposed = node.inputs[0], True
        if isinstance(table, gs.Variable) and len(table.inputs) == 1 and table.inputs[0].op == "Transpose" \
                and list(table.inputs[0].attrs.get("perm", [1, 0])) == [1, 0]:
            table, transposed = table.inputs[0].inputs[0], False
        if not isinstance(table, gs.Constant):
            continue
        values = table.values
        expected = weight.T if transposed else weight
        if getattr(values, "shape", None) != expected.shape or np.dtype(values.dtype) != weight.dtype:
            continue
        if np.array_equal(np.asarray(values), expected):
            found.append(node)
    return found


class PlanLMHead:
    name = "plan_lm_head"

    def run(self, state: State) -> str:
        cfg = state.config
        mode = cfg.lm_head_mode
        if mode == "float":
            return "LM head kept float" if state.kept_float else "no LM head"
        head = find_lm_head(state)
        if head is None:
            return f"lm_head={mode}: no linear produces '{LOGITS}'"
        if mode == "int4":
            head.reason += f"; INT4 weights, group {cfg.lm_head_group} (lm_head='int4')"
            return f"LM head '{head.name}': INT4 group {cfg.lm_head_group}"
        gathers = tied_gathers(state.graph, head)
        note = "int8 per-output-channel weights (lm_head='int8')"
        if gathers:
            names = ", ".join(g.name or g.op for g in gathers)
            note += f"; table shared with embedding {names}"
            if head.scheme in EQUALIZED:
                fallback = "static" if cfg.recipe in ("smoothquant-w4a8", "w8a8-smoothquant") else "dynamic"
                head.reason = (f"v={head.v:.3g}: tied embedding table (an equalization fold would part the head "
                               f"from the table): {fallback}")
                head.scheme = fallback
        head.reason += f"; {note}"
        tied = f", tied to {len(gathers)} embedding Gather(s): table held once, quantized" if gathers else ""
        return f"LM head '{head.name}': int8 per output channel, {head.scheme} activations{tied}"


# ---- emitting ---------------------------------------------------------------------------------------

def _const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def _dtype(linear: Linear) -> np.dtype:
    return np.dtype(linear.activation.dtype) if linear.activation.dtype is not None else np.dtype(np.float32)


def source_dtype(table: gs.Tensor):
    """A tied table's float type: the constant's, or for Transpose(constant) the constant's."""
    while not isinstance(table, gs.Constant):
        table = table.inputs[0].inputs[0]
    return table.values.dtype


def tie_to_kn_codes(graph: gs.Graph, linear: Linear, gathers: list[gs.Node], codes: gs.Constant,
                    scale: gs.Constant) -> None:
    """Each tied Gather(table [N, K], ids) becomes the dequantized rows of the head's int8 [K, N] codes:
    Gather(codes, ids, axis=1) -> Transpose -> Cast -> Mul(Gather(scale [N], ids)), shaped ids.shape + [K]."""
    k = codes.values.shape[0]
    for index, node in enumerate(gathers):
        tag = f"{node.name or linear.name + '.embedding'}.q{index or ''}"
        ids, out = node.inputs[1], node.outputs[0]
        dtype = np.dtype(source_dtype(node.inputs[0]))   # the table's type, which the lookup keeps
        node.outputs.clear()
        node.inputs.clear()

        def var(suffix, kind=None):
            return gs.Variable(f"{tag}_{suffix}", dtype=kind or dtype)

        flat = graph.layer(op="Reshape", name=f"{tag}_flat", inputs=[ids, _const(f"{tag}_minus1", np.array([-1], np.int64))],
                           outputs=[var("ids", ids.dtype or np.int64)])[0]
        rows = graph.layer(op="Gather", name=f"{tag}_gather", attrs={"axis": 1}, inputs=[codes, flat],
                           outputs=[var("codes_kt", np.int8)])[0]
        rows = graph.layer(op="Transpose", name=f"{tag}_transpose", attrs={"perm": [1, 0]}, inputs=[rows],
                           outputs=[var("codes_tk", np.int8)])[0]
        rows = graph.layer(op="Cast", name=f"{tag}_cast", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)},
                           inputs=[rows], outputs=[var("codes_float")])[0]
        scales = graph.layer(op="Gather", name=f"{tag}_scale_gather", attrs={"axis": 0}, inputs=[scale, flat],
                             outputs=[var("scale_t", scale.values.dtype)])[0]
        if np.dtype(scale.values.dtype) != dtype:   # the w4a8 form's float32 scales in a float16 model
            scales = graph.layer(op="Cast", name=f"{tag}_scale_cast", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)},
                                 inputs=[scales], outputs=[var("scale_t_cast")])[0]
        scales = graph.layer(op="Unsqueeze", name=f"{tag}_scale_column",
                             inputs=[scales, _const(f"{tag}_axis1", np.array([1], np.int64))], outputs=[var("scale_t1")])[0]
        rows = graph.layer(op="Mul", name=f"{tag}_dequant", inputs=[rows, scales], outputs=[var("rows")])[0]
        shape = graph.layer(op="Shape", name=f"{tag}_ids_shape", inputs=[ids], outputs=[var("ids_shape", np.int64)])[0]
        shape = graph.layer(op="Concat", name=f"{tag}_shape", attrs={"axis": 0},
                            inputs=[shape, _const(f"{tag}_k", np.array([k], np.int64))], outputs=[var("shape", np.int64)])[0]
        graph.layer(op="Reshape", name=f"{tag}_reshape", inputs=[rows, shape], outputs=[out])


def integer_head(graph: gs.Graph, linear: Linear) -> tuple[gs.Constant, gs.Constant, int]:
    """The w4a8 form's int8 head: activations to uint8 (the scheme's int8 code + 128), then
    com.microsoft.MatMulIntegerToFloat over the int8 [K, N] codes; a per-token scale multiplies after it.
    Returns the codes and scale constants (for tied lookups) and the codes' bytes."""
    node, qw = linear.node, linear.quantized
    k, n = qw.shape
    dtype = _dtype(linear)
    tag = f"{linear.name}.act"
    x = node.inputs[0]
    codes = gs.Constant(f"{linear.name}.weight_int8", qw.codes)
    scale = gs.Constant(f"{linear.name}.weight_scale", qw.scale.reshape(n).astype(np.float32))
    zero = _const(f"{tag}_zero_point_u8", np.array(128, np.uint8))

    def var(suffix, kind=None):
        return gs.Variable(f"{tag}_{suffix}", dtype=kind or dtype)

    if linear.act_scale is not None:   # static: QuantizeLinear with zero point 128 is int8 QDQ's code + 128
        a_scale = _const(f"{tag}_scale", np.array(linear.act_scale, np.float32))
        x_scale = a_scale if dtype == np.float32 else _const(f"{tag}_scale_{dtype.name}", np.array(linear.act_scale, dtype))
        xu = graph.layer(op="QuantizeLinear", name=f"{tag}_q_u8", inputs=[x, x_scale, zero],
                         outputs=[var("uint8", np.uint8)])[0]
        token_scale = None
    else:                               # per token: the qdq form's ops, then + 128 and a cast to uint8
        from ..w4a8_op import MIN_TOKEN_SCALE
        floor = max(MIN_TOKEN_SCALE, float(np.finfo(dtype).smallest_subnormal))
        absx = graph.layer(op="Abs", name=f"{tag}_abs", inputs=[x], outputs=[var("abs")])[0]
        amax = graph.layer(op="ReduceMax", name=f"{tag}_amax", attrs={"keepdims": 1},
                           inputs=[absx, _const(f"{tag}_last_axis", np.array([-1], np.int64))], outputs=[var("amax")])[0]
        s = graph.layer(op="Div", name=f"{tag}_scale", inputs=[amax, _const(f"{tag}_127", np.array(127.0, dtype))],
                        outputs=[var("scale_raw")])[0]
        token_scale = graph.layer(op="Max", name=f"{tag}_scale_floor", inputs=[s, _const(f"{tag}_min_scale", np.array(floor, dtype))],
                                  outputs=[var("token_scale")])[0]
        q = graph.layer(op="Div", name=f"{tag}_div", inputs=[x, token_scale], outputs=[var("scaled")])[0]
        q = graph.layer(op="Round", name=f"{tag}_round", inputs=[q], outputs=[var("rounded")])[0]
        q = graph.layer(op="Clip", name=f"{tag}_clip", inputs=[q, _const(f"{tag}_lo", np.array(-128.0, dtype)),
                                                                 _const(f"{tag}_hi", np.array(127.0, dtype))],
                        outputs=[var("int8_values")])[0]
        q = graph.layer(op="Add", name=f"{tag}_offset", inputs=[q, _const(f"{tag}_128", np.array(128.0, dtype))],
                        outputs=[var("uint8_values")])[0]
        xu = graph.layer(op="Cast", name=f"{tag}_to_u8", attrs={"to": onnx.TensorProto.UINT8}, inputs=[q],
                         outputs=[var("uint8", np.uint8)])[0]
        a_scale = _const(f"{tag}_unit_scale", np.array(1.0, np.float32))
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    # The linear's node goes; its outputs come from the chain product [-> Cast] [-> Mul(token scale)] [-> Add(bias)].
    outputs = list(node.outputs)
    node.outputs.clear()
    node.inputs.clear()
    steps = []
    if dtype != np.float32:
        steps.append(("Cast", [], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}))
    if token_scale is not None:
        steps.append(("Mul", [token_scale], {}))
    if bias is not None:
        steps.append(("Add", [bias], {}))
    y = gs.Variable(f"{linear.name}.int_product", dtype=np.float32) if steps else outputs[0]
    graph.layer(op="MatMulIntegerToFloat", domain="com.microsoft", name=node.name or linear.name,
                inputs=[xu, codes, a_scale, scale, zero], outputs=[y] if steps else outputs)
    for i, (op, extra, attrs) in enumerate(steps):
        last = i == len(steps) - 1
        y = graph.layer(op=op, name=f"{linear.name}.{op.lower()}_after", attrs=attrs, inputs=[y, *extra],
                        outputs=outputs if last else [gs.Variable(f"{linear.name}.{op.lower()}_after", dtype=dtype)])[0]
    return codes, scale, qw.codes.nbytes


def nbits_block(k: int) -> int:
    return next((b for b in NBITS_BLOCKS if k % b == 0), 32)


def nbits8_head(graph: gs.Graph, linear: Linear, replace_linear) -> tuple[gs.Constant, gs.Constant, int, int]:
    """The ort form's int8 head: com.microsoft.MatMulNBits(bits=8). Returns the codes [N, K/b, b] and
    scales [N, K/b] constants, the block and the codes' bytes."""
    node, qw = linear.node, linear.quantized
    k, n = qw.shape
    b = nbits_block(k)
    blocks = -(-k // b)
    codes = np.full((n, blocks * b), 128, dtype=np.uint8)   # padding decodes to 0
    codes[:, :k] = (qw.codes.T.astype(np.int16) + 128).astype(np.uint8)
    codes_c = gs.Constant(f"{linear.name}.weight_nbits8", codes.reshape(n, blocks, b))
    per_channel = qw.scale.reshape(n).astype(_dtype(linear))
    scale_c = gs.Constant(f"{linear.name}.weight_scale", np.ascontiguousarray(np.repeat(per_channel[:, None], blocks, axis=1)))
    level = 0 if linear.scheme == "float" else 4
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    replace_linear(graph, linear, gs.Node(op="MatMulNBits", domain="com.microsoft", inputs=[node.inputs[0], codes_c, scale_c],
                                          attrs={"K": k, "N": n, "bits": 8, "block_size": b, "accuracy_level": level}),
                   bias)
    return codes_c, scale_c, b, codes.nbytes


def tie_to_nbits_codes(graph: gs.Graph, linear: Linear, gathers: list[gs.Node], codes: gs.Constant,
                       scale: gs.Constant, k: int) -> None:
    """Each tied Gather becomes com.microsoft.GatherBlockQuantized(bits=8) over the MatMulNBits codes
    [N, K/b, b] (gather_axis 0, quantize_axis 2), its scales [N, K/b, 1] a Reshape of the head's."""
    n, blocks, b = codes.values.shape
    dtype = np.dtype(scale.values.dtype)
    tag = f"{linear.name}.embedding_scale"
    scales3 = graph.layer(op="Reshape", name=f"{tag}_3d", inputs=[scale, _const(f"{tag}_shape", np.array([n, blocks, 1], np.int64))],
                          outputs=[gs.Variable(f"{tag}_3d", dtype=dtype)])[0]
    for index, node in enumerate(gathers):
        tag = f"{node.name or linear.name + '.embedding'}.q{index or ''}"
        ids, out = node.inputs[1], node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        rows = graph.layer(op="GatherBlockQuantized", name=f"{tag}_gbq", domain="com.microsoft",
                           attrs={"gather_axis": 0, "quantize_axis": 2, "block_size": b, "bits": 8},
                           inputs=[codes, ids, scales3], outputs=[gs.Variable(f"{tag}_blocks", dtype=dtype)])[0]
        shape = graph.layer(op="Shape", name=f"{tag}_ids_shape", inputs=[ids], outputs=[gs.Variable(f"{tag}_ids_shape", dtype=np.int64)])[0]
        shape = graph.layer(op="Concat", name=f"{tag}_shape", attrs={"axis": 0},
                            inputs=[shape, _const(f"{tag}_kp", np.array([blocks * b], np.int64))],
                            outputs=[gs.Variable(f"{tag}_shape", dtype=np.int64)])[0]
        if blocks * b == k:
            graph.layer(op="Reshape", name=f"{tag}_reshape", inputs=[rows, shape], outputs=[out])
        else:
            rows = graph.layer(op="Reshape", name=f"{tag}_reshape", inputs=[rows, shape],
                               outputs=[gs.Variable(f"{tag}_padded", dtype=dtype)])[0]
            graph.layer(op="Slice", name=f"{tag}_unpad",
                        inputs=[rows, _const(f"{tag}_start", np.array([0], np.int64)), _const(f"{tag}_end", np.array([k], np.int64)),
                                _const(f"{tag}_axes", np.array([-1], np.int64))], outputs=[out])
