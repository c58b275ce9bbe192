"""The per-layer report: what was decided for each linear and why, as JSON and as a text table."""
from __future__ import annotations

import json
import math

from fptq_graph.passes.state import State

REPORT_KEY = "fptq_graph.report"
COLUMNS = [("name", "layer", "<"), ("K", "K", ">"), ("N", "N", ">"), ("act_max_before", "act max", ">"),
           ("act_max_after", "after LAE", ">"), ("scheme", "scheme", "<"), ("group_size", "group", ">"),
           ("weight_sqnr_db", "W SQNR dB", ">"), ("output_sqnr_db", "out SQNR dB", ">"), ("reason", "reason", "<")]


def layer_rows(state: State) -> list[dict]:
    """One row per linear from the frozen plan and what the rewrites measured. `group_size` is the
    linear's own INT4 group (an int4 LM head's may differ from the others'), None for int8 weights
    (per output channel)."""
    rows = []
    for linear in state.linears.values():
        plan = state.plan[linear.name]
        note = state.weight_notes.get(linear.name)
        rows.append({
            "name": linear.name,
            "op": linear.node.op,
            "K": linear.k,
            "N": linear.n,
            "act_max_before": _num(plan.v),
            "act_max_after": _num(plan.v_after),
            "scheme": plan.scheme,
            "reason": plan.reason + (f"; {note}" if note else ""),
            "group_size": plan.weight.group_size,
            "weight_sqnr_db": _num(state.weight_sqnr.get(linear.name)),
            "output_sqnr_db": _num(state.output_sqnr.get(linear.name)),
            "act_scale": _num(plan.activation.scale),
            "producer": (f"{linear.producer.kind} '{linear.producer.node.name}'" if linear.producer else None),
            "weight_source": linear.weight_source or "initializer",
        })
    return rows


def json_numbers(stats) -> dict:
    """A pass's stats with floats made JSON-safe the way layer rows are (NaN -> None, inf -> 1e308)."""
    return {k: (_num(v) if isinstance(v, float) else v) for k, v in dict(stats).items()}


def format_table(rows: list[dict], max_reason: int = 60) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, _ in COLUMNS:
            value = row.get(key)
            if isinstance(value, float):
                value = f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
            text = "-" if value is None else str(value)
            line.append(text if key != "reason" or len(text) <= max_reason else text[: max_reason - 1] + "…")
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = []
    for r_index, r in enumerate(cells):
        out.append("  ".join(f"{c:{COLUMNS[i][2]}{widths[i]}}" for i, c in enumerate(r)).rstrip())
        if r_index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# What inspect's table, page and plot read from a stored report, checked before they read it.
_REQUIRED = {"config": dict, "calibration": str, "source": str, "passes": list, "layers": list}
_CONFIG_KEYS = ("recipe", "group_size", "static_bound", "dynamic_bound")
_PASS_KEYS = ("name", "summary")
_LAYER_KEYS = ("name", "scheme", "act_max_before", "act_max_after")
_KEPT_KEYS = ("name", "K", "N", "reason")


def parse_stored(text: str, model: str) -> dict:
    """The report stored in a model's metadata, or a one-line FptqError naming the model and what is
    wrong with it (a hand-edited or foreign model can carry anything under our key)."""
    from fptq_graph.errors import FptqError

    def bad(what: str) -> FptqError:
        return FptqError(f"{model}: the stored fptq-graph report ({REPORT_KEY}) {what}; re-quantize the model "
                         "to get a readable report")

    try:
        report = json.loads(text)
    except ValueError as exc:
        raise bad(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(report, dict):
        raise bad(f"is a JSON {type(report).__name__}, not an object")
    for key, kind in _REQUIRED.items():
        if not isinstance(report.get(key), kind):
            raise bad(f"lacks '{key}'" if key not in report else f"has a '{key}' that is not a {kind.__name__}")
    missing = [k for k in _CONFIG_KEYS if k not in report["config"]]
    if missing:
        raise bad(f"lacks config key(s) {', '.join(missing)}")
    kept = report.setdefault("kept_float", [])
    if not isinstance(kept, list):
        raise bad("has a 'kept_float' that is not a list")
    for kind, rows, keys in (("pass", report["passes"], _PASS_KEYS), ("layer", report["layers"], _LAYER_KEYS),
                             ("kept-float", kept, _KEPT_KEYS)):
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or any(k not in row for k in keys):
                raise bad(f"has a {kind} entry (#{i}) without {', '.join(keys)}")
    try:
        float(report["config"]["static_bound"]), float(report["config"]["dynamic_bound"])
    except (TypeError, ValueError):
        raise bad("has non-numeric bounds") from None
    return report


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False, default=str)


def _num(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else (1e308 if math.isinf(value) else round(value, 6))
