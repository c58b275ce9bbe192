"""Rotate the residual stream by an orthogonal Q folded into the weights (QuaRot's offline rotation), before
anything is observed: calibration, the classifier, LAE, AWQ and GPTQ then all see the rotated model.

A pre-norm decoder computes the same function with its stream x replaced by xQ when
  - every table whose rows enter the stream (the embedding) becomes E Q, every linear writing it (o_proj,
    down_proj) W Q, every constant added to it b Q;
  - every RMS norm's gain g moves into the linears reading the norm: W -> Q^T diag(g) W, the gain -> 1
    (RMSNorm(xQ) = RMSNorm(x) Q, since a rotation keeps the sum of squares; a gain would not commute);
  - a tied LM head reads the rotated table already ((yQ)(EQ)^T = y E^T); the final norm's gain, which the
    shared table cannot take, becomes one [hidden, hidden] float MatMul Q^T diag(g) Q before the head
    (kept float, listed: about hidden/vocab of the head's cost).
What the readers compute is unchanged; writers' outputs are rotated. One calibration sample checks it:
each reader's output and each model output of the rotated float graph against the original, within
1e-4 relative (float32; 1e-2 for float16 weights, which are rounded back to float16 after rotating),
else the run fails naming the first tensor off. The rotated float model is then the float reference
the later measurements compare with (writers' outputs are compared rotated on both sides).

Q is a randomized Hadamard matrix of the hidden size where one can be built (quant/rotation.py), else
a random orthogonal one; the seed is Config.rotate_seed, recorded in the report with the construction.
Where the stream cannot be rotated exactly (patterns/residual_stream.py says why: LayerNorm, a norm with
a bias, the stream as an output, an op reading it directly), nothing is rotated and the reason is reported.

Resident: Q, and one weight being rotated (an embedding table is the largest: LLaMA-7B's 32000 x 4096 is
250 MiB in fp16); each rotated weight is written to an unnamed temporary file as it is made and read back
mapped (ir/mapped_files.SpillFile), so the rotated model is never held twice. The check runs the original
and the rotated float model on one sample, one session at a time, their weights mapped.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from fptq_graph.errors import FptqError
from fptq_graph.ir.mapped_files import SpillFile
from fptq_graph.ir.save import finish_split
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.patterns.graph_match import constant_value, resolve_weight
from fptq_graph.patterns.residual_stream import NotRotatable, ResidualStream, find_residual_stream, product_readers
from fptq_graph.quant.rotation import online_rotation, rotation
from fptq_graph.recipes import run_row

TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-4, np.dtype(np.float16): 1e-2}
ROTATION_PREFIX = "rotation."               # nodes this pass adds: find_linears keeps their products float
HEAD_GAIN_PREFIX = "rotation.head_gain"     # the tied head's gain MatMul
ONLINE_PREFIX = "rotation.ffn"              # a down projection's run-time input rotation (rotate_ffn)


class RotationMismatchError(FptqError):
    """The rotated float graph does not compute what the original does (a bug, or a pattern we misread)."""


class RotateResidual(Pass):
    name = "rotate_residual"
    kind = "rewrite"
    ensures = frozenset({"rotated"})

    def run(self, state) -> PassResult:
        method = run_row(state.config).rotate
        state.rotation = {"method": method}
        if method == "none":
            return PassResult("not asked (recipe and --rotate say none)", stats={"rotated": 0})
        try:
            stream = find_residual_stream(state.graph)
        except NotRotatable as exc:
            state.rotation.update(rotated=False, reason=str(exc))
            return PassResult(f"not rotated: {exc}", stats={"rotated": 0})
        q = rotation(stream.hidden, state.config.rotate_seed)
        online = (_online_rotations(state.graph, state.config.rotate_seed,
                                    state.source_model.proto if state.source_model is not None else None)
                  if state.config.rotate_ffn else {})
        counts = _rewrite(state.graph, stream, q.matrix, online)
        state.graph.cleanup()
        rotated_source = finish_split(state.graph, state.source_model.proto) if state.source_model is not None else None
        checked = _check_same_function(state, stream, rotated_source, online)
        if rotated_source is not None:
            state.source_model = rotated_source   # the float reference from here on (see the docstring)
        # the linears whose input is now rotated (plan_equalization gives them no AWQ scale: the rotation spread
        # the channel energy AWQ's per-channel scales would put back)
        rotated_inputs = sorted(({reader.name for norm in stream.norms for reader in norm.readers
                                  if not any(reader is t for t in stream.tied_readers)} |
                                 {reader.node.name for reader, _ in online.values()}) - {""})
        state.rotation.update(rotated=True, hidden=stream.hidden, kind=q.kind, construction=q.construction, seed=q.seed,
                              checked=checked, rotated_inputs=rotated_inputs, **counts)
        summary = (f"residual stream ({stream.hidden} channels) rotated by a {q.kind} matrix ({q.construction}, seed "
                   f"{q.seed}): {counts['readers']} reading linears, {counts['writers']} writing, {counts['tables']} "
                   f"table(s), {counts['norms']} norm gains folded"
                   + (f", tied head's gain as a float {stream.hidden}x{stream.hidden} MatMul" if counts["head_gain"] else "")
                   + (f"; {counts['online']} FFN down projections' inputs rotated at run time ({counts['online_construction']})"
                      if counts["online"] else "")
                   + (f"; same function on one calibration sample (max rel. error {checked['max_relative_error']:.1e})"
                      if checked else ""))
        return PassResult(summary, modified=True, stats={"rotated": 1, **counts})


def _rewrite(graph: gs.Graph, stream: ResidualStream, q: np.ndarray, online: dict) -> dict:
    """Folds the gains and Q into the weights; every new array goes through one SpillFile. `online`: per
    down projection (id of its node), (ProductReader, OnlineRotation) to insert (rotate_ffn)."""
    spill = SpillFile()
    pending: list[tuple[gs.Node, int, str, int]] = []   # (node, input index, new constant name, spill index)
    tied = {id(node) for node in stream.tied_readers}
    compute = np.float64 if stream.hidden <= 2048 else np.float32   # exactness vs. time on 8k-wide models

    taken = set(graph.tensors())

    def put(node: gs.Node, index: int, name: str, array: np.ndarray, dtype) -> None:
        base, number = name if not name.startswith(".") else f"{node.op}_{len(pending)}{name}", 0
        name = base
        while name in taken:   # unnamed nodes, or a name already in the graph
            number += 1
            name = f"{base}_{number}"
        taken.add(name)
        pending.append((node, index, name, spill.add(np.asarray(array).astype(dtype))))

    qc = q.astype(compute)
    head_gain = 0
    # The online rotations' random signs go into the columns of the linear making one factor of the product
    # (up_proj: the product's channel j is scaled by the sign exactly when that column is), else a Mul.
    column_signs = {id(r.source): (r.source, rot.signs) for r, rot in online.values() if r.source is not None}

    def signed(node: gs.Node, weight: np.ndarray) -> np.ndarray:
        _, signs = column_signs.pop(id(node), (None, None))
        return weight if signs is None else weight * signs[None, :]
    for norm in stream.norms:
        gain = (constant_value(norm.gain_node.inputs[norm.gain_index]) if norm.gain_node is not None
                else np.ones(stream.hidden, np.float32))
        g = gain.reshape(-1).astype(compute)
        for reader in norm.readers:
            if id(reader) in tied:
                if np.all(g == 1):
                    continue
                # y Q (Q^T diag(g) Q) (E Q)^T = y diag(g) E^T: the gain in rotated coordinates, before the head
                dtype = _dtype_of(reader)
                m = (qc.T * g[None, :]) @ qc
                name = f"{HEAD_GAIN_PREFIX}.{reader.name or 'head'}"
                x = reader.inputs[0]
                out = gs.Variable(f"{name}.output", dtype=x.dtype, shape=getattr(x, "shape", None))
                at = next(i for i, node in enumerate(graph.nodes) if node is reader)   # just before the head
                graph.nodes.insert(at, gs.Node("MatMul", name=name, inputs=[x, gs.Constant(f"{name}.weight", m.astype(dtype))],
                                               outputs=[out]))
                reader.inputs[0] = out
                head_gain += 1
                continue
            weight, _ = resolve_weight(reader)
            put(reader, 1, f"{reader.name}.rotated_weight", signed(reader, qc.T @ (g[:, None] * weight.astype(compute))),
                weight.dtype)
            _direct_weight(reader)
        if norm.gain_node is not None:
            put(norm.gain_node, norm.gain_index, f"{norm.gain_node.name}.rotated_gain", np.ones_like(gain), gain.dtype)
    for writer in stream.writers:
        weight, _ = resolve_weight(writer)
        rows = weight.astype(compute)
        if id(writer) in online:   # its input rotated at run time: Q_ffn^T W Q
            rows = online[id(writer)][1].rotate_rows(rows)
        put(writer, 1, f"{writer.name}.rotated_weight", rows @ qc, weight.dtype)
        _direct_weight(writer)
    for reader, rot in online.values():
        if not any(reader.node is w for w in stream.writers):   # a product reader that does not write the stream
            weight, _ = resolve_weight(reader.node)
            put(reader.node, 1, f"{reader.node.name}.rotated_weight", rot.rotate_rows(weight.astype(compute)), weight.dtype)
            _direct_weight(reader.node)
    for source, signs in column_signs.values():   # a factor's linear the stream rotation did not rewrite
        weight, _ = resolve_weight(source)
        put(source, 1, f"{source.name}.signed_weight", weight.astype(compute) * signs[None, :], weight.dtype)
        _direct_weight(source)
    for reader, rot in online.values():
        _insert_online(graph, reader, rot, taken)
    for node, index in stream.vectors:
        value = constant_value(node.inputs[index])
        put(node, index, f"{node.name}.rotated_bias_{index}", (value.reshape(-1).astype(compute) @ qc).reshape(value.shape),
            value.dtype)
    table_slots = []
    for table, transposed in stream.tables:
        values = table.values                  # [rows, hidden], or [hidden, rows] when held transposed
        rotated = np.empty(values.shape, values.dtype)
        rows = max(1, (64 << 20) // max(1, stream.hidden * 8))   # 64 MiB of the table at a time
        for start in range(0, values.shape[1 if transposed else 0], rows):
            if transposed:   # (E Q)^T = Q^T E^T
                rotated[:, start:start + rows] = (qc.T @ values[:, start:start + rows].astype(compute)).astype(values.dtype)
            else:
                rotated[start:start + rows] = (values[start:start + rows].astype(compute) @ qc).astype(values.dtype)
        table_slots.append((table, spill.add(rotated)))
        del rotated
    views = spill.views()
    for node, index, name, slot in pending:
        node.inputs[index] = gs.Constant(name, views[slot])
    for table, slot in table_slots:
        table.values = views[slot]   # in place: the lookups and a tied head read the one table
    return {"readers": sum(len(n.readers) for n in stream.norms) - len(stream.tied_readers), "writers": len(stream.writers),
            "tables": len(stream.tables), "vectors": len(stream.vectors), "norms": len(stream.norms),
            "head_gain": head_gain, "online": len(online),
            "online_construction": "; ".join(sorted({rot.construction for _, rot in online.values()}))}


def _online_rotations(graph: gs.Graph, seed: int, structure=None) -> dict:
    """The down projections (linears reading a gated product) whose input width has an online rotation and
    whose input's rank is known (the graph's, else ONNX shape inference over `structure`, the model without
    its weights): the Reshapes around the rotation keep the leading axes by rank."""
    found, ranks = {}, None
    for number, reader in enumerate(product_readers(graph)):
        k = resolve_weight(reader.node)[0].shape[0]
        x = reader.node.inputs[0]
        rank = _rank_of(x)
        if rank is None:
            ranks = _ranks(structure) if ranks is None else ranks
            rank = ranks.get(x.name)
        rot = online_rotation(k, seed + 1 + number)
        if rot is not None and rank is not None:
            found[id(reader.node)] = (reader, replace(rot, rank=rank))
    return found


# Ops whose output has the rank of their widest input (elementwise, norms, a MatMul by a 2-D weight).
_RANK_KEEPING = {"Mul", "Add", "Sub", "Div", "Sigmoid", "Tanh", "Relu", "Gelu", "FastGelu", "QuickGelu", "Erf", "Softplus",
                 "Cast", "Identity", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
                 "LayerNormalization", "SkipLayerNormalization", "MatMul"}


def _rank_of(tensor, limit: int = 256) -> int | None:
    """A tensor's rank from its shape, else from the nearest tensor upstream whose rank is known, through ops
    that keep it (elementwise, norms, a MatMul by a 2-D weight, a table lookup: the ids' rank + 1). The
    graph's contrib ops, which ONNX's shape inference does not know, keep their input's rank."""
    frontier, seen = [(tensor, 0)], set()
    while frontier and len(seen) < limit:
        current, extra = frontier.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, "shape", None):
            return len(current.shape) + extra
        node = current.inputs[0] if isinstance(current, gs.Variable) and len(current.inputs) == 1 else None
        if node is None:
            continue
        if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant):
            frontier.append((node.inputs[1], extra + node.inputs[0].values.ndim - 1))
        elif node.op == "MatMul":
            if isinstance(node.inputs[1], gs.Constant) and node.inputs[1].values.ndim == 2:
                frontier.append((node.inputs[0], extra))
        elif node.op in _RANK_KEEPING:
            frontier.extend((t, extra) for t in node.inputs if isinstance(t, gs.Variable))
    return None


