"""Export of sliding-window decoders with their KV cache (issue 14): a Mistral-class model (random
weights, window 16) exports with --kv-cache, and ONNX Runtime gives PyTorch's logits for a prompt
longer than the window and PyTorch's greedy tokens while decoding past it."""
import numpy as np
import onnx
import pytest
import torch

from fptq_graph.calibration import feeds_for
from fptq_graph.cli import main
from fptq_graph.generate import greedy_generate
from fptq_graph.runtime import session

WINDOW = 16


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=WINDOW)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mistral") / "hf"
    MistralForCausalLM(config).save_pretrained(str(folder))
    return folder


def test_sliding_window_decoder_exports_with_its_kv_cache(mistral, tmp_path, capsys):
    from transformers import MistralForCausalLM

    out = tmp_path / "m.onnx"
    assert main(["export", str(mistral), "-o", str(out), "--kv-cache"]) == 0, capsys.readouterr().err
    model = MistralForCausalLM.from_pretrained(str(mistral)).eval()
    ids = torch.randint(0, 500, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    inputs = list(onnx.load(str(out)).graph.input)
    sess = session(out)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.numpy()
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    got = sess.run(["logits"], feeds_for(inputs, ids.numpy()))[0]
    assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()
    assert greedy_generate(sess, ids[0].numpy(), 12, None, inputs=inputs).tokens == expected
