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

How the forms write an int8 head (one quantization: q = round(w / s_n) in [-127, 127], s_n = max|w_:,n| / 127),
each exact on every x86 CPU and faster than the float head at batch 1 (issue 30; the kernel audit,
runtime/kernel_audit.py, holds every form to it):
- qdq:  standard ONNX integers (emit_qdq.integer_head): activations to uint8 codes + 128 by the head's
        scheme, MatMulInteger with the codes + 128 [K, N] (zero points 128: MLAS's exact u8 x u8
        kernel), Cast, Mul by the scales. A weights-only head (float activations) is codes int8 [K, N]
        -> DequantizeLinear(axis=1) -> MatMul.
- w4a8: fptq::W8A8MatMul over int8 rows [N, K] (emit_w4a8): the bundled op's integer kernels, the
        activation scheme inside the op.
- ort:  com.microsoft.MatMulNBits(bits=8) over uint8 codes + 128 laid out [N, K/b, b] (b the largest
        of 256..16 dividing K, else 32 with the last block zero padded), each block repeating its
        channel's scale (per-channel int8 in MatMulNBits' blocked layout). accuracy_level 4 when the
        head's activations are int8 (ORT 1.31's 8-bit kernel at level 0 dequantizes the whole
        weight every run: 210 ms a token on this CPU; at 4 it re-quantizes the already-int8
        activations per block of b, within half a step of the per-token grid), 0 for float ones.

Tied lookups read the head's own codes: w4a8 Gathers rows of its [N, K] int8 initializer -> Cast ->
Mul(the rows' scales); qdq Gathers columns of its [K, N] codes (axis 1) -> Transpose -> Cast ->
Sub(128) -> Mul (tie_to_kn_codes; ONNX Gather takes no blocked table); ort uses
com.microsoft.GatherBlockQuantized(bits=8, quantize_axis=2) on the very initializer the MatMulNBits
reads, its scales a Reshape of the same scales (ORT folds it at load: 1/64 of the codes).
"""
from __future__ import annotations

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.patterns.lm_head import LOGITS, find_lm_head, tied_gathers
from fptq_graph.plan.plan import HeadPlan


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
            if draft.equalization(head.name) != "none":
                fallback = "static" if state.recipe.equalizer == "smoothquant" else "dynamic"
                v = float(state.act_max(head).max())
                draft.refine_activation(head.name, fallback, f"v={v:.3g}: tied embedding table (an equalization fold "
                                                             f"would part the head from the table): {fallback}",
                                        by=self.name)
        draft.note(head.name, note)
        draft.head = HeadPlan(mode, head.name, group_size=None, tied=tuple(gathers))
        tied = f", tied to {len(gathers)} embedding Gather(s): table held once, quantized" if gathers else ""
        return PassResult(f"LM head '{head.name}': int8 per output channel, {draft.scheme(head.name)} activations{tied}",
                          stats={"head": 1, "tied": len(gathers)})
