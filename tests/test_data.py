"""The data subsystem: sources, tokenizers, and the deterministic, resumable, sharded grain pipeline.

Every test builds its data from a few small files it writes itself; one test reads the stdlib.
"""

import dataclasses
import os
import random

import numpy as np
import pytest

from lecture3.data import (
    DataConfig,
    DataError,
    corpus_stats,
    global_batch,
    load_tokenizer,
    make_train_iterator,
    validation_batches,
)
from lecture3.data.sources import open_corpus, split_files, stdlib_files
from lecture3.data.text_builder import Lecture3Text

WORDS = ["alpha", "beta", "gamma", "délta", "ε", "naïve", "日本", "🙂", "\t", "\n"]
N_DOCS = 16
SEQ = 32
TRICKY = ["", "a", "héllo wörld 🙂 \x00 \r\n\t  x", "<eod> and <pad> are text here", "\ufffd", "  lead",
          "日本語"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """16 documents of 100-1,500 bytes, each opening with its marker `<doc NN>`."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    for i in range(N_DOCS):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 250)))
        (root / f"doc{i:02d}.txt").write_text(f"<doc {i:02d}> {words}", encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")  # skipped: empty files are not documents
    return root


@pytest.fixture(scope="module")
def cfg(corpus_dir, tmp_path_factory):
    """Small rows and a validation share that holds out a few documents."""
    cache = tmp_path_factory.mktemp("cache")
    return DataConfig(source=f"files:{corpus_dir}/*.txt", data_dir=str(cache), seq_len=SEQ,
                      val_fraction=0.2, val_sequences=8)


def batches(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def texts(cfg, role):
    return list(open_corpus(cfg).texts(role))


@pytest.mark.parametrize("field, value", [
    ("source", "web"), ("source", "files:"), ("tokenizer", "bpe:100"), ("tokenizer", "gpt2"),
    ("seq_len", 0), ("val_sequences", 0), ("val_fraction", 1.0), ("num_workers", -1), ("data_dir", ""),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}=.*expected"):
        DataConfig(**{field: value})


def test_bytes_tokenizer_round_trips_any_text():
    tok = load_tokenizer(DataConfig())
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (259, 256, 257)
    for text in TRICKY:
        ids = tok.encode(text)
        assert max(ids, default=0) < 256 and tok.decode(ids) == text


@pytest.mark.slow
def test_bpe_is_trained_cached_and_round_trips(cfg, tmp_path):
    bpe_cfg = dataclasses.replace(cfg, tokenizer="bpe:300")
    tok = load_tokenizer(bpe_cfg)
    folder = os.path.join(cfg.cache_dir, "tokenizers")
    assert len(os.listdir(folder)) == 1
    assert load_tokenizer(bpe_cfg).fingerprint == tok.fingerprint and len(os.listdir(folder)) == 1
    assert tok.vocab_size <= 300 and tok.eos_id < tok.vocab_size
    for text in [*TRICKY, *texts(cfg, "validation")]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.decode(ids) == text
    assert len(tok.encode(texts(cfg, "train")[0])) < len(texts(cfg, "train")[0].encode())  # it compresses
    # The same tokenizer read back from its tokenizer.json path gives the same ids.
    path = os.path.join(folder, os.listdir(folder)[0])
    from_file = load_tokenizer(DataConfig(tokenizer=path))
    assert from_file.encode(TRICKY[2]) == tok.encode(TRICKY[2]) and from_file.eos_id == tok.eos_id


@pytest.mark.slow
def test_sentencepiece_model_file(corpus_dir, tmp_path):
    import sentencepiece as spm

    prefix = str(tmp_path / "sp")
    files = ",".join(str(p) for p in sorted(corpus_dir.glob("doc*.txt")))
    spm.SentencePieceTrainer.train(input=files, model_prefix=prefix, vocab_size=300, hard_vocab_limit=False,
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2)
    tok = load_tokenizer(DataConfig(tokenizer=prefix + ".model"))
    ids = tok.encode("alpha beta")
    assert tok.decode(ids) == "alpha beta" and tok.eos_id not in ids and 256 < tok.vocab_size <= 300


def test_split_is_by_path_hash_disjoint_and_covering(cfg, corpus_dir):
    corpus = open_corpus(cfg)
    paths = {role: [r["path"].decode() for r in corpus.records(role)] for role in ("train", "validation")}
    assert paths["train"] and paths["validation"]
    assert not set(paths["train"]) & set(paths["validation"])
    assert sorted(paths["train"] + paths["validation"]) == [f"doc{i:02d}.txt" for i in range(N_DOCS)]
    # The stdlib split (no build needed): disjoint, covering, about val_fraction held out, stable.
    _, files = stdlib_files()
    split = split_files(files, 0.03)
    names = {role: {rel for rel, _ in fs} for role, fs in split.items()}
    assert not names["train"] & names["validation"]
    assert names["train"] | names["validation"] == {rel for rel, _ in files}
    assert 0.01 < len(names["validation"]) / len(files) < 0.06
    assert split == split_files(list(reversed(files)), 0.03)


def test_built_dataset_is_reused_until_an_input_changes(cfg, corpus_dir, tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    local = DataConfig(source=f"files:{tmp_path}/*.txt", data_dir=str(tmp_path / "cache"))
    first = open_corpus(local).fingerprint
    assert open_corpus(local).fingerprint == first
    assert len(os.listdir(tmp_path / "cache" / "datasets")) == 1
    (tmp_path / "b.txt").write_text("second document, edited")
    assert open_corpus(local).fingerprint != first
    assert texts(local, "train") + texts(local, "validation") != []


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")

    def explode(self, files):
        yield files[0][0], {"text": "x", "path": files[0][0], "replaced": 0}
        raise KeyboardInterrupt

    monkeypatch.setattr(Lecture3Text, "_generate_examples", explode)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        open_corpus(DataConfig(source=f"files:{tmp_path}/*.txt", data_dir=str(cache)))
    assert os.listdir(cache / "datasets") == []


def test_batches_have_the_promised_layout(cfg):
    found = batches(make_train_iterator(cfg, 4), 30)
    assert {k: (v.shape, v.dtype) for k, v in found[0].items()} == {
        "inputs": ((4, SEQ), np.int32), "targets": ((4, SEQ), np.int32), "segment_ids": ((4, SEQ), np.int32),
        "positions": ((4, SEQ), np.int32), "loss_mask": ((4, SEQ), np.float32)}
    b = {k: np.concatenate([x[k] for x in found]) for k in found[0]}
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    # the split's last row is padded (segment 0, no loss) after its last <eod>; the rest are full
    padded = (b["segment_ids"] == 0).any(axis=1)
    assert padded.sum() <= 30 * 4 // len(packed_rows(cfg)) + 1
    np.testing.assert_array_equal(b["loss_mask"][:, :-1], b["segment_ids"][:, 1:] > 0)  # no loss on padding
    b = {k: v[~padded] for k, v in b.items()}
    eos = load_tokenizer(cfg).eos_id
    seg, pos = b["segment_ids"], b["positions"]
    assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()
    after_eod = b["inputs"][:, :-1] == eos
    assert after_eod.any(), "some row must cross a document boundary"
    # A new segment starts exactly after each <eod>: its id goes up by one and its position restarts.
    np.testing.assert_array_equal(seg[:, 1:] - seg[:, :-1], after_eod.astype(np.int32))
    np.testing.assert_array_equal(np.where(after_eod, pos[:, 1:], pos[:, 1:] - pos[:, :-1] - 1), 0)


def test_same_seed_same_batches_other_seed_different(cfg):
    a = batches(make_train_iterator(cfg, 4), 3)
    b = batches(make_train_iterator(cfg, 4), 3)
    c = batches(make_train_iterator(dataclasses.replace(cfg, seed=1), 4), 3)
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(same(x, y) for x, y in zip(a, c, strict=True))


def test_restored_state_yields_exactly_the_next_batch(cfg, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = make_train_iterator(cfg, 4)
    batches(it, 7)
    state = it.get_state()
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = batches(it, 3)
    fresh = make_train_iterator(cfg, 4)
    fresh.set_state(state)
    assert all(same(x, y) for x, y in zip(expected, batches(fresh, 3), strict=True))
    restored = make_train_iterator(cfg, 4)
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert all(same(x, y) for x, y in zip(expected, batches(restored, 3), strict=True))


def rows_of(cfg, batch_size=1, **kwargs):
    """Every row the iterator yields, as a tuple of its real tokens (inputs + the last target)."""
    out = []
    for b in make_train_iterator(cfg, batch_size, **kwargs):
        for inputs, targets, seg, mask in zip(b["inputs"], b["targets"], b["segment_ids"], b["loss_mask"],
                                              strict=True):
            out.append(tuple(inputs[seg > 0].tolist() + ([int(targets[-1])] if mask[-1] else [])))
    return out


def packed_rows(cfg):
    """The training split's rows in stored order, as grain's ConcatThenSplit packs the documents."""
    import grain

    from lecture3.data.pipeline import pack

    tok = load_tokenizer(cfg)
    docs = [{"tokens": np.array([*tok.encode(t), tok.eos_id], np.int32)} for t in texts(cfg, "train")]
    rows = pack(grain.MapDataset.source(docs).to_iter_dataset(), cfg.seq_len)
    return [tuple(r["tokens"][r["tokens_segment_ids"] > 0].tolist()) for r in rows]


def test_rows_are_packed_as_grain_packs_them():
    import grain

    from lecture3.data import rows as packing
    from lecture3.data.pipeline import pack

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 50, size=int(n)).astype(np.int32) for n in rng.integers(0, 40, size=30)]
    mine = packing.from_documents(docs, 1, 9)
    theirs = list(pack(grain.MapDataset.source([{"tokens": np.append(d, 1).astype(np.int32)} for d in docs])
                       .to_iter_dataset(), 8))
    assert len(mine) == len(theirs)
    for i, row in enumerate(theirs):
        assert all(np.array_equal(row[k], mine[i][k]) for k in row), i


def test_packing_loses_no_token_and_reshuffles_the_rows_each_epoch(cfg):
    expected = packed_rows(cfg)
    rows = rows_of(cfg, num_epochs=2)
    first, second = rows[:len(expected)], rows[len(expected):]
    assert sorted(first) == sorted(second) == sorted(expected)  # every row once per epoch, no token lost
    assert first != second, "each epoch has its own order"
    assert first != expected, "rows are shuffled, not read in stored order"


def test_a_batch_draws_rows_from_the_whole_split(cfg):
    # 4 rows of a batch: with documents shuffled and packed (v1) consecutive rows were mostly one document.
    from lecture3.data.stats import batch_documents

    corpus, tok = open_corpus(cfg), load_tokenizer(cfg)
    assert batch_documents(cfg, corpus, tok, batch_size=4, n_batches=30) >= 3.0


def test_process_shards_are_disjoint_and_cover_the_data(cfg):
    shards = [rows_of(cfg, 2, process_index=p, process_count=2, num_epochs=1) for p in (0, 1)]
    assert shards[0] and shards[1]
    assert sorted(shards[0] + shards[1]) == sorted(packed_rows(cfg))
    # one step's rows of the two processes are the rows of that step's global batch in one process
    one = rows_of(cfg, 4, num_epochs=1)
    assert sorted(shards[0][:2] + shards[1][:2]) == sorted(one[:4])
    with pytest.raises(DataError, match="does not split over 2 processes"):
        make_train_iterator(cfg, 3, process_count=2)


def test_validation_set_is_fixed_and_spread_over_the_split(cfg):
    from lecture3.data.stats import validation_coverage

    full = validation_coverage(dataclasses.replace(cfg, val_sequences=10_000), open_corpus(cfg),
                               load_tokenizer(cfg))
    assert full["rows"] >= 4 and full["token_share"] > 0.9 and full["long_documents"] >= 1
    k = full["long_documents"]  # fewer rows than the split holds, one per document longer than a row
    spread = dataclasses.replace(cfg, val_sequences=k)
    a, b = validation_batches(spread, 1), validation_batches(spread, 1)
    assert len(a) == k and all(same(x, y) for x, y in zip(a, b, strict=True))
    assert all(x["inputs"].shape == (1, SEQ) and x["loss_mask"].all() for x in a)
    cov = validation_coverage(spread, open_corpus(cfg), load_tokenizer(cfg))
    assert cov["rows"] == k < full["rows"] and cov["long_documents_touched"] == cov["long_documents"], cov
    # When val_sequences allows, the whole split: the held-out documents in order, each followed by <eod>.
    whole = validation_batches(dataclasses.replace(cfg, val_sequences=10_000), 2)
    held_out = texts(cfg, "validation")
    tok = load_tokenizer(cfg)
    expected = [t for text in held_out for t in [*tok.encode(text), tok.eos_id]]
    rows = [t for x in whole for i, tg, m in zip(x["inputs"], x["targets"], x["loss_mask"], strict=True)
            if m.all() for t in [*i, tg[-1]]]
    assert rows == expected[:len(rows)] and len(expected) - len(rows) < SEQ + 1
    # an odd number of rows: the last batch is filled up with masked-out copies
    odd = validation_batches(dataclasses.replace(cfg, val_sequences=3), 2)
    assert len(odd) == 2 and odd[-1]["loss_mask"][0].all() and not odd[-1]["loss_mask"][1].any()
    with pytest.raises(DataError, match="longer than the validation set"):
        validation_batches(dataclasses.replace(cfg, seq_len=100_000), 1)


@pytest.mark.slow
def test_tfds_source_reads_a_dataset_built_here(cfg):
    # The files source's build is a prepared tfds dataset: read it back by name, through tfds.
    folder = os.path.dirname(os.path.dirname(open_corpus(cfg).builder.data_dir))
    tfds_cfg = dataclasses.replace(cfg, source="tfds:lecture3_text:train", tfds_data_dir=folder)
    assert sorted(texts(tfds_cfg, "train")) == sorted(texts(cfg, "train"))
    # Small, so read through the token cache by default: the same rows and batches as the files source.
    assert all(same(x, y) for x, y in zip(validation_batches(cfg, 2), validation_batches(tfds_cfg, 2), strict=True))
    expected = batches(make_train_iterator(cfg, 4), 5)
    assert all(same(x, y) for x, y in zip(expected, batches(make_train_iterator(tfds_cfg, 4), 5), strict=True))
    assert corpus_stats(tfds_cfg, max_documents=3)["train"]["documents"] == len(texts(cfg, "train"))
    # Streamed (tokenized in the pipeline): documents shuffled and packed, then a window shuffle of rows;
    # the same tokens each epoch.
    streamed = dataclasses.replace(tfds_cfg, cache_tokens=False, shuffle_buffer=8)
    tokens = sorted(t for row in rows_of(streamed, num_epochs=1) for t in row)
    assert tokens == sorted(t for row in packed_rows(cfg) for t in row)
    # a split of few documents is read whole: the same validation rows as through the cache
    assert all(same(x, y) for x, y in zip(validation_batches(cfg, 2), validation_batches(streamed, 2), strict=True))
    stats = corpus_stats(streamed, max_documents=3)
    assert stats["train"]["documents"] == 3 and stats["batch_documents"] is None


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("plain text")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then \xe2\x82 end \xef\xbf\xbd real")
    local = DataConfig(source=f"files:{tmp_path}/*.txt", data_dir=str(tmp_path / "cache"), seq_len=4,
                       val_sequences=1)
    stats = corpus_stats(local)
    replaced = stats["train"]["invalid_utf8_replaced"] + stats["validation"]["invalid_utf8_replaced"]
    assert replaced == 3  # \xff, \xfe and the truncated \xe2\x82; the real U+FFFD is text
    assert stats["train"]["documents"] + stats["validation"]["documents"] == 2


def test_global_batch_assembles_on_the_mesh(cfg):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(-1), ("data",))
    local = next(make_train_iterator(cfg, len(jax.devices())))
    out = global_batch(local, NamedSharding(mesh, PartitionSpec("data")))
    assert out.keys() == local.keys()
    for k, v in out.items():
        assert v.shape == local[k].shape and len(v.addressable_shards) == len(jax.devices())
        np.testing.assert_array_equal(np.asarray(v), local[k])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(cfg):
    expected = batches(make_train_iterator(cfg, 4), 3)
    it = make_train_iterator(dataclasses.replace(cfg, num_workers=1), 4)
    assert all(same(x, y) for x, y in zip(expected, batches(it, 3), strict=True))


@pytest.mark.slow
def test_stdlib_is_the_default_corpus(tmp_path):
    local = DataConfig(data_dir=str(tmp_path / "cache"))
    stats = corpus_stats(local)
    assert stats["train"]["documents"] > 500 and stats["train"]["bytes"] > 10_000_000
    assert stats["validation"]["documents"] > 5 and stats["train"]["tokens"] == stats["train"]["bytes"]
    assert len(validation_batches(local, 16)) == 4
    # a batch of 16 rows draws from >= 12 distinct files (v1: 1.4); the validation set touches every
    # validation file longer than one row (v1: 12 of 42)
    assert stats["batch_documents"] >= 12
    cov = stats["validation_coverage"]
    assert cov["long_documents"] > 20 and cov["long_documents_touched"] == cov["long_documents"]
