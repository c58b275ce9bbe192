"""Accuracy of a quantized model against its float original, through ONNX Runtime.

- Encoders (BERT, MiniLM): sentence embeddings (masked mean pooling, L2-normalized, as
  sentence-transformers does for all-MiniLM-L6-v2), compared by cosine similarity and by whether
  each text's nearest neighbour among the others stays the same.
- Causal LMs: perplexity over non-overlapping windows of held-out text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fptq_graph.runtime import ort_errors
from fptq_graph.calibration import feeds_for, session_inputs
from fptq_graph.errors import FptqError


def heldout_passages(path: str | Path, limit: int | None = None, min_chars: int = 40) -> list[str]:
    """Blank-line separated passages of a text file (docstrings in the bundled data)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    passages = [" ".join(p.split()) for p in text.split("\n\n")]
    passages = [p for p in passages if len(p) >= min_chars]
    if not passages:
        raise FptqError(f"{path}: no passages of at least {min_chars} characters")
    return passages[:limit] if limit else passages


def sentence_embeddings(sess, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128,
                        progress: bool = False, desc: str = "embedding") -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        hidden = sess.run(None, feeds)[0].astype(np.float64)
        mask = enc["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        out.append(pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None))
    return np.concatenate(out)


@dataclass
class EmbeddingAgreement:
    mean_cosine: float
    min_cosine: float
    nn_agreement: float     # fraction of texts whose nearest other text is the same as under the float model

    def as_dict(self) -> dict:
        return {"mean_cosine": self.mean_cosine, "min_cosine": self.min_cosine, "nn_agreement": self.nn_agreement}


def embedding_agreement(reference: np.ndarray, candidate: np.ndarray) -> EmbeddingAgreement:
    cos = np.sum(reference * candidate, axis=1)
    return EmbeddingAgreement(float(cos.mean()), float(cos.min()),
                              float(np.mean(_nearest(reference) == _nearest(candidate))))


def _nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def perplexity(sess, token_ids: np.ndarray, seq_len: int, max_tokens: int | None = None, progress: bool = False,
               bos: int | None = None, inputs=None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens; float64 log-softmax.

    With `bos` (the tokenizer adds one: see calibration.leading_bos), each window is BOS followed by
    seq_len - 1 text tokens and every text token is scored, as Hugging Face's perplexity recipe and
    lm-eval do; a model trained always to see BOS first scores 2-3x worse without it. `max_tokens`
    counts text tokens. `inputs`: the model's input value infos, where they say more than the session
    does (a KV cache's sizes the loader filled in, see exporters/kv_layout)."""
    if seq_len < 2:
        raise FptqError(f"perplexity needs windows of at least 2 tokens, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise FptqError(f"max_tokens must be at least 1, got {max_tokens}")
    ids = np.asarray(token_ids, dtype=np.int64)[: max_tokens]
    body = seq_len - 1 if bos is not None else seq_len
    windows = len(ids) // body
    if windows == 0:
        raise FptqError(f"text has {len(ids)} tokens, shorter than one window of {seq_len} (lower --seq-len)")
    inputs = list(inputs) if inputs is not None else session_inputs(sess)
    nll, count = 0.0, 0
    for w in tqdm(range(windows), desc="perplexity", disable=not progress, unit="window"):
        chunk = ids[w * body:(w + 1) * body]
        if bos is not None:
            chunk = np.concatenate([[bos], chunk])
        chunk = chunk[None]
        logits = ort_errors.run(sess, ["logits"], feeds_for(inputs, chunk), f"perplexity window {w}")[0][0]
        nll -= target_log_probs(logits[: seq_len - 1], chunk[0, 1:]).sum()
        count += seq_len - 1
    return float(np.exp(nll / count))


LOG_SOFTMAX_ROWS = 16   # rows of logits in float64 at a time: 32 MiB of temporaries at a 262144-token vocabulary


def target_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[t])[targets[t]] per row, in float64, LOG_SOFTMAX_ROWS rows at a time: the
    window's logits whole in float64 held two window-sized float64 arrays at once (the logits and their
    exp, then the logits and the log-softmax: 4x the float32 logits, 2 GiB for 512 tokens of a
    262k-token vocabulary, by arithmetic). Each row is computed exactly as the whole-array form did."""
    out = np.empty(len(targets))
    for r0 in range(0, len(targets), LOG_SOFTMAX_ROWS):
        rows = logits[r0:r0 + LOG_SOFTMAX_ROWS].astype(np.float64)
        rows -= rows.max(axis=-1, keepdims=True)
        norm = np.log(np.exp(rows).sum(axis=-1))
        out[r0:r0 + len(rows)] = rows[np.arange(len(rows)), targets[r0:r0 + len(rows)]] - norm
    return out
