"""Calibration sets: token batches from a text file or random tokens, turned into model feeds.

A CalibrationSet yields feed dicts one batch at a time, so calibration memory does not grow with
the number of samples. Model inputs are filled by name: input_ids from the tokens, attention_mask
with ones, token_type_ids with zeros, position_ids with 0..S-1, a KV cache's past_key_values.* empty
(past length 0: the prompt step); any other input is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import onnx

from fptq_graph.errors import CalibrationError

INT_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


class CalibrationSource(Protocol):
    """What a run asks of its calibration data (the driver, calibrate, the measurements): both kinds below
    are one. `digest` feeds what identifies the data to a hash (the work folder's fingerprint: a resumed
    run must calibrate on the same data)."""

    source: str

    def __len__(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    def feed_batches(self, model_inputs: Sequence[onnx.ValueInfoProto]) -> Iterator[dict]: ...
    def sample_feeds(self, model_inputs: Sequence[onnx.ValueInfoProto], count: int) -> Iterator[dict]: ...
    def digest(self, update: Callable[[bytes], None]) -> None: ...


@dataclass
class CalibrationSet:
    """`tokens` is [num_samples, seq_len]; batches are sliced lazily."""

    tokens: np.ndarray
    batch_size: int
    source: str
    bos: int | None = None   # the BOS id each window starts with (the tokenizer adds one), else None

    def __post_init__(self):
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0 or self.tokens.shape[1] == 0:
            raise CalibrationError(f"calibration set from {self.source} is empty")

    def __len__(self) -> int:
        return -(-self.tokens.shape[0] // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[0]

    def batches(self) -> Iterator[np.ndarray]:
        for start in range(0, self.tokens.shape[0], self.batch_size):
            yield self.tokens[start:start + self.batch_size]

    def feed_batches(self, model_inputs: Sequence[onnx.ValueInfoProto]) -> Iterator[dict]:
        for tokens in self.batches():
            yield feeds_for(model_inputs, tokens)

    def sample_feeds(self, model_inputs: Sequence[onnx.ValueInfoProto], count: int) -> Iterator[dict]:
        """Feeds of the first `count` samples, one sample each."""
        for row in self.tokens[:count]:
            yield feeds_for(model_inputs, row[None])

    def digest(self, update: Callable[[bytes], None]) -> None:
        update(np.ascontiguousarray(self.tokens).tobytes())
        update(str(self.batch_size).encode())


@dataclass
class FeedsCalibration:
    """Calibration from ready-made feed dicts (one per batch), for models whose inputs are not tokens."""

    feeds: list[dict]
    source: str = "explicit feeds"

    def __post_init__(self):
        if not self.feeds:
            raise CalibrationError(f"calibration set ({self.source}) is empty")

    def __len__(self) -> int:
        return len(self.feeds)

    @property
    def num_samples(self) -> int:
        return sum(int(next(iter(f.values())).shape[0]) for f in self.feeds)

    def feed_batches(self, model_inputs: Sequence[onnx.ValueInfoProto]) -> Iterator[dict]:
        names = {v.name for v in model_inputs}
        for feeds in self.feeds:
            missing = names - set(feeds)
            if missing:
                raise CalibrationError(f"calibration feeds lack model input(s) {', '.join(sorted(missing))}")
            yield {k: v for k, v in feeds.items() if k in names}

    def sample_feeds(self, model_inputs: Sequence[onnx.ValueInfoProto], count: int) -> Iterator[dict]:
        """Feeds of the first `count` samples (rows of the batches), one sample each."""
        for feeds in self.feed_batches(model_inputs):
            for row in range(int(next(iter(feeds.values())).shape[0])):
                if count <= 0:
                    return
                count -= 1
                yield {k: v[row:row + 1] for k, v in feeds.items()}

    def digest(self, update: Callable[[bytes], None]) -> None:
        for feeds in self.feeds:
            for name in sorted(feeds):
                update(name.encode())
                update(np.ascontiguousarray(feeds[name]).tobytes())


def from_text(path: str | os.PathLike, tokenizer, seq_len: int, samples: int, batch_size: int) -> CalibrationSet:
    """Calibration windows from a text file and a tokenizer in hand (see windows_of)."""
    return windows_of(read_token_ids(path, lambda: tokenizer), seq_len, samples, batch_size, str(path),
                      bos=leading_bos(tokenizer))


def windows_of(ids: np.ndarray, seq_len: int, samples: int, batch_size: int, source: str,
               bos: int | None = None) -> CalibrationSet:
    """Cuts token ids into `samples` consecutive windows of `seq_len` tokens.

    With `bos`, each window is BOS followed by seq_len - 1 text tokens: what the model saw in training
    when its tokenizer adds BOS (LLaMA-3, Gemma), as Hugging Face's perplexity recipe and lm-eval feed
    it. If the ids are fewer than `samples` windows, fewer windows are used (at least one); ids shorter
    than one window become one shorter window.
    """
    body = max(1, seq_len - 1) if bos is not None else seq_len
    window = min(body, len(ids))
    count = max(1, min(samples, len(ids) // window))
    tokens = ids[: count * window].reshape(count, window)
    if bos is not None:
        tokens = np.concatenate([np.full((count, 1), bos, dtype=tokens.dtype), tokens], axis=1)
        source += f" (each window starts with BOS {bos})"
    return CalibrationSet(tokens=tokens, batch_size=batch_size, source=source, bos=bos)


def leading_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one first when it adds its special tokens (its own setting:
    LLaMA-3 and Gemma tokenizers do, GPT-2-style ones do not; BERT's [CLS] is not a BOS), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    except Exception:   # a tokenizer we cannot probe adds nothing we know of
        return None
    return int(bos) if ids and ids[0] == bos else None


def read_token_ids(path: str | os.PathLike, get_tokenizer: Callable[[], Any], role: str = "calibration text") -> np.ndarray:
    """All token ids of a text file, with one-line errors for a missing or empty file and for text that
    tokenizes to nothing. The tokenizer comes from `get_tokenizer`, called only once the text is known
    good, so a bad file is reported before a slow or failing tokenizer load."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: {role} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"{path}: {role} is empty")
    ids = tokenize_text(get_tokenizer(), text)
    if len(ids) == 0:
        raise CalibrationError(f"{path}: {role} tokenizes to nothing")
    return np.asarray(ids, dtype=np.int64)


