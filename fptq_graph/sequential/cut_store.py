"""The activations handed from block to block: per calibration batch, each cut tensor a later block
reads, in memory while they are small and in memory-mapped files of the work folder once they are not.

Resident: at most `memory_limit` bytes of cut tensors (the rest are mapped files the kernel pages in
as a block reads them, and advised away after).
"""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from fptq_graph.errors import FptqError
from fptq_graph.ir.residency import release_pages


class SpillError(FptqError):
    """The disk could not take the spilled activations (names the folder, which a rerun can resume)."""


class CutStore:
    def __init__(self, folder: Path | None, memory_limit: int):
        self.folder, self.memory_limit = folder, memory_limit
        self.arrays: dict[tuple[int, str], np.ndarray] = {}
        self.in_memory = 0
        self.spilled = 0          # bytes written to files so far
        self.peak = 0             # most bytes held at once (memory and files)
        self._serial = 0

    def put(self, batch: int, name: str, array: np.ndarray) -> None:
        self.drop_one(batch, name)
        if self.folder is not None and self.in_memory + array.nbytes > self.memory_limit:
            array = self._spill(array)
        else:
            # a copy we own: an ONNX Runtime output can keep its session's whole memory arena alive
            # (0.85 GiB a 7B-width layer block, kept for every block until the run ended)
            array = np.array(array, copy=True, order="C")
            self.in_memory += array.nbytes
        self.arrays[(batch, name)] = array
        self.peak = max(self.peak, self.held)

    @property
    def held(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def feeds(self, batch: int, names: list[str]) -> dict[str, np.ndarray]:
        return {name: self.arrays[(batch, name)] for name in names if (batch, name) in self.arrays}

    def dtypes(self) -> dict[str, np.dtype]:
        return {name: a.dtype for (_, name), a in self.arrays.items()}

    def drop(self, names: set[str]) -> None:
        """Forgets the cut tensors no later block reads."""
        for key in [k for k in self.arrays if k[1] in names]:
            self.drop_one(*key)

    def drop_one(self, batch: int, name: str) -> None:
        array = self.arrays.pop((batch, name), None)
        if array is None:
            return
        if isinstance(array, np.memmap):
            path = Path(array.filename)
            release_pages([array])
            del array
            path.unlink(missing_ok=True)
        else:
            self.in_memory -= array.nbytes

    def release(self) -> None:
        """Advises away the pages of the spilled tensors read so far (they stay on disk)."""
        release_pages(a for a in self.arrays.values() if isinstance(a, np.memmap))

    def clear(self) -> None:
        for key in list(self.arrays):
            self.drop_one(*key)

    def _spill(self, array: np.ndarray) -> np.memmap:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._serial += 1
        path = self.folder / f"cut-{self._serial:06d}.bin"
        try:
            write_file(path, array)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise SpillError(f"{self.folder}: no space left on the disk for the activations handed between blocks "
                                 f"({array.nbytes / 2**20:.0f} MiB more); free space or calibrate on fewer samples, then "
                                 "rerun with --resume (finished blocks are kept)") from None
            raise SpillError(f"{path}: could not spill activations ({exc.strerror or exc})") from None
        self.spilled += array.nbytes
        return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)


def write_file(path: Path, array: np.ndarray) -> None:
    """The array's bytes into `path` (raises OSError, ENOSPC when the disk is full)."""
    with open(path, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
