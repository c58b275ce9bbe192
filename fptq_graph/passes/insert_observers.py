"""Build the observed model: the graph plus, per linear input, a [K] max|X| and a finiteness sentinel.

Observers are reductions inside the graph, so calibration fetches K floats per activation, never
whole tensors. The observed model's only outputs are the observers, so ONNX Runtime skips work that
feeds nothing observed (an lm_head whose input is observed but whose logits are not needed).
max|X| per channel is max(ReduceMax(X), -ReduceMin(X)) over the rows of X viewed as [-1, K]: no
observer makes a tensor the size of X. ReduceMax in ONNX Runtime ignores NaN, hence the sentinel
sum(X): NaN when any element is NaN; an infinite element shows in the max itself. (A sum of finite
values that overflows gives Inf, not NaN, so it raises no false alarm.) With GPTQ weights or AWQ scales
(recipes.observers_needed), each activation also gets X^T X [K, K] (the Hessian, summed over the
batch's tokens): K^2 floats, still independent of the token count; the clipping search and the
measured classifier get only its diagonal (hessians.statistics_observers).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..model_io import IR_VERSION
from ..schedule import demand_order
from ..split_model import export_split
from ..hessians import statistics_observers
from ..recipes import effective, observers_needed
from ..state import State


class InsertObservers:
    name = "insert_observers"

    def run(self, state: State) -> str:
        graph = state.graph.copy()
        tensors = graph.tensors()
        outputs = []
        state.observers = {}
        needs = observers_needed(effective(state))
        for linear in state.linears.values():
            name = linear.activation.name
            if name in state.observers:
                continue
            x = tensors[name]
            # The activation's type where the graph declares it, else the weight's: MatMul takes one
            # type for both (an fp16 model without value_info must not get float32 observers).
            dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(linear.node.inputs[1].values.dtype)
            tag = _safe(name)
            flat = graph.layer(op="Reshape", inputs=[x, np.array([-1, linear.k], dtype=np.int64)],
                               outputs=[f"obs.{tag}.flat"])[0]
            rows = np.array([0], dtype=np.int64)
            hi = graph.layer(op="ReduceMax", inputs=[flat, rows], outputs=[f"obs.{tag}.hi"], attrs={"keepdims": 0})[0]
            lo = graph.layer(op="ReduceMin", inputs=[flat, rows], outputs=[f"obs.{tag}.lo"], attrs={"keepdims": 0})[0]
            lo = graph.layer(op="Neg", inputs=[lo], outputs=[f"obs.{tag}.neg_lo"])[0]
            amax = graph.layer(op="Max", inputs=[hi, lo],
                               outputs=[gs.Variable(f"obs.{tag}.max", dtype=dtype, shape=[linear.k])])[0]
            finite = graph.layer(op="ReduceSum", inputs=[flat],
                                 outputs=[gs.Variable(f"obs.{tag}.finite", dtype=dtype, shape=[])],
                                 attrs={"keepdims": 0})[0]
            outputs += [amax, finite]
            state.observers[name] = (amax.name, finite.name)
            if "gram" in needs:
                rows = graph.layer(op="Reshape", inputs=[x, np.array([-1, linear.k], dtype=np.int64)],
                                   outputs=[f"obs.{tag}.rows"])[0]
                cols = graph.layer(op="Transpose", inputs=[rows], outputs=[f"obs.{tag}.cols"], attrs={"perm": [1, 0]})[0]
                gram = graph.layer(op="MatMul", inputs=[cols, rows],
                                   outputs=[gs.Variable(f"obs.{tag}.gram", dtype=dtype, shape=[linear.k, linear.k])])[0]
                outputs.append(gram)
                state.gram_observers[name] = gram.name
            # The cheap statistics (recipes.observers_needed), kept in state.gram under derived keys
            # (hessians.py reads them): diag(X^T X) [K], the token count, sum_t max_j x_tj^2.
            outputs += statistics_observers(graph, state, name, flat, tag, dtype, needs)
        graph.outputs = outputs
        demand_order(graph.cleanup())   # observers right after what they observe (schedule.py)
        # The observed graph shares its weights with the graph being rewritten: no copy (split_model).
        model = export_split(graph)
        model.proto.ir_version = IR_VERSION
        state.observed_model = model
        n_gram = sum(1 for key in state.gram_observers if "#" not in key)
        grams = f", {n_gram} X^T X for GPTQ/AWQ" if n_gram else ""
        if "diag" in needs:
            grams += f", {len(state.observers)} diag(X^T X)"
        return f"{len(state.observers)} observed activations ({2 * len(state.observers)} observer outputs{grams})"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
