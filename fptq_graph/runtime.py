"""ONNX Runtime sessions that compute what the emitted graphs say.

ONNX Runtime's default optimizations fuse an INT4 DequantizeLinear -> MatMul into MatMulNBits with
`accuracy_level=4`, which re-quantizes the activations per block of K and so changes the result
(tests/test_runtime.py, onnxruntime 1.31.1: relative error 6.5e-3 against onnx's ReferenceEvaluator,
0 with level 0). Our sessions ask for accuracy level 0 so the qdq form computes its reference numerics.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from .model_io import PROTOBUF_LIMIT, _payload_bytes, save_model


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def session(model: onnx.ModelProto | str | os.PathLike, providers: list[str] | None = None) -> ort.InferenceSession:
    """An InferenceSession for a model object or path (a model over 2 GB goes through a temp file)."""
    options = session_options()
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        if _payload_bytes(model) < PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="fptq-") as tmp:
            path = save_model(model, Path(tmp) / "model.onnx")
            return ort.InferenceSession(str(path), options, providers=providers)
    return ort.InferenceSession(str(model), options, providers=providers)