def _ranks(structure) -> dict[str, int]:
    """Tensor name -> rank, from ONNX shape inference over a model's structure (no weights needed)."""
    import onnx

    if structure is None:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(structure)
    except Exception:   # noqa: BLE001 - a graph shape inference cannot follow: the ranks stay unknown
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info
            if v.type.tensor_type.HasField("shape")}


def _insert_online(graph: gs.Graph, reader, rot, taken: set) -> None:
    """x -> [x * signs] -> Reshape [..., outer, inner] -> MatMul(B / norm) -> [MatMul(A^T, .)] -> Reshape back,
    before the down projection: x Q with Q = diag(signs) (A (x) B) / norm (A^T X B over each row's [outer, inner]
    view; MatMul broadcasts A^T over the leading axes, so no Transpose). The Reshapes keep the leading axes
    with 0 (the input's rank is known: _online_rotations checks). Named rotation.ffn.<linear>.*: find_linears
    keeps its products float."""
    node = reader.node
    x = node.inputs[0]
    dtype = resolve_weight(node)[0].dtype
    base = f"{ONLINE_PREFIX}.{node.name or 'linear'}"
    while any(name.startswith(base) for name in taken):
        base += "_"
    taken.add(base)
    inner, m = rot.inner.shape[0], rot.n // rot.inner.shape[0]
    lead = [0] * (rot.rank - 1)

    def var(suffix):
        return gs.Variable(f"{base}.{suffix}", dtype=x.dtype)

    nodes, current = [], x
    if reader.source is None:   # signs as a Mul (else folded into the factor's columns)
        signed = var("signed")
        nodes.append(gs.Node("Mul", name=f"{base}.signs", inputs=[current, gs.Constant(f"{base}.signs", rot.signs.astype(dtype))],
                             outputs=[signed]))
        current = signed
    blocks, inner_out = var("blocks"), var("inner")
    nodes += [gs.Node("Reshape", name=f"{base}.reshape", outputs=[blocks],
                      inputs=[current, gs.Constant(f"{base}.block_shape", np.array(lead + [m, inner], np.int64))]),
              gs.Node("MatMul", name=f"{base}.inner", outputs=[inner_out],
                      inputs=[blocks, gs.Constant(f"{base}.inner_matrix", (rot.inner / rot.norm).astype(dtype))])]
    current = inner_out
    if rot.outer is not None:
        outer_out = var("outer")
        nodes.append(gs.Node("MatMul", name=f"{base}.outer", outputs=[outer_out],
                             inputs=[gs.Constant(f"{base}.outer_matrix", rot.outer.T.astype(dtype)), current]))
        current = outer_out
    rotated = var("output")
    nodes.append(gs.Node("Reshape", name=f"{base}.unblock", outputs=[rotated],
                         inputs=[current, gs.Constant(f"{base}.row_shape", np.array(lead + [rot.n], np.int64))]))
    node.inputs[0] = rotated
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    graph.nodes[at:at] = nodes


