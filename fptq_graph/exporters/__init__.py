"""Exporters: PyTorch / Hugging Face models -> FX (torch.export) -> ONNX (opset 21, IR 10, dynamic batch and sequence)."""
__all__ = ["export_module", "export_hf", "export_hf_streaming"]


def __getattr__(name: str):
    # Imported on first use: the graph-side helpers (kv_layout) are read by the loader, which must not
    # pay for importing torch.
    if name == "export_module":
        from fptq_graph.exporters.torch_module import export_module
        return export_module
    if name == "export_hf":
        from fptq_graph.exporters.huggingface import export_hf
        return export_hf
    if name == "export_hf_streaming":
        from fptq_graph.exporters.streaming import export_hf_streaming
        return export_hf_streaming
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
