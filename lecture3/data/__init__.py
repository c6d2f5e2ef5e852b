"""lecture3's data: the stdlib / files / tfds sources, tokenizers and the deterministic grain pipeline.

    cfg = DataConfig(source="stdlib", tokenizer="bytes", seq_len=256)
    it = make_train_iterator(cfg, batch_size=16)      # endless, checkpointable; next(it) -> dict of arrays
    val = validation_batches(cfg, batch_size=16)      # the fixed validation set
"""

import importlib

from lecture3.data.config import DataConfig, DataError

# the rest on first use (PEP 562): the pipeline and the sources load grain, tfds and jax
_LAZY = {
    "Tokenizer": "lecture3.data.tokenizer",
    "corpus_stats": "lecture3.data.stats",
    "global_batch": "lecture3.data.pipeline",
    "load_tokenizer": "lecture3.data.tokenizer",
    "make_train_iterator": "lecture3.data.pipeline",
    "validation_batches": "lecture3.data.pipeline",
}

__all__ = [
    "DataConfig",
    "DataError",
    "Tokenizer",
    "corpus_stats",
    "global_batch",
    "load_tokenizer",
    "make_train_iterator",
    "validation_batches",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lecture3.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
