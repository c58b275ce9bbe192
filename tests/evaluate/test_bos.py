"""BOS-correct evaluation, calibration and generation (issue 15): with a tokenizer that adds BOS (as
LLaMA-3's and Gemma's do), every eval window, calibration window and prompt starts with it, and the
JSON and the report say so. The tokenizer is built here (a word-level `tokenizers` model with a
"<s> $A" template), so the test needs no download."""
import json

import numpy as np
import pytest
from onnx import numpy_helper

import bad_models as B
from fptq_graph.calibration import leading_bos, windows_of
from fptq_graph.cli import main

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("bos") / "tok"
    tok.save_pretrained(str(folder))
    return folder, tok


@pytest.fixture
def text(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS, 400)))
    return path


def test_leading_bos_reads_the_tokenizers_own_setting(bos_tokenizer):
    _, tok = bos_tokenizer
    assert leading_bos(tok) == 1
    ids = np.arange(2, 32)
    calib = windows_of(ids, 8, 3, 2, "t", bos=1)
    assert calib.tokens.shape == (3, 8) and np.all(calib.tokens[:, 0] == 1)
    assert calib.tokens[:, 1:].reshape(-1).tolist() == list(range(2, 23)) and "BOS 1" in calib.source


def _reference_perplexity(model_path, ids: np.ndarray, seq_len: int) -> float:
    """numpy float64 forward of bad_models.token_model on BOS-prefixed windows, scoring every text token."""
    import onnx

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(str(model_path)).graph.initializer}
    body = seq_len - 1
    nll, count = 0.0, 0
    for start in range(0, len(ids) // body * body, body):
        window = np.concatenate([[1], ids[start:start + body]])
        logits = w["emb"][window] @ w["w_hidden"] @ w["w_head"]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(seq_len - 1), window[1:]].sum()
        count += seq_len - 1
    return float(np.exp(nll / count))


def test_eval_prefixes_every_window_with_bos(bos_tokenizer, text, tmp_path):
    folder, tok = bos_tokenizer
    model = tmp_path / "m.onnx"
    B.save(B.token_model(vocab=len(WORDS) + 2), model)
    out = tmp_path / "ppl.json"
    assert main(["eval", str(model), "--text", str(text), "--tokenizer", str(folder), "--seq-len", "16",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    ids = np.array(tok(text.read_text(), add_special_tokens=False)["input_ids"])
    assert got["bos"] == 1 and got["windows"] == len(ids) // 15 and got["tokens_scored"] == got["windows"] * 15
    assert got["perplexity"] == pytest.approx(_reference_perplexity(model, ids, 16), rel=1e-5)


def test_calibration_windows_start_with_bos(bos_tokenizer, text, tmp_path):
    folder, _ = bos_tokenizer
    model = tmp_path / "m.onnx"
    B.save(B.token_model(vocab=len(WORDS) + 2), model)
    report = tmp_path / "r.json"
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(text), "--tokenizer", str(folder),
                 "--seq-len", "16", "--calib-samples", "4", "--group-size", "8", "--report", str(report), "-q"]) == 0
    assert "each window starts with BOS 1" in json.loads(report.read_text())["calibration"]


def test_generate_prompt_starts_with_bos(bos_tokenizer, tmp_path, capsys, monkeypatch):
    import fptq_graph.generate as generate

    folder, _ = bos_tokenizer
    model = tmp_path / "m.onnx"
    B.save(B.token_model(vocab=len(WORDS) + 2), model)
    seen = []
    real = generate.greedy_generate

    def spy(sess, prompt_ids, *args, **kwargs):
        seen.append(list(prompt_ids))
        return real(sess, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(generate, "greedy_generate", spy)
    assert main(["generate", str(model), "--prompt", "w3 w4", "--tokenizer", str(folder), "--max-new-tokens", "2"]) == 0
    assert seen == [[1, 5, 6]]


def test_perplexity_holds_a_few_rows_of_float64_logits_not_the_window():
    """eval's log-softmax a few rows at a time: the same numbers as the whole-window float64 form, with
    float64 temporaries bounded by the chunk (measured with tracemalloc: below the window's float32
    logits, where the whole-window form took 3.5x them)."""
    import tracemalloc

    from fptq_graph.evaluate import target_log_probs

    rng = np.random.default_rng(10)
    logits = (rng.standard_normal((256, 32768)) * 4).astype(np.float32)
    targets = rng.integers(0, 32768, 256)
    whole = logits.astype(np.float64)
    whole -= whole.max(axis=-1, keepdims=True)
    reference = (whole - np.log(np.exp(whole).sum(axis=-1, keepdims=True)))[np.arange(256), targets]
    del whole
    tracemalloc.start()
    got = target_log_probs(logits, targets)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(got, reference)
    assert peak < logits.nbytes / 2, (peak, logits.nbytes)
