"""The plan: what the compiler decided for every linear and for the LM head, frozen before any rewrite.

Analysis passes (classify, plan_lm_head, plan_equalization) write into a PlanDraft, one field each;
freeze_plan turns the draft into a Plan of frozen LinearPlans and a HeadPlan, with the static
activation scale computed once from the calibrated maxima and the equalization scale. From there the
rewriting passes (fold_equalization, quantize_weights) and the emitters only read it: a Plan refuses
writes, and its scale arrays are read-only views.

Resident: per linear a few floats and, where equalized, one [K] float32 scale (and a [N] column scale
for the one linear of a SwiGLU product that carries AWQ's 1/s).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from fptq_graph.errors import FptqError

# A linear's input is decided along two axes: how it is quantized (int8 with one static scale per tensor,
# int8 with a scale per token computed at run time, or kept float: weights-only recipes) and what
# equalization scale s it is divided by first (none, FPTQ's LAE, SmoothQuant). Only a static input takes
# one: s flattens the outlier channels that would spoil one scale for the whole tensor, and a per-token or
# float input has no such scale to spoil. A scheme is the name of one allowed pair, the word the
# classifier, the recipes and the report use.
QUANTIZATIONS = ("static", "per_token", "float")
EQUALIZATIONS = ("none", "lae", "smooth")
SCHEMES = {"static": ("static", "none"), "lae": ("static", "lae"), "smooth": ("static", "smooth"),
           "dynamic": ("per_token", "none"), "float": ("float", "none")}
_SCHEME_OF = {axes: name for name, axes in SCHEMES.items()}


class PlanFrozenError(FptqError):
    """A pass tried to change a decision after freeze_plan (a programming error)."""


def _read_only(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class ActivationSpec:
    """How a linear's input is quantized (QUANTIZATIONS) and equalized first (EQUALIZATIONS), the static
    int8 scale (None unless static), and why. A pair no scheme names is refused."""

    quantization: str
    equalization: str
    scale: float | None
    reason: str

    def __post_init__(self):
        if (self.quantization, self.equalization) not in _SCHEME_OF:
            raise ValueError(f"no activation scheme quantizes {self.quantization} with {self.equalization} equalization "
                             f"(schemes: {', '.join(f'{n} = {q} + {e}' for n, (q, e) in SCHEMES.items())})")
        if (self.scale is None) == (self.quantization == "static"):
            raise ValueError(f"a {self.quantization} activation {'needs a' if self.scale is None else 'takes no'} static scale")

    @classmethod
    def of(cls, scheme: str, scale: float | None, reason: str) -> "ActivationSpec":
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        return cls(*SCHEMES[scheme], scale, reason)

    @property
    def scheme(self) -> str:
        return _SCHEME_OF[(self.quantization, self.equalization)]


@dataclass(frozen=True)
class EqualizationSpec:
    """The per-input-channel scale s [K] folded as X / s and diag(s) W: LAE's, SmoothQuant's or AWQ's
    (AWQ's includes the LAE/SmoothQuant scale it searched on top of). `column_scale` [N]: AWQ's 1/s
    that this linear's output columns carry for the linears reading a SwiGLU product of its output."""

    scale: np.ndarray | None
    column_scale: np.ndarray | None = None


@dataclass(frozen=True)
class WeightSpec:
    """How the weight is quantized: bits (4: INT4 group-wise, 8: int8 per output channel), its group
    along K (None: per output channel), symmetric or with zero points, and the quantizer (rtn, clip,
    gptq, gptq-clip; int8 weights round to nearest), with GPTQ's options."""

    bits: int
    group_size: int | None
    symmetric: bool
    quantizer: str
    act_order: bool = False
    damp: float = 0.01        # GPTQ: dampening added to diag(H), as a fraction of its mean


@dataclass(frozen=True)
class LinearPlan:
    name: str
    activation: ActivationSpec
    equalization: EqualizationSpec
    weight: WeightSpec
    reason: str            # every analysis's why, in the order they decided (the report's reason, less the weights' outcome)
    v: float               # calibrated max|X| of the input
    v_after: float         # max|X / s| (v when not equalized)

    @property
    def scheme(self) -> str:
        return self.activation.scheme

    @property
    def eq_scale(self) -> np.ndarray | None:
        return self.equalization.scale


@dataclass(frozen=True)
class HeadPlan:
    """The LM head (the linear producing `logits`): how it is stored and the embedding Gathers that
    read its table (tied embeddings, int8 heads only). `linear` is None when there is none to quantize."""

    mode: str                                  # "float", "int8" or "int4" (Config.lm_head_mode)
    linear: str | None = None
    group_size: int | None = None              # INT4 group of an int4 head; None for int8 (per channel)
    tied: tuple = ()                           # the tied embedding Gather nodes, in graph order


@dataclass
class PlanDraft:
    """What analysis passes have decided so far (mutable until freeze_plan)."""

    activation: dict[str, tuple[str, str]] = field(default_factory=dict)      # linear -> (scheme, reason)
    notes: dict[str, list[str]] = field(default_factory=dict)                 # linear -> "; "-parts after the reason
    head: HeadPlan | None = None
    row_scale: dict[str, np.ndarray] = field(default_factory=dict)            # linear -> s [K]
    column_scale: dict[str, np.ndarray] = field(default_factory=dict)         # linear -> 1/s for its output columns
    product_folds: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)   # (source, readers), fold order

    def set_activation(self, name: str, scheme: str, reason: str) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        self.activation[name] = (scheme, reason)

    def refine_activation(self, name: str, scheme: str, reason: str, by: str) -> None:
        """A later analysis changing classify's decision for one linear (plan_lm_head: a tied head cannot take
        an equalization fold): only a decision already made can be refined, and the plan records what it was
        and who changed it (the linear's reason, so the report shows both)."""
        if name not in self.activation:
            raise ValueError(f"{by}: cannot refine the activation scheme of '{name}': classify has not decided it")
        before = self.activation[name][0]
        self.set_activation(name, scheme, reason)
        if before != scheme:
            self.note(name, f"{by} refined classify's {before} to {scheme}")

    def scheme(self, name: str) -> str:
        return self.activation[name][0]

    def quantization(self, name: str) -> str:
        """The first axis of the scheme decided for `name` (QUANTIZATIONS)."""
        return SCHEMES[self.scheme(name)][0]

    def equalization(self, name: str) -> str:
        """The second axis of the scheme decided for `name` (EQUALIZATIONS)."""
        return SCHEMES[self.scheme(name)][1]

    def note(self, name: str, text: str) -> None:
        self.notes.setdefault(name, []).append(text)


