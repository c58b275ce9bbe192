"""Refuse a quantized model that computes NaN or Inf where the float model does not (a check).

One calibration sample runs through the float and the lowered model, block after block of the run's
scopes (sequential/block_chain.py; the whole graph is one block); if what a block hands on or a model
output it makes is non-finite in the quantized chain where the float one is finite, that block's linear
outputs are fetched (a chunk at a time, as measure_output_sqnr does) to name the first linear, in graph
order, whose output went non-finite, and the run fails with that name: nothing is written. What it
guards against is a quantized weight or scale outside the activation type's range (float16), a static
activation scale that saturates, or a runtime kernel that overflows — anything that slipped past the
passes' own checks.

Resident: one block of each model as a session (its arrays in place, no copies) and one sample's cut tensors.
"""
from __future__ import annotations

import numpy as np

from fptq_graph.errors import FptqError
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.sequential.block_chain import BlockChain


class NonFiniteOutputError(FptqError):
    """The quantized model computes NaN or Inf on calibration data where the float model does not."""


class CheckOutputsFinite(Pass):
    name = "check_outputs_finite"
    kind = "measure"
    requires = frozenset({"lowered"})
    ensures = frozenset({"outputs_finite"})

    def run(self, state) -> PassResult:
        if state.calibration is None or state.source_model is None:
            return PassResult("skipped (no calibration sample)", stats={"checked": 0})
        chain = BlockChain(state, 1)
        if not chain.samples:
            return PassResult("skipped (no calibration sample)", stats={"checked": 0})
        checked = []
        for pair in chain:
            got = pair.run(0, pair.exits)
            bad = next((name for name, ref, out in zip(pair.exits, got["float"], got["quantized"])
                        if newly_non_finite(ref, out)), None)
            del got
            if bad is None:
                checked += [name for name in pair.exits if name in pair.block.model_outputs]
                continue
            where = next((name for chunk in chain.chunks(pair.linears, 0) for name in _first_bad(pair, chunk)), None)
            linear = next((l.name for l in pair.linears if l.output == where), None)
            what = f"output '{bad}'" if bad in pair.block.model_outputs else \
                f"'{bad}' (what block {pair.block.index}, {pair.block.label}, hands on)"
            raise NonFiniteOutputError(
                f"the quantized model computes NaN or Inf in {what} on calibration sample 0, where the float "
                f"model does not" + (f"; the first linear whose output went non-finite: '{linear}'" if linear else "")
                + "; nothing written")
        blocks = f", block by block ({len(chain.blocks)} blocks)" if len(chain.blocks) > 1 else ""
        return PassResult(f"{len(checked)} outputs finite on one calibration sample{blocks}", stats={"checked": len(checked)})


def _first_bad(pair, chunk: list[str]) -> list[str]:
    """The first of `chunk` (as a list of at most one) non-finite in the quantized block only."""
    got = pair.run(0, chunk)
    return [name for name, ref, out in zip(chunk, got["float"], got["quantized"]) if newly_non_finite(ref, out)][:1]


def newly_non_finite(reference: np.ndarray, candidate: np.ndarray) -> bool:
    """True where candidate has a NaN/Inf at a position reference holds a finite value."""
    ref, out = np.asarray(reference), np.asarray(candidate)
    if not np.issubdtype(out.dtype, np.floating) or ref.shape != out.shape:
        return False
    return bool(np.any(np.isfinite(ref) & ~np.isfinite(out)))
