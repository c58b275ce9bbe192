"""Quantize each linear's [K, N] weight, tensor by tensor: group-wise INT4 by the recipe's weight
quantizer (the plan's WeightSpec): round-to-nearest, the clipping search (weight_clipping.py,
errors weighted by the recorded diag(X^T X)) or GPTQ (gptq.py, the recorded X^T X; "gptq-clip":
each group's scale by the clipping search); int8 per output channel for the
w8a8 recipe. The weight quantized is the one the linear now holds, i.e. after any equalization fold.
A quantized LM head (Config.lm_head) is int8 per output channel ("int8") or INT4 at Config.lm_head_group ("int4").
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from fptq_graph.errors import FptqError
from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.plan.statistics import equalized, hessian_diag
from fptq_graph.quant.clipping import clipped_groupwise
from fptq_graph.quant.finite import check_weights_finite
from fptq_graph.quant.gptq import HessianUnusable, gptq
from fptq_graph.quant.int4 import QuantizedWeight, keep_within, quantize_groupwise
from fptq_graph.quant.int8 import quantize_per_channel_int8


class QuantizeWeights(Pass):
    name = "quantize_weights"
    kind = "rewrite"
    requires = frozenset({"plan", "equalization_folded"})
    ensures = frozenset({"quantized_weights"})

    def run(self, state) -> PassResult:
        cfg, plan = state.config, state.plan
        worst = ("", np.inf)
        linears = list(state.linears.values())
        check_weights_finite(linears)
        # in this process: one linear's call at a time, lazily (the last reader of an X^T X works in it
        # and drops it before the next job is made); state.map_tasks: the block's calls side by side
        if state.map_tasks is None:
            results = (_quantize_job(*job) for job in _jobs(state, linears))
        else:
            results = state.map_tasks(_quantize_job, list(_jobs(state, linears, detached=True)))
        for linear, (qw, note) in zip(linears, results):
            weight = linear.node.inputs[1].values
            qw, moved = keep_within(qw, computed_range(linear, weight))
            if qw.bits == 4 and qw.group_size > linear.k:   # the report's group column alone would mislead
                note = "; ".join(filter(None, [f"group {qw.group_size} > K {linear.k}: one group spans K (per output "
                                               "channel)", note]))
            if moved:
                note = "; ".join(filter(None, [note, f"{moved} codes moved a step toward zero to keep the dequantized "
                                                     f"weight inside {np.dtype(computed_type(linear, weight)).name}'s range"]))
            state.quantized[linear.name] = qw
            if note:
                state.weight_notes[linear.name] = note
            sqnr = weight_sqnr(weight, qw)
            state.weight_sqnr[linear.name] = sqnr
            if sqnr < worst[1]:
                worst = (linear.name, sqnr)
        method = plan.recipe.weights
        clip_scales = method == "gptq-clip"
        if plan.recipe.weight_bits == 8:
            kind = "int8 per output channel"
        else:
            kind = ("symmetric int4" if cfg.symmetric else "asymmetric uint4") + f", group {cfg.group_size}"
            kind += {"gptq": " by GPTQ" + (" (clipped scales)" if clip_scales else "") + (" in act order" if cfg.act_order else ""),
                     "clip": " by clipped round-to-nearest", "rtn": " by round-to-nearest"}["gptq" if clip_scales else method]
        head = plan.head
        if head.linear is not None:
            kind += (f"; LM head '{head.linear}' " + ("int8 per output channel" if head.mode == "int8"
                                                      else f"INT4 group {head.group_size}")
                     + f" ({state.weight_sqnr[head.linear]:.1f} dB)")
        few = sum(FEW_TOKENS in note for note in state.weight_notes.values())
        warning = f"; WARNING: {few} linear(s) {FEW_TOKENS} (the report's weights column)" if few else ""
        return PassResult(f"{len(state.linears)} weights to {kind}; lowest SQNR {worst[1]:.1f} dB ({worst[0]}){warning}",
                          stats={"weights": len(state.linears), "lowest_sqnr_db": worst[1], "lowest": worst[0],
                                 "few_tokens": few})


def _jobs(state, linears, detached: bool = False):
    """(weight, plan, stats, gram, last_reader) of each linear in order, made as they are asked for; once
    the last reader of an X^T X has been handed out, the statistics let it go (7B down_proj: 0.9 GiB).
    detached: X^T X travels beside a copy of the statistics without it (all jobs are made before any
    runs, so letting it go must not reach the jobs; a task runner ships an array shared by several
    jobs once), and no job may work in it (another job of the same input may still read it)."""
    readers_left: dict[str, int] = {}
    for linear in linears:
        readers_left[linear.activation.name] = readers_left.get(linear.activation.name, 0) + 1
    for linear in linears:
        stats = state.stats[linear.activation.name]
        readers_left[linear.activation.name] -= 1
        last = readers_left[linear.activation.name] == 0
        if detached:
            yield linear.node.inputs[1].values, state.plan[linear.name], replace(stats, gram=None), stats.gram, False
        else:
            yield linear.node.inputs[1].values, state.plan[linear.name], stats, None, last
        if last:
            stats.gram = None


def _quantize_job(weight, plan, stats, gram, last) -> tuple[QuantizedWeight, str]:
    if gram is not None:
        stats = replace(stats, gram=gram)
    return quantize_weight(weight, plan, stats, last_reader=last)


def computed_type(linear, weight: np.ndarray) -> np.dtype:
    """The float type the linear's MatMul computes in: its activation's where the graph says, else the weight's."""
    dtype = linear.activation.dtype if linear.activation.dtype is not None else weight.dtype
    return np.dtype(dtype) if np.issubdtype(np.dtype(dtype), np.floating) else np.dtype(np.float32)


