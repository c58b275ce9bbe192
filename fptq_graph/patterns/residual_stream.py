"""The residual stream of a pre-norm decoder: what writes it, the norms that read it, and the linears that
read those norms (what rotate_residual rewrites), or why the graph has no stream a rotation keeps exact.

The stream starts at an embedding lookup (a Gather of a constant [vocab, hidden] table) and runs through
the residual Adds (SkipSimplifiedLayerNormalization's output 3 counts as one). Every tensor on it may
only be read by
  - a residual Add, whose other operand is a writer: a linear's output (MatMul/Gemm with a constant
    weight, its bias Add included), another table's rows, a constant vector, or a sum of those;
  - an RMS norm over the last axis: decomposed (x * 1/sqrt(mean(x^2) + eps) or x / sqrt(..), then * gain, float Casts
    allowed, as our exports and optimum's write it), SimplifiedLayerNormalization, RMSNormalization or
    SkipSimplifiedLayerNormalization; the norm's output may only be read by linears;
  - a float Cast, an Identity, a Reshape that keeps the last axis, or a Mul by a scalar constant.
Anything else (a LayerNorm, which subtracts the channel mean; a norm with a bias; the stream as a model
output; an op reading it directly) is a reason, naming the node, and nothing is rotated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.patterns.graph_match import (constant_value, is_channel_passthrough, is_float_cast, norm_inputs, producer,
                                             resolve_weight, rms_norm_gain)

RMS_NORM_OPS = ("SimplifiedLayerNormalization", "RMSNormalization", "SkipSimplifiedLayerNormalization")


@dataclass
class StreamNorm:
    """An RMS norm reading the stream: where its gain is, and the linears reading its output."""

    kind: str
    gain_node: gs.Node            # the node whose input `gain_index` is the gain (None: no gain)
    gain_index: int | None
    output: gs.Tensor             # the normalized (and gained) tensor the readers read
    readers: list[gs.Node] = field(default_factory=list)   # MatMul/Gemm reading `output` as input 0


@dataclass
class ResidualStream:
    hidden: int
    # tables whose rows enter the stream: (initializer, whether it holds the [rows, hidden] table transposed)
    tables: list[tuple[gs.Constant, bool]] = field(default_factory=list)
    writers: list[gs.Node] = field(default_factory=list)       # MatMul/Gemm whose output columns are added to it
    vectors: list[tuple[gs.Node, int]] = field(default_factory=list)   # (node, input index) of constant [hidden] added
    norms: list[StreamNorm] = field(default_factory=list)
    tied_readers: list[gs.Node] = field(default_factory=list)  # readers whose weight is a stream table (tied LM head)
    tensors: list[str] = field(default_factory=list)           # the stream's tensors, in the order found


class NotRotatable(Exception):
    """Why the graph's residual stream cannot be rotated exactly (the message names the node)."""


def find_residual_stream(graph: gs.Graph) -> ResidualStream:
    """The stream as described above; raises NotRotatable with the reason otherwise."""
    starts = [n for n in graph.nodes if n.op == "Gather" and _table(n) is not None and constant_value(n.inputs[1]) is None]
    if not starts:
        raise NotRotatable("no embedding lookup (a Gather of a constant [vocab, hidden] table) starts a residual stream")
    hidden = int(_table(starts[0]).shape[1])
    return _Walk(graph, hidden).run(starts)


def _table(node: gs.Node) -> np.ndarray | None:
    """The [rows, hidden] table a Gather looks rows up in: a constant, or the Transpose of a constant [hidden,
    rows] (the GenAI builder's tied embedding reads the LM head's weight that way)."""
    source = _table_source(node)
    if source is None:
        return None
    constant, transposed = source
    return constant.values.T if transposed else constant.values


def _table_source(node: gs.Node) -> tuple[gs.Constant, bool] | None:
    """(the initializer holding the table, whether it holds it transposed)."""
    if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0:
        return None
    data, transposed = node.inputs[0], False
    transpose = producer(data)
    if transpose is not None and transpose.op == "Transpose" and list(transpose.attrs.get("perm", [1, 0])) == [1, 0]:
        data, transposed = transpose.inputs[0], True
    if not isinstance(data, gs.Constant) or data.values.ndim != 2 or data.values.dtype.kind != "f":
        return None
    return data, transposed


