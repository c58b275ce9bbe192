"""The `fptq-graph` command: export, quantize, eval, generate, inspect (commands.py).

SIGTERM and SIGHUP are answered from the command's first line: the handler below is installed before
the heavy imports (torch, onnx, ONNX Runtime: seconds on a loaded machine), so a signal at any time
gives the same exit code (128 + signal) and message; once a command runs, files/run_outputs.signals()
takes over and cleans up what the run staged. Run as the process's command (`command`, what the
console script and `python -m fptq_graph.cli` call), the handler stays after the command returns and
ignores the signal: the interpreter's exit (torch, ONNX Runtime, Ray tearing down: seconds on a loaded
machine) would otherwise meet a SIGTERM with the default action, a death by signal over outputs the run
had already committed.
"""
from __future__ import annotations

import signal
import sys

from fptq_graph.files.run_outputs import swap_stop_handlers


def main(argv: list[str] | None = None, *, keep_handlers: bool = False) -> int:
    """Runs one command; `keep_handlers` leaves the (now ignoring) stop handler in place for a process
    that exits right after, else the caller's handlers come back."""
    finished = {"done": False}

    def stopped_while_starting(signum, _frame):
        if finished["done"]:   # the command has returned: its outputs are what it left
            return
        print(f"fptq-graph: stopped by {signal.Signals(signum).name}; no output written", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = swap_stop_handlers(stopped_while_starting)
    try:
        from fptq_graph.cli.commands import main as run

        return run(argv)
    finally:
        finished["done"] = True
        if not keep_handlers:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def command() -> None:
    """The fptq-graph process: main, then exit with its code, a stop signal ignored from the command's end."""
    sys.exit(main(keep_handlers=True))


__all__ = ["command", "main"]
