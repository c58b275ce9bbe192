"""The per-layer report: what was decided for each linear and why, as JSON and as a text table."""
from __future__ import annotations

import json
import math

from .state import State

REPORT_KEY = "fptq_graph.report"
COLUMNS = [("name", "layer", "<"), ("K", "K", ">"), ("N", "N", ">"), ("act_max_before", "act max", ">"),
           ("act_max_after", "after LAE", ">"), ("scheme", "scheme", "<"), ("group_size", "group", ">"),
           ("weight_sqnr_db", "W SQNR dB", ">"), ("output_sqnr_db", "out SQNR dB", ">"), ("reason", "reason", "<")]


def layer_rows(state: State) -> list[dict]:
    rows = []
    for linear in state.linears.values():
        rows.append({
            "name": linear.name,
            "op": linear.node.op,
            "K": linear.k,
            "N": linear.n,
            "act_max_before": _num(linear.v),
            "act_max_after": _num(linear.v_after),
            "scheme": linear.scheme,
            "reason": linear.reason,
            "group_size": state.config.group_size,
            "weight_sqnr_db": _num(linear.weight_sqnr_db),
            "output_sqnr_db": _num(linear.output_sqnr_db),
            "act_scale": _num(linear.act_scale),
            "producer": (f"{linear.producer.kind} '{linear.producer.node.name}'" if linear.producer else None),
            "weight_source": linear.weight_note or "initializer",
        })
    return rows


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


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False, default=str)


def _num(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else (1e308 if math.isinf(value) else round(value, 6))
