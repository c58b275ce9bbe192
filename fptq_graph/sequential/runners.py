"""Who runs a block over the calibration batches: this process, or Ray workers (ray_workers.py).

A runner takes a block model and the batches' feeds and yields each batch's outputs in batch order,
so the driver sums the statistics in the same order whoever computed them: the result is the same
as one process's, to the bit, as long as each batch's outputs are (the same ONNX Runtime kernels).

Resident (local): the block's session and one batch's outputs.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from fptq_graph.ir.split_model import SplitModel
from fptq_graph.runtime import ort_errors
from fptq_graph.runtime.sessions import session


class LocalRunner:
    """Runs blocks in this process, one ONNX Runtime session at a time."""

    workers = 1
    tasks = 0       # weight quantizer calls run as tasks elsewhere (none: quantize_weights runs them here)

    def run_block(self, key: str, model: SplitModel, fetch: list[str], batches: Iterable[tuple[int, dict]],
                  what: str, early_reductions: bool = False) -> Iterator[tuple[int, list[np.ndarray]]]:
        # no arena: a block's session lives for its batches only, and an arena would keep its peak (the
        # float32 casts of a float16 block's weights, the per-batch X^T X outputs) reserved while the
        # driver sums the statistics and plans the block (7B-width layer block: see docs/benchmarks.md)
        sess = session(model, early_reductions=early_reductions, arena=False)
        try:
            for index, feeds in batches:
                yield index, ort_errors.run(sess, fetch, feeds, f"calibration batch {index}, {what}")
        finally:
            del sess

    def close(self) -> None:
        pass


def make_runner(workers: int | None, ray_address: str | None, log=None):
    """The local runner, or Ray workers when `workers` or `ray_address` is given."""
    if not workers and not ray_address:
        return LocalRunner()
    from fptq_graph.sequential.ray_workers import RayRunner

    return RayRunner(workers, ray_address, log=log)
