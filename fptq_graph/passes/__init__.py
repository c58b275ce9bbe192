"""The compiler's passes, one per module, each a small analysis, rewrite or lowering over a `State`
(passes/state.py), behind one contract (passes/base.py: PassResult, requires/ensures, Pipeline).

analysis/  find linears, plan statistics, insert observers, calibrate, classify, plan the LM head,
           plan equalization (LAE, SmoothQuant, AWQ), freeze the plan
rewrite/   canonicalize weights, fold equalization, quantize weights (they read the frozen plan)
lower/     one emitter per output form (qdq, w4a8, ort) and the node patterns they share
check_outputs_finite.py  refuse a result that computes NaN/Inf where the float model does not
measure_output_sqnr.py   per-layer output SQNR of the result against the float model
pipeline.py              the default pipeline, as a value
"""
from fptq_graph.passes.analysis.calibrate import Calibrate
from fptq_graph.passes.analysis.classify import ClassifyActivations
from fptq_graph.passes.analysis.find_linears import FindQuantizableLinears
from fptq_graph.passes.analysis.freeze_plan import FreezePlan
from fptq_graph.passes.analysis.insert_observers import InsertObservers
from fptq_graph.passes.analysis.plan_equalization import PlanEqualization
from fptq_graph.passes.analysis.plan_lm_head import PlanLMHead
from fptq_graph.passes.analysis.plan_statistics import PlanStatistics
from fptq_graph.passes.base import Pass, PassRecord, PassResult, Pipeline
from fptq_graph.passes.check_outputs_finite import CheckOutputsFinite
from fptq_graph.passes.lower.emit_ort import EmitORT
from fptq_graph.passes.lower.emit_qdq import EmitQDQ
from fptq_graph.passes.lower.emit_w4a8 import EmitW4A8
from fptq_graph.passes.measure_output_sqnr import MeasureOutputSQNR
from fptq_graph.passes.rewrite.canonicalize_weights import CanonicalizeWeights
from fptq_graph.passes.rewrite.fold_equalization import FoldEqualizationScales
from fptq_graph.passes.rewrite.quantize_weights import QuantizeWeights

__all__ = ["Pass", "PassResult", "PassRecord", "Pipeline", "FindQuantizableLinears", "PlanStatistics",
           "CanonicalizeWeights", "InsertObservers", "Calibrate", "ClassifyActivations", "PlanLMHead",
           "PlanEqualization", "FreezePlan", "FoldEqualizationScales", "QuantizeWeights", "EmitQDQ", "EmitW4A8",
           "EmitORT", "CheckOutputsFinite", "MeasureOutputSQNR"]
