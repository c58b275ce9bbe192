"""The opset a model is at, the one its emitted ops need, and converting (never relabelling) between them."""
from __future__ import annotations

import onnx

from fptq_graph.errors import ModelLoadError, first_line
from fptq_graph.ir.bodies import proto_nodes


IR_VERSION = 10


MIN_OPSET = 21


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
    parked = [node for node in proto_nodes(work.graph.node)
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
                             f"DequantizeLinear with block_size needs it): {first_line(exc)}") from None
    back = set(keys)
    for node in proto_nodes(converted.graph.node):
        if node.domain == _KEEP_DOMAIN and (node.name, node.op_type, tuple(node.output)) in back:
            node.domain = ""
    kept = [o for o in converted.opset_import if o.domain != _KEEP_DOMAIN]
    del converted.opset_import[:]
    converted.opset_import.extend(kept)
    if any(node.domain == _KEEP_DOMAIN for node in proto_nodes(converted.graph.node)):
        raise ModelLoadError(f"{source}: opset {opset} could not be converted to {target}: the converter "
                             "rewrote an op ONNX does not define")
    return converted
