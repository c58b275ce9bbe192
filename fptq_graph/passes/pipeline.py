"""The default pipelines, as values (passes/base.py's Pipeline).

    calibration_pipeline()   rotate the residual stream (when the recipe says) -> find linears -> plan statistics -> canonicalize weights -> insert observers
                             -> calibrate  (what api.calibrate runs: a prefix of the default)
    planning                 classify -> plan the LM head -> plan equalization (LAE/SmoothQuant/AWQ)
                             -> freeze the plan
    rewriting                fold equalization -> quantize weights
    lowering(form)           the form's emitter (qdq, w4a8, ort), then the untied embedding tables
    measurement              no NaN/Inf the float model does not compute (one sample), then the
                             per-layer output SQNR against the float model

What a recipe does (activation classifier x equalizer x weight quantizer) is one row of the table in
recipes.py; the passes read the row settled by plan_statistics, never its name.
"""
from __future__ import annotations

from fptq_graph.passes.analysis.calibrate import Calibrate
from fptq_graph.passes.analysis.classify import ClassifyActivations
from fptq_graph.passes.analysis.find_linears import FindQuantizableLinears
from fptq_graph.passes.analysis.freeze_plan import FreezePlan
from fptq_graph.passes.analysis.insert_observers import InsertObservers
from fptq_graph.passes.analysis.plan_equalization import PlanEqualization
from fptq_graph.passes.analysis.plan_lm_head import PlanLMHead
from fptq_graph.passes.analysis.plan_statistics import PlanStatistics
from fptq_graph.passes.base import PassRecord, Pipeline
from fptq_graph.passes.check_outputs_finite import CheckOutputsFinite
from fptq_graph.passes.lower.emit_embeddings import EmitEmbeddings
from fptq_graph.passes.lower.emit_ort import EmitORT
from fptq_graph.passes.lower.emit_qdq import EmitQDQ
from fptq_graph.passes.lower.emit_w4a8 import EmitW4A8
from fptq_graph.passes.measure_output_sqnr import MeasureOutputSQNR
from fptq_graph.passes.rewrite.canonicalize_weights import CanonicalizeWeights
from fptq_graph.passes.rewrite.fold_equalization import FoldEqualizationScales
from fptq_graph.passes.rewrite.quantize_weights import QuantizeWeights
from fptq_graph.passes.rewrite.rotate_residual import RotateResidual

EMITTERS = {"qdq": EmitQDQ, "w4a8": EmitW4A8, "ort": EmitORT}   # Config.format -> the pass that writes that form

__all__ = ["EMITTERS", "PassRecord", "calibration_pipeline", "default_pipeline", "default_passes", "run_passes"]


def calibration_pipeline() -> Pipeline:
    return Pipeline([RotateResidual(), FindQuantizableLinears(), PlanStatistics(), CanonicalizeWeights(), InsertObservers(), Calibrate()])


def default_pipeline(form: str = "qdq") -> Pipeline:
    return calibration_pipeline() + Pipeline(
        [ClassifyActivations(), PlanLMHead(), PlanEqualization(), FreezePlan(),
         FoldEqualizationScales(), QuantizeWeights(), EMITTERS[form](), EmitEmbeddings(), CheckOutputsFinite(), MeasureOutputSQNR()],
        given=calibration_pipeline().ensures)


def default_passes(form: str = "qdq") -> list:
    """The default pipeline's passes as a list (older name)."""
    return list(default_pipeline(form))


def run_passes(state, passes, log=None) -> list[PassRecord]:
    """Runs `passes` (a Pipeline, or a list checked as one from what `state` already has) over `state`."""
    pipeline = passes if isinstance(passes, Pipeline) else Pipeline(passes, given=state.facts)
    return pipeline.run(state, log=log)
