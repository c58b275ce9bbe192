"""An ONNX model held as its structure (a small ModelProto) and its large tensors (numpy arrays).

Why: a ModelProto holds every weight in protobuf memory, and each copy, serialization or ONNX Runtime
session made from it holds another. `quantize` instead keeps one float copy of the weights, the
arrays, for the whole run:
- on load, the arrays are memory-mapped read-only from the input file (inline raw data found by
  walking the protobuf encoding, or external data files), so loading costs no copy and the input can
  never be written;
- the structure's large initializers are external-data references whose location is IN_MEMORY;
- sessions hand the arrays to ONNX Runtime without a copy (runtime.session);
- the writer streams them into the output file, inline under 2 GiB, external data above.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fptq_graph.ir.bodies import gs_graphs, needed_nodes
from onnx_graphsurgeon.ir.tensor import LazyValues

from fptq_graph.ir.mapped_files import MappedFiles
from fptq_graph.ir.residency import release_pages
from fptq_graph.ir.protobuf_wire import LEN, VARINT, fields, key, read_varint, varint

IN_MEMORY = "fptq-in-memory"      # the external-data location of a tensor held in SplitModel.arrays
MIN_SPLIT_BYTES = 1024            # smaller tensors stay inline: shape inference and folding read them
_GRAPH, _INITIALIZER = 7, 5       # ModelProto.graph, GraphProto.initializer
_DIMS, _DATA_TYPE, _NAME, _RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION = 1, 2, 8, 9, 13, 14


@dataclass
class SplitModel:
    proto: onnx.ModelProto
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(len(i.raw_data) for i in self.proto.graph.initializer)

    def full(self) -> onnx.ModelProto:
        """A self-contained ModelProto (a copy: its tensors hold their data)."""
        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        for init in out.graph.initializer:
            if is_in_memory(init):
                _inline(init, self.arrays[init.name])
        return out


def is_in_memory(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == IN_MEMORY for e in tensor.external_data)


def reference(name: str, array: np.ndarray, data_type: int | None = None, dims=None) -> onnx.TensorProto:
    """A TensorProto naming `array`'s type and shape (or those given, for packed 4-bit data), its data
    IN_MEMORY."""
    tensor = onnx.TensorProto(name=name, data_type=data_type or onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                              dims=array.shape if dims is None else dims, data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=IN_MEMORY)
    return tensor


PACKED_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


class PackedTensor(LazyValues):
    """A 4-bit constant's values held as packed bytes (numpy uint8, two values a byte in ONNX's layout).

    numpy has no 4-bit type, so graphsurgeon keeps such constants as LazyValues over a TensorProto,
    which would hold a protobuf copy of the bytes; this one builds the TensorProto only if exported
    whole, and export_split passes the bytes on instead.
    """

    def __init__(self, packed: np.ndarray, dims, data_type: int):   # noqa: super().__init__ would build the tensor
        from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype

        self.packed, self.dims, self.data_type = packed, [int(d) for d in dims], data_type
        self.shape = list(self.dims)
        self.dtype = get_onnx_tensor_dtype(onnx.TensorProto(data_type=data_type, dims=self.dims))
        self.nbytes = packed.nbytes

    @property
    def tensor(self) -> onnx.TensorProto:
        return onnx.helper.make_tensor("packed", self.data_type, self.dims, self.packed.tobytes(), raw=True)

    def load(self) -> np.ndarray:
        return onnx.numpy_helper.to_array(self.tensor)


def split_proto(model: onnx.ModelProto) -> SplitModel:
    """A SplitModel from an in-memory ModelProto with its data inline; `model` is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrays = {}
    for init in out.graph.initializer:
        if len(init.raw_data) >= MIN_SPLIT_BYTES and _numpy_type(init) is not None:
            arrays[init.name] = onnx.numpy_helper.to_array(init)
            init.CopyFrom(reference(init.name, arrays[init.name]))
    return SplitModel(out, arrays)


def open_split(path: str | os.PathLike) -> SplitModel:
    """Reads `path` without parsing its weights: inline raw data and external data files are mapped.

    Raises ValueError (bad encoding), onnx's DecodeError, or FileNotFoundError (external data missing).
    """
    path = Path(path)
    spans: dict[str, tuple[int, int]] = {}
    structure = bytearray()
    # Only the walk reads this mapping; the weights get their own, one per file (ir/mapped_files).
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, wire_type, start, value_start, end in fields(buf, 0, len(buf)):
            if number == _GRAPH and wire_type == LEN:
                graph = _strip_graph(buf, value_start, end, spans)
                structure += key(_GRAPH, LEN) + varint(len(graph)) + graph
            else:
                structure += buf[start:end]
    proto = onnx.ModelProto.FromString(bytes(structure))
    arrays = {}
    maps = MappedFiles()   # one mapping per file, each tensor a view (not a descriptor per tensor)
    for init in proto.graph.initializer:
        if init.name in spans:
            offset, _ = spans[init.name]
            arrays[init.name] = maps.view(path, offset, _numpy_type(init), _dims(init), init.name)
        elif init.data_location == onnx.TensorProto.EXTERNAL and _numpy_type(init) is not None:
            info = {e.key: e.value for e in init.external_data}
            data = (path.parent / info["location"]).resolve()
            if not data.is_relative_to(path.parent.resolve()):   # as onnx and ONNX Runtime refuse it too
                raise ValueError(f"external data of '{init.name}' ({info['location']}) is outside the model's folder")
            arrays[init.name] = maps.view(data, int(info.get("offset", 0)), _numpy_type(init), _dims(init), init.name)
            init.CopyFrom(reference(init.name, arrays[init.name]))
    return SplitModel(proto, arrays)


