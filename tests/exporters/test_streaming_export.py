"""exporters/streaming.py: a safetensors checkpoint exported with one weight tensor in memory at a time.

The graph must be export_hf's for the same checkpoint (same inputs, outputs, node names and op structure;
ONNX Runtime gives the same outputs), float16/bfloat16 checkpoints export a float16 graph, sharded
checkpoints work, the weights land in one external-data file beside the model, and the input directory
is never written. Small random-weight models (hidden 64, 2 layers), so each test takes seconds.
"""
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaForCausalLM

from fptq_graph.exporters import export_hf, export_hf_streaming
from tiny_models import tiny_llama

VOCAB = 300


def llama(tied: bool) -> LlamaForCausalLM:
    model = tiny_llama(vocab=VOCAB, tied=tied)
    with torch.no_grad():   # norms away from 1, so that no two weights are equal (the optimizer would share them)
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """{"untied": folder, "tied": folder}: save_pretrained (safetensors) of the two tiny LLaMAs."""
    folders = {}
    for kind in ("untied", "tied"):
        folders[kind] = tmp_path_factory.mktemp(f"llama-{kind}") / "hf"
        llama(kind == "tied").save_pretrained(str(folders[kind]))
    return folders


def ort_run(path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def token_feeds(batch=3, seq=11, seed=1) -> dict:
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def structure(model: onnx.ModelProto) -> tuple:
    """Everything but initializer names and data: inputs, outputs, and each node's op, name, attributes
    and inputs (an initializer input as its type and shape)."""
    inits = {i.name: (i.data_type, tuple(i.dims)) for i in model.graph.initializer}
    nodes = [(n.op_type, n.name, n.domain, tuple(str(a) for a in n.attribute),
              tuple(inits.get(x, x) for x in n.input), tuple(n.output)) for n in model.graph.node]
    io = [str(v) for v in (*model.graph.input, *model.graph.output)]
    return io, nodes


def files_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_llama_graph_and_logits_equal_export_hf(llama_dirs, kind, tmp_path):
    llama_dir = llama_dirs[kind]
    ref = export_hf(llama_dir, tmp_path / "ref.onnx")
    got = export_hf_streaming(llama_dir, tmp_path / "m.onnx")
    assert {n.op_type for n in got.graph.node} == {n.op_type for n in ref.graph.node}
    matmuls = [n.name for n in got.graph.node if n.op_type == "MatMul" and not n.name.startswith("node_")]
    assert matmuls == [n.name for n in ref.graph.node if n.op_type == "MatMul" and not n.name.startswith("node_")]
    assert "lm_head" in matmuls and "model.layers.1.mlp.down_proj" in matmuls
    assert structure(got) == structure(ref)
    assert {p.key for p in got.metadata_props} == {p.key for p in ref.metadata_props}
    feeds = token_feeds()
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", feeds)[0], ort_run(tmp_path / "ref.onnx", feeds)[0],
                               rtol=0, atol=1e-5)
    # one external-data file beside the model, mapped read-only by the project's loader
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.")) == ["m.onnx", "m.onnx.data"]
    locations = {e.value for i in got.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}
    from fptq_graph.ir.load import load_split

    split = load_split(tmp_path / "m.onnx")
    assert split.arrays and all(not a.flags.writeable for a in split.arrays.values() if a.size)
    tables = [i.name for i in got.graph.initializer if list(i.dims) in ([VOCAB, 64], [64, VOCAB])]
    if kind == "tied":   # one table, read by the embedding's Gather and (through a Transpose) by lm_head
        assert len(tables) == 1 and sum(x == tables[0] for n in got.graph.node for x in n.input) == 2
    else:
        assert len(tables) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoints_export_a_float16_graph(dtype, tmp_path):
    folder = tmp_path / "hf"
    llama(tied=True).to(dtype).save_pretrained(str(folder))
    lines = []
    model = export_hf_streaming(folder, tmp_path / "m.onnx", log=lines.append)
    types = {i.data_type for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                                            onnx.TensorProto.BFLOAT16)}
    assert types == {onnx.TensorProto.FLOAT16} or types == {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT}
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer if len(i.dims) == 2)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert any("bfloat16" in line and "float16" in line for line in lines) == (dtype == torch.bfloat16)
    feeds = token_feeds()
    reference = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()   # the same weights, exactly
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(feeds["input_ids"]), use_cache=False).logits.numpy()
    out = ort_run(tmp_path / "m.onnx", feeds)[0]
    assert out.dtype == np.float16
    # float16 compute (float32 inside RMSNorm and softmax, as the model does): measured ~3e-4 of max|logit|
    assert np.abs(out.astype(np.float64) - ref).max() <= 2e-3 * np.abs(ref).max()
    as_float = export_hf_streaming(folder, tmp_path / "f.onnx", dtype="float32")
    assert as_float.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out32 = ort_run(tmp_path / "f.onnx", feeds)[0]
    assert np.abs(out32 - ref).max() <= 1e-5 * np.abs(ref).max()


