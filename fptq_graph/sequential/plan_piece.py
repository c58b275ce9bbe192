"""A finished block's plan piece as JSON plus its arrays: what the work folder stores instead of a pickle.

Loading a pickle runs whatever code it names, so a work folder (a directory anyone could have written,
kept between runs for --resume) must not be one. Here the plan's own types travel by name from an allow
list (the frozen plan dataclasses and the pass records); numbers keep their numpy type (a float32 scale
comes back float32, so a resumed block folds and emits the same bytes); arrays are written to the
block's arrays.bin at 64-byte aligned offsets and come back as read-only views of one mapping.

    encode(value, write) -> JSON-able       write(array) -> [offset, dtype, shape] in arrays.bin
    decode(data, read)   -> value           read(offset, dtype, shape) -> a read-only view

Resident: nothing (a block's piece is a few floats a linear and its scale vectors, mapped).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from fptq_graph.passes.base import PassRecord, PassResult
from fptq_graph.plan.plan import ActivationSpec, EqualizationSpec, HeadPlan, LinearPlan, WeightSpec

# The only classes a piece may name (anything else is refused, on writing and on reading).
TYPES = {cls.__name__: cls for cls in (LinearPlan, ActivationSpec, EqualizationSpec, WeightSpec, HeadPlan,
                                       PassRecord, PassResult)}


class PieceError(ValueError):
    """A piece that names something outside the allow list, or is not one this code wrote."""


def encode(value: Any, write: Callable[[np.ndarray], list]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.integer):
        return value
    if isinstance(value, np.generic):          # before float: np.float64 is a float
        return {"scalar": [value.dtype.str, repr(value.item())]}
    if isinstance(value, float):
        return {"float": repr(value)}          # repr round-trips, NaN and inf included
    if isinstance(value, np.ndarray):
        return {"array": write(value)}
    if dataclasses.is_dataclass(value) and type(value).__name__ in TYPES and TYPES[type(value).__name__] is type(value):
        return {"type": type(value).__name__,
                "fields": {f.name: encode(getattr(value, f.name), write) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"tuple": [encode(v, write) for v in value]}
    if isinstance(value, list):
        return {"list": [encode(v, write) for v in value]}
    if isinstance(value, Mapping):
        return {"dict": [[encode(k, write), encode(v, write)] for k, v in value.items()]}
    raise PieceError(f"a plan piece cannot hold a {type(value).__name__}")


def decode(data: Any, read: Callable[[int, str, list], np.ndarray]) -> Any:
    if data is None or isinstance(data, (bool, int, str)):
        return data
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise PieceError(f"not a plan piece value: {str(data)[:60]}")
    if "float" in data:
        return float(data["float"])
    if "array" in data:
        offset, dtype, shape = data["array"]
        return read(offset, dtype, shape)
    if "scalar" in data:
        dtype, text = data["scalar"]
        kind = np.dtype(dtype)
        return kind.type(float(text) if kind.kind == "f" else int(text) if kind.kind in "iu" else text == "True")
    if "type" in data:
        cls = TYPES.get(data["type"])
        if cls is None:
            raise PieceError(f"a plan piece names an unknown type {data['type']!r}")
        return cls(**{name: decode(value, read) for name, value in data["fields"].items()})
    if "tuple" in data:
        return tuple(decode(v, read) for v in data["tuple"])
    if "list" in data:
        return [decode(v, read) for v in data["list"]]
    if "dict" in data:
        return {decode(k, read): decode(v, read) for k, v in data["dict"]}
    raise PieceError(f"not a plan piece value: {str(data)[:60]}")

