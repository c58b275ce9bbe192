"""ONNX Runtime sessions that compute what the emitted graphs say, with the bundled op library loaded.

ONNX Runtime's default optimizations fuse an INT4 DequantizeLinear -> MatMul into MatMulNBits with
`accuracy_level=4`, which re-quantizes the activations per block of K and so changes the result
(tests/runtime/test_runtime.py, onnxruntime 1.31.1: relative error 6.5e-3 against onnx's ReferenceEvaluator,
0 with level 0). Our sessions ask for accuracy level 0 so the qdq form computes its reference numerics.

The `w4a8` form's fptq::W4A8MatMul and fptq::W8A8MatMul live in libfptq_ops.so inside this package (built by the
package's install). `session` registers it; users of other ONNX Runtime front ends register
`library_path()` themselves (C++: Ort::SessionOptions::RegisterCustomOpsLibrary).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.resources
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fptq_graph.errors import FptqError, ModelLoadError
from fptq_graph.ir.opset import IR_VERSION
from fptq_graph.ir.save import save_model
from fptq_graph.ir.split_model import PROTOBUF_LIMIT, proto_payload_bytes
from fptq_graph.ir.bodies import body_reads
from fptq_graph.ir.split_model import IN_MEMORY, PACKED_TYPES, SplitModel, is_in_memory
from fptq_graph.runtime.w4a8_op import DOMAIN, OP_TYPE, OP_TYPE_INT8

LIBRARY_NAME = "libfptq_ops.so"
# --provider names -> ONNX Runtime execution providers (CPU stays as the fallback for unassigned nodes)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def library_path() -> Path:
    """The bundled op library (fptq::W4A8MatMul and fptq::W8A8MatMul: CPU and, if built with nvcc, CUDA kernels)."""
    path = Path(str(importlib.resources.files("fptq_graph") / LIBRARY_NAME))
    if not path.is_file():
        raise FptqError(f"the fptq op library {LIBRARY_NAME} is not installed next to {Path(__file__).parents[1]}; "
                        "reinstall the package (pip install .) on a machine with a C++ compiler")
    return path


CPU_ISA_ENV = "FPTQ_CPU_ISA"   # forces one of them (sessions fail at creation if this CPU lacks it)
CUDA_KERNEL_ENV = "FPTQ_CUDA_KERNEL"   # forces a CUDA path (csrc/w4a8_cuda_launch.h's kCudaPaths)


@functools.lru_cache(maxsize=None)
def _cpu_kernels_this_cpu_runs() -> tuple[str, ...]:
    """The library's own answer (its exported FptqCpuKernels: the CPUID check the kernels dispatch on),
    best first; () when the library cannot be loaded. Asked, not re-derived, so the two never disagree."""
    try:
        library = ctypes.CDLL(str(library_path()))
        ask = library.FptqCpuKernels
    except (FptqError, OSError, AttributeError):
        return ()
    ask.restype = ctypes.c_char_p
    return tuple(name for name in ask().decode().split(",") if name)


def library_info() -> dict:
    """How the library was built and which CPU kernel it runs here: {"cuda": bool, "cuda_architectures":
    "80,90", "cuda_kernels": the CUDA paths built, best first (each Run takes the first that takes its
    rows: "decode" up to 16, else "reference"), "cuda_kernel": $FPTQ_CUDA_KERNEL when it forces one, else
    "auto", "cpu_isas_built": every CPU kernel built, "cpu_isas": those this CPU runs, best first (the
    library's own CPUID check, asked through ctypes), "cpu_isa": the one sessions use ($FPTQ_CPU_ISA, or
    the first of cpu_isas; None when $FPTQ_CPU_ISA names one that is not in cpu_isas, which makes session
    creation fail, or when the library cannot be loaded)}."""
    path = library_path().with_name("fptq_ops_build.json")
    info = json.loads(path.read_text()) if path.is_file() else {"cuda": False, "cuda_architectures": ""}
    info["cpu_isas_built"] = info.pop("cpu_isas", [])
    info["cpu_isas"] = list(_cpu_kernels_this_cpu_runs())
    forced = os.environ.get(CPU_ISA_ENV, "")
    info["cpu_isa"] = (forced if forced in info["cpu_isas"] else None) if forced else next(iter(info["cpu_isas"]), None)
    info.setdefault("cuda_kernels", [])
    info["cuda_kernel"] = os.environ.get(CUDA_KERNEL_ENV) or "auto"
    return info


def session_options(threads: int | None = None, with_library: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # keep the QDQ graph's int8 activations int8 when ORT fuses it: on x86 ORT turns them to uint8 + 128
    # (QDQS8ToU8) for its u8 x s8 kernel, which without VNNI (AVX2 only) saturates int16 pair sums and
    # computes garbage for full-range int8 weights (the w8a8 recipe's qdq linears); its s8 x s8 path is
    # exact, and slow (an int8 LM head avoids both: emit_qdq.integer_head, W8A8MatMul)
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    options.log_severity_level = 4   # errors reach the user as our one-line messages, not ORT log lines
    if threads:
        options.intra_op_num_threads = threads
    if with_library:
        try:
            options.register_custom_ops_library(str(library_path()))
        except FptqError:
            pass   # only w4a8 models need it; _create says so if one does
    return options


def session(model: onnx.ModelProto | SplitModel | str | os.PathLike, providers: list[str] | None = None,
            threads: int | None = None, *, early_reductions: bool = False, arena: bool = True,
            mem_pattern: bool = True) -> ort.InferenceSession:
    """An InferenceSession for a model object or path, with the fptq op library registered.

    providers: e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]; default CPU only.
    A model over 2 GB given as an object goes through a temp file. A SplitModel's arrays are shared
    with the session, not copied (see split_session).

    early_reductions: ONNX Runtime's priority-based execution order, for graphs whose outputs are
    reductions of activations (calibration's observers). Its default order ran every observer after
    the whole forward pass, keeping each observed activation alive to the end; with the node list in
    schedule.demand_order's order, priority-based order runs each observer early (calibrating a 0.5B
    LLaMA on batches of 8 x 256 tokens: peak 3.3 GB, 2.3 GB). Not for graphs with DequantizeLinear
    weights: there it dequantized most weights long before use.

    arena=False: no CPU memory arena, so a run's buffers go back when it ends instead of staying
    reserved for the next run: for sessions that take turns (the float and quantized models of the
    output-SQNR analysis), where each arena would otherwise hold its own peak while the other runs.

    mem_pattern=False: no memory pattern (ONNX Runtime's one block sized for a run's planned tensors,
    kept between runs), for evaluating whole quantized models. ORT schedules a qdq graph's weight
    DequantizeLinear nodes early (their inputs are constants), so the plan holds most dequantized weights
    at once and the pattern reserves that sum again. Perplexity of 7B-width fp16 LLaMAs of 2 and 4 layers
    (benchmarks/eval_memory.py, 2 x 512 tokens, onnxruntime 1.31.1, 2026-12-03), peak RSS per layer with
    the pattern and without: qdq form 747 -> 424 MiB, ort form 185 -> 141 MiB, w4a8 form 228 -> 227 MiB;
    every run faster without.
    """
    options = session_options(threads)
    providers = providers or ["CPUExecutionProvider"]
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = mem_pattern
    if early_reductions:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if isinstance(model, SplitModel):
        return split_session(model, options, providers)
    if isinstance(model, onnx.ModelProto):
        if proto_payload_bytes(model) < PROTOBUF_LIMIT:
            return _create(model.SerializeToString(), options, providers, "<in-memory model>")
        with tempfile.TemporaryDirectory(prefix="fptq-") as tmp:
            path = save_model(model, Path(tmp) / "model.onnx")
            return _create(str(path), options, providers, "<in-memory model>")
    return _create(str(model), options, providers, str(model))


def split_session(model: SplitModel, options, providers) -> ort.InferenceSession:
    """A session over a SplitModel whose arrays ONNX Runtime uses in place.

    Each array goes in as a user initializer (SessionOptions.add_initializer: ORT keeps a reference to
    the buffer instead of deserializing the tensor), so the session adds no copy of the weights.
    Pre-packing is off for the same reason: it would keep a packed copy of every MatMul weight, and
    these sessions (calibration, analysis) run a few batches, not a deployment; so are graph
    optimizations (below). ORT checks that an external-data file exists before it swaps in user
    initializers, hence the empty IN_MEMORY file.
    """
    options.add_session_config_entry("session.disable_prepacking", "1")
    # Graph optimizers read initializers from the model's TensorProtos, not from user initializers
    # (a fusion reading a scale fails on the IN_MEMORY reference), and constant folding would make
    # new copies anyway: these sessions run the graph as written.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The memory pattern plans one block for a whole run's activations up front; allocating as the run
    # goes, calibrating a 0.1B LLaMA on batches of 8 x 256 tokens peaked at 1.1 GB instead of 1.7 GB,
    # at the same speed.
    options.enable_mem_pattern = False
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    proto.ir_version = IR_VERSION
    # Through the file too: 4-bit tensors, and initializers a control-flow body reads from the outer
    # scope (ORT resolves those from the TensorProto itself, not from the user initializers).
    from_file = set().union(*(body_reads(node) for node in proto.graph.node))
    packed = {init.name: init for init in proto.graph.initializer
              if is_in_memory(init) and (init.data_type in PACKED_TYPES or init.name in from_file)}
    # A strided array (the ort form's transposed zero points) would be copied by ortvalue_from_numpy into a
    # buffer ORT owns, which add_initializer refuses: made contiguous here (a copy of only those).
    buffers = {name: np.ascontiguousarray(array) for name, array in model.arrays.items() if name not in packed}
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in buffers.items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    with tempfile.TemporaryDirectory(prefix="fptq-") as tmp:
        (Path(tmp) / IN_MEMORY).write_bytes(b"")
        # 4-bit tensors have no numpy type to hand over: ORT reads them from a file (its one copy).
        with open(Path(tmp) / "packed.bin", "wb") as f:
            for name, init in packed.items():
                del init.external_data[:]
                for key, value in (("location", "packed.bin"), ("offset", str(f.tell())), ("length", str(model.arrays[name].nbytes))):
                    init.external_data.add(key=key, value=value)
                f.write(memoryview(np.ascontiguousarray(model.arrays[name])))
        path = Path(tmp) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        sess = _create(str(path), options, providers, "<in-memory model>")
    sess._fptq_initializers = (buffers, values)   # the buffers must outlive the session
    return sess


def _create(model, options, providers, name: str) -> ort.InferenceSession:
    unavailable = [p for p in providers if p not in ort.get_available_providers()]
    if unavailable:
        raise FptqError(f"{name}: this onnxruntime ({ort.__version__}) has no {', '.join(unavailable)} "
                        f"(available: {', '.join(ort.get_available_providers())}); for CUDA install onnxruntime-gpu")
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        text = str(exc)
        if f"domain '{DOMAIN}'" in text or f"{DOMAIN}:" in text or OP_TYPE in text or OP_TYPE_INT8 in text:
            try:
                library_path()
            except FptqError as missing:
                op = OP_TYPE_INT8 if OP_TYPE_INT8 in text else OP_TYPE
                raise FptqError(f"{name} uses the {DOMAIN}::{op} op but {missing}") from None
            raise FptqError(f"{name}: ONNX Runtime could not create the session: {text.splitlines()[-1] if text else exc}") from None
        if type(exc).__module__.startswith("onnxruntime"):
            raise ModelLoadError(f"ONNX Runtime cannot load {_model_name(name)}: {_load_detail(text, model, name)}") from None
        raise


def _model_name(name: str) -> str:
    return "the model of this run (built from the input)" if name == "<in-memory model>" else name


def _load_detail(text: str, model, name: str) -> str:
    """ORT's load error without its status prefix and without the temporary file this run made (which
    tells the user nothing): what is left names the node and the cause (a shape, a type)."""
    detail = (text.strip().splitlines() or ["no message"])[0]
    for _ in range(3):   # "[ONNXRuntimeError] : 1 : FAIL : ..." and the like
        head = detail.split(" : ")[0].strip()
        if " : " in detail and (head == "[ONNXRuntimeError]" or head.isdigit() or head.replace("_", "").isupper()):
            detail = detail.split(" : ", 1)[-1]
    if isinstance(model, str) and name == "<in-memory model>":   # a temporary file of this run
        detail = re.sub(r"^Load model from .*? failed:\s*", "", detail.replace(model, "the model"))
    return detail
