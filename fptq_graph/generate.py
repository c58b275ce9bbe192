"""Greedy generation through ONNX Runtime, streaming each new token to a callback.

A model exported with its KV cache (exporters/kv_cache.py) runs the prompt once with an empty past,
then one token a step, feeding back each step's presents as the next past. A model without a cache
reruns the whole sequence every step (correct, quadratic): export with --kv-cache to avoid it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fptq_graph.runtime import ort_errors
from fptq_graph.calibration import feeds_for, input_role, session_inputs
from fptq_graph.errors import FptqError

PAST = "past_key_values."


@dataclass
class Generation:
    tokens: list[int]                       # the new tokens, prompt excluded
    prompt_tokens: int
    prefill_seconds: float                  # the prompt step (first new token)
    decode_seconds: list[float] = field(default_factory=list)   # each later step

    @property
    def decode_tokens_per_second(self) -> float:
        return len(self.decode_seconds) / sum(self.decode_seconds) if self.decode_seconds else float("nan")


def greedy_generate(sess, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None,
                    on_token: Callable[[int], None] | None = None, inputs=None) -> Generation:
    """Greedy tokens after `prompt_ids`. `inputs`: the model's input value infos where they say more than
    the session (a KV cache's sizes the loader filled in, see exporters/kv_layout)."""
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
    if prompt.shape[1] == 0:
        raise FptqError("the prompt is empty: generation needs at least one token")
    if max_new_tokens < 1:
        raise FptqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    inputs = list(inputs) if inputs is not None else session_inputs(sess)
    outputs = [o.name for o in sess.get_outputs()]
    if "logits" not in outputs:
        raise FptqError(f"the model has no 'logits' output (outputs: {', '.join(outputs)}): it is not a causal LM")
    pasts = [i.name for i in inputs if i.name.startswith(PAST)]
    presents = ["present." + name[len(PAST):] for name in pasts]
    missing = [p for p in presents if p not in outputs]
    if missing:
        raise FptqError(f"the model has KV cache inputs but no outputs {', '.join(missing[:2])}…")
    tokens: list[int] = []
    timings: list[float] = []
    step_ids, past, length = prompt, {}, 0
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        if pasts:
            feeds = _cached_step_feeds(inputs, step_ids, past, length)
        else:
            feeds = feeds_for(inputs, np.concatenate([prompt, np.array([tokens], dtype=np.int64)], axis=1))
        results = ort_errors.run(sess, ["logits"] + presents, feeds, f"generation step {len(tokens)}")
        token = int(np.argmax(results[0][0, -1]))
        timings.append(time.perf_counter() - start)
        tokens.append(token)
        if on_token:
            on_token(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        length += step_ids.shape[1]
        past = dict(zip(pasts, results[1:]))
        step_ids = np.array([[token]], dtype=np.int64)
    return Generation(tokens=tokens, prompt_tokens=prompt.shape[1], prefill_seconds=timings[0],
                      decode_seconds=timings[1:])


def _cached_step_feeds(inputs, step_ids: np.ndarray, past: dict, length: int) -> dict:
    """Feeds for one step: the new ids at positions length.., a mask over past and new, the past (empty first)."""
    feeds = feeds_for(inputs, step_ids)   # fills an empty past and positions 0..n-1
    n = step_ids.shape[1]
    for value in inputs:
        name = value.name
        if name in past:
            feeds[name] = past[name]
        elif input_role(name) == "mask":
            feeds[name] = np.ones((1, length + n), dtype=feeds[name].dtype)
        elif input_role(name) == "positions":
            feeds[name] = np.arange(length, length + n, dtype=feeds[name].dtype)[None]
    return feeds
