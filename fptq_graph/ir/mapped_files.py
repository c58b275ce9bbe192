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
        return view(mapped, offset, dtype, shape)


def view(mapped: mmap.mmap, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`shape` elements of `dtype` at byte `offset` of a mapping, read-only (a zero-size one: zeros)."""
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


class SpillFile:
    """Arrays written one at a time to an unnamed temporary file, then read back as views of one mapping.

    For a rewrite that makes a new copy of every weight (rotate_residual): the copies would otherwise all
    be resident at once, the model's size again. Each array is written as soon as it is made (`add`), and
    `views()` maps the file once and hands back read-only views in the order added. The file has no name
    (tempfile.TemporaryFile): the disk space goes with the last view, whatever way the run ends.
    """

    def __init__(self, folder: str | None = None):
        import tempfile

        self._file = tempfile.TemporaryFile(dir=folder, prefix="fptq-spill-")
        self._layout: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        self._offset = 0

    def add(self, array: np.ndarray) -> int:
        """Writes `array`; returns its index for views()."""
        array = np.ascontiguousarray(array)
        pad = -self._offset % 64
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._layout.append((self._offset, array.dtype, array.shape))
        self._file.write(array.data if array.nbytes else b"")
        self._offset += array.nbytes
        return len(self._layout) - 1

    def views(self) -> list[np.ndarray]:
        self._file.flush()
        if self._offset == 0:
            self._file.close()
            return [np.zeros(shape, dtype) for _, dtype, shape in self._layout]
        mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._file.close()   # the mapping keeps the data (and the file) alive
        return [view(mapped, offset, dtype, shape) for offset, dtype, shape in self._layout]
