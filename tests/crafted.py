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


# ---- other exporters' forms: ONNX Runtime contrib norms, GenAI builder decoders, optimum RMSNorm ----

MS = "com.microsoft"
NORM_FORMS = {   # op -> (domain, opset, has a skip input, has beta)
    "LayerNormalization": ("", 21, False, True),
    "RMSNormalization": ("", 23, False, False),
    "SimplifiedLayerNormalization": ("", 21, False, False),
    "SkipSimplifiedLayerNormalization": (MS, 21, True, False),
    "SkipLayerNormalization": (MS, 21, True, True),
}


def norm_block(op: str, rng: np.random.Generator, gamma_scale: float = 12.0, k: int = K) -> tuple[onnx.ModelProto, dict]:
    """x (+ skip + bias) -> `op` -> n -> {a = n@W1, b = n@W2} (siblings). Outputs a, b and, for the Skip
    forms, their output 3 `r`: the residual sum x + skip + bias, which feeds the next block in a decoder.
    The Skip forms carry a bias (input 3 of SkipSimplifiedLayerNormalization, 4 of SkipLayerNormalization),
    so a fold that touched anything but the gain and beta would change r."""
    domain, opset, skip, has_beta = NORM_FORMS[op]
    w = {"gamma": (gamma_scale * (0.5 + rng.random(k))).astype(np.float32),
         "W1": (rng.standard_normal((k, 48)) * 0.2).astype(np.float32),
         "W2": (rng.standard_normal((k, 40)) * 0.2).astype(np.float32)}
    if has_beta:
        w["beta"] = (0.5 * rng.standard_normal(k)).astype(np.float32)
    if skip:
        w["bias"] = (0.3 * rng.standard_normal(k)).astype(np.float32)
    attrs = {"epsilon": 1e-5} if domain == MS else {"axis": -1, "epsilon": 1e-5}
    if op == "SkipSimplifiedLayerNormalization":
        inputs, outputs = ["x", "skip", "gamma", "bias"], ["n", "", "", "r"]
    elif op == "SkipLayerNormalization":
        inputs, outputs = ["x", "skip", "gamma", "beta", "bias"], ["n", "", "", "r"]
    else:
        inputs, outputs = ["x", "gamma"] + (["beta"] if has_beta else []), ["n"]
    if op == "SimplifiedLayerNormalization":
        attrs["stash_type"] = 1
    nodes = [helper.make_node(op, inputs, outputs, name="norm", domain=domain, **attrs),
             helper.make_node("MatMul", ["n", "W1"], ["a"], name="lin_a"),
             helper.make_node("MatMul", ["n", "W2"], ["b"], name="lin_b")]
    shape = ["batch", "seq", k]
    graph = helper.make_graph(
        nodes, f"{op}_block",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in (["x", "skip"] if skip else ["x"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", 48]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq", 40])]
        + ([helper.make_tensor_value_info("r", TensorProto.FLOAT, shape)] if skip else []),
        [numpy_helper.from_array(v, name) for name, v in w.items()])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if domain == MS else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model, w


def norm_feeds(op: str, rng: np.random.Generator, batches: int, k: int = K) -> list[dict]:
    out = []
    for _ in range(batches):
        x = rng.standard_normal((2, 8, k)).astype(np.float32)
        x[..., 5] *= 6.0   # an outlier channel
        feed = {"x": x}
        if NORM_FORMS[op][2]:
            feed["skip"] = rng.standard_normal((2, 8, k)).astype(np.float32)
        out.append(feed)
    return out


def ref_norm(op: str, w: dict, feed: dict, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray | None]:
    """(normalized output, residual sum or None) in float64, from the contrib ops' definitions."""
    x = feed["x"].astype(np.float64)
    r = None
    if NORM_FORMS[op][2]:
        r = x + feed["skip"].astype(np.float64) + w["bias"]
        x = r
    if op in ("LayerNormalization", "SkipLayerNormalization"):
        return layer_norm(x, w["gamma"], w["beta"], eps), r
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w["gamma"], r


# GenAI-builder-style decoder: sizes (kv heads 3, as the model)
B_VOCAB, B_HIDDEN, B_HEADS, B_KV_HEADS, B_HEAD_DIM, B_FFN = 64, 96, 6, 3, 16, 128