class Plan(Mapping):
    """Read-only: linear name -> LinearPlan, plus the head's plan and the recipe row the run follows."""

    def __init__(self, linears: dict[str, LinearPlan], head: HeadPlan, recipe, statistics_note: str = "",
                 product_folds: tuple = ()):
        object.__setattr__(self, "_linears", MappingProxyType(dict(linears)))
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "product_folds", tuple(product_folds))   # (AWQ column source, its readers), in fold order
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "statistics_note", statistics_note)

    def __setattr__(self, name, value):
        raise PlanFrozenError(f"the plan is frozen: cannot set {name!r} after freeze_plan")

    def __getitem__(self, name: str) -> LinearPlan:
        return self._linears[name]

    def __iter__(self):
        return iter(self._linears)

    def __len__(self) -> int:
        return len(self._linears)


def linear_plan(name: str, draft: PlanDraft, act_max: np.ndarray, weight: WeightSpec) -> LinearPlan:
    """The frozen plan of one linear from the draft and its input's calibrated max."""
    scheme, reason = draft.activation[name]
    s = draft.row_scale.get(name)
    v = float(act_max.max())
    v_after = v if s is None else float((act_max / s).max())
    scale = static_scale(v_after) if draft.quantization(name) == "static" else None
    notes = draft.notes.get(name, [])
    return LinearPlan(name=name, activation=ActivationSpec.of(scheme, scale, reason),
                      equalization=EqualizationSpec(_read_only(s), _read_only(draft.column_scale.get(name))),
                      weight=weight, reason="".join([reason] + [f"; {n}" for n in notes]), v=v, v_after=v_after)


def static_scale(v: float) -> float:
    """Per-tensor int8 scale from a calibrated max (a zero max gets scale 1: all inputs are zero)."""
    return float(v) / 127.0 if v > 0 else 1.0
