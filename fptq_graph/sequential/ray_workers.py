"""Calibration over a Ray cluster: each block's batches spread over worker processes.

`--workers N` starts a local Ray cluster of N workers for the run and stops it after; `--ray-address
ADDR` joins a running one (`ray start --head` on one machine, `ray start --address HEAD:6379` on the
others; every machine needs fptq-graph installed). Per block, the driver puts the block model (its
structure and weights) into Ray's object store once; each worker is an actor that builds the
block's ONNX Runtime session on first use and runs the batches given to it (batch i to worker
i mod N). The driver takes the outputs back in batch order and sums them itself: maxima and float64
X^T X sums are then formed in the same order as in one process, so the output is identical to one
process's, whichever worker ran a batch.

Then each linear's weight quantizer (GPTQ, the clipping search: quantize_weights' calls, map_tasks
below) runs as a Ray task, at most one per worker at a time, and the driver takes the results in the
linears' order. A task is the same pure function on the same arrays as in one process, so its codes
are too (tested). Each worker slot is half a CPU for its block actor and half for a task: the driver
runs the two phases one after the other, so they never compete, and neither waits for the other's CPU.

A worker that dies is restarted by Ray and its unfinished calls retried (max_restarts and
max_task_retries below); the restarted actor rebuilds its session from the object store. The calls
are pure (block model and feeds in, outputs out), so a retry gives the same outputs.

Resident in the driver: the block model (object store: shared memory on the head machine), each
batch's feeds until its worker has run it, and one batch's outputs at a time; while the block's
weights are quantized, its X^T X (held by the driver) a second time in the object store, and in
each worker running a task its own working copy (GPTQ works in a copy of H, never in the shared one).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fptq_graph.errors import FptqError
from fptq_graph.ir.split_model import SplitModel

RESTARTS = 3          # a worker process may die this many times per run
IN_FLIGHT = 2         # calls queued per worker ahead of the one the driver waits for
SLOT = 0.5            # CPUs a block actor takes, and a weight task: one worker slot holds one of each
SHARED_BYTES = 2**20  # arrays from this size on go to the object store once, however many tasks read them
# Fault injection for the tests: "BLOCK:BATCH" makes the worker that runs that call exit once (the
# marker file records that it did), as a killed or crashed worker would.
KILL_ENV, KILL_MARKER_ENV = "FPTQ_TEST_KILL_WORKER", "FPTQ_TEST_KILL_MARKER"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FptqError("--workers and --ray-address need Ray: pip install 'fptq-graph[distributed]' (or pip install "
                        "ray)") from None
    return ray


class RayRunner:
    def __init__(self, workers: int | None, address: str | None, log=None):
        ray = self.ray = _import_ray()
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
            try:
                ray.init(log_to_driver=False, configure_logging=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise FptqError(f"could not {'join the Ray cluster at ' + address if address else 'start a local Ray cluster'}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = max(1, (os.cpu_count() or 1) // count) if not address else None
        worker = ray.remote(num_cpus=SLOT, max_restarts=RESTARTS, max_task_retries=RESTARTS)(BlockWorker)
        self.actors = [worker.remote(threads) for _ in range(count)]
        self.task = ray.remote(num_cpus=SLOT, max_retries=RESTARTS)(_call)
        self.tasks = 0    # weight tasks run (the report's run section)
        self.workers = count
        if log:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            log(f"[ray] {count} workers on {where}; batches of each block spread over them")

    def run_block(self, key: str, model: SplitModel, fetch: list[str], batches: Iterable[tuple[int, dict]],
                  what: str, early_reductions: bool = False) -> Iterator[tuple[int, list[np.ndarray]]]:
        ray = self.ray
        model_ref = ray.put((model.proto.SerializeToString(), dict(model.arrays)))
        pending: list[tuple[int, object]] = []
        batches = iter(batches)
        queued = 0
        try:
            while True:
                while len(pending) < IN_FLIGHT * self.workers:
                    item = next(batches, None)
                    if item is None:
                        break
                    index, feeds = item
                    actor = self.actors[queued % self.workers]
                    queued += 1
                    pending.append((index, actor.run.remote(key, model_ref, fetch, feeds, index, early_reductions, what)))
                if not pending:
                    return
                index, ref = pending.pop(0)
                yield index, _get(ray, ref, f"calibration batch {index}, {what}: a Ray worker")
        finally:
            del model_ref

    def map_tasks(self, fn, jobs: list[tuple]) -> Iterator:
        """fn(*job) of every job as Ray tasks, at most one per worker at a time; yields the results in
        jobs' order. An array that several jobs share (one X^T X read by q, k and v) is put once."""
        ray = self.ray
        put: dict[int, object] = {}

        def arg(value):
            if isinstance(value, np.ndarray) and value.nbytes >= SHARED_BYTES:
                if id(value) not in put:
                    put[id(value)] = (ray.put(value), value)   # the value kept so its id is not reused
                return put[id(value)][0]
            return value

        pending: list[object] = []
        jobs = iter(jobs)
        try:
            while True:
                while len(pending) < self.workers:
                    job = next(jobs, None)
                    if job is None:
                        break
                    pending.append(self.task.remote(fn, *[arg(v) for v in job]))
                if not pending:
                    return
                result = _get(ray, pending.pop(0), "quantizing a block's weights: a Ray task")
                self.tasks += 1
                yield result
        finally:
            put.clear()

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class BlockWorker:
    """A Ray actor: the session of the block it last ran, rebuilt when a call names another block."""

    def __init__(self, threads: int | None):
        self.threads, self.key, self.sess = threads, None, None

    def run(self, key: str, model, fetch: list[str], feeds: dict, index: int, early_reductions: bool,
            what: str) -> list[np.ndarray]:
        from fptq_graph.runtime import ort_errors

        if key != self.key:
            import onnx

            from fptq_graph.runtime.sessions import session

            structure, arrays = model
            self.sess = None
            self.sess = session(SplitModel(onnx.ModelProto.FromString(structure), arrays), threads=self.threads,
                                early_reductions=early_reductions, arena=False)   # as runners.LocalRunner
            self.key = key
        _maybe_die(key, index)
        return ort_errors.run(self.sess, fetch, feeds, f"calibration batch {index}, {what}")


def _get(ray, ref, who: str):
    """ray.get of one call: our own error as it was raised (a bad feed, a non-finite weight), anything
    else as one line saying `who` failed."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, FptqError):
            raise cause from None
        raise FptqError(f"{who} failed ({str(exc).splitlines()[0]})") from None


def _call(fn, *args):
    """A weight task: the driver's function on its arguments (Ray resolves the object-store ones)."""
    return fn(*args)


def _maybe_die(key: str, index: int) -> None:
    target, marker = os.environ.get(KILL_ENV), os.environ.get(KILL_MARKER_ENV)
    if not target or not marker or Path(marker).exists():
        return
    block, batch = target.split(":")
    if key.endswith(f"/{block}") and index == int(batch):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
