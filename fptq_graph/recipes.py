"""Recipes as data: one row per `--recipe` name. The passes read the row, never the name.

A recipe is an activation classifier x an equalizer x a weight quantizer:

classifier  which activation scheme each linear gets (passes/classify.py)
  bands       FPTQ's layer-wise bands on the calibrated max v: v <= static_bound static, LAE band
              equalized then static, v > dynamic_bound per-token dynamic (docs/FPTQ.md section 2)
  measured    each layer's scheme from its estimated output SQNR on the calibration data: per-tensor
              static where it is within Config.measured_tolerance_db of the best scheme's, else LAE where
              a producer takes it and it is within the tolerance, else per-token (passes/classify.py)
  static      every linear per-tensor static (naive W4A8)
  smooth      every linear whose producer can take a scale equalized, the others static (SmoothQuant)
  dynamic     every linear per-token dynamic
  float       activations stay float (weights only)
equalizer   the activation-side scale the equalized linears get (passes/fold_equalization.py)
  lae         FPTQ's s_j = m_j / log2(2 + m_j)
  smoothquant s_j = m_j^a / max|W_j|^(1-a), a = Config.smooth_alpha
  none        nothing to equalize
awq         weight-side activation-aware scales on top (awq.py): per sibling group, s = rms_j^alpha with
            alpha searched on AWQ_ALPHAS to minimise the group's W4A8 output error; folded like LAE (into
            norm gains, or into the columns of the linear producing a SwiGLU product's `up` factor)
weights     the weight quantizer: rtn (round to nearest, max-abs scales), clip (each group's clipping
            ratio searched against diag(H)-weighted error), gptq (GPTQ error feedback through X^T X),
            gptq-clip (GPTQ whose group scales come from the clipping search);
            Config.weight_quantizer (--weight-quantizer) overrides it, Config.gptq means "gptq"
weight_bits 4 (INT4 group-wise) or 8 (int8 per output channel)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

CLASSIFIERS = ("bands", "measured", "static", "smooth", "dynamic", "float")
EQUALIZERS = ("lae", "smoothquant", "none")
WEIGHT_QUANTIZERS = ("rtn", "clip", "gptq", "gptq-clip")


@dataclass(frozen=True)
class Recipe:
    name: str
    classifier: str
    equalizer: str
    awq: bool
    weights: str
    weight_bits: int
    summary: str


_ROWS = [
    # name                 classifier   equalizer      awq    weights  bits
    Recipe("fptq",             "bands",    "lae",         True,  "gptq-clip", 4, "FPTQ bands, AWQ scales on top of LAE, GPTQ on clipped INT4 scales (the most accurate measured; docs/accuracy.md)"),
    Recipe("fptq-paper",       "bands",    "lae",         False, "rtn",  4, "FPTQ as the paper states it: activations by range band, round-to-nearest INT4"),
    Recipe("fptq-awq",         "bands",    "lae",         True,  "clip", 4, "FPTQ bands, AWQ weight scales on top of LAE, clipped INT4 scales"),
    Recipe("fptq-measured",    "measured", "lae",         False, "clip", 4, "each layer's activation scheme from its measured output error, clipped INT4 scales"),
    Recipe("naive-w4a8",       "static",   "none",        False, "rtn",  4, "every linear per-tensor static, no equalization"),
    Recipe("smoothquant-w4a8", "smooth",   "smoothquant", False, "rtn",  4, "SmoothQuant scales where a producer takes them, then static"),
    Recipe("dynamic-w4a8",     "dynamic",  "none",        False, "rtn",  4, "every linear per-token dynamic"),
    Recipe("w8a8-smoothquant", "smooth",   "smoothquant", False, "rtn",  8, "SmoothQuant with int8 per-output-channel weights (the W8A8 reference)"),
    Recipe("rtn-w4a16",        "float",    "none",        False, "rtn",  4, "weights only, activations float: the bound W4A8 aims at"),
    Recipe("awq-w4a16",        "float",    "none",        True,  "clip", 4, "weights only with AWQ scales and clipped INT4 scales"),
]
RECIPE_TABLE: dict[str, Recipe] = {r.name: r for r in _ROWS}


def recipe_of(config) -> Recipe:
    return RECIPE_TABLE[config.recipe]


def resolved(config) -> Recipe:
    """The recipe's row with the user's weight quantizer (--weight-quantizer, --gptq) put in."""
    return replace(recipe_of(config), weights=weight_quantizer(config))


def effective(state) -> Recipe:
    """What this run does: the row passes/plan_statistics.py settled on (it may trade GPTQ and AWQ for
    the clipping search when their X^T X statistics would not fit), else the resolved row."""
    return state.recipe if getattr(state, "recipe", None) is not None else resolved(state.config)


def weight_quantizer(config) -> str:
    """rtn, clip, gptq or gptq-clip: --weight-quantizer, else --gptq, else the recipe's own."""
    if getattr(config, "weight_quantizer", None):
        return config.weight_quantizer
    if config.gptq:
        return "gptq"
    return recipe_of(config).weights


def observers_needed(row: Recipe) -> set[str]:
    """What calibration records beside max|X| for a (resolved or effective) row: "gram" (X^T X, for GPTQ
    and AWQ), "diag" (sum x_j^2 per channel, the diagonal of X^T X: the clipping search and the measured
    classifier), "rows" (the token count, to turn sums into means) and "token_max" (sum over tokens of
    max_j x_tj^2: per-token noise)."""
    needs = set()
    if row.weight_bits == 4 and row.weights.startswith("gptq") or row.awq:
        needs.add("gram")
    if row.weight_bits == 4 and row.weights == "clip" or row.classifier == "measured":
        needs.add("diag")
    if row.awq or row.classifier == "measured":
        needs.add("rows")
    if row.classifier == "measured":
        needs.add("token_max")
    if "gram" in needs:
        needs.discard("diag")   # the diagonal of the recorded X^T X
    return needs


def describe() -> str:
    """The table `fptq-graph quantize --recipe list` prints."""
    head = ("recipe", "activations", "equalizer", "awq", "weights", "bits", "")
    rows = [head] + [(r.name, r.classifier, r.equalizer, "yes" if r.awq else "no", r.weights, str(r.weight_bits),
                      r.summary) for r in _ROWS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows)


class RecipeAction(argparse.Action):
    """--recipe NAME, or --recipe list: print the table and exit (before the other arguments are checked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == "list":
            print(describe())
            parser.exit(0)
        setattr(namespace, self.dest, values)
