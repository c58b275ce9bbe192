"""The one lookup of a linear's bias (a Gemm's input C; MatMul has none)."""
from __future__ import annotations

import onnx_graphsurgeon as gs


def gemm_bias(node: gs.Node) -> gs.Tensor | None:
    """The bias tensor a Gemm adds (input 2, when present and not an omitted optional input), else None."""
    return node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
