"""Second-moment statistics of each linear's input, as calibration records them, and how the weight
quantizers and classifiers read them.

state.gram[activation] is X^T X [K, K] (summed over every calibration token) when GPTQ or AWQ asked
for it. The cheaper statistics live beside it under derived keys (calibrate.py sums every entry of
state.gram_observers over the batches, whatever its shape):
  "<activation>#diag"       sum_t x_tj^2 [K], the diagonal of X^T X (clipping search, measured classifier)
  "<activation>#rows"       the number of token rows T seen
  "<activation>#token_max"  sum_t max_j x_tj^2 (the per-token int8 step's energy: measured classifier)
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

DIAG, ROWS, TOKEN_MAX = "#diag", "#rows", "#token_max"


def statistics_observers(graph: gs.Graph, state, name: str, flat: gs.Variable, tag: str, dtype, needs: set) -> list:
    """Adds the observers `needs` asks for (besides "gram") on the [-1, K] view `flat`; returns their outputs."""
    outputs = []
    axis0 = np.array([0], dtype=np.int64)
    if "diag" in needs:
        sq = graph.layer(op="ReduceSumSquare", inputs=[flat, axis0], outputs=[
            gs.Variable(f"obs.{tag}.diag", dtype=dtype, shape=None)], attrs={"keepdims": 0})[0]
        outputs.append(sq)
        state.gram_observers[name + DIAG] = sq.name
    if "rows" in needs:
        shape = graph.layer(op="Shape", inputs=[flat], outputs=[f"obs.{tag}.shape"], attrs={"start": 0, "end": 1})[0]
        rows = graph.layer(op="Cast", inputs=[shape], outputs=[gs.Variable(f"obs.{tag}.nrows", dtype=np.float32, shape=[1])],
                           attrs={"to": 1})[0]
        outputs.append(rows)
        state.gram_observers[name + ROWS] = rows.name
    if "token_max" in needs:
        absx = graph.layer(op="Abs", inputs=[flat], outputs=[f"obs.{tag}.abs"])[0]
        token = graph.layer(op="ReduceMax", inputs=[absx, np.array([1], dtype=np.int64)], outputs=[f"obs.{tag}.tokmax"],
                            attrs={"keepdims": 0})[0]
        energy = graph.layer(op="ReduceSumSquare", inputs=[token], outputs=[
            gs.Variable(f"obs.{tag}.tokmax_energy", dtype=dtype, shape=None)], attrs={"keepdims": 0})[0]
        outputs.append(energy)
        state.gram_observers[name + TOKEN_MAX] = energy.name
    return outputs


def raw_hessian(state, activation: str) -> np.ndarray | None:
    """X^T X [K, K] if recorded, else its diagonal [K] if recorded, else None."""
    gram = state.gram.get(activation)
    if gram is not None:
        return gram
    return state.gram.get(activation + DIAG)


def hessian_diag(state, activation: str) -> np.ndarray | None:
    h = raw_hessian(state, activation)
    if h is None:
        return None
    return np.diag(h).copy() if h.ndim == 2 else np.asarray(h, np.float64)


def token_count(state, activation: str) -> float | None:
    rows = state.gram.get(activation + ROWS)
    return None if rows is None else float(np.asarray(rows).reshape(-1)[0])


def token_max_energy(state, activation: str) -> float | None:
    e = state.gram.get(activation + TOKEN_MAX)
    return None if e is None else float(np.asarray(e).reshape(-1)[0])


def equalized(h: np.ndarray | None, s: np.ndarray | None) -> np.ndarray | None:
    """The Hessian of X / s: H / (s s^T) (its diagonal / s^2)."""
    if h is None or s is None:
        return h
    s = s.astype(np.float64)
    return h / np.outer(s, s) if h.ndim == 2 else h / (s * s)
