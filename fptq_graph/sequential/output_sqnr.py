"""Each linear's output SQNR in the quantized model against the float model, block by block: the
numbers measure_output_sqnr gives on whole models, without either whole model in a session.

The float model's block (the input model's nodes between the block's input tensors and its outputs) and the same block of the
lowered graph (the nodes between the block's input tensors and its outputs) run side by side on the
first Config.sqnr_samples calibration samples, one sample at a time. Each chain is fed its own
hand-over: the float blocks the float stream, the quantized blocks the quantized stream, so a linear's
error is end to end, as in the whole-model measurement (it carries the error of every block before).
It is also check_outputs_finite's block-wise form: a linear whose quantized output holds NaN or Inf
where the float one is finite fails the run, naming it (with --sqnr-samples 0 one sample runs for
that check alone).

Resident: two block sessions (the float block's weights mapped from the input, the quantized block's
codes mapped from the work folder) and, per sample, both streams' cut tensors.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from fptq_graph.ir.residency import release_pages
from fptq_graph.ir.save import finish_split
from fptq_graph.passes.base import PassRecord, PassResult
from fptq_graph.passes.check_outputs_finite import NonFiniteOutputError, newly_non_finite
from fptq_graph.passes.rewrite.quantize_weights import signal_and_noise, sqnr_db
from fptq_graph.runtime import ort_errors
from fptq_graph.runtime.sessions import session
from fptq_graph.sequential.block_model import block_model
from fptq_graph.ir.bodies import needed_nodes
from fptq_graph.sequential.blocks import Block


def measure_output_sqnr_by_block(state, blocks: list[Block], log=None) -> PassRecord:
    """Fills state.output_sqnr for every linear; the record has measure_output_sqnr's name and stats."""
    start = time.perf_counter()
    check_only = state.config.sqnr_samples == 0
    count = max(1, state.config.sqnr_samples)
    if state.calibration is None or state.source_model is None:
        return PassRecord("measure_output_sqnr", "measure", PassResult("skipped (no samples)", stats={"samples": 0}), 0.0)
    source = state.source_model      # not the observed model: that one ends at the last observer
    lowered = finish_split(state.graph, source.proto)
    samples = list(state.calibration.sample_feeds(source.proto.graph.input, count))
    streams = {"float": [{} for _ in samples], "quantized": [{} for _ in samples]}
    last_reader = {name: block.index for block in blocks for name in block.inputs}
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for block in blocks:
        outputs = [state.linears[name].output for name in block.linears]
        wanted = outputs + [name for name in block.hand_over if name not in outputs]
        if not wanted:
            continue
        models = {"float": block_model(source, replace(block, outputs=wanted, nodes=nodes_for(source.proto, block, wanted)),
                                       _dtypes(streams["float"][0])),
                  "quantized": block_model(lowered, replace(block, outputs=wanted, nodes=nodes_for(lowered.proto, block, wanted)),
                                           _dtypes(streams["quantized"][0]))}
        runs = {kind: session(model, arena=False) for kind, model in models.items()}
        for index, feeds in enumerate(samples):
            got = {}
            for kind, sess in runs.items():
                cut = streams[kind][index]
                feed = {n: feeds[n] for n in block.inputs if n in feeds} | {n: cut[n] for n in block.inputs if n in cut}
                got[kind] = ort_errors.run(sess, wanted, feed, f"output SQNR sample {index}, the {kind} "
                                                               f"block {block.index} ({block.label})")
                handed = set(block.hand_over)   # a linear's output may be handed over too (a builder's skip norm reads o_proj's)
                for name, value in zip(wanted, got[kind]):
                    if name in handed:
                        cut[name] = np.array(value)
            for name, ref, out in zip(wanted, got["float"], got["quantized"]):
                if newly_non_finite(ref, out):
                    linear = next((l.name for l in state.linears.values() if l.output == name), None)
                    raise NonFiniteOutputError(
                        f"the quantized model computes NaN or Inf in block {block.index} ({block.label}) on calibration "
                        f"sample {index}, where the float model does not: first in "
                        + (f"the output of linear '{linear}'" if linear else f"'{name}'") + "; nothing written")
            if check_only:
                continue
            for name, ref, out in zip(outputs, got["float"], got["quantized"]):
                power, error = signal_and_noise(ref, out)
                signal[name] = signal.get(name, 0.0) + power
                noise[name] = noise.get(name, 0.0) + error
            del got
        del runs
        for model in models.values():
            release_pages(model.arrays.values())
        for cuts in streams.values():
            for cut in cuts:
                for name in [n for n in cut if last_reader.get(n, -1) <= block.index]:
                    del cut[name]
    if check_only:
        result = PassResult(f"no NaN/Inf on one calibration sample, block by block (output SQNR off)", stats={"checked": 1})
        return PassRecord("check_outputs_finite", "measure", result, time.perf_counter() - start)
    worst = ("", np.inf)
    for linear in state.linears.values():
        db = state.output_sqnr[linear.name] = sqnr_db(signal.get(linear.output, 0.0), noise.get(linear.output, 0.0))
        if db < worst[1]:
            worst = (linear.name, db)
    result = PassResult(f"output SQNR of {len(state.linears)} linears on {len(samples)} samples, block by block; "
                        f"lowest {worst[1]:.1f} dB ({worst[0]})",
                        stats={"samples": len(samples), "lowest_db": worst[1], "lowest": worst[0]})
    return PassRecord("measure_output_sqnr", "measure", result, time.perf_counter() - start)


def nodes_for(model, block: Block, outputs: list[str]) -> list[int]:
    """Indices of the nodes `outputs` depend on back to the block's input tensors (which end the walk):
    in the float model the block's own nodes, in the lowered graph the same with the nodes lowering
    added (quantize/dequantize, the W4A8 op)."""
    return needed_nodes(model.graph.node, outputs, stop=block.inputs)


def _dtypes(cut: dict[str, np.ndarray]) -> dict[str, np.dtype]:
    return {name: value.dtype for name, value in cut.items()}
