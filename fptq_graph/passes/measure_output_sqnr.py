"""Measure each linear's output SQNR in the quantized model against the float model (a measurement).

Both models run on the first few calibration samples (Config.sqnr_samples), one sample at a time,
block after block of the run's scopes (sequential/block_chain.py; a run that does not go block by block
is one block, the whole graph), each chain fed its own hand-over. The error is end to end: a linear's
output in the quantized model carries the error of every layer before it, so the column shows where the
error grows. A block's linear outputs are fetched a chunk at a time, so memory stays bounded whatever
the model's size; the repeated forward passes are the price. A chunk is about an eighth of the float
weights, between 32 and 256 MiB. This pass sets a whole-graph quantize's peak memory (0.5B LLaMA, 2.05
GiB of float weights: 3.66 GiB with it, 2.40 without, benchmarks/scale.py); chunks of at most 128 MiB
lowered that by 3% and doubled the pass's time, so the cap stays at 256.
"""
from __future__ import annotations

import numpy as np

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.passes.rewrite.quantize_weights import signal_and_noise, sqnr_db
from fptq_graph.sequential.block_chain import BlockChain


class MeasureOutputSQNR(Pass):
    name = "measure_output_sqnr"
    kind = "measure"
    requires = frozenset({"lowered"})
    ensures = frozenset({"output_sqnr"})

    def run(self, state) -> PassResult:
        count = state.config.sqnr_samples
        if count == 0 or state.calibration is None or state.source_model is None:
            return PassResult("skipped (no samples)", stats={"samples": 0})
        chain = BlockChain(state, count)
        signal: dict[str, float] = {}
        noise: dict[str, float] = {}
        for pair in chain:
            for index in range(len(chain.samples)):
                chunks = chain.chunks(pair.linears, index) or [[]]
                chunks[-1] = chunks[-1] + [n for n in pair.block.hand_over if n not in chunks[-1]]   # the stream, with the last chunk
                for chunk in filter(None, chunks):
                    got = pair.run(index, chunk)
                    for name, ref, out in zip(chunk, got["float"], got["quantized"]):
                        power, error = signal_and_noise(ref, out)
                        signal[name] = signal.get(name, 0.0) + power
                        noise[name] = noise.get(name, 0.0) + error
                    del got
        worst = ("", np.inf)
        for linear in state.linears.values():
            db = state.output_sqnr[linear.name] = sqnr_db(signal.get(linear.output, 0.0), noise.get(linear.output, 0.0))
            if db < worst[1]:
                worst = (linear.name, db)
        blocks = f", block by block ({len(chain.blocks)} blocks)" if len(chain.blocks) > 1 else ""
        return PassResult(f"output SQNR of {len(state.linears)} linears on {len(chain.samples)} samples{blocks}; "
                          f"lowest {worst[1]:.1f} dB ({worst[0]})",
                          stats={"samples": len(chain.samples), "lowest_db": worst[1], "lowest": worst[0]})
