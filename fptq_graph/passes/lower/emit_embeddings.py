"""Emit the untied embedding tables quantized (Config.embedding: int8 per row, or INT4 groups along the
row), in the form's own way. Runs after the form's emitter, so tied lookups already read the int8
head's codes and what is left reading a float table is untied (patterns/embedding.py says which
tables qualify and why others stay float).

- ort:       com.microsoft.GatherBlockQuantized over uint8 data [V, blocks, b] (gather_axis 0,
             quantize_axis 2, block b; MatMulNBits' conventions: bits 8 codes + 128, bits 4 codes + 8
             two a byte, low nibble first, no zero-point input), scales [V, blocks, 1] in the table's
             type; the rows come out [.., blocks, b] and are reshaped (and sliced, when D was padded to
             whole blocks). int8 takes b the largest of 256..16 dividing D, each block repeating the
             row's scale, as the int8 head does.
- qdq, w4a8: ONNX Gather takes no 4-bit or blocked table, so the lookup gathers the codes, then
             dequantizes only the rows it read: int8 codes [V, D] -> Gather -> Cast -> Mul(Gather(scales
             [V], ids)); INT4 as uint8 [V, blocks * g / 2] (codes + 8, two a byte) -> Gather -> Cast ->
             the two nibbles split with Floor(x / 16) (exact in float16 and float32) -> interleaved ->
             minus 8 -> Mul(the row's group scales) -> the row's [D]. A table dequantized whole before
             the Gather would cost the float table's memory and time on every run.

Every path dequantizes q * s in the table's type, the products numpy computes (tests/passes/test_embeddings.py).
Resident: one table's int8 codes and its packed copy (at most 2 bytes a value), plus the quantizer's
slab (quant/embedding_table.py).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.lower.emit_ort import nbits_block
from fptq_graph.passes.lower.lookup_nodes import gather_block_quantized, int8_rows, replace_gathers, row_shape, unpad_rows
from fptq_graph.passes.lower.qdq_nodes import const
from fptq_graph.patterns.embedding import Lookup, untied_lookups
from fptq_graph.quant.embedding_table import quantize_table


class EmitEmbeddings(Pass):
    name = "emit_embeddings"
    kind = "lower"
    requires = frozenset({"lowered"})
    ensures = frozenset({"embeddings_lowered"})

    def run(self, state) -> PassResult:
        cfg, graph = state.config, state.graph
        mode = cfg.embedding_mode
        if mode == "float":
            return PassResult("embedding tables kept float (embedding='float')", stats={"tables": 0, "float_bytes": 0, "bytes": 0})
        bits = 8 if mode == "int8" else 4
        group = cfg.embedding_group if bits == 4 else None
        lookups, skipped = untied_lookups(graph, {linear.k for linear in state.linears.values()})
        rows = []
        for lookup in lookups:
            v, d = lookup.shape
            dtype = np.dtype(lookup.table.values.dtype)
            codes, scales, sqnr = quantize_table(lookup.rows, (v, d), bits, group)
            emit = blocked_lookups if cfg.format == "ort" else gathered_lookups
            nbytes = emit(graph, lookup, codes, scales.astype(dtype), bits, group)
            del codes, scales
            note = f"INT4 group {group}" if bits == 4 else "int8 per row"
            if bits == 4 and group > d:
                note += f" (group {group} > row width {d}: one group a row)"
            rows.append({"table": lookup.name, "shape": [v, d], "dtype": str(dtype), "mode": mode, "group": group,
                         "lookups": [g.name or g.op for g in lookup.gathers], "float_bytes": v * d * dtype.itemsize,
                         "bytes": nbytes, "sqnr_db": round(sqnr, 2) if np.isfinite(sqnr) else None,   # None: exact (or all zero)
                         "note": note})
        rows += [{"table": name, "mode": "float", "note": why} for name, why in skipped]
        state.embeddings = rows
        graph.cleanup().toposort()
        done = [r for r in rows if r["mode"] != "float"]
        float_bytes, nbytes = sum(r["float_bytes"] for r in done), sum(r["bytes"] for r in done)
        if not done:
            summary = "no untied embedding table" + (f" to quantize ({len(skipped)} kept float)" if skipped else "")
        else:
            summary = f"{len(done)} embedding table(s) {mode}: {float_bytes / 2**20:.2f} -> {nbytes / 2**20:.2f} MiB"
            measured = [r["sqnr_db"] for r in done if r["sqnr_db"] is not None]
            summary += f" (lowest SQNR {min(measured):.1f} dB)" if measured else " (exact)"
            summary += f"; {len(skipped)} kept float" if skipped else ""
        return PassResult(summary, modified=bool(done), stats={"tables": len(done), "float_bytes": float_bytes, "bytes": nbytes})


def _nibbles(codes: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """INT4 codes [V, D] -> uint8 [V, blocks, block / 2] (codes + 8, two a byte, low nibble first; the
    last block padded with code 0, stored 8), and the padded width."""
    v, d = codes.shape
    blocks = -(-d // block)
    unsigned = np.full((v, blocks * block), 8, np.uint8)
    unsigned[:, :d] = (codes.astype(np.int16) + 8).astype(np.uint8)
    pairs = unsigned.reshape(v, blocks, block // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8), blocks * block


def blocked_lookups(graph: gs.Graph, lookup: Lookup, codes: np.ndarray, scales: np.ndarray, bits: int,
                    group: int | None) -> int:
    """The ort form: GatherBlockQuantized over the table's codes (module docstring). Returns the bytes."""
    v, d = codes.shape
    if bits == 8:
        block = nbits_block(d)
        blocks = -(-d // block)
        data = np.full((v, blocks * block), 128, np.uint8)   # padding decodes to 0
        data[:, :d] = (codes.astype(np.int16) + 128).astype(np.uint8)
        data = data.reshape(v, blocks, block)
        scales = np.repeat(scales, blocks, axis=1)
    else:
        data, _ = _nibbles(codes, group)
        blocks = data.shape[1]
    data_c = gs.Constant(f"{lookup.name}.codes_u{bits}", data)
    scale_c = gs.Constant(f"{lookup.name}.scale", np.ascontiguousarray(scales.reshape(v, blocks, 1)))

    replace_gathers(lookup.gathers, f"{lookup.name}.lookup",
                    lambda tag, ids, out: gather_block_quantized(graph, tag, data_c, ids, scale_c, bits, d, out))
    return data.nbytes + scales.nbytes


def gathered_lookups(graph: gs.Graph, lookup: Lookup, codes: np.ndarray, scales: np.ndarray, bits: int,
                     group: int | None) -> int:
    """The qdq and w4a8 forms: standard ops gather the codes and dequantize the rows read (module
    docstring). Returns the bytes."""
    v, d = codes.shape
    dtype = scales.dtype
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    if bits == 8:
        data_c = gs.Constant(f"{lookup.name}.codes_int8", codes)
        scale_c = gs.Constant(f"{lookup.name}.scale", np.ascontiguousarray(scales.reshape(v)))
        nbytes = codes.nbytes + scales.nbytes
    else:
        packed, padded = _nibbles(codes, group)
        blocks = packed.shape[1]
        data_c = gs.Constant(f"{lookup.name}.codes_u4x2", np.ascontiguousarray(packed.reshape(v, -1)))
        scale_c = gs.Constant(f"{lookup.name}.scale", np.ascontiguousarray(scales))
        nbytes = packed.nbytes + scales.nbytes

    def build(tag, ids, out):
        def var(suffix, kind=dtype):
            return gs.Variable(f"{tag}_{suffix}", dtype=kind)

        def node(op, suffix, inputs, kind=dtype, **attrs):
            return graph.layer(op=op, name=f"{tag}_{suffix}", attrs=attrs, inputs=inputs, outputs=[var(suffix, kind)])[0]

        def scalar(suffix, value):
            return const(f"{tag}_{suffix}", np.array(value, dtype=dtype))

        if bits == 8:
            int8_rows(graph, tag, data_c, scale_c, ids, out, dtype)
            return
        last = const(f"{tag}_last_axis", np.array([-1], np.int64))
        packed_rows = node("Gather", "codes", [data_c, ids], np.uint8, axis=0)
        packed_rows = node("Cast", "codes_float", [packed_rows], to=to)
        high = node("Floor", "high", [node("Mul", "sixteenths", [packed_rows, scalar("one_16th", 1.0 / 16)])])
        low = node("Sub", "low", [packed_rows, node("Mul", "high_x16", [high, scalar("sixteen", 16.0)])])
        pairs = node("Concat", "pairs", [node("Unsqueeze", "low_pair", [low, last]), node("Unsqueeze", "high_pair", [high, last])], axis=-1)
        grouped = node("Reshape", "grouped", [pairs, row_shape(graph, f"{tag}_g", ids, [blocks, group])])
        signed = node("Sub", "signed", [grouped, scalar("eight", 8.0)])
        scale = node("Gather", "group_scale", [scale_c, ids], axis=0)
        scale = node("Unsqueeze", "group_scale_column", [scale, last])
        rows = node("Mul", "dequant", [signed, scale])
        unpad_rows(graph, tag, rows, d, padded, row_shape(graph, tag, ids, [padded]), out)

    replace_gathers(lookup.gathers, f"{lookup.name}.lookup", build)
    return nbytes
