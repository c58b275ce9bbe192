"""Model folders in, deployable folders out: what `quantize DIR -o OUT_DIR` and `generate DIR` read.

Most people who run LLMs on ONNX Runtime hold a folder, not a file:
- an ONNX Runtime GenAI folder (the model builder's output): genai_config.json names the decoder's
  ONNX file; the tokenizer files sit beside it;
- an optimum export: model.onnx (or decoder_model_merged.onnx) with config.json and the tokenizer;
- a Hugging Face folder (config.json and weights, no ONNX yet): exported here first (with its KV cache
  for causal LMs), then quantized.

The output folder holds everything the input folder held, with the model replaced by its quantized
form under the same file name. For a GenAI folder, genai_config.json is updated for the form written:
the w4a8 form gets a copy of the op library inside the folder, named in `custom_ops_library` (GenAI
loads custom-op libraries only from within the model folder); the qdq form gets
graph_optimization_level ORT_ENABLE_BASIC, because ORT's extended optimizations fuse its dequantized
INT4 linears into MatMulNBits with accuracy_level 4, which computes something else than the graph.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from fptq_graph.errors import FptqError
from fptq_graph.files.run_outputs import STAGING_PREFIX

GENAI_CONFIG = "genai_config.json"
# optimum's decoder file names, most useful first (a merged decoder serves prompt and decode steps).
OPTIMUM_MODELS = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx", "decoder_model.onnx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


# optimum's seq2seq export: the encoder, and the decoders it may write beside it (the one without a past is
# the one text calibration can feed: a with-past step needs the cross-attention cache of an earlier step).
ENCODER_MODEL = "encoder_model.onnx"
SEQ2SEQ_DECODERS = ("decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx")


@dataclass
class EncoderDecoder:
    encoder: Path
    decoders: list[Path]          # in SEQ2SEQ_DECODERS order
    start_token: int | None       # config.json's decoder_start_token_id


class FolderWarning(UserWarning):
    """The output folder works, but not the way the user may expect."""


@dataclass
class ModelFolder:
    path: Path
    kind: str                  # "genai", "optimum" or "huggingface"
    model: Path | None         # the ONNX file; None for a Hugging Face folder (not exported yet)

    @property
    def tokenizer(self) -> Path | None:
        """The folder itself when it holds tokenizer files (all three kinds keep them beside the model)."""
        return tokenizer_in(self.path)

    def other_models(self) -> list[Path]:
        """The folder's other ONNX files (an optimum seq2seq export's encoder, a non-merged decoder's
        with-past twin): copied float, which the run must say."""
        return sorted(p for p in self.path.glob("*.onnx") if self.model is None or p.resolve() != self.model.resolve())

    def encoder_decoder(self) -> "EncoderDecoder | None":
        """optimum's seq2seq layout (encoder_model.onnx beside decoder_model*.onnx), else None."""
        encoder = self.path / ENCODER_MODEL
        decoders = [self.path / name for name in SEQ2SEQ_DECODERS if (self.path / name).is_file()]
        if self.kind != "optimum" or not encoder.is_file() or not decoders:
            return None
        start = None
        try:   # the decoder's first input token (T5: the pad id; BART: </s>)
            start = json.loads((self.path / "config.json").read_text()).get("decoder_start_token_id")
        except (OSError, ValueError):
            pass
        return EncoderDecoder(encoder, decoders, start if isinstance(start, int) else None)

    def genai_config(self) -> dict:
        return json.loads((self.path / GENAI_CONFIG).read_text())


