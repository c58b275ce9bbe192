"""The model as structure plus mapped weights, and its way in and out.

load.py         read a file (weights mapped, or whole) with one clear error per way it can fail; validate
save.py         write atomically at IR version 10, streaming mapped weights; finish a rewritten graph
split_model.py  SplitModel: the proto's structure with its large tensors as arrays (mapped, shared, streamed)
opset.py        the model's opset, what its ops need, conversion (never a relabel)
metadata.py     metadata_props keys (the tokenizer, the report)
bodies.py       the one walker of control-flow bodies (If/Loop/Scan subgraphs)
mapped_files.py read-only mappings, one per file, tensors as views into them
folder.py       model folders in and out (ONNX Runtime GenAI, optimum, Hugging Face)
schedule.py     node order for early reductions; protobuf_wire.py: the wire format for mapping
"""
import importlib

_EXPORTS = {"load_model": "load", "load_split": "load", "validate_model": "load", "upgrade_opset": "opset",
            "finish_model": "save", "finish_split": "save", "save_model": "save", "SplitModel": "split_model"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """The common entry points, loaded on first use: fptq_graph.files.run_outputs must import without onnx (the
    command installs its signal handlers through it before the heavy imports)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fptq_graph.ir' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fptq_graph.ir.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
