"""Export any torch.nn.Module through torch.export (FX) to ONNX.

The ExportedProgram is captured first, so the FX graph the ONNX came from can be written out
(`fx_path`) and read. torch's dynamo ONNX exporter then translates that same program; it keeps
LayerNorm as one LayerNormalization node. Afterwards we name linear and normalization nodes by
the module they came from ("encoder.layer.0.attention.self.query") so reports read like the model,
and rename the symbolic dims to "batch" and "sequence".
"""
from __future__ import annotations

import ast
import contextlib
import os
import warnings
from pathlib import Path
from typing import Mapping
from unittest import mock

import onnx
import torch

from fptq_graph.errors import ExportError
from fptq_graph.ir.opset import IR_VERSION, MIN_OPSET
from fptq_graph.ir.save import save_model
SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def export_module(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], path: str | os.PathLike,
                  output_names: list[str], *, dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
                  fx_path: str | os.PathLike | None = None, metadata: Mapping[str, str] | None = None,
                  strip_prefix: str = "", max_sequence: int = 2**15,
                  input_names: list[str] | None = None, dynamic_shapes: Mapping | None = None) -> onnx.ModelProto:
    """Export `module(**example_inputs)` to ONNX at `path` (atomically) and return the model.

    dynamic_axes maps ONNX input name -> {axis: dim name}; the default makes axes 0 and 1 of every input
    dynamic as "batch" and "sequence". A module whose inputs nest (a list of cache tensors) passes the
    flattened `input_names` and torch's `dynamic_shapes` structure itself; dynamic_axes then only names
    the dims.
    """
    onnx_program, dynamic_axes = trace_to_onnx(module, example_inputs, output_names, dynamic_axes=dynamic_axes,
                                               fx_path=fx_path, max_sequence=max_sequence, input_names=input_names,
                                               dynamic_shapes=dynamic_shapes)
    model = onnx_program.model_proto
    model.ir_version = IR_VERSION
    name_nodes_by_module(model, strip_prefix)
    rename_dims(model, dynamic_axes)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=str(value))
    save_model(model, path)
    return model


def trace_to_onnx(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], output_names: list[str], *,
                  dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, fx_path=None, max_sequence: int = 2**15,
                  input_names: list[str] | None = None, dynamic_shapes: Mapping | None = None,
                  before_optimize=None):
    """torch.export then torch's dynamo ONNX exporter (optimize=True); returns the ONNXProgram and the
    dynamic axes used. `before_optimize(ir_model)` runs right before onnxscript's optimizer (the
    streaming exporter sets the values the optimizer may fold there)."""
    module = module.eval()
    names = input_names or list(example_inputs)
    if dynamic_axes is None:
        dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in names}
    if dynamic_shapes is None:
        dims = {}
        dynamic_shapes = {}
        for name in names:
            spec = {}
            for axis, dim_name in dynamic_axes.get(name, {}).items():
                if dim_name not in dims:
                    dims[dim_name] = torch.export.Dim(dim_name, min=1, max=2**16) if dim_name == "batch" else torch.export.Dim(dim_name, min=2, max=max_sequence)
                spec[axis] = dims[dim_name]
            dynamic_shapes[name] = spec or None
    hook = contextlib.nullcontext()
    if before_optimize is not None:
        optimize = torch.onnx.ONNXProgram.optimize

        def prepared_optimize(self):
            before_optimize(self.model)
            optimize(self)

        hook = mock.patch.object(torch.onnx.ONNXProgram, "optimize", prepared_optimize)
    try:
        with torch.no_grad(), warnings.catch_warnings(), hook:
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (), kwargs=dict(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
            if fx_path:
                Path(fx_path).write_text(program.graph_module.print_readable(print_output=False), encoding="utf-8")
            onnx_program = torch.onnx.export(program, (), kwargs=dict(example_inputs), input_names=names,
                                             output_names=output_names, opset_version=MIN_OPSET, dynamo=True,
                                             verbose=False, optimize=True, external_data=False)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"could not export {type(module).__name__}: {str(exc).splitlines()[0]}") from exc
    return onnx_program, dynamic_axes


def name_nodes_by_module(model: onnx.ModelProto, strip_prefix: str) -> None:
    """MatMul/Gemm/LayerNormalization nodes take the name of the module that emitted them."""
    taken = {n.name for n in model.graph.node}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "LayerNormalization"):
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), None)
        if not scopes:
            continue
        try:
            scope_list = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        if len(scope_list) < 2:
            continue
        module_path = scope_list[-2]
        if strip_prefix and module_path.startswith(strip_prefix):
            module_path = module_path[len(strip_prefix):]
        if not module_path or module_path in taken:
            continue
        taken.discard(node.name)
        node.name = module_path
        taken.add(module_path)


def rename_dims(model: onnx.ModelProto, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    mapping = {}
    for value in model.graph.input:
        for axis, dim_name in dynamic_axes.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param:
                mapping[dims[axis].dim_param] = dim_name
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]
    # Outputs named in dynamic_axes take the names given (a present cache's "past + sequence" expression).
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in dynamic_axes.get(value.name, {}).items():
            if axis < len(dims) and dims[axis].dim_param:
                dims[axis].dim_param = dim_name