def tokenizer_in(folder: Path) -> Path | None:
    """`folder` when it holds tokenizer files, else None."""
    return folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def open_folder(path: str | Path) -> ModelFolder:
    """What kind of model folder `path` is, and which file is its model; one-line errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FptqError(f"{path}: not a folder")
    config = path / GENAI_CONFIG
    if config.is_file():
        try:
            name = json.loads(config.read_text())["model"]["decoder"]["filename"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FptqError(f"{config}: no model.decoder.filename in it ({type(exc).__name__}: {exc}); "
                            "not a GenAI model folder we can read") from None
        model = path / name
        if not model.is_file():
            raise FptqError(f"{config} names the decoder {name}, which is not in {path}")
        return ModelFolder(path, "genai", model)
    onnx_files = sorted(p.name for p in path.glob("*.onnx"))
    for name in OPTIMUM_MODELS:
        if name in onnx_files:
            return ModelFolder(path, "optimum", path / name)
    if len(onnx_files) == 1:
        return ModelFolder(path, "optimum", path / onnx_files[0])
    if onnx_files:
        raise FptqError(f"{path}: holds several ONNX files ({', '.join(onnx_files)}) and no {GENAI_CONFIG} saying "
                        "which is the model; give the file itself")
    weights = any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()
    if (path / "config.json").is_file() and weights:
        return ModelFolder(path, "huggingface", None)
    raise FptqError(f"{path}: not a model folder (no {GENAI_CONFIG}, no .onnx file, no Hugging Face config.json with "
                    "weights)")


def copy_companions(folder: ModelFolder, skip: set[Path], out: Path) -> list[str]:
    """Copies every file of the input folder into `out` except `skip` (the model and its external data),
    keeping sub-folders; returns the names copied. Links stay valid in the copy (keep_links_valid)."""
    skip = {p.resolve() for p in skip}
    copied = []
    for item in sorted(folder.path.iterdir()):
        if item.resolve() in skip or item.name.startswith(STAGING_PREFIX):
            continue
        target = out / item.name
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, symlinks=True)
        elif item.is_symlink():
            target.symlink_to(os.readlink(item))
        else:
            shutil.copy2(item, target)
        copied.append(item.name)
    keep_links_valid(folder.path, out)
    return copied


def keep_links_valid(source: Path, copy: Path) -> None:
    """Each symbolic link copied from `source` into `copy` as written: one that points inside `source`
    stays a link (the copy has the same layout, so it points at the copy's file); one that points
    outside is replaced by what it points at, since a relative link to outside the folder dangles at
    the copy's place; a link that dangles already in the input is dropped, with a warning."""
    root = source.resolve()
    for link in sorted(p for p in copy.rglob("*") if p.is_symlink()):
        original = source / link.relative_to(copy)
        try:
            points_to = original.resolve(strict=True)
        except (OSError, RuntimeError):
            link.unlink()
            warnings.warn(FolderWarning(f"{original}: a link to nothing (or a loop); not copied"), stacklevel=3)
            continue
        if points_to == root or root in points_to.parents:
            inside = copy / points_to.relative_to(root)
            link.unlink()
            link.symlink_to(os.path.relpath(inside, link.parent))
            continue
        link.unlink()
        if points_to.is_dir():
            shutil.copytree(points_to, link, symlinks=False)
        else:
            shutil.copy2(points_to, link)


def update_genai_config(out: Path, model_name: str, form: str, library: Path | None) -> dict:
    """Points genai_config.json in `out` at the quantized model and sets what the form needs to run
    as written in onnxruntime-genai; returns the new config."""
    path = out / GENAI_CONFIG
    config = json.loads(path.read_text())
    decoder = config["model"]["decoder"]
    decoder["filename"] = model_name
    options = decoder.setdefault("session_options", {})
    if form == "w4a8":
        if library is None:
            raise FptqError("the w4a8 form needs the fptq op library, which is not installed")
        shutil.copy2(library, out / library.name)
        options["custom_ops_library"] = library.name   # relative: GenAI resolves it inside the model folder
    elif form == "qdq":
        options["graph_optimization_level"] = "ORT_ENABLE_BASIC"
        warnings.warn(FolderWarning(
            "the qdq form in onnxruntime-genai: its extended graph optimizations would fuse the dequantized INT4 "
            "linears into MatMulNBits with accuracy_level 4 (int8 activations per block, not the graph's "
            "numerics), so genai_config.json now sets graph_optimization_level ORT_ENABLE_BASIC: correct, but "
            "slow. For deployment use --format ort (stock ONNX Runtime) or --format w4a8 (the bundled op)"),
            stacklevel=2)
    path.write_text(json.dumps(config, indent=4) + "\n")
    return config
