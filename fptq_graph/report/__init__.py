"""What the compiler decided, for people: the per-layer rows and table (layers.py), the HTML page
(html.py) and the activation plot (plot.py)."""
from fptq_graph.report.layers import REPORT_KEY, format_table, layer_rows, parse_stored, to_json

__all__ = ["REPORT_KEY", "format_table", "layer_rows", "parse_stored", "to_json"]
