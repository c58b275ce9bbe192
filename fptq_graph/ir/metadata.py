"""The model's metadata_props: where our exporter records the tokenizer and quantize stores its report."""
from __future__ import annotations

import onnx


TOKENIZER_KEY = "fptq_graph.tokenizer"


def get_metadata(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
