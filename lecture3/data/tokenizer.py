"""Tokenizers, chosen by `DataConfig.tokenizer`, behind one small interface.

- `bytes`: ids 0..255 are the UTF-8 bytes, then <eod> 256, <pad> 257, <bos> 258 (vocab 259).
- `bpe:N`: a byte-level BPE of N tokens trained with `tokenizers` on the train split, cached in
  `<cache>/tokenizers/` under the corpus fingerprint and N.
- a path to a `tokenizer.json` (Hugging Face `tokenizers`) or a sentencepiece `.model`.

Encoding never produces a special token from text (a document containing "<eod>" stays text), so
`decode(encode(text)) == text` for the byte and BPE tokenizers; `decode` drops special tokens.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from lecture3.data.config import DataConfig, DataError

SPECIALS = ("<eod>", "<pad>", "<bos>")
# End-of-document and padding tokens of common tokenizer files, most specific first.
_EOS_NAMES = ("<eod>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
# Bump when the BPE recipe changes: it invalidates the cached tokenizers.
BPE_VERSION = 1


class Tokenizer:
    """Text <-> token ids. `eos_id` separates documents; `pad_id` fills rows past the data."""

    name: str
    fingerprint: str  # changes whenever the ids of some text may change; keys the token cache
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as an int32 array (no special tokens)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """The ids of `text` (no special tokens)."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_array` of each text; tokenizers that can, do it in parallel."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, with special tokens dropped."""
        raise NotImplementedError


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: exact for any text, 259 ids."""

    name = "bytes"
    fingerprint = "bytes-1"
    vocab_size = 259
    eos_id, pad_id, bos_id = 256, 257, 258

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in np.asarray(list(ids), np.int64).tolist() if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer; pickles by its JSON so grain workers can rebuild it."""

    def __init__(self, json_str: str, name: str):
        from tokenizers import Tokenizer as _Tok

        self.name = name
        self.fingerprint = hashlib.sha256(json_str.encode()).hexdigest()[:16]
        self._json = json_str
        self._tok = _Tok.from_str(json_str)
        self._tok.encode_special_tokens = True  # text that looks like "<eod>" stays text
        eos = _find_token(self._tok.token_to_id, _EOS_NAMES)
        if eos is None:  # a tokenizer without one gets ours, appended after its vocabulary
            self._tok.add_special_tokens(["<eod>"])
            eos = self._tok.token_to_id("<eod>")
        pad = _find_token(self._tok.token_to_id, _PAD_NAMES)
        self.eos_id, self.pad_id = eos, eos if pad is None else pad
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __reduce__(self):
        return HFTokenizer, (self._json, self.name)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; pickles by its serialized proto."""

    def __init__(self, proto: bytes, name: str):
        import sentencepiece as spm

        self.name = name
        self.fingerprint = hashlib.sha256(proto).hexdigest()[:16]
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise DataError(f"sentencepiece model {name!r} has no end-of-sequence id; train it with eos_id "
                            "set, or use --data.tokenizer bytes")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def __reduce__(self):
        return SentencePieceTokenizer, (self._proto, self.name)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _find_token(token_to_id, names: Sequence[str]) -> int | None:
    return next((token_to_id(n) for n in names if token_to_id(n) is not None), None)


def _load_file(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path!r} does not exist; fix --data.tokenizer or use bytes or bpe:N")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".model"):
            return SentencePieceTokenizer(raw, path)
        return HFTokenizer(raw.decode("utf-8"), path)
    except DataError:
        raise
    except Exception as e:  # each library raises its own types for a corrupt file
        kind = "sentencepiece .model" if path.endswith(".model") else "tokenizers tokenizer.json"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file {path!r} is not a valid {kind} ({reason}); replace it, or use "
                        "--data.tokenizer bytes or bpe:N") from None


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> str:
    """Trains a byte-level BPE of `vocab_size` tokens (specials included); returns its JSON."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    # Byte-level without a prefix space and without normalisation, so decoding is exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Its own progress bar would go to stdout; the caller announces the training instead.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok.to_str()


def _load_bpe(cfg: DataConfig, vocab_size: int, progress: bool) -> Tokenizer:
    from lecture3.data.sources import open_corpus

    corpus = open_corpus(cfg, progress=progress)
    key = hashlib.sha256(f"{BPE_VERSION}|{corpus.fingerprint}|{vocab_size}".encode()).hexdigest()[:16]
    folder = os.path.join(cfg.cache_dir, "tokenizers")
    path = os.path.join(folder, f"bpe{vocab_size}-{key}.json")
    if not os.path.isfile(path):
        n = len(corpus.source("train"))
        if progress:
            print(f"training a byte-level BPE of {vocab_size} tokens on {n:,} documents...", file=sys.stderr)
        json_str = train_bpe(corpus.texts("train"), vocab_size, length=n)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json_str)
            os.replace(tmp, path)  # atomic: a reader sees no tokenizer or a whole one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with open(path) as f:
        return HFTokenizer(f.read(), f"bpe:{vocab_size}")


def load_tokenizer(cfg: DataConfig, *, progress: bool = False) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names, training and caching a BPE first if needed."""
    if cfg.tokenizer == "bytes":
        return BytesTokenizer()
    if cfg.tokenizer.startswith("bpe:"):
        return _load_bpe(cfg, int(cfg.tokenizer[len("bpe:"):]), progress)
    return _load_file(os.path.expanduser(cfg.tokenizer))
