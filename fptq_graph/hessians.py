"""Second-moment statistics of each linear's input, as calibration records them, and how the weight
quantizers and classifiers read them.

state.gram[activation] is X^T X [K, K] (summed over every calibration token) when GPTQ or AWQ asked
for it. The cheaper statistics live beside it under derived keys (calibrate.py sums every entry of
state.gram_observers over the batches, whatever its shape):
  "<activation>#diag"       sum_t x_tj^2 [K], the diagonal of X^T X (clipping search, measured classifier)
  "<activation>#rows"       the number of token rows T seen
  "<activation>#token_max"  sum_t max_j x_tj^2 (the per-token int8 step's energy: measured classifier)
  "<activation>#inv_norm"   sum_t 1 / |x_t|^2 (static noise relative to each token: measured classifier)
  "<activation>#max_ratio"  sum_t max_j x_tj^2 / |x_t|^2 (per-token noise relative to each token)
  "<activation>#count_above", "#inv_above"  per edge of NORM_EDGES: tokens with |x_t|^2 above it, and
                            their sum of 1 / |x_t|^2 (to cap each token's relative static noise at 1)
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

DIAG, ROWS, TOKEN_MAX, INV_NORM, MAX_RATIO = "#diag", "#rows", "#token_max", "#inv_norm", "#max_ratio"
COUNT_ABOVE, INV_ABOVE = "#count_above", "#inv_above"
NORM_EDGES = tuple(2.0 ** e for e in range(-30, 31))


def capped_relative_noise(state, activation: str, a: float) -> float | None:
    """E_t[min(1, a / |x_t|^2)] from the recorded |x_t|^2 histogram (the edge nearest a in log scale)."""
    count_above, inv_above, rows = (state.gram.get(activation + k) for k in (COUNT_ABOVE, INV_ABOVE, ROWS))
    if count_above is None or inv_above is None or rows is None:
        return None
    t = float(np.asarray(rows).reshape(-1)[0])
    b = int(np.argmin(np.abs(np.log2(NORM_EDGES) - np.log2(max(a, 1e-300)))))
    below = t - float(count_above[b])
    return (below + a * float(inv_above[b])) / max(t, 1.0)


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
        # in float32 whatever the model's type: squared norms of fp16 activations overflow fp16
        x32 = graph.layer(op="Cast", inputs=[flat], outputs=[f"obs.{tag}.f32"], attrs={"to": 1})[0]
        absx = graph.layer(op="Abs", inputs=[x32], outputs=[f"obs.{tag}.abs"])[0]
        axis1 = np.array([1], dtype=np.int64)
        token = graph.layer(op="ReduceMax", inputs=[absx, axis1], outputs=[f"obs.{tag}.tokmax"], attrs={"keepdims": 0})[0]
        energy = graph.layer(op="ReduceSumSquare", inputs=[token], outputs=[
            gs.Variable(f"obs.{tag}.tokmax_energy", dtype=np.float32, shape=None)], attrs={"keepdims": 0})[0]
        norm2 = graph.layer(op="ReduceSumSquare", inputs=[x32, axis1], outputs=[f"obs.{tag}.norm2"], attrs={"keepdims": 0})[0]
        norm2 = graph.layer(op="Max", inputs=[norm2, np.array(1e-30, dtype=np.float32)], outputs=[f"obs.{tag}.norm2_floor"])[0]
        inv = graph.layer(op="Reciprocal", inputs=[norm2], outputs=[f"obs.{tag}.inv_norm2"])[0]
        inv_sum = graph.layer(op="ReduceSum", inputs=[inv], outputs=[
            gs.Variable(f"obs.{tag}.inv_norm_sum", dtype=np.float32, shape=None)], attrs={"keepdims": 0})[0]
        tok2 = graph.layer(op="Mul", inputs=[token, token], outputs=[f"obs.{tag}.tokmax2"])[0]
        ratio = graph.layer(op="Div", inputs=[tok2, norm2], outputs=[f"obs.{tag}.max_ratio"])[0]
        ratio_sum = graph.layer(op="ReduceSum", inputs=[ratio], outputs=[
            gs.Variable(f"obs.{tag}.max_ratio_sum", dtype=np.float32, shape=None)], attrs={"keepdims": 0})[0]
        # |x_t|^2 against fixed edges 2^-30 .. 2^30: how many tokens lie at or below each edge, and
        # sum 1 / |x_t|^2 over those above it (a static step that rounds a whole token to zero costs
        # that token its own signal, no more: classify.py caps each token's relative noise at 1)
        edges = np.array(NORM_EDGES, dtype=np.float32)
        col = graph.layer(op="Unsqueeze", inputs=[norm2, np.array([1], dtype=np.int64)], outputs=[f"obs.{tag}.norm2_col"])[0]
        above = graph.layer(op="Greater", inputs=[col, edges[None, :]], outputs=[f"obs.{tag}.above"])[0]
        above_f = graph.layer(op="Cast", inputs=[above], outputs=[f"obs.{tag}.above_f"], attrs={"to": 1})[0]
        inv_col = graph.layer(op="Unsqueeze", inputs=[inv, np.array([1], dtype=np.int64)], outputs=[f"obs.{tag}.inv_col"])[0]
        inv_above = graph.layer(op="Mul", inputs=[above_f, inv_col], outputs=[f"obs.{tag}.inv_above"])[0]
        axis0 = np.array([0], dtype=np.int64)
        count_above = graph.layer(op="ReduceSum", inputs=[above_f, axis0], outputs=[
            gs.Variable(f"obs.{tag}.count_above", dtype=np.float32, shape=[len(NORM_EDGES)])], attrs={"keepdims": 0})[0]
        inv_above_sum = graph.layer(op="ReduceSum", inputs=[inv_above, axis0], outputs=[
            gs.Variable(f"obs.{tag}.inv_above_sum", dtype=np.float32, shape=[len(NORM_EDGES)])], attrs={"keepdims": 0})[0]
        outputs += [energy, inv_sum, ratio_sum, count_above, inv_above_sum]
        state.gram_observers[name + COUNT_ABOVE] = count_above.name
        state.gram_observers[name + INV_ABOVE] = inv_above_sum.name
        state.gram_observers[name + TOKEN_MAX] = energy.name
        state.gram_observers[name + INV_NORM] = inv_sum.name
        state.gram_observers[name + MAX_RATIO] = ratio_sum.name
    return outputs


def token_stat(state, activation: str, key: str) -> float | None:
    """A recorded scalar statistic (TOKEN_MAX, INV_NORM, MAX_RATIO), summed over the calibration tokens."""
    value = state.gram.get(activation + key)
    return None if value is None else float(np.asarray(value).reshape(-1)[0])


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
