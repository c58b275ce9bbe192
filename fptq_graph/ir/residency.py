"""Keep resident memory to what is in use: give mapped pages back, stand in for weights already spent,
and read the process's resident set size.

Weights are memory-mapped read-only from the input (split_model.open_split). Pages of a mapped file
that a session or a quantizer has read stay in the process's resident set until the kernel needs the
memory, so a block-by-block run over a 7B model would look, and be accounted, as if it held the whole
model by its last block; `release_pages` advises them away (MADV_DONTNEED: the next read faults them
back in from the file, nothing is lost). A weight whose quantized codes exist is replaced by a
`SpentWeight`, a zero-stride stand-in with its shape and dtype and no memory, which nothing may
write out (ir/save.py refuses one).
"""
from __future__ import annotations

import mmap
from typing import Iterable

import numpy as np


def release_pages(arrays: Iterable[np.ndarray]) -> int:
    """Advises away the mapped pages behind each memory-mapped array (its own bytes, not its whole
    file: a file's tensors share one mapping, split_model._FileMaps); returns the bytes advised."""
    released = 0
    for array in arrays:
        mapped = mapping_of(array)
        if mapped is None or mapped.closed or array.nbytes == 0:
            continue
        base_address = np.frombuffer(mapped, dtype=np.uint8, count=1).__array_interface__["data"][0]
        start = array.__array_interface__["data"][0] - base_address
        aligned = start - start % mmap.PAGESIZE
        length = min(start + array.nbytes, len(mapped)) - aligned
        try:
            mapped.madvise(mmap.MADV_DONTNEED, aligned, length)
            released += length
        except (OSError, ValueError):   # a mapping the kernel will not advise: it is only memory
            pass
    return released


def mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The mmap an array's memory lies in (np.memmap's own, or the one a np.frombuffer view reads), if any."""
    base = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base
        mapped = getattr(base, "_mmap", None)
        if isinstance(mapped, mmap.mmap):
            return mapped
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None


class SpentWeight(np.ndarray):
    """A weight whose quantized form the run already holds: its shape and dtype, no data (zero strides)."""


def spent(array: np.ndarray) -> SpentWeight:
    stand_in = np.lib.stride_tricks.as_strided(np.zeros((), dtype=array.dtype), shape=array.shape,
                                               strides=(0,) * array.ndim, writeable=False)
    return stand_in.view(SpentWeight)


def is_spent(array) -> bool:
    return isinstance(array, SpentWeight)


def resident_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc/self/status (0, 0 elsewhere)."""
    current = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return current, peak


def reset_peak() -> bool:
    """Starts a new peak measurement (Linux: clear_refs 5 resets VmHWM to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be used without swapping), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cgroup_limit_bytes() -> int | None:
    """The cgroup v2 memory limit of this process, if one is set."""
    try:
        text = open("/sys/fs/cgroup/memory.max").read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def memory_budget(share: float = 0.6) -> int | None:
    """`share` of the memory this process can use now (the least of MemAvailable and a cgroup limit)."""
    known = [b for b in (available_bytes(), cgroup_limit_bytes()) if b]
    return int(share * min(known)) if known else None




def trim_heap() -> None:
    """Returns the C heap's free pages to the system (glibc's malloc_trim). Freed ONNX Runtime buffers
    and numpy arrays under glibc's mmap threshold (up to 32 MiB) otherwise stay in the resident set, so
    each finished block's session left its intermediates' high-water mark behind."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim with
        pass
