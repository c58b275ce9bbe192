"""fptq-graph: FPTQ W4A8 post-training quantization for ONNX graphs.

The public names load on first use (PEP 562), so `import fptq_graph` (and the command's first line,
which installs its signal handlers) does not wait for torch, onnx and ONNX Runtime.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {"Config": "fptq_graph.config", "quantize": "fptq_graph.api", "calibrate": "fptq_graph.api",
            "quantize_encoder_decoder": "fptq_graph.api", "quantize_to": "fptq_graph.quantize_to", "QuantizeResult": "fptq_graph.api", "FptqError": "fptq_graph.errors", "ModelLoadError": "fptq_graph.errors",
            "NoQuantizableLinearError": "fptq_graph.errors", "CalibrationError": "fptq_graph.errors",
            "ExportError": "fptq_graph.errors"}
_SUBPACKAGES = ("runtime", "ir", "passes", "plan", "quant", "patterns", "report", "exporters", "cli")

__all__ = ["Config", "quantize", "quantize_to", "quantize_encoder_decoder", "calibrate", "runtime", "QuantizeResult", "FptqError", "ModelLoadError",
           "NoQuantizableLinearError", "CalibrationError", "ExportError", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"fptq_graph.{name}")
    else:
        raise AttributeError(f"module 'fptq_graph' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
