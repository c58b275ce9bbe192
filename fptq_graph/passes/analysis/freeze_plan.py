"""Freeze the plan: the draft the analysis passes wrote becomes one read-only LinearPlan per linear
and the HeadPlan (plan/plan.py), with each linear's weight spec and static activation scale.

From here on the rewriting passes and the emitters read state.plan and never write a decision.
Resident: the plan (a few floats per linear, the equalization scales) and the calibration statistics.
"""
from __future__ import annotations

from fptq_graph.passes.base import Pass, PassResult
from fptq_graph.plan.plan import HeadPlan, Plan, PlanDraft, WeightSpec, linear_plan


class FreezePlan(Pass):
    name = "freeze_plan"
    kind = "analysis"
    requires = frozenset({"activation_specs", "head_plan", "equalization_specs"})
    ensures = frozenset({"plan"})

    def run(self, state) -> PassResult:
        cfg, draft = state.config, state.draft
        head = draft.head or HeadPlan(cfg.lm_head_mode)
        quantizer = state.recipe.weights
        linears = {}
        for linear in state.linears.values():
            if head.linear == linear.name:
                weight = (WeightSpec(8, None, True, "rtn") if head.mode == "int8"
                          else WeightSpec(4, head.group_size, cfg.symmetric, quantizer, cfg.act_order, cfg.gptq_damp))
            elif state.recipe.weight_bits == 8:
                weight = WeightSpec(8, None, True, "rtn")
            else:
                weight = WeightSpec(4, cfg.group_size, cfg.symmetric, quantizer, cfg.act_order, cfg.gptq_damp)
            linears[linear.name] = linear_plan(linear.name, draft, state.act_max(linear), weight)
        state.plan = Plan(linears, head, state.recipe, state.statistics_note, draft.product_folds)
        state.draft = PlanDraft()   # the draft is spent: nothing writes decisions after this
        equalized = sum(1 for p in linears.values() if p.eq_scale is not None)
        return PassResult(f"plan of {len(linears)} linears frozen ({equalized} equalized)",
                          stats={"linears": len(linears), "equalized": equalized})
