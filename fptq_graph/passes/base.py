"""The pass contract: what a pass returns, what it needs and guarantees, and a pipeline as a value.

Modelled on onnx-ir's passes (PassResult, requires/ensures, Sequential): a pass is a small object
with a `name`, a `kind` and `run(state) -> PassResult`. `requires` and `ensures` name facts about the
State (FACTS below); a Pipeline checks when it is built that every pass's requirements are ensured by
a pass before it (a wrong order fails at construction, naming the pass and the fact), and records each
pass's result and time as it runs. A prefix of a pipeline is a pipeline: `api.calibrate` runs
`calibration_pipeline()`, the first passes of the default one, not a search by name.

Kinds: "analysis" passes read the graph and write the plan (they may build side models, like the
observed one, but never rewrite state.graph); "rewrite" passes change the graph as the frozen plan
says; "lower" passes write one output form; "measure" passes compare the result with the float model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from fptq_graph.errors import FptqError

KINDS = ("analysis", "rewrite", "lower", "measure")

# The facts passes require and ensure, and what each means.
FACTS = {
    "rotated": "the residual stream rotated as the recipe says, or left as it was with the reason (rotate_residual)",
    "linears": "state.linears: every quantizable linear, its producer and siblings (find_linears)",
    "statistics_plan": "state.recipe: the row this run follows and which statistics calibration records",
    "canonical_weights": "each linear reads its own constant [K, N] weight (canonicalize_weights)",
    "observed_model": "state.observed_model: the graph with its observers (insert_observers)",
    "statistics": "state.stats: per-activation calibration statistics (calibrate)",
    "activation_specs": "each linear's activation scheme and why (classify)",
    "head_plan": "the LM head's plan: its mode, group and tied lookups (plan_lm_head)",
    "equalization_specs": "each sibling group's equalization scale, LAE/SmoothQuant/AWQ (plan_equalization)",
    "plan": "state.plan: the frozen plan, read-only from here on (freeze_plan)",
    "equalization_folded": "equalization scales folded into norms and weights (fold_equalization)",
    "quantized_weights": "state.quantized: each linear's quantized weight (quantize_weights)",
    "lowered": "the graph is in one output form (an emitter)",
    "embeddings_lowered": "untied embedding tables quantized as Config.embedding says (emit_embeddings)",
    "outputs_finite": "the quantized model computes no NaN/Inf where the float model does not (check_outputs_finite)",
    "output_sqnr": "state.measurements carry each linear's output SQNR (measure_output_sqnr)",
}


class PassContractError(FptqError):
    """A pipeline whose order breaks a pass's requirements (a programming error, said before any work)."""


@dataclass(frozen=True)
class PassResult:
    """What a pass did: a line for the log, whether it changed state.graph, and numbers for tests and the report."""

    summary: str
    modified: bool = False
    stats: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassRecord:
    """One run of one pass: its name, kind, result and seconds (the report's "passes" list)."""

    name: str
    kind: str
    result: PassResult
    seconds: float

    @property
    def summary(self) -> str:
        return self.result.summary

    @property
    def stats(self) -> Mapping[str, Any]:
        return self.result.stats


class Pass:
    """Base of every pass: set `name`, `kind`, `requires`, `ensures`; implement run(state) -> PassResult."""

    name: str = ""
    kind: str = "analysis"
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()
    # A rewrite whose effect lives only in the graph, not in what a finished block stores in the work
    # folder: a resumed block runs it again from its stored plan (it must be deterministic in the plan).
    replay_on_resume: bool = False

    def run(self, state) -> PassResult:   # pragma: no cover - the contract
        raise NotImplementedError


class Pipeline:
    """An ordered, checked sequence of passes (a value: concatenate with +, take a prefix with until())."""

    def __init__(self, passes: Iterable[Pass], given: Iterable[str] = ()):
        self.passes = tuple(passes)
        self.given = frozenset(given)
        have = set(self.given)
        for p in self.passes:
            if p.kind not in KINDS:
                raise PassContractError(f"pass '{p.name}' has kind {p.kind!r}; kinds are {', '.join(KINDS)}")
            for fact in sorted(set(p.requires) | set(p.ensures)):
                if fact not in FACTS:
                    raise PassContractError(f"pass '{p.name}' names an unknown fact {fact!r}")
            missing = sorted(set(p.requires) - have)
            if missing:
                raise PassContractError(f"pass '{p.name}' requires {', '.join(missing)}, which no pass before it ensures")
            have |= set(p.ensures)
        self.ensures = frozenset(have)

    def __add__(self, other: "Pipeline") -> "Pipeline":
        return Pipeline(self.passes + other.passes, self.given)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def until(self, fact: str) -> "Pipeline":
        """The shortest prefix that ensures `fact`."""
        have = set(self.given)
        for index, p in enumerate(self.passes):
            have |= set(p.ensures)
            if fact in have:
                return Pipeline(self.passes[: index + 1], self.given)
        raise PassContractError(f"no pass of this pipeline ensures {fact!r}")

    def before_kind(self, kind: str) -> "Pipeline":
        """The passes before the first pass of `kind` (the scope passes: before "lower")."""
        index = next((i for i, p in enumerate(self.passes) if p.kind == kind), len(self.passes))
        return Pipeline(self.passes[:index], self.given)

    def from_kind(self, kind: str) -> "Pipeline":
        """The passes from the first pass of `kind` on, starting from what the passes before ensure."""
        head = self.before_kind(kind)
        return Pipeline(self.passes[len(head):], head.ensures)

    def after(self, fact: str) -> "Pipeline":
        """The passes after until(fact): the rest of the pipeline, starting from what that prefix ensures."""
        head = self.until(fact)
        return Pipeline(self.passes[len(head):], head.ensures)

    def run(self, state, log: Callable[[str], None] | None = None) -> list[PassRecord]:
        """Runs the passes over `state`, adding what each ensures to state.facts (so a later pipeline
        can start where this one stopped: Pipeline(rest, given=state.facts))."""
        missing = sorted(self.given - state.facts)
        if missing:
            raise PassContractError(f"this pipeline starts from {', '.join(missing)}, which the state does not have yet")
        records = []
        for p in self.passes:
            start = time.perf_counter()
            result = p.run(state)
            if not isinstance(result, PassResult):
                raise PassContractError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult")
            if result.modified and p.kind == "analysis":
                raise PassContractError(f"analysis pass '{p.name}' says it changed the graph")
            state.facts |= set(p.ensures)
            records.append(PassRecord(p.name, p.kind, result, time.perf_counter() - start))
            if log:
                log(f"[{p.name}] {result.summary} ({records[-1].seconds:.2f} s)")
        return records
