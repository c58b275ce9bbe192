"""Running the pipeline part-way, for tests that check the graph between passes."""
import copy

import onnx_graphsurgeon as gs

from fptq_graph.api import finish_model
from fptq_graph.calibration import FeedsCalibration
from fptq_graph.passes.pipeline import default_passes, run_passes
from fptq_graph.passes.state import State


def run_until(model, calibration, config, last: str):
    """Runs the default passes up to and including `last`; returns (state, exported model)."""
    if isinstance(calibration, list):
        calibration = FeedsCalibration(calibration)
    state = State(graph=gs.import_onnx(copy.deepcopy(model)), config=config, calibration=calibration)
    passes = default_passes()
    names = [p.name for p in passes]
    run_passes(state, passes[: names.index(last) + 1])
    return state, finish_model(state.graph, model)
