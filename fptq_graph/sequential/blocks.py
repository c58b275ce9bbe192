"""Cut the observed model into blocks on its residual stream, found from the graph's structure alone.

A transformer's blocks talk to each other through one tensor, the residual stream (plus side tensors
computed from the inputs: the attention mask, rotary cos/sin, position ids). So we mark every tensor
that carries data of the stream, i.e. that depends on an embedding lookup (a Gather from a constant
table) or on a linear's output, not through Shape/Size (shape arithmetic carries no data), and, walking
the nodes in order, count how many marked tensors are alive (produced, still to be read) after each
node. Where exactly one is alive, everything after depends on everything before only through that
tensor and the side tensors: a clean cut. Between two consecutive linears we cut at the last clean
point, so the embedding block ends after the embedding (and its LayerNorm, for BERT), and a LLaMA
layer's attention and MLP halves end at their residual Adds.

The halves (segments) are then grouped into decoder blocks: the first segment without linears is the
embedding block, and the rest is grouped by the shortest period with which the shapes of its linears
repeat (LLaMA: attention [q, k, v, o] then MLP [gate, up, down], period 2); what does not repeat (the
final norm and LM head) is a block of its own.

Observer nodes (calibration's reductions) go to the block of the first linear that reads what they
observe, so each block computes the statistics of its own linears' inputs.

Resident: the structure only (names and positions), never a weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from fptq_graph.errors import FptqError
from fptq_graph.ir.bodies import node_reads

# Ops whose output depends on the shape of their input, not on its values.
SHAPE_OPS = {"Shape", "Size"}


class BlockCutError(FptqError):
    """The model has no residual structure to cut at (names the node where the search failed)."""


@dataclass
class Block:
    index: int
    nodes: list[int]                                  # indices into the observed graph's node list, in order
    linears: list[str]                                # the quantizable linears it holds, in graph order
    inputs: list[str] = field(default_factory=list)   # tensors it reads from the model's inputs or earlier blocks
    outputs: list[str] = field(default_factory=list)  # its observer outputs, then what later blocks read
    observers: list[str] = field(default_factory=list)  # the activations whose statistics it computes
    hand_over: list[str] = field(default_factory=list)  # the outputs later blocks read
    kind: str = "layer"                               # "embedding", "layer", "head", or "graph" (the whole graph)
    model_outputs: list[str] = field(default_factory=list)  # the model's own outputs made in this block

    @property
    def label(self) -> str:
        if not self.linears:
            return self.kind
        return f"{self.kind} {self.linears[0]}" + (f" .. {self.linears[-1]}" if len(self.linears) > 1 else "")


def find_blocks(model: onnx.ModelProto, observed_model: onnx.ModelProto, linear_names: list[str],
                observed: dict[str, str], readers: dict[str, list[str]]) -> list[Block]:
    """Blocks of the observed model, cut where the model `model` (the graph before observers, every
    linear in it) has clean cuts.

    linear_names: the quantizable linears (node names) in graph order; observed: observer output or
    intermediate tensor name -> the activation it observes (every tensor the observers made);
    readers: activation -> the linears that read it. Raises BlockCutError when no clean cut separates
    any two linears.
    """
    nodes = list(model.graph.node)
    constants = {init.name for init in model.graph.initializer}
    produced_at = {out: p for p, node in enumerate(nodes) for out in node.output if out}
    linears = set(linear_names)

    # The stream: tensors that depend on an embedding lookup or a linear's output (not through shapes).
    stream: set[str] = set()
    for node in nodes:
        if node.op_type in SHAPE_OPS:
            continue
        source = node.name in linears or (node.op_type == "Gather" and len(node.input) == 2
                                          and node.input[0] in constants and node.input[1] not in constants)
        if source or any(name in stream for name in node_reads(node)):
            stream.update(out for out in node.output if out)
    last_read: dict[str, int] = {}
    for p, node in enumerate(nodes):
        for name in node_reads(node):
            if name in produced_at:
                last_read[name] = max(last_read.get(name, -1), p)
    # alive[p]: stream tensors produced at or before node p and read after it
    delta = [0] * (len(nodes) + 1)
    for name in stream:
        if name in produced_at and last_read.get(name, -1) > produced_at[name]:
            delta[produced_at[name]] += 1
            delta[last_read[name]] -= 1
    alive, count = [], 0
    for p in range(len(nodes)):
        count += delta[p]
        alive.append(count)

    linear_at = [p for p, node in enumerate(nodes) if node.name in linears]
    if not linear_at:
        raise BlockCutError("no quantizable linear in the model")
    cuts = []
    for lo, hi in zip([-1] + linear_at[:-1], linear_at):
        clean = [p for p in range(max(lo, 0), hi) if alive[p] == 1]
        if clean:
            cuts.append(clean[-1])
    if not cuts and len(linear_at) > 1:
        second = nodes[linear_at[1]]
        raise BlockCutError(f"no residual stream to cut at: before every linear several tensors of the stream are "
                            f"alive (no clean cut before '{second.name}', nor after it)")

    # segments of node positions, split after each cut
    bounds = [-1] + cuts + [len(nodes) - 1]
    segments = [list(range(a + 1, b + 1)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    seg_linears = [[nodes[p].name for p in seg if nodes[p].name in linears] for seg in segments]
    shapes = _linear_shapes(model, linear_names)
    groups = _group_segments([tuple(shapes[n] for n in names) for names in seg_linears])

    blocks: list[Block] = []
    block_of_tensor: dict[str, int] = {}
    for group in groups:
        index = len(blocks)
        for s in group:
            for p in segments[s]:
                for out in nodes[p].output:
                    block_of_tensor[out] = index
        blocks.append(Block(index=index, nodes=[], linears=[n for s in group for n in seg_linears[s]]))
    if blocks and not blocks[0].linears:
        blocks[0].kind = "embedding"
    if len(groups) > 2 and len(groups[-1]) == 1 and blocks[-1].linears and \
            [shapes[n] for n in blocks[-1].linears] != [shapes[n] for n in blocks[-2].linears[:len(blocks[-1].linears)]]:
        blocks[-1].kind = "head"
    _place_nodes(blocks, list(observed_model.graph.node), block_of_tensor, observed, readers)
    _wire(blocks, list(observed_model.graph.node), observed_model)
    for block in blocks:   # by the structure: the observed model lacks the nodes no observer needs (a float head's logits)
        block.model_outputs = [o.name for o in model.graph.output if block_of_tensor.get(o.name) == block.index]
    return [b for b in blocks if b.nodes or b.linears]


def whole_graph_block(observed_model: onnx.ModelProto, linear_names: list[str], observers: list[str],
                      model_outputs: list[str]) -> Block:
    """The whole graph as one block (the one-block scope): every node of the observed model, every linear
    and observer, nothing handed over. What a run that does not go block by block runs its passes on."""
    nodes = list(observed_model.graph.node)
    block = Block(index=0, nodes=list(range(len(nodes))), linears=list(linear_names), observers=list(observers),
                  kind="graph")
    _wire([block], nodes, observed_model)
    block.model_outputs = list(model_outputs)
    return block


def _linear_shapes(model: onnx.ModelProto, linear_names: list[str]) -> dict[str, tuple]:
    dims = {init.name: tuple(init.dims) for init in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    return {name: dims.get(by_name[name].input[1], ()) if name in by_name else () for name in linear_names}


def _group_segments(signatures: list[tuple]) -> list[list[int]]:
    """Segment indices grouped into blocks: a leading segment without linears alone, then runs of the
    shortest period p (1..4) whose signatures repeat from there on, then what is left, one by one."""
    groups: list[list[int]] = []
    start = 0
    if signatures and not signatures[0]:
        groups.append([0])
        start = 1
    rest = signatures[start:]
    period = next((p for p in range(1, 5) if len(rest) >= 2 * p and rest[p:2 * p] == rest[:p]), 1)
    i = 0
    while i + period <= len(rest) and rest[i:i + period] == rest[:period]:
        groups.append(list(range(start + i, start + i + period)))
        i += period
    groups += [[start + j] for j in range(i, len(rest))]
    return groups


def _place_nodes(blocks: list[Block], nodes, block_of_tensor: dict[str, int], observed: dict[str, str],
                 readers: dict[str, list[str]]) -> None:
    """Each observed-model node into the block that makes its output; observer nodes into the block of
    the first linear reading what they observe."""
    block_of_linear = {name: b.index for b in blocks for name in b.linears}
    placed = {activation: min(block_of_linear[n] for n in names) for activation, names in readers.items()}
    for i, node in enumerate(nodes):
        if node.output and all(o in observed for o in node.output):
            index = placed[observed[node.output[0]]]
        else:
            index = block_of_tensor.get(node.output[0]) if node.output else None
            if index is None:
                raise BlockCutError(f"node '{node.name or node.op_type}' of the observed model is not in the model")
        blocks[index].nodes.append(i)
    for block in blocks:
        block.observers = [a for a, b in placed.items() if b == block.index]


def _wire(blocks: list[Block], nodes, model: onnx.ModelProto) -> None:
    """Each block's inputs (read, not made in the block) and outputs (observer outputs, then what a
    later block reads), in a stable order."""
    graph_outputs = [o.name for o in model.graph.output]
    constants = {init.name for init in model.graph.initializer}
    inputs = {value.name for value in model.graph.input}
    made_in = {}
    for block in blocks:
        for i in block.nodes:
            for out in nodes[i].output:
                if out:
                    made_in[out] = block.index
    read_by: dict[str, set[int]] = {}
    for block in blocks:
        seen: list[str] = []
        for i in block.nodes:
            for name in node_reads(nodes[i]):
                if name in constants or made_in.get(name) == block.index:
                    continue
                if name not in made_in and name not in inputs:
                    raise BlockCutError(f"node '{nodes[i].name or nodes[i].op_type}' reads '{name}', which nothing makes")
                if name not in seen:
                    seen.append(name)
                read_by.setdefault(name, set()).add(block.index)
        block.inputs = seen
    for block in blocks:
        mine = [o for o in graph_outputs if made_in.get(o) == block.index]
        later = [out for i in block.nodes for out in nodes[i].output
                 if out and out not in mine and max(read_by.get(out, {-1})) > block.index]
        block.outputs, block.hand_over = mine + later, later
