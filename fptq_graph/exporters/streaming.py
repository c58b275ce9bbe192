"""Export a Hugging Face safetensors checkpoint to ONNX holding one weight tensor in memory at a time.

export_hf loads the whole model in float32 and writes a proto holding every weight: its peak memory is
several times the weights. Here the model is built from its config with its parameters created on torch's
meta device (no storage; buffers such as rotary `inv_freq` are computed on the CPU as usual), then swapped
for fake CPU tensors of one FakeTensorMode (with meta parameters the model's code moves its buffers to
the meta device and the graph differs); it is traced exactly as export_module traces it (same wrapper,
inputs, dynamic shapes, opset, optimizer and post-processing), and the weights are then copied one by
one from the checkpoint into the model's external data file.

How initializers map back to the checkpoint. The dynamo exporter names a parameter's initializer after
its FQN in the traced wrapper ("model." + the Hugging Face name). Before the ONNX optimizer runs, each
parameter the optimizer could fold or deduplicate (at most onnxscript's constant-folding input limit,
8192 elements: norms, biases, small projections) gets its real value from the checkpoint, so the optimizer
does to it what it does in export_hf; the larger ones get no value. The optimizer folds a large constant
only through a Transpose that is its single consumer (onnxscript's always-fold rule); those Transposes
are folded here afterwards, by the same rule, into an initializer named after the Transpose's output (the
name the optimizer gives it) that is written transposed. Tied parameters (lm_head.weight and
embed_tokens.weight) are one parameter, hence one initializer, as in export_hf; the checkpoint holds one
of their names. Constants that come from no parameter (computed from buffers, or from the code) are small
and keep the values the trace gave them.

Memory: the checkpoint is never mapped whole (safetensors' safe_open maps a file; each tensor is read
through its own short-lived handle, so pages read earlier are not kept resident in this process); peak
is the interpreter, torch and the traced structure plus a few copies of the largest tensor.

dtype: float16 and bfloat16 checkpoints export as float16 (bfloat16 converted; the project refuses
bfloat16 ONNX models), float32 ones as float32, unless dtype="float32" or "float16" is asked; the model
is traced in that dtype, so a float16 graph computes as the Hugging Face model does in float16.

What falls back to export_hf (the whole model in memory): a GGUF file, a directory without *.safetensors,
and a checkpoint that lacks a tensor the graph uses (export_hf would initialize it randomly).
"""
from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from fptq_graph.errors import ExportError
from fptq_graph.exporters import huggingface as hf
from fptq_graph.exporters import torch_module
from fptq_graph.exporters.kv_cache import kv_export_arguments
from fptq_graph.ir.opset import IR_VERSION
from fptq_graph.ir.save import replace_atomically
from fptq_graph.ir.split_model import MIN_SPLIT_BYTES

try:   # the size above which onnxscript's optimizer folds a constant only through a single Transpose
    from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT as FOLD_LIMIT
except ImportError:   # pragma: no cover
    FOLD_LIMIT = 8192

