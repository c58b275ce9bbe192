"""`quantize`: the one call from a float ONNX model to a W4A8 one with a per-layer report."""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from fptq_graph import __version__
from fptq_graph.calibration import (CalibrationSet, CalibrationWarning, FeedsCalibration, check_token_ids, feeds_from_npz,
                          from_random, leading_bos, load_tokenizer, random_feeds, read_token_ids, takes_tokens, vocab_size_of,
                          windows_of)
from fptq_graph.config import Config
from fptq_graph.errors import CalibrationError, FptqError, ModelLoadError
from fptq_graph.ir.load import load_split, validate_model
from fptq_graph.ir.metadata import TOKENIZER_KEY, get_metadata, set_metadata
from fptq_graph.ir.opset import MIN_OPSET, upgrade_opset
from fptq_graph.ir.save import finish_model, finish_split, save_model, write_atomic  # noqa: F401 (finish_model: re-exported)
from fptq_graph.ir.split_model import SplitModel, bind_arrays, split_proto
from fptq_graph.files.run_outputs import Output, RunOutputs, model_files
from fptq_graph.passes.base import PassRecord
from fptq_graph.passes.pipeline import calibration_pipeline, default_pipeline
from fptq_graph.report.layers import REPORT_KEY, format_table, json_numbers, layer_rows, to_json
from fptq_graph.passes.state import State
from fptq_graph.sequential.mode import choose_mode
from fptq_graph.sequential.run import run_scopes


@dataclass
class QuantizeResult:
    split: SplitModel            # the quantized model; its large tensors (kept-float weights) as arrays
    layers: list[dict]
    passes: list[PassRecord]
    config: Config
    source: str = ""
    calibration: str = ""
    kept_float: list[dict] = field(default_factory=list)   # linears left float on purpose (lm_head), with why
    embeddings: list[dict] = field(default_factory=list)   # embedding tables: how each was stored, its bytes and SQNR
    plan: Any = None             # the frozen plan (plan/plan.py): every linear's decisions, the LM head's
    run: dict = field(default_factory=dict)   # whole graph or block by block, why, and per block time and memory
    work: Any = None             # sequential.work_folder.WorkFolder of a block-by-block run (its codes back the model)
    rotation: dict = field(default_factory=dict)   # the residual stream's rotation: how, or why not (rotate_residual)

    def discard_work(self) -> None:
        """Removes a block-by-block run's work folder (call once the model is written: its codes are read
        from there)."""
        if self.work is not None:
            self.work.remove()

    def stats(self, pass_name: str) -> dict:
        """The numbers a pass reported (its PassResult.stats)."""
        return dict(next(p.stats for p in self.passes if p.name == pass_name))

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
            "passes": [{"name": p.name, "kind": p.kind, "summary": p.summary, "stats": json_numbers(p.stats),
                        "seconds": round(p.seconds, 3)} for p in self.passes],
            "layers": self.layers,
            "kept_float": self.kept_float,
            "embeddings": self.embeddings,
            "run": self.run,
            "rotation": json_numbers(self.rotation),
        }

    def table(self) -> str:
        return format_table(self.layers)

    def save(self, path: str | os.PathLike, report_path: str | os.PathLike | None = None) -> Path:
        """Writes the model (external data beside it when over 2 GB) and, if asked, the JSON report:
        both staged and renamed into place together, so a failure leaves neither. Refuses a path that
        is the source model, a special file, or the other output (see run_outputs)."""
        outputs = RunOutputs()
        if Path(self.source).is_file():
            for source_file in model_files(self.source):
                outputs.add_input(source_file)
        model = outputs.add(path, "model", companions=(Path(path).name + ".data",))
        report = outputs.add(report_path, "report") if report_path is not None else None
        with outputs:
            self.write(model, report)
        self.discard_work()
        return Path(path)

    def write(self, model: Output, report: Output | None = None) -> None:
        """Writes into the staged paths of a RunOutputs (which commits them); `save` for one call."""
        # The tokenizer is recorded relative to the model file: re-anchor it at the final output's folder.
        proto = self.split.proto
        location = get_metadata(proto, TOKENIZER_KEY)
        if location and Path(location).is_absolute():
            set_metadata(proto, TOKENIZER_KEY, os.path.relpath(location, model.final.resolve().parent))
        validate_model(self.split, str(model.final))   # what we write loads where the input did
        try:
            save_model(self.split, model.staged)
        finally:
            if location:
                set_metadata(proto, TOKENIZER_KEY, location)
        if report is not None:
            write_atomic(report.staged, to_json(self.report()))


