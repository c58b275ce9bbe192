"""Small models, good and awkward, for the nothing-lost tests and the CLI fuzzer.

Each builder returns a ModelProto; `save` writes it with IR version 10. The token models read
`input_ids` through an embedding Gather into a hidden linear and an LM head that writes `logits`, so
the same file serves quantize, eval and inspect.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

HIDDEN = 16
# The vocabulary of all-MiniLM-L6-v2's tokenizer (installed by setup): a token model this size
# calibrates from real text through it.
MINILM_VOCAB = 30522


def save(model: onnx.ModelProto, path) -> str:
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def _model(nodes, inputs, outputs, inits, opset: int = 21, vocab: int | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if vocab:
        model.metadata_props.add(key="fptq_graph.vocab_size", value=str(vocab))
    model.ir_version = 10
    return model


def token_model(vocab: int = 50, dtype: int = T.FLOAT, ids_shape=("b", "s"), positions: int | None = None,
                seed: int = 0) -> onnx.ModelProto:
    """input_ids -> Gather(emb) [+ Gather(pos, 0..S-1)] -> hidden linear -> LM head -> logits."""
    rng = np.random.default_rng(seed)
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, HIDDEN)).astype(np_type), "emb"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) * 0.3).astype(np_type), "w_hidden"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, vocab)) * 0.3).astype(np_type), "w_head")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed")]
    last = "h"
    if positions:
        inits += [numpy_helper.from_array(rng.standard_normal((positions, HIDDEN)).astype(np_type), "pos"),
                  numpy_helper.from_array(np.array(0, np.int64), "zero"),
                  numpy_helper.from_array(np.array(1, np.int64), "one")]
        nodes += [helper.make_node("Shape", ["input_ids"], ["shape"], start=-1),
                  helper.make_node("Squeeze", ["shape"], ["length"]),
                  helper.make_node("Range", ["zero", "length", "one"], ["position_ids"]),
                  helper.make_node("Gather", ["pos", "position_ids"], ["pe"], name="position_table"),
                  helper.make_node("Add", ["h", "pe"], ["hp"])]
        last = "hp"
    nodes += [helper.make_node("MatMul", [last, "w_hidden"], ["hid"], name="hidden"),
              helper.make_node("MatMul", ["hid", "w_head"], ["logits"], name="lm_head")]
    # No value_info for the activations (as many exporters write): their types are for us to infer.
    outputs = [helper.make_tensor_value_info("logits", dtype, [*ids_shape, vocab])]
    model = _model(nodes, [helper.make_tensor_value_info("input_ids", T.INT64, list(ids_shape))], outputs, inits,
                   vocab=vocab)
    return model


def float_input_model(k: int = 16, n: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x [b, s, K] float -> MatMul -> Relu -> MatMul: an encoder sub-graph with no tokens."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((k, k)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((k, n)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["b", "s", k])],
                  [helper.make_tensor_value_info("y", T.FLOAT, ["b", "s", n])], inits)


def inf_in_first_weight() -> onnx.ModelProto:
    model = float_input_model()
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[2, 3] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    return model


def matmul_in_if() -> onnx.ModelProto:
    """A linear at top level and one inside an If branch that reads an outer-scope weight."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((HIDDEN, HIDDEN)) * 0.3).astype(np.float32)
    then_graph = helper.make_graph([helper.make_node("MatMul", ["a", "w_inner"], ["t"], name="inner")], "then", [],
                                   [helper.make_tensor_value_info("t", T.FLOAT, ["b", HIDDEN])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", T.FLOAT, ["b", HIDDEN])])
    nodes = [helper.make_node("MatMul", ["x", "w_outer"], ["a"], name="outer"),
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    inits = [numpy_helper.from_array(w, "w_outer"), numpy_helper.from_array(w.T.copy(), "w_inner"),
             numpy_helper.from_array(np.array(0, np.float32), "zero")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["b", HIDDEN])],
                  [helper.make_tensor_value_info("y", T.FLOAT, ["b", HIDDEN])], inits)


def unsupported_linears() -> onnx.ModelProto:
    """Only linears we skip: a Gemm with transA=1 and a MatMul with a [1, K, N] weight."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((HIDDEN, 8)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], name="gemm_ta", transA=1),
             helper.make_node("MatMul", ["x3", "w3"], ["b"], name="matmul_3d")]
    return _model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, [HIDDEN, 4]),
                          helper.make_tensor_value_info("x3", T.FLOAT, [2, 3, HIDDEN])],
                  [helper.make_tensor_value_info("a", T.FLOAT, [4, 8]), helper.make_tensor_value_info("b", T.FLOAT, [2, 3, 8])],
                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w[None], "w3")])


def no_inputs() -> onnx.ModelProto:
    w = np.ones((HIDDEN, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["c", "w"], ["a"], name="const_linear")]
    return _model(nodes, [], [helper.make_tensor_value_info("a", T.FLOAT, [2, 4])],
                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones((2, HIDDEN), np.float32), "c")])
