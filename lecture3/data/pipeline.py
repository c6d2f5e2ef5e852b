"""The grain pipeline: documents -> tokens -> packed rows -> batches of model inputs.

    documents (this process's shard, reshuffled every epoch, repeated)
      -> tokens + <eod>                                    from the token cache, or encoded here
      -> ConcatThenSplit into rows of seq_len + 1          no token lost, segment ids and positions
      -> batch of B = batch_size // process_count rows
      -> inputs / targets (shifted by one) / segment_ids / positions / loss_mask

Every stage is a grain dataset, so the iterator's `get_state()` is a small dict that `set_state`
turns back into exactly the next batch (and orbax saves through `grain.checkpoint`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import grain
import numpy as np

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


def train_dataset(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer, local_batch: int, *,
                  process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> grain.IterDataset:
    """The training pipeline of one process as a grain dataset (endless unless `num_epochs`)."""
    docs = documents(cfg, corpus, tokenizer, "train")
    # Each process keeps every process_count-th document: disjoint shards that together cover all.
    shard = docs[process_index::process_count]
    if len(shard) == 0:
        raise DataError(f"process {process_index} of {process_count} gets no training documents: the "
                        f"corpus has only {len(docs)}; use more documents or fewer processes")
    # repeat() reseeds the shuffle every epoch, so each epoch has its own order.
    ds = pack(shard.shuffle(seed=cfg.seed).repeat(num_epochs).to_iter_dataset(), cfg.seq_len)
    ds = ds.batch(local_batch, drop_remainder=False).map(ModelFields(tokenizer.pad_id))
    if cfg.num_workers > 0:
        _absl_flags_parsed()
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


def validation_rows(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer) -> Batch:
    """The fixed validation set: the first `cfg.val_sequences` full rows of the validation split."""
    docs = documents(cfg, corpus, tokenizer, "validation")
    ds = pack(docs.to_iter_dataset(), cfg.seq_len)
    # Only full rows, so every validation token is real and counts in the loss.
    rows = [r for r in itertools.islice(ds, cfg.val_sequences) if r["tokens_segment_ids"][-1] > 0]
    if not rows:
        n = sum(len(d["tokens"]) for d in docs)
        raise DataError(f"seq_len {cfg.seq_len} is longer than the validation set ({n} tokens, a row needs "
                        f"{cfg.seq_len + 1}); lower --data.seq-len or raise --data.val-fraction")
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return ModelFields(tokenizer.pad_id).map(stacked)


def validation_batches(cfg: DataConfig, batch_size: int) -> list[Batch]:
    """The fixed validation set in whole batches: the same tokens on every call and every machine."""
    corpus, tokenizer = open_corpus(cfg), load_tokenizer(cfg)
    rows = validation_rows(cfg, corpus, tokenizer)
    n = len(rows["inputs"]) // batch_size
    if batch_size < 1 or n == 0:
        raise DataError(f"the validation set has {len(rows['inputs'])} rows, fewer than one batch of "
                        f"{batch_size}; lower the batch size or raise --data.val-sequences or "
                        "--data.val-fraction")
    return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in rows.items()} for i in range(n)]


def global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Assembles each process's local batch into global jax arrays on the mesh.

    `sharding` is one `jax.sharding.Sharding` (usually `NamedSharding(mesh, P("data"))`) for every
    key, or a mapping from key to sharding. Each process passes only its own rows.
    """
    import jax

    def pick(key):
        return sharding[key] if isinstance(sharding, Mapping) else sharding

    return {k: jax.make_array_from_process_local_data(pick(k), np.asarray(v)) for k, v in local_batch.items()}
