"""INT4 packing and group-wise quantization against onnx's own helpers and ReferenceEvaluator."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from crafted import ref_int4
from fptq_graph.quant.int4 import pack_int4, quantize_groupwise, unpack_int4


@pytest.mark.parametrize("shape", [(8, 4), (7, 3), (1, 1), (130, 5)])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_matches_onnx_helpers(shape, signed):
    rng = np.random.default_rng(1)
    lo, hi = (-8, 8) if signed else (0, 16)
    values = rng.integers(lo, hi, size=shape)
    kind = TensorProto.INT4 if signed else TensorProto.UINT4
    ours = helper.make_tensor("t", kind, list(shape), pack_int4(values), raw=True)
    # onnx's own reader decodes our bytes to the same values ...
    np.testing.assert_array_equal(numpy_helper.to_array(ours).astype(np.int64), values)
    # ... and onnx's own writer produces the same bytes (first value in the low nibble).
    theirs = numpy_helper.from_array(values.astype(onnx.helper.tensor_dtype_to_np_dtype(kind)), "t")
    assert theirs.raw_data == ours.raw_data
    np.testing.assert_array_equal(unpack_int4(ours.raw_data, values.size, signed).reshape(shape), values)


def test_low_nibble_first():
    assert pack_int4(np.array([1, 2])) == bytes([0x21])
    assert pack_int4(np.array([-1, 3, 5])) == bytes([0x3F, 0x05])


@pytest.mark.parametrize("k,group", [(256, 128), (200, 64), (96, 32), (50, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_groupwise_dequant_through_reference_evaluator(k, group, symmetric):
    rng = np.random.default_rng(k + group)
    n = 5
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[3, 2] = 9.0  # an outlier inside one group only
    qw = quantize_groupwise(w, group, symmetric)
    assert qw.scale.shape == (-(-k // group), n)
    kind = TensorProto.INT4 if symmetric else TensorProto.UINT4
    inits = [helper.make_tensor("w", kind, [k, n], pack_int4(qw.q), raw=True), numpy_helper.from_array(qw.scale, "s")]
    inputs = ["w", "s"]
    if not symmetric:
        inits.append(helper.make_tensor("zp", TensorProto.UINT4, list(qw.zero_point.shape), pack_int4(qw.zero_point), raw=True))
        inputs.append("zp")
    node = helper.make_node("DequantizeLinear", inputs, ["y"], axis=0, block_size=group)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    (y,) = ReferenceEvaluator(model).run(None, {})
    # Independent float64 reference of the same quantizer; float32 scales allow ~1e-6 relative.
    np.testing.assert_allclose(y, ref_int4(w, group, symmetric), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, qw.dequantize(), rtol=1e-6, atol=1e-7)
    # Round to nearest: every element within half a step of its group's scale, except a symmetric
    # weight opposite its group's extreme that needed +8 and was clipped to 7: within one step.
    step = np.abs(np.repeat(qw.scale, group, axis=0)[:k])
    clipped = (qw.q == 7) & (np.abs(w / np.repeat(qw.scale, group, axis=0)[:k]) > 7.5) if symmetric else False
    assert np.all((np.abs(y - w) <= step / 2 + 1e-5) | (clipped & (np.abs(y - w) <= step + 1e-5)))
    assert qw.q.min() >= (-8 if symmetric else 0) and qw.q.max() <= (7 if symmetric else 15)


def test_zero_group_gets_unit_scale():
    w = np.zeros((64, 2), np.float32)
    qw = quantize_groupwise(w, 32)
    assert np.all(qw.scale == 1.0) and np.all(qw.q == 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_sqnr_by_column_blocks_matches_float64(bits):
    """weight_sqnr dequantizes an int8 weight a block of columns at a time (a wide LM head is never held
    whole in float): the same value as the whole-array float64 formula, to float64 rounding."""
    from fptq_graph.quant.int8 import quantize_per_channel_int8
    from fptq_graph.passes.rewrite.quantize_weights import weight_sqnr

    rng = np.random.default_rng(7)
    w = rng.standard_normal((96, 70000)).astype(np.float32)   # > 2^22 elements: several column blocks
    qw = quantize_per_channel_int8(w) if bits == 8 else quantize_groupwise(w, 32)
    approx = qw.dequantize()
    ref = w.astype(np.float64)
    expected = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - approx.astype(np.float64)) ** 2))
    assert abs(weight_sqnr(w, qw) - expected) < 1e-9
    cols = slice(1234, 5678)
    np.testing.assert_array_equal(qw.dequantize(cols), approx[:, cols])
