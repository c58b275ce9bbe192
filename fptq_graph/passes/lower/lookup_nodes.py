"""The node patterns an embedding lookup over quantized rows is written with, shared by the tied lookups
(emit_ort.tie_to_nbits_codes over the int8 head's MatMulNBits codes, emit_w4a8 over its W8A8MatMul
rows) and the untied tables (emit_embeddings): each Gather of the float table gives way to nodes that
read codes and scales by the same ids, and the rows come out in the Gather's output.

GatherBlockQuantized returns a lookup's rows as [.., blocks, b]; the rows the model reads are
[.., D], so they are reshaped to [.., blocks * b] (the ids' shape is only known at run time) and
sliced to D when D was padded up to whole blocks.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.passes.lower.qdq_nodes import const


def replace_gathers(gathers: list[gs.Node], prefix: str, build: Callable[[str, gs.Tensor, gs.Tensor], None]) -> None:
    """Each Gather gives way to what `build(tag, ids, out)` writes, tag named after the Gather (else
    `prefix`) with a .q suffix, numbered after the first."""
    for index, node in enumerate(gathers):
        tag = f"{node.name or prefix}.q{index or ''}"
        ids, out = node.inputs[1], node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        build(tag, ids, out)


def row_shape(graph: gs.Graph, tag: str, ids: gs.Tensor, tail: list[int], tail_name: str = "tail") -> gs.Variable:
    """ids.shape + tail, computed at run time (the ids' shape is dynamic)."""
    shape = graph.layer(op="Shape", name=f"{tag}_ids_shape", inputs=[ids], outputs=[gs.Variable(f"{tag}_ids_shape", dtype=np.int64)])[0]
    return graph.layer(op="Concat", name=f"{tag}_shape", attrs={"axis": 0},
                       inputs=[shape, const(f"{tag}_{tail_name}", np.array(tail, np.int64))],
                       outputs=[gs.Variable(f"{tag}_shape", dtype=np.int64)])[0]


def unpad_rows(graph: gs.Graph, tag: str, rows: gs.Tensor, width: int, padded: int, shape: gs.Tensor, out: gs.Tensor) -> None:
    """Reshape the blocks into rows of `padded` values into `out`, slicing them to `width` when padding
    was added (the padded rows keep the blocks' type)."""
    if padded == width:
        graph.layer(op="Reshape", name=f"{tag}_reshape", inputs=[rows, shape], outputs=[out])
        return
    rows = graph.layer(op="Reshape", name=f"{tag}_reshape", inputs=[rows, shape],
                       outputs=[gs.Variable(f"{tag}_padded", dtype=rows.dtype)])[0]
    graph.layer(op="Slice", name=f"{tag}_unpad",
                inputs=[rows, const(f"{tag}_start", np.array([0], np.int64)), const(f"{tag}_end", np.array([width], np.int64)),
                        const(f"{tag}_axes", np.array([-1], np.int64))], outputs=[out])


def gather_block_quantized(graph: gs.Graph, tag: str, data: gs.Constant, ids: gs.Tensor, scales: gs.Tensor,
                           bits: int, width: int, out: gs.Tensor, tail_name: str = "tail") -> None:
    """com.microsoft.GatherBlockQuantized of the rows `ids` names from data [V, blocks, b] (gather_axis
    0, quantize_axis 2, no zero points) and scales [V, blocks, 1], written to `out` as rows of `width`
    in the scales' type."""
    _, blocks, stored = data.values.shape
    block = stored * 2 if bits == 4 else stored          # bits 4: two codes a byte
    rows = graph.layer(op="GatherBlockQuantized", name=f"{tag}_gbq", domain="com.microsoft",
                       attrs={"gather_axis": 0, "quantize_axis": 2, "block_size": block, "bits": bits},
                       inputs=[data, ids, scales], outputs=[gs.Variable(f"{tag}_blocks", dtype=scales.dtype)])[0]
    unpad_rows(graph, tag, rows, width, blocks * block, row_shape(graph, tag, ids, [blocks * block], tail_name), out)


def int8_rows(graph: gs.Graph, tag: str, codes: gs.Constant, scale: gs.Constant, ids: gs.Tensor, out: gs.Tensor,
              dtype: np.dtype) -> None:
    """Gather(codes int8 [V, D], ids) -> Cast -> Mul(the rows' scales), into `out` in `dtype`: only the rows
    read are dequantized. scale [V] is gathered and made a column; scale [V, 1] (W8A8MatMul's per-channel
    scales) gathers as a column already; a scale of another type than `dtype` is cast to it."""
    dtype = np.dtype(dtype)
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)

    def node(op, suffix, inputs, kind=dtype, **attrs):
        return graph.layer(op=op, name=f"{tag}_{suffix}", attrs=attrs, inputs=inputs,
                           outputs=[gs.Variable(f"{tag}_{suffix}", dtype=kind)])[0]

    rows = node("Gather", "codes", [codes, ids], np.int8, axis=0)
    rows = node("Cast", "codes_float", [rows], to=to)
    scale_dtype = np.dtype(scale.values.dtype)
    row_scale = node("Gather", "row_scale", [scale, ids], scale_dtype, axis=0)
    if scale_dtype != dtype:
        row_scale = node("Cast", "row_scale_cast", [row_scale], to=to)
    if scale.values.ndim == 1:
        row_scale = node("Unsqueeze", "row_scale_column", [row_scale, const(f"{tag}_last_axis", np.array([-1], np.int64))])
    graph.layer(op="Mul", name=f"{tag}_dequant", inputs=[rows, row_scale], outputs=[out])
