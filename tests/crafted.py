"""Small hand-built ONNX graphs with known structure, and an independent numpy reference of FPTQ.

Nothing here imports fptq_graph: the reference re-derives LayerNorm, the LAE scale, group-wise
INT4 and int8 fake quantization from the formulas in docs/FPTQ.md, in float64 unless stated.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K = 64          # channels of x (LayerNorm width)
K2 = 40         # channels of u (not a multiple of 32 nor of the default group)
N_B = 24        # odd-ish output width of the sibling that is not on the residual path
N_C = 30


def save(model: onnx.ModelProto, path) -> str:
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def ln_block(gamma_scale: float, rng: np.random.Generator, u_scale: float = 1.0, r_gain: float = 1.0) -> tuple[onnx.ModelProto, dict]:
    """x -> LayerNorm -> {a = y@W1, b = y@W2}; r = y + a (a residual: LN feeds a non-linear);
    h = r@W3 (no producer); c = (u_scale*u)@W4 (a plain input). Outputs h, b, c.

    gamma_scale sets the LN output range, hence the band of W1/W2; r_gain scales W1 (so r's range).
    """
    w = {
        "W1": (rng.standard_normal((K, K)) * 0.2 * r_gain).astype(np.float32),
        "W2": (rng.standard_normal((K, N_B)) * 0.2).astype(np.float32),
        "W3": (rng.standard_normal((K, K)) * 0.2).astype(np.float32),
        "W4": (rng.standard_normal((K2, N_C)) * 0.2).astype(np.float32),
        "gamma": (gamma_scale * (0.5 + rng.random(K))).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(K)).astype(np.float32),
        "u_scale": np.array(u_scale, dtype=np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["y", "W1"], ["a"], name="lin_a"),
        helper.make_node("MatMul", ["y", "W2"], ["b"], name="lin_b"),
        helper.make_node("Add", ["y", "a"], ["r"], name="residual"),
        helper.make_node("MatMul", ["r", "W3"], ["h"], name="lin_h"),
        helper.make_node("Mul", ["u", "u_scale"], ["us"], name="scale_u"),
        helper.make_node("MatMul", ["us", "W4"], ["c"], name="lin_c"),
    ]
    graph = helper.make_graph(
        nodes, "ln_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, ["batch", "seq", K2])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", K]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq", N_B]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", "seq", N_C])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def feeds(rng: np.random.Generator, batches: int, batch: int = 2, seq: int = 8) -> list[dict]:
    out = []
    for _ in range(batches):
        x = rng.standard_normal((batch, seq, K)).astype(np.float32)
        x[..., 3] *= 8.0   # an outlier channel, as in real transformers
        out.append({"x": x, "u": rng.standard_normal((batch, seq, K2)).astype(np.float32)})
    return out


# ---- independent numpy reference -------------------------------------------------------------

def layer_norm(x, gamma, beta, eps=1e-5):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def float_forward(w: dict, x, u) -> dict:
    y = layer_norm(x, w["gamma"], w["beta"])
    a = y @ w["W1"]
    r = y + a
    return {"y": y, "r": r, "us": u.astype(np.float64) * w["u_scale"],
            "h": r @ w["W3"], "b": y @ w["W2"], "c": (u * w["u_scale"]).astype(np.float64) @ w["W4"]}


def ref_lae_scale(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m > 0, m / np.log2(2.0 + m), 1.0)


def ref_int4(w, group, symmetric=True):
    """Dequantized group-wise INT4 of a [K, N] weight, groups along K, last group partial."""
    w = np.asarray(w, dtype=np.float64)
    out = np.empty_like(w)
    for start in range(0, w.shape[0], group):
        block = w[start:start + group]
        if symmetric:
            # the largest-magnitude weight of each column maps to code -8
            extreme = block[np.abs(block).argmax(0), np.arange(block.shape[1])]
            scale = extreme / -8.0
            scale[scale == 0] = 1.0
            out[start:start + group] = np.clip(np.round(block / scale), -8, 7) * scale
        else:
            lo, hi = np.minimum(block.min(0), 0), np.maximum(block.max(0), 0)
            scale = (hi - lo) / 15.0
            scale[scale == 0] = 1.0
            zp = np.clip(np.round(-lo / scale), 0, 15)
            out[start:start + group] = (np.clip(np.round(block / scale) + zp, 0, 15) - zp) * scale
    return out


def fake_quant_static(x, scale):
    x32 = np.asarray(x, dtype=np.float32)
    return np.clip(np.round(x32 / np.float32(scale)), -128, 127).astype(np.float64) * np.float32(scale)


def fake_quant_per_token(x):
    x32 = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(x32).max(-1, keepdims=True) / np.float32(127.0), np.float32(1e-12))
    return np.clip(np.round(x32 / scale), -128, 127).astype(np.float64) * scale


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def ref_smoothquant_scale(act_max, weight_row_max, alpha):
    return np.power(np.asarray(act_max, np.float64), alpha) / np.power(np.asarray(weight_row_max, np.float64), 1 - alpha)


def numpy_maxima(w, calib):
    """Per-linear-input max|X| over the calibration feeds, from the float64 numpy forward."""
    acc = {}
    for f in calib:
        fw = float_forward(w, f["x"], f["u"])
        for key in ("y", "r", "us"):
            m = np.abs(fw[key]).reshape(-1, fw[key].shape[-1]).max(0)
            acc[key] = m if key not in acc else np.maximum(acc[key], m)
    return acc
