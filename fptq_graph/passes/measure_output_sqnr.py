"""Measure each linear's output SQNR in the quantized model against the float model (a measurement).

Both models run on the first few calibration samples (Config.sqnr_samples), one sample at a time,
with every linear's output made a model output. The error is end to end: a linear's output in the
quantized model carries the error of every layer before it, so the column shows where the error
grows. Outputs are fetched a chunk at a time, so memory stays bounded whatever the model's size;
the repeated forward passes are the price. A chunk is about an eighth of the float weights, between
32 and 256 MiB. This pass sets quantize's peak memory (0.5B LLaMA, 2.05 GiB of float weights: 3.66
GiB with it, 2.40 without, benchmarks/scale.py); chunks of at most 128 MiB lowered that by 3% and
doubled the pass's time, so the cap stays at 256.
"""
from __future__ import annotations

import numpy as np
import onnx

from fptq_graph.runtime import ort_errors
from fptq_graph.ir.save import finish_split
from fptq_graph.runtime.sessions import session
from fptq_graph.ir.bodies import needed_nodes
from fptq_graph.ir.split_model import SplitModel
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.rewrite.quantize_weights import signal_and_noise, sqnr_db

MIN_CHUNK, MAX_CHUNK = 32 * 2**20, 256 * 2**20   # bytes of outputs fetched per run


class MeasureOutputSQNR(Pass):
    name = "measure_output_sqnr"
    kind = "measure"
    requires = frozenset({"lowered"})
    ensures = frozenset({"output_sqnr"})

    def run(self, state) -> PassResult:
        count = state.config.sqnr_samples
        if count == 0 or state.calibration is None or state.source_model is None:
            return PassResult("skipped (no samples)", stats={"samples": 0})
        linears = list(state.linears.values())
        names = [linear.output for linear in linears]
        # Both sessions use the arrays in place: the float weights (mapped from the input) and the
        # quantized graph's weights; neither model is copied (split_model, runtime.session).
        quantized = finish_split(state.graph, state.source_model.proto)
        # The two sessions take turns: without arenas neither keeps its peak reserved while the other
        # runs (262144 x 640 tied LLaMA, SQNR on: peak 5.3 GiB with arenas; see benchmarks/scale.py).
        runs = [session(with_outputs(model, names), arena=False) for model in (state.source_model, quantized)]
        budget = min(MAX_CHUNK, max(MIN_CHUNK, state.source_model.payload_bytes // 8))
        signal = dict.fromkeys(names, 0.0)
        noise = dict.fromkeys(names, 0.0)
        samples = 0
        for feeds in state.calibration.sample_feeds(state.source_model.proto.graph.input, count):
            tokens = int(np.prod(next(iter(feeds.values())).shape))
            for chunk in output_chunks(linears, 4 * tokens, budget):
                reference, candidate = (ort_errors.run(sess, chunk, feeds, f"the {kind} model for output SQNR")
                                        for sess, kind in zip(runs, ("float", "quantized")))
                for name, ref, out in zip(chunk, reference, candidate):
                    power, error = signal_and_noise(ref, out)
                    signal[name] += power
                    noise[name] += error
            samples += 1
        worst = ("", np.inf)
        for linear in linears:
            db = state.output_sqnr[linear.name] = sqnr_db(signal[linear.output], noise[linear.output])
            if db < worst[1]:
                worst = (linear.name, db)
        return PassResult(f"output SQNR of {len(linears)} linears on {samples} samples; lowest {worst[1]:.1f} dB ({worst[0]})",
                          stats={"samples": samples, "lowest_db": worst[1], "lowest": worst[0]})


def output_chunks(linears: list, bytes_per_channel: int, budget: int) -> list[list[str]]:
    """Outputs fetched together, packed by their own sizes up to `budget` bytes (at least one each): a
    wide LM head ([tokens, vocab]) gets a run to itself instead of shrinking every run to its size,
    which made one run per few linears, dozens of forward passes a sample."""
    chunks, current, used = [], [], 0
    for linear in linears:
        size = bytes_per_channel * linear.n
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(linear.output)
        used += size
    return chunks + ([current] if current else [])


def with_outputs(model: SplitModel, names: list[str]) -> SplitModel:
    """`model` with `names` as its outputs (types left to the runtime; the model's own outputs that those
    nodes compute stay too) and only the nodes they need: a copy of the structure, the same arrays. The pruning matters: these sessions run with graph
    optimizations off, so a kept-float LM head would still compute its logits ([tokens, vocab]: with
    a 262k vocabulary, more than the model's weights) for nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(model.proto)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    kept = [out.graph.node[i] for i in needed_nodes(out.graph.node, names)]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    # The model's own outputs that the kept nodes compute anyway stay outputs: a GenAI builder's CUDA graph
    # (GroupQueryAttention over a past/present buffer) whose present KV is no longer a graph output has ORT
    # plan present into the past input's buffer (the op may work in place), which fails at run time with
    # a past of another length ("Shape mismatch attempting to re-use buffer {1,2,0,64} != {1,2,32,64}").
    produced = {name for node in kept for name in node.output}
    out.graph.output.extend(v for v in model.proto.graph.output if v.name not in names and v.name in produced)
    return SplitModel(out, model.arrays)
