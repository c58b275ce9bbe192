"""A LayerNorm -> {q, gate, up} -> SwiGLU -> down block (a LLaMA MLP beside one attention input), built with
onnx.helper only, and a float64 numpy forward of it. `outlier` makes a few up/gate columns read x's
channel 5 strongly; swiglu_feeds(outlier_token=True) makes channel 5 massive on the first token of every
sequence, so down_proj's input reaches hundreds to thousands on those tokens only (the token-specific
"massive activations" of LLMs)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

K, F, NQ = 64, 96, 48


def swiglu_block(rng: np.random.Generator, gamma_scale: float = 3.0, outlier: float = 0.0, salient: float = 1.0):
    w = {"gamma": (gamma_scale * (0.5 + rng.random(K))).astype(np.float32),
         "beta": (0.1 * rng.standard_normal(K)).astype(np.float32),
         "Wq": (rng.standard_normal((K, NQ)) * 0.2).astype(np.float32),
         "Wg": (rng.standard_normal((K, F)) * 0.2).astype(np.float32),
         "Wu": (rng.standard_normal((K, F)) * 0.2).astype(np.float32),
         "Wd": (rng.standard_normal((F, K)) * 0.2).astype(np.float32)}
    w["gamma"][[1, 2, 3]] *= salient      # a few salient channels (AWQ's premise)
    if outlier:
        w["Wg"][5, [3, 7]] = 1.0
        w["Wu"][5, [3, 7]] = outlier
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["n", "Wg"], ["g"], name="gate_proj"),
             helper.make_node("MatMul", ["n", "Wu"], ["u"], name="up_proj"),
             helper.make_node("Sigmoid", ["g"], ["gs"]),
             helper.make_node("Mul", ["g", "gs"], ["ga"]),
             helper.make_node("Mul", ["ga", "u"], ["p"]),
             helper.make_node("MatMul", ["p", "Wd"], ["d"], name="down_proj")]
    graph = helper.make_graph(
        nodes, "swiglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "seq", NQ]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, ["batch", "seq", K])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def swiglu_feeds(rng: np.random.Generator, batches: int, outlier_token: bool = False, batch: int = 2, seq: int = 16):
    out = []
    for _ in range(batches):
        x = rng.standard_normal((batch, seq, K)).astype(np.float32)
        x[..., 9] *= 4.0                  # an ordinary outlier channel
        if outlier_token:
            x[:, 0, 5] = 60.0             # the massive token: after LayerNorm its channel 5 is about sqrt(K)
        out.append({"x": x})
    return out


def forward(w: dict, x: np.ndarray) -> dict:
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    n = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w["gamma"] + w["beta"]
    g, u = n @ w["Wg"], n @ w["Wu"]
    p = g / (1 + np.exp(-g)) * u
    return {"n": n, "p": p, "q": n @ w["Wq"], "d": p @ w["Wd"]}
