"""ONNX Runtime's failures on the user's data, turned into one line that says what to change.

ORT reports a bad feed from deep inside a kernel ("indices element out of data bounds, idx=7592 must
be within the inclusive range [-50,49]" from a Gather). The user's mistake is one step removed: a
tokenizer that does not match the model, or a sequence longer than the model's position table. These
helpers name the run, the feeds' shapes and that likely cause.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fptq_graph.errors import CalibrationError

DETAIL_CHARS = 600   # of ORT's message: enough for the node and its shapes, not a whole stack


def run_failure(exc: Exception, what: str, feeds: Mapping[str, np.ndarray]) -> CalibrationError:
    """A CalibrationError for `exc`, raised by ONNX Runtime while running `what` on `feeds`."""
    text = str(exc).strip()
    # every line: ORT puts the failing node on the first and the index or shape detail on later ones
    detail = " ".join(line.strip() for line in text.splitlines() if line.strip())[:DETAIL_CHARS] if text else type(exc).__name__
    for prefix in ("[ONNXRuntimeError] : ",):
        if detail.startswith(prefix):
            detail = detail.split(" : ", 2)[-1]
    # a KV cache's past may be empty (the prompt step); any other empty axis is the user's data
    empty = [f"'{name}' {list(value.shape)}" for name, value in feeds.items() if 0 in value.shape and "past" not in name]
    shapes = ", ".join(f"{name} {list(value.shape)} {value.dtype}" for name, value in feeds.items())
    hint = ""
    if empty:
        hint = (f"; input {', '.join(empty)} has a zero-size dimension (an empty sequence or batch): give every input at "
                "least one element along each axis")
    elif "out of data bounds" in detail or "indices element out of" in detail:
        hint = ("; an index past the end of a table: the tokenizer may not match the model (token ids beyond "
                "its vocabulary), or the sequence is longer than the model's position table (lower --seq-len)")
    elif "invalid expand shape" in detail.lower() or "Attempting to broadcast an axis" in detail:
        length = max((value.shape[-1] for value in feeds.values() if value.ndim >= 2), default=None)
        hint = (f"; shapes that do not broadcast, typically a sequence ({length} tokens) longer than the model's position "
                "table or attention mask: lower --seq-len to the model's maximum")
    elif "Invalid rank for input" in detail or "Got invalid dimensions for input" in detail:
        hint = "; the model expects other input shapes than [batch, sequence] token batches"
    return CalibrationError(f"ONNX Runtime failed running {what} (feeds: {shapes}): {detail}{hint}")


def run(sess, names, feeds: Mapping[str, np.ndarray], what: str) -> list:
    """sess.run(names, feeds), with ONNX Runtime's errors as run_failure's one line."""
    try:
        return sess.run(names, dict(feeds))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:   # onnxruntime's pybind errors share no public base class
        if type(exc).__module__.startswith("onnxruntime"):
            raise run_failure(exc, what, feeds) from None
        raise