def quantize(model_or_path: onnx.ModelProto | str | os.PathLike, calibration: Any, config: Config | None = None,
             *, tokenizer: Any = None, log=None, work_dir: str | os.PathLike | None = None,
             resume: bool = False, workers: int | None = None, ray_address: str | None = None) -> QuantizeResult:
    """Quantize a float ONNX model to W4A8 with FPTQ.

    calibration: a CalibrationSet; a list of feed dicts (one per batch); an int N for N random-token
    sequences; or the path of a text file,
    tokenized with `tokenizer` (an HF tokenizer or its directory) or the one our exporter recorded.
    The input model is never modified (a path is read, its weights mapped read-only; a ModelProto is
    copied). One float copy of the weights lives through the run (see split_model).

    Every run goes through one driver (sequential/run.py): the whole graph as one block, or block by
    block for large models (Config.sequential, memory_budget_mib). `work_dir` is the folder of finished
    blocks (default: a temporary one) and `resume` continues an earlier run's from it; `workers` (a
    local Ray cluster of N processes) or `ray_address` (an existing one) spread each block's calibration
    and weight tasks (sequential/ray_workers.py), whole graph or not. result.run says which way the run
    went and why; result.discard_work() removes the folder once the output is written (save() does).
    quantize_to (quantize_to.py) is the same with files and folders in and out, as the CLI runs it.
    """
    check_run_options(workers, ray_address)
    config = config or Config()
    state, source = _prepare(model_or_path, calibration, config, tokenizer)
    pipeline = default_pipeline(state.config.format)
    records = pipeline.until("linears").run(state, log=log)
    more, run, work = run_scopes(state, pipeline.after("linears"), choose_mode(state), source, log=log,
                                 work_dir=work_dir, resume=resume, workers=workers, ray_address=ray_address)
    records += more
    out = finish_split(state.graph, state.source_model.proto)
    result = QuantizeResult(split=out, layers=layer_rows(state), passes=records, config=state.config, source=source,
                            calibration=state.calibration.source, kept_float=list(state.kept_float.values()), embeddings=state.embeddings,
                            plan=state.plan, run=run, work=work, rotation=state.rotation)
    set_metadata(out.proto, REPORT_KEY, json.dumps(result.report(), allow_nan=False, default=str))
    return result


