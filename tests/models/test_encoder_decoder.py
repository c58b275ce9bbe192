"""An encoder-decoder folder in optimum's layout quantized as a pair (issue 22).

A random-weight T5 (2 + 2 layers, width 64) exported here with torch into optimum's file names:
encoder_model.onnx (input_ids, attention_mask -> last_hidden_state) and decoder_model.onnx (input_ids,
encoder_attention_mask, encoder_hidden_states -> logits), with config.json's decoder_start_token_id. A
decoder_with_past_model.onnx is the decoder with a cross-attention cache input added (what optimum's
with-past decoder reads), which text calibration cannot feed. The reference for "the decoder is
calibrated on the float encoder's outputs" is the float encoder run by ONNX Runtime on the same tokens,
its max |output| compared with the decoder's cross-attention linears' calibrated input max.
"""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper

from fptq_graph import Config, quantize_encoder_decoder
from fptq_graph.calibration import from_random
from fptq_graph.runtime import session

VOCAB, WIDTH, SEQ = 96, 64, 8


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("t5") / "t5-onnx"
    folder.mkdir()
    config = transformers.T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=16, d_ff=128, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()

    class Wrapped(torch.nn.Module):   # the model a submodule: its weights become initializers
        def __init__(self):
            super().__init__()
            self.m = model

    class Encoder(Wrapped):
        def forward(self, input_ids, attention_mask):
            return self.m.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Decoder(Wrapped):
        def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states):
            return self.m(decoder_input_ids=input_ids, attention_mask=encoder_attention_mask,
                          encoder_outputs=(encoder_hidden_states,), use_cache=False).logits

    ids = torch.randint(2, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(Encoder(), (ids, mask), str(folder / "encoder_model.onnx"), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
        hidden = Encoder()(ids, mask)
        torch.onnx.export(Decoder(), (ids, mask, hidden), str(folder / "decoder_model.onnx"), dynamo=False,
                          opset_version=17, input_names=["input_ids", "encoder_attention_mask", "encoder_hidden_states"],
                          output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "encoder_attention_mask": axes,
                                        "encoder_hidden_states": axes, "logits": axes})
    with_past = onnx.load(str(folder / "decoder_model.onnx"))
    with_past.graph.input.append(helper.make_tensor_value_info("past_key_values.0.encoder.key", T.FLOAT,
                                                               ["batch", 4, "encoder_sequence", 16]))
    onnx.save(with_past, str(folder / "decoder_with_past_model.onnx"))
    config.save_pretrained(folder)
    return folder


def cross_attention_inputs_max(result) -> float:
    """The calibrated input max of the decoder's linears that read encoder_hidden_states (EncDecAttention k, v)."""
    rows = [r for r in result.layers if "EncDecAttention" in r["name"] and r["name"].rsplit("/", 2)[-2] in ("k", "v")]
    assert len(rows) == 4, [r["name"] for r in result.layers]
    return max(r["act_max_before"] for r in rows)


def test_decoder_is_calibrated_on_the_float_encoders_outputs(t5_folder):
    cfg = Config(calib_seq_len=SEQ, calib_batch_size=2, group_size=32, progress=False, sqnr_samples=0)
    encoder, decoded = quantize_encoder_decoder(t5_folder / "encoder_model.onnx", [t5_folder / "decoder_model.onnx"],
                                                4, cfg, start_token=0)
    decoder = decoded[str(t5_folder / "decoder_model.onnx")]
    calib = from_random(4, VOCAB, SEQ, 2, cfg.seed)   # the tokens both were calibrated on
    float_encoder = session(str(t5_folder / "encoder_model.onnx"))
    expected = max(float(np.abs(float_encoder.run(None, {"input_ids": t, "attention_mask": np.ones_like(t)})[0]).max())
                   for t in calib.batches())
    assert cross_attention_inputs_max(decoder) == pytest.approx(expected, rel=1e-5)
    assert len(encoder.layers) == 12 and all(r["scheme"] != "float" for r in encoder.layers)

    # the pair runs: quantized encoder -> quantized decoder, within reach of the float pair
    ids = np.random.default_rng(9).integers(2, VOCAB, (2, SEQ))
    mask = np.ones_like(ids)
    start = np.concatenate([np.zeros((2, 1), np.int64), ids[:, :-1]], axis=1)
    hf = float_encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    lf = session(str(t5_folder / "decoder_model.onnx")).run(None, {"input_ids": start, "encoder_attention_mask": mask,
                                                                   "encoder_hidden_states": hf})[0]
    hq = session(encoder.model).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    lq = session(decoder.model).run(None, {"input_ids": start, "encoder_attention_mask": mask, "encoder_hidden_states": hq})[0]
    assert np.isfinite(lq).all()
    assert np.linalg.norm(lq - lf) / np.linalg.norm(lf) < 0.5   # int4 g32 + int8 on random weights: about 0.2


def test_folder_quantizes_every_model_it_can_and_names_the_rest(t5_folder, tmp_path, capsys):
    from fptq_graph.cli import main

    source = tmp_path / "in"
    shutil.copytree(t5_folder, source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    out = tmp_path / "out"
    code = main(["quantize", str(source), "-o", str(out), "--calib-random", "4", "--seq-len", str(SEQ),
                 "--batch-size", "2", "--group-size", "32", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: decoder_with_past_model.onnx: copied float, not quantized: " in captured.err, captured.err
    assert "cross-attention cache" in captured.err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before   # the input folder is untouched
    last = captured.out.strip().splitlines()[-1]
    assert "encoder_model.onnx quantized" in last and "decoder_model.onnx quantized" in last
    assert "decoder_with_past_model.onnx copied float" in last
    for name in ("encoder_model.onnx", "decoder_model.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
        assert "DequantizeLinear" in ops, name
    assert (out / "decoder_with_past_model.onnx").read_bytes() == before["decoder_with_past_model.onnx"]
    assert json.loads((out / "config.json").read_text())["decoder_start_token_id"] == 0


def test_encoder_feeds_cannot_calibrate_the_pair(t5_folder):
    from fptq_graph.errors import CalibrationError

    feeds = [{"input_ids": np.ones((1, SEQ), np.int64), "attention_mask": np.ones((1, SEQ), np.int64)}]
    with pytest.raises(CalibrationError, match="calibrated from tokens"):
        quantize_encoder_decoder(t5_folder / "encoder_model.onnx", [t5_folder / "decoder_model.onnx"], feeds,
                                 Config(progress=False))
