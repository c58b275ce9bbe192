"""Reading ONNX models: every way a file can fail to be one becomes one ModelLoadError naming the file.

What loads is what onnx.checker accepts, or (for ops ONNX does not define: ONNX Runtime's contrib ops,
our fptq::W4A8MatMul) what ONNX Runtime builds a session for. A split load maps the weights read-only
from the file (ir/split_model.py) and keeps only the structure in memory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from fptq_graph.errors import ModelLoadError, first_line
from fptq_graph.ir.bodies import proto_nodes
from fptq_graph.ir.split_model import PROTOBUF_LIMIT, SplitModel, is_in_memory, open_split, proto_payload_bytes, split_proto


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Reads an ONNX file (external data included) or raises ModelLoadError naming the file.
    Validated as validate_model says: what onnx.checker or ONNX Runtime accepts loads."""
    path = Path(path)
    model = _read(path, lambda: onnx.load(str(path), load_external_data=True))
    _check(path, lambda: model if proto_payload_bytes(model) < PROTOBUF_LIMIT else str(path), lambda: model, lambda: str(path))
    _fill_kv_shapes(model, path)
    return model


def load_split(path: str | os.PathLike) -> SplitModel:
    """Like load_model, but the weights stay in the file, mapped read-only (see split_model)."""
    path = Path(path)
    model = _read(path, lambda: open_split(path))
    _check(path, lambda: _checkable(model.proto), lambda: model.proto, lambda: model)
    _fill_kv_shapes(model.proto, path)
    return model


