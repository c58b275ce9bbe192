"""The KV-cache layout of any exporter's decoder, read from the graph (no torch needed).

A past input `past_key_values.{i}.key/value` is [batch, kv_heads, past_sequence, head_dim]. Our
exporter fixes kv_heads and head_dim in the declared shape; other exporters leave some of them
symbolic (ONNX Runtime GenAI's builder, optimum), which is enough to run the model but not to build
the empty past that calibration feeds. Where the declared shape leaves them open they are taken, in
this order, from:
  1. the matching present output's declared shape (present.{i}.key, present_key_values.{i}.key);
  2. the attention op reading the past: GroupQueryAttention (com.microsoft; kv_num_heads, and head_dim
     from the query/key projection weight's N: packed QKV N / (num_heads + 2 kv_num_heads), else the
     key projection's N / kv_num_heads), MultiHeadAttention (num_heads) or ONNX Attention (opset 23;
     kv_num_heads);
  3. a Concat that appends the new keys to the past (torch exports): the new keys' shape by ONNX shape
     inference;
  4. genai_config.json or config.json beside the model file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import onnx

PAST = re.compile(r"^past_key_values[._](\d+)[._](key|value)$", re.IGNORECASE)
AXES = {1: "kv_heads", 3: "head_dim"}


def past_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs calibration fills as an empty KV cache (named past_key_values*)."""
    return [v for v in model.graph.input if v.name.lower().startswith("past_key_values")]


def declared_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """A value's declared shape: ints for fixed dims, the dim_param for symbolic ones, None if unnamed."""
    if not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def past_problem(value: onnx.ValueInfoProto) -> str:
    """Empty if `value` is a usable past input [batch, kv_heads, past, head_dim] with kv_heads and head_dim
    fixed; otherwise one line naming the input and the dimension that is wrong."""
    dims = declared_dims(value)
    if len(dims) != 4:
        shown = "no declared shape" if not dims else f"rank {len(dims)} ({_shape_text(dims)})"
        return f"KV cache input '{value.name}' has {shown}, not [batch, kv_heads, past_sequence, head_dim]"
    for axis, what in AXES.items():
        if not isinstance(dims[axis], int) or dims[axis] <= 0:
            return (f"KV cache input '{value.name}' {_shape_text(dims)}: {what} (axis {axis}) is "
                    f"{repr(dims[axis]) if dims[axis] else 'unknown'}, and the model does not tell it (no attention "
                    "op attributes, projection weight, present output or config.json beside the model)")
    return ""


def infer_past_dims(model: onnx.ModelProto, model_path: str | Path | None = None) -> dict[str, dict[int, int]]:
    """{past input name: {axis: size}} for the kv_heads (1) and head_dim (2) axes the declared shape leaves
    open and the model tells (see the module docstring); axes it cannot tell are left out."""
    out: dict[str, dict[int, int]] = {}
    pasts = [v for v in past_inputs(model) if len(declared_dims(v)) in (0, 4)]
    open_axes = {v.name: [a for a in AXES if not _fixed(declared_dims(v), a)] for v in pasts}
    if not any(open_axes.values()):
        return out
    graph = _Graph(model)
    config = None
    cache: dict[str, onnx.ModelProto] = {}

    def concat(name: str) -> dict[int, int]:
        if "inferred" not in cache:
            cache["inferred"] = _shape_inferred(model)
        return _from_concat(cache["inferred"], name)

    for value in pasts:
        wanted = open_axes[value.name]
        if not wanted:
            continue
        found: dict[int, int] = {}
        for source in (lambda: _from_present(model, value.name), lambda: graph.from_attention(value.name),
                       lambda: concat(value.name)):
            try:
                dims = source() or {}
            except Exception:   # a heuristic that does not apply to this graph tells nothing
                dims = {}
            found.update({a: d for a, d in dims.items() if a in wanted and a not in found and d and d > 0})
            if all(a in found for a in wanted):
                break
        if not all(a in found for a in wanted) and model_path is not None:
            config = config if config is not None else _from_config(Path(model_path))
            found.update({a: d for a, d in config.items() if a in wanted and a not in found})
        if found:
            out[value.name] = found
    return out


def fill_past_shapes(model: onnx.ModelProto, model_path: str | Path | None = None) -> dict[str, dict[int, int]]:
    """Writes what infer_past_dims tells into the past inputs' declared shapes (in place: batch and
    past_sequence stay symbolic); returns it. The model computes the same: the sizes are the only
    ones its weights and attention ops accept."""
    found = infer_past_dims(model, model_path)
    for value in model.graph.input:
        if value.name not in found:
            continue
        shape = value.type.tensor_type.shape
        if len(shape.dim) == 0:
            for name in ("batch", None, "past_sequence", None):
                shape.dim.add().dim_param = name or ""
        for axis, size in found[value.name].items():
            shape.dim[axis].Clear()
            shape.dim[axis].dim_value = size
    return found


