"""Writing ONNX models: IR version 10, atomic (a temporary name in the target folder, then a rename).

onnx 1.23 writes IR version 14 by default and onnxruntime 1.31 refuses it. An interrupted run never
leaves a partial file under the requested name; several outputs committed together go through
files/run_outputs.py, which stages them with these writers.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from fptq_graph.errors import FptqError
from fptq_graph.ir.opset import IR_VERSION, default_opset, required_opset
from fptq_graph.ir.split_model import (PROTOBUF_LIMIT, SplitModel, export_split, proto_payload_bytes, write_external,
                                       write_inline)


def save_model(model: onnx.ModelProto | SplitModel, path: str | os.PathLike) -> Path:
    """Writes `model` to `path` atomically; models over the protobuf limit get `<name>.data` beside them.
    A SplitModel's arrays are streamed into the file, never gathered into one message."""
    path = Path(path)
    split = isinstance(model, SplitModel)
    (model.proto if split else model).ir_version = IR_VERSION
    external = (model.payload_bytes if split else proto_payload_bytes(model)) >= PROTOBUF_LIMIT
    data_name = path.name + ".data"

    def write(staged: Path) -> list[str]:
        if split and external:
            write_external(model, staged, data_name)
        elif split:
            with open(staged, "wb") as f:
                write_inline(model, f)
        elif external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        return [data_name] if external else []

    return replace_atomically(path, write)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes a report, page or image atomically (replace_atomically)."""
    def write(staged: Path) -> list[str]:
        if isinstance(data, str):
            staged.write_text(data, encoding="utf-8")
        else:
            staged.write_bytes(data)
        return []

    return replace_atomically(Path(path), write)


def replace_atomically(path: Path, write) -> Path:
    """The one way a file reaches its final name: `write(staged)` writes it (and any files beside it,
    whose names it returns) in a staging folder made in the target's own folder; then the companions and
    last the file itself are renamed into place, so an interrupted write never leaves a partial file
    under a requested name. (files/run_outputs.py stages several outputs of one run the same way and
    commits them together.)"""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FptqError(f"{path}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise FptqError(f"{path}: output directory {directory} is not writable")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=directory))
    except PermissionError:
        raise FptqError(f"{path}: output directory {directory} is not writable") from None
    try:
        staged = staging / path.name
        for name in write(staged):
            os.replace(staging / name, directory / name)
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
                        f"convert the input first (ir.opset.upgrade_opset, as quantize() does)")
    imported = {opset.domain for opset in out.opset_import}
    for domain in sorted({node.domain for node in out.graph.node if node.domain} - imported - {"ai.onnx"}):
        out.opset_import.append(onnx.helper.make_opsetid(domain, 1))   # our own op's domain, fptq
    del out.metadata_props[:]
    out.metadata_props.extend(copy.deepcopy(original.metadata_props))
    from fptq_graph import __version__

    out.producer_name, out.producer_version = "fptq-graph", __version__
    return split