class _Walk:
    def __init__(self, graph: gs.Graph, hidden: int):
        self.graph, self.hidden = graph, hidden
        self.outputs = {t.name for t in graph.outputs}
        self.stream = ResidualStream(hidden)
        self.on_stream: set[str] = set()
        self.norm_nodes: set[int] = set()       # id() of nodes already taken as part of a norm
        self.writer_nodes: set[int] = set()

    def run(self, starts: list[gs.Node]) -> ResidualStream:
        queue = []
        for gather in starts:
            if int(_table(gather).shape[1]) != self.hidden:
                raise NotRotatable(f"embedding lookups of different widths ({self.hidden} and "
                                   f"{_table(gather).shape[1]}, Gather '{gather.name}')")
            self._add_table(gather)
            queue.append(gather.outputs[0])
        for tensor in queue:
            if tensor.name in self.on_stream:
                continue
            self.on_stream.add(tensor.name)
            self.stream.tensors.append(tensor.name)
            if tensor.name in self.outputs:
                raise NotRotatable(f"the residual stream '{tensor.name}' is a model output (hidden states): rotating "
                                   "the stream would change it")
            for consumer in list(tensor.outputs):
                queue.extend(self._consumer(consumer, tensor))
        self._check_tables()
        return self.stream

    # -- what reads the stream ----------------------------------------------------------------------
    def _consumer(self, node: gs.Node, tensor: gs.Tensor) -> list[gs.Tensor]:
        """The stream tensors `node` makes from `tensor`; raises NotRotatable for a reader a rotation breaks."""
        if id(node) in self.norm_nodes:
            return []
        if node.op == "Add" and len(node.inputs) == 2:
            for other in node.inputs:
                if other is not tensor and other.name not in self.on_stream:
                    self._writer(other, node)
            return [node.outputs[0]]
        if (is_float_cast(node) or node.op == "Identity" or
                (node.op == "Reshape" and is_channel_passthrough(node, self.hidden))) and node.inputs[0] is tensor:
            return [node.outputs[0]]
        if self._is_square_statistic(node, tensor):
            return []
        if node.op == "Mul" and len(node.inputs) == 2 and any(
                t is not tensor and (constant_value(t) is not None and constant_value(t).size == 1) for t in node.inputs):
            return [node.outputs[0]]   # a scalar scale (Gemma's sqrt(hidden) on the embedding) commutes with Q
        if (node.op == "Mul" and len(node.inputs) == 2) or (node.op == "Div" and node.inputs[0] is tensor):
            return self._decomposed_norm(node, tensor)
        if node.op in RMS_NORM_OPS and norm_inputs(node) is not None:
            return self._fused_norm(node, tensor)
        if node.op in ("LayerNormalization", "SkipLayerNormalization"):
            raise NotRotatable(f"{node.op} '{node.name}' subtracts the channel mean, which a rotation does not keep "
                               "(rotation needs RMS norms: a pre-norm decoder such as LLaMA, Qwen2, Mistral, Phi-3)")
        raise NotRotatable(f"{node.op} '{node.name}' reads the residual stream '{tensor.name}' directly (not a norm, a "
                           "residual Add or a cast): rotating the stream would change what it computes")

    def _is_square_statistic(self, node: gs.Node, tensor: gs.Tensor) -> bool:
        """Pow(x, 2) or x * x feeding only ReduceMeans over the last axis: sum x^2 is what a rotation keeps."""
        if node.op == "Pow":
            exponent = constant_value(node.inputs[1])
            if node.inputs[0] is not tensor or exponent is None or float(np.asarray(exponent).reshape(-1)[0]) != 2.0:
                return False
        elif not (node.op == "Mul" and node.inputs[0] is tensor and node.inputs[1] is tensor):
            return False
        square = node.outputs[0]
        if square.name in self.outputs or not square.outputs:
            return False
        return all(c.op == "ReduceMean" and _reduces_last_axis(c, square) for c in square.outputs)

    def _decomposed_norm(self, node: gs.Node, tensor: gs.Tensor) -> list[gs.Tensor]:
        """x * r, r = 1/sqrt(mean(x^2) + eps) of this very x (or x / sqrt(...)); then (through Casts) the
        gain Mul, if any."""
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        if constant_value(other) is not None or not _is_rms_of(other, tensor):
            raise NotRotatable(f"{node.op} '{node.name}' {'multiplies' if node.op == 'Mul' else 'divides'} the residual "
                               f"stream '{tensor.name}' by '{other.name}', which is not its RMS normalizer")
        self.norm_nodes.add(id(node))
        normalized = node.outputs[0]
        gain_node, gain_index, out = None, None, normalized
        probe = normalized
        while True:
            if probe.name in self.outputs or len(probe.outputs) != 1:
                break
            nxt = probe.outputs[0]
            if is_float_cast(nxt):
                probe = nxt.outputs[0]
                continue
            index = rms_norm_gain(nxt, self.hidden)
            if index is not None:
                gain_node, gain_index, out = nxt, index, nxt.outputs[0]
            break
        self._add_norm("RMSNorm (decomposed)", gain_node, gain_index, out if gain_node is not None else normalized)
        return []

    def _fused_norm(self, node: gs.Node, tensor: gs.Tensor) -> list[gs.Tensor]:
        gain_index, bias_index = norm_inputs(node)
        if bias_index is not None or (node.op == "SkipSimplifiedLayerNormalization" and len(node.inputs) > 3
                                      and node.inputs[3].name and constant_value(node.inputs[3]) is None):
            raise NotRotatable(f"{node.op} '{node.name}' has a non-constant bias")
        if int(node.attrs.get("axis", -1)) != -1:
            raise NotRotatable(f"{node.op} '{node.name}' normalizes over axis {node.attrs.get('axis')}, not the last one")
        if constant_value(node.inputs[gain_index]) is None:
            raise NotRotatable(f"{node.op} '{node.name}' has a non-constant gain")
        self.norm_nodes.add(id(node))
        more = []
        if node.op == "SkipSimplifiedLayerNormalization":
            for index in (0, 1):
                other = node.inputs[index]
                if other is not tensor and other.name not in self.on_stream:
                    self._writer(other, node)
            if len(node.inputs) > 3 and node.inputs[3].name:
                self.stream.vectors.append((node, 3))   # a constant bias added to the sum: rotated with it
            if len(node.outputs) > 3 and node.outputs[3].name:
                more.append(node.outputs[3])
        for index in (1, 2):
            if len(node.outputs) > index and node.outputs[index].name and (node.outputs[index].outputs or
                                                                           node.outputs[index].name in self.outputs):
                raise NotRotatable(f"{node.op} '{node.name}': its statistics output {index} is read")
        self._add_norm(node.op, node, gain_index, node.outputs[0])
        return more

    def _add_norm(self, kind: str, gain_node, gain_index, output: gs.Tensor) -> None:
        norm = StreamNorm(kind, gain_node, gain_index, output)
        frontier = [output]
        while frontier:
            tensor = frontier.pop()
            if tensor.name in self.outputs:
                raise NotRotatable(f"{kind} output '{tensor.name}' is a model output")
            for consumer in tensor.outputs:
                if is_channel_passthrough(consumer, self.hidden) and consumer.inputs[0] is tensor:
                    frontier.append(consumer.outputs[0])
                    continue
                weight = resolve_weight(consumer)[0] if consumer.op in ("MatMul", "Gemm") else None
                if weight is None or consumer.inputs[0] is not tensor or weight.shape[0] != self.hidden \
                        or (consumer.op == "Gemm" and consumer.attrs.get("transA", 0)):
                    raise NotRotatable(f"{consumer.op} '{consumer.name}' reads the output of {kind} "
                                       f"'{(norm.gain_node.name if norm.gain_node is not None else output.name)}' "
                                       "and is not a linear with a constant weight")
                norm.readers.append(consumer)
        self.stream.norms.append(norm)

    # -- what writes the stream ---------------------------------------------------------------------
    def _writer(self, tensor: gs.Tensor, into: gs.Node) -> None:
        """Records what makes `tensor` (added into the stream by `into`), or raises NotRotatable."""
        value = constant_value(tensor)
        if value is not None:
            if value.size == self.hidden and value.shape[-1] == self.hidden and value.dtype.kind == "f":
                index = next(i for i, t in enumerate(into.inputs) if t is tensor)
                self.stream.vectors.append((into, index))
                return
            raise NotRotatable(f"constant '{tensor.name}' of shape {list(value.shape)} is added to the residual stream")
        node = producer(tensor)
        if node is None:
            raise NotRotatable(f"'{tensor.name}' (a model input) is added to the residual stream")
        if len(tensor.outputs) != 1 or tensor.name in self.outputs:
            raise NotRotatable(f"'{tensor.name}' is added to the residual stream and also read elsewhere")
        if is_float_cast(node) or node.op == "Identity" or (node.op == "Reshape" and is_channel_passthrough(node, self.hidden)):
            return self._writer(node.inputs[0], node)
        if node.op in ("MatMul", "Gemm"):
            weight, note = resolve_weight(node)
            if weight is None or weight.shape[1] != self.hidden:
                raise NotRotatable(f"{node.op} '{node.name}' writes the residual stream but its weight is not a "
                                   f"constant [K, {self.hidden}] ({note or list(getattr(weight, 'shape', []))})")
            if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
                if constant_value(node.inputs[2]) is None:
                    raise NotRotatable(f"Gemm '{node.name}' writes the residual stream with a non-constant bias")
                self.stream.vectors.append((node, 2))
            self.writer_nodes.add(id(node))
            self.stream.writers.append(node)
            return
        if node.op == "Add" and len(node.inputs) == 2:
            for t in node.inputs:
                self._writer(t, node)
            return
        if node.op == "Mul" and len(node.inputs) == 2:
            for index in (0, 1):
                scale = constant_value(node.inputs[index])
                if scale is not None and scale.size == 1:
                    return self._writer(node.inputs[1 - index], node)   # a scalar scale commutes with the rotation
        if _table(node) is not None and int(_table(node).shape[1]) == self.hidden:
            self._add_table(node)
            return
        raise NotRotatable(f"'{tensor.name}' (from {node.op} '{node.name}') is added to the residual stream but is "
                           "not a linear's output, a bias or a table's rows")

    def _add_table(self, gather: gs.Node) -> None:
        source = _table_source(gather)
        if all(t is not source[0] for t, _ in self.stream.tables):
            self.stream.tables.append(source)

    def _check_tables(self) -> None:
        """Every reader of a rotated table must be a stream lookup (directly or through its Transpose) or a
        tied reader (the LM head reading the embedding table): their table is rotated once, in place."""
        readers = {id(reader) for norm in self.stream.norms for reader in norm.readers}
        lookups = {id(n) for n in self.graph.nodes if _table_source(n) is not None}
        for table, _ in self.stream.tables:
            for consumer in table.outputs:
                if id(consumer) in lookups:
                    continue
                users = [consumer]
                if consumer.op == "Transpose":
                    users = list(consumer.outputs[0].outputs)
                for user in users:
                    if id(user) in lookups:
                        continue
                    if id(user) in readers:
                        self.stream.tied_readers.append(user)
                        continue
                    raise NotRotatable(f"{user.op} '{user.name}' reads the embedding table '{table.name}' and is "
                                       "neither a lookup nor an LM head reading a norm")


