"""What the CUDA compiler tells about the W4A8 kernels without a GPU: ptxas's registers, spills, stack
and shared memory per kernel for sm_80 and sm_90, and the SASS: the tensor-core GEMM's K loop issues
IMMA (mma.sync m16n8k32 s8), the decode kernels stream weights 16 bytes a lane into dp4a, and no
kernel touches local memory (LDL/STL). docs/w4a8_op.md records the
table: `python tests/runtime/test_cuda_build.py` prints it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("80", "90")
# The flags CMakeLists.txt gives w4a8_cuda.cu (Release: -O3), one architecture at a time.
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]


def nvcc() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


def nvdisasm() -> str | None:
    """nvdisasm from PATH, beside nvcc, or the nvidia-cuda-nvdisasm wheel (nvidia/cu*/bin)."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    if nvcc():
        beside = Path(os.path.realpath(nvcc())).parent / "nvdisasm"
        if beside.is_file():
            return str(beside)
    try:
        import nvidia
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(base).glob("cu*/bin/nvdisasm"), reverse=True):
            return str(candidate)
    return None


DECODE_VARIANTS = ((1, True), (4, True), (16, False))   # decode<T, Rows, Fused> as w4a8_cuda.cu launches it
KERNELS = {f"{k}<{t}>" for k in ("gemm_mma", "gemv", "quantize_rows") for t in ("float", "half")} | \
    {f"decode<{t},{rows},{str(fused).lower()}>" for t in ("float", "half") for rows, fused in DECODE_VARIANTS}


def kernel_name(mangled: str) -> str:
    """_ZN4fptq4cuda...8gemm_mmaIfEE... -> gemm_mma<float>; ...6decodeIfLi1ELb1EE... -> decode<float,1,true>."""
    m = re.search(r"\d+decodeI(f|6__half)Li(\d+)ELb([01])E", mangled)
    if m:
        return f"decode<{'float' if m.group(1) == 'f' else 'half'},{m.group(2)},{'true' if m.group(3) == '1' else 'false'}>"
    for name in ("gemm_mma", "gemv", "quantize_rows"):
        m = re.search(rf"\d+{name}I(f|6__half)E", mangled)
        if m:
            return f"{name}<{'float' if m.group(1) == 'f' else 'half'}>"
    return mangled


def compile_cubins(out: Path) -> dict[str, dict]:
    """arch -> {"ptxas": {kernel: stats}, "sass": {kernel: text}}; both architectures built in parallel."""
    procs = {}
    for arch in ARCHS:
        cubin = out / f"w4a8_cuda.sm_{arch}.cubin"
        procs[arch] = (cubin, subprocess.Popen([nvcc(), *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", "-o", str(cubin),
                                                str(ROOT / "csrc" / "w4a8_cuda.cu")],
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    result = {}
    for arch, (cubin, proc) in procs.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log
        result[arch] = {"ptxas": parse_ptxas(log), "sass": split_sass(cubin)}
    return result


def parse_ptxas(log: str) -> dict[str, dict]:
    stats, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernel_name(m.group(1))
            stats[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            stats[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            stats[current]["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            stats[current]["smem"] = int(smem.group(1)) if smem else 0
    return stats


def split_sass(cubin: Path) -> dict[str, str]:
    tool = nvdisasm()
    if not tool:
        return {}
    text = subprocess.run([tool, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    kernels, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            name = kernel_name(m.group(1))
            kernels[name] = ""
        elif name:
            kernels[name] += line + "\n"
    return kernels


def imma_in_loop(sass: str) -> bool:
    """An IMMA lies between a label and a branch back to that label: it is inside a loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    imma = [i for i, line in enumerate(lines) if "IMMA" in line]
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            if any(labels[m.group(1)] < k < i for k in imma):
                return True
    return False


def table(result: dict[str, dict]) -> str:
    rows = ["| kernel | arch | registers | spill stores / loads (bytes) | stack frame (bytes) | shared memory (bytes) | IMMA | LDL/STL |",
            "|---|---|---|---|---|---|---|---|"]
    for kernel in sorted(result[ARCHS[0]]["ptxas"]):
        for arch in ARCHS:
            s = result[arch]["ptxas"][kernel]
            sass = result[arch]["sass"].get(kernel, "")
            imma = len(re.findall(r"\bIMMA\b", sass)) if sass else "?"
            local = len(re.findall(r"\b(LDL|STL)\b", sass)) if sass else "?"
            rows.append(f"| `{kernel}` | sm_{arch} | {s['registers']} | {s['spill_stores']} / {s['spill_loads']} | "
                        f"{s['stack']} | {s['smem']} | {imma} | {local} |")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not nvcc():
        pytest.skip("no nvcc on PATH (or CUDACXX): the library is built without CUDA kernels here")
    return compile_cubins(tmp_path_factory.mktemp("cuda_build"))


def test_no_kernel_spills_or_uses_local_memory(built):
    print("\n" + table(built))
    for arch, r in built.items():
        assert set(r["ptxas"]) == KERNELS
        for kernel, s in r["ptxas"].items():
            assert s["spill_stores"] == s["spill_loads"] == 0, f"sm_{arch} {kernel} spills registers: {s}"
            assert s["stack"] == 0, f"sm_{arch} {kernel} has a stack frame (local memory): {s}"
        gemm = r["ptxas"]["gemm_mma<float>"]
        assert gemm["smem"] == 2 * 64 * 48, f"sm_{arch} gemm_mma's shared tiles changed: {gemm}"


def test_sass_gemm_loop_issues_imma_and_no_local_memory(built):
    assert nvdisasm(), ("nvdisasm not found: it comes with the CUDA toolkit, or from PyPI as nvidia-cuda-nvdisasm "
                        "(pip install 'nvidia-cuda-nvdisasm>=13.2'), needed to read the kernels' SASS")
    for arch, r in built.items():
        for kernel, sass in r["sass"].items():
            assert not re.search(r"\b(LDL|STL)\b", sass), f"sm_{arch} {kernel} reads or writes local memory"
        for t in ("float", "half"):
            sass = r["sass"][f"gemm_mma<{t}>"]
            imma = re.findall(r"IMMA\.16832\.S8\.S8", sass)
            assert len(imma) >= 8, f"sm_{arch} gemm_mma<{t}>: {len(imma)} IMMA.16832.S8.S8, expected 8 a K step"
            assert imma_in_loop(sass), f"sm_{arch} gemm_mma<{t}>: no IMMA inside the K loop"
            assert len(re.findall(r"LDG\.E\.128", sass)) >= 2, f"sm_{arch} gemm_mma<{t}>: A/B tiles not loaded 16 bytes a thread"
        assert "IMMA" not in r["sass"]["gemv<float>"] and "IDP.4A" in r["sass"]["gemv<float>"], f"sm_{arch} gemv: no dp4a"
        for kernel in (k for k in KERNELS if k.startswith("decode")):
            sass = r["sass"][kernel]
            assert "IDP.4A" in sass and "IMMA" not in sass, f"sm_{arch} {kernel}: no dp4a"
            # the weights stream 16 bytes a lane (LDG.E.128), 4 channels a warp: 4 loads a step at least
            assert len(re.findall(r"LDG\.E\.128", sass)) >= 4, f"sm_{arch} {kernel}: weights not loaded 16 bytes a lane"


if __name__ == "__main__":
    if not nvcc():
        sys.exit("no nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        print(table(compile_cubins(Path(tmp))))
