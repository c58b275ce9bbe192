"""Export a Hugging Face model (a local directory, a GGUF file, or an in-memory model) to ONNX.

A causal LM exports `input_ids` (+ `attention_mask`) -> `logits`, or with kv_cache=True the
generation graph of kv_cache.py (past keys and values in, presents out); an encoder such as
BERT/MiniLM exports -> `last_hidden_state`. The tokenizer, when there is one, is saved beside the ONNX and its
directory recorded in the model's metadata, so `quantize --calib FILE` finds it.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch

from fptq_graph.errors import ExportError
from fptq_graph.exporters.kv_cache import kv_export_arguments
from fptq_graph.exporters.torch_module import export_module


class LogitsOnly(torch.nn.Module):
    """Returns one tensor (logits or last_hidden_state) so the ONNX has one named output."""

    def __init__(self, model, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask):
        kwargs = {"use_cache": False} if self.output == "logits" else {}
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs), self.output)


def export_hf(model_or_dir, path: str | os.PathLike, *, fx: bool = False, example_seq_len: int = 16,
              kv_cache: bool = False) -> onnx.ModelProto:
    """Export a Hugging Face model to `path`; with fx=True also write `<path stem>.fx.txt`; kv_cache=True
    (causal LMs) exports past keys/values as inputs and presents as outputs, for generation."""
    path = Path(path)
    tokenizer = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, tokenizer = _load_pretrained(Path(model_or_dir))
    else:
        model = model_or_dir
    causal = hasattr(model, "lm_head") or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    output = "logits" if causal else "last_hidden_state"
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, example_seq_len), generator=torch.Generator().manual_seed(0))
    metadata = {"fptq_graph.vocab_size": vocab, "fptq_graph.output": output,
                "fptq_graph.architecture": type(model).__name__}
    if tokenizer is not None:
        tok_dir = path.with_name(path.stem + ".tokenizer")
        tokenizer.save_pretrained(str(tok_dir))
        metadata["fptq_graph.tokenizer"] = tok_dir.name
    fx_path = path.with_suffix(".fx.txt") if fx else None
    if kv_cache:
        if not causal:
            raise ExportError(f"{type(model).__name__} is not a causal LM: a KV cache export needs one")
        arguments = kv_export_arguments(model, example_seq_len, vocab)
        metadata.update(arguments.pop("metadata"))
        return export_module(path=path, fx_path=fx_path, metadata=metadata, strip_prefix="model.", **arguments)
    return export_module(LogitsOnly(model, output), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path,
                         [output], fx_path=fx_path, metadata=metadata,
                         strip_prefix="model.", max_sequence=max_positions(model.config))


def _load_pretrained(source: Path):
    """Model (float32) and tokenizer (or None) from a model directory or a GGUF file.

    A GGUF file is dequantized to float32 by transformers (it needs the gguf and accelerate packages).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if source.suffix == ".gguf" and source.is_file():
        where, kwargs = source.parent, {"gguf_file": source.name}
    elif (source / "config.json").is_file():
        where, kwargs = source, {}
    else:
        raise ExportError(f"{source}: not a Hugging Face model directory (no config.json) nor a .gguf file")
    config = AutoConfig.from_pretrained(where, **kwargs)
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or []))
    if kwargs and not config.architectures:
        causal = True   # GGUF files hold decoders; their config carries no architectures list
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        model = loader.from_pretrained(where, dtype=torch.float32, **kwargs)
    except (ImportError, ValueError) as exc:
        raise ExportError(f"{source}: could not load ({str(exc).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def max_positions(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 2:
            return value
    return 2**15
