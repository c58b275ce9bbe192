"""Compose passes over one State and record what each did (like a compiler's -print-after-all, in one line each)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .passes import (Calibrate, CanonicalizeWeights, ClassifyActivations, EmitORT, EmitQDQ, EmitW4A8, FindQuantizableLinears,
                     FoldEqualizationScales, InsertObservers, MeasureOutputSQNR, PlanLMHead, PlanStatistics,
                     QuantizeWeights)
from .state import State


@dataclass
class PassRecord:
    name: str
    summary: str
    seconds: float


EMITTERS = {"qdq": EmitQDQ, "w4a8": EmitW4A8, "ort": EmitORT}   # Config.format -> the pass that writes that form


# What a recipe does (activation classifier x equalizer x weight quantizer) is one row of the table in
# recipes.py; classify, fold_equalization, insert_observers and quantize_weights read the row.
def default_passes(form: str = "qdq") -> list:
    return [FindQuantizableLinears(), PlanStatistics(), CanonicalizeWeights(), InsertObservers(), Calibrate(),
            ClassifyActivations(), PlanLMHead(), FoldEqualizationScales(), QuantizeWeights(), EMITTERS[form](), MeasureOutputSQNR()]


def run_passes(state: State, passes: list, log=None) -> list[PassRecord]:
    records = []
    for p in passes:
        start = time.perf_counter()
        summary = p.run(state)
        records.append(PassRecord(p.name, summary, time.perf_counter() - start))
        if log:
            log(f"[{p.name}] {summary} ({records[-1].seconds:.2f} s)")
    return records
