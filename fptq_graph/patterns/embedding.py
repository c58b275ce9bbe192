"""Embedding lookups that read a table of their own (untied), as graph patterns.

An embedding lookup is Gather(table, ids) along axis 0 of a constant 2-D float table [V, D] with
integer ids computed at run time: word, position and token-type tables (BERT/MiniLM), the untied
`embed_tokens` of most decoders larger than ~1B. A table may also be read as Transpose(constant
[D, V]) (a head weight looked up transposed, as the GenAI builder writes a tied table). A table is
only quantized when lookups are all that read it: a float LM head (or any other node) reading the
same constant keeps it float, as a second, quantized copy would grow the file instead of shrinking
it. A table whose rows are narrower or wider than any linear's input (a rotary cos/sin cache gathered
by position, T5's relative-attention bias) is not a token embedding and stays float. Tied tables of an int8 head are not found here: by the time this runs the head's emitter has
pointed those lookups at the head's own codes (patterns/lm_head.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

FLOAT_TABLES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class Lookup:
    """One quantizable table and the Gathers that read it."""

    table: gs.Constant                 # the constant holding the values
    transposed: bool                   # the lookups read Transpose(table): rows are the constant's columns
    gathers: list[gs.Node] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        """[V, D]: rows looked up, width of a row."""
        rows, width = self.table.shape
        return (width, rows) if self.transposed else (rows, width)

    @property
    def name(self) -> str:
        return self.table.name

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of the [V, D] table (a view of the constant's values where it can be)."""
        values = self.table.values
        return values[:, start:stop].T if self.transposed else values[start:stop]


def _is_lookup(node: gs.Node) -> bool:
    if node.op != "Gather" or len(node.inputs) < 2 or int(node.attrs.get("axis", 0)) not in (0, -2):
        return False
    ids = node.inputs[1]
    return not isinstance(ids, gs.Constant) and (ids.dtype is None or np.dtype(ids.dtype).kind in "iu")


def _table_of(node: gs.Node) -> tuple[gs.Constant, bool] | None:
    """The constant a lookup reads and whether through Transpose(perm [1, 0]); None for anything else."""
    data = node.inputs[0]
    if isinstance(data, gs.Constant):
        return data, False
    if len(data.inputs) == 1 and data.inputs[0].op == "Transpose" \
            and list(data.inputs[0].attrs.get("perm", [1, 0])) == [1, 0] and isinstance(data.inputs[0].inputs[0], gs.Constant):
        return data.inputs[0].inputs[0], True
    return None


def _other_readers(table: gs.Constant) -> list[str]:
    """The nodes reading the table (directly or through Transposes) that are not lookups."""
    others, readers = [], list(table.outputs)
    while readers:
        node = readers.pop()
        if node.op == "Transpose":
            readers.extend(node.outputs[0].outputs)
        elif not _is_lookup(node) or node.inputs[0] is not table and node.inputs[0].inputs[0].op != "Transpose":
            others.append(node.name or node.op)
    return sorted(set(others))


def untied_lookups(graph: gs.Graph, widths: set[int]) -> tuple[list[Lookup], list[tuple[str, str]]]:
    """The quantizable tables in graph order, and (table, why) for lookup tables left float. `widths` are
    the linears' input widths K: a token embedding's rows are hidden states, as wide as what the first
    linears read; a rotary cos/sin cache or an attention-bias table looked up by position is not, and
    stays float (int8 angles would bend every attention score)."""
    found: dict[str, Lookup] = {}
    skipped: dict[str, str] = {}
    for node in graph.nodes:
        if not _is_lookup(node):
            continue
        got = _table_of(node)
        if got is None:
            continue
        table, transposed = got
        if table.name in skipped:
            continue
        if table.name in found:
            if found[table.name].transposed != transposed:
                del found[table.name]
                skipped[table.name] = "looked up both as stored and transposed"
            else:
                found[table.name].gathers.append(node)
            continue
        values = table.values
        if len(table.shape or ()) != 2 or np.dtype(values.dtype) not in FLOAT_TABLES:
            if len(table.shape or ()) == 2:
                skipped[table.name] = f"{np.dtype(values.dtype)} table (float32 and float16 tables are quantized)"
            continue
        width = table.shape[0] if transposed else table.shape[1]
        if width not in widths:
            skipped[table.name] = f"rows of {width} values, a width no linear reads: not a token embedding"
            continue
        others = _other_readers(table)
        if others:
            skipped[table.name] = f"also read by {', '.join(others)}: a quantized copy beside it would grow the file"
            continue
        found[table.name] = Lookup(table, transposed, [node])
    return list(found.values()), list(skipped.items())