def from_random(count: int, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0) -> CalibrationSet:
    """`count` sequences of uniformly random tokens (the paper's data-free calibration)."""
    if count < 1:
        raise CalibrationError(f"random calibration needs at least one sequence, got {count}")
    if vocab_size < 1:
        raise CalibrationError(f"cannot draw random tokens: vocabulary size {vocab_size}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(count, seq_len), dtype=np.int64)
    return CalibrationSet(tokens=tokens, batch_size=batch_size, source=f"{count} random-token sequences")


class CalibrationWarning(UserWarning):
    """Calibration goes on, but not as asked (less text than the samples requested)."""


def input_role(name: str) -> str | None:
    """What a model input is, from its name (the one place inputs are guessed by name): "tokens"
    (input_ids, ids, tokens), "mask" (attention_mask, optimum's encoder_attention_mask: any *mask*),
    "token_type", "positions" (position_ids: any *position*), "encoder_hidden" (encoder_hidden_states, encoder_outputs), "cross_past" (a with-past
    decoder's cross-attention cache), "past" (the KV cache), or None."""
    lowered = name.lower()
    if lowered.startswith("past_key_values"):
        return "cross_past" if ".encoder." in lowered else "past"
    if "encoder_hidden_states" in lowered or lowered == "encoder_outputs":
        return "encoder_hidden"
    if "input_ids" in lowered or lowered in ("ids", "tokens"):
        return "tokens"
    if "token_type" in lowered:
        return "token_type"
    if "mask" in lowered:
        return "mask"
    if "position" in lowered:
        return "positions"
    return None


def is_token_input(value: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type in INT_TYPES and input_role(value.name) == "tokens"


def takes_tokens(model_inputs: Sequence[onnx.ValueInfoProto]) -> bool:
    """Whether the model reads token ids (text calibrates it), not images, audio or hidden states."""
    return any(is_token_input(v) for v in model_inputs)


def check_token_ids(ids: np.ndarray, vocab: int | None, text: str, source: str) -> None:
    """Token ids past the model's vocabulary mean a tokenizer made for another model: say so before
    ONNX Runtime fails inside the embedding Gather."""
    if vocab is not None and ids.size and int(ids.max()) >= vocab:
        raise CalibrationError(f"{text}: the tokenizer gives token id {int(ids.max())}, but {source} has a vocabulary "
                               f"of {vocab}: the tokenizer does not match the model (pass the model's own with "
                               "--tokenizer DIR)")


def feeds_for(model_inputs: Sequence[onnx.ValueInfoProto], tokens: np.ndarray, model_name: str = "model") -> dict:
    """Model feeds for one [B, S] token batch, filled by input name."""
    batch, seq = tokens.shape
    feeds = {}
    for value in model_inputs:
        elem = value.type.tensor_type.elem_type
        dtype = INT_TYPES.get(elem)
        name = value.name
        role = input_role(name)
        if role in ("past", "cross_past") and elem in FLOAT_TYPES:
            feeds[name] = empty_past(value, batch)
            continue
        if dtype is None:
            raise CalibrationError(f"{model_name}: input '{name}' is not an integer token input; "
                                   "calibrate it with random inputs (--calib-random N) or a .npz of feeds")
        rank = len(value.type.tensor_type.shape.dim) if value.type.tensor_type.HasField("shape") else None
        if rank is not None and rank != 2:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            raise CalibrationError(f"{model_name}: input '{name}' has rank {rank} ({dims}); token inputs are filled "
                                   "as [batch, sequence]; calibrate this model with a .npz of feeds")
        if role == "tokens":
            feeds[name] = tokens.astype(dtype)
        elif role == "mask":
            feeds[name] = np.ones((batch, seq), dtype=dtype)
        elif role == "token_type":
            feeds[name] = np.zeros((batch, seq), dtype=dtype)
        elif role == "positions":
            feeds[name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        else:
            raise CalibrationError(f"{model_name}: don't know how to fill input '{name}' from tokens")
    return feeds


def session_inputs(sess) -> list:
    """A session's inputs as ValueInfoProtos (name, element type, shape), for feeds_for."""
    types = {"tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32,
             "tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16}
    return [onnx.helper.make_tensor_value_info(i.name, types.get(i.type, onnx.TensorProto.UNDEFINED),
                                               [d if isinstance(d, int) else None for d in i.shape])
            for i in sess.get_inputs()]


def random_feeds(model_inputs: Sequence[onnx.ValueInfoProto], count: int, seq_len: int, batch_size: int, seed: int,
                 vocab: int | None, source: str) -> FeedsCalibration:
    """`count` random samples for a model whose inputs are not (only) tokens: a vision or audio encoder,
    a sub-graph. Each input gets values of its own type and shape: standard normal floats, random token
    ids (within the vocabulary), ones for a mask, 0..S-1 for positions. Fixed dimensions are kept; a
    symbolic first dimension is the batch and any other symbolic one is `seq_len`."""
    if count < 1:
        raise CalibrationError(f"random calibration needs at least one sample, got {count}")
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, count, batch_size):
        batch = min(batch_size, count - start)
        feeds = {}
        for value in model_inputs:
            tensor = value.type.tensor_type
            if not tensor.HasField("shape"):
                raise CalibrationError(f"{source}: input '{value.name}' has no declared shape, so random inputs cannot "
                                       "be drawn for it; calibrate with a .npz of feeds")
            shape = [d.dim_value if d.dim_value > 0 else (batch if i == 0 else seq_len)
                     for i, d in enumerate(tensor.shape.dim)]
            role = input_role(value.name)
            if tensor.elem_type in FLOAT_TYPES:
                feeds[value.name] = rng.standard_normal(shape).astype(FLOAT_TYPES[tensor.elem_type])
            elif tensor.elem_type in INT_TYPES and is_token_input(value):
                if vocab is None:
                    raise CalibrationError(f"{source}: cannot tell the vocabulary size for random tokens in "
                                           f"'{value.name}'; calibrate with a .npz of feeds")
                feeds[value.name] = rng.integers(0, vocab, size=shape).astype(INT_TYPES[tensor.elem_type])
            elif tensor.elem_type in INT_TYPES and role == "mask":
                feeds[value.name] = np.ones(shape, INT_TYPES[tensor.elem_type])
            elif tensor.elem_type in INT_TYPES and role == "positions":
                feeds[value.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(INT_TYPES[tensor.elem_type])
            else:
                raise CalibrationError(f"{source}: don't know how to draw random values for input '{value.name}' "
                                       f"({onnx.helper.tensor_dtype_to_string(tensor.elem_type)}); calibrate with a "
                                       ".npz of feeds")
        batches.append(feeds)
    return FeedsCalibration(batches, source=f"{count} random samples of each input's type and shape")


def feeds_from_npz(path: str | os.PathLike, model_inputs: Sequence[onnx.ValueInfoProto], batch_size: int) -> FeedsCalibration:
    """Calibration feeds from a .npz file: one array per model input, named as the input, samples along
    the first axis (numpy.savez(path, pixel_values=..., ...))."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration feeds not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    missing = [v.name for v in model_inputs if v.name not in arrays]
    if missing:
        raise CalibrationError(f"{path}: no array for model input(s) {', '.join(missing)} (it has {', '.join(arrays) or 'none'})")
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items() if name in {v.name for v in model_inputs}}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CalibrationError(f"{path}: the arrays must hold the same number (> 0) of samples along their first axis; "
                               f"got {counts}")
    for value in model_inputs:
        want = {**FLOAT_TYPES, **INT_TYPES}.get(value.type.tensor_type.elem_type)
        if want is not None and arrays[value.name].dtype != want:
            raise CalibrationError(f"{path}: array '{value.name}' is {arrays[value.name].dtype}, the model input takes "
                                   f"{np.dtype(want)}")
    total = next(iter(counts.values()))
    batches = [{v.name: arrays[v.name][start:start + batch_size] for v in model_inputs}
               for start in range(0, total, batch_size)]
    return FeedsCalibration(batches, source=str(path))


def empty_past(value: onnx.ValueInfoProto, batch: int) -> np.ndarray:
    """A zero-length past for a KV cache input [batch, kv_heads, past_sequence, head_dim]."""
    from fptq_graph.exporters.kv_layout import past_problem

    problem = past_problem(value)
    if problem:
        raise CalibrationError(problem)
    dims = value.type.tensor_type.shape.dim
    return np.zeros((batch, dims[1].dim_value, 0, dims[3].dim_value), dtype=FLOAT_TYPES[value.type.tensor_type.elem_type])


def vocab_size_of(model: onnx.ModelProto) -> int | None:
    """The vocabulary size: from our exporter's metadata, else the embedding table read by input_ids."""
    for prop in model.metadata_props:
        if prop.key == "fptq_graph.vocab_size":
            return int(prop.value)
    ids_inputs = {v.name for v in model.graph.input if input_role(v.name) == "tokens"}
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in ids_inputs:
            dims = shapes.get(node.input[0])
            if dims and len(dims) == 2:
                return dims[0]
    # A decoder's logits end in the vocabulary (the GenAI builder's embedding is not a plain Gather).
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim if out.type.tensor_type.HasField("shape") else []
        if out.name == "logits" and dims and dims[-1].dim_value > 0:
            return dims[-1].dim_value
    return None


def load_tokenizer(override, model: onnx.ModelProto, source: str):
    """A tokenizer object as given, or loaded from `override` (a directory), or from the directory our
    exporter recorded in the model (relative to the model file `source`)."""
    from fptq_graph.ir.metadata import TOKENIZER_KEY, get_metadata
    if override is not None and not isinstance(override, (str, os.PathLike)):
        return override
    location = override or get_metadata(model, TOKENIZER_KEY)
    if location is None and Path(source).is_file():   # a builder's or optimum's folder: tokenizer.json beside the model
        from fptq_graph.ir.folder import tokenizer_in

        beside = tokenizer_in(Path(source).resolve().parent)
        location = str(beside) if beside else None
    if location is None:
        raise CalibrationError(f"{source}: no tokenizer recorded in the model and none beside it; pass --tokenizer DIR")
    path = Path(location)
    if override is None and not path.is_absolute() and Path(source).is_file():
        path = Path(source).resolve().parent / path
    if not path.is_dir():
        raise CalibrationError(f"tokenizer directory {path} not found")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: could not load a tokenizer ({str(exc).splitlines()[0]})") from None


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of a whole text. The tokenizer's "longer than the model's maximum length" warning does
    not apply: callers cut the ids into windows."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        hf_logging.set_verbosity(level)


def decoder_feeds(encoder, encoder_inputs: Sequence[onnx.ValueInfoProto], decoder_inputs: Sequence[onnx.ValueInfoProto],
                  calib: CalibrationSet, start_token: int | None, decoder_name: str = "decoder") -> FeedsCalibration:
    """Calibration feeds for an encoder-decoder's decoder from the encoder's token calibration: each token
    batch runs through the float `encoder` (an ONNX Runtime session), and the decoder reads the same text
    (teacher forcing: the tokens shifted right behind `start_token`, the decoder start of the model's
    config.json; as they are when None) with the encoder's output as its cross-attention input and the
    encoder's mask as the encoder mask. A self-attention past is given empty (the prompt step).

    Resident: every batch's encoder output (calibration tokens x hidden size floats: 128 x 512 tokens of
    a 1024-wide encoder are 256 MiB), as the decoder's calibration reads each batch more than once."""
    from fptq_graph.runtime import ort_errors

    output = encoder.get_outputs()[0].name
    batches = []
    for index, tokens in enumerate(calib.batches()):
        encoder_feeds = feeds_for(encoder_inputs, tokens, "encoder")
        hidden = ort_errors.run(encoder, [output], encoder_feeds, f"the float encoder on calibration batch {index}")[0]
        mask = next((v for k, v in encoder_feeds.items() if input_role(k) == "mask"), np.ones(tokens.shape, np.int64))
        shifted = tokens if start_token is None else np.concatenate(
            [np.full((tokens.shape[0], 1), start_token, tokens.dtype), tokens[:, :-1]], axis=1)
        feeds = {}
        for value in decoder_inputs:
            name, role = value.name, input_role(value.name)
            dtype = INT_TYPES.get(value.type.tensor_type.elem_type)
            if role == "encoder_hidden":
                feeds[name] = hidden
            elif role == "mask" and dtype is not None:   # optimum: encoder_attention_mask
                feeds[name] = mask.astype(dtype)
            elif role == "tokens" and dtype is not None:
                feeds[name] = shifted.astype(dtype)
            elif role == "cross_past":
                raise CalibrationError(f"{decoder_name}: input '{name}' is the cross-attention cache of a decoding step "
                                       "(a with-past decoder), which text calibration does not produce; quantize the "
                                       "folder's decoder_model.onnx, or this model with a .npz of feeds")
            elif role == "past" and value.type.tensor_type.elem_type in FLOAT_TYPES:
                feeds[name] = empty_past(value, tokens.shape[0])
            elif name.lower() == "use_cache_branch":
                feeds[name] = np.zeros((1,), np.bool_)
            else:
                raise CalibrationError(f"{decoder_name}: don't know how to fill input '{name}' from the encoder's "
                                       "calibration; quantize it with a .npz of feeds")
        batches.append(feeds)
    return FeedsCalibration(batches, source=f"{calib.source}, through the float encoder")
