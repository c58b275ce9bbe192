"""Running the pipeline part-way, for tests that check the graph between passes; a greedy generator of
onnxruntime-genai over a model folder."""
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


def genai_generator(folder, prompt: str, providers: list[str] | None = None):
    """(model, generator) of onnxruntime-genai over `folder`, greedy, `prompt` appended; providers replace
    the folder's (None: as configured; []: the CPU)."""
    import onnxruntime_genai as og

    if providers is None:
        model = og.Model(str(folder))
    else:
        config = og.Config(str(folder))
        config.clear_providers()
        for provider in providers:
            config.append_provider(provider)
        model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(og.Tokenizer(model).encode(prompt))
    return model, generator
