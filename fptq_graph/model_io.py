"""Loading and saving ONNX models: clear errors in, atomic writes out.

Every model we write gets IR version 10: onnx 1.23 writes 14 by default and onnxruntime 1.31
refuses it. Outputs are written to a temporary name in the target directory and renamed into
place, so an interrupted run never leaves a partial file under the requested name.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import copy

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import FptqError, ModelLoadError
from .split_model import SplitModel, export_split, is_in_memory, open_split, split_proto, write_external, write_inline

IR_VERSION = 10
MIN_OPSET = 21
# protobuf cannot serialize a message of 2 GiB or more; stay clear of it with some headroom.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Reads an ONNX file (external data included) or raises ModelLoadError naming the file.
    Validated as validate_model says: what onnx.checker or ONNX Runtime accepts loads."""
    path = Path(path)
    model = _read(path, lambda: onnx.load(str(path), load_external_data=True))
    _check(path, lambda: model if _payload_bytes(model) < PROTOBUF_LIMIT else str(path), lambda: model, lambda: str(path))
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
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    except (FileNotFoundError, KeyError) as exc:
        raise ModelLoadError(f"{path}: external data file missing ({_first_line(exc)})") from None
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
        big = _payload_bytes(model) >= PROTOBUF_LIMIT   # the checker's and ORT's in-memory forms stop at 2 GiB
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
        checker_problem = _first_line(exc)
    ort_problem = _ort_problem(runnable())
    if ort_problem is None:
        return "onnxruntime"
    raise ModelLoadError(f"{path}: invalid ONNX model ({checker_problem}); ONNX Runtime cannot load it either "
                         f"({ort_problem})") from None


def undefined_ops(proto: onnx.ModelProto) -> list[str]:
    """The ops of `proto` (its main graph, subgraphs and functions) that ONNX has no schema for, as
    "Op" (default domain) or "domain::Op": ONNX Runtime's contrib ops, other runtimes' custom ops."""
    from . import w4a8_op  # noqa: F401  (registers fptq::W4A8MatMul's schema: our own op is defined)

    local = {(f.domain, f.name) for f in proto.functions}
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            if (node.domain, node.op_type) not in local and not onnx.defs.has(node.op_type, domain):
                found.add(f"{domain}::{node.op_type}" if domain else node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for graph in attr.graphs:
                        visit(graph.node)

    visit(proto.graph.node)
    for function in proto.functions:
        visit(function.node)
    return sorted(found)


def _ort_problem(runnable) -> str | None:
    """None if ONNX Runtime builds a CPU session for `runnable` (a SplitModel, ModelProto or path), with
    graph optimizations off and the fptq op library registered; else its error's first line."""
    import onnxruntime as ort

    from . import runtime

    options = runtime.session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(runnable, SplitModel):
            # runtime's in-place sessions run the structure as IR version 10 (as we write it): ask about
            # the model's own IR version and opsets on a one-node model first.
            ort.InferenceSession(_header_probe(runnable.proto).SerializeToString(), options, providers=providers)
            runtime._split_session(runnable, options, providers)   # arrays in place; optimizations off
        else:
            source = runnable.SerializeToString() if isinstance(runnable, onnx.ModelProto) else str(runnable)
            ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises Fail, InvalidGraph, InvalidArgument, NotImplemented, RuntimeError, ...
        text = _first_line(exc)
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


def save_model(model: onnx.ModelProto | SplitModel, path: str | os.PathLike) -> Path:
    """Writes `model` to `path` atomically; models over the protobuf limit get `<name>.data` beside them.
    A SplitModel's arrays are streamed into the file, never gathered into one message."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FptqError(f"{path}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise FptqError(f"{path}: output directory {directory} is not writable")
    split = isinstance(model, SplitModel)
    (model.proto if split else model).ir_version = IR_VERSION
    external = (model.payload_bytes if split else _payload_bytes(model)) >= PROTOBUF_LIMIT
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=directory))
    try:
        staged = staging / path.name
        if split and external:
            write_external(model, staged, path.name + ".data")
            os.replace(staging / (path.name + ".data"), directory / (path.name + ".data"))
        elif split:
            with open(staged, "wb") as f:
                write_inline(model, f)
        elif external:
            data_name = path.name + ".data"
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(staging / data_name, directory / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def finish_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export the graph with the original's metadata and IR version 10, at the opset it has (never
    relabelled: FptqError if its emitted ops need a newer one, see required_opset and upgrade_opset)."""
    return finish_split(graph, original).full()


def finish_split(graph: gs.Graph, original: onnx.ModelProto) -> SplitModel:
    """finish_model, with the large tensors left in arrays shared with the graph (no copy)."""
    split = export_split(graph)
    out = split.proto
    out.ir_version = IR_VERSION
    # Never relabel an opset without converting: a model's ops mean what its opset says. quantize()
    # converts its input to MIN_OPSET first (upgrade_opset); a graph that reaches here older than what
    # its emitted ops need was not converted, and saying so beats writing a model that lies.
    opset, (need, why) = default_opset(out), required_opset(out)
    if opset < need:
        raise FptqError(f"the quantized graph needs opset {need} ({why}) but the model is at opset {opset}: "
                        f"convert the input first (model_io.upgrade_opset, as quantize() does)")
    imported = {opset.domain for opset in out.opset_import}
    for domain in sorted({node.domain for node in out.graph.node if node.domain} - imported - {"ai.onnx"}):
        out.opset_import.append(onnx.helper.make_opsetid(domain, 1))   # our own op's domain, fptq
    del out.metadata_props[:]
    out.metadata_props.extend(copy.deepcopy(original.metadata_props))
    from . import __version__

    out.producer_name, out.producer_version = "fptq-graph", __version__
    return split


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version; 0 if it imports none."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def required_opset(proto: onnx.ModelProto) -> tuple[int, str]:
    """The lowest default-domain opset the graph's emitted forms need, and why: 21 for 4-bit tensors
    and blocked (block_size) QuantizeLinear/DequantizeLinear; else (0, "")."""
    if any(init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for init in proto.graph.initializer):
        return 21, "INT4/UINT4 weights"
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx") and any(
                a.name == "block_size" and a.i for a in node.attribute):
            return 21, f"blocked {node.op_type}"
    return 0, ""


