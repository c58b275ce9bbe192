"""The float model and the lowered one, run block after block on the same calibration samples: what the
measurement passes (check_outputs_finite, measure_output_sqnr) compare, whatever the run's scopes.

Each chain is fed its own hand-over: the float blocks the float stream, the quantized blocks the
quantized stream, so a linear's error is end to end (it carries the error of every block before). A run
that does not go block by block is one block, the whole graph, and then this is the two whole models
side by side. A block's model holds the nodes its fetched tensors need back to its inputs: in the float
model the block's own nodes, in the lowered graph the same with the nodes lowering added (quantize and
dequantize, the W4A8 op). Its exits are what later blocks read and the model's own outputs made in it.

Resident: two block sessions (the float block's weights mapped from the input, the quantized block's
codes) and, per sample, both streams' cut tensors.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import numpy as np

from fptq_graph.ir.bodies import needed_nodes, node_reads, proto_bodies
from fptq_graph.ir.residency import release_pages
from fptq_graph.ir.save import finish_split
from fptq_graph.ir.split_model import SplitModel
from fptq_graph.runtime import ort_errors
from fptq_graph.runtime.sessions import session
from fptq_graph.sequential.block_model import block_model
from fptq_graph.sequential.blocks import Block
from fptq_graph.sequential.scope import graph_block

MIN_CHUNK, MAX_CHUNK = 32 * 2**20, 256 * 2**20   # bytes of linear outputs fetched per run (see measure_output_sqnr)
KINDS = ("float", "quantized")


class BlockChain:
    """The first `count` calibration samples through the float and the lowered model, block by block
    (state.blocks; without them, the whole graph)."""

    def __init__(self, state, count: int):
        self.state = state
        self.source = state.source_model
        self.lowered = finish_split(state.graph, self.source.proto)
        self.blocks = list(state.blocks) or [graph_block(state)]
        self.samples = list(state.calibration.sample_feeds(self.source.proto.graph.input, count))
        self.streams = {kind: [{} for _ in self.samples] for kind in KINDS}
        # A chunk is about an eighth of the float weights, between 32 and 256 MiB (measure_output_sqnr).
        self.budget = min(MAX_CHUNK, max(MIN_CHUNK, self.source.payload_bytes // 8))

    def __iter__(self) -> Iterator["BlockPair"]:
        last_reader = {name: block.index for block in self.blocks for name in block.inputs}
        for block in self.blocks:
            pair = BlockPair(self, block)
            try:
                if pair.models:   # a block with no linear and nothing to hand on has nothing to show
                    yield pair
            finally:
                pair.close()
            for cuts in self.streams.values():
                for cut in cuts:
                    for name in [n for n in cut if last_reader.get(n, -1) <= block.index]:
                        del cut[name]

    def tokens(self, index: int) -> int:
        return int(np.prod(next(iter(self.samples[index].values())).shape))

    def chunks(self, linears: list, index: int) -> list[list[str]]:
        return output_chunks(linears, 4 * self.tokens(index), self.budget)


class BlockPair:
    """One block of both models, as two sessions; run() feeds each its sample and its own stream."""

    def __init__(self, chain: BlockChain, block: Block):
        self.chain, self.block = chain, block
        self.linears = [chain.state.linears[name] for name in block.linears]
        model_inputs = {v.name for v in chain.source.proto.graph.input}
        available = model_inputs | set(block.inputs)
        # the model's outputs whose nodes reach back only to what the block is fed (block by block, an
        # output that needs another block's tensors is that block's business)
        graph = chain.source.proto.graph
        own = [o for o in block.model_outputs
               if set(_free_reads(graph, needed_nodes(graph.node, [o], stop=block.inputs))) <= available]
        self.exits = _unique(list(block.hand_over) + own)
        wanted = _unique([linear.output for linear in self.linears] + self.exits)
        self.models = {kind: _model(model, block, wanted, chain.streams[kind][0] if chain.samples else {})
                       for kind, model in zip(KINDS, (chain.source, chain.lowered))} if wanted else {}
        # no arenas: the two sessions take turns, and neither keeps its peak reserved while the other runs
        self.sessions = {kind: session(model, arena=False) for kind, model in self.models.items()}

    def run(self, index: int, names: list[str]) -> dict[str, list[np.ndarray]]:
        """`names` of both blocks on sample `index`; what of them later blocks read joins each stream."""
        feeds = self.chain.samples[index]
        handed = set(self.block.hand_over)
        got = {}
        for kind, sess in self.sessions.items():
            cut = self.chain.streams[kind][index]
            inputs = self.models[kind].proto.graph.input
            feed = {v.name: feeds[v.name] if v.name in feeds else cut[v.name] for v in inputs}
            got[kind] = ort_errors.run(sess, names, feed, f"sample {index}, the {kind} block {self.block.index} "
                                                          f"({self.block.label})")
            for name, value in zip(names, got[kind]):
                if name in handed:
                    cut[name] = np.array(value)
        return got

    def close(self) -> None:
        self.sessions.clear()
        for model in self.models.values():
            release_pages(model.arrays.values())


def _model(model: SplitModel, block: Block, wanted: list[str], cut: dict) -> SplitModel:
    """The block of `model` that computes `wanted`, fed its free reads; the model's own outputs that
    its nodes make stay outputs (a GenAI builder's CUDA graph plans a present KV that is no graph output
    into the past input's buffer, which fails at run time with a past of another length)."""
    graph = model.proto.graph
    nodes = needed_nodes(graph.node, wanted, stop=block.inputs)
    made = {out for i in nodes for out in graph.node[i].output}
    outputs = wanted + [o.name for o in graph.output if o.name in made and o.name not in wanted]
    sub = replace(block, nodes=nodes, inputs=_free_reads(graph, nodes), outputs=outputs)
    return block_model(model, sub, {name: value.dtype for name, value in cut.items()})


def _free_reads(graph, nodes: list[int]) -> list[str]:
    """What `nodes` read that none of them (nor their bodies) makes, constants aside: the inputs they need."""
    made = {out for i in nodes for out in graph.node[i].output}
    made |= {name for i in nodes for name in _body_names(graph.node[i])}
    constants = {init.name for init in graph.initializer}
    return _unique([name for i in nodes for name in node_reads(graph.node[i]) if name not in made and name not in constants])


def _body_names(node) -> set[str]:
    """What a node's control-flow bodies make or hold themselves (outputs, initializers, inputs), at any depth."""
    names = set()
    for body in proto_bodies(node):
        names |= {init.name for init in body.initializer} | {v.name for v in body.input}
        for inner in body.node:
            names.update(inner.output)
            names |= _body_names(inner)
    return names


def output_chunks(linears: list, bytes_per_channel: int, budget: int) -> list[list[str]]:
    """Outputs fetched together, packed by their own sizes up to `budget` bytes (at least one each): a
    wide LM head ([tokens, vocab]) gets a run to itself instead of shrinking every run to its size,
    which made one run per few linears, dozens of forward passes a sample."""
    chunks, current, used = [], [], 0
    for linear in linears:
        size = bytes_per_channel * linear.n
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(linear.output)
        used += size
    return chunks + ([current] if current else [])


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
