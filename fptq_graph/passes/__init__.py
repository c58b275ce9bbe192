"""The compiler's passes, one per module, each a small rewrite or analysis over a `State`.

Order (see pipeline.default_passes): find quantizable linears -> canonicalize their weights ->
insert observers -> calibrate -> classify -> fold equalization (LAE) -> quantize weights -> emit QDQ.
"""
from .find_linears import FindQuantizableLinears
from .canonicalize_weights import CanonicalizeWeights
from .insert_observers import InsertObservers
from .calibrate import Calibrate
from .classify import ClassifyActivations
from .fold_equalization import FoldEqualizationScales
from .quantize_weights import QuantizeWeightsInt4
from .emit_qdq import EmitQDQ

__all__ = [
    "FindQuantizableLinears",
    "CanonicalizeWeights",
    "InsertObservers",
    "Calibrate",
    "ClassifyActivations",
    "FoldEqualizationScales",
    "QuantizeWeightsInt4",
    "EmitQDQ",
]
