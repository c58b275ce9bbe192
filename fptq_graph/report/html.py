"""The report as one self-contained HTML page (styles inline, the plot embedded as a data: URI)."""
from __future__ import annotations

import base64
import html

from fptq_graph.report.plot import SCHEME_COLORS, activation_png

COLUMNS = [("name", "layer"), ("K", "K"), ("N", "N"), ("act_max_before", "act max"), ("act_max_after", "after equalization"),
           ("scheme", "scheme"), ("group_size", "group"), ("weight_sqnr_db", "weight SQNR dB"),
           ("output_sqnr_db", "output SQNR dB"), ("reason", "reason")]

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
.scheme { color: #fff; font-weight: 600; text-align: center; }
img { max-width: 100%; border: 1px solid #ddd; }
ul.passes li { font-family: monospace; font-size: 12px; }
"""


def report_html(report: dict, title: str) -> str:
    cfg = report["config"]
    counts: dict[str, int] = {}
    for layer in report["layers"]:
        counts[layer["scheme"]] = counts.get(layer["scheme"], 0) + 1
    plot = base64.b64encode(activation_png(report)).decode("ascii")
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>fptq-graph report: {e(title)}</h1>",
        f"<p>recipe <b>{e(str(cfg['recipe']))}</b>, format {e(str(cfg['format']))}, group {cfg['group_size']}, "
        f"bounds {cfg['static_bound']:g} / {cfg['dynamic_bound']:g}; calibration: {e(str(report['calibration']))}; "
        f"source: {e(str(report['source']))}</p>",
        "<p>" + ", ".join(f"{n} {e(s)}" for s, n in counts.items()) + f" of {len(report['layers'])} quantized linears</p>",
        f'<img alt="activation max per linear" src="data:image/png;base64,{plot}">',
        "<h2>Passes</h2>", '<ul class="passes">',
        *(f"<li>[{e(p['name'])}] {e(p['summary'])}</li>" for p in report["passes"]),
        "</ul>", "<h2>Quantized linears</h2>", '<table id="layers"><thead><tr>',
        *(f"<th>{e(head)}</th>" for _, head in COLUMNS), "</tr></thead><tbody>",
        *(_row(layer) for layer in report["layers"]), "</tbody></table>",
    ]
    kept = report.get("kept_float") or []
    if kept:
        parts += ["<h2>Kept float</h2>", '<table id="kept"><tr><th>layer</th><th>K</th><th>N</th><th>reason</th></tr>',
                  *(f'<tr><td class="text">{e(k["name"])}</td><td>{k["K"]}</td><td>{k["N"]}</td>'
                    f'<td class="text">{e(k["reason"])}</td></tr>' for k in kept), "</table>"]
    tables = [t for t in report.get("embeddings") or [] if t.get("mode") != "float"]
    if tables:
        parts += ["<h2>Embedding tables</h2>", '<table id="embeddings"><tr><th>table</th><th>shape</th><th>stored</th>'
                  '<th>MiB</th><th>SQNR dB</th></tr>',
                  *(f'<tr><td class="text">{e(t["table"])}</td><td>{e("x".join(map(str, t["shape"])))}</td>'
                    f'<td class="text">{e(t["note"])}</td><td>{t["float_bytes"] / 2**20:.2f} -> {t["bytes"] / 2**20:.2f}</td>'
                    f'<td>{"exact" if t["sqnr_db"] is None else t["sqnr_db"]}</td></tr>' for t in tables), "</table>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def _row(layer: dict) -> str:
    cells = []
    for key, _ in COLUMNS:
        value = layer.get(key)
        if key == "scheme":
            color = SCHEME_COLORS.get(value, "#000")
            cells.append(f'<td class="scheme" style="background:{color}">{html.escape(str(value))}</td>')
        elif isinstance(value, float):
            cells.append(f"<td>{value:.2f}</td>")
        else:
            text = "-" if value is None else html.escape(str(value))
            cells.append(f'<td class="text">{text}</td>' if key in ("name", "reason") else f"<td>{text}</td>")
    return "<tr>" + "".join(cells) + "</tr>"
