"""Recipes as data: one row per `--recipe` name, or a user's row from a TOML file. The passes read the
row, never the name; `recipe_row` is the one lookup, `run_row` the row with the user's weight
quantizer put in (what plan_statistics starts from).

A recipe is an activation classifier x an equalizer x a weight quantizer:

classifier  which activation scheme each linear gets (passes/analysis/classify.py)
  bands       FPTQ's layer-wise bands on the calibrated max v: v <= static_bound static, LAE band
              equalized then static, v > dynamic_bound per-token dynamic (docs/FPTQ.md section 2)
  measured    each layer's scheme from its estimated output SQNR on the calibration data: per-tensor
              static where it is within Config.measured_tolerance_db of the best scheme's, else LAE where
              a producer takes it and it is within the tolerance, else per-token (passes/analysis/classify.py)
  static      every linear per-tensor static (naive W4A8)
  smooth      every linear whose producer can take a scale equalized, the others static (SmoothQuant)
  dynamic     every linear per-token dynamic
  float       activations stay float (weights only)
equalizer   the activation-side scale the equalized linears get (passes/analysis/plan_equalization.py)
  lae         FPTQ's s_j = m_j / log2(2 + m_j)
  smoothquant s_j = m_j^a / max|W_j|^(1-a), a = Config.smooth_alpha
  none        nothing to equalize
awq         weight-side activation-aware scales on top (awq.py): per sibling group, s = rms_j^alpha with
            alpha searched on AWQ_ALPHAS to minimise the group's W4A8 output error; folded like LAE (into
            norm gains, or into the columns of the linear producing a SwiGLU product's `up` factor)
            Not for a linear whose input the rotation reached (plan_equalization notes why: measured worse
            with GPTQ there); the others, and a model the rotation falls back on, keep it
weights     the weight quantizer: rtn (round to nearest, max-abs scales), clip (each group's clipping
            ratio searched against diag(H)-weighted error), gptq (GPTQ error feedback through X^T X),
            gptq-clip (GPTQ whose group scales come from the clipping search);
            Config.weight_quantizer (--weight-quantizer) overrides it, Config.gptq means "gptq"
weight_bits 4 (INT4 group-wise) or 8 (int8 per output channel)
rotate      "hadamard": rotate the residual stream first (passes/rewrite/rotate_residual.py: an orthogonal Q
            folded into the weights, the same function in float, outlier channels spread over all);
            "none". Config.rotate (--rotate) overrides it
unrotated_classifier
            the classifier where the stream ends up not rotated (the rotation fell back on the model, or
            --rotate none); empty: `classifier` everywhere. fptq-rot-measured's measured classifier beat the
            bands on the rotated SmolLM2 and lost to them unrotated (docs/accuracy.md), so where its rotation
            falls back it is fptq
options     Config defaults the recipe changes (RECIPE_OPTIONS: bounds, alphas, damping): applied where the
            user's Config still holds the default (Config.with_recipe_options)

A TOML recipe (`--recipe my.toml`; `fptq-graph quantize --recipe show fptq` prints one to start from):
    name = "my-recipe"
    classifier = "bands"        # CLASSIFIERS
    equalizer = "lae"           # EQUALIZERS
    awq = true
    weights = "gptq-clip"       # WEIGHT_QUANTIZERS
    weight_bits = 4
    rotate = "none"             # ROTATIONS (optional)
    unrotated_classifier = ""   # CLASSIFIERS or "" (optional)
    summary = "..."
    [options]
    static_bound = 10.0
Unknown keys, types and values are refused with one line naming the key and the file.
"""
from __future__ import annotations

import argparse
import functools
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

CLASSIFIERS = ("bands", "measured", "static", "smooth", "dynamic", "float")
EQUALIZERS = ("lae", "smoothquant", "none")
WEIGHT_QUANTIZERS = ("rtn", "clip", "gptq", "gptq-clip")
ROTATIONS = ("none", "hadamard")
# Config fields a recipe's [options] may set, with their types.
RECIPE_OPTIONS = {"static_bound": float, "dynamic_bound": float, "smooth_alpha": float, "measured_tolerance_db": float,
                  "gptq_damp": float, "act_order": bool, "compensate_residual": bool}


@dataclass(frozen=True)
class Recipe:
    name: str
    classifier: str
    equalizer: str
    awq: bool
    weights: str
    weight_bits: int
    summary: str
    options: tuple[tuple[str, Any], ...] = ()   # (Config field, value) pairs, RECIPE_OPTIONS
    rotate: str = "none"                        # ROTATIONS: the residual stream's rotation, before observing
    unrotated_classifier: str = ""              # CLASSIFIERS or "": the classifier where the stream is not rotated

    def classifier_for(self, rotated: bool) -> str:
        """The classifier of a run whose residual stream is (not) rotated."""
        return self.classifier if rotated or not self.unrotated_classifier else self.unrotated_classifier


