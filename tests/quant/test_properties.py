"""Property tests (hypothesis): quantize/dequantize bounds, INT4 packing, and the equalization fold's
float equivalence on randomly generated small LayerNorm -> sibling-linears graphs."""
import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from fptq_graph import Config
from fptq_graph.calibration import FeedsCalibration
from fptq_graph.quant.int4 import pack_int4, quantize_groupwise, unpack_int4
from fptq_graph.runtime import session
from helpers import run_until

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 6)), elements=finite),
       st.sampled_from([2, 4, 8, 16, 32]), st.booleans())
def test_int4_codes_in_range_and_error_within_half_a_step(w, group, symmetric):
    q = quantize_groupwise(w, group, symmetric)
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert q.q.min() >= lo and q.q.max() <= hi
    assert q.scale.shape == (-(-w.shape[0] // group), w.shape[1]) and np.all(q.scale != 0)
    step = np.abs(np.repeat(q.scale, group, axis=0)[: w.shape[0]].astype(np.float64))
    err = np.abs(q.dequantize().astype(np.float64) - w)
    # round to nearest: half a step, plus the float32 rounding of the scale. Clipping costs at most one
    # more half step: the symmetric grid's +8 (a weight opposite the extreme), or the asymmetric grid's
    # rounded zero point.
    assert np.all(err <= step * (1 + 1e-5) + 1e-6)
    if symmetric:   # the extreme weight of every group is exact (code -8)
        grouped = np.zeros((q.scale.shape[0] * group, w.shape[1]), np.float64)
        grouped[: w.shape[0]] = w
        extreme = np.abs(grouped.reshape(-1, group, w.shape[1])).max(axis=1)
        np.testing.assert_allclose(np.abs(q.scale) * 8, np.where(extreme > 0, np.maximum(extreme, 8 * 1.1754944e-38), 8.0),
                                   rtol=1e-6)
    zero_groups = np.all(w.reshape(-1) == 0)
    if zero_groups:
        assert np.all(q.dequantize() == 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=0, max_size=99))
def test_int4_pack_round_trip(values):
    values = np.array(values, dtype=np.int8)
    data = pack_int4(values)
    assert len(data) == (len(values) + 1) // 2
    np.testing.assert_array_equal(unpack_int4(data, len(values)), values)
    unsigned = (values.astype(np.int16) + 8).astype(np.uint8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(unsigned), len(values), signed=False), unsigned)


def ln_siblings(k: int, widths: list[int], gamma_scale: float, rng) -> onnx.ModelProto:
    """x -> LayerNorm(gamma, beta) -> one MatMul per width (siblings sharing the normalized input)."""
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1)]
    inits = [numpy_helper.from_array((gamma_scale * (0.2 + rng.random(k))).astype(np.float32), "gamma"),
             numpy_helper.from_array((rng.standard_normal(k)).astype(np.float32), "beta")]
    outputs = []
    for i, n in enumerate(widths):
        nodes.append(helper.make_node("MatMul", ["y", f"w{i}"], [f"o{i}"], name=f"lin{i}"))
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        outputs.append(helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, ["b", n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 48), st.lists(st.integers(1, 12), min_size=1, max_size=3), st.floats(0.5, 200.0),
       st.sampled_from(["fptq", "smoothquant-w4a8"]), st.integers(0, 2**16))
def test_equalization_fold_keeps_the_float_outputs(k, widths, gamma_scale, recipe, seed):
    rng = np.random.default_rng(seed)
    model = ln_siblings(k, widths, gamma_scale, rng)
    x = (rng.standard_normal((16, k)) * 3).astype(np.float32)
    x[:, 0] *= 10
    # bounds that put every linear in the LAE band, so the fold happens whatever the range
    config = Config(recipe=recipe, static_bound=0.0, dynamic_bound=1e30, progress=False)
    state, folded = run_until(model, FeedsCalibration([{"x": x}]), config, "fold_equalization")
    assert all(p.eq_scale is not None for p in state.plan.values())
    test = {"x": (rng.standard_normal((4, k)) * 3).astype(np.float32)}
    for ref, out in zip(session(model).run(None, test), session(folded).run(None, test)):
        assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
