"""The compiler's passes, one per module, each a small rewrite or analysis over a `State`.

Order (see pipeline.default_passes): find quantizable linears -> canonicalize their weights ->
insert observers -> calibrate -> classify -> plan the LM head (int8 head, tied embeddings) -> fold equalization (LAE) -> quantize weights -> emit
(qdq: standard QuantizeLinear/DequantizeLinear; w4a8: the bundled fptq::W4A8MatMul op; ort: ONNX
Runtime's MatMulNBits) -> measure
each linear's output SQNR against the float model.
"""
from .find_linears import FindQuantizableLinears
from .plan_statistics import PlanStatistics
from .canonicalize_weights import CanonicalizeWeights
from .insert_observers import InsertObservers
from .calibrate import Calibrate
from .classify import ClassifyActivations
from .plan_lm_head import PlanLMHead
from .fold_equalization import FoldEqualizationScales
from .quantize_weights import QuantizeWeights
from .emit_qdq import EmitQDQ
from .emit_w4a8 import EmitW4A8
from .emit_ort import EmitORT
from .measure_output_sqnr import MeasureOutputSQNR

__all__ = [
    "FindQuantizableLinears",
    "PlanStatistics",
    "CanonicalizeWeights",
    "InsertObservers",
    "Calibrate",
    "ClassifyActivations",
    "PlanLMHead",
    "FoldEqualizationScales",
    "QuantizeWeights",
    "EmitQDQ",
    "EmitW4A8",
    "EmitORT",
    "MeasureOutputSQNR",
]
