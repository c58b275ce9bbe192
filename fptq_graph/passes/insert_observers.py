"""Build the observed model: the graph plus, per linear input, a [K] max|X| and a finiteness sentinel.

Observers are reductions inside the graph, so calibration fetches K floats per activation, never
whole tensors. The observed model's only outputs are the observers, so ONNX Runtime skips work that
feeds nothing observed (an lm_head whose input is observed but whose logits are not needed).
ReduceMax in ONNX Runtime ignores NaN, hence the separate sentinel sum(X * 0): NaN when any element
of X is NaN or infinite, 0 otherwise. With Config.gptq, each activation also gets X^T X [K, K] (the
GPTQ Hessian, summed over the batch's tokens): K^2 floats, still independent of the token count.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..model_io import IR_VERSION
from ..state import State


class InsertObservers:
    name = "insert_observers"

    def run(self, state: State) -> str:
        graph = state.graph.copy()
        tensors = graph.tensors()
        outputs = []
        state.observers = {}
        for linear in state.linears.values():
            name = linear.activation.name
            if name in state.observers:
                continue
            x = tensors[name]
            dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
            tag = _safe(name)
            flat = graph.layer(op="Abs", inputs=[x], outputs=[f"obs.{tag}.abs"])[0]
            flat = graph.layer(op="Reshape", inputs=[flat, np.array([-1, linear.k], dtype=np.int64)],
                               outputs=[f"obs.{tag}.flat"])[0]
            amax = graph.layer(op="ReduceMax", inputs=[flat, np.array([0], dtype=np.int64)],
                               outputs=[gs.Variable(f"obs.{tag}.max", dtype=dtype, shape=[linear.k])],
                               attrs={"keepdims": 0})[0]
            zeroed = graph.layer(op="Mul", inputs=[x, np.array(0, dtype=dtype)], outputs=[f"obs.{tag}.zero"])[0]
            finite = graph.layer(op="ReduceSum", inputs=[zeroed],
                                 outputs=[gs.Variable(f"obs.{tag}.finite", dtype=dtype, shape=[])],
                                 attrs={"keepdims": 0})[0]
            outputs += [amax, finite]
            state.observers[name] = (amax.name, finite.name)
            if state.config.gptq:
                rows = graph.layer(op="Reshape", inputs=[x, np.array([-1, linear.k], dtype=np.int64)],
                                   outputs=[f"obs.{tag}.rows"])[0]
                cols = graph.layer(op="Transpose", inputs=[rows], outputs=[f"obs.{tag}.cols"], attrs={"perm": [1, 0]})[0]
                gram = graph.layer(op="MatMul", inputs=[cols, rows],
                                   outputs=[gs.Variable(f"obs.{tag}.gram", dtype=dtype, shape=[linear.k, linear.k])])[0]
                outputs.append(gram)
                state.gram_observers[name] = gram.name
        graph.outputs = outputs
        graph.cleanup()
        model = gs.export_onnx(graph)
        model.ir_version = IR_VERSION
        state.observed_model = model
        grams = f", {len(state.gram_observers)} X^T X for GPTQ" if state.gram_observers else ""
        return f"{len(state.observers)} observed activations ({2 * len(state.observers)} observer outputs{grams})"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