# ---- sources ---------------------------------------------------------------------------------

def _fixed(dims, axis: int) -> bool:
    return len(dims) == 4 and isinstance(dims[axis], int) and dims[axis] > 0


def _shape_text(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def _present_name(past: str) -> list[str]:
    match = PAST.match(past)
    if not match:
        return []
    i, kind = match.groups()
    return [f"present.{i}.{kind}", f"present_key_values.{i}.{kind}", f"present_{i}_{kind}"]


def _from_present(model: onnx.ModelProto, past: str) -> dict[int, int]:
    names = {n.lower() for n in _present_name(past)}
    for value in model.graph.output:
        if value.name.lower() in names:
            dims = declared_dims(value)
            return {a: dims[a] for a in AXES if _fixed(dims, a)}
    return {}


class _Graph:
    """Producers, consumers and initializer shapes of the main graph (initializer data is never read)."""

    def __init__(self, model: onnx.ModelProto):
        self.producer = {out: node for node in model.graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.init_dims = {i.name: list(i.dims) for i in model.graph.initializer}
        for node in model.graph.node:   # Constant nodes hold weights in some exports
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.init_dims[node.output[0]] = list(attr.t.dims)

    def _through(self, name: str) -> list[onnx.NodeProto]:
        """Consumers of `name`, looking through Identity and Cast."""
        out = []
        for node in self.consumers.get(name, []):
            if node.op_type in ("Identity", "Cast"):
                out += self._through(node.output[0])
            else:
                out.append(node)
        return out

    def projection_n(self, name: str) -> int | None:
        """The output width N of the linear producing `name` (through a bias Add, Identity or Cast)."""
        for _ in range(4):
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
                if node.op_type == "MatMulNBits":
                    return next((a.i for a in node.attribute if a.name == "N"), None)
                dims = self.init_dims.get(node.input[1]) if len(node.input) > 1 else None
                if not dims or len(dims) != 2:
                    return None
                trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                return dims[0] if trans_b else dims[1]
            if node.op_type == "Add":
                name = next((i for i in node.input if i not in self.init_dims), node.input[0])
            elif node.op_type in ("Identity", "Cast"):
                name = node.input[0]
            else:
                return None
        return None

    def from_attention(self, past: str) -> dict[int, int]:
        for node in self._through(past):
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            inputs = list(node.input) + [""] * 8
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
                heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
                if not kv_heads:
                    return {}
                if inputs[1]:
                    n, parts = self.projection_n(inputs[1]), kv_heads
                else:   # packed QKV in the query input
                    n, parts = self.projection_n(inputs[0]), (heads or 0) + 2 * kv_heads
                out = {1: kv_heads}
                if n and parts and n % parts == 0:
                    out[3] = n // parts
                return out
            if node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft":
                heads = attrs.get("num_heads")
                n = self.projection_n(inputs[0])
                out = {1: heads} if heads else {}
                if heads and n and n % heads == 0:
                    out[3] = n // heads
                return out
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                kv_heads, heads = attrs.get("kv_num_heads"), attrs.get("q_num_heads")
                out = {1: kv_heads} if kv_heads else {}
                n = self.projection_n(inputs[1])
                if kv_heads and n and n % kv_heads == 0:
                    out[3] = n // kv_heads
                return out
        return {}


def _shape_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    structure = onnx.ModelProto()
    structure.CopyFrom(model)
    for init in structure.graph.initializer:   # shapes only: weights held elsewhere need not be read
        if init.data_location == onnx.TensorProto.EXTERNAL:
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    return onnx.shape_inference.infer_shapes(structure, strict_mode=False)


def _from_concat(inferred: onnx.ModelProto, past: str) -> dict[int, int]:
    values = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in inferred.graph.node:
        if node.op_type != "Concat" or past not in node.input:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis not in (2, -2):
            continue
        for other in node.input:
            if other != past and other in values:
                dims = declared_dims(values[other])
                found = {a: dims[a] for a in AXES if _fixed(dims, a)}
                if found:
                    return found
    return {}


def _from_config(model_path: Path) -> dict[int, int]:
    folder = model_path.parent
    try:
        genai = folder / "genai_config.json"
        if genai.is_file():
            decoder = json.loads(genai.read_text())["model"]["decoder"]
            out = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
            return {a: int(v) for a, v in out.items() if v}
        config = folder / "config.json"
        if config.is_file():
            cfg = json.loads(config.read_text())
            cfg = cfg.get("text_config", cfg)
            heads = cfg.get("num_attention_heads")
            kv_heads = cfg.get("num_key_value_heads") or heads
            head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
            return {a: int(v) for a, v in {1: kv_heads, 3: head_dim}.items() if v}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}
