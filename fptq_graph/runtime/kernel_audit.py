"""Which nodes of a model ONNX Runtime's CPU provider runs on a kernel known to be slow or inexact, found in
the graph ORT actually runs (after its own fusions, with our sessions' options), not in the graph we wrote:
ORT rewrites QDQ patterns into integer ops, and the kernel a product lands on decides its speed.

The known cases (onnxruntime 1.31.1, MLAS, x86; measured in benchmarks/decode_cpu.py, issue 30):
- an integer MatMul (MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul) with int8 activations:
  MLAS has no fast s8 x s8 kernel on x86, it runs a portable loop (SmolLM2's LM head, 1 x 576 @ 576 x
  49152 on 2 cores: 46-96 ms against 4-9 ms float);
- the same with uint8 activations and int8 weights: fast, but MLAS's AVX2 kernel (CPUs without VNNI)
  sums u8 x s8 pairs in int16 and saturates on full-range int8 weights (README, "CPUs without VNNI");
- MatMulNBits with bits=8 below accuracy_level 4: dequantizes its whole weight every Run (80-145 ms
  for that head);
- DequantizeLinear of a weight initializer feeding a MatMul/Gemm that ORT did not fuse: the weight is
  dequantized every Run (the qdq form's statically quantized INT4 linears: ORT 1.31 has no kernel for int8
  activations x int4 weights, so it fuses nothing there; that form is for exchange, `ort`/`w4a8` for speed).

audit_cpu_kernels(model) returns one Finding per such node; tests/runtime/test_kernel_audit.py holds every form's
lowering to none on its linears (the qdq form: none on its LM head).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

INTEGER_MATMULS = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
LINEAR_OPS = {"MatMul", "Gemm", "FusedMatMul"}
S8_X_S8 = "int8 activations: MLAS has no fast s8 x s8 kernel on x86 (a portable loop, 10-20x slower than float)"
U8_X_S8 = ("uint8 activations x int8 weights: MLAS's AVX2 kernel (no VNNI) saturates int16 pair sums on "
           "full-range int8 weights")
NBITS8_LOW_LEVEL = "MatMulNBits bits=8 below accuracy_level 4: the whole weight is dequantized every Run"
DQ_EVERY_RUN = "DequantizeLinear of a weight into an unfused MatMul: the weight is dequantized every Run"


@dataclass(frozen=True)
class Finding:
    node: str        # the node's name in ORT's optimized graph (fusions keep the product's name as a prefix)
    op: str
    why: str


def optimized_graph(model: onnx.ModelProto | str | os.PathLike, options: ort.SessionOptions | None = None) -> onnx.ModelProto:
    """The graph ORT's CPU provider runs for `model` (structure only: its weights are written outside and
    not read back), under `options` (default: fptq_graph.runtime.session_options)."""
    from fptq_graph.runtime.sessions import session_options

    options = options or session_options()
    with tempfile.TemporaryDirectory(prefix="fptq-audit-") as tmp:
        source = model
        if isinstance(model, onnx.ModelProto):
            source = str(Path(tmp) / "model.onnx")
            onnx.save(model, source, save_as_external_data=model.ByteSize() > 1_500_000_000)
        out = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(out)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(out), load_external_data=False)


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """What each tensor's element type is, as far as the graph says (initializers, inputs, value infos)
    or its producer fixes it (Cast's `to`, a quantizer's zero point)."""
    types = {i.name: i.data_type for i in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            types.setdefault(node.output[0], to)
        elif node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            types.setdefault(node.output[0], types.get(zero, onnx.TensorProto.UINT8) if zero else onnx.TensorProto.UINT8)
    return types


def audit_graph(graph: onnx.GraphProto) -> list[Finding]:
    """The known slow or inexact CPU kernels in an (optimized) graph: see the module docstring."""
    types = _element_types(graph)
    weights = {i.name for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        op = node.op_type
        if op in ("MatMulInteger", "MatMulIntegerToFloat"):
            a, b = types.get(node.input[0]), types.get(node.input[1])
            if a == onnx.TensorProto.INT8:
                found.append(Finding(node.name, op, S8_X_S8))
            elif a == onnx.TensorProto.UINT8 and b == onnx.TensorProto.INT8:
                found.append(Finding(node.name, op, U8_X_S8))
        elif op == "DynamicQuantizeMatMul" and types.get(node.input[1]) == onnx.TensorProto.INT8:
            found.append(Finding(node.name, op, U8_X_S8))
        elif op == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("bits", 4) == 8 and attrs.get("accuracy_level", 0) < 4:
                found.append(Finding(node.name, op, NBITS8_LOW_LEVEL))
        elif op == "DequantizeLinear" and node.input[0] in weights:
            for user in consumers.get(node.output[0], []):
                if user.op_type in LINEAR_OPS:
                    found.append(Finding(user.name, user.op_type, DQ_EVERY_RUN))
    return found


def audit_cpu_kernels(model: onnx.ModelProto | str | os.PathLike, options: ort.SessionOptions | None = None) -> list[Finding]:
    """Findings for the graph ORT's CPU provider runs for `model` (optimized_graph, then audit_graph)."""
    return audit_graph(optimized_graph(model, options).graph)
