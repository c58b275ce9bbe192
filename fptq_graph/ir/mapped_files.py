"""Read-only mappings of files, one per file, with each tensor handed out as a numpy view into it.

Why one per file: every mapping holds a file descriptor of its own (Python's mmap duplicates the one it
is given), so a mapping per tensor (np.memmap, np.load(mmap_mode=...)) made opening SmolLM2 take 272
descriptors, and a 70B-class model opened twice (quantize's float and output models, eval's pair), or a
block-by-block run's finished codes, pass the usual limit of 1024. A view keeps its file's mapping alive
(numpy's .base); the file is unmapped when its last view goes. ir/residency.release_pages advises away
one view's pages, not its file's.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np


class MappedFiles:
    """The mappings made so far, by path; `view` maps a file on its first use."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def view(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        """`shape` elements of `dtype` at byte `offset` of `path`, read-only; `what` names the tensor in the
        error when the file is too short for it."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        need = offset + count * dtype.itemsize
        size = Path(path).stat().st_size
        if need > size:
            raise ValueError(f"tensor '{what}' needs bytes up to {need} of {Path(path).name}, which has {size}")
        if count == 0:
            return np.zeros(shape, dtype)
        mapped = self._maps.get(path)
        if mapped is None:
            with open(path, "rb") as f:
                mapped = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
