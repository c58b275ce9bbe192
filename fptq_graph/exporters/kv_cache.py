"""A Hugging Face decoder with its KV cache as explicit graph inputs and outputs, so that generation
runs in ONNX Runtime one new token at a time.

Inputs:  input_ids [batch, sequence], attention_mask [batch, total_sequence] (past and new tokens),
         position_ids [batch, sequence], past_key_values.{i}.key / .value [batch, kv_heads,
         past_sequence, head_dim]; past_sequence may be 0 (the prompt step).
Outputs: logits [batch, sequence, vocab], present.{i}.key / .value [batch, kv_heads, total_sequence,
         head_dim]: the next step's past.
torch.export infers how the past and total lengths relate to the sequence (Dim.AUTO); a length the
example happened to fix would be refused at run time, which the exporter's tests would show.
"""
from __future__ import annotations

import json

import torch

KV_KEY = "fptq_graph.kv_cache"


def cache_layout(config) -> dict:
    """Layers, KV heads and head size of a decoder's cache, from its config."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    return {"layers": int(text.num_hidden_layers),
            "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads)}


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class WithKVCache(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, *presents), past a flat list."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        # Full-length layers, without the config: with it, a sliding-window model (Mistral, Gemma-2/3)
        # gets sliding cache layers that keep only the last window of keys, so torch.export guards the
        # sequence to fit the window ("sequence <= 28") and the presents would not be past + new. The
        # model's mask still applies the window over the full cache.
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def kv_export_arguments(model, example_seq_len: int, vocab: int) -> dict:
    """Keyword arguments for export_module: the wrapped module, example inputs, names, shapes, metadata."""
    layout = cache_layout(model.config)
    layers, batch, past_len = layout["layers"], 2, 3
    generator = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype   # the cache is kept in the model's precision
    past = [torch.randn(batch, layout["kv_heads"], past_len, layout["head_dim"], generator=generator).to(dtype)
            for _ in range(2 * layers)]
    example = {
        "input_ids": torch.randint(0, vocab, (batch, example_seq_len), generator=generator),
        "attention_mask": torch.ones(batch, past_len + example_seq_len, dtype=torch.int64),
        "position_ids": torch.arange(past_len, past_len + example_seq_len).expand(batch, -1).contiguous(),
        "past": past,
    }
    auto = torch.export.Dim.AUTO
    batch_dim = torch.export.Dim("batch", min=1, max=2**16)
    seq_dim = torch.export.Dim("sequence", min=1, max=2**15)
    shapes = {"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: auto},
              "position_ids": {0: batch_dim, 1: seq_dim}, "past": [{0: batch_dim, 2: auto} for _ in past]}
    names = ["input_ids", "attention_mask", "position_ids"] + past_names(layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names(layers)})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names(layers)})
    return {"module": WithKVCache(model, layers), "example_inputs": example, "input_names": names,
            "output_names": ["logits"] + present_names(layers), "dynamic_shapes": shapes, "dynamic_axes": axes,
            "metadata": {KV_KEY: json.dumps(layout)}}
