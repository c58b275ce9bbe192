"""quantize_to: a model file or model folder in, its quantized form written out — the one quantize flow
the command line and the Python API share (the CLI parses arguments and prints what this returns).

    a model file                 -> a model file (and its report)
    a GenAI, optimum or Hugging  -> the same folder with the model quantized under its own name
    Face folder                     (ir/folder.py says what changes; a Hugging Face folder is exported
                                    first, with its KV cache for a causal LM)
    an optimum encoder-decoder   -> the encoder and each decoder text can calibrate quantized
    folder                          (api.quantize_encoder_decoder), the others copied float, with why

Everything written is one transaction (files/run_outputs.py): checked up front against what the run
reads, staged, and committed together, or nothing is. The tokenizer calibration used is recorded in the
output (or travels in the folder). A run's work folder (finished blocks, sequential/) is beside the
output unless named; a failed block-by-block run keeps it for --resume and says so.

Resident: what api.quantize holds; nothing more (the folder's other files are copied, not read).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fptq_graph.config import Config
from fptq_graph.errors import FptqError
from fptq_graph.files.run_outputs import Output, mib_on_disk, model_files, outputs_reading


class WorkFolderKept(UserWarning):
    """A failed or stopped run left finished blocks in its work folder, which --resume goes on from."""


@dataclass
class Written:
    """What quantize_to wrote: the results by file name in the output, the models copied float and why,
    and the one line that says it."""

    output: Path
    kind: str                                              # "model", "genai folder", ..., "encoder-decoder folder"
    results: dict[str, Any] = field(default_factory=dict)  # file name -> api.QuantizeResult
    kept_float: dict[str, str] = field(default_factory=dict)
    line: str = ""


def quantize_to(source: str | os.PathLike, output: str | os.PathLike, calibration: Any, config: Config | None = None, *,
                tokenizer: str | os.PathLike | None = None, report: str | os.PathLike | None = None, log=None,
                work_dir: str | os.PathLike | None = None, resume: bool = False, workers: int | None = None,
                ray_address: str | None = None) -> Written:
    """Quantizes the model file or folder `source` into `output` (a file for a file, a folder for a
    folder), with the JSON report at `report` if given. calibration: as api.quantize takes it (a text
    path, an .npz of feeds, a count of random sequences, ...). work_dir: the run's folder of finished
    blocks (default: .<output name>.fptq-work beside the output); resume goes on from it."""
    from fptq_graph.api import check_run_options

    config = config or Config()   # checked when made (Config.__post_init__)
    check_run_options(workers, ray_address)   # before a folder is copied or exported
    # `output` goes to RunOutputs as given (it refuses an empty one by that name); Path("") would be "."
    path = Path(output)
    runs = {"work_dir": Path(work_dir) if work_dir is not None else path.resolve().parent / f".{path.name}.fptq-work",
            "resume": resume, "workers": workers, "ray_address": ray_address}
    named = work_dir is not None
    text = calibration if isinstance(calibration, (str, os.PathLike)) else None
    if Path(source).is_dir():
        from fptq_graph.ir.folder import open_folder

        folder = open_folder(source)
        pair = folder.encoder_decoder()
        if pair is not None:
            return _encoder_decoder_folder(folder, pair, output, calibration, config, tokenizer, report, log, runs, text)
        return _model_folder(folder, output, calibration, config, tokenizer, report, log, runs, named, text)
    return _model_file(source, output, calibration, config, tokenizer, report, log, runs, named, text)


def _model_file(source, output, calibration, config, tokenizer, report, log, runs, named, text) -> Written:
    from fptq_graph.api import quantize

    outputs = outputs_reading(source, text, tokenizer)
    model_out = outputs.add(output, "-o", companions=(Path(output).name + ".data",))
    report_out = outputs.add(report, "--report") if report is not None else None
    with outputs, _keeping_work(runs["work_dir"], named):
        result = quantize(source, calibration, config, tokenizer=tokenizer, log=log, **runs)
        if tokenizer:
            record_tokenizer(result, tokenizer)
        result.write(model_out, report_out)
    result.discard_work()
    line = (f"wrote {output}: {mib_on_disk(model_files(output)):.1f} MiB (input {mib_on_disk(model_files(source)):.1f} MiB)"
            + (f"; report {report}" if report else ""))
    return Written(Path(output), "model", {Path(output).name: result}, line=line)


def _model_folder(folder, output, calibration, config, tokenizer, report, log, runs, named, text) -> Written:
    from fptq_graph.api import quantize
    from fptq_graph.ir.folder import TOKENIZER_FILES, FolderWarning, copy_companions, update_genai_config
    from fptq_graph.ir.metadata import TOKENIZER_KEY, set_metadata

    outputs = outputs_reading(folder.model, text, tokenizer)
    outputs.add_input(folder.path)
    out = outputs.add(output, "-o", is_folder=True)
    report_out = outputs.add(report, "--report") if report is not None else None
    name = folder.model.name if folder.model else "model.onnx"
    with outputs, tempfile.TemporaryDirectory(prefix=".fptq-export-", dir=out.staged.parent) as scratch:
        model_path = folder.model
        if folder.kind == "huggingface":   # export first, with the KV cache for a causal LM
            from fptq_graph.exporters import export_hf

            model_path = Path(scratch) / name
            export_hf(folder.path, model_path, kv_cache=_is_causal(folder.path))
            for item in folder.path.iterdir():   # the tokenizer and configs, not the float weights
                if item.name in TOKENIZER_FILES + ("config.json", "generation_config.json", "special_tokens_map.json"):
                    shutil.copy2(item, out.staged / item.name)
        else:
            copy_companions(folder, set(model_files(folder.model)), out.staged)
            for other in folder.other_models():
                warnings.warn(FolderWarning(
                    f"{other.name}: copied float, not quantized: only {name} is (fptq-graph quantizes one model "
                    "per folder; an encoder-decoder's encoder, or a decoder's with-past twin, stays float: "
                    "quantize it on its own with its own calibration feeds)"), stacklevel=3)
        with _keeping_work(runs["work_dir"], named):
            result = quantize(model_path, calibration, config, tokenizer=tokenizer or folder.tokenizer, log=log, **runs)
        if folder.tokenizer or folder.kind == "huggingface":   # the tokenizer travels in the folder
            set_metadata(result.split.proto, TOKENIZER_KEY, str(out.final.resolve()))
        elif tokenizer:
            record_tokenizer(result, tokenizer)
        result.write(Output("-o", out.final / name, out.staged / name), report_out)
        if folder.kind == "genai":
            library = None
            if config.format == "w4a8":
                from fptq_graph.runtime.sessions import library_path

                library = library_path()
            update_genai_config(out.staged, name, config.format, library)
    result.discard_work()
    size_in = mib_on_disk(model_files(folder.model)) if folder.model else 0.0
    floats = [p.name for p in folder.other_models()] if folder.kind != "huggingface" else []
    line = (f"wrote {output}/ ({folder.kind} folder): {name} quantized, {mib_on_disk(model_files(out.final / name)):.1f} MiB "
            f"(input {size_in:.1f} MiB)" + (f"; copied float: {', '.join(floats)}" if floats else "")
            + (f"; report {report}" if report else ""))
    return Written(Path(output), f"{folder.kind} folder", {name: result}, {p: "another model of the folder" for p in floats}, line)


def _encoder_decoder_folder(folder, pair, output, calibration, config, tokenizer, report, log, runs, text) -> Written:
    """optimum's seq2seq layout: the encoder quantized on the calibration text, each decoder text
    calibration can feed quantized on the float encoder's outputs for that text; a decoder that cannot
    be is copied float with a warning saying why."""
    from fptq_graph.api import quantize_encoder_decoder
    from fptq_graph.ir.folder import FolderWarning, copy_companions
    from fptq_graph.ir.metadata import TOKENIZER_KEY, set_metadata

    if runs.get("resume") or runs.get("workers") or runs.get("ray_address"):
        raise FptqError("--resume, --workers and --ray-address are for one model; an encoder-decoder folder is "
                        "quantized one model after the other")
    outputs = outputs_reading(pair.encoder, text, tokenizer)
    outputs.add_input(folder.path)
    out = outputs.add(output, "-o", is_folder=True)
    report_out = outputs.add(report, "--report") if report is not None else None
    with outputs:
        encoder, decoded = quantize_encoder_decoder(pair.encoder, pair.decoders, calibration, config,
                                                    tokenizer=tokenizer or folder.tokenizer, start_token=pair.start_token,
                                                    log=log)
        quantized = {pair.encoder.name: encoder, **{Path(k).name: v for k, v in decoded.items() if not isinstance(v, str)}}
        kept = {Path(k).name: v for k, v in decoded.items() if isinstance(v, str)}
        written = {folder.path / name for name in quantized}
        copy_companions(folder, {f for path in written for f in model_files(path)}, out.staged)
        main = next(iter(list(quantized)[1:]), pair.encoder.name)   # the report: the first decoder quantized, else the encoder
        for name, result in quantized.items():
            if folder.tokenizer:
                set_metadata(result.split.proto, TOKENIZER_KEY, str(out.final.resolve()))
            elif tokenizer:
                record_tokenizer(result, tokenizer)
            result.write(Output("-o", out.final / name, out.staged / name), report_out if name == main else None)
        for name, why in kept.items():
            warnings.warn(FolderWarning(f"{name}: copied float, not quantized: {why}"), stacklevel=3)
    for result in quantized.values():
        result.discard_work()
    parts = [f"{name} quantized, {mib_on_disk(model_files(out.final / name)):.1f} MiB (input {mib_on_disk(model_files(folder.path / name)):.1f})"
             for name in quantized]
    parts += [f"{name} copied float" for name in kept]
    line = (f"wrote {output}/ (optimum encoder-decoder folder): " + "; ".join(parts)
            + (f"; report {report} ({main})" if report else ""))
    return Written(Path(output), "encoder-decoder folder", quantized, kept, line)


def record_tokenizer(result, tokenizer: str | os.PathLike) -> None:
    """The tokenizer the caller gave is the one calibration used: recorded in the output (made relative
    to it when written), so eval and generate on the output find it."""
    from fptq_graph.ir.metadata import TOKENIZER_KEY, set_metadata

    set_metadata(result.split.proto, TOKENIZER_KEY, str(Path(tokenizer).resolve()))


@contextlib.contextmanager
def _keeping_work(work_dir: Path, named: bool):
    """On a failed or stopped run, says where its finished blocks are and how to go on from them. A
    whole-graph run (one block) keeps its folder only where the caller named it (work_dir): its one
    block is the whole run, and the output's folder should not collect failed runs' codes."""
    try:
        yield
    except BaseException:
        finished = sum(1 for e in work_dir.glob("block-*") if ".tmp-" not in e.name) if work_dir.is_dir() else 0
        if not named and _blocks_of(work_dir) == 1:
            shutil.rmtree(work_dir, ignore_errors=True)
            finished = 0
        if finished:
            warnings.warn(WorkFolderKept(f"{finished} finished block(s) kept in {work_dir}: run the same command with "
                                         "--resume to go on from there"), stacklevel=3)
        raise


def _blocks_of(work_dir: Path) -> int | None:
    """How many blocks the run that owns `work_dir` has (its manifest), None if unreadable."""
    from fptq_graph.sequential.work_folder import MANIFEST

    try:
        return json.loads((work_dir / MANIFEST).read_text()).get("blocks")
    except (OSError, ValueError):
        return None


def _is_causal(folder: Path) -> bool:
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except ValueError:
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
