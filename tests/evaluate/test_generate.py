"""Decoders exported with their KV cache, and greedy generation through ONNX Runtime."""
import json

import numpy as np
import onnx
import pytest
import torch

from fptq_graph import Config, quantize
from fptq_graph.errors import FptqError
from fptq_graph.evaluate import perplexity
from fptq_graph.exporters import export_hf
from fptq_graph.generate import greedy_generate
from fptq_graph.runtime import session
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_llama()
    folder = tmp_path_factory.mktemp("kv")
    kv = export_hf(model, folder / "kv.onnx", kv_cache=True)
    export_hf(model, folder / "plain.onnx")
    return model, kv, folder


def torch_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_kv_export_layout(tiny):
    _, kv, _ = tiny
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(kv.graph.input) + list(kv.graph.output)}
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    meta = {p.key: p.value for p in kv.metadata_props}
    assert json.loads(meta["fptq_graph.kv_cache"]) == {"layers": 2, "kv_heads": 2, "head_dim": 16}


def test_greedy_tokens_equal_pytorch_for_20_tokens(tiny):
    model, _, folder = tiny
    prompt = [5, 17, 99, 3, 250, 42, 7]
    expected = torch_greedy(model, prompt, 20)
    streamed = []
    got = greedy_generate(session(folder / "kv.onnx"), prompt, 20, on_token=streamed.append)
    assert got.tokens == expected == streamed
    assert got.prompt_tokens == 7 and len(got.decode_seconds) == 19
    # a graph without a cache reruns the sequence and gets the same tokens
    assert greedy_generate(session(folder / "plain.onnx"), prompt, 20).tokens == expected


def test_kv_graph_quantizes_and_evaluates(tiny, tmp_path):
    _, _, folder = tiny
    ids = np.random.default_rng(0).integers(0, 256, 256)
    assert perplexity(session(folder / "kv.onnx"), ids, 64) == pytest.approx(
        perplexity(session(folder / "plain.onnx"), ids, 64), rel=1e-5)
    for form in ("qdq", "w4a8", "ort"):
        result = quantize(folder / "kv.onnx", 4, Config(format=form, group_size=32, calib_seq_len=32, progress=False))
        path = result.save(tmp_path / f"kv.{form}.onnx")
        assert [o.name for o in onnx.load(str(path)).graph.output][:2] == ["logits", "present.0.key"]
        tokens = greedy_generate(session(path), [5, 17, 99], 8).tokens
        assert len(tokens) == 8 and all(0 <= t < 256 for t in tokens)
        assert np.isfinite(perplexity(session(path), ids, 64))


def test_generate_errors(tiny, tmp_path):
    _, _, folder = tiny
    sess = session(folder / "kv.onnx")
    with pytest.raises(FptqError, match="prompt is empty"):
        greedy_generate(sess, [], 4)
    with pytest.raises(FptqError, match="max_new_tokens"):
        greedy_generate(sess, [1], 0)
    import crafted as C

    model, _ = C.ln_block(1.0, np.random.default_rng(0))
    with pytest.raises(FptqError, match="no 'logits' output"):
        greedy_generate(session(C.save(model, tmp_path / "enc.onnx")), [1], 2)


def test_cuda_provider_missing_is_a_clear_error(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the error cannot happen here")
    _, _, folder = tiny
    with pytest.raises(FptqError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        session(folder / "kv.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_float16_decoder_quantizes_in_every_form(tmp_path):
    """fp16 models: scales and dequantized weights take the activations' type; the forms agree."""
    model = tiny_llama().half()
    export_hf(model, tmp_path / "h.onnx", kv_cache=True)
    tokens = {}
    for form in ("qdq", "w4a8", "ort"):
        result = quantize(tmp_path / "h.onnx", 4, Config(format=form, group_size=32, calib_seq_len=32, progress=False))
        path = result.save(tmp_path / f"h.{form}.onnx")
        tokens[form] = greedy_generate(session(path), [5, 17, 99], 8).tokens
    print("fp16 greedy tokens per form:", tokens)
    assert tokens["qdq"] == tokens["ort"] == tokens["w4a8"]
