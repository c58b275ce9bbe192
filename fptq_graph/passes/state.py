"""What the passes share: the graph being rewritten, what analysis found and measured, and the plan.

Who writes what (each field has one writer; passes/base.py's FACTS name them):
  rotation                         rotate_residual
  linears, producers, kept_float, kept_float_head   find_linears (structure: never changed after)
  recipe, statistics_note          plan_statistics
  observed_model, observers        insert_observers
  stats                            calibrate
  draft                            classify, plan_lm_head, plan_equalization (until freeze_plan)
  plan                             freeze_plan (read-only after)
  quantized, weight_notes, weight_sqnr   quantize_weights
  output_sqnr                      measure_output_sqnr
  scope, blocks                    the driver (sequential/run.py), never a pass
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.config import Config
from fptq_graph.plan.plan import Plan, PlanDraft
from fptq_graph.plan.statistics import ActivationStats


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
    """One quantizable MatMul/Gemm as found in the graph (structure only; decisions are in the plan)."""

    name: str
    node: gs.Node
    k: int
    n: int
    activation: gs.Variable        # the tensor the linear reads (quantized as its activation)
    sibling_tensor: str            # the tensor its siblings share (producer output, else the activation)
    producer: NormProducer | None
    output: str = ""               # name of the tensor the linear produces (kept by every emitter)
    weight_source: str = ""        # how the constant weight is reached (Transpose, transB, ...)


@dataclass
class State:
    graph: gs.Graph
    config: Config
    calibration: Any = None                   # calibration.CalibrationSource (CalibrationSet, FeedsCalibration)
    source_model: Any = None                  # the float ir.split_model.SplitModel (read only), for output SQNR
    linears: dict[str, Linear] = field(default_factory=dict)
    kept_float: dict[str, dict] = field(default_factory=dict)          # linears left float on purpose -> row
    kept_float_head: str | None = None        # the LM head, when lm_head='float' kept it out of the linears
    producers: dict[str, NormProducer] = field(default_factory=dict)   # keyed by producer output name
    recipe: Any = None                        # recipes.Recipe this run follows (plan_statistics)
    statistics_note: str = ""                 # why plan_statistics departed from the recipe's row, if it did
    observed_model: Any = None                # ir.split_model.SplitModel with observer outputs
    observers: dict[str, Any] = field(default_factory=dict)             # activation -> insert_observers.Observers
    stats: dict[str, ActivationStats] = field(default_factory=dict)     # activation -> its calibration statistics
    draft: PlanDraft = field(default_factory=PlanDraft)
    plan: Plan | None = None
    quantized: dict[str, Any] = field(default_factory=dict)             # linear -> quant.int4.QuantizedWeight
    weight_notes: dict[str, str] = field(default_factory=dict)          # linear -> what its quantizer did
    weight_sqnr: dict[str, float] = field(default_factory=dict)         # linear -> weight SQNR dB
    output_sqnr: dict[str, float] = field(default_factory=dict)         # linear -> output SQNR dB
    embeddings: list[dict] = field(default_factory=list)                # embedding tables: how each was stored (emit_embeddings)
    sequential: bool = False                  # block by block (sequential/): X^T X is held one block at a time
    # How quantize_weights runs its per-linear quantizer calls: None, here and in order, one at a time;
    # else map_tasks(fn, jobs) -> results in jobs' order (sequential/ray_workers.py: Ray tasks)
    map_tasks: Any = None
    rotation: dict = field(default_factory=dict)                        # what rotate_residual did, or why not (the report)
    # The scope the scope passes run over (sequential/scope.py: one block and how to run it); None: the whole graph
    scope: Any = None
    blocks: list = field(default_factory=list)                          # the run's blocks (sequential/blocks.py); [] : the whole graph
    facts: set[str] = field(default_factory=set)                        # what the passes run so far ensured (passes/base.py)

    def act_max(self, linear: Linear) -> np.ndarray:
        """The calibrated per-channel max|X| of a linear's input."""
        return self.stats[linear.activation.name].max

    def siblings(self, sibling_tensor: str) -> list[Linear]:
        return [l for l in self.linears.values() if l.sibling_tensor == sibling_tensor]