def _direct_weight(node: gs.Node) -> None:
    """The node now reads a direct [K, N] weight: Gemm's transB and alpha were applied by resolve_weight."""
    if node.op == "Gemm":
        node.attrs["transB"] = 0
        node.attrs["alpha"] = 1.0


def _dtype_of(node: gs.Node):
    weight, _ = resolve_weight(node)
    return weight.dtype if weight is not None else np.float32


def _check_same_function(state, stream: ResidualStream, rotated, online: dict) -> dict | None:
    """Runs one calibration sample through the original and the rotated float models and compares what
    must not change (each reader's output, each model output) in graph order; raises on the first one off.
    Also records, per norm, the range of what its readers multiply before and after (state.rotation["ranges"])."""
    from fptq_graph.ir.split_model import with_outputs
    from fptq_graph.runtime import ort_errors
    from fptq_graph.runtime.sessions import session

    source = state.source_model
    if state.calibration is None or source is None or rotated is None:
        return None
    feeds = next(iter(state.calibration.sample_feeds(source.proto.graph.input, 1)), None)
    if feeds is None:
        return None
    order = {node.outputs[0].name: i for i, node in enumerate(state.graph.nodes) if node.outputs}
    scope = _check_scope(state, source)
    norms = stream.norms if scope is None else sorted(stream.norms, key=lambda n: order.get(n.output.name, 0))[:scope]
    stream = replace(stream, norms=norms)
    # what must not change: readers' outputs (but a product factor's, which carries the online rotation's
    # signs), down projections that do not write the stream, the model outputs
    writers, signed = {id(w) for w in stream.writers}, {id(r.source) for r, _ in online.values() if r.source is not None}
    names = ([r.outputs[0].name for norm in stream.norms for r in norm.readers if id(r) not in signed]
             + [r.node.outputs[0].name for r, _ in online.values() if id(r.node) not in writers and scope is None]
             + ([o.name for o in source.proto.graph.output] if scope is None else []))
    names = sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))
    activations = [norm.output.name for norm in stream.norms]   # the same name in both models
    fetch = names + [n for n in dict.fromkeys(activations) if n not in names]
    got = {}
    for kind, model in (("original", source), ("rotated", rotated)):
        sess = session(with_outputs(model, fetch), arena=False)
        got[kind] = dict(zip(fetch, ort_errors.run(sess, fetch, feeds, f"the {kind} float model on calibration sample 0")))
        del sess
    tolerance = max(TOLERANCE.get(np.asarray(got["original"][n]).dtype, 1e-4) for n in names)
    worst = 0.0
    for name in names:
        ref = np.asarray(got["original"][name], np.float64)
        out = np.asarray(got["rotated"][name], np.float64)
        if ref.shape != out.shape:
            raise RotationMismatchError(f"rotating the residual stream changed the shape of '{name}' "
                                        f"({list(ref.shape)} -> {list(out.shape)}); nothing written")
        finite = np.isfinite(ref)
        error = float(np.linalg.norm((out - ref)[finite])) / (float(np.linalg.norm(ref[finite])) or 1.0)
        worst = max(worst, error)
        if not error <= tolerance:
            raise RotationMismatchError(
                f"the rotated float model differs from the original at '{name}' (relative error {error:.2e} > "
                f"{tolerance:g}) on calibration sample 0: the rotation would change the function; nothing written")
    state.rotation["ranges"] = {
        reader.name: {"before": _range(got["original"][norm.output.name]), "after": _range(got["rotated"][norm.output.name])}
        for norm in stream.norms for reader in norm.readers}
    return {"tensors": len(names), "max_relative_error": worst, "tolerance": tolerance,
            "scope": "the whole model" if scope is None else
                     f"the linears reading the first {scope} norms (the model is over the memory budget for two "
                     "whole-model sessions, or the run is block by block)"}


PARTIAL_NORMS = 4   # a block-by-block run checks the readers of this many norms (two layers of a decoder)


def _check_scope(state, source) -> int | None:
    """None: check the whole model. Else how many norms' readers to check: for a run asked to go block by
    block, or a model whose float sessions (fp16 weights cast to float32 by ONNX Runtime's CPU kernels:
    twice their bytes) would not fit the memory budget. The rewrite is the same code for every layer, so
    the first layers check it; the prefix of the graph they need is all those sessions load."""
    from fptq_graph.ir.residency import memory_budget

    cfg = state.config
    budget = cfg.memory_budget_mib * 2**20 if cfg.memory_budget_mib is not None else memory_budget(0.6)
    if cfg.sequential is True or (budget is not None and 2 * source.payload_bytes > budget):
        return PARTIAL_NORMS
    return None


def _range(x) -> dict:
    """max|x| and the max/median ratio of the per-channel maxima (how far the outlier channels stand out)."""
    channel_max = np.abs(np.asarray(x, np.float64)).reshape(-1, np.shape(x)[-1]).max(axis=0)
    median = float(np.median(channel_max))
    return {"max": float(channel_max.max()), "max_over_median": float(channel_max.max() / median) if median > 0 else None}
