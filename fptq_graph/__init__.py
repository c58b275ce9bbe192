"""fptq-graph: FPTQ W4A8 post-training quantization for ONNX graphs."""
__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import CalibrationError, ExportError, FptqError, ModelLoadError, NoQuantizableLinearError  # noqa: E402
from .api import QuantizeResult, calibrate, quantize  # noqa: E402
from . import runtime  # noqa: E402

__all__ = ["Config", "quantize", "calibrate", "runtime", "QuantizeResult", "FptqError", "ModelLoadError", "NoQuantizableLinearError",
           "CalibrationError", "ExportError", "__version__"]
