"""Whole graph or block by block: decided from what the whole-graph run would hold, and said out loud.

The whole-graph run holds the float weights (mapped, but every page read by then), the folded copies
of the equalized weights, the codes, calibration's activations and X^T X of every linear input at once:
1.6-1.8x the float weights plus X^T X (docs/scale.json, LLaMA shapes 0.1B-1.5B). Block by block holds
one block of each. The run goes block by block when
- asked (Config.sequential = True, --sequential), or
- the recipe's X^T X would exceed the statistics budget (Config.statistics_budget_mib unset: the float
  weights' size, at least 1 GiB), where the whole-graph run would trade AWQ and GPTQ for the clipping
  search (from about 0.5B parameters on), or
- the estimate exceeds the memory budget (Config.memory_budget_mib, else 60% of the memory available now).
Config.sequential = False (--no-sequential) keeps the whole-graph run whatever it costs (and its trade).
"""
from __future__ import annotations

from dataclasses import dataclass

from fptq_graph.ir.residency import memory_budget
from fptq_graph.recipes import observers_needed, run_row

MIB = 2**20
WHOLE_GRAPH_FACTOR = 1.8   # the whole-graph quantize peak over the float weights, without X^T X (docs/scale.json)


@dataclass(frozen=True)
class RunMode:
    sequential: bool
    why: str
    estimate_bytes: int
    budget_bytes: int | None

    def to_dict(self) -> dict:
        return {"mode": "block by block" if self.sequential else "whole graph", "why": self.why,
                "whole_graph_estimate_mib": round(self.estimate_bytes / MIB), "memory_budget_mib":
                None if self.budget_bytes is None else round(self.budget_bytes / MIB)}


def gram_bytes(state) -> int:
    """X^T X of every distinct linear input, float64, if the recipe records it."""
    if "gram" not in observers_needed(run_row(state.config)):
        return 0
    inputs = {linear.activation.name: linear.k for linear in state.linears.values()}
    return sum(8 * k * k for k in inputs.values())


def choose_mode(state) -> RunMode:
    cfg = state.config
    weights = state.source_model.payload_bytes
    gram = gram_bytes(state)
    estimate = int(WHOLE_GRAPH_FACTOR * weights + gram)
    budget = cfg.memory_budget_mib * MIB if cfg.memory_budget_mib is not None else memory_budget(0.6)
    linear_bytes = sum(4 * l.k * l.n for l in state.linears.values())
    statistics_budget = max(linear_bytes, 1024 * MIB)
    need = f"about {estimate / MIB:.0f} MiB (weights {weights / MIB:.0f} MiB, X^T X {gram / MIB:.0f} MiB)"
    of_budget = f"the memory budget {budget / MIB:.0f} MiB" if budget else "no known memory budget"
    if cfg.sequential is True:
        return RunMode(True, f"asked for (--sequential); the whole graph would take {need}", estimate, budget)
    if cfg.sequential is False:
        return RunMode(False, f"asked for (--no-sequential); it takes {need}, {of_budget}", estimate, budget)
    if cfg.statistics_budget_mib is None and gram > statistics_budget:
        return RunMode(True, f"X^T X of every linear input ({gram / MIB:.0f} MiB) is over what the whole-graph run "
                             f"holds ({statistics_budget / MIB:.0f} MiB, the float weights): block by block keeps "
                             "AWQ and GPTQ with one block's X^T X at a time", estimate, budget)
    if budget is not None and estimate > budget:
        return RunMode(True, f"the whole graph would take {need}, over {of_budget}", estimate, budget)
    return RunMode(False, f"the whole graph fits: {need}, within {of_budget}", estimate, budget)
