"""The one walker of control-flow bodies (If/Loop/Scan subgraphs), for both graph forms we hold:
onnx-graphsurgeon graphs (the passes) and ONNX protos (loading, saving, sessions)."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import onnx
import onnx_graphsurgeon as gs


def proto_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs among a NodeProto's attributes (If's branches, Loop's and Scan's body)."""
    return [b for attr in node.attribute for b in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def gs_bodies(node: gs.Node) -> list[gs.Graph]:
    return [b for attr in node.attrs.values() for b in (attr if isinstance(attr, list) else [attr])
            if isinstance(b, gs.Graph)]


def proto_nodes(nodes) -> Iterator[onnx.NodeProto]:
    """Every NodeProto in `nodes` and, depth first after each, those of its bodies at any depth."""
    for node in nodes:
        yield node
        for body in proto_bodies(node):
            yield from proto_nodes(body.node)


def gs_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every body in it, at any depth."""
    yield graph
    for node in graph.nodes:
        for body in gs_bodies(node):
            yield from gs_graphs(body)


def gs_body_nodes(graph: gs.Graph, owner: str = "") -> Iterator[tuple[gs.Node, str]]:
    """(node, the control-flow node owning its body: "If 'name'", "" at the top) for every node at any depth."""
    for node in graph.nodes:
        yield node, owner
        for body in gs_bodies(node):
            yield from gs_body_nodes(body, f"{node.op} '{node.name or node.op}'")


def body_reads(node: onnx.NodeProto) -> set[str]:
    """Names the bodies of `node` read, at any depth: outer-scope references included."""
    return {name for body in proto_bodies(node) for inner in proto_nodes(body.node) for name in inner.input}


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads, its control-flow bodies' outer-scope reads included."""
    return [name for name in node.input if name] + sorted(body_reads(node))


def needed_nodes(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str], among: Iterable[int] | None = None,
                 stop: Iterable[str] = ()) -> list[int]:
    """Indices (ascending) of the nodes that `outputs` depend on: the one walk back through every tensor a
    node reads (node_reads), over `nodes` in topological order (as ONNX lists them). among: only these
    indices are candidates (a block's own nodes); stop: tensors the walk does not pass (a block's inputs)."""
    candidates = sorted(among) if among is not None else range(len(nodes))
    stop = set(stop)
    wanted, keep = set(outputs), []
    for i in reversed(candidates):
        if any(name in wanted for name in nodes[i].output):
            keep.append(i)
            wanted.update(name for name in node_reads(nodes[i]) if name not in stop)
    return sorted(keep)
