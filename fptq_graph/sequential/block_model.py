"""One block of the observed model as a model of its own: its nodes, the initializers they read (the
same mapped arrays: no copy), its cut tensors as graph inputs and its observers and hand-over tensors as
graph outputs.

Resident: the block's node list (a copy of its NodeProtos) and references to its weights.
"""
from __future__ import annotations

import numpy as np
import onnx

from fptq_graph.ir.split_model import SplitModel
from fptq_graph.ir.bodies import node_reads
from fptq_graph.sequential.blocks import Block


def block_model(observed: SplitModel, block: Block, input_dtypes: dict[str, np.dtype],
                overrides: dict[str, np.ndarray] | None = None) -> SplitModel:
    """The block as a SplitModel. input_dtypes: the element type of every cut tensor it reads (what the
    earlier blocks produced); overrides: initializer name -> array to use instead of the model's (the
    quantized-input mode's dequantized weights)."""
    source = observed.proto
    graph = source.graph
    nodes = [graph.node[i] for i in block.nodes]
    reads = {name for node in nodes for name in node_reads(node)}
    declared = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    inputs = []
    for name in block.inputs:
        if name in input_dtypes:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[name]))
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, None))
        else:
            inputs.append(declared[name])
    outputs = [declared[name] if name in declared and declared[name].type.HasField("tensor_type")
               else onnx.ValueInfoProto(name=name) for name in block.outputs]
    initializers = [init for init in graph.initializer if init.name in reads]
    # The types and shapes the model declares for the block's inner tensors go with it: without them ONNX
    # Runtime infers every one while it creates the session, 3.5x the time (timed by hand on 2026-12-05:
    # SmolLM2's whole graph 0.28 s instead of 0.08; its lowered graph 0.8 s instead of 0.14 in a quantize's
    # profile), paid by every block model.
    ends = {v.name for v in inputs} | set(block.outputs)
    made = {name for node in nodes for name in node.output}
    value_info = [v for v in graph.value_info if v.name in made and v.name not in ends]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, f"block_{block.index}", inputs, outputs, initializers, value_info=value_info),
        opset_imports=list(source.opset_import), ir_version=source.ir_version)
    overrides = overrides or {}
    arrays = {init.name: overrides.get(init.name, observed.arrays[init.name])
              for init in initializers if init.name in observed.arrays}
    return SplitModel(model, arrays)
