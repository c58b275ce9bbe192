"""The module names of fptq-graph before its core was laid out in subpackages (issue 20), as aliases:
`import fptq_graph.w4a8_op` (or `from fptq_graph.model_io import load_model`) gives the module that now
holds it. Nothing inside the package imports these names."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "fptq_graph.w4a8_op": "fptq_graph.runtime.w4a8_op",
    "fptq_graph.ort_errors": "fptq_graph.runtime.ort_errors",
    "fptq_graph.model_io": "fptq_graph.ir",            # load_model, load_split, save_model, validate_model, ...
    "fptq_graph.split_model": "fptq_graph.ir.split_model",
    "fptq_graph.run_outputs": "fptq_graph.files.run_outputs",
    "fptq_graph.model_folder": "fptq_graph.ir.folder",
    "fptq_graph.schedule": "fptq_graph.ir.schedule",
    "fptq_graph.protobuf_wire": "fptq_graph.ir.protobuf_wire",
    "fptq_graph.graph_match": "fptq_graph.patterns.graph_match",
    "fptq_graph.int4": "fptq_graph.quant.int4",
    "fptq_graph.int8": "fptq_graph.quant.int8",
    "fptq_graph.gptq": "fptq_graph.quant.gptq",
    "fptq_graph.awq": "fptq_graph.quant.awq",
    "fptq_graph.weight_clipping": "fptq_graph.quant.clipping",
    "fptq_graph.pipeline": "fptq_graph.passes.pipeline",
    "fptq_graph.state": "fptq_graph.passes.state",
    "fptq_graph.report_html": "fptq_graph.report.html",
    "fptq_graph.report_plot": "fptq_graph.report.plot",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
