"""`DataConfig`, the one frozen config of the data subsystem, and `DataError`, its user-error type.

Paths are not checked here: a config may be written on one machine and run on another, so missing
files, empty globs and unknown datasets are reported as `DataError` when the data is first opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from lecture3.errors import Lecture3Error

# `bpe:N`: a byte-level BPE of N tokens. Below 259 it could not hold the 256 bytes and its specials.
_BPE = re.compile(r"bpe:(\d+)")
MIN_BPE_VOCAB = 259
TOKENIZER_FILE_SUFFIXES = (".json", ".model")


class DataError(Lecture3Error):
    """Bad user input to the data subsystem: the message names the problem and the fix."""


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"DataConfig.{field}={value!r} is invalid: expected {allowed}")


def _described(default, kind: str, help: str):
    """A field described as `lecture3.config.option` describes one (that module imports this one, so the few
    data fields build the same metadata here): its kind and its one-line help."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it becomes tokens, and how it is packed, shuffled and held out."""

    source: str = _described(
        "stdlib", "training", "stdlib (this Python's standard library) | files:GLOB | tfds:NAME[:SPLIT]")
    tokenizer: str = _described(
        "bytes", "training", "bytes | bpe:N (trained on the train split) | path to tokenizer.json / .model")
    seq_len: int = _described(
        256, "training", "tokens per training row; rows hold seq_len + 1 so targets are inputs shifted by one")
    data_dir: str | None = _described(
        None, "implementation", "built data and tokenizers; None: $LECTURE3_DATA_DIR or ~/.cache/lecture3")
    tfds_data_dir: str | None = _described(
        None, "implementation", "prepared tfds datasets; None: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    tfds_val_split: str | None = _described(
        None, "training", 'held-out split of a tfds: source; None: "validation", else "test"')
    seed: int = _described(0, "training", "shuffle seed; documents are reshuffled every epoch from it")
    val_sequences: int = _described(
        64, "training", "rows of seq_len + 1 tokens in the fixed validation set, spread over the split")
    val_fraction: float = _described(
        0.03, "training", "share of local documents hashed (by relative path) into validation")
    shuffle_buffer: int = _described(
        4096, "training", "rows a streamed (not token-cached) source shuffles together (grain window)")
    num_workers: int = _described(
        0, "training", "grain worker processes (0: in this process); the batch order depends on it")
    cache_tokens: bool | None = _described(
        None, "training", "tokenize once into the cache; None: local sources and tfds under 1 GiB")

    def __post_init__(self):
        _check(
            self.source == "stdlib"
            or (self.source.startswith("files:") and len(self.source) > len("files:"))
            or (self.source.startswith("tfds:") and len(self.source) > len("tfds:")),
            "source", self.source, "stdlib, files:GLOB or tfds:NAME[:SPLIT]",
        )
        tok = self.tokenizer
        bpe = _BPE.fullmatch(tok)
        _check(
            tok == "bytes" or (bpe is not None and int(bpe.group(1)) >= MIN_BPE_VOCAB)
            or (not tok.startswith("bpe:") and tok.endswith(TOKENIZER_FILE_SUFFIXES)),
            "tokenizer", tok,
            f"bytes, bpe:N with N >= {MIN_BPE_VOCAB}, or a path ending in .json (tokenizers) or .model "
            "(sentencepiece)",
        )
        _check(self.seq_len >= 1, "seq_len", self.seq_len, "an integer >= 1")
        _check(self.val_sequences >= 1, "val_sequences", self.val_sequences, "an integer >= 1")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a number in (0, 1)")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "an integer >= 1")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        for name in ("data_dir", "tfds_data_dir", "tfds_val_split"):
            value = getattr(self, name)
            _check(value is None or value != "", name, value, "None or a non-empty string")

    @property
    def cache_dir(self) -> str:
        """The folder that holds built datasets and trained tokenizers."""
        path = self.data_dir or os.environ.get("LECTURE3_DATA_DIR") or "~/.cache/lecture3"
        return os.path.abspath(os.path.expanduser(path))


@contextlib.contextmanager
def build_atomically(final: str, prefix: str = ".tmp-") -> Iterator[str]:
    """A hidden temporary folder beside `final`, renamed to `final` only when the block completes.

    An error or an interrupt leaves nothing half-built; a concurrent builder that finished first wins.
    """
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
