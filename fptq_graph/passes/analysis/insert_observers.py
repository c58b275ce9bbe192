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
measured classifier get only its diagonal and the per-token sums (plan/statistics.py).

Nodes are appended directly with named tensors: graphsurgeon's Graph.layer collects every tensor
name of the graph on each call, which made this pass quadratic (16 s of SmolLM2's 56 s quantize).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.ir.opset import IR_VERSION
from fptq_graph.ir.schedule import demand_order
from fptq_graph.ir.split_model import export_split
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.plan.statistics import NORM_EDGES
from fptq_graph.recipes import observers_needed


@dataclass
class Observers:
    """The observed model's output names for one activation: its max, its finiteness sentinel, and the
    summed statistics (an ActivationStats field name -> output name)."""

    max: str
    finite: str
    sums: dict[str, str] = field(default_factory=dict)


class _Builder:
    """Appends observer nodes to `graph` with names under obs.<tag>."""

    def __init__(self, graph: gs.Graph, tag: str):
        self.graph, self.tag = graph, tag

    def const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(f"obs.{self.tag}.{suffix}", np.asarray(value))

    def op(self, op: str, inputs: list, suffix: str, attrs=None, dtype=None, shape=None) -> gs.Variable:
        out = gs.Variable(f"obs.{self.tag}.{suffix}", dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op=op, inputs=list(inputs), outputs=[out], attrs=attrs or {}))
        return out


class InsertObservers(Pass):
    name = "insert_observers"
    kind = "analysis"
    requires = frozenset({"linears", "statistics_plan", "canonical_weights"})
    ensures = frozenset({"observed_model"})

    def run(self, state) -> PassResult:
        graph = state.graph.copy()
        tensors = graph.tensors()
        outputs = []
        state.observers = {}
        needs = observers_needed(state.recipe)
        for linear in state.linears.values():
            name = linear.activation.name
            if name in state.observers:
                continue
            x = tensors[name]
            # The activation's type where the graph declares it, else the weight's: MatMul takes one
            # type for both (an fp16 model without value_info must not get float32 observers).
            dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(linear.node.inputs[1].values.dtype)
            b = _Builder(graph, _safe(name))
            shape = b.const("flat_shape", np.array([-1, linear.k], dtype=np.int64))
            flat = b.op("Reshape", [x, shape], "flat")
            rows = b.const("axis0", np.array([0], dtype=np.int64))
            hi = b.op("ReduceMax", [flat, rows], "hi", {"keepdims": 0})
            lo = b.op("Neg", [b.op("ReduceMin", [flat, rows], "lo", {"keepdims": 0})], "neg_lo")
            amax = b.op("Max", [hi, lo], "max", dtype=dtype, shape=[linear.k])
            finite = b.op("ReduceSum", [flat], "finite", {"keepdims": 0}, dtype=dtype, shape=[])
            outputs += [amax, finite]
            observed = state.observers[name] = Observers(amax.name, finite.name)
            if "gram" in needs:
                token_rows = b.op("Reshape", [x, shape], "rows")
                gram_type = dtype
                if dtype != np.float32:   # see _summed_in_float32
                    token_rows, gram_type = b.op("Cast", [token_rows], "rows_f32", {"to": 1}), np.dtype(np.float32)
                cols = b.op("Transpose", [token_rows], "cols", {"perm": [1, 0]})
                gram = b.op("MatMul", [cols, token_rows], "gram", dtype=gram_type, shape=[linear.k, linear.k])
                outputs.append(gram)
                observed.sums["gram"] = gram.name
            outputs += _statistics_observers(b, flat, dtype, needs, observed)
        graph.outputs = outputs
        demand_order(graph.cleanup())   # observers right after what they observe (ir/schedule.py)
        # The observed graph shares its weights with the graph being rewritten: no copy (split_model).
        model = export_split(graph)
        model.proto.ir_version = IR_VERSION
        state.observed_model = model
        n_gram = sum(1 for o in state.observers.values() if "gram" in o.sums)
        n_diag = sum(1 for o in state.observers.values() if "diag" in o.sums)
        grams = f", {n_gram} X^T X for GPTQ/AWQ" if n_gram else ""
        if n_diag:
            grams += f", {n_diag} diag(X^T X)"
        return PassResult(f"{len(state.observers)} observed activations ({2 * len(state.observers)} observer outputs{grams})",
                          stats={"activations": len(state.observers), "gram": n_gram, "diag": n_diag,
                                 "outputs": len(outputs)})