def builder_decoder(rng: np.random.Generator, gamma_scale: float = 6.0) -> tuple[onnx.ModelProto, dict]:
    """One decoder layer the way ONNX Runtime GenAI's model builder writes it (opset 21 + com.microsoft):

        x = Gather(embed, input_ids); p = Gather(positions, position_ids)
        n0, _, _, r0 = SkipSimplifiedLayerNormalization(x, p, g0, bias0)       r0: graph output 'residual.0'
        qkv = MatMul(n0, Wqkv)                  one fused QKV linear
        attn, present.0.key, present.0.value = GroupQueryAttention(qkv, past_key_values.0.key/value, ...)
        o = MatMul(attn, Wo)
        n1, _, _, r1 = SkipSimplifiedLayerNormalization(o, r0, g1)
        d = MatMul(SiLU(n1 @ Wgate) * (n1 @ Wup), Wdown)
        nf = SimplifiedLayerNormalization(d + r1, gf)                            default domain, as ORT runs it
        logits = MatMul(nf, Wlm)

    Past inputs are [batch_size, 3, past_sequence_length, head_size] with head_size symbolic, as are
    the presents: head_dim is only told by GroupQueryAttention's heads and the QKV weight's width.
    """
    h, q, kv = B_HIDDEN, B_HEADS * B_HEAD_DIM, B_KV_HEADS * B_HEAD_DIM
    w = {
        "embed": rng.standard_normal((B_VOCAB, h)).astype(np.float32),
        "positions": (0.5 * rng.standard_normal((64, h))).astype(np.float32),
        "g0": (gamma_scale * (0.5 + rng.random(h))).astype(np.float32),
        "bias0": (0.2 * rng.standard_normal(h)).astype(np.float32),
        "Wqkv": (rng.standard_normal((h, q + 2 * kv)) * 0.1).astype(np.float32),
        "Wo": (rng.standard_normal((q, h)) * 0.1).astype(np.float32),
        "g1": (gamma_scale * (0.5 + rng.random(h))).astype(np.float32),
        "Wgate": (rng.standard_normal((h, B_FFN)) * 0.1).astype(np.float32),
        "Wup": (rng.standard_normal((h, B_FFN)) * 0.1).astype(np.float32),
        "Wdown": (rng.standard_normal((B_FFN, h)) * 0.1).astype(np.float32),
        "gf": (gamma_scale * (0.5 + rng.random(h))).astype(np.float32),
        "Wlm": (rng.standard_normal((h, B_VOCAB)) * 0.1).astype(np.float32),
        "one": np.array([1], np.int64), "axis1": np.array([1], np.int64), "idx1": np.array(1, np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="embed_tokens"),
        helper.make_node("Gather", ["positions", "position_ids"], ["p"], name="embed_positions"),
        helper.make_node("SkipSimplifiedLayerNormalization", ["x", "p", "g0", "bias0"], ["n0", "", "", "residual.0"],
                         name="layers.0.input_layernorm", domain=MS, epsilon=1e-6),
        helper.make_node("MatMul", ["n0", "Wqkv"], ["qkv"], name="layers.0.attn.qkv_proj"),
        # seqlens_k and total_sequence_length from the mask, as the builder computes them
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["mask_sum_1"]),
        helper.make_node("Cast", ["mask_sum_1"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "idx1"], ["total_len64"], axis=0),
        helper.make_node("Cast", ["total_len64"], ["total_seq_len"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value",
                                                 "seqlens_k", "total_seq_len"],
                         ["attn", "present.0.key", "present.0.value"], name="layers.0.attn.GroupQueryAttention",
                         domain=MS, num_heads=B_HEADS, kv_num_heads=B_KV_HEADS),
        helper.make_node("MatMul", ["attn", "Wo"], ["o"], name="layers.0.attn.o_proj"),
        helper.make_node("SkipSimplifiedLayerNormalization", ["o", "residual.0", "g1"], ["n1", "", "", "r1"],
                         name="layers.0.post_attention_layernorm", domain=MS, epsilon=1e-6),
        helper.make_node("MatMul", ["n1", "Wgate"], ["gate"], name="layers.0.mlp.gate_proj"),
        helper.make_node("MatMul", ["n1", "Wup"], ["up"], name="layers.0.mlp.up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["gate_sig"]),
        helper.make_node("Mul", ["gate", "gate_sig"], ["gate_act"]),
        helper.make_node("Mul", ["gate_act", "up"], ["ffn"]),
        helper.make_node("MatMul", ["ffn", "Wdown"], ["d"], name="layers.0.mlp.down_proj"),
        helper.make_node("Add", ["d", "r1"], ["r2"]),
        helper.make_node("SimplifiedLayerNormalization", ["r2", "gf"], ["nf"], name="norm", axis=-1, epsilon=1e-6,
                         stash_type=1),
        helper.make_node("MatMul", ["nf", "Wlm"], ["logits"], name="lm_head"),
    ]
    past = ["batch_size", B_KV_HEADS, "past_sequence_length", "head_size"]
    present = ["batch_size", B_KV_HEADS, "total_sequence_length", "head_size"]
    graph = helper.make_graph(
        nodes, "builder_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past),
         helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, past)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", B_VOCAB]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, present),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, present),
         helper.make_tensor_value_info("residual.0", TensorProto.FLOAT, ["batch_size", "sequence_length", h])],
        [numpy_helper.from_array(v, name) for name, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model, w


def builder_feeds(rng: np.random.Generator, batch: int = 2, seq: int = 8, past: int = 0) -> dict:
    """A prompt step (past 0) or a later step of builder_decoder."""
    shape = (batch, B_KV_HEADS, past, B_HEAD_DIM)
    return {"input_ids": rng.integers(0, B_VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, past + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64),
            "past_key_values.0.key": rng.standard_normal(shape).astype(np.float32),
            "past_key_values.0.value": rng.standard_normal(shape).astype(np.float32)}


def optimum_rmsnorm(rng: np.random.Generator, form: str = "reciprocal", dtype=np.float16,
                    gamma_scale: float = 12.0) -> tuple[onnx.ModelProto, dict]:
    """LLaMA's RMSNorm as optimum exports it in fp16: statistics in float32 between two Casts, then the
    gain Mul in fp16, feeding q/k/v siblings:
        xf = Cast(x, float); v = ReduceMean(Pow(xf, 2)); r = Sqrt(v + eps)
        y = xf * Reciprocal(r)   (form "reciprocal")  |  xf / r   (form "div")
        out = gain * Cast(y, fp16);  q = out @ Wq, k = out @ Wk, v = out @ Wv
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = {"gain": (gamma_scale * (0.5 + rng.random(K))).astype(dtype),
         "Wq": (rng.standard_normal((K, 32)) * 0.2).astype(dtype),
         "Wk": (rng.standard_normal((K, 16)) * 0.2).astype(dtype),
         "Wv": (rng.standard_normal((K, 16)) * 0.2).astype(dtype),
         "two": np.array(2.0, np.float32), "eps": np.array(1e-6, np.float32), "axes": np.array([-1], np.int64)}
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Pow", ["xf", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["var_eps"]),
             helper.make_node("Sqrt", ["var_eps"], ["rms"])]
    if form == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["xf", "inv"], ["y"])]
    else:
        nodes += [helper.make_node("Div", ["xf", "rms"], ["y"])]
    nodes += [helper.make_node("Cast", ["y"], ["y16"], to=elem),
              helper.make_node("Mul", ["gain", "y16"], ["normed"], name="input_layernorm.mul"),
              helper.make_node("MatMul", ["normed", "Wq"], ["q"], name="q_proj"),
              helper.make_node("MatMul", ["normed", "Wk"], ["k"], name="k_proj"),
              helper.make_node("MatMul", ["normed", "Wv"], ["v"], name="v_proj")]
    graph = helper.make_graph(
        nodes, "optimum_rmsnorm", [helper.make_tensor_value_info("x", elem, ["batch", "seq", K])],
        [helper.make_tensor_value_info(n, elem, ["batch", "seq", d]) for n, d in (("q", 32), ("k", 16), ("v", 16))],
        [numpy_helper.from_array(v, name) for name, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w


def ref_rmsnorm(x, gain, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(gain, np.float64)


def ort_requantize(xq: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits at accuracy_level 4 multiplies: each block of `block` values along K quantized again to
    symmetric int8 as its kernel does in float32: q = round_half_even(x * (127 / max|x|)), scale max|x| / 127
    (x * 127 / max|x|, or x / scale, flip a few .5 roundings: 7e-4 off instead of 2e-7)."""
    x = np.asarray(xq, np.float32)
    k = x.shape[-1]
    pad = -k % block   # a last partial block: zeros change no block's max
    x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), np.float32)], axis=-1)
    a = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = np.abs(a).max(-1, keepdims=True)
    safe = np.where(amax > 0, amax, np.float32(1))
    q = np.rint(a * (np.float32(127) / safe))
    return (q * (amax / np.float32(127))).reshape(x.shape)[..., :k].astype(np.float64)
