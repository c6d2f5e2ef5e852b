"""Tokenized documents, cached on disk per (corpus, tokenizer) and read back memory-mapped.

A BPE encodes about a megabyte of text per second per core, too slow to do on the fly at training
speed on a small host, so corpora that are small enough (the local sources, tfds datasets under
1 GiB, or as `DataConfig.cache_tokens` says) are tokenized once and stored as one flat token file
plus document offsets per split:

    <cache>/tokens/<corpus>-<key>/{train,validation}.tokens   flat ids (uint16 when the vocab fits)
                                  {train,validation}.offsets  int64 [documents + 1]
                                  meta.json                   dtype and per-split statistics

The folder is written under a temporary name and renamed when complete. Larger tfds sources
(c4 is hundreds of GB) are tokenized in the pipeline instead, where grain workers parallelise it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from lecture3.data.config import DataConfig, build_atomically
from lecture3.data.sources import Corpus, text_of
from lecture3.data.tokenizer import Tokenizer

# Bump when the cache layout changes: it invalidates every cached tokenization.
TOKEN_CACHE_VERSION = 1
_CHUNK = 256  # documents per encode_batch call: parallel for `tokenizers`, bounded memory
AUTO_CACHE_MAX_BYTES = 1 << 30  # tfds corpora up to this size are tokenized once, when not told


def use_token_cache(cfg: DataConfig, corpus: Corpus) -> bool:
    """Whether `corpus` is read from the token cache (else tokenized in the pipeline)."""
    if cfg.cache_tokens is not None:
        return cfg.cache_tokens
    return corpus.local or corpus.num_bytes <= AUTO_CACHE_MAX_BYTES


def tokenize_records(records: Iterable[dict], tokenizer: Tokenizer,
                     feature: str) -> Iterator[tuple[np.ndarray, int, int]]:
    """(token ids, UTF-8 bytes, invalid UTF-8 replaced) for each record, encoded in parallel chunks."""
    records = iter(records)
    while chunk := list(itertools.islice(records, _CHUNK)):
        texts = [text_of(r[feature]) for r in chunk]
        for text, ids, r in zip(texts, tokenizer.encode_batch(texts), chunk, strict=True):
            yield ids, len(text.encode("utf-8")), int(r.get("replaced", 0))


class TokenizedSplit:
    """One cached split as a random-access source: item i is {"tokens": document i's ids + <eod>}."""

    def __init__(self, folder: str, role: str, dtype: str, eos_id: int):
        self.folder, self.role, self.dtype, self.eos_id = folder, role, dtype, eos_id
        self._tokens = self._offsets = None

    def _open(self) -> None:
        base = os.path.join(self.folder, self.role)
        self._offsets = np.fromfile(base + ".offsets", np.int64)
        size = self._offsets[-1]
        self._tokens = np.memmap(base + ".tokens", self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __getstate__(self):  # grain workers reopen the files instead of receiving a copy
        return {**self.__dict__, "_tokens": None, "_offsets": None}

    def __len__(self) -> int:
        if self._offsets is None:
            self._open()
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._offsets is None:
            self._open()
        start, end = self._offsets[index], self._offsets[index + 1]
        out = np.empty(end - start + 1, np.int32)
        out[:-1] = self._tokens[start:end]
        out[-1] = self.eos_id
        return {"tokens": out}

    def packed(self, row_len: int):
        """The split as one stream of documents + <eod>, in rows of `row_len` (`rows.PackedRows`)."""
        from lecture3.data.rows import PackedRows

        if self._offsets is None:
            self._open()
        return PackedRows(self._tokens, self._offsets, self.eos_id, row_len)

    @property
    def num_tokens(self) -> int:
        """Tokens in the split, not counting the <eod> after each document."""
        if self._offsets is None:
            self._open()
        return int(self._offsets[-1])


def _write_split(folder: str, role: str, corpus: Corpus, tokenizer: Tokenizer, dtype: str,
                 progress: bool) -> dict:
    records = corpus.records(role)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, total=len(corpus.source(role)), desc=f"tokenizing {role}", unit="doc")
    offsets, stats = [0], {"documents": 0, "bytes": 0, "tokens": 0, "invalid_utf8_replaced": 0}
    with open(os.path.join(folder, role + ".tokens"), "wb") as f:
        for ids, n_bytes, replaced in tokenize_records(records, tokenizer, corpus.text_feature):
            f.write(ids.astype(dtype).tobytes())
            offsets.append(offsets[-1] + len(ids))
            stats["documents"] += 1
            stats["bytes"] += n_bytes
            stats["invalid_utf8_replaced"] += replaced
    np.asarray(offsets, np.int64).tofile(os.path.join(folder, role + ".offsets"))
    stats["tokens"] = offsets[-1]
    return stats


def cached_tokens(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, *,
                  progress: bool = False) -> tuple[dict[str, TokenizedSplit], dict]:
    """The cached tokenization of a local corpus (built first if missing): splits and statistics."""
    key = hashlib.sha256(f"{TOKEN_CACHE_VERSION}|{corpus.fingerprint}|{tokenizer.fingerprint}".encode())
    root = os.path.join(cfg.cache_dir, "tokens")
    folder = os.path.join(root, f"{corpus.fingerprint}-{key.hexdigest()[:16]}")
    if not os.path.isdir(folder):
        with build_atomically(folder) as tmp:
            dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "int32"
            roles = [r for r in ("train", "validation") if corpus.splits[r] is not None]
            stats = {r: _write_split(tmp, r, corpus, tokenizer, dtype, progress) for r in roles}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"dtype": dtype, "tokenizer": tokenizer.name, "stats": stats}, f)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    splits = {r: TokenizedSplit(folder, r, meta["dtype"], tokenizer.eos_id) for r in meta["stats"]}
    return splits, meta["stats"]
