"""The work folder of a block-by-block run: each finished block's decisions and quantized codes, so a
run that is stopped (killed, out of disk, a power cut) resumes at the first unfinished block.

    <folder>/manifest.json          the run's fingerprint (input files, calibration, config, blocks)
    <folder>/block-00007/           one finished block: result.json (its plan piece: plans, head, notes,
                                    SQNRs, pass records; plan_piece.py, no pickle) and arrays.bin, every
                                    array (codes, scales, zero points, equalization scales) at a 64-byte
                                    aligned offset result.json records
    <folder>/activations/           spilled cut activations (cut_store.py; never resumed from)

A block is written into block-00007.tmp-<pid> and renamed into place once complete, so a block folder
that exists is whole; temporary folders of dead runs are removed when a run opens the folder. Resuming
needs the same fingerprint: a folder made by another input, calibration or configuration is refused,
never mixed in. The codes are read back memory-mapped, one mapping (one file descriptor) per block
(ir/mapped_files), so finished blocks cost no memory until the output is written.

Resident: nothing but the manifest; a loaded block's codes are mapped files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fptq_graph import __version__
from fptq_graph.errors import FptqError
from fptq_graph.files.run_outputs import model_files
from fptq_graph.ir.mapped_files import MappedFiles
from fptq_graph.quant.int4 import QuantizedWeight
from fptq_graph.sequential.plan_piece import decode, encode

MANIFEST = "manifest.json"
FORMAT = 4          # 4: ActivationSpec by its two axes (3: the piece as JSON with a scheme; 2: a pickle; 1: a .npy an array)
RESULT = "result.json"
ALIGN = 64


class WorkFolderError(FptqError):
    """A work folder that cannot be used for this run (another run's, or unreadable)."""


@dataclass
class BlockResult:
    plans: dict                      # linear -> LinearPlan
    head: object                     # HeadPlan if this block holds the LM head, else None
    product_folds: tuple
    quantized: dict                  # linear -> QuantizedWeight
    notes: dict = field(default_factory=dict)
    weight_sqnr: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    gram_bytes: int = 0


class WorkFolder:
    def __init__(self, path: Path, fingerprint: str, blocks: int):
        self.path, self.fingerprint, self.blocks = Path(path), fingerprint, blocks
        self.kept = 0     # finished blocks found from an earlier run

    def open(self, resume: bool, log=None) -> None:
        """Creates the folder, or takes up an earlier run's: resumed with `resume` when its fingerprint
        is this run's, else emptied (said in `log`)."""
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                earlier = json.loads(manifest.read_text())
            except (OSError, ValueError):
                earlier = {}
            finished = self._finished_indices()
            same = earlier.get("fingerprint") == self.fingerprint and earlier.get("format") == FORMAT
            if resume and not same:
                raise WorkFolderError(f"{self.path}: this work folder belongs to another run (different input, "
                                      "calibration or settings); remove it, or run without --resume to start over")
            if resume:
                self.kept = len(finished)
                self._remove_stale()
                if log:
                    log(f"[resume] {self.path}: {len(finished)} of {self.blocks} blocks finished earlier; going on "
                        f"from block {min(set(range(self.blocks)) - set(finished), default=self.blocks) + 1}")
                return
            if finished and log:
                log(f"[work] {self.path}: an earlier run left {len(finished)} finished block(s); starting over "
                    f"(--resume would have continued {'it' if same else 'nothing: it was another run'})")
            shutil.rmtree(self.path, ignore_errors=True)
        elif resume and log:
            log(f"[resume] {self.path}: no earlier run to resume; starting from block 1")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / (MANIFEST + ".tmp")).write_text(json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                                                                 "blocks": self.blocks, "pid": os.getpid()}))
        os.replace(self.path / (MANIFEST + ".tmp"), manifest)

    def _finished_indices(self) -> list[int]:
        found = []
        for entry in self.path.glob("block-*"):
            if entry.is_dir() and ".tmp-" not in entry.name and (entry / RESULT).is_file():
                try:
                    found.append(int(entry.name.split("-")[1]))
                except ValueError:
                    continue
        return sorted(found)

    def _remove_stale(self) -> None:
        for entry in self.path.glob("block-*.tmp-*"):
            shutil.rmtree(entry, ignore_errors=True)
        shutil.rmtree(self.path / "activations", ignore_errors=True)

    def block_dir(self, index: int) -> Path:
        return self.path / f"block-{index:05d}"

    def finished(self, index: int) -> bool:
        return (self.block_dir(index) / RESULT).is_file()

    def save(self, index: int, result: BlockResult) -> None:
        final = self.block_dir(index)
        staged = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        try:
            with open(staged / "arrays.bin", "wb") as data:
                write = _ArrayWriter(data)
                stored = {}
                for name, qw in result.quantized.items():
                    parts = {part: write(getattr(qw, part)) for part in ("codes", "scale", "zero_point")
                             if getattr(qw, part) is not None}
                    stored[name] = [parts, list(qw.shape), qw.group_size, qw.bits]
                head = result.head
                tied = [g.outputs[0].name for g in head.tied] if head is not None and head.tied else []
                piece = {"plans": encode(result.plans, write),
                         "head": encode(replace(head, tied=()) if head is not None else None, write), "tied": tied,
                         "product_folds": encode(tuple(result.product_folds), write), "quantized": stored,
                         "notes": encode(result.notes, write), "weight_sqnr": encode(result.weight_sqnr, write),
                         "records": encode(list(result.records), write), "gram_bytes": int(result.gram_bytes)}
                data.flush()
                os.fsync(data.fileno())
            with open(staged / RESULT, "w") as f:
                json.dump(piece, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staged, final)
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise WorkFolderError(f"{self.path}: could not write block {index + 1} ({exc.strerror or exc}); the "
                                  "blocks finished before it are kept: rerun with --resume") from None

    def load(self, index: int, node_by_output: dict) -> BlockResult:
        """A finished block, its codes mapped read-only; `node_by_output` resolves the tied lookups."""
        folder = self.block_dir(index)
        try:
            piece = json.loads((folder / RESULT).read_text())
            maps = MappedFiles()

            def read(offset, dtype, shape, what="a plan array"):
                return maps.view(folder / "arrays.bin", offset, np.dtype(dtype), tuple(shape), what)

            quantized = {}
            for name, (stored, shape, group_size, bits) in piece["quantized"].items():
                parts = {part: read(*where, f"{name}.{part}") for part, where in stored.items()}
                quantized[name] = QuantizedWeight(codes=parts["codes"], shape=tuple(shape), scale=parts["scale"],
                                                  zero_point=parts.get("zero_point"), group_size=group_size, bits=bits)
            result = BlockResult(plans=decode(piece["plans"], read), head=decode(piece["head"], read),
                                 product_folds=decode(piece["product_folds"], read), quantized=quantized,
                                 notes=decode(piece["notes"], read), weight_sqnr=decode(piece["weight_sqnr"], read),
                                 records=decode(piece["records"], read), gram_bytes=piece["gram_bytes"])
            tied = piece["tied"]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise WorkFolderError(f"{folder}: unreadable finished block ({exc}); remove the work folder "
                                  f"{self.path} and run again") from None
        head = result.head
        if head is not None and tied:
            head = replace(head, tied=tuple(node_by_output[name] for name in tied))
        return replace(result, head=head)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def remove_when_dropped(self) -> None:
        """A temporary folder (one the caller did not name) of a finished run goes when this object does,
        or at exit: a caller that never saves the result (a notebook, a test) leaves nothing in the temp
        directory. The codes mapped from it stay readable (an unlinked file's mapping lives on). Not for
        a named folder, nor a failed run's, which the error message names for --resume."""
        weakref.finalize(self, shutil.rmtree, str(self.path), True)


