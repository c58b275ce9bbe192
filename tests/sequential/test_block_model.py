"""A block as a model of its own (sequential/block_model.py): what it declares and what it computes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fptq_graph.ir.opset import IR_VERSION
from fptq_graph.ir.split_model import split_proto
from fptq_graph.runtime.sessions import session
from fptq_graph.sequential.blocks import Block
from fptq_graph.sequential.block_model import block_model


def _chain() -> onnx.ModelProto:
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> Tanh -> y, every inner tensor declared in value_info."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("MatMul", ["b", "w2"], ["c"], name="mm2"), helper.make_node("Tanh", ["c"], ["y"], name="tanh")]
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 64]) for name in "abc"]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")], value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=IR_VERSION)


def test_a_block_model_keeps_the_declared_types_of_its_inner_tensors_and_computes_the_same():
    # Without its inner tensors' declared types ONNX Runtime infers every one while it makes the session
    # (3.5x the session time on SmolLM2's graph), a cost every block model paid.
    model = split_proto(_chain())
    block = Block(index=1, nodes=[1, 2, 3], linears=["mm2"], inputs=["a"], outputs=["c", "y"])
    got = block_model(model, block, {"a": np.dtype(np.float32)})
    declared = {v.name for v in got.proto.graph.value_info}
    assert declared == {"b"}, "inner tensors only: its input 'a' and its outputs 'c', 'y' are declared as such"
    assert {v.name for v in got.proto.graph.input} == {"a"} and [v.name for v in got.proto.graph.output] == ["c", "y"]
    a = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    c, y = session(got).run(["c", "y"], {"a": a})
    w2 = model.arrays["w2"].astype(np.float64)
    reference = np.maximum(a.astype(np.float64), 0) @ w2
    np.testing.assert_allclose(c, reference, rtol=1e-5, atol=1e-4)   # float32 accumulation over 64 terms
    np.testing.assert_allclose(y, np.tanh(reference), rtol=1e-5, atol=1e-4)
