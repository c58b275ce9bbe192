"""The CUDA kernels of fptq::W4A8MatMul and fptq::W8A8MatMul (int8 weights), checked without a GPU: tests/cuda_emulation/emulate.cc runs
them on the CPU lane by lane, with the index math the kernels themselves use (csrc/w4a8_cuda_indexing.h)
and mma.sync / dp4a / shuffles emulated from NVIDIA's documented layouts, under AddressSanitizer. Its
activations, row scales and outputs are compared with the float64 reference and the CPU kernel, and a
deliberately wrong hardware layout must make that comparison fail."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fptq_graph import runtime
from fptq_graph.runtime.w4a8_op import pack_weight_int8, reference, reference_int8
from test_w4a8_op import op_model, rel_err

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "cuda_emulation" / "emulate.cc"
FLAGS = ["-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", f"-I{ROOT / 'csrc'}"]
ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler (the op library's build needs one too)")
    exe = tmp_path_factory.mktemp("cuda_emulation") / "emulate"
    done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return exe


def int8_weights(K, N, group, *, static, bias, seed):
    """W8A8MatMul's inputs: full-range int8 codes [N, Kp], scales [N, groups] (and A, B as op_model's)."""
    rng = np.random.default_rng(seed)
    weight = pack_weight_int8(rng.integers(-128, 128, (K, N)).astype(np.int8), group)
    w = {"W": weight, "S": (rng.random((N, weight.shape[1] // group)) * 0.01 + 1e-3).astype(np.float32)}
    if static:
        w["A"] = np.array(0.05, np.float32)
    if bias:
        w["B"] = rng.standard_normal(N).astype(np.float32)
    return w


def run_emulator(exe, tmp_path, M, K, N, group, static, bias, *, path="auto", wrong=None, seed=0, bits=4):
    """Runs one case; returns (y, xq, row_scale, inputs dict, the emulator's stdout)."""
    if bits == 8:
        model, w = None, int8_weights(K, N, group, static=static, bias=bias, seed=seed)
    else:
        model, w = op_model(K, N, group, static=static, bias=bias, seed=seed)
    x = (np.random.default_rng(seed + 1).standard_normal((M, K)) * 3).astype(np.float32)
    x[0, :3] = [0.5 * float(w.get("A", 1.0)), -1.5 * float(w.get("A", 1.0)), 2.5 * float(w.get("A", 1.0))]  # ties
    x.tofile(tmp_path / "x.bin")
    w["W"].tofile(tmp_path / "w.bin")
    w["S"].astype(np.float32).tofile(tmp_path / "s.bin")
    if bias:
        w["B"].tofile(tmp_path / "b.bin")
    args = [str(exe), str(tmp_path), str(M), str(K), str(N), str(group), repr(float(w["A"])) if static else "0",
            "1" if bias else "0", "--path", path, "--bits", str(bits)]
    if wrong:
        args += ["--wrong-layout", wrong]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, f"emulator failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    Kp = -(-K // group) * group
    y = np.fromfile(tmp_path / "y.bin", np.float32).reshape(M, N)
    xq = np.fromfile(tmp_path / "xq.bin", np.int8).reshape(M, Kp)
    rs = np.fromfile(tmp_path / "rs.bin", np.float32)
    return y, xq, rs, dict(model=model, w=w, x=x), done.stdout


def check(exe, tmp_path, M, K, N, group, static, bias, **kw):
    """The emulated kernels against the contract: exact int8 activations and row scales, Y within 1e-5 of
    the float64 reference, and (tensor-core path, no bias) bitwise what the CPU kernel computes."""
    y, xq, rs, inp, out = run_emulator(exe, tmp_path, M, K, N, group, static, bias, **kw)
    x, w = inp["x"], inp["w"]
    if static:
        a = np.full(M, w["A"], np.float32)
    else:
        a = np.maximum(np.abs(x).max(axis=1) / np.float32(127), np.float32(1e-12)).astype(np.float32)
    assert np.array_equal(rs, a), "row scales differ from the contract's"
    want = np.zeros_like(xq)
    want[:, :K] = np.clip(np.round(x / a[:, None]), -128, 127)
    assert np.array_equal(xq, want), f"int8 activations differ at {np.argwhere(xq != want)[:5].tolist()}"
    ref = (reference_int8 if kw.get("bits") == 8 else reference)(x, w["W"], w["S"], w.get("A"), w.get("B"), K, N, group)
    err = rel_err(y, ref)
    bad = np.argwhere(~(np.abs(y - ref) <= 1e-5 * np.abs(ref).max()))
    assert err <= 1e-5, (f"{out.strip()}: rel err {err:.3e} against the float64 reference; {len(bad)} of {y.size} "
                         f"outputs off, first (m, n): {bad[:6].tolist()}")
    if "gemm" in out and not bias and inp["model"] is not None:
        cpu = runtime.session(inp["model"]).run(None, {"X": x[None]})[0][0]
        assert np.array_equal(y, cpu), f"{out.strip()}: not bitwise the CPU kernel's output (max diff {np.abs(y - cpu).max()})"
    return out


GEMM_CASES = [  # M >= 16: tensor cores. K with a partial last group, odd N, N over one 64-wide tile
    (16, 200, 33, 64, True, False),
    (17, 200, 77, 64, False, True),
    (48, 300, 65, 128, False, False),
    (48, 96, 33, 32, True, True),
    (17, 256, 7, 128, False, False),
    (80, 160, 129, 32, False, False),    # two tiles along M, three along N
]
GEMV_CASES = [  # M < 16: dp4a
    (1, 200, 33, 64, False, True),
    (3, 300, 77, 128, True, False),
    (3, 96, 5, 32, False, False),
    (15, 200, 65, 64, True, True),
]


DECODE_CASES = [  # M <= 16, the path table's choice: fused quantization up to 4 rows (and M x Kp <= 48 KiB)
    (1, 200, 33, 64, False, True),
    (1, 4096, 40, 128, True, False),
    (2, 300, 77, 128, False, False),
    (4, 96, 5, 32, True, True),
    (4, 12320, 9, 32, False, False),     # 4 rows of 12320 exceed the shared memory: quantize_rows first
    (5, 200, 65, 64, True, True),
    (16, 256, 129, 128, False, False),
]
INT8_CASES = [  # W8A8MatMul (per output channel: group = K, as the LM head; and per group)
    (1, 576, 77, 576, False, False, "auto"),
    (3, 576, 40, 576, True, True, "auto"),
    (16, 96, 33, 32, False, False, "auto"),
    (17, 96, 33, 96, False, True, "auto"),   # the tensor-core gemm
    (3, 96, 33, 96, True, False, "gemv"),
]


@pytest.mark.parametrize("M,K,N,group,static,bias", GEMM_CASES + GEMV_CASES)
def test_emulated_reference_kernels_match_the_reference(emulator, tmp_path, M, K, N, group, static, bias):
    """The reference path (FPTQ_CUDA_KERNEL=reference): the gemv below 16 rows, the tensor-core gemm above."""
    out = check(emulator, tmp_path, M, K, N, group, static, bias, path="gemv" if M < 16 else "gemm")
    assert out.startswith("gemv" if M < 16 else "gemm")


@pytest.mark.parametrize("M,K,N,group,static,bias", DECODE_CASES + GEMM_CASES[1:])
def test_emulated_path_table_choice_matches_the_reference(emulator, tmp_path, M, K, N, group, static, bias):
    out = check(emulator, tmp_path, M, K, N, group, static, bias)
    fused = M <= 4 and M * K <= 48 * 1024
    assert out.startswith("gemm" if M > 16 else "decode (fused quantization)" if fused else "decode (quantize_rows first)"), out


@pytest.mark.parametrize("M,K,N,group,static,bias,path", INT8_CASES)
def test_emulated_int8_weights_match_the_reference(emulator, tmp_path, M, K, N, group, static, bias, path):
    out = check(emulator, tmp_path, M, K, N, group, static, bias, path=path, bits=8)
    assert "bits=8" in out and out.startswith("gemv" if path == "gemv" else "gemm" if M > 16 else "decode"), out


def test_emulated_gemm_for_a_single_row(emulator, tmp_path):
    """The tensor-core path's index math is right for any M, not only where the op sends it."""
    check(emulator, tmp_path, 1, 200, 33, 64, False, False, path="gemm")


@pytest.mark.parametrize("wrong,M", [("a", 48), ("b", 17), ("c", 17), ("nibble", 48), ("nibble", 3), ("nibble", 16)])
def test_a_wrong_hardware_layout_fails(emulator, tmp_path, wrong, M):
    """The comparison has teeth: one fragment mapping of the emulated mma swapped (A registers 1/2,
    B registers 0/1, C elements 1/2), or byte_perm's inputs swapped (nibble order), must fail it."""
    with pytest.raises(AssertionError, match="rel err") as failure:
        check(emulator, tmp_path, M, 200, 77, 64, False, True, wrong=wrong)
    print(failure.value)