def computed_range(linear, weight: np.ndarray) -> float:
    """The largest finite value of computed_type: a dequantized weight past it is Inf in the model."""
    return float(np.finfo(computed_type(linear, weight)).max)


FEW_TOKENS = "calibrated on fewer tokens than K"


def quantize_weight(weight: np.ndarray, plan, stats, last_reader: bool = False) -> tuple[QuantizedWeight, str]:
    """One linear's weight quantized as its WeightSpec says, and a note on what the quantizer did.
    `stats` is its input's ActivationStats (X^T X or its diagonal for GPTQ and the clipping search);
    last_reader: no linear reads X^T X after this one, so GPTQ may work in it instead of a copy."""
    spec = plan.weight
    if spec.bits == 8:
        return quantize_per_channel_int8(weight), ""
    if spec.quantizer in ("gptq", "gptq-clip"):
        clip_scales = spec.quantizer == "gptq-clip"
        hessian = equalized_hessian(stats, plan, in_place=last_reader)
        if last_reader:   # nothing reads X^T X after this linear: drop it before GPTQ's own [K, K] arrays
            stats.gram = None
        diag = np.diag(hessian).copy()   # for the fallback: GPTQ may leave H half factored
        try:
            qw, detail = gptq(weight, hessian, spec.group_size, spec.symmetric, spec.damp, clip=clip_scales,
                              act_order=spec.act_order, overwrite_hessian=last_reader or hessian is not stats.gram)
        except HessianUnusable as why:
            del hessian
            return _fallback(weight, spec, diag, str(why))
        note = f"weights GPTQ{' with clipped scales' if clip_scales else ''}{', act order' if spec.act_order else ''}"
        note += f" ({detail})" if detail else ""
        tokens, k = stats.tokens, weight.shape[0]
        if tokens is not None and tokens < k:   # rank(X^T X) <= tokens: the damping decides the other directions
            note += (f"; {FEW_TOKENS} ({tokens:.0f} < K {k}): X^T X has rank at most {tokens:.0f}, so GPTQ "
                     "only knows that many directions (calibrate on more tokens)")
        return qw, note
    if spec.quantizer == "clip":
        # diag(H) weighting (recorded alone when nothing needs all of X^T X): 7 grid points cost
        # about twice round-to-nearest; H's full group blocks cost 3x more for SmolLM2 (tried)
        h = equalized(hessian_diag(stats), plan.eq_scale)
        qw, ratio = clipped_groupwise(weight, spec.group_size, spec.symmetric, h)
        return qw, (f"weights clipped ({'diag(X^T X)' if h is not None else 'unweighted'} search, "
                    f"{100 * float(np.mean(ratio < 1)):.0f}% of groups below max-abs)")
    return quantize_groupwise(weight, spec.group_size, spec.symmetric), ""


