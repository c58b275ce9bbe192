"""The bundled op fptq::W8A8MatMul (int8 weights; the w4a8 form's int8 LM head): every CPU kernel this
machine runs against the float64 numpy reference and onnx's ReferenceEvaluator, all of them bitwise
equal, exact where ONNX Runtime's u8 x s8 kernel saturates (full-range codes on both sides), thread
count independent, weights packed per Run when they are graph inputs, and bad input refused clearly."""
import numpy as np
import pytest
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from fptq_graph import runtime
from fptq_graph.runtime.w4a8_op import MAX_INT8_GROUP, W8A8MatMulReference, pack_weight_int8, reference_int8
from test_w4a8_isa import ISAS, check_every_kernel, node_model, rel_err, run_on

# (M, K, N, group, static, dtype): decode (M = 1..3) and prefill row counts, per output channel
# (group = K, the LM head) and per group, K and groups not a multiple of 8, N below a vector and odd.
CASES = [
    (1, 576, 77, 576, False, np.float32),
    (1, 300, 130, 300, True, np.float32),
    (2, 200, 33, 64, True, np.float32),
    (3, 1000, 129, 1000, False, np.float16),
    (5, 264, 47, 20, False, np.float32),
    (17, 90, 19, 1, False, np.float32),
    (64, 7, 9, 7, True, np.float16),
    (130, 576, 35, 576, False, np.float32),
]


def op_model(K, N, group, *, static, dtype=np.float32, seed=0, codes=None, constant_weights=True):
    """One W8A8MatMul node with bias over int8 weights (random, or `codes` [K, N]); returns (model, arrays)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (K, N)).astype(np.int8) if codes is None else codes
    weight = pack_weight_int8(q, group)
    w = {"W": weight, "S": (rng.random((N, weight.shape[1] // group)) * 0.01 + 1e-3).astype(np.float32),
         "A": np.array(0.05, np.float32), "B": rng.standard_normal(N).astype(np.float32)}
    return node_model("W8A8MatMul", "head", w, K, N, group, static=static, dtype=dtype, constant_weights=constant_weights)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-g{c[3]}-{'static' if c[4] else 'token'}-"
                                                      f"{np.dtype(c[5]).name}")
def test_every_cpu_kernel_matches_reference_and_each_other_bitwise(case, monkeypatch):
    check_every_kernel(case, op_model, reference_int8, monkeypatch)


def test_reference_evaluator_agrees():
    """The schema and the ReferenceEvaluator class: onnx's evaluator runs the node with our reference."""
    model, w = op_model(96, 21, 96, static=False, seed=4)
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)
    got = ReferenceEvaluator(model, new_ops=[W8A8MatMulReference]).run(None, {"X": x})[0]
    assert rel_err(runtime.session(model).run(None, {"X": x})[0], got.astype(np.float64)) <= 1e-6


@pytest.mark.parametrize("isa", ISAS)
def test_full_range_codes_do_not_saturate(isa, monkeypatch):
    """Every activation code at +-127/-128 against every weight code at +-127/-128, in the signs that make
    each product largest: ONNX Runtime's u8 x s8 MLAS kernel without VNNI (vpmaddubsw) saturated exactly
    this (README, "CPUs without VNNI"); every kernel of ours must return the exact sums."""
    K, N = 512, 24
    codes = np.where(np.arange(N) % 2, 127, -128).astype(np.int8)[None, :].repeat(K, 0)
    codes[::3] = -codes[::3].clip(-127, 127)            # mixed signs along K too
    model, w = op_model(K, N, K, static=True, codes=codes)
    x = np.where(np.arange(K) % 2, 127, -128).astype(np.float32)[None, :] * np.float32(0.05)   # codes 127 / -128
    x = np.concatenate([x, -x, np.full((1, K), 127 * 0.05, np.float32)])
    ref = reference_int8(x, w["W"], w["S"], w["A"], w["B"], K, N, K)
    got = run_on(isa, monkeypatch, model, {"X": x})
    assert rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_a_bit(isa, monkeypatch):
    model, _ = op_model(576, 333, 576, static=False, seed=3)
    for M in (1, 4, 130):
        x = np.random.default_rng(M).standard_normal((M, 576)).astype(np.float32)
        one, two = (run_on(isa, monkeypatch, model, {"X": x}, threads=t) for t in (1, 2))
        assert np.array_equal(one.view(np.uint32), two.view(np.uint32)), (isa, M)


@pytest.mark.parametrize("isa", ISAS)
def test_weights_as_graph_inputs_are_packed_per_run(isa, monkeypatch):
    K, N, group = 300, 77, 60
    const_model, w = op_model(K, N, group, static=True, seed=5)
    input_model, _ = op_model(K, N, group, static=True, seed=5, constant_weights=False)
    x = (np.random.default_rng(6).standard_normal((9, K)) * 3).astype(np.float32)
    monkeypatch.setenv("FPTQ_CPU_ISA", isa)
    session = runtime.session(input_model)
    assert np.array_equal(session.run(None, {"X": x, "W": w["W"], "S": w["S"]})[0], run_on(isa, monkeypatch, const_model, {"X": x}))
    other_w = pack_weight_int8(np.random.default_rng(7).integers(-128, 128, (K, N)).astype(np.int8), group)
    got = session.run(None, {"X": x, "W": other_w, "S": w["S"]})[0]
    assert rel_err(got, reference_int8(x, other_w, w["S"], w["A"], w["B"], K, N, group)) <= 1e-5


@pytest.mark.parametrize("case,match", [
    # ONNX Runtime checks the declared type against the op's at load, naming the op and node
    ("uint8 weight", r"tensor\(uint8\)' of input parameter \(W\) of operator \(W8A8MatMul\) in node \(head\) is invalid"),
    ("weight shape", r"W8A8MatMul 'head'.*int8 weight \(input 1\) has shape \[8, 32\], expected \[8, 64\]"),
    ("group too large", rf"W8A8MatMul 'head'.*group_size must be in \[1, {MAX_INT8_GROUP}\]"),
])
def test_bad_inputs_fail_clearly(case, match):
    model, _ = op_model(64, 8, 64, static=False, constant_weights=False)
    weight = np.zeros((8, 64), np.int8)
    if case == "uint8 weight":
        model.graph.input[1].type.tensor_type.elem_type = TensorProto.UINT8
        weight = weight.view(np.uint8)
    elif case == "weight shape":
        model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 32
        weight = weight[:, :32].copy()
    else:
        next(a for a in model.graph.node[0].attribute if a.name == "group_size").i = MAX_INT8_GROUP + 1
    feeds = {"X": np.ones((2, 64), np.float32), "W": weight, "S": np.ones((8, 1), np.float32)}
    with pytest.raises(Exception, match=match):
        runtime.session(model).run(None, feeds)
