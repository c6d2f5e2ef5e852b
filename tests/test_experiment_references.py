"""The reports' references: the interpolated Kneser-Ney bigram against the formula worked by hand, the
rows it is scored on, and the cache."""

import math
import random

import numpy as np
import pytest

from lecture3.data import DataConfig
from lecture3.experiment import references

# the stream 0 1 0 2 0 1 3 over V = 5 (token 4 never occurs):
#   pairs 01 10 02 20 01 13: c(01) = 2, c(10) = c(02) = c(20) = c(13) = 1; 5 distinct pairs
#   c(0) = 3, c(1) = 2, c(2) = 1, c(3) = 0 (3 ends the stream: never a history)
#   N1+(0 •) = 2, N1+(1 •) = 2, N1+(2 •) = 1; N1+(• 0) = 2, N1+(• 1) = N1+(• 2) = N1+(• 3) = 1, N1+(• 4) = 0
#   P_cont(w) = max(N1+(• w) - 0.75, 0) / 5 + 0.75 · 4 / 5 / 5:
#       P_cont(0) = 1.25/5 + 0.12 = 0.37, P_cont(1..3) = 0.25/5 + 0.12 = 0.17, P_cont(4) = 0.12 (sum 1)
STREAM = np.array([0, 1, 0, 2, 0, 1, 3])
V = 5
BY_HAND = {
    (0, 1): (2 - 0.75) / 3 + 0.75 * 2 / 3 * 0.17,  # a seen pair
    (0, 3): 0.75 * 2 / 3 * 0.17,  # a seen history, an unseen pair
    (0, 4): 0.75 * 2 / 3 * 0.12,  # a token never seen: the uniform share
    (2, 0): (1 - 0.75) / 1 + 0.75 * 1 / 1 * 0.37,
    (1, 0): (1 - 0.75) / 2 + 0.75 * 2 / 2 * 0.37,
    (3, 0): 0.37,  # a history never seen: the continuation unigram
    (4, 2): 0.17,
}


@pytest.mark.parametrize("dense_max_cells", [references.DENSE_MAX_CELLS, 0], ids=["dense", "sparse"])
def test_the_kneser_ney_bigram_is_the_formula_worked_by_hand(dense_max_cells):
    pairs = list(BY_HAND)
    v, w = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    got = references.kneser_ney_log_probs(STREAM, V, v, w, 0.75, dense_max_cells)
    assert np.exp(got) == pytest.approx([BY_HAND[p] for p in pairs], abs=1e-12)


def test_every_history_is_a_distribution_over_the_vocabulary():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 7, size=200) ** 2 % 11  # skewed, some ids never occur
    for v in range(11):
        p = np.exp(references.kneser_ney_log_probs(stream, 11, np.full(11, v), np.arange(11)))
        assert p.sum() == pytest.approx(1.0, abs=1e-12) and (p > 0).all()


def test_only_positions_that_count_in_the_loss_are_scored():
    batch = {"inputs": np.array([[0, 1, 0], [2, 0, 0]]), "targets": np.array([[1, 0, 4], [0, 3, 3]]),
             "loss_mask": np.array([[1, 1, 0], [1, 1, 0]], np.float32)}
    pad = {k: np.zeros_like(x) for k, x in batch.items()}  # a padded last batch: loss_mask 0
    out = references.of_stream(STREAM, [batch, pad], V)
    scored = [(0, 1), (1, 0), (2, 0), (0, 3)]
    assert out["validation_tokens"] == 4
    assert out["bigram_loss"] == pytest.approx(-np.mean([math.log(BY_HAND[p]) for p in scored]))
    # unigram entropy of the targets 1, 0, 0, 3
    assert out["unigram_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_references_of_a_corpus_are_cached_by_its_rows(tmp_path, monkeypatch):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(60)))
    cfg = DataConfig(source=f"files:{corpus}/*.txt", data_dir=str(tmp_path / "cache"), seq_len=16,
                     val_fraction=0.3, val_sequences=8)
    first = references.references(cfg, batch_size=2)
    assert 0 < first["bigram_loss"] < first["unigram_entropy"] < math.log(259)
    assert len(list((tmp_path / "cache" / "references").glob("*.json"))) == 1

    def refit(*a, **k):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(references, "training_stream", refit)
    assert references.references(cfg, batch_size=2) == first
    with pytest.raises(AssertionError, match="refitted"):  # other rows (a longer T) are another entry
        references.references(DataConfig(**{**cfg.__dict__, "seq_len": 8}), batch_size=2)
