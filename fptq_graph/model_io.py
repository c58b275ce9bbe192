"""Loading and saving ONNX models: clear errors in, atomic writes out.

Every model we write gets IR version 10: onnx 1.23 writes 14 by default and onnxruntime 1.31
refuses it. Outputs are written to a temporary name in the target directory and renamed into
place, so an interrupted run never leaves a partial file under the requested name.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import copy

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import FptqError, ModelLoadError
from .split_model import SplitModel, export_split, is_in_memory, open_split, write_external, write_inline

IR_VERSION = 10
MIN_OPSET = 21
# protobuf cannot serialize a message of 2 GiB or more; stay clear of it with some headroom.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Reads an ONNX file (external data included) or raises ModelLoadError naming the file."""
    path = Path(path)
    model = _read(path, lambda: onnx.load(str(path), load_external_data=True))
    _check(path, lambda: model if _payload_bytes(model) < PROTOBUF_LIMIT else str(path))
    return model


def load_split(path: str | os.PathLike) -> SplitModel:
    """Like load_model, but the weights stay in the file, mapped read-only (see split_model)."""
    path = Path(path)
    model = _read(path, lambda: open_split(path))
    _check(path, lambda: _checkable(model.proto))
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


def _check(path: Path, checkable) -> None:
    try:
        onnx.checker.check_model(checkable())
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


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
    """Export the graph with the original's metadata, opset >= 21 and IR version 10."""
    return finish_split(graph, original).full()


def finish_split(graph: gs.Graph, original: onnx.ModelProto) -> SplitModel:
    """finish_model, with the large tensors left in arrays shared with the graph (no copy)."""
    split = export_split(graph)
    out = split.proto
    out.ir_version = IR_VERSION
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, MIN_OPSET)
    imported = {opset.domain for opset in out.opset_import}
    for domain in sorted({node.domain for node in out.graph.node if node.domain} - imported - {"ai.onnx"}):
        out.opset_import.append(onnx.helper.make_opsetid(domain, 1))   # our own op's domain, fptq
    del out.metadata_props[:]
    out.metadata_props.extend(copy.deepcopy(original.metadata_props))
    from . import __version__

    out.producer_name, out.producer_version = "fptq-graph", __version__
    return split


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