def _strip_graph(buf, start: int, end: int, spans: dict) -> bytes:
    """The GraphProto's encoding with each large initializer's raw data replaced by an IN_MEMORY
    reference; `spans` gets the name -> (offset, length) of the data left in the file."""
    out = bytearray()
    for number, wire_type, field_start, value_start, field_end in fields(buf, start, end):
        if number != _INITIALIZER or wire_type != LEN:
            out += buf[field_start:field_end]
            continue
        kept, raw, name, data_type = bytearray(), None, None, None
        for n, w, s, vs, e in fields(buf, value_start, field_end):
            if n == _RAW_DATA and w == LEN:
                raw = (vs, e - vs)
                continue
            if n == _NAME and w == LEN:
                name = bytes(buf[vs:e]).decode("utf-8")
            elif n == _DATA_TYPE and w == VARINT:
                data_type = read_varint(buf, vs)[0]
            kept += buf[s:e]
        if raw is None or raw[1] < MIN_SPLIT_BYTES or name is None or data_type not in _MAPPABLE:
            out += buf[field_start:field_end]
            continue
        spans[name] = raw
        # StringStringEntryProto {key: "location", value: IN_MEMORY}
        entry = key(1, LEN) + varint(len(b"location")) + b"location" + key(2, LEN) + varint(len(IN_MEMORY)) + IN_MEMORY.encode()
        kept += key(_EXTERNAL_DATA, LEN) + varint(len(entry)) + entry
        kept += key(_DATA_LOCATION, VARINT) + varint(onnx.TensorProto.EXTERNAL)
        out += key(_INITIALIZER, LEN) + varint(len(kept)) + kept
    return bytes(out)


# Element types whose raw data is a plain little-endian numpy array (not packed 4-bit, not strings).
_MAPPABLE = {t for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                         onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                         onnx.TensorProto.BOOL, onnx.TensorProto.BFLOAT16)}


def _numpy_type(init: onnx.TensorProto):
    if init.data_type not in _MAPPABLE:
        return None
    if init.data_type == onnx.TensorProto.BFLOAT16:
        return np.dtype(np.uint16)   # the bits; api refuses bfloat16 models before any math
    return onnx.helper.tensor_dtype_to_np_dtype(init.data_type)


def _dims(init: onnx.TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in init.dims)


def _inline(init: onnx.TensorProto, array: np.ndarray) -> None:
    del init.external_data[:]
    init.data_location = onnx.TensorProto.DEFAULT
    init.raw_data = np.ascontiguousarray(array).tobytes()


def bind_arrays(graph: gs.Graph, arrays: dict[str, np.ndarray]) -> gs.Graph:
    """After gs.import_onnx of a SplitModel's proto: its IN_MEMORY constants take their arrays (those
    that control-flow bodies read included: onnx-graphsurgeon gives a body its own Constant objects)."""
    for tensor in (t for g in gs_graphs(graph) for t in g.tensors().values()):
        if isinstance(tensor, gs.Constant) and tensor.name in arrays and isinstance(tensor._values, LazyValues):
            header = tensor._values.tensor
            if header.data_type in PACKED_TYPES:
                tensor.values = PackedTensor(arrays[tensor.name], header.dims, header.data_type)
            else:
                tensor.values = arrays[tensor.name]
            tensor.data_location = None   # the values are in memory now, not in the IN_MEMORY reference
    return graph


def export_split(graph: gs.Graph) -> SplitModel:
    """gs.export_onnx without copying large constants into the proto: they become IN_MEMORY references
    and the SplitModel's arrays share them with the graph."""
    arrays, swapped = {}, {}
    in_bodies = _read_in_subgraphs(graph)
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or tensor.name in in_bodies:
            continue
        values = tensor._values
        if isinstance(values, PackedTensor) and values.packed.nbytes >= MIN_SPLIT_BYTES:
            arrays[tensor.name] = values.packed
            ref = reference(tensor.name, values.packed, values.data_type, values.dims)
        elif isinstance(values, np.ndarray) and values.nbytes >= MIN_SPLIT_BYTES and values.dtype.kind in "fiub":
            arrays[tensor.name] = values
            ref = reference(tensor.name, values)
        else:
            continue
        swapped[tensor.name] = (tensor, values)
        tensor._values = LazyValues(ref)
    try:
        proto = gs.export_onnx(graph)
    finally:
        for tensor, values in swapped.values():
            tensor._values = values
    used = {init.name for init in proto.graph.initializer}
    return SplitModel(proto, {name: array for name, array in arrays.items() if name in used})


