"""On the real pretrained all-MiniLM-L6-v2: LAE fold equivalence, the qdq model's validity and weights,
and accuracy of FPTQ W4A8 against naive W4A8 on held-out text."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from transformers import AutoTokenizer

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.calibration import from_text
from fptq_graph.evaluate import embedding_agreement, heldout_passages, sentence_embeddings
from fptq_graph.runtime import session
from helpers import run_until

SMALL = dict(calib_samples=16, calib_seq_len=256, calib_batch_size=8, progress=False)
PAPER = "fptq-paper"   # round-to-nearest weights: what the reference INT4 of these tests computes


@pytest.fixture(scope="module")
def tokenizer(minilm_onnx):
    return AutoTokenizer.from_pretrained(str(minilm_onnx.with_name("minilm.tokenizer")))


@pytest.fixture(scope="module")
def heldout_feeds(tokenizer, heldout_text):
    texts = heldout_passages(heldout_text, limit=16)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def test_export_is_opset21_ir10_with_layernorm_nodes(minilm_onnx):
    model = onnx.load(str(minilm_onnx))
    assert model.ir_version == 10
    assert model.opset_import[0].version >= 21
    assert sum(n.op_type == "LayerNormalization" for n in model.graph.node) == 13
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert minilm_onnx.with_suffix(".fx.txt").read_text().startswith("class GraphModule")


def test_lae_fold_keeps_real_outputs(minilm_onnx, tokenizer, calib_text, heldout_feeds):
    model = onnx.load(str(minilm_onnx))
    calib = from_text(calib_text, tokenizer, 256, 16, 8)
    cfg = Config(recipe=PAPER, static_bound=1.0, dynamic_bound=1e9, progress=False)  # fold LAE wherever it can go
    state, folded = run_until(model, calib, cfg, "fold_equalization")
    lae = [p for p in state.plan.values() if p.scheme == "lae"]
    assert len(lae) >= 24   # q/k/v (post-LN, compensated residual) and FFN-up of every layer
    ref = session(model).run(None, heldout_feeds)[0]
    out = session(folded).run(None, heldout_feeds)[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_qdq_model_is_valid_and_its_weights_are_the_reference_int4(minilm_onnx, calib_text, tmp_path, heldout_feeds):
    result = quantize(minilm_onnx, calib_text, Config(recipe=PAPER, **SMALL))
    path = result.save(tmp_path / "minilm.w4a8.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    out = session(path).run(None, heldout_feeds)[0]
    assert np.all(np.isfinite(out))
    schemes = {row["scheme"] for row in result.layers}
    assert {"static", "lae", "dynamic"} <= schemes, schemes

    # Each emitted INT4 weight, dequantized by onnx's ReferenceEvaluator, is the numpy INT4 of the original
    # weight (times s for LAE layers, with s read back as original gamma / folded gamma).
    float_model, quantized = onnx.load(str(minilm_onnx)), onnx.load(str(path))
    original = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    inits = {i.name: i for i in quantized.graph.initializer}
    nodes = {n.name: n for n in quantized.graph.node}
    orig_weight = {n.name: n.input[1] for n in float_model.graph.node if n.op_type == "MatMul"}
    ln_gamma = {n.name: n.input[1] for n in float_model.graph.node if n.op_type == "LayerNormalization"}
    new_gamma = {n.name: n.input[1] for n in quantized.graph.node if n.op_type == "LayerNormalization"}
    for row in result.layers:
        dq = nodes[row["name"] + ".weight_dq"]
        sub = onnx.helper.make_graph([dq], "dq", [], [onnx.helper.make_tensor_value_info(dq.output[0], 1, None)],
                                     [inits[name] for name in dq.input])
        (w_dq,) = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=[onnx.helper.make_opsetid("", 21)])).run(None, {})
        w = original[orig_weight[row["name"]]].astype(np.float64)
        if row["scheme"] == "lae":
            ln = row["producer"].split("'")[1]
            s = original[ln_gamma[ln]].astype(np.float64) / numpy_helper.to_array(inits[new_gamma[ln]]).astype(np.float64)
            w = w * s[:, None]
        np.testing.assert_allclose(w_dq, C.ref_int4(w, 128), rtol=1e-5, atol=1e-6, err_msg=row["name"])


def test_fptq_beats_naive_w4a8_on_heldout_embeddings(minilm_onnx, tokenizer, calib_text, heldout_text):
    texts = heldout_passages(heldout_text, limit=200)
    ref = sentence_embeddings(session(minilm_onnx), tokenizer, texts)
    scores = {}
    for recipe in ("fptq", "naive-w4a8"):
        model = quantize(minilm_onnx, calib_text, Config(recipe=recipe, **SMALL)).model
        scores[recipe] = embedding_agreement(ref, sentence_embeddings(session(model), tokenizer, texts))
    # cosine distance to the float embeddings: FPTQ's must be clearly (>= 10%) smaller than naive's
    assert 1 - scores["fptq"].mean_cosine < 0.9 * (1 - scores["naive-w4a8"].mean_cosine), scores
    assert scores["fptq"].min_cosine > scores["naive-w4a8"].min_cosine, scores
