"""`quantize`: the one call from a float ONNX model to a W4A8 one with a per-layer report."""
from __future__ import annotations

import functools
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
from .model_io import (MIN_OPSET, TOKENIZER_KEY, finish_model, finish_split, get_metadata, load_split, save_model,
                       set_metadata, write_atomic)
from .split_model import SplitModel, bind_arrays, split_proto
from .pipeline import PassRecord, default_passes, run_passes
from .report import REPORT_KEY, format_table, layer_rows, to_json
from .state import State


@dataclass
class QuantizeResult:
    split: SplitModel            # the quantized model; its large tensors (kept-float weights) as arrays
    layers: list[dict]
    passes: list[PassRecord]
    config: Config
    source: str = ""
    calibration: str = ""
    kept_float: list[dict] = field(default_factory=list)   # linears left float on purpose (lm_head), with why

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        """The quantized model as one self-contained ModelProto (built on first use; save() streams instead)."""
        return self.split.full()

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
        proto = self.split.proto
        location = get_metadata(proto, TOKENIZER_KEY)
        if location and Path(location).is_absolute():
            set_metadata(proto, TOKENIZER_KEY, os.path.relpath(location, Path(path).resolve().parent))
        out = save_model(self.split, path)
        if location:
            set_metadata(proto, TOKENIZER_KEY, location)
        if report_path:
            write_atomic(report_path, to_json(self.report()))
        return out


def quantize(model_or_path: onnx.ModelProto | str | os.PathLike, calibration: Any, config: Config | None = None,
             *, tokenizer: Any = None, log=None) -> QuantizeResult:
    """Quantize a float ONNX model to W4A8 with FPTQ.

    calibration: a CalibrationSet; a list of feed dicts (one per batch); an int N for N random-token
    sequences; or the path of a text file,
    tokenized with `tokenizer` (an HF tokenizer or its directory) or the one our exporter recorded.
    The input model is never modified (a path is read, its weights mapped read-only; a ModelProto is
    copied). One float copy of the weights lives through the run (see split_model).
    """
    state, source = _prepare(model_or_path, calibration, config, tokenizer)
    records = run_passes(state, default_passes(state.config.format), log=log)
    out = finish_split(state.graph, state.source_model.proto)
    result = QuantizeResult(split=out, layers=layer_rows(state), passes=records, config=state.config, source=source,
                            calibration=state.calibration.source, kept_float=list(state.kept_float.values()))
    set_metadata(out.proto, REPORT_KEY, json.dumps(result.report(), allow_nan=False, default=str))
    return result


def calibrate(model_or_path: onnx.ModelProto | str | os.PathLike, calibration: Any, config: Config | None = None,
              *, tokenizer: Any = None, log=None) -> dict[str, Any]:
    """Only the calibration `quantize` starts with: {activation name: per-channel max|X| [K]} for the
    input of every quantizable linear (what ClassifyActivations and LAE will see)."""
    state, _ = _prepare(model_or_path, calibration, config, tokenizer)
    passes = default_passes(state.config.format)
    last = next(i for i, p in enumerate(passes) if p.name == "calibrate")
    run_passes(state, passes[: last + 1], log=log)
    return dict(state.act_max)


def _prepare(model_or_path, calibration, config: Config | None, tokenizer) -> tuple[State, str]:
    config = config or Config()
    config.validate()
    split, source = _load(model_or_path)
    calib = _calibration_set(calibration, split.proto, config, tokenizer, source)
    graph = bind_arrays(gs.import_onnx(split.proto), split.arrays)
    return State(graph=graph, config=config, calibration=calib, source_model=split), source


def _load(model_or_path) -> tuple[SplitModel, str]:
    if isinstance(model_or_path, onnx.ModelProto):
        split, source = split_proto(model_or_path), "<in-memory model>"
    else:
        split, source = load_split(model_or_path), str(model_or_path)
    model = split.proto
    if source != "<in-memory model>":
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
            split.proto = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises several types; all mean the same to the user
            raise ModelLoadError(f"{source}: opset {opset} could not be upgraded to {MIN_OPSET} "
                                 f"(needed for blocked INT4 DequantizeLinear): {str(exc).splitlines()[0]}") from None
    return split, source


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
