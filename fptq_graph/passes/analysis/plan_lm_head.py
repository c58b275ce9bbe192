"""Plan the LM head: which linear it is, how it is stored, and whether its weight is also an embedding
table (tied embeddings). Each form's emitter (passes/lower/) lowers what this plans.

Config.lm_head ("float", "int8" or "int4"; quantize_lm_head means "int4"): find_linears keeps a float
head out of the linears; this pass writes the HeadPlan (plan/plan.py) after classification, and
quantize_weights and the emitters follow it. An int8 head whose [K, N] weight is the transpose of an embedding Gather's [N, K]
table (SmolLM2, most small decoders) keeps that table once: the lookup reads the head's codes and
scales, so the embedding's values are exactly the head weight's dequantized values. An equalization
fold would scale the head's rows (diag(s) W) and part it from the table, so a tied head in the LAE
band falls back as a linear without a foldable producer does: per-token dynamic (static under
SmoothQuant).

How the forms write an int8 head (one quantization: q = round(w / s_n) in [-127, 127], s_n = max|w_:,n| / 127):
- qdq:  codes int8 [K, N] -> DequantizeLinear(axis=1, scale [N]) -> MatMul, activations QDQ by scheme.
- w4a8: the same codes through com.microsoft.MatMulIntegerToFloat: activations quantized to int8
        (their codes; the u8 x s8 path with zero point 128 saturates on CPUs without VNNI:
        emit_w4a8.integer_head), a_scale the static scale, or 1 with a per-token Mul after it; b_scale
        the per-channel scales. Integer sums, so it equals the qdq form to float rounding (the u8
        form measured 2.3 ms against 8 ms float for a 1 x 576 @ 576 x 49152 product on a VNNI CPU,
        docs/benchmarks.md; the s8 form is not re-measured there).
- ort:  com.microsoft.MatMulNBits(bits=8) over uint8 codes + 128 laid out [N, K/b, b] (b the largest
        of 256..16 dividing K, else 32 with the last block zero padded), each block repeating its
        channel's scale (per-channel int8 in MatMulNBits' blocked layout). accuracy_level 4 when the
        head's activations are int8 (ORT 1.31's 8-bit kernel at level 0 dequantizes the whole
        weight every run: 210 ms a token on this CPU; at 4 it re-quantizes the already-int8
        activations per block of b, within half a step of the per-token grid), 0 for float ones.

Tied lookups: qdq and w4a8 replace Gather(table, ids) by Gather(codes, ids, axis=1) -> Transpose ->
Cast -> Mul(Gather(scales, ids)) on the head's own [K, N] codes (ONNX Gather takes no int4/8-bit
blocked table, and DequantizeLinear -> Transpose -> MatMul would keep ORT from fusing the head);
ort uses com.microsoft.GatherBlockQuantized(bits=8, quantize_axis=2) on the very initializer the
MatMulNBits reads, its scales a Reshape of the same scales (ORT folds it at load: 1/64 of the codes).
"""
from __future__ import annotations

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.patterns.lm_head import LOGITS, find_lm_head, tied_gathers
from fptq_graph.plan.plan import EQUALIZED, HeadPlan


class PlanLMHead(Pass):
    name = "plan_lm_head"
    kind = "analysis"
    requires = frozenset({"activation_specs"})
    ensures = frozenset({"head_plan"})

    def run(self, state) -> PassResult:
        cfg, draft = state.config, state.draft
        mode = cfg.lm_head_mode
        if mode == "float":
            draft.head = HeadPlan(mode)
            kept = state.kept_float_head is not None
            return PassResult("LM head kept float" if kept else "no LM head", stats={"head": int(kept), "tied": 0})
        head = find_lm_head(state.graph, state.linears.values())
        if head is None:
            draft.head = HeadPlan(mode)
            return PassResult(f"lm_head={mode}: no linear produces '{LOGITS}'", stats={"head": 0, "tied": 0})
        if mode == "int4":
            draft.head = HeadPlan(mode, head.name, group_size=cfg.lm_head_group)
            draft.note(head.name, f"INT4 weights, group {cfg.lm_head_group} (lm_head='int4')")
            return PassResult(f"LM head '{head.name}': INT4 group {cfg.lm_head_group}", stats={"head": 1, "tied": 0})
        gathers = tied_gathers(state.graph, head.node.inputs[1])
        note = "int8 per-output-channel weights (lm_head='int8')"
        if gathers:
            names = ", ".join(g.name or g.op for g in gathers)
            note += f"; table shared with embedding {names}"
            if draft.scheme(head.name) in EQUALIZED:
                fallback = "static" if state.recipe.equalizer == "smoothquant" else "dynamic"
                v = float(state.act_max(head).max())
                draft.set_activation(head.name, fallback, f"v={v:.3g}: tied embedding table (an equalization fold "
                                                          f"would part the head from the table): {fallback}")
        draft.note(head.name, note)
        draft.head = HeadPlan(mode, head.name, group_size=None, tied=tuple(gathers))
        tied = f", tied to {len(gathers)} embedding Gather(s): table held once, quantized" if gathers else ""
        return PassResult(f"LM head '{head.name}': int8 per output channel, {draft.scheme(head.name)} activations{tied}",
                          stats={"head": 1, "tied": len(gathers)})
