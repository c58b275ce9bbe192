"""The LM head and its tied embedding lookups, as graph patterns.

The LM head is the linear producing the model output `logits`, directly or through reshapes/casts
(what our exporter, Hugging Face and the GenAI builder name it). Its table is tied when an embedding
Gather reads an [N, K] table equal to the head's float [K, N] weight transposed.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

LOGITS = "logits"


def feeds_output(node: gs.Node, outputs: set[str]) -> str:
    """The model output `node` produces, directly or through reshapes/casts; "" when it does not."""
    tensor = node.outputs[0]
    while tensor.name not in outputs:
        consumers = list(tensor.outputs)
        if len(consumers) != 1 or consumers[0].op not in ("Reshape", "Cast", "Identity"):
            return ""
        tensor = consumers[0].outputs[0]
    return tensor.name


def find_lm_head(graph: gs.Graph, linears) -> object | None:
    """The quantizable linear (of `linears`, passes.state.Linear) producing the model output `logits`."""
    outputs = {t.name for t in graph.outputs} & {LOGITS}
    return next((l for l in linears if feeds_output(l.node, outputs)), None)


def tied_gathers(graph: gs.Graph, weight_source: gs.Tensor) -> list[gs.Node]:
    """Gathers along axis 0 of an [N, K] table equal to the linear's float [K, N] weight transposed: a
    constant table (a Transpose-tied head, or an exporter that wrote the tied table twice), or a 2-D
    Transpose of a constant [K, N] equal to the weight (the GenAI builder looks its embeddings up in
    Transpose(lm_head weight)). `weight_source` is the head's weight input."""
    if not isinstance(weight_source, gs.Constant):
        return []
    weight = np.asarray(weight_source.values)
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


def source_dtype(table: gs.Tensor):
    """A tied table's float type: the constant's, or for Transpose(constant) the constant's."""
    while not isinstance(table, gs.Constant):
        table = table.inputs[0].inputs[0]
    return table.values.dtype
