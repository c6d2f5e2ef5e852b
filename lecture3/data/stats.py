"""Corpus statistics: documents, bytes, tokens and bytes per token of each split, and a decoded sample."""

from __future__ import annotations

from typing import Any

import numpy as np

from lecture3.data import rows as packing
from lecture3.data.config import DataConfig
from lecture3.data.pipeline import train_rows, validation_packing, validation_rows
from lecture3.data.sources import open_corpus
from lecture3.data.token_cache import cached_tokens, tokenize_records, use_token_cache
from lecture3.data.tokenizer import load_tokenizer

_SAMPLE_CHARS = 400


def corpus_stats(cfg: DataConfig, *, max_documents: int | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Builds the corpus, tokenizer and token cache if needed, then counts documents, bytes and tokens.

    A corpus read through the token cache is counted whole from it; any other is tokenized here,
    its first `max_documents` per split if given.
    """
    corpus = open_corpus(cfg, progress=progress)
    tokenizer = load_tokenizer(cfg, progress=progress)
    empty = {"documents": 0, "bytes": 0, "tokens": 0, "invalid_utf8_replaced": 0}
    if use_token_cache(cfg, corpus):
        counts = cached_tokens(cfg, corpus, tokenizer, progress=progress)[1]
    else:
        counts = {}
        for role in ("train", "validation"):
            if corpus.splits[role] is None:
                continue
            records = corpus.records(role, max_documents)
            if progress:
                from tqdm import tqdm

                n = len(corpus.source(role))
                records = tqdm(records, total=n if max_documents is None else min(n, max_documents),
                               desc=f"tokenizing {role}", unit="doc")
            c = counts[role] = dict(empty)
            for ids, n_bytes, replaced in tokenize_records(records, tokenizer, corpus.text_feature):
                c["documents"] += 1
                c["bytes"] += n_bytes
                c["tokens"] += len(ids)
                c["invalid_utf8_replaced"] += replaced
    stats: dict[str, Any] = {"source": cfg.source, "tokenizer": cfg.tokenizer,
                             "vocab_size": tokenizer.vocab_size}
    for role in ("train", "validation"):
        c = {**empty, **counts.get(role, {})}
        stats[role] = {**c, "bytes_per_token": c["bytes"] / c["tokens"] if c["tokens"] else float("nan")}
    # Building the fixed validation set checks that it holds at least one row of seq_len + 1.
    stats["validation_sequences"] = len(validation_rows(cfg, corpus, tokenizer)["inputs"])
    stats["validation_coverage"] = validation_coverage(cfg, corpus, tokenizer)
    stats["batch_documents"] = batch_documents(cfg, corpus, tokenizer)
    first = next(corpus.texts("train", 1), "")
    ids = tokenizer.encode(first[:_SAMPLE_CHARS])
    stats["sample"] = tokenizer.decode(ids)
    stats["sample_tokens"] = len(ids)
    return stats


def batch_documents(cfg: DataConfig, corpus, tokenizer, batch_size: int = 16, n_batches: int = 100) -> float | None:
    """Mean number of distinct documents a training batch of `batch_size` rows draws from, over the first
    `n_batches` batches of seed `cfg.seed` (None for a streamed source, whose rows do not say)."""
    if not use_token_cache(cfg, corpus):
        return None
    it = iter(train_rows(cfg, corpus, tokenizer, batch_size))
    counts = []
    for _ in range(n_batches):
        counts.append(len(_documents(next(it)["documents"])))
    return sum(counts) / len(counts)


def _documents(spans) -> set[int]:
    """The documents rows touch, from each row's (first, last) document."""
    return {d for first, last in spans for d in range(int(first), int(last) + 1)}


def validation_coverage(cfg: DataConfig, corpus, tokenizer) -> dict[str, Any]:
    """How much of the validation split the validation set covers: its share of the split's tokens, and
    the documents it touches against those longer than one row."""
    packed = validation_packing(cfg, corpus, tokenizer)
    picked = packing.validation_indices(packed, cfg.val_sequences)
    touched = _documents(packed.span(int(i)) for i in picked)
    sizes = packed.offsets[1:] - packed.offsets[:-1] + 1  # with the <eod>
    long = set(np.flatnonzero(sizes > packed.row_len).tolist())
    return {"rows": len(picked), "token_share": len(picked) * packed.row_len / max(packed.length, 1),
            "documents": len(sizes), "documents_touched": len(touched),
            "long_documents": len(long), "long_documents_touched": len(long & touched)}
