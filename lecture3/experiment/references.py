"""The references every report of protocol v2 states: what a count bigram and a unigram score on the
validation rows the models are scored on.

    bigram   interpolated Kneser-Ney (Kneser & Ney 1995; Chen & Goodman 1998, "interpolated KN"), absolute
             discount D = 0.75 at both orders, fitted on the whole training split as one token stream
             (its documents in stored order, each followed by its <eod>):

                 P(w | v)  = max(c(v w) - D, 0) / c(v)  +  D · N1+(v •) / c(v) · P_cont(w)
                 P_cont(w) = max(N1+(• w) - D, 0) / N1+(• •)  +  D · |{w : N1+(• w) > 0}| / N1+(• •) · 1/V

             c(v w) counts the pair in the stream, c(v) = Σ_w c(v w), N1+(v •) the distinct tokens after v,
             N1+(• w) the distinct tokens before w, N1+(• •) the distinct pairs. A history never seen in
             training (c(v) = 0) predicts P_cont(w). The continuation unigram is itself interpolated with
             the uniform distribution over the V ids, so no token has probability 0.
    unigram  the entropy of the validation targets' own frequencies (`lecture3.training.unigram_entropy`): the
             best loss any unigram model gets there (fitted on validation itself, so a floor for unigrams)

Both are scored on exactly the rows `lecture3.data.validation_batches(cfg, batch_size)` gives the models:
each target given its input where loss_mask > 0, in mean nats per token. The result is cached as JSON under
`<cache>/references/`, keyed by the corpus and tokenizer fingerprints, seq_len and the validation rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

DISCOUNT = 0.75
REFERENCES_VERSION = 1  # bump when the estimator or what is scored changes: it invalidates the cache
DENSE_MAX_CELLS = 1 << 24  # V x V counts up to this size are one bincount (V = 2048: 4M cells); else sparse


def pair_counts(prev: np.ndarray, nxt: np.ndarray, vocab: int,
                dense_max_cells: int = DENSE_MAX_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (v, w) as sorted keys v·V + w, and how often each occurs."""
    keys = prev.astype(np.int64) * vocab + nxt.astype(np.int64)
    if vocab * vocab <= dense_max_cells:
        dense = np.bincount(keys, minlength=vocab * vocab)
        seen = np.flatnonzero(dense)
        return seen, dense[seen]
    return np.unique(keys, return_counts=True)


def kneser_ney_log_probs(stream: np.ndarray, vocab: int, inputs: np.ndarray, targets: np.ndarray,
                         discount: float = DISCOUNT, dense_max_cells: int = DENSE_MAX_CELLS) -> np.ndarray:
    """log P(target | input) of each (input, target) pair under the interpolated Kneser-Ney bigram
    fitted on `stream` (the formula in the module docstring)."""
    d = discount
    prev, nxt = stream[:-1].astype(np.int64), stream[1:].astype(np.int64)
    keys, counts = pair_counts(prev, nxt, vocab, dense_max_cells)
    history = np.bincount(prev, minlength=vocab)  # c(v)
    after = np.bincount(keys // vocab, minlength=vocab)  # N1+(v •)
    before = np.bincount(keys % vocab, minlength=vocab)  # N1+(• w)
    n_pairs = len(keys)  # N1+(• •)
    p_cont = (np.maximum(before - d, 0.0) + d * np.count_nonzero(before) / vocab) / n_pairs

    v, w = np.asarray(inputs, np.int64), np.asarray(targets, np.int64)
    query = v * vocab + w
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    c_vw = np.where(keys[at] == query, counts[at], 0)
    c_v = history[v]
    seen = c_v > 0
    c_safe = np.where(seen, c_v, 1)
    p = np.where(seen, (np.maximum(c_vw - d, 0.0) + d * after[v] * p_cont[w]) / c_safe, p_cont[w])
    return np.log(p)


def scored_pairs(batches: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of every validation position that counts in the loss (loss_mask > 0)."""
    keep = [b["loss_mask"] > 0 for b in batches]
    inputs = np.concatenate([b["inputs"][m] for b, m in zip(batches, keep, strict=True)])
    targets = np.concatenate([b["targets"][m] for b, m in zip(batches, keep, strict=True)])
    return inputs, targets


def of_stream(stream: np.ndarray, batches: Sequence[dict], vocab: int, discount: float = DISCOUNT) -> dict:
    """The references of a training stream scored on validation batches (no cache)."""
    from lecture3.training import unigram_entropy

    inputs, targets = scored_pairs(batches)
    bigram = -float(np.mean(kneser_ney_log_probs(stream, vocab, inputs, targets, discount)))
    return {"bigram_loss": bigram, "unigram_entropy": unigram_entropy(list(batches)),
            "bigram": f"interpolated Kneser-Ney count bigram, absolute discount {discount}, fitted on the whole "
                      "training split",
            "validation_tokens": int(len(targets)), "train_tokens": int(len(stream)), "vocab_size": int(vocab)}


def training_stream(cfg) -> tuple[np.ndarray, int]:
    """The whole training split as one stream (documents in stored order, each with its <eod>) and V."""
    from lecture3.data.pipeline import documents
    from lecture3.data.sources import open_corpus
    from lecture3.data.tokenizer import load_tokenizer

    corpus, tokenizer = open_corpus(cfg), load_tokenizer(cfg)
    docs = documents(cfg, corpus, tokenizer, "train")
    return np.concatenate([docs[i]["tokens"] for i in range(len(docs))]), tokenizer.vocab_size


def _cache_key(cfg, batches: Sequence[dict], discount: float) -> str:
    from lecture3.data.sources import open_corpus
    from lecture3.data.tokenizer import load_tokenizer

    h = hashlib.sha256(json.dumps([REFERENCES_VERSION, open_corpus(cfg).fingerprint,
                                   load_tokenizer(cfg).fingerprint, cfg.seq_len, discount]).encode())
    for b in batches:  # the validation rows themselves: any change to what is scored is a new entry
        for k in ("inputs", "targets", "loss_mask"):
            h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()[:20]


def references(data_cfg, batch_size: int = 16, discount: float = DISCOUNT) -> dict:
    """The bigram's validation loss and the unigram entropy (nats/token) on the rows the models of
    `data_cfg` are scored on, computed once and cached (see the module docstring)."""
    from lecture3.data.pipeline import validation_batches

    batches = validation_batches(data_cfg, batch_size)
    path = os.path.join(data_cfg.cache_dir, "references", f"{_cache_key(data_cfg, batches, discount)}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    stream, vocab = training_stream(data_cfg)
    out = {**of_stream(stream, batches, vocab, discount), "source": data_cfg.source,
           "tokenizer": data_cfg.tokenizer, "seq_len": data_cfg.seq_len}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return out