def _read(path: Path, read):
    """`read()`, with every way a file can fail to be an ONNX model turned into one ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty, not an ONNX model")
    try:
        model = read()
    except (DecodeError, RuntimeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    except (FileNotFoundError, KeyError) as exc:
        raise ModelLoadError(f"{path}: external data file missing ({first_line(exc)})") from None
    proto = model.proto if isinstance(model, SplitModel) else model
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    return model


def validate_model(model: onnx.ModelProto | SplitModel | str | os.PathLike, name: str | None = None) -> str:
    """Checks that a model is one ONNX Runtime or ONNX accepts; returns which did ("onnx.checker" or
    "onnxruntime"), or raises ModelLoadError with one line naming `name` (default: the path) and the problem.

    onnx.checker decides where ONNX defines every op the model uses. Where it does not (ONNX Runtime's
    contrib ops: SimplifiedLayerNormalization in the default domain, com.microsoft's GroupQueryAttention,
    SkipSimplifiedLayerNormalization, ...) the checker refuses or cannot look inside, and the model is
    accepted if ONNX Runtime builds a CPU session for it (graph optimizations off; a SplitModel's arrays
    are handed over in place, as runtime.session does, so the weights are not copied). A model either
    accepts is never refused. The same function serves outputs: `validate_model(split, str(path))`.
    """
    if isinstance(model, SplitModel):
        label, proto, checkable, runnable = "<in-memory model>", lambda: model.proto, lambda: _checkable(model.proto), lambda: model
    elif isinstance(model, onnx.ModelProto):
        big = proto_payload_bytes(model) >= PROTOBUF_LIMIT   # the checker's and ORT's in-memory forms stop at 2 GiB
        label, proto = "<in-memory model>", lambda: model
        checkable = (lambda: _checkable(split_proto(model).proto)) if big else (lambda: model)
        runnable = (lambda: split_proto(model)) if big else (lambda: model)
    else:   # a file: read as load_split reads it (weights mapped, not copied)
        path = Path(model)
        split = _read(path, lambda: open_split(path))
        return _check(Path(name or path), lambda: _checkable(split.proto), lambda: split.proto, lambda: split)
    return _check(Path(name or label), checkable, proto, runnable)


def _check(path: Path, checkable, proto, runnable) -> str:
    """onnx.checker where ONNX defines every op (ONNX Runtime as a fallback when it refuses); ONNX Runtime
    where it does not (the checker refuses such ops in the default domain and passes other domains' ops
    unseen). `checkable`, `proto` (the structure) and `runnable` are called only when needed."""
    undefined = undefined_ops(proto())
    if undefined:
        ort_problem = _ort_problem(runnable())
        if ort_problem is None:
            return "onnxruntime"
        ops = ", ".join(undefined[:4]) + (", ..." if len(undefined) > 4 else "")
        raise ModelLoadError(f"{path}: not a model ONNX Runtime can load ({ort_problem}); it uses ops ONNX does not "
                             f"define ({ops}), which onnx.checker cannot vouch for") from None
    try:
        onnx.checker.check_model(checkable())
        return "onnx.checker"
    except onnx.checker.ValidationError as exc:
        checker_problem = first_line(exc)
    ort_problem = _ort_problem(runnable())
    if ort_problem is None:
        return "onnxruntime"
    raise ModelLoadError(f"{path}: invalid ONNX model ({checker_problem}); ONNX Runtime cannot load it either "
                         f"({ort_problem})") from None


def undefined_ops(proto: onnx.ModelProto) -> list[str]:
    """The ops of `proto` (its main graph, subgraphs and functions) that ONNX has no schema for, as
    "Op" (default domain) or "domain::Op": ONNX Runtime's contrib ops, other runtimes' custom ops."""
    from fptq_graph.runtime import w4a8_op  # noqa: F401  (registers fptq::W4A8MatMul's schema: our own op is defined)

    local = {(f.domain, f.name) for f in proto.functions}
    found: set[str] = set()

    for node in proto_nodes([*proto.graph.node, *(n for f in proto.functions for n in f.node)]):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (node.domain, node.op_type) not in local and not onnx.defs.has(node.op_type, domain):
            found.add(f"{domain}::{node.op_type}" if domain else node.op_type)
    return sorted(found)


def _ort_problem(runnable) -> str | None:
    """None if ONNX Runtime builds a CPU session for `runnable` (a SplitModel, ModelProto or path), with
    graph optimizations off and the fptq op library registered; else its error's first line."""
    import onnxruntime as ort

    from fptq_graph.runtime import sessions as runtime

    options = runtime.session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(runnable, SplitModel):
            # runtime's in-place sessions run the structure as IR version 10 (as we write it): ask about
            # the model's own IR version and opsets on a one-node model first.
            ort.InferenceSession(_header_probe(runnable.proto).SerializeToString(), options, providers=providers)
            runtime.split_session(runnable, options, providers)   # arrays in place; optimizations off
        else:
            source = runnable.SerializeToString() if isinstance(runnable, onnx.ModelProto) else str(runnable)
            ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises Fail, InvalidGraph, InvalidArgument, NotImplemented, RuntimeError, ...
        text = first_line(exc)
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
        text = re.sub(r"^Load model from \S+ failed:\s*", "", text)
        return _without_source_location(text).strip() or type(exc).__name__
    return None


def _checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The structure with its IN_MEMORY tensors declared as graph inputs: onnx.checker looks for an
    external-data file that does not exist, while the arrays were already read from the file."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    held = [init for init in out.graph.initializer if is_in_memory(init)]
    kept = [init for init in out.graph.initializer if not is_in_memory(init)]
    out.graph.input.extend(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)) for init in held)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _without_source_location(text: str) -> str:
    """ONNX Runtime's message without its "/onnxruntime_src/x.cc:256 ns::Fn(args...) " prefix."""
    match = re.match(r"^\S+\.(?:cc|cpp|h):\d+ [\w:~<>]+\(", text)
    if not match:
        return text
    depth, i = 1, match.end()
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[i:].lstrip() if depth == 0 else text


def _header_probe(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A one-Identity model with `proto`'s IR version and opset imports."""
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))
    probe.ir_version = proto.ir_version
    return probe


def _fill_kv_shapes(proto: onnx.ModelProto, path: Path) -> None:
    """Fixes the kv_heads and head_dim of KV-cache inputs that another exporter left symbolic, from the
    graph or a config beside the file (exporters.kv_layout): calibration feeds an empty past of them."""
    from fptq_graph.exporters.kv_layout import fill_past_shapes

    fill_past_shapes(proto, path)
