"""The files one run writes: checked before any work starts, staged, and committed together.

Why: a command that writes several files (a model and its external data, a report, a page, a plot)
must never destroy what it reads, and a run that fails or is stopped half-way must leave nothing
behind. So every output is declared up front and refused when it

- resolves (symlinks and hard links included) to an input of the run or to another of its outputs;
- already exists as something other than a regular file (a folder, a device node, a FIFO);
- lies in a folder that does not exist or cannot be written.

Nothing is written under a requested name while the run works: each output goes to a hidden staging
folder inside its target folder (same file system, so the final move is a rename), and `commit`
renames everything into place at the end. A failure, Ctrl-C, SIGTERM or SIGHUP (see `signals`)
removes the staging folders instead. Files keep their final base names inside staging, so relative
references between them (a model's external data, an exported model's tokenizer folder) stay right.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from fptq_graph.errors import FptqError


class OutputError(FptqError):
    """An output path that would destroy an input, replace a special file, or cannot be written."""


class StaleStagingWarning(UserWarning):
    """A killed run's staging folder was found and removed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python is running so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Set when a run's outputs are committed: from then on the run is complete, and a SIGTERM/SIGHUP that
# arrives while it prints its summary must not report it stopped ("no output written") over complete
# outputs. Committing is the last thing a command does, so the rest of the run is a few prints.
_COMMITTED = {"done": False}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals() -> Iterator[None]:
    """Turns SIGTERM and SIGHUP into Terminated for the duration (what `timeout`, CI cancellation and
    container stops send), until a RunOutputs commits (see _COMMITTED); the previous handlers come
    back afterwards."""
    def raise_terminated(signum, _frame):
        if not _COMMITTED["done"]:
            raise Terminated(signum)

    _COMMITTED["done"] = False
    previous = swap_stop_handlers(raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _COMMITTED["done"] = False


def swap_stop_handlers(handler) -> dict:
    """Installs `handler` for SIGTERM and SIGHUP; returns the handlers it replaced (to put back). Off the
    main thread it changes nothing: the process's handlers are not ours to move."""
    previous = {}
    for signum in STOP_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:
            pass
    return previous


@contextmanager
def _stop_signals_held() -> Iterator[None]:
    """SIGTERM/SIGHUP held back (blocked, left pending) for the duration: a signal between two renames
    of a commit would leave some outputs in place and others not."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except (AttributeError, ValueError, OSError):   # no pthread_sigmask here: nothing to hold
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Output:
    """One declared output: where it goes (`final`) and where the run writes it (`staged`, set when
    the RunOutputs is entered; until then it equals `final` and must not be written), and the
    files written beside it under names of their own (a model's external data, an export's tokenizer
    folder), which are checked and committed with it."""

    label: str                   # how the user named it: "-o", "--report", ...
    final: Path
    staged: Path
    companions: tuple[str, ...] = ()   # names, in final's folder, of files or folders written with it
    is_folder: bool = False            # the output is a folder (staged as one, renamed into place whole)

    def targets(self) -> list[Path]:
        return [self.final, *(self.final.with_name(name) for name in self.companions)]


@dataclass
class RunOutputs:
    """The outputs of one run. Use as a context manager: a clean exit commits, an exception discards.

        outputs = RunOutputs(inputs=[model_path, text_path])
        model = outputs.add(args.output, "-o", companions=(name + ".data",))
        with outputs:     # staging folders are made here; leaving the block commits or discards
            ...           # work, writing to model.staged
    """

    inputs: list[Path] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    _staging: dict[Path, Path] = field(default_factory=dict)   # target folder -> its staging folder

    def add_input(self, path: str | os.PathLike | None) -> None:
        """A file (or folder) the run reads; no output may resolve to it. Checked again at commit."""
        if path is None or str(path) == "":
            return
        self.inputs.append(Path(path))
        for out in self.outputs:
            for target in out.targets():
                self._check_not_input(out.label, target)

    def add(self, path: str | os.PathLike, label: str, companions: Iterable[str] = (),
            folders: Iterable[str] = (), is_folder: bool = False) -> Output:
        """Declares an output and checks it now, before any work; returns where to write it.
        companions: names of files written beside it; folders: names of folders written beside it
        (an existing folder of that name is replaced whole at commit). is_folder: the output is itself a
        folder (a deployable model folder), which must not exist yet or be empty; its staged form is a
        folder made on entry and renamed into place whole."""
        if str(path).strip() == "":
            raise OutputError(f"{label}: empty output path")
        final = Path(path)
        if is_folder:
            self._check_new_folder(label, final)
        elif final.name in ("", ".", "..") or os.path.isdir(final):
            raise OutputError(f"{label} {path}: is a directory; give a file name")
        folders = tuple(folders)
        out = Output(label, final, final, tuple(companions) + folders, is_folder=is_folder)
        for target in out.targets():
            main = target == final
            self._check_target(label, target, main=main, is_folder=is_folder if main else target.name in folders)
            self._check_not_input(label, target)
            for other in self.outputs:
                for taken in other.targets():
                    if _same_place(target, taken):
                        raise OutputError(f"{label} {final}: the same file as {other.label} {other.final}; "
                                          "give each output its own path")
        self.outputs.append(out)
        if self._staging:   # declared after work began: stage it at once
            self._stage(out)
        return out

    def _stage(self, out: Output) -> None:
        out.staged = self._staging_folder(_folder_of(out.final)) / out.final.name
        if out.is_folder:
            out.staged.mkdir()

    def commit(self) -> list[Path]:
        """Renames every staged file into place (companions before the file that names them) and
        removes the staging folders. Inputs are checked once more: a model's external data files are
        only known once it is loaded."""
        for out in self.outputs:
            for target in out.targets():
                self._check_not_input(out.label, target)
        written = []
        with _stop_signals_held():   # all renamed or none; a signal held here finds the run complete
            for out in self.outputs:
                for target in reversed(out.targets()):   # the main file last: what it names is in place first
                    staged = out.staged.with_name(target.name)
                    if staged.exists():
                        _replace(staged, target)
                        written.append(target)
            _COMMITTED["done"] = True
        self.discard()
        return written

    def discard(self) -> None:
        """Removes the staging folders and everything in them; requested names were never touched."""
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()

    def __enter__(self) -> "RunOutputs":
        """Work begins: each output gets its staging place (nothing exists on disk before this)."""
        try:
            for out in self.outputs:
                self._stage(out)
        except BaseException:
            self.discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    # -- checks ---------------------------------------------------------------------------------

    def _check_target(self, label: str, target: Path, main: bool, is_folder: bool) -> None:
        name = f"{label} {target}" if main else f"{label}: {target} (written with it)"
        try:
            info = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):   # the folder is checked below
            info = None
        except OSError as exc:
            raise OutputError(f"{name}: cannot be used as an output ({exc.strerror})") from None
        if info is not None and is_folder and not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{name}: exists and is not a folder; refusing to replace it")
        if info is not None and not is_folder and stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{name}: is a directory; give a file name")
        if info is not None and not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{name}: exists and is not a regular file (device, FIFO or socket); "
                              "refusing to replace it")
        directory = _folder_of(target)
        if not directory.is_dir():
            what = "is not a directory" if directory.exists() else "does not exist"
            raise OutputError(f"{name}: output directory {directory} {what}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OutputError(f"{name}: output directory {directory} is not writable")

    def _check_new_folder(self, label: str, final: Path) -> None:
        for source in self.inputs:
            real, folder = Path(os.path.realpath(final)), Path(os.path.realpath(source))
            if source.is_dir() and real == folder:
                raise OutputError(f"{label} {final}: is the input folder; give a new folder")
            if source.is_dir() and folder in real.parents:
                raise OutputError(f"{label} {final}: is inside the input folder {source}; give a folder outside it")
        if final.exists() and not final.is_dir():
            raise OutputError(f"{label} {final}: exists and is not a folder; refusing to replace it")
        if final.is_dir() and any(final.iterdir()):
            raise OutputError(f"{label} {final}: the folder exists and is not empty; give a new folder "
                              "(nothing in an existing one is replaced)")

    def _check_not_input(self, label: str, target: Path) -> None:
        for source in self.inputs:
            if _same_place(target, source):
                raise OutputError(f"{label} {target}: is an input of this run ({source}); writing it would "
                                  "destroy the input. Choose another output path")

    def _staging_folder(self, folder: Path) -> Path:
        key = Path(os.path.realpath(folder))
        if key not in self._staging:
            remove_stale_staging(folder)
            staging = None
            try:
                staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
                (staging / OWNER_FILE).write_text(f"{os.getpid()}\n{socket.gethostname()}\n")
            except OSError as exc:
                if staging is not None:   # made, but its owner could not be written (a full disk): not left behind
                    shutil.rmtree(staging, ignore_errors=True)
                raise OutputError(f"output directory {folder}: cannot write there ({exc.strerror})") from None
            self._staging[key] = staging
        return self._staging[key]


STAGING_PREFIX = ".fptq-staging-"
# Inside each staging folder: the pid and host of the run that made it. A run killed with SIGKILL (or
# by the out-of-memory killer) cannot remove its staging folder; the next run into the same folder
# removes it once that pid is no longer running on this host, and says so. Folders of other hosts
# (a shared file system) and of runs still alive are left alone.
OWNER_FILE = ".owner"


def remove_stale_staging(folder: Path) -> list[Path]:
    """Removes the staging folders in `folder` whose run is no longer alive; warns for each (the CLI
    prints warnings as 'fptq-graph: warning: ...'). Returns what it removed."""
    removed = []
    try:
        entries = [p for p in Path(folder).iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for staging in entries:
        try:
            pid_text, host = (staging / OWNER_FILE).read_text().split("\n")[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            # No owner recorded: a run that could not write it (a full disk; an older version's), or one
            # being made this instant. Made before this run started, it is nobody's any more.
            if not _older_than_this_run(staging):
                continue
            pid = None
        else:
            if host != socket.gethostname() or pid == os.getpid() or _alive(pid):
                continue
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(staging, ignore_errors=True)
        if not staging.exists():
            removed.append(staging)
            who = f"a run (pid {pid}) that is no longer running" if pid is not None else "a run that recorded no owner"
            warnings.warn(f"removed {staging} ({size / 2**20:.1f} MiB): what {who} had staged there",
                          StaleStagingWarning, stacklevel=2)
    return removed


def _older_than_this_run(path: Path) -> bool:
    try:
        return path.stat().st_mtime < _PROCESS_STARTED
    except OSError:
        return False


def _process_start_time() -> float:
    """When this process started (from /proc: the kernel's clock ticks since boot), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


_PROCESS_STARTED = _process_start_time()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True   # someone else's process: alive
    return True


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _same_place(a: Path, b: Path) -> bool:
    """The same file: equal real paths (symlinks resolved) or, for files that exist, the same inode
    (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _replace(staged: Path, final: Path) -> None:
    """Renames `staged` onto `final`; a folder (an exported tokenizer) replaces an older folder whole."""
    if staged.is_dir() and final.is_dir() and not final.is_symlink():
        old = staged.with_name(staged.name + ".old")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files an ONNX model is made of: the file itself and the external data files its tensors
    name, so that no output of a run can replace one. A file that cannot be read lists itself only
    (loading it reports the problem)."""
    from fptq_graph.ir.split_model import open_split

    files = [Path(path)]
    try:
        split = open_split(path)
    except Exception:   # any reading problem is the loader's to report, with its own message
        return files
    seen = {os.path.realpath(path)}
    for array in split.arrays.values():
        name = getattr(array, "filename", None)
        if name and os.path.realpath(name) not in seen:
            seen.add(os.path.realpath(name))
            files.append(Path(name))
    return files


def outputs_reading(model: str | os.PathLike | None, *others: str | os.PathLike | None) -> RunOutputs:
    """A run's outputs, guarded against every file it reads: the model with its external data files,
    and the others (a text, a tokenizer) the caller gave."""
    outputs = RunOutputs()
    if model is not None:
        for path in model_files(model):
            outputs.add_input(path)
    for path in others:
        outputs.add_input(path)
    return outputs


def mib_on_disk(files: list[Path]) -> float:
    """Size of a model on disk (model_files: its external data included)."""
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20
