"""The guard issue 30 asked for: no form's lowering may put a linear on an ONNX Runtime CPU kernel known to
be slow or inexact (fptq_graph.runtime.kernel_audit: s8 x s8 integer MatMuls, u8 x s8 ones that saturate
without VNNI, MatMulNBits bits=8 below accuracy level 4, a weight dequantized every Run). The audit reads
the graph ORT runs after its own fusions, so a QDQ pattern ORT rewrites into a slow kernel is caught too.
The negative controls prove each rule fires: among them the w4a8 head of 4baa5d5, which made SmolLM2's
decode 2x slower than float."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import bad_models
from fptq_graph import Config, quantize
from fptq_graph.runtime import session_options
from fptq_graph.runtime.kernel_audit import DQ_EVERY_RUN, NBITS8_LOW_LEVEL, S8_X_S8, U8_X_S8, audit_cpu_kernels
from test_lm_head import tied_model, token_ids

FORMS = {"qdq": {"format": "qdq"}, "w4a8": {"format": "w4a8"}, "ort": {"format": "ort"},
         "ort-acc4": {"format": "ort", "ort_accuracy_level": 4}}
SCHEMES = {"static": dict(static_bound=1e6, dynamic_bound=2e6), "dynamic": dict(static_bound=0.0, dynamic_bound=1e-3)}


def check_form(form: str, findings) -> None:
    """ort and w4a8: nothing at all. qdq: its LM head clean; what is left is the form's own INT4 linears
    behind static QDQ, which ORT 1.31 cannot fuse (the form is for exchange; stated in the README)."""
    on_head = [f for f in findings if f.node.startswith("lm_head")]
    assert not on_head, on_head
    if form == "qdq":
        assert all(f.why == DQ_EVERY_RUN for f in findings), findings
    else:
        assert not findings, findings


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("form", FORMS)
def test_no_form_puts_a_linear_on_a_slow_kernel(form, scheme):
    vocab = 96
    model = bad_models.token_model(vocab=vocab, seed=3)
    result = quantize(model, [{"input_ids": token_ids(vocab)}],
                      Config(lm_head="int8", group_size=16, progress=False, **FORMS[form], **SCHEMES[scheme]))
    assert next(r for r in result.layers if r["name"] == "lm_head")["scheme"] == scheme
    check_form(form, audit_cpu_kernels(result.model))


@pytest.mark.parametrize("form", FORMS)
def test_tied_int8_head_and_its_lookup_stay_on_fast_kernels(form):
    model, _ = tied_model(vocab=2048, hidden=64)
    result = quantize(model, [{"input_ids": token_ids(2048)}],
                      Config(lm_head="int8", group_size=32, progress=False, **FORMS[form]))
    assert result.plan.head.tied
    check_form(form, audit_cpu_kernels(result.model))


@pytest.mark.parametrize("form", FORMS)
def test_smollm2_default_head_every_form(form, smollm2_onnx, calib_text):
    """The real decoder the issue measured, the CLI's defaults (int8 head tied to the table, per token)."""
    result = quantize(smollm2_onnx, str(calib_text), Config(recipe="fptq-paper", calib_samples=2, calib_seq_len=64,
                                                            sqnr_samples=0, progress=False, **FORMS[form]))
    assert result.plan.head.mode == "int8" and result.plan.head.tied
    check_form(form, audit_cpu_kernels(result.model))


def _head_model(nodes, inits, k=64, n=32):
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", T.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def test_the_rules_fire():
    k, n = 64, 32
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = np.full(n, 0.01, np.float32)
    # 4baa5d5's w4a8 head: per-token codes cast to int8 -> MatMulIntegerToFloat(s8, s8)
    old_head = _head_model([helper.make_node("Cast", ["x"], ["x8"], to=T.INT8),
                            helper.make_node("MatMulIntegerToFloat", ["x8", "W", "one", "ws"], ["y"], domain="com.microsoft",
                                             name="lm_head")], {"W": wq, "one": np.float32(1), "ws": ws})
    assert [(f.node, f.why) for f in audit_cpu_kernels(old_head)] == [("lm_head", S8_X_S8)]
    # a static QDQ head over int8 weights: ORT fuses it into an integer MatMul, s8 x s8 under our sessions'
    # qdqisint8allowed=1, u8 x s8 (saturating without VNNI) under ONNX Runtime's defaults
    qdq = _head_model([helper.make_node("QuantizeLinear", ["x", "a", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "a", "z"], ["xd"]),
                       helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], axis=1),
                       helper.make_node("MatMul", ["xd", "Wd"], ["y"], name="lm_head")],
                      {"a": np.float32(0.05), "z": np.int8(0), "W": wq, "ws": ws})
    assert {f.why for f in audit_cpu_kernels(qdq)} == {S8_X_S8}
    plain = ort.SessionOptions()
    plain.log_severity_level = 4
    assert {f.why for f in audit_cpu_kernels(qdq, plain)} == {U8_X_S8}
    nbits = _head_model([helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", name="lm_head",
                                          K=k, N=n, bits=8, block_size=64, accuracy_level=0)],
                        {"B": (wq.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, 1, 64), "S": ws.reshape(n, 1)})
    assert [f.why for f in audit_cpu_kernels(nbits)] == [NBITS8_LOW_LEVEL]
    # a weights-only int8 head, DequantizeLinear -> MatMul: ORT fuses it into that very MatMulNBits
    dq = _head_model([helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], axis=1),
                      helper.make_node("MatMul", ["x", "Wd"], ["y"], name="lm_head")], {"W": wq, "ws": ws})
    assert [f.why for f in audit_cpu_kernels(dq, session_options())] == [NBITS8_LOW_LEVEL]
    # static int8 activations x INT4 weights in QDQ (the qdq form's static linears): nothing fuses them
    w4 = numpy_helper.from_array(np.zeros((k, n), np.int8), "W4")
    w4.data_type, w4.raw_data = T.INT4, bytes(k * n // 2)
    int4 = _head_model([helper.make_node("QuantizeLinear", ["x", "a", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "a", "z"], ["xd"]),
                        helper.make_node("DequantizeLinear", ["W4", "s4"], ["Wd"], axis=0, block_size=32),
                        helper.make_node("MatMul", ["xd", "Wd"], ["y"], name="q_proj")],
                       {"a": np.float32(0.05), "z": np.int8(0), "s4": np.full((2, n), 0.01, np.float32)})
    int4.graph.initializer.append(w4)
    assert [(f.node, f.why) for f in audit_cpu_kernels(int4)] == [("q_proj", DQ_EVERY_RUN)]
