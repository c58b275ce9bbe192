"""The CPU kernel of fptq::W4A8MatMul on every instruction set this machine runs (FPTQ_CPU_ISA, read
when ONNX Runtime creates the kernel): each against the float64 numpy reference, all of them bitwise
equal to each other, independent of the thread count, right with weights that are graph inputs
(packed per Run instead of once), and a clear error for a path that does not exist or cannot run."""
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fptq_graph import runtime
from fptq_graph.quant.int4 import quantize_groupwise
from fptq_graph.runtime.w4a8_op import pack_weight, reference

ISAS = runtime.library_info()["cpu_isas"]      # best first; generic is always there

# (M, K, N, group, static, dtype): every M of the issue, K not a multiple of the group, odd N and N
# below one vector, groups 32/64/128 and one that is not a multiple of 8 (padded layout).
CASES = [
    (1, 300, 77, 32, True, np.float32),
    (2, 200, 33, 64, False, np.float32),
    (3, 520, 5, 128, False, np.float16),
    (5, 1000, 129, 128, True, np.float32),
    (16, 264, 47, 64, False, np.float32),
    (33, 130, 64, 32, True, np.float16),
    (128, 300, 35, 128, False, np.float32),
    (4, 90, 19, 20, False, np.float32),
    (7, 90, 40, 6, True, np.float32),
]


