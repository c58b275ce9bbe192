"""Node order for calibration's observed model, so observers run early and activations die young.

ONNX Runtime's priority-based execution order (runtime.session(early_reductions=True)) breaks ties
between ready nodes by their index in the model, so the node list we write steers it. `demand_order`
lists nodes the way memory wants: walk the graph's outputs in the order given (model order: the first
layer's observers first) and emit each one's not yet emitted ancestors depth first, so an observer
comes right after the activation it reads. Calibrating a 0.5B LLaMA on batches of 8 x 256 tokens
peaked at 3.3 GB with graphsurgeon's order and 2.3 GB with this one.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs


def demand_order(graph: gs.Graph) -> gs.Graph:
    """Reorders graph.nodes by demand from graph.outputs, in their order; nodes no output needs are
    dropped (what cleanup() would remove)."""
    order: list[gs.Node] = []
    done: set[int] = set()
    for output in graph.outputs:
        if not output.inputs:
            continue
        stack = [(output.inputs[0], False)]
        while stack:                              # iterative post-order DFS: models are deeper than Python's recursion
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            for tensor in reversed(node.inputs):  # reversed: the first input's ancestors come first
                if tensor.inputs and id(tensor.inputs[0]) not in done:
                    stack.append((tensor.inputs[0], False))
    graph.nodes = order
    return graph