def _fallback(weight: np.ndarray, spec, diag: np.ndarray, why: str) -> tuple[QuantizedWeight, str]:
    """The clipping search weighted by diag(X^T X) where that is usable, else round to nearest, for a
    weight GPTQ could not take; the note says why (the report's weights column)."""
    usable = bool(np.all(np.isfinite(diag)) and np.any(diag > 0))
    if usable:
        qw, _ = clipped_groupwise(weight, spec.group_size, spec.symmetric, np.maximum(diag, 0.0))
        return qw, f"GPTQ not used ({why}): clipping search weighted by diag(X^T X) instead"
    return quantize_groupwise(weight, spec.group_size, spec.symmetric), f"GPTQ not used ({why}): rounded to nearest"


def equalized_hessian(stats, plan, in_place: bool = False) -> np.ndarray:
    """X^T X of what the linear reads now: an equalization fold divided X by s, so H becomes H / (s s^T).
    in_place: no other linear reads this X^T X, so it is divided where it lies."""
    gram = stats.gram
    if gram is None:
        raise FptqError(f"GPTQ needs X^T X for '{plan.name}', which calibration did not record")
    return equalized(gram, plan.eq_scale, in_place=in_place)


def weight_sqnr(reference: np.ndarray, approx: np.ndarray | QuantizedWeight) -> float:
    """SQNR of `approx` (an array, or a QuantizedWeight dequantized a block at a time) against
    `reference`, summed in float64 a block of columns at a time: whole-array float64 temporaries of a
    262k-vocabulary LM head took quantize's peak to 7x the weights, and its whole float32
    dequantization still added twice the head's float size."""
    if isinstance(approx, QuantizedWeight) and approx.bits != 8:
        approx = approx.dequantize()   # 4-bit codes unpack whole; such weights are no wider than the layers
    signal = noise = 0.0
    step = max(1, BLOCK_ELEMENTS // max(1, reference.shape[0]))
    for start in range(0, reference.shape[-1], step):
        cols = slice(start, start + step)
        power, error = signal_and_noise(
            reference[..., cols], approx.dequantize(cols) if isinstance(approx, QuantizedWeight) else approx[..., cols])
        signal += power
        noise += error
    return sqnr_db(signal, noise)


BLOCK_ELEMENTS = 1 << 22   # float64 temporaries of at most 32 MiB


def signal_and_noise(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """sum(ref^2) and sum((ref - out)^2) in float64, BLOCK_ELEMENTS at a time: an LM head's output
    ([tokens, 262144] for a Gemma-3-sized vocabulary, 268 MB a sample) made four float64 temporaries
    of twice its size at once when converted whole, more memory than the model's weights."""
    ref, out = ref.reshape(-1), out.reshape(-1)
    power = error = 0.0
    for start in range(0, ref.size, BLOCK_ELEMENTS):
        r = ref[start:start + BLOCK_ELEMENTS].astype(np.float64)
        d = r - out[start:start + BLOCK_ELEMENTS]
        power += float(r @ r)
        error += float(d @ d)
    return power, error


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): +inf without noise, -inf without signal."""
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