def node_model(op_type: str, name: str, w: dict, K, N, group, *, static, dtype, constant_weights=True):
    """One fptq op node (W4A8MatMul or W8A8MatMul) with bias over the arrays `w` (W, S, A, B); A is dropped
    unless static. constant_weights=False: W and scales are graph inputs, fed at Run (packed per Run)."""
    names = ["X", "W", "S", "A" if static else "", "B"]
    if not static:
        w.pop("A", None)
    node = helper.make_node(op_type, names, ["Y"], domain="fptq", name=name, K=K, N=N, group_size=group)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inputs = [helper.make_tensor_value_info("X", elem, ["m", K])]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    if not constant_weights:
        inputs += [helper.make_tensor_value_info("W", helper.np_dtype_to_tensor_dtype(w["W"].dtype), list(w["W"].shape)),
                   helper.make_tensor_value_info("S", TensorProto.FLOAT, list(w["S"].shape))]
        inits = [i for i in inits if i.name not in ("W", "S")]
    graph = helper.make_graph([node], "op", inputs, [helper.make_tensor_value_info("Y", elem, ["m", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("fptq", 1)])
    model.ir_version = 10
    return model, w


def op_model(K, N, group, *, static, dtype, seed, constant_weights=True):
    """One W4A8MatMul node with bias over random INT4 weights; returns (model, arrays)."""
    rng = np.random.default_rng(seed)
    qw = quantize_groupwise(rng.standard_normal((K, N)).astype(np.float32), group)
    w = {"W": pack_weight(qw.q, group), "S": np.ascontiguousarray(qw.scale.T),
         "A": np.array(0.05, np.float32), "B": rng.standard_normal(N).astype(np.float32)}
    return node_model("W4A8MatMul", "lin", w, K, N, group, static=static, dtype=dtype, constant_weights=constant_weights)


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def run_on(isa, monkeypatch, model, feeds, threads=None):
    monkeypatch.setenv("FPTQ_CPU_ISA", isa)
    return runtime.session(model, threads=threads).run(None, feeds)[0]


def test_library_info_names_the_kernel_that_runs(monkeypatch):
    info = runtime.library_info()
    assert info["cpu_isa"] == ISAS[0] and ISAS[-1] == "generic"
    monkeypatch.setenv("FPTQ_CPU_ISA", "generic")
    assert runtime.library_info()["cpu_isa"] == "generic"
    monkeypatch.setenv("FPTQ_CPU_ISA", "sse9")
    assert runtime.library_info()["cpu_isa"] is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-g{c[3]}-{'static' if c[4] else 'token'}-"
                                                      f"{np.dtype(c[5]).name}")
def test_every_cpu_kernel_matches_reference_and_each_other_bitwise(case, monkeypatch):
    check_every_kernel(case, op_model, reference, monkeypatch)


def check_every_kernel(case, make_model, reference_fn, monkeypatch):
    """Every CPU kernel this machine runs against the float64 reference, and bitwise against each other."""
    M, K, N, group, static, dtype = case
    model, w = make_model(K, N, group, static=static, dtype=dtype, seed=M + K)
    x = (np.random.default_rng(M).standard_normal((M, K)) * 3).astype(dtype)
    ref = reference_fn(x, w["W"], w["S"], w.get("A"), w["B"], K, N, group)
    outs = {isa: run_on(isa, monkeypatch, model, {"X": x}) for isa in ISAS}
    for isa, out in outs.items():
        assert out.dtype == dtype and out.shape == (M, N)
        # float32 sums of exact int32 group dots: about 1e-7; one int8 rounding off would be ~1e-3
        assert rel_err(out, ref) <= (1e-5 if dtype == np.float32 else 2e-3), isa
    first = ISAS[0]
    for isa, out in outs.items():
        assert np.array_equal(out.view(np.uint8), outs[first].view(np.uint8)), f"{isa} differs from {first}"


@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_a_bit(isa, monkeypatch):
    model, _ = op_model(1000, 333, 128, static=False, dtype=np.float32, seed=3)
    for M in (1, 4, 130):
        x = np.random.default_rng(M).standard_normal((M, 1000)).astype(np.float32)
        one, two = (run_on(isa, monkeypatch, model, {"X": x}, threads=t) for t in (1, 2))
        assert np.array_equal(one.view(np.uint32), two.view(np.uint32)), (isa, M)


@pytest.mark.parametrize("isa", ISAS)
def test_weights_as_graph_inputs_are_packed_per_run(isa, monkeypatch):
    K, N, group = 300, 77, 64
    const_model, w = op_model(K, N, group, static=True, dtype=np.float32, seed=5)
    input_model, _ = op_model(K, N, group, static=True, dtype=np.float32, seed=5, constant_weights=False)
    onnx.checker.check_model(input_model, full_check=True)
    x = (np.random.default_rng(6).standard_normal((9, K)) * 3).astype(np.float32)
    monkeypatch.setenv("FPTQ_CPU_ISA", isa)
    session = runtime.session(input_model)
    got = session.run(None, {"X": x, "W": w["W"], "S": w["S"]})[0]
    assert np.array_equal(got, run_on(isa, monkeypatch, const_model, {"X": x}))
    # other weights through the same session: nothing from the first Run is kept
    other_w = pack_weight(np.random.default_rng(7).integers(-8, 8, (K, N)).astype(np.int8), group)
    other_s = np.abs(w["S"][::-1]).copy()
    got = session.run(None, {"X": x, "W": other_w, "S": other_s})[0]
    assert rel_err(got, reference(x, other_w, other_s, w["A"], w["B"], K, N, group)) <= 1e-5


def test_unknown_cpu_kernel_is_refused_at_session_creation(monkeypatch):
    model, _ = op_model(64, 8, 32, static=True, dtype=np.float32, seed=0)
    monkeypatch.setenv("FPTQ_CPU_ISA", "sse9")
    with pytest.raises(Exception, match=r"FPTQ_CPU_ISA=sse9 is not a CPU kernel of this library; it has: .*generic") as e:
        runtime.session(model)
    # the library's own CPUID check lists what this CPU runs, in its message as in library_info (which asks it)
    runs = re.search(r"this CPU runs: ([a-z0-9, ]+)\)", str(e.value)).group(1).split(", ")
    assert runs == ISAS


def test_cpu_kernel_this_cpu_lacks_is_refused(monkeypatch):
    lacking = [isa for isa in runtime.library_info()["cpu_isas_built"] + ["avx512vnni", "avxvnni", "avx2"] if isa not in ISAS]
    if not lacking:
        pytest.skip(f"this CPU runs every CPU kernel ({', '.join(ISAS)}): none to refuse")
    model, _ = op_model(64, 8, 32, static=True, dtype=np.float32, seed=0)
    monkeypatch.setenv("FPTQ_CPU_ISA", lacking[0])
    # built but beyond this CPU, or (another architecture) not built at all
    with pytest.raises(Exception, match=rf"FPTQ_CPU_ISA={lacking[0]} (asks for a CPU kernel this CPU cannot run"
                                        r"|is not a CPU kernel of this library)"):
        runtime.session(model)