def _statistics_observers(b: _Builder, flat: gs.Variable, dtype, needs: set, observed: Observers) -> list:
    """Adds the observers `needs` asks for (besides "gram") on the [-1, K] view `flat`; returns their outputs."""
    outputs = []
    axis0 = b.const("sum_axis0", np.array([0], dtype=np.int64))
    if "diag" in needs:
        squared = flat if dtype == np.float32 else b.op("Cast", [flat], "diag_f32", {"to": 1})   # _summed_in_float32
        outputs.append(b.op("ReduceSumSquare", [squared, axis0], "diag", {"keepdims": 0}, dtype=np.float32))
        observed.sums["diag"] = outputs[-1].name
    if "rows" in needs:
        shape = b.op("Shape", [flat], "shape", {"start": 0, "end": 1})
        outputs.append(b.op("Cast", [shape], "nrows", {"to": 1}, dtype=np.float32, shape=[1]))
        observed.sums["rows"] = outputs[-1].name
    if "token_max" in needs:
        # in float32 whatever the model's type: squared norms of fp16 activations overflow fp16
        x32 = b.op("Cast", [flat], "f32", {"to": 1})
        axis1 = b.const("axis1", np.array([1], dtype=np.int64))
        token = b.op("ReduceMax", [b.op("Abs", [x32], "abs"), axis1], "tokmax", {"keepdims": 0})
        energy = b.op("ReduceSumSquare", [token], "tokmax_energy", {"keepdims": 0}, dtype=np.float32)
        norm2 = b.op("ReduceSumSquare", [x32, axis1], "norm2", {"keepdims": 0})
        norm2 = b.op("Max", [norm2, b.const("norm2_min", np.array(1e-30, dtype=np.float32))], "norm2_floor")
        inv = b.op("Reciprocal", [norm2], "inv_norm2")
        inv_sum = b.op("ReduceSum", [inv], "inv_norm_sum", {"keepdims": 0}, dtype=np.float32)
        ratio = b.op("Div", [b.op("Mul", [token, token], "tokmax2"), norm2], "max_ratio")
        ratio_sum = b.op("ReduceSum", [ratio], "max_ratio_sum", {"keepdims": 0}, dtype=np.float32)
        # |x_t|^2 against fixed edges 2^-30 .. 2^30: how many tokens lie at or below each edge, and
        # sum 1 / |x_t|^2 over those above it (a static step that rounds a whole token to zero costs
        # that token its own signal, no more: classify.py caps each token's relative noise at 1)
        edges = b.const("norm_edges", np.array(NORM_EDGES, dtype=np.float32)[None, :])
        unsq = b.const("unsqueeze_axis1", np.array([1], dtype=np.int64))
        above = b.op("Greater", [b.op("Unsqueeze", [norm2, unsq], "norm2_col"), edges], "above")
        above_f = b.op("Cast", [above], "above_f", {"to": 1})
        inv_above = b.op("Mul", [above_f, b.op("Unsqueeze", [inv, unsq], "inv_col")], "inv_above")
        count_above = b.op("ReduceSum", [above_f, axis0], "count_above", {"keepdims": 0}, dtype=np.float32,
                           shape=[len(NORM_EDGES)])
        inv_above_sum = b.op("ReduceSum", [inv_above, axis0], "inv_above_sum", {"keepdims": 0}, dtype=np.float32,
                             shape=[len(NORM_EDGES)])
        outputs += [energy, inv_sum, ratio_sum, count_above, inv_above_sum]
        observed.sums.update(count_above=count_above.name, inv_above=inv_above_sum.name, token_max=energy.name,
                             inv_norm=inv_sum.name, max_ratio=ratio_sum.name)
    return outputs


# _summed_in_float32: sums over a batch's tokens (X^T X, its diagonal, the token norms) are taken in float32
# whatever the activation type. In float16 they overflow: a channel of magnitude 100 over 2048 tokens sums
# to 2e7 (fp16's maximum is 65504), and LLaMA-family models carry channels of 1000 and more at
# down_proj's input; below that, fp16's rounding of each entry (1e-3) leaves X^T X indefinite. The price
# is a float32 [K, K] per batch instead of a float16 one (7B down_proj: 484 MB instead of 242 MB).


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
