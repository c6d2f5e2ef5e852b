"""The grain pipeline: documents -> tokens -> packed rows -> batches of model inputs.

A source read through the token cache (the local sources, tfds datasets that fit it):

    the split's documents + <eod>, in stored order, packed into rows of seq_len + 1   (rows.PackedRows)
      -> the rows of the WHOLE split shuffled with the seed, reshuffled every epoch, repeated
      -> this process's rows: every process_count-th (disjoint; together each global batch)
      -> batch of B = batch_size // process_count rows

so a batch's rows come from anywhere in the corpus (v1 packed consecutive rows of shuffled documents:
most batches were 16 rows of one file). A streamed source (a large tfds dataset, tokenized here):

    documents (this process's shard, reshuffled every epoch, repeated) -> tokens + <eod>
      -> ConcatThenSplit into rows of seq_len + 1 -> a window shuffle of `shuffle_buffer` rows -> batch

and both end in inputs / targets (shifted by one) / segment_ids / positions / loss_mask. Every stage is
a grain dataset, so the iterator's `get_state()` is a small dict that `set_state` turns back into
exactly the next batch (and orbax saves through `grain.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping

import grain
import numpy as np

from lecture3.data import rows as packing
from lecture3.data.config import DataConfig, DataError
from lecture3.data.sources import Corpus, open_corpus, text_of
from lecture3.data.token_cache import cached_tokens, use_token_cache
from lecture3.data.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]


def _absl_flags_parsed(*_) -> None:
    # grain reads its absl flags (in this process and in its workers), which only an absl `app.run`
    # would have parsed; without this, multiprocessing fails with UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TokenizeDocument(grain.transforms.Map):
    """A tfds record -> {"tokens": ids of its text followed by <eod>}."""

    def __init__(self, tokenizer: Tokenizer, feature: str):
        self.tokenizer, self.feature = tokenizer, feature

    def map(self, record: Mapping) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode_array(text_of(record[self.feature]))
        return {"tokens": np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)}


class ModelFields(grain.transforms.Map):
    """Packed rows of seq_len + 1 -> the model's inputs, shifted targets and masks."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def map(self, rows: Mapping[str, np.ndarray]) -> Batch:
        segments = rows["tokens_segment_ids"].astype(np.int32)  # [B, T+1], 0 = padding
        tokens = np.where(segments > 0, rows["tokens"], self.pad_id).astype(np.int32)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segments[:, :-1],
            # grain restarts positions at each document and at each row start, as a model expects.
            "positions": rows["tokens_positions"][:, :-1].astype(np.int32),
            "loss_mask": (segments[:, 1:] > 0).astype(np.float32),
        }


def documents(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, role: str) -> grain.MapDataset:
    """The documents of `role` as {"tokens": ids + <eod>}, random access, in their stored order."""
    corpus.require(role)
    if use_token_cache(cfg, corpus):
        return grain.MapDataset.source(cached_tokens(cfg, corpus, tokenizer)[0][role])
    return grain.MapDataset.source(corpus.source(role)).map(TokenizeDocument(tokenizer, corpus.text_feature))


def pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Concatenates token arrays and splits them into rows of `seq_len + 1` (the last row padded)."""
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})


def token_rows(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, role: str) -> packing.PackedRows:
    """The rows of `role` packed from the token cache (random access)."""
    corpus.require(role)
    return cached_tokens(cfg, corpus, tokenizer)[0][role].packed(cfg.seq_len + 1)


def train_rows(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, local_batch: int, *,
               process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
    """This process's training rows in batches, before `ModelFields` (rows from the token cache also carry
    `documents`, the first and last document each row touches)."""
    if use_token_cache(cfg, corpus):
        rows = token_rows(cfg, corpus, tokenizer, "train")
        if len(rows) < process_count:
            raise DataError(f"process {process_index} of {process_count} gets no training rows: the corpus "
                            f"packs into {len(rows)}; use more documents, a shorter seq_len or fewer processes")
        # shuffle() draws a new permutation for every epoch of repeat(); each process takes every
        # process_count-th row, so the processes' rows of one step are the global batch's rows.
        ds = grain.MapDataset.source(rows).shuffle(seed=cfg.seed).repeat(num_epochs)
        return ds[process_index::process_count].batch(local_batch, drop_remainder=False)
    docs = documents(cfg, corpus, tokenizer, "train")
    # Each process keeps every process_count-th document: disjoint shards that together cover all.
    shard = docs[process_index::process_count]
    if len(shard) == 0:
        raise DataError(f"process {process_index} of {process_count} gets no training documents: the "
                        f"corpus has only {len(docs)}; use more documents or fewer processes")
    # repeat() reseeds the shuffle every epoch, so each epoch has its own order.
    ds = pack(shard.shuffle(seed=cfg.seed).repeat(num_epochs).to_iter_dataset(), cfg.seq_len)
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=cfg.shuffle_buffer, seed=cfg.seed)
    return ds.batch(local_batch, drop_remainder=False)


def train_dataset(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, local_batch: int, *,
                  process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> grain.IterDataset:
    """The training pipeline of one process as a grain dataset (endless unless `num_epochs`)."""
    ds = train_rows(cfg, corpus, tokenizer, local_batch, process_index=process_index,
                    process_count=process_count, num_epochs=num_epochs).map(ModelFields(tokenizer.pad_id))
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        if isinstance(ds, grain.MapDataset):
            ds = ds.to_iter_dataset()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers),
                            worker_init_fn=_absl_flags_parsed)
    return ds


def local_batch_size(batch_size: int, process_count: int) -> int:
    """This process's share of the global batch."""
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"batch size {batch_size} does not split over {process_count} processes; use a "
                        f"positive multiple of {process_count}")
    return batch_size // process_count


