"""Refuse a quantized model that computes NaN or Inf where the float model does not (a check).

One calibration sample runs through the float and the lowered model; if an output of the quantized
one is non-finite where the float one's is finite, the linears' outputs are fetched (a chunk at a
time, as measure_output_sqnr does) to name the first linear, in graph order, whose output went
non-finite, and the run fails with that name: nothing is written. What it guards against is a
quantized weight or scale outside the activation type's range (float16), a static activation scale
that saturates, or a runtime kernel that overflows — anything that slipped past the passes' own checks.

Resident: two sessions over the models' arrays in place (no copies) and one sample's outputs.
"""
from __future__ import annotations

import numpy as np

from fptq_graph.errors import FptqError
from fptq_graph.ir.save import finish_split
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.measure_output_sqnr import MAX_CHUNK, MIN_CHUNK, output_chunks, with_outputs
from fptq_graph.runtime import ort_errors
from fptq_graph.runtime.sessions import session


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
        source = state.source_model
        feeds = next(iter(state.calibration.sample_feeds(source.proto.graph.input, 1)), None)
        if feeds is None:
            return PassResult("skipped (no calibration sample)", stats={"checked": 0})
        quantized = finish_split(state.graph, source.proto)
        outputs = [o.name for o in source.proto.graph.output]
        bad = first_new_non_finite(source, quantized, outputs, feeds)
        if bad is None:
            return PassResult(f"{len(outputs)} outputs finite on one calibration sample", stats={"checked": len(outputs)})
        where = first_non_finite_linear(state, source, quantized, feeds)
        raise NonFiniteOutputError(
            f"the quantized model computes NaN or Inf in output '{bad}' on calibration sample 0, where the float "
            f"model does not" + (f"; the first linear whose output went non-finite: '{where}'" if where else "")
            + "; nothing written")


def first_new_non_finite(reference, candidate, names: list[str], feeds: dict) -> str | None:
    """The first of `names` that holds NaN/Inf in `candidate`'s output where `reference`'s is finite."""
    got = {}
    for kind, model in (("float", reference), ("quantized", candidate)):
        sess = session(with_outputs(model, names), arena=False)
        got[kind] = ort_errors.run(sess, names, feeds, f"the {kind} model on calibration sample 0")
        del sess
    for name, ref, out in zip(names, got["float"], got["quantized"]):
        if newly_non_finite(ref, out):
            return name
    return None


def first_non_finite_linear(state, source, quantized, feeds: dict) -> str | None:
    """The first linear (graph order) whose quantized output is non-finite where the float's is not."""
    linears = list(state.linears.values())
    by_output = {linear.output: linear.name for linear in linears}
    tokens = int(np.prod(next(iter(feeds.values())).shape))
    budget = min(MAX_CHUNK, max(MIN_CHUNK, source.payload_bytes // 8))
    for chunk in output_chunks(linears, 4 * tokens, budget):
        name = first_new_non_finite(source, quantized, chunk, feeds)
        if name is not None:
            return by_output[name]
    return None


def newly_non_finite(reference: np.ndarray, candidate: np.ndarray) -> bool:
    """True where candidate has a NaN/Inf at a position reference holds a finite value."""
    ref, out = np.asarray(reference), np.asarray(candidate)
    if not np.issubdtype(out.dtype, np.floating) or ref.shape != out.shape:
        return False
    return bool(np.any(np.isfinite(ref) & ~np.isfinite(out)))