def quantize_encoder_decoder(encoder: str | os.PathLike, decoders, calibration: Any, config: Config | None = None,
                             *, tokenizer: Any = None, start_token: int | None = None,
                             log=None) -> tuple[QuantizeResult, dict[str, QuantizeResult | str]]:
    """Quantize an encoder-decoder's models (optimum's encoder_model.onnx and its decoder_model*.onnx,
    T5/BART/Marian-shaped): the encoder calibrated on `calibration` (a text path or a count of random
    sequences, as `quantize` takes), each decoder on the float encoder's outputs for the same tokens,
    reading that text itself (calibration.decoder_feeds; `start_token`: the decoder start token of the
    model's config.json, None to read the tokens unshifted). All are quantized with `config`.

    Returns the encoder's result and, per decoder path (a str or path, or a list of them), its result
    or why it could not be quantized (a with-past decoder needs a cross-attention cache text does not
    give; a merged decoder runs its layers inside If branches, which are kept float): the caller keeps
    those float and says so. Resident, besides each quantize run's own: one decoder's calibration feeds
    (the encoder's outputs over the calibration tokens) while that decoder is quantized."""
    from fptq_graph.calibration import decoder_feeds
    from fptq_graph.runtime import session

    config = config or Config()
    decoders = [decoders] if isinstance(decoders, (str, os.PathLike)) else list(decoders)
    encoder_header = _load(encoder)[0].proto
    calib = _calibration_set(calibration, encoder_header, config, tokenizer, str(encoder))
    if not isinstance(calib, CalibrationSet):
        raise CalibrationError(f"{encoder}: an encoder-decoder is calibrated from tokens (text, or N random "
                               "sequences), which the decoder then reads too; feeds of the encoder alone cannot "
                               "calibrate the decoder")
    encoder_inputs = list(encoder_header.graph.input)
    del encoder_header
    if log:
        log(f"[pair] quantizing the encoder {Path(encoder).name}")
    encoder_result = quantize(encoder, calib, config, tokenizer=tokenizer, log=log)
    float_encoder = session(str(encoder))
    decoded: dict[str, QuantizeResult | str] = {}
    for decoder in decoders:
        header = onnx.load(str(decoder), load_external_data=False).graph
        if any(n.op_type == "If" for n in header.node) and not any(n.op_type in ("MatMul", "Gemm") for n in header.node):
            decoded[str(decoder)] = ("its layers run inside If branches (optimum's merged decoder), which fptq-graph "
                                     "keeps float; quantize the folder's decoder_model.onnx instead (export unmerged)")
            continue
        try:
            feeds = decoder_feeds(float_encoder, encoder_inputs, list(header.input), calib, start_token,
                                  decoder_name=Path(decoder).name)
        except CalibrationError as exc:
            decoded[str(decoder)] = str(exc)
            continue
        del header
        if log:
            log(f"[pair] quantizing the decoder {Path(decoder).name} on the float encoder's outputs "
                f"({calib.num_samples} sequence(s))")
        decoded[str(decoder)] = quantize(decoder, feeds, config, log=log)
        del feeds
    return encoder_result, decoded


def calibrate(model_or_path: onnx.ModelProto | str | os.PathLike, calibration: Any, config: Config | None = None,
              *, tokenizer: Any = None, log=None) -> dict[str, Any]:
    """Only the calibration `quantize` starts with (calibration_pipeline, a prefix of the default):
    {activation name: per-channel max|X| [K]} for the input of every quantizable linear (what
    ClassifyActivations and LAE will see)."""
    state, _ = _prepare(model_or_path, calibration, config, tokenizer)
    calibration_pipeline().run(state, log=log)
    return {activation: stats.max for activation, stats in state.stats.items()}


def check_run_options(workers: int | None = None, ray_address: str | None = None) -> None:
    """Who runs the blocks, checked before any work, the same for the API and the CLI. Resume, workers
    and a Ray address work for every run, whole graph (one block) or block by block: they do not choose
    how the model is cut."""
    if workers is not None and workers < 1:
        raise FptqError(f"workers must be >= 1, got {workers}")
    if workers and ray_address:
        raise FptqError("workers starts a local Ray cluster and ray_address joins one: give one of them")


def _prepare(model_or_path, calibration, config: Config | None, tokenizer) -> tuple[State, str]:
    config = config or Config()
    config = config.with_recipe_options()
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
    _refuse_unsupported_types(model, source)
    _refuse_quantized(model, source)
    _infer_types(split)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        split.proto = upgrade_opset(model, MIN_OPSET, source)
    return split, source


def _infer_types(split: SplitModel) -> None:
    """Declares the type and shape of every activation ONNX's inference can tell (an fp16 model exported
    without value_info would otherwise get float32 scales and observers). Inference reads only the
    structure: the weights stay where they are. A model it cannot follow (contrib ops) is left as is."""
    try:
        inferred = onnx.shape_inference.infer_shapes(split.proto)
    except Exception:   # inference is an aid here, never a reason to refuse a model ORT runs
        return
    known = {v.name for v in split.proto.graph.value_info}
    split.proto.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)


# Element types we cannot quantize, and why (each a one-line refusal before any work).
_UNSUPPORTED_TYPES = {
    onnx.TensorProto.BFLOAT16: "calibration runs on ONNX Runtime's CPU kernels, which have no bfloat16 MatMul",
    onnx.TensorProto.DOUBLE: "the quantized forms compute in float32 or float16 (QuantizeLinear and the W4A8 "
                             "kernels take no float64)",
}


