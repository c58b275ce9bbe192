"""Errors a user can act on. Each carries a one-line message naming the problem and the node or file."""


class FptqError(Exception):
    """Base class: the CLI prints str(error) on one line and exits non-zero."""


class ModelLoadError(FptqError):
    """The input file is missing, is not ONNX, is truncated or fails the ONNX checker."""


class NoQuantizableLinearError(FptqError):
    """The graph has no MatMul/Gemm with a constant weight."""


class CalibrationError(FptqError):
    """The calibration set is empty, tokenizes to nothing, or produced NaN/Inf."""


class ExportError(FptqError):
    """A model could not be exported to ONNX."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error in our one-line form)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