def make_train_iterator(cfg: DataConfig, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's batches of the global `batch_size`.

    `next(it)` gives `inputs`, `targets`, `segment_ids`, `positions` (int32 [b, seq_len]) and
    `loss_mask` (float32 [b, seq_len]) with b = batch_size // process_count. `it.get_state()` and
    `it.set_state(state)` save and restore the position; `num_epochs` bounds it (for tests).
    """
    if not 0 <= process_index < process_count:
        raise DataError(f"process index {process_index} is outside 0..{process_count - 1}")
    local = local_batch_size(batch_size, process_count)
    corpus = open_corpus(cfg)
    tokenizer = load_tokenizer(cfg)
    ds = train_dataset(cfg, corpus, tokenizer, local, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs)
    return iter(ds)


# a streamed source's validation set is packed from this many documents per row asked for, spread
# evenly over its validation split (tokenizing a whole split of a large dataset is not affordable)
STREAMED_VAL_DOCS_PER_ROW = 4


def validation_packing(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer) -> packing.PackedRows:
    """The validation split packed into rows: all of it from the token cache; for a streamed source,
    documents at evenly spaced indices of the split (STREAMED_VAL_DOCS_PER_ROW per row asked for)."""
    if use_token_cache(cfg, corpus):
        return token_rows(cfg, corpus, tokenizer, "validation")
    docs = documents(cfg, corpus, tokenizer, "validation")
    k = min(len(docs), STREAMED_VAL_DOCS_PER_ROW * cfg.val_sequences)
    picked = [docs[int(i)]["tokens"][:-1] for i in (np.arange(k) * len(docs)) // max(k, 1)]
    return packing.from_documents(picked, tokenizer.eos_id, cfg.seq_len + 1)


def validation_rows(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer) -> Batch:
    """The fixed validation set: at most `cfg.val_sequences` full rows spread over the whole validation
    split, all of it when that allows (`rows.validation_indices`); the same on every call and machine."""
    packed = validation_packing(cfg, corpus, tokenizer)
    picked = packing.validation_indices(packed, cfg.val_sequences)
    if len(picked) == 0:
        raise DataError(f"seq_len {cfg.seq_len} is longer than the validation set ({packed.length} tokens, a row "
                        f"needs {cfg.seq_len + 1}); lower --data.seq-len or raise --data.val-fraction")
    rows = [packed[int(i)] for i in picked]
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return ModelFields(tokenizer.pad_id).map(stacked)


def validation_batches(cfg: DataConfig, batch_size: int) -> list[Batch]:
    """The fixed validation set in batches of `batch_size`: the same tokens on every call and every machine.
    The last batch is filled up with copies of its first row whose `loss_mask` is 0, so every row counts."""
    if batch_size < 1:
        raise DataError(f"validation batch size {batch_size} is invalid: expected 1 or more")
    corpus, tokenizer = open_corpus(cfg), load_tokenizer(cfg)
    rows = validation_rows(cfg, corpus, tokenizer)
    n = len(rows["inputs"])
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        missing = batch_size - len(batch["inputs"])
        if missing:
            batch = {k: np.concatenate([v, np.repeat(v[:1], missing, axis=0)]) for k, v in batch.items()}
            batch["loss_mask"][-missing:] = 0
        out.append(batch)
    return out


def global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Assembles each process's local batch into global jax arrays on the mesh.

    `sharding` is one `jax.sharding.Sharding` (usually `NamedSharding(mesh, P("data"))`) for every
    key, or a mapping from key to sharding. Each process passes only its own rows.
    """
    import jax

    def pick(key):
        return sharding[key] if isinstance(sharding, Mapping) else sharding

    return {k: jax.make_array_from_process_local_data(pick(k), np.asarray(v)) for k, v in local_batch.items()}
