"""Settle what this run records and does: the recipe's row, unless its X^T X statistics would not fit.

The row's classifier is settled first: a row with an `unrotated_classifier` (fptq-rot-measured) uses it
where rotate_residual left the stream unrotated (it fell back on the model, or --rotate none), so such a
run records and decides exactly what that classifier's row would.

GPTQ and AWQ need X^T X per distinct linear input: K^2 float64 accumulators each, independent of the
token count but not of the model's width. On SmolLM2 that is 0.8 GB against 0.5 GB of float weights;
on a 1.5B LLaMA it would be 8 GB against 5.5 GB, beyond what issue 5 promises (one float copy of the
weights plus calibration activations). So when the recipe's own choice (the default `fptq` row:
AWQ + GPTQ-clip) would need more than Config.statistics_budget_mib (default: the float weights' size,
at least 1 GiB), this pass trades GPTQ and AWQ for the clipping search, which needs only diag(X^T X)
(K floats an input), and says so in its summary and in every layer's reason. A weight quantizer the
user asked for (--weight-quantizer, --gptq) is never traded. Block by block (state.sequential), X^T X is
held one block at a time and nothing is traded: sequential/mode.py goes block by block, by default,
exactly where this pass would otherwise trade.
"""
from __future__ import annotations

from dataclasses import replace

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.recipes import observers_needed, run_row

MIB = 2**20


class PlanStatistics(Pass):
    name = "plan_statistics"
    kind = "analysis"
    requires = frozenset({"linears"})
    ensures = frozenset({"statistics_plan"})

    def run(self, state) -> PassResult:
        cfg = state.config
        row = run_row(cfg)
        rotated = bool(state.rotation.get("rotated"))
        row = replace(row, classifier=row.classifier_for(rotated))
        state.recipe = row
        needs = observers_needed(row)
        inputs = {linear.activation.name: linear.k for linear in state.linears.values()}
        gram_bytes = sum(8 * k * k for k in inputs.values()) if "gram" in needs else 0
        weight_bytes = sum(4 * linear.k * linear.n for linear in state.linears.values())
        budget = cfg.statistics_budget_mib * MIB if cfg.statistics_budget_mib is not None else max(weight_bytes, 1024 * MIB)
        chosen = f"recipe {row.name}: {row.classifier} activations" \
                 f"{' (the stream is not rotated)' if row.unrotated_classifier and not rotated else ''}, {row.equalizer} equalizer" \
                 f"{', AWQ' if row.awq else ''}, {row.weights} weights"
        stats = {"gram_bytes": gram_bytes, "budget_bytes": budget, "traded": False}
        if state.sequential:
            extra = f"; X^T X for {len(inputs)} inputs: {gram_bytes / MIB:.0f} MiB, held one block at a time" if gram_bytes else ""
            return PassResult(chosen + extra, stats=stats)
        if gram_bytes <= budget:
            extra = f"; X^T X for {len(inputs)} inputs: {gram_bytes / MIB:.0f} MiB" if gram_bytes else ""
            return PassResult(chosen + extra, stats=stats)
        asked = cfg.weight_quantizer is not None or cfg.gptq
        if asked and not row.awq:
            return PassResult(chosen + f"; X^T X for {len(inputs)} inputs: {gram_bytes / MIB:.0f} MiB (over the budget "
                              f"{budget / MIB:.0f} MiB, but the weight quantizer was asked for)", stats=stats)
        state.recipe = replace(row, awq=False, weights=row.weights if asked else "clip")
        traded = " and ".join(name for name, gone in (("AWQ", row.awq), ("GPTQ", not asked and row.weights.startswith("gptq")))
                              if gone)
        state.statistics_note = (f"X^T X for {len(inputs)} inputs would take {gram_bytes / MIB:.0f} MiB, over the budget "
                                 f"{budget / MIB:.0f} MiB (Config.statistics_budget_mib): {traded} traded for the clipping search")
        return PassResult(chosen + f"; {state.statistics_note}", stats={**stats, "traded": True})
