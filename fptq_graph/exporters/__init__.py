"""Exporters: PyTorch / Hugging Face models -> FX (torch.export) -> ONNX (opset 21, IR 10, dynamic batch and sequence)."""
from .torch_module import export_module
from .huggingface import export_hf

__all__ = ["export_module", "export_hf"]