class _ArrayWriter:
    """Appends arrays to an open file at 64-byte aligned offsets; returns where each went."""

    def __init__(self, data):
        self.data, self.offset = data, 0

    def __call__(self, array: np.ndarray) -> list:
        array = np.ascontiguousarray(array)
        pad = -self.offset % ALIGN
        self.data.write(b"\0" * pad)
        self.offset += pad
        where = [self.offset, array.dtype.str, list(array.shape)]
        self.data.write(array.data)
        self.offset += array.nbytes
        return where


def run_fingerprint(state, source: str, blocks) -> str:
    """What makes a finished block reusable: this version, the input's files, the calibration data, the
    settings (not the progress display) and the block cut."""
    digest = hashlib.sha256()
    # how the run goes (progress display, the mode decision) does not change what a block decides
    config = {k: v for k, v in state.config.to_dict().items() if k not in ("progress", "sequential", "memory_budget_mib")}
    files = []
    if Path(source).is_file():
        for path in model_files(source):
            st = path.stat()
            files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    digest.update(json.dumps({"version": __version__, "config": config, "files": files, "source": source,
                              "blocks": [[b.kind, b.linears] for b in blocks]}, sort_keys=True, default=str).encode())
    state.calibration.digest(digest.update)   # calibration.CalibrationSource
    return digest.hexdigest()
