"""What the passes share: the graph being rewritten and what earlier passes learned about it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .config import Config

# Activation schemes: int8 per-tensor static, equalized then static (FPTQ's LAE, or SmoothQuant),
# int8 per-token dynamic, or float (weights-only recipes).
SCHEMES = ("static", "lae", "smooth", "dynamic", "float")
EQUALIZED = ("lae", "smooth")


@dataclass
class NormProducer:
    """A normalization whose per-channel gain can absorb an LAE scale."""

    node: gs.Node
    kind: str                      # "LayerNormalization", "RMSNorm (decomposed)", ...
    gamma_index: int               # which input of `node` is the gain
    beta_index: int | None         # which input is the bias, if any
    output: gs.Variable            # the normalized tensor the linears read (possibly through Reshape)
    linears: list[str] = field(default_factory=list)
    # Consumers of the normalized tensor that are not quantizable linears: (node, the tensor it reads).
    other_consumers: list[tuple[gs.Node, gs.Variable]] = field(default_factory=list)


@dataclass
class Linear:
    """One quantizable MatMul/Gemm and everything decided about it."""

    name: str
    node: gs.Node
    k: int
    n: int
    activation: gs.Variable        # the tensor the linear reads (quantized as its activation)
    group: str                     # name of the tensor shared by its siblings (producer output or activation)
    producer: NormProducer | None
    output: str = ""               # name of the tensor the linear produces (kept by every emitter)
    weight_note: str = ""          # how the constant weight is reached (Transpose, transB, ...)
    act_max: np.ndarray | None = None         # per-input-channel max|X| from calibration [K]
    scheme: str | None = None                 # one of SCHEMES
    reason: str = ""
    eq_scale: np.ndarray | None = None        # s [K], when LAE or SmoothQuant was folded
    act_scale: float | None = None            # static int8 scale, when static or lae
    quantized: Any = None                     # int4.QuantizedWeight
    weight_sqnr_db: float | None = None       # SQNR of the INT4 weight against the float (LAE-scaled) one
    output_sqnr_db: float | None = None       # SQNR of the linear's output in the quantized model vs the float one

    @property
    def v(self) -> float:
        return float(self.act_max.max()) if self.act_max is not None else float("nan")

    @property
    def v_after(self) -> float:
        if self.act_max is None:
            return float("nan")
        if self.eq_scale is None:
            return self.v
        return float((self.act_max / self.eq_scale).max())


@dataclass
class State:
    graph: gs.Graph
    config: Config
    linears: dict[str, Linear] = field(default_factory=dict)
    kept_float: dict[str, dict] = field(default_factory=dict)          # linears left float on purpose -> row
    producers: dict[str, NormProducer] = field(default_factory=dict)   # keyed by producer output name
    observed_model: Any = None                # split_model.SplitModel with observer outputs
    observers: dict[str, tuple[str, str]] = field(default_factory=dict)  # activation -> (max output, finite output)
    calibration: Any = None                   # calibration.CalibrationSet
    source_model: Any = None                  # the float split_model.SplitModel (read only), for output SQNR
    act_max: dict[str, np.ndarray] = field(default_factory=dict)      # activation name -> [K]
    gram_observers: dict[str, str] = field(default_factory=dict)      # activation -> X^T X output (gptq only)
    gram: dict[str, np.ndarray] = field(default_factory=dict)         # activation name -> X^T X [K, K], float64
    recipe: Any = None                        # recipes.Recipe this run follows (passes/plan_statistics.py)
    statistics_note: str = ""                 # why plan_statistics departed from the recipe's row, if it did
