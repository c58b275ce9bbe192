"""A scope: the part of the model the scope passes (calibrate ... quantize weights) run over, and how.

A run cuts the model into blocks on its residual stream (blocks.py) or takes the whole graph as one
block; each block is a scope. The passes read the scope from state.scope: calibrate runs the block's
model through the scope's runner (this process, or Ray workers) on the batches the scope gives it (the
model's inputs and the cut tensors the blocks before it handed over), and the planning and rewriting
passes see a state that holds only the block's linears and statistics. A pipeline run with no scope
(api.calibrate, a test running the default pipeline by hand) is the whole graph's scope.

Resident: the block's structure; the cut store and runner belong to the driver (run.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from fptq_graph.sequential.blocks import Block, whole_graph_block
from fptq_graph.sequential.cut_store import CutStore
from fptq_graph.sequential.runners import LocalRunner


@dataclass
class Scope:
    block: Block
    blocks: int = 1                  # how many scopes the run has (1: the whole graph)
    runner: Any = field(default_factory=LocalRunner)
    store: CutStore | None = None    # the cut tensors the blocks before this one handed over
    keep_hand_over: bool = False     # calibration stores what this block hands over (float block inputs)
    key: str = "run"                 # names this run's block models to the runner (Ray workers cache sessions by it)
    carried: dict = field(default_factory=dict)    # statistics observed in earlier blocks that this block's linears read
    observed: dict = field(default_factory=dict)   # written by calibrate: every statistic this block observed
    gram_bytes: int = 0                            # written by calibrate: X^T X held for this block's linears

    @property
    def label(self) -> str:
        return f"block {self.block.index} ({self.block.label})"

    def input_dtypes(self) -> dict:
        return self.store.dtypes() if self.store is not None else {}

    def batches(self, calibration, graph_inputs) -> Iterator[tuple[int, dict]]:
        """(index, feeds) of every calibration batch: the model inputs the block reads and the cut tensors
        the blocks before it handed over."""
        model_inputs = {v.name for v in graph_inputs}
        cut = [name for name in self.block.inputs if name not in model_inputs]
        for index, feeds in enumerate(calibration.feed_batches(graph_inputs)):
            handed = self.store.feeds(index, cut) if self.store is not None else {}
            yield index, {n: feeds[n] for n in self.block.inputs if n in feeds} | handed


def graph_block(state) -> Block:
    """The whole observed graph as one block (the scope of a run that does not go block by block)."""
    return whole_graph_block(state.observed_model.proto, list(state.linears), list(state.observers),
                             [t.name for t in state.graph.outputs])


def scope_of(state) -> Scope:
    """The scope the state's passes run over: the driver's, else the whole graph."""
    return state.scope if state.scope is not None else Scope(graph_block(state))
