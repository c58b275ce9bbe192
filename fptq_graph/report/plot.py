"""The per-layer activation plot of a report: max|X| before and after equalization on a log axis,
the LAE band (static_bound, dynamic_bound] and the per-token band above it shaded, points colored by
the scheme each layer got. matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import io

SCHEME_COLORS = {"static": "#1f77b4", "lae": "#2ca02c", "smooth": "#9467bd", "dynamic": "#d62728", "float": "#7f7f7f"}
BAND_COLORS = {"lae": "#2ca02c", "dynamic": "#d62728"}


def plot_data(report: dict) -> dict:
    """What the plot draws, as plain data: the points and the two band boundaries."""
    cfg = report["config"]
    layers = report["layers"]
    return {
        "names": [l["name"] for l in layers],
        "before": [l["act_max_before"] for l in layers],
        "after": [l["act_max_after"] for l in layers],
        "schemes": [l["scheme"] for l in layers],
        "bounds": (float(cfg["static_bound"]), float(cfg["dynamic_bound"])),
    }


def activation_figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    data = plot_data(report)
    low, high = data["bounds"]
    x = list(range(len(data["names"])))
    values = [v for v in data["before"] + data["after"] if v and v > 0]
    top = max(values + [high]) * 3
    bottom = min(values + [low]) / 3
    fig = Figure(figsize=(max(8.0, min(24.0, 0.12 * len(x) + 4)), 4.8), dpi=100)
    ax = fig.add_subplot()
    ax.set_yscale("log")
    ax.axhspan(low, high, color=BAND_COLORS["lae"], alpha=0.12, label=f"LAE band ({low:g}, {high:g}]", gid="band-lae")
    ax.axhspan(high, top, color=BAND_COLORS["dynamic"], alpha=0.08, label=f"per-token band (> {high:g})", gid="band-dynamic")
    ax.axhline(low, color="0.3", lw=0.8, ls="--", gid="bound-static")
    ax.axhline(high, color="0.3", lw=0.8, ls="--", gid="bound-dynamic")
    colors = [SCHEME_COLORS.get(s, "black") for s in data["schemes"]]
    ax.scatter(x, data["before"], facecolors="none", edgecolors=colors, s=22, gid="act-max-before")
    moved = [i for i in x if data["after"][i] != data["before"][i]]
    ax.scatter(moved, [data["after"][i] for i in moved], c=[colors[i] for i in moved], s=18, marker="D",
               gid="act-max-after")
    ax.set_ylim(bottom, top)
    ax.set_xlim(-1, len(x))
    ax.set_xlabel("linear (graph order)")
    ax.set_ylabel("calibrated max |X| (log)")
    ax.set_title("activation range per linear: circles before equalization, diamonds after")
    if len(x) <= 40:
        ax.set_xticks(x, [n[-28:] for n in data["names"]], rotation=90, fontsize=6)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=s) for s, c in SCHEME_COLORS.items()
               if s in data["schemes"]]
    legend = ax.legend(handles=handles + ax.get_legend_handles_labels()[0][:2], fontsize=7, loc="upper left", ncol=2)
    legend.set_gid("legend")
    fig.tight_layout()
    return fig


def activation_png(report: dict) -> bytes:
    buffer = io.BytesIO()
    activation_figure(report).savefig(buffer, format="png")
    return buffer.getvalue()