_KEEP_DOMAIN = "fptq.opset-conversion.keep"   # parks ops ONNX does not define while the converter runs


def upgrade_opset(proto: onnx.ModelProto, target: int = MIN_OPSET, source: str = "<model>") -> onnx.ModelProto:
    """`proto` converted to default-domain opset `target` by onnx.version_converter (a new ModelProto;
    `proto` itself if it is already there). Never a relabel: each op is adapted as ONNX specifies.

    Ops ONNX does not define in the default domain (ONNX Runtime's SimplifiedLayerNormalization, as its
    GenAI builder writes them) have no schema for the converter to adapt, which makes it refuse the
    whole model; they are kept as they are (ONNX Runtime defines them independently of the opset), like
    the ops of other domains (com.microsoft), which the converter leaves alone. A model the converter
    still refuses raises ModelLoadError with one line naming `source`. IN_MEMORY references to a
    SplitModel's arrays pass through unchanged.
    """
    opset = default_opset(proto)
    if opset >= target:
        return proto
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    parked = [node for node in _all_nodes(work.graph)
              if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, "")]
    keys = [(node.name, node.op_type, tuple(node.output)) for node in parked]
    for node in parked:
        node.domain = _KEEP_DOMAIN
    if parked:
        work.opset_import.append(onnx.helper.make_opsetid(_KEEP_DOMAIN, 1))
    try:
        converted = onnx.version_converter.convert_version(work, target)
    except Exception as exc:  # the converter raises several types; all mean the same to the user
        raise ModelLoadError(f"{source}: opset {opset} could not be converted to {target} (the emitted INT4 "
                             f"DequantizeLinear with block_size needs it): {_first_line(exc)}") from None
    back = set(keys)
    for node in _all_nodes(converted.graph):
        if node.domain == _KEEP_DOMAIN and (node.name, node.op_type, tuple(node.output)) in back:
            node.domain = ""
    kept = [o for o in converted.opset_import if o.domain != _KEEP_DOMAIN]
    del converted.opset_import[:]
    converted.opset_import.extend(kept)
    if any(node.domain == _KEEP_DOMAIN for node in _all_nodes(converted.graph)):
        raise ModelLoadError(f"{source}: opset {opset} could not be converted to {target}: the converter "
                             "rewrote an op ONNX does not define")
    return converted


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes a report, page or image to a temp name beside `path`, then renames it into place."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FptqError(f"{path}: output directory {directory} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except PermissionError:
        raise FptqError(f"{path}: output directory {directory} is not writable") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


TOKENIZER_KEY = "fptq_graph.tokenizer"


def get_metadata(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Initializer bytes, counted without serializing (ByteSize fails past 2 GiB)."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.raw_data else 4 * max(
            len(init.float_data), len(init.int32_data), len(init.int64_data) * 2
        )
    return total


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
    from .exporters.kv_layout import fill_past_shapes

    fill_past_shapes(proto, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