_ROWS = [
    # name                 classifier   equalizer      awq    weights  bits
    Recipe("fptq",             "bands",    "lae",         True,  "gptq-clip", 4, "FPTQ bands, AWQ scales on top of LAE, GPTQ on clipped INT4 scales (the most accurate measured; docs/accuracy.md)"),
    Recipe("fptq-rot",         "bands",    "lae",         True,  "gptq-clip", 4, "fptq on a rotated residual stream (randomized Hadamard folded into the weights; pre-norm decoders); no AWQ on rotated inputs", rotate="hadamard"),
    Recipe("fptq-rot-measured", "measured", "lae",        True,  "gptq-clip", 4, "fptq-rot whose activation schemes come from their estimated output error (per token where static costs more than the tolerance); fptq where the rotation falls back", rotate="hadamard", unrotated_classifier="bands"),
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
RECIPES = tuple(RECIPE_TABLE)


class RecipeError(ValueError):
    """A recipe that is not a known name or a valid TOML row (cli and Config turn it into FptqError)."""


def recipe_row(spec: "str | os.PathLike | Recipe") -> Recipe:
    """The one lookup: a built-in name, the path of a TOML recipe, or a Recipe itself."""
    if isinstance(spec, Recipe):
        return check_row(spec, "<Recipe>")
    if str(spec).endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        return _load_toml(str(path.resolve()), path.stat().st_mtime_ns)
    if spec in RECIPE_TABLE:
        return RECIPE_TABLE[spec]
    raise RecipeError(f"unknown recipe {spec!r}; choose one of {', '.join(RECIPES)} or give a recipe .toml "
                      "(fptq-graph quantize --recipe list)")


def run_row(config) -> Recipe:
    """The recipe's row with the user's weight quantizer (--weight-quantizer, else --gptq) and rotation
    (--rotate) put in."""
    row = recipe_row(config.recipe)
    if getattr(config, "rotate", None) is not None:
        row = replace(row, rotate=config.rotate)
    if getattr(config, "weight_quantizer", None):
        return replace(row, weights=config.weight_quantizer)
    return replace(row, weights="gptq") if config.gptq else row


def observers_needed(row: Recipe) -> set[str]:
    """What calibration records beside max|X| for a run's row: "gram" (X^T X, for GPTQ and AWQ), "diag"
    (sum x_j^2 per channel, the diagonal of X^T X: the clipping search and the measured classifier),
    "rows" (the token count, to turn sums into means) and "token_max" (the per-token sums of the
    measured classifier: plan/statistics.py)."""
    needs = set()
    if row.weight_bits == 4 and row.weights.startswith("gptq") or row.awq:
        needs.add("gram")
    if row.weight_bits == 4 and row.weights == "clip" or row.classifier == "measured":
        needs.add("diag")
    if row.awq or row.classifier == "measured" or "gram" in needs:   # GPTQ: X^T X from fewer tokens than K is singular
        needs.add("rows")
    if row.classifier == "measured":
        needs.add("token_max")
    if "gram" in needs:
        needs.discard("diag")   # the diagonal of the recorded X^T X
    return needs


_TYPES = {"name": str, "classifier": str, "equalizer": str, "awq": bool, "weights": str, "weight_bits": int,
          "rotate": str, "unrotated_classifier": str, "summary": str, "options": dict}
_CHOICES = {"classifier": CLASSIFIERS, "equalizer": EQUALIZERS, "weights": WEIGHT_QUANTIZERS, "weight_bits": (4, 8),
            "rotate": ROTATIONS, "unrotated_classifier": ("",) + CLASSIFIERS}


def check_row(row: Recipe, where: str) -> Recipe:
    for key, choices in _CHOICES.items():
        if getattr(row, key) not in choices:
            shown = ", ".join(str(c) if c != "" else '""' for c in choices)   # the empty choice, as TOML writes it
            raise RecipeError(f"{where}: {key} = {getattr(row, key)!r} is not one of {shown}")
    for key, value in row.options:
        if key not in RECIPE_OPTIONS:
            raise RecipeError(f"{where}: unknown option {key!r} in [options]; options are {', '.join(RECIPE_OPTIONS)}")
        kind = RECIPE_OPTIONS[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, bool) if kind is bool else numeric):
            raise RecipeError(f"{where}: option {key} must be a {kind.__name__}, got {value!r}")
    return row


@functools.lru_cache(maxsize=32)
def _load_toml(path: str, mtime_ns: int) -> Recipe:
    """A TOML recipe (cached per file version)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r}; a recipe has {', '.join(_TYPES)}")
    missing = [k for k in ("classifier", "equalizer", "awq", "weights", "weight_bits") if k not in data]
    if missing:
        raise RecipeError(f"{path}: missing key {missing[0]!r}")
    for key, value in data.items():
        kind = _TYPES[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RecipeError(f"{path}: {key} must be a {'table' if kind is dict else kind.__name__}, got {value!r}")
    options = data.pop("options", {})
    data.setdefault("name", Path(path).stem)
    data.setdefault("summary", f"user recipe {Path(path).name}")
    row = check_row(Recipe(**data, options=tuple(sorted(options.items()))), path)
    # TOML writes 10 for 10.0: float options are floats from here on
    return replace(row, options=tuple((k, float(v) if RECIPE_OPTIONS[k] is float else v) for k, v in row.options))


def to_toml(row: Recipe) -> str:
    """The row as a TOML recipe file (what `--recipe show NAME` prints)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = [f"# fptq-graph recipe; keys: {', '.join(_TYPES)}"]
    lines += [f"{f.name} = {value(getattr(row, f.name))}" for f in fields(row) if f.name != "options"]
    lines.append("[options]   # Config defaults this recipe changes: " + ", ".join(RECIPE_OPTIONS))
    lines += [f"{k} = {value(v)}" for k, v in row.options]
    return "\n".join(lines) + "\n"


def describe() -> str:
    """The table `fptq-graph quantize --recipe list` prints."""
    head = ("recipe", "activations", "equalizer", "awq", "weights", "bits", "rotate", "")
    rows = [head] + [(r.name, r.classifier, r.equalizer, "yes" if r.awq else "no", r.weights, str(r.weight_bits),
                      r.rotate, r.summary) for r in _ROWS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows)


class RecipeAction(argparse.Action):
    """--recipe NAME | FILE.toml (checked by Config.validate: one line naming the problem); --recipe list
    prints the table and exits before the other arguments are checked. (--recipe show NAME is the CLI's.)"""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == "list":
            print(describe())
            parser.exit(0)
        setattr(namespace, self.dest, values)