def test_kv_cache_export_runs_prompt_and_decode(tmp_path):
    folder = tmp_path / "hf"
    model = llama(tied=False)
    model.save_pretrained(str(folder))
    exported = export_hf_streaming(folder, tmp_path / "kv.onnx", kv_cache=True)
    names = [i.name for i in exported.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    assert [o.name for o in exported.graph.output][:2] == ["logits", "present.0.key"]
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 9))
    sess = ort.InferenceSession(str(tmp_path / "kv.onnx"), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 2, 0, 16), np.float32)
    prompt = {"input_ids": ids[:, :8], "attention_mask": np.ones((1, 8), np.int64),
              "position_ids": np.arange(8)[None], **{n: empty for n in names[3:]}}
    first = sess.run(None, prompt)
    step = {"input_ids": ids[:, 8:], "attention_mask": np.ones((1, 9), np.int64), "position_ids": np.array([[8]]),
            **dict(zip(names[3:], first[1:]))}
    second = sess.run(None, step)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(first[0][0], ref[0, :8], atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(second[0][0, -1], ref[0, -1], atol=1e-4 * np.abs(ref).max())


def test_bert_encoder_equals_export_hf(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128))
    with torch.no_grad():
        for param in bert.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path / "hf"
    bert.save_pretrained(str(folder))
    ref = export_hf(folder, tmp_path / "ref.onnx")
    got = export_hf_streaming(folder, tmp_path / "m.onnx")
    assert [o.name for o in got.graph.output] == ["last_hidden_state"]
    assert structure(got) == structure(ref)
    assert [n.name for n in got.graph.node if n.op_type == "LayerNormalization"] == \
        [n.name for n in ref.graph.node if n.op_type == "LayerNormalization"]
    feeds = token_feeds(2, 13)
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", feeds)[0], ort_run(tmp_path / "ref.onnx", feeds)[0],
                               rtol=0, atol=1e-5)


def test_sharded_checkpoint_and_the_input_directory_unchanged(tmp_path):
    folder = tmp_path / "hf"
    model = llama(tied=False)
    model.save_pretrained(str(folder), max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    before = files_digest(folder)
    export_hf_streaming(folder, tmp_path / "m.onnx")
    assert files_digest(folder) == before
    feeds = token_feeds()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(feeds["input_ids"]), use_cache=False).logits.numpy()
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", feeds)[0], ref, atol=1e-5 * np.abs(ref).max())


def test_a_failure_while_writing_leaves_nothing(llama_dirs, tmp_path, monkeypatch):
    from fptq_graph.exporters import streaming

    read, calls = streaming.Checkpoint.read, []

    def failing(self, key):
        calls.append(key)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return read(self, key)

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(streaming.Checkpoint, "read", failing)
    monkeypatch.setattr(streaming, "FOLD_LIMIT", 0)   # every weight is read while writing
    with pytest.raises(OSError):
        export_hf_streaming(llama_dirs["tied"], out / "m.onnx")
    assert len(calls) > 3
    assert sorted(p.name for p in out.iterdir()) in ([], ["m.tokenizer"])   # the tokenizer, if any, as export_hf


def test_cli_streams_a_safetensors_directory_as_float16(llama_dirs, tmp_path, capsys):
    from fptq_graph.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", str(llama_dirs["tied"]), "-o", str(out), "--dtype", "float16"]) == 0, capsys.readouterr().err
    assert out.with_name("m.onnx.data").is_file()
    model = onnx.load(str(out), load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    logits = ort_run(out, token_feeds())[0]
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging folder left