def _read_in_subgraphs(graph: gs.Graph) -> set[str]:
    """Names read inside If/Loop/Scan bodies. Such constants stay inline: onnx-graphsurgeon may export
    them as the body's own initializers, where neither ONNX Runtime's user initializers nor our writer
    (both top-level only) would find their arrays."""
    bodies = list(gs_graphs(graph))[1:]
    return {t.name for body in bodies for node in body.nodes for t in node.inputs}


def write_inline(model: SplitModel, f) -> None:
    """Writes the model as one self-contained ONNX file, streaming each array into its initializer's
    raw_data: the file is what serializing model.full() would give, without building it in memory."""
    head = onnx.ModelProto()
    head.CopyFrom(model.proto)
    graph = head.graph
    streamed = [init for init in graph.initializer if is_in_memory(init)]
    kept = [init for init in graph.initializer if not is_in_memory(init)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    entries = []
    for init in streamed:
        array = np.ascontiguousarray(model.arrays[init.name])
        header = onnx.TensorProto()
        header.CopyFrom(init)
        del header.external_data[:]
        header.ClearField("data_location")
        body = header.SerializeToString() + key(_RAW_DATA, LEN) + varint(array.nbytes)
        entries.append((key(_INITIALIZER, LEN) + varint(len(body) + array.nbytes) + body, array))
    graph_bytes = graph.SerializeToString()
    head.ClearField("graph")
    graph_length = len(graph_bytes) + sum(len(prefix) + array.nbytes for prefix, array in entries)
    f.write(head.SerializeToString())
    f.write(key(_GRAPH, LEN) + varint(graph_length))
    f.write(graph_bytes)
    for (prefix, array), init in zip(entries, streamed):
        f.write(prefix)
        f.write(memoryview(array.reshape(-1).view(np.uint8)))
        release_pages([model.arrays[init.name]])   # a mapped tensor's pages, once written, need not stay resident


def write_external(model: SplitModel, model_path: Path, data_name: str, align: int = 4096) -> None:
    """Writes the arrays one after another into `data_name` beside `model_path` (each at an aligned
    offset, so readers can map them), then the structure pointing at them."""
    head = onnx.ModelProto()
    head.CopyFrom(model.proto)
    offset = 0
    with open(model_path.parent / data_name, "wb") as data:
        for init in head.graph.initializer:
            if not is_in_memory(init):
                continue
            array = np.ascontiguousarray(model.arrays[init.name])
            data.write(b"\0" * (-offset % align))
            offset += -offset % align
            data.write(memoryview(array.reshape(-1).view(np.uint8)))
            release_pages([model.arrays[init.name]])   # mapped weights and codes: written, not kept resident
            del init.external_data[:]
            for name, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                init.external_data.add(key=name, value=value)
            offset += array.nbytes
    model_path.write_bytes(head.SerializeToString())


# protobuf cannot serialize a message of 2 GiB or more; stay clear of it with some headroom.
PROTOBUF_LIMIT = 2**31 - 2**24


def proto_payload_bytes(model: onnx.ModelProto) -> int:
    """Initializer bytes, counted without serializing (ByteSize fails past 2 GiB)."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.raw_data else 4 * max(
            len(init.float_data), len(init.int32_data), len(init.int64_data) * 2
        )
    return total


def with_outputs(model: SplitModel, names: list[str]) -> SplitModel:
    """`model` with `names` as its outputs (types left to the runtime; the model's own outputs that those
    nodes compute stay too) and only the nodes they need: a copy of the structure, the same arrays. The pruning matters: these sessions run with graph
    optimizations off, so a kept-float LM head would still compute its logits ([tokens, vocab]: with
    a 262k vocabulary, more than the model's weights) for nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(model.proto)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    kept = [out.graph.node[i] for i in needed_nodes(out.graph.node, names)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    # The model's own outputs that the kept nodes compute anyway stay outputs: a GenAI builder's CUDA graph
    # (GroupQueryAttention over a past/present buffer) whose present KV is no longer a graph output has ORT
    # plan present into the past input's buffer (the op may work in place), which fails at run time with
    # a past of another length ("Shape mismatch attempting to re-use buffer {1,2,0,64} != {1,2,32,64}").
    produced = {name for node in kept for name in node.output}
    out.graph.output.extend(v for v in model.proto.graph.output if v.name not in names and v.name in produced)
    return SplitModel(out, model.arrays)