def _reduces_last_axis(node: gs.Node, tensor: gs.Tensor) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        axes = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    if axes is None or len(axes) != 1:
        return False
    rank = len(tensor.shape) if getattr(tensor, "shape", None) else None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _is_rms_of(tensor: gs.Tensor, x: gs.Tensor, depth: int = 6) -> bool:
    """Whether `tensor` is computed from ReduceMean(x^2) (through Add eps, Sqrt, Reciprocal/Div, Rsqrt, Casts)."""
    node = producer(tensor)
    if node is None or depth == 0:
        return False
    if node.op == "ReduceMean":
        square = producer(node.inputs[0])
        if square is None:
            return False
        source = square.inputs[0]
        while producer(source) is not None and is_float_cast(producer(source)) and source is not x:
            source = producer(source).inputs[0]
        return source is x and square.op in ("Pow", "Mul")
    return any(_is_rms_of(t, x, depth - 1) for t in node.inputs if isinstance(t, gs.Variable))


@dataclass
class ProductReader:
    """A linear reading an elementwise product of two computed tensors (SwiGLU's down projection)."""

    node: gs.Node              # the MatMul/Gemm
    product: gs.Node           # the Mul
    source: gs.Node | None     # a MatMul making one factor, read by nothing else: its columns can take signs


def product_readers(graph: gs.Graph) -> list[ProductReader]:
    """Every linear with a constant weight whose input is a Mul of two computed tensors read by it alone."""
    outputs = {t.name for t in graph.outputs}
    found = []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or resolve_weight(node)[0] is None or node.attrs.get("transA", 0):
            continue
        x = node.inputs[0]
        mul = producer(x)
        if (mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or len(x.outputs) != 1 or x.name in outputs
                or any(constant_value(t) is not None for t in mul.inputs)):
            continue
        source = None
        for factor in mul.inputs:
            maker = producer(factor)
            if (maker is not None and maker.op == "MatMul" and len(factor.outputs) == 1 and factor.name not in outputs
                    and resolve_weight(maker)[0] is not None):
                source = maker
                break
        found.append(ProductReader(node, mul, source))
    return found
