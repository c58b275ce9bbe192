"""Small structural queries over an onnx-graphsurgeon graph, shared by the passes."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

# Normalizations whose output 0 is norm(x) * gain (+ bias): op -> (gain input, bias input or None).
# The Skip forms (ONNX Runtime contrib ops) normalize input + skip (+ bias, their input 3 or 4): their
# output 3, when present, is that residual sum, which a fold into the gain and bias leaves untouched.
NORM_OPS = {"LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1, None), "RMSNormalization": (1, None),
            "SkipSimplifiedLayerNormalization": (2, None), "SkipLayerNormalization": (2, 3)}
# The domains each is defined in: ONNX (LayerNormalization, RMSNormalization from opset 23), ONNX Runtime
# in the default domain (SimplifiedLayerNormalization, as its GenAI builder writes it) or com.microsoft.
NORM_DOMAINS = {"LayerNormalization": ("",), "RMSNormalization": ("",),
                "SimplifiedLayerNormalization": ("", "com.microsoft"),
                "SkipSimplifiedLayerNormalization": ("com.microsoft",), "SkipLayerNormalization": ("com.microsoft",)}
FLOAT_TYPES = {1, 10, 11, 16}   # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a graph constant: an initializer or the output of a Constant node."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None


def norm_inputs(node: gs.Node) -> tuple[int, int | None] | None:
    """(gain input, bias input or None) if `node` is one of NORM_OPS in a domain that defines it, with
    its gain present; a bias input left empty (an omitted optional input) counts as none."""
    if node.op not in NORM_OPS or (node.domain or "").replace("ai.onnx", "") not in NORM_DOMAINS[node.op]:
        return None
    gamma_index, beta_index = NORM_OPS[node.op]
    if len(node.inputs) <= gamma_index or not node.inputs[gamma_index].name:
        return None
    if beta_index is not None and (len(node.inputs) <= beta_index or not node.inputs[beta_index].name):
        beta_index = None
    return gamma_index, beta_index


def is_float_cast(node: gs.Node) -> bool:
    """A Cast from one floating-point type to another (fp16 exports cast around their normalizations)."""
    return node.op == "Cast" and int(node.attrs.get("to", 0)) in FLOAT_TYPES


def is_channel_passthrough(node: gs.Node, k: int) -> bool:
    """Identity, a float-to-float Cast, or a Reshape whose target keeps the last axis at length k (GPT-2's
    view before Gemm)."""
    if node.op == "Identity" or is_float_cast(node):
        return True
    if node.op == "Reshape":
        shape = constant_value(node.inputs[1])
        return shape is not None and shape.ndim == 1 and shape.size >= 1 and int(shape[-1]) == k
    return False


def rms_norm_gain(node: gs.Node, k: int) -> int | None:
    """If `node` is the gain Mul of a decomposed RMSNorm, the index of its gain input.

    The pattern (HF LLaMA through torch.export): y = x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)),
    or with Div / Rsqrt forms, then out = y * gamma. We accept a Mul with a constant of k values along
    its last axis whose other operand reaches a ReduceMean of Pow(., 2) or Mul(a, a) within a few steps.
    Float Casts do not count as steps: optimum's fp16 exports compute the statistics in float32,
    x -> Cast(float) -> Pow/ReduceMean/Add/Sqrt/Reciprocal (or Div)/Mul -> Cast(fp16) -> Mul(gamma).
    """
    if node.op != "Mul":
        return None
    for gain_index in (0, 1):
        gain = constant_value(node.inputs[gain_index])
        if gain is None or gain.ndim < 1 or gain.shape[-1] != k or gain.size != k:
            continue
        if _reaches_mean_square(node.inputs[1 - gain_index], depth=5):
            return gain_index
    return None


def _reaches_mean_square(tensor: gs.Tensor, depth: int) -> bool:
    node = producer(tensor)
    if node is not None and is_float_cast(node):
        return _reaches_mean_square(node.inputs[0], depth)
    if node is None or depth == 0:
        return False
    if node.op == "ReduceMean":
        src = producer(node.inputs[0])
        if src is not None and src.op == "Pow":
            exponent = constant_value(src.inputs[1])
            return exponent is not None and float(np.asarray(exponent).reshape(-1)[0]) == 2.0
        if src is not None and src.op == "Mul":
            return src.inputs[0] is src.inputs[1]
        return False
    return any(_reaches_mean_square(t, depth - 1) for t in node.inputs if isinstance(t, gs.Variable))


def resolve_weight(node: gs.Node) -> tuple[np.ndarray | None, str]:
    """The [K, N] float weight a MatMul/Gemm multiplies by, if it is a constant; else (None, why not).

    Accepts an initializer, a Constant node, a Transpose of either (MatMul), and Gemm with transB and
    alpha. The returned array is what `X @ W` needs: Transpose, transB and alpha are already applied.
    """
    if len(node.inputs) < 2:
        return None, "fewer than two inputs"
    source = node.inputs[1]
    value = constant_value(source)
    note = ""
    if value is None:
        transpose = producer(source)
        if transpose is not None and transpose.op == "Transpose":
            inner = constant_value(transpose.inputs[0])
            perm = transpose.attrs.get("perm")
            if inner is not None and inner.ndim == 2 and (perm is None or list(perm) == [1, 0]):
                value, note = inner.T, "through Transpose"
    if value is None:
        return None, "weight is not a constant"
    if value.ndim != 2:
        return None, f"weight has rank {value.ndim}, not 2"
    if value.dtype.kind != "f":
        return None, f"weight dtype {value.dtype} is not floating point"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None, "Gemm with transA=1"
        if node.attrs.get("transB", 0):
            value, note = value.T, "Gemm transB=1"
        alpha = float(node.attrs.get("alpha", 1.0))
        if alpha != 1.0:
            value, note = value * alpha, (note + f" alpha={alpha}").strip()
        if len(node.inputs) > 2 and float(node.attrs.get("beta", 1.0)) != 1.0 and constant_value(node.inputs[2]) is None:
            return None, "Gemm with beta != 1 on a non-constant bias"
    return value, note