ALIGN = 4096   # each tensor's offset in the data file, as ir/split_model.write_external writes them
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_FLOAT_TYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def export_hf_streaming(model_dir: str | os.PathLike, path: str | os.PathLike, *, dtype: str | None = None,
                        kv_cache: bool = False, fx: bool = False, example_seq_len: int = 16,
                        log: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """Export the safetensors checkpoint in `model_dir` to `path` (atomically) with `<name>.data` beside it;
    returns the structure (its weights are external-data references into that file).

    The graph is the one export_hf writes for the same checkpoint (same inputs, outputs, node names and
    op structure); kv_cache=True exports the generation graph of kv_cache.py; fx=True also writes the
    torch.export FX graph as `<path stem>.fx.txt`. dtype: None (or "auto": float16 for float16/bfloat16
    checkpoints, float32 otherwise), "float16" or "float32". The tokenizer, when there is one, is saved
    beside the ONNX as export_hf saves it. A GGUF file or a directory without *.safetensors goes through
    export_hf (the whole model in float32 in memory; dtype="float16" is refused there), and so does a
    checkpoint missing a tensor the graph uses; `log` says so.
    """
    say = log or (lambda _line: None)
    source, path = Path(model_dir), Path(path)
    if dtype not in (None, "auto", *_DTYPES):
        raise ExportError(f"dtype {dtype!r}: choose auto, float32 or float16")
    checkpoint = Checkpoint.find(source)
    if checkpoint is None:
        if not (source.is_file() or (source / "config.json").is_file()):   # export_hf says what it is not
            return hf.export_hf(source, path, fx=fx, kv_cache=kv_cache, example_seq_len=example_seq_len)
        return _fallback(source, path, dtype, kv_cache, fx, example_seq_len, say,
                         "a GGUF file" if source.is_file() else "no *.safetensors checkpoint")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{source}: could not read its config ({str(exc).splitlines()[0]})") from None
    decoder = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or []))
    float_type = _export_dtype(checkpoint, dtype, say)
    model, fake_mode = _empty_model(AutoModelForCausalLM if decoder else AutoModel, config, float_type, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None

    causal = hasattr(model, "lm_head") or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    output = "logits" if causal else "last_hidden_state"
    vocab = int(model.config.vocab_size)
    metadata = {"fptq_graph.vocab_size": vocab, "fptq_graph.output": output,
                "fptq_graph.architecture": type(model).__name__}
    if kv_cache:
        if not causal:
            raise ExportError(f"{type(model).__name__} is not a causal LM: a KV cache export needs one")
        arguments = kv_export_arguments(model, example_seq_len, vocab)
        metadata.update(arguments.pop("metadata"))
    else:
        ids = torch.randint(0, vocab, (2, example_seq_len), generator=torch.Generator().manual_seed(0))
        arguments = {"module": hf.LogitsOnly(model, output), "output_names": [output],
                     "example_inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                     "max_sequence": hf.max_positions(model.config)}
    weights = Weights(arguments["module"], checkpoint, strip="model.")
    if tokenizer is not None:
        tok_dir = path.with_name(path.stem + ".tokenizer")
        tokenizer.save_pretrained(str(tok_dir))
        metadata["fptq_graph.tokenizer"] = tok_dir.name
    fx_path = path.with_suffix(".fx.txt") if fx else None
    arguments["example_inputs"] = {name: [fake_mode.from_tensor(t) for t in value] if isinstance(value, list)
                                   else fake_mode.from_tensor(value) for name, value in arguments["example_inputs"].items()}
    graph, dynamic_axes = _trace(fx_path=fx_path, prepare=weights.prepare, **arguments)
    missing = weights.fold_and_check(graph)
    if missing:
        return _fallback(source, path, dtype, kv_cache, fx, example_seq_len, say,
                         f"the checkpoint has no tensor for {', '.join(missing[:3])}"
                         + (", ..." if len(missing) > 3 else ""))

    data_name = path.name + ".data"
    written = {}
    say(f"export: {type(model).__name__} traced ({len(graph.graph)} nodes); writing its weights "
        f"({_type_name(float_type)}) to {data_name}")

    def write(staged: Path) -> list[str]:
        written["model"] = weights.write(graph, staged, data_name, dynamic_axes, metadata)
        return [data_name]

    replace_atomically(path, write)
    say(f"export: {weights.streamed} tensors copied from the checkpoint ({weights.streamed_bytes / 2**30:.2f} GiB "
        f"{_type_name(float_type)}), largest {weights.largest / 2**20:.1f} MiB")
    if weights.overflow:
        say(f"export: {weights.overflow} values beyond float16's range became inf")
    return written["model"]


def _fallback(source: Path, path: Path, dtype, kv_cache: bool, fx: bool, example_seq_len: int, say, why: str):
    if dtype == "float16":
        raise ExportError(f"{source}: {why}; a float16 export needs a safetensors checkpoint (export_hf "
                          "exports float32)")
    say(f"export: {source}: {why}; exporting through export_hf (the whole model in float32 in memory)")
    return hf.export_hf(source, path, fx=fx, kv_cache=kv_cache, example_seq_len=example_seq_len)


def _type_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the checkpoint ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str          # safetensors' name: F16, BF16, F32, ...
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards with model.safetensors.index.json),
    from their headers; each tensor is read when asked for, through its own safe_open handle."""

    def __init__(self, entries: dict[str, Entry]):
        self.entries = entries

    @classmethod
    def find(cls, source: Path) -> "Checkpoint | None":
        if not source.is_dir() or not (source / "config.json").is_file():
            return None
        index = source / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted({source / name for name in weight_map.values()})
        else:
            files = sorted(source.glob("*.safetensors"))
        if not files:
            return None
        entries = {}
        for file in files:
            if not file.is_file():
                raise ExportError(f"{source}: the index names {file.name}, which is missing")
            for key, info in _header(file).items():
                entries[key] = Entry(file, info["dtype"], tuple(int(d) for d in info["shape"]))
        return cls(entries)

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.entries[key].file), framework="pt") as f:
            return f.get_tensor(key)


def _header(file: Path) -> dict:
    """A safetensors file's header (name -> dtype, shape, offsets), read without mapping the file."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExportError(f"{file}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            raise ExportError(f"{file}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ExportError(f"{file}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header


def _export_dtype(checkpoint: Checkpoint, dtype: str | None, say) -> torch.dtype:
    """float16 when most of the checkpoint's floating-point bytes are 16-bit (unless dtype says), else float32."""
    sizes: dict[str, int] = {}
    for entry in checkpoint.entries.values():
        if entry.dtype in _FLOAT_TYPES:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + int(np.prod(entry.shape)) * _FLOAT_TYPES[entry.dtype]
    half = sizes.get("F16", 0) + sizes.get("BF16", 0)
    chosen = _DTYPES[dtype] if dtype in _DTYPES else (torch.float16 if half * 2 > sum(sizes.values()) else torch.float32)
    if sizes.get("BF16") and chosen == torch.float16:
        say("export: bfloat16 checkpoint weights are converted to float16 (bfloat16 ONNX models are not supported)")
    return chosen


# -- the model without its weights ----------------------------------------------------------------


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no storage) as they are registered;
    buffers stay real, computed on the CPU (accelerate's init_empty_weights(include_buffers=False))."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind, extra = type(module._parameters[name]), dict(module._parameters[name].__dict__)
            extra["requires_grad"] = param.requires_grad
            module._parameters[name] = kind(module._parameters[name].to("meta"), **extra)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _empty_model(loader, config, dtype: torch.dtype, source: Path):
    """The model built from its config, its parameters fake CPU tensors (shape, dtype and device, no
    storage) of one FakeTensorMode, returned with it. Meta parameters would trace too, but the model's
    code then moves CPU buffers and new tensors to the meta device and the graph differs from export_hf's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with _parameters_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = loader.from_config(config, dtype=dtype)
    except (ImportError, ValueError) as exc:
        raise ExportError(f"{source}: could not build the model ({str(exc).splitlines()[0]})") from None
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.nn.Parameter] = {}   # tied parameters stay one parameter
    with fake_mode:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    if id(param) not in fakes:
                        fakes[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                              requires_grad=False)
                    module._parameters[name] = fakes[id(param)]
    return model.eval(), fake_mode


# -- tracing (export_module's steps, with the weights' values chosen before the optimizer runs) ---------


def _trace(module, example_inputs, output_names, *, prepare, **kwargs):
    """torch_module.trace_to_onnx with `prepare(ir_model)` run right before the optimizer; returns the
    optimized onnx_ir model and the dim names."""
    def quietly_prepared(model):
        prepare(model)
        # "no constant value" for each weight left without one: said once per weight by the optimizer's
        # initializer deduplication, which then leaves them alone (what we want)
        logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)

    onnx_program, dynamic_axes = torch_module.trace_to_onnx(module, example_inputs, output_names,
                                                            before_optimize=quietly_prepared, **kwargs)
    return onnx_program.model, dynamic_axes


# -- the weights ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An initializer's data: checkpoint tensor `key` converted to `dtype`, then permuted by `perm`."""
    key: str
    dtype: torch.dtype
    perm: tuple[int, ...] | None = None


class Weights:
    """Which checkpoint tensor each of the traced module's parameters (and persistent buffers) comes from,
    the values given to the optimizer, and the writer of the data file."""

    def __init__(self, module: torch.nn.Module, checkpoint: Checkpoint, strip: str):
        self.checkpoint, self.strip = checkpoint, strip
        self.sources: dict[str, Recipe] = {}   # traced FQN -> recipe
        self.unresolved: set[str] = set()
        self.lazy: dict[str, Recipe] = {}      # initializer name -> recipe, for those left without a value
        self.streamed = self.streamed_bytes = self.largest = self.overflow = 0
        prefix = getattr(getattr(module, "model", module), "base_model_prefix", "") or ""
        groups: dict[int, list[str]] = {}
        params = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
            params[name] = param
        for aliases in groups.values():
            param = params[aliases[0]]
            key = next((k for alias in aliases for k in _candidates(alias.removeprefix(strip), prefix)
                        if k in checkpoint.entries), None)
            for alias in aliases:
                if key is None:
                    self.unresolved.add(alias)
                elif checkpoint.entries[key].shape != tuple(param.shape):
                    raise ExportError(f"checkpoint tensor {key} has shape {list(checkpoint.entries[key].shape)}; "
                                      f"the model built from config.json expects {list(param.shape)}")
                else:
                    self.sources[alias] = Recipe(key, param.dtype)
        persistent = {name for name, _ in module.state_dict(keep_vars=True).items()}
        for name, buffer in module.named_buffers(remove_duplicate=False):
            if name in persistent:   # loaded from the checkpoint by from_pretrained when it has it
                key = next((k for k in _candidates(name.removeprefix(strip), prefix) if k in checkpoint.entries), None)
                if key is not None and checkpoint.entries[key].shape == tuple(buffer.shape):
                    self.sources[name] = Recipe(key, buffer.dtype)

    def prepare(self, model) -> None:
        """Before the optimizer: small weights get their checkpoint values (the optimizer folds and
        deduplicates them as in export_hf); large ones get none (written later, straight from the file)."""
        import onnx_ir as ir

        for name, value in list(model.graph.initializers.items()):
            recipe = self.sources.get(name)
            if recipe is None:
                if name in self.unresolved:
                    value.const_value = None
                    self.lazy[name] = Recipe("", torch.float32)   # missing: reported if the graph uses it
                continue
            if int(np.prod(self.checkpoint.entries[recipe.key].shape)) <= FOLD_LIMIT:
                value.const_value = ir.tensor(self._array(recipe), name=name)
            else:
                value.const_value = None
                self.lazy[name] = recipe

    def fold_and_check(self, model) -> list[str]:
        """After the optimizer: a Transpose that is the single consumer of a weight left without a value
        becomes an initializer of the weight transposed (what the optimizer does to it when it has the
        value); returns the checkpoint-less parameters the graph still reads."""
        import onnx_ir as ir

        graph = model.graph
        changed = True
        while changed:
            changed = False
            for node in list(graph):
                if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
                    continue
                source = node.inputs[0]
                if source is None or source.name not in self.lazy or graph.initializers.get(source.name) is not source:
                    continue
                if len(source.uses()) != 1 or source.is_graph_output() or not self.lazy[source.name].key:
                    continue
                recipe = self.lazy[source.name]
                rank = len(self.checkpoint.entries[recipe.key].shape)
                perm_attr = node.attributes.get("perm")
                perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(rank)))
                before = recipe.perm or tuple(range(rank))
                out = node.outputs[0]
                folded = ir.Value(name=out.name, shape=out.shape, type=out.type)
                out.replace_all_uses_with(folded, replace_graph_outputs=True)
                graph.remove(node, safe=True)
                graph.initializers.pop(source.name)
                del self.lazy[source.name]
                graph.initializers[folded.name] = folded
                self.lazy[folded.name] = Recipe(recipe.key, recipe.dtype, tuple(before[p] for p in perm))
                changed = True
        used = {v.name for v in graph.initializers.values() if v.uses() or v.is_graph_output()}
        return sorted(name.removeprefix(self.strip) for name, r in self.lazy.items() if not r.key and name in used)

    def _array(self, recipe: Recipe) -> np.ndarray:
        tensor = self.checkpoint.read(recipe.key)
        converted = tensor.to(recipe.dtype)
        if converted.dtype == torch.float16 and tensor.dtype != torch.float16:
            self.overflow += int(torch.isinf(converted).sum()) - int(torch.isinf(tensor).sum())
        del tensor
        if recipe.perm is not None:
            converted = converted.permute(recipe.perm)
        return converted.contiguous().numpy()

    def write(self, model, staged: Path, data_name: str, dynamic_axes, metadata) -> onnx.ModelProto:
        """Writes every initializer of at least MIN_SPLIT_BYTES into `data_name` beside `staged` (weights one
        at a time, each at an ALIGN offset), then the structure naming them, as export_module would
        post-process it; returns the structure."""
        import onnx_ir as ir

        offset = 0
        with open(staged.parent / data_name, "wb") as data:
            for value in list(model.graph.initializers.values()):
                recipe = self.lazy.get(value.name)
                if recipe is not None and not recipe.key:
                    continue   # unused, unresolved parameter (removed below)
                array = self._array(recipe) if recipe is not None else value.const_value.numpy()
                if recipe is None and (array.nbytes < MIN_SPLIT_BYTES or array.dtype.kind not in "fiub"):
                    continue   # small constants stay inline (shape inference and folding read them)
                pad = -offset % ALIGN
                data.write(b"\0" * pad)
                offset += pad
                data.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
                dtype = value.const_value.dtype if recipe is None else ir.DataType.from_numpy(array.dtype)
                value.const_value = ir.ExternalTensor(data_name, offset, array.nbytes, dtype,
                                                      shape=ir.Shape(array.shape), name=value.name)
                offset += array.nbytes
                if recipe is not None:
                    self.streamed += 1
                    self.streamed_bytes += array.nbytes
                    self.largest = max(self.largest, array.nbytes)
                del array
        for name in [n for n, r in self.lazy.items() if not r.key]:
            model.graph.initializers.pop(name, None)
        proto = ir.serde.serialize_model(model)
        proto.ir_version = IR_VERSION
        torch_module.name_nodes_by_module(proto, "model.")
        torch_module.rename_dims(proto, dynamic_axes)
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=str(value))
        staged.write_bytes(proto.SerializeToString())
        return proto


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint names a module's parameter may be stored under: its own; with or without the base
    model's prefix ("model.", "bert.": a base model saved from a head model, or the other way); and the
    legacy LayerNorm gamma/beta."""
    names = [name]
    if prefix:
        names.append(f"{prefix}.{name}")
        if name.startswith(prefix + "."):
            names.append(name[len(prefix) + 1:])
    for n in list(names):
        if n.endswith(".weight"):
            names.append(n[: -len(".weight")] + ".gamma")
        elif n.endswith(".bias"):
            names.append(n[: -len(".bias")] + ".beta")
    return names
