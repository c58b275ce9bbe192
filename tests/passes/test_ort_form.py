"""The `ort` form (com.microsoft.MatMulNBits weights): the same numbers as the qdq form and the numpy reference."""
import numpy as np
import onnx
import pytest

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.errors import FptqError
from fptq_graph.passes.lower.emit_ort import nbits_weight
from fptq_graph.runtime import session


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [16, 32])
def test_ort_form_equals_qdq_form(symmetric, group):
    rng = np.random.default_rng(group + symmetric)
    model, w = C.ln_block(30.0, rng, u_scale=0.5)   # K2 = 40: the last block of lin_c is partial
    calib = C.feeds(rng, 2)
    forms = {f: quantize(model, calib, Config(recipe="fptq-paper", format=f, group_size=group, symmetric=symmetric, sqnr_samples=0,
                                              progress=False)) for f in ("qdq", "ort")}
    ops = [n.op_type for n in forms["ort"].model.graph.node]
    assert ops.count("MatMulNBits") == 4 and "MatMul" not in ops
    assert ("com.microsoft", 1) in [(o.domain, o.version) for o in forms["ort"].model.opset_import]
    assert [r["scheme"] for r in forms["ort"].layers] == [r["scheme"] for r in forms["qdq"].layers]
    test = C.feeds(np.random.default_rng(7), 1)[0]
    qdq, ort_ = (session(r.model).run(None, test) for r in forms.values())
    for a, b in zip(ort_, qdq):
        assert C.rel_err(a, b) <= 1e-5
    # and against the independent reference for the plain-input linear
    inits = {i.name: i for i in forms["ort"].model.graph.initializer}
    c_scale = float(onnx.numpy_helper.to_array(inits["lin_c.act_scale"]))
    ref = C.fake_quant_static(test["u"] * w["u_scale"], c_scale) @ C.ref_int4(w["W4"], group, symmetric)
    assert C.rel_err(ort_[2], ref) <= 1e-4


def test_nbits_layout_low_nibble_first_along_k():
    q = np.arange(-8, 8, dtype=np.int8).reshape(16, 1)        # K=16, N=1: codes 0..15 after +8
    packed = nbits_weight(q, 16, 8)
    assert packed.shape == (1, 1, 8)
    assert list(packed[0, 0]) == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]


def test_ort_form_refuses_groups_matmulnbits_cannot_take():
    for group in (48, 8, 512):   # MatMulNBits takes 16, 32, 64, 128, 256
        with pytest.raises(FptqError, match=f"takes group sizes 16, 32, 64, 128, 256, got {group}"):
            Config(recipe="fptq-paper", format="ort", group_size=group).validate()
    with pytest.raises(FptqError, match="INT4 weights"):
        Config(format="ort", recipe="w8a8-smoothquant").validate()


@pytest.mark.parametrize("group", [16, 32])
def test_ort_accuracy_level_4_leaves_activations_to_the_kernel(group):
    """--ort-accuracy-level 4: every MatMulNBits at level 4 and no activation QDQ in the graph; ONNX
    Runtime's CPU kernel quantizes each float input to int8 per block of K (numpy model:
    crafted.ort_requantize) and multiplies by the INT4 weights. The schemes (and LAE folds) stay."""
    rng = np.random.default_rng(group)
    model, w = C.ln_block(30.0, rng, u_scale=0.5)
    calib = C.feeds(rng, 2)
    forms = {level: quantize(model, calib, Config(recipe="fptq-paper", format="ort", group_size=group,
                                                  ort_accuracy_level=level, sqnr_samples=0, progress=False))
             for level in (0, 4)}
    nodes = forms[4].model.graph.node
    assert {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert not [n.op_type for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Round")]
    assert [r["scheme"] for r in forms[4].layers] == [r["scheme"] for r in forms[0].layers]
    test = C.feeds(np.random.default_rng(7), 1)[0]
    exact, fast = (session(r.model).run(None, test) for r in (forms[0], forms[4]))
    ref = C.ort_requantize(test["u"] * w["u_scale"], group) @ C.ref_int4(w["W4"], group, True)
    assert C.rel_err(fast[2], ref) <= 1e-4
    for a, b in zip(fast, exact):   # per-block int8 against the graph's per-tensor int8: close, not equal
        assert 0 < C.rel_err(a, b) <= 2e-2


def test_ort_accuracy_level_only_for_the_ort_form():
    with pytest.raises(FptqError, match="ort_accuracy_level applies to format 'ort'"):
        Config(format="qdq", ort_accuracy_level=4).validate()
    with pytest.raises(FptqError, match="must be 0 or 4"):
        Config(format="ort", ort_accuracy_level=2).validate()
