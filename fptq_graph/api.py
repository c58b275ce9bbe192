"""`quantize`: the one call from a float ONNX model to a W4A8 one with a per-layer report."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .calibration import (CalibrationSet, FeedsCalibration, from_random, load_tokenizer, read_token_ids, vocab_size_of,
                          windows_of)
from .config import Config
from .errors import CalibrationError, ModelLoadError
from .model_io import (MIN_OPSET, TOKENIZER_KEY, finish_model, get_metadata, load_model, save_model, set_metadata,
                       write_atomic)
from .pipeline import PassRecord, default_passes, run_passes
from .report import REPORT_KEY, format_table, layer_rows, to_json
from .state import State


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    layers: list[dict]
    passes: list[PassRecord]
    config: Config
    source: str = ""
    calibration: str = ""
    kept_float: list[dict] = field(default_factory=list)   # linears left float on purpose (lm_head), with why

    def report(self) -> dict:
        return {
            "fptq_graph_version": __version__,
            "source": self.source,
            "calibration": self.calibration,
            "config": self.config.to_dict(),
            "passes": [{"name": p.name, "summary": p.summary, "seconds": round(p.seconds, 3)} for p in self.passes],
            "layers": self.layers,
            "kept_float": self.kept_float,
        }

    def table(self) -> str:
        return format_table(self.layers)

    def save(self, path: str | os.PathLike, report_path: str | os.PathLike | None = None) -> Path:
        # The tokenizer is recorded relative to the model file: re-anchor it at the output's folder.
        location = get_metadata(self.model, TOKENIZER_KEY)
        if location and Path(location).is_absolute():
            set_metadata(self.model, TOKENIZER_KEY, os.path.relpath(location, Path(path).resolve().parent))
        out = save_model(self.model, path)
        if location:
            set_metadata(self.model, TOKENIZER_KEY, location)
        if report_path:
            write_atomic(report_path, to_json(self.report()))
        return out


def quantize(model_or_path: onnx.ModelProto | str | os.PathLike, calibration: Any, config: Config | None = None,
             *, tokenizer: Any = None, log=None) -> QuantizeResult:
    """Quantize a float ONNX model to W4A8 with FPTQ.

    calibration: a CalibrationSet; a list of feed dicts (one per batch); an int N for N random-token
    sequences; or the path of a text file,
    tokenized with `tokenizer` (an HF tokenizer or its directory) or the one our exporter recorded.
    The input model is never modified (a path is read; a ModelProto is copied).
    """
    config = config or Config()
    config.validate()
    model, source = _load(model_or_path)
    calib = _calibration_set(calibration, model, config, tokenizer, source)
    state = State(graph=gs.import_onnx(model), config=config, calibration=calib, source_model=model)
    records = run_passes(state, default_passes(config.format), log=log)
    out = finish_model(state.graph, model)
    result = QuantizeResult(model=out, layers=layer_rows(state), passes=records, config=config,
                            source=source, calibration=calib.source, kept_float=list(state.kept_float.values()))
    set_metadata(out, REPORT_KEY, json.dumps(result.report(), allow_nan=False, default=str))
    return result


def _load(model_or_path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, onnx.ModelProto):
        model, source = copy.deepcopy(model_or_path), "<in-memory model>"
    else:
        model, source = load_model(model_or_path), str(model_or_path)
        location = get_metadata(model, TOKENIZER_KEY)
        if location and not Path(location).is_absolute():
            set_metadata(model, TOKENIZER_KEY, str(Path(model_or_path).resolve().parent / location))
    bf16 = [v.name for v in model.graph.input if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16]
    bf16 += [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.BFLOAT16]
    if bf16:
        raise ModelLoadError(f"{source}: bfloat16 tensors ({', '.join(bf16[:3])}{', ...' if len(bf16) > 3 else ''}) are "
                             "not supported: calibration runs on ONNX Runtime's CPU kernels, which have no bfloat16 "
                             "MatMul; export the model in float32 or float16")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises several types; all mean the same to the user
            raise ModelLoadError(f"{source}: opset {opset} could not be upgraded to {MIN_OPSET} "
                                 f"(needed for blocked INT4 DequantizeLinear): {str(exc).splitlines()[0]}") from None
    return model, source


def _calibration_set(calibration, model, config: Config, tokenizer, source: str) -> CalibrationSet:
    if isinstance(calibration, (CalibrationSet, FeedsCalibration)):
        return calibration
    if isinstance(calibration, list):
        return FeedsCalibration(calibration)
    if isinstance(calibration, bool):
        raise CalibrationError("calibration must be a CalibrationSet, a count of random sequences or a text path")
    if isinstance(calibration, int):
        vocab = vocab_size_of(model)
        if vocab is None:
            raise CalibrationError(f"{source}: cannot tell the vocabulary size for random tokens; pass a CalibrationSet")
        return from_random(calibration, vocab, config.calib_seq_len, config.calib_batch_size, config.seed)
    if isinstance(calibration, (str, os.PathLike)):
        ids = read_token_ids(calibration, lambda: load_tokenizer(tokenizer, model, source))
        return windows_of(ids, config.calib_seq_len, config.calib_samples, config.calib_batch_size, str(calibration))
    raise CalibrationError(f"unsupported calibration argument of type {type(calibration).__name__}")