def _refuse_unsupported_types(model: onnx.ModelProto, source: str) -> None:
    for elem, why in _UNSUPPORTED_TYPES.items():
        names = [v.name for v in model.graph.input if v.type.tensor_type.elem_type == elem]
        names += [i.name for i in model.graph.initializer if i.data_type == elem]
        if names:
            kind = onnx.helper.tensor_dtype_to_string(elem).removeprefix("TensorProto.").lower()
            kind = "float64" if kind == "double" else kind
            raise ModelLoadError(f"{source}: {kind} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) are "
                                 f"not supported: {why}; export the model in float32 or float16")


# Ops whose presence means the weights are already quantized (ours, ONNX Runtime's, or a QDQ model's).
_QUANTIZED_OPS = {"W4A8MatMul", "W8A8MatMul", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat", "GatherBlockQuantized"}


def _refuse_quantized(model: onnx.ModelProto, source: str) -> None:
    """Quantizing a quantized model would find only its float leftovers (an LM head) and store a report
    describing just those; refuse with what the model is instead."""
    if get_metadata(model, REPORT_KEY) is not None:
        raise ModelLoadError(f"{source}: already quantized by fptq-graph (it carries a report: fptq-graph inspect "
                             f"{Path(source).name}); quantize the float model it came from")
    low_bit = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    weights = {i.name for i in model.graph.initializer if i.data_type in low_bit}
    found = sorted({n.op_type for n in model.graph.node if n.op_type in _QUANTIZED_OPS
                    or (n.op_type == "DequantizeLinear" and n.input and n.input[0] in weights)})
    if found:
        raise ModelLoadError(f"{source}: already has quantized weights ({', '.join(found)} nodes); "
                             "quantize the float model it came from")


def _calibration_set(calibration, model, config: Config, tokenizer, source: str) -> CalibrationSet:
    if isinstance(calibration, (CalibrationSet, FeedsCalibration)):
        return calibration
    if not list(model.graph.input):
        raise CalibrationError(f"{source}: the model has no inputs, so there is nothing to calibrate "
                               "(its activations do not depend on data)")
    if isinstance(calibration, list):
        return FeedsCalibration(calibration)
    if isinstance(calibration, bool):
        raise CalibrationError("calibration must be a CalibrationSet, a count of random sequences or a text path")
    if isinstance(calibration, int):
        if not takes_tokens(model.graph.input):
            return random_feeds(model.graph.input, calibration, config.calib_seq_len, config.calib_batch_size,
                                config.seed, vocab_size_of(model), source)
        vocab = vocab_size_of(model)
        if vocab is None:
            raise CalibrationError(f"{source}: cannot tell the vocabulary size for random tokens (no embedding "
                                   "Gather reads input_ids); calibrate from text (--calib) instead")
        return from_random(calibration, vocab, config.calib_seq_len, config.calib_batch_size, config.seed)
    if isinstance(calibration, (str, os.PathLike)) and str(calibration).endswith(".npz"):
        return feeds_from_npz(calibration, model.graph.input, config.calib_batch_size)
    if isinstance(calibration, (str, os.PathLike)):
        if not takes_tokens(model.graph.input):
            raise CalibrationError(f"{source}: its inputs ({', '.join(v.name for v in model.graph.input)}) are not "
                                   "token ids, so text cannot calibrate it; use random inputs (--calib-random N) or a "
                                   ".npz of feeds")
        get_tokenizer = functools.cache(lambda: load_tokenizer(tokenizer, model, source))
        ids = read_token_ids(calibration, get_tokenizer)
        check_token_ids(ids, vocab_size_of(model), str(calibration), source)
        calib = windows_of(ids, config.calib_seq_len, config.calib_samples, config.calib_batch_size, str(calibration),
                           bos=leading_bos(get_tokenizer()))
        asked, got = config.calib_samples * config.calib_seq_len, calib.tokens.size
        if got < asked:
            warnings.warn(CalibrationWarning(
                f"{calibration}: {len(ids)} tokens give {calib.num_samples} window(s) of {calib.tokens.shape[1]} "
                f"tokens ({got} tokens), fewer than the {config.calib_samples} x {config.calib_seq_len} asked; "
                "calibrating on those (more text calibrates better)"), stacklevel=3)
        return calib
    raise CalibrationError(f"unsupported calibration argument of type {type(calibration).__name__}")
