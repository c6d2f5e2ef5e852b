"""lecture3's data: the stdlib / files / tfds sources, tokenizers and the deterministic grain pipeline.

    cfg = DataConfig(source="stdlib", tokenizer="bytes", seq_len=256)
    it = make_train_iterator(cfg, batch_size=16)      # endless, checkpointable; next(it) -> dict of arrays
    val = validation_batches(cfg, batch_size=16)      # the fixed validation set
"""

from lecture3.data.config import DataConfig, DataError
from lecture3.data.pipeline import global_batch, make_train_iterator, validation_batches
from lecture3.data.stats import corpus_stats
from lecture3.data.tokenizer import Tokenizer, load_tokenizer

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
