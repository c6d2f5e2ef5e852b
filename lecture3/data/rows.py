"""Rows of a packed token stream with random access, and the choice of the validation rows.

A split's documents, each followed by <eod>, are one stream of tokens; row i is the slice
[i·R, (i+1)·R) of that stream, R = seq_len + 1 (the last row padded). Inside a row, `segment_ids` number
its documents from 1 (0 is padding) and `positions` restart at each document and at the row's start:
the layout grain's `ConcatThenSplitIterDataset` gives the same documents in the same order (a test holds
the two equal). With random access the training pipeline can shuffle the rows of the whole split, so a
batch draws its rows from anywhere in the corpus rather than from a few consecutive documents.
"""

from __future__ import annotations

import numpy as np


class PackedRows:
    """The rows of length `row_len` of the stream of documents `flat[offsets[d]:offsets[d+1]]` + <eod>.

    Item i is {"tokens", "tokens_segment_ids", "tokens_positions"} (int32 [row_len]) and "documents"
    (int32 [2]: the first and last document index the row touches).
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, eos_id: int, row_len: int):
        self.flat, self.offsets = flat, np.asarray(offsets, np.int64)
        self.eos_id, self.row_len = int(eos_id), int(row_len)
        n_docs = len(self.offsets) - 1
        self.starts = self.offsets[:-1] + np.arange(n_docs)  # where document d starts in the stream
        self.length = int(self.offsets[-1] + n_docs)  # tokens + one <eod> per document

    def __len__(self) -> int:
        return -(-self.length // self.row_len)

    @property
    def full_rows(self) -> int:
        """Rows with no padding."""
        return self.length // self.row_len

    def span(self, i: int) -> tuple[int, int]:
        """(first, last) document of row i."""
        a = i * self.row_len
        b = min(a + self.row_len, self.length) - 1
        return (int(np.searchsorted(self.starts, a, side="right") - 1),
                int(np.searchsorted(self.starts, b, side="right") - 1))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        a = i * self.row_len
        p = np.arange(a, min(a + self.row_len, self.length), dtype=np.int64)
        doc = np.searchsorted(self.starts, p, side="right") - 1
        j = p - self.starts[doc]  # index inside the document; its length is the <eod>
        size = self.offsets[doc + 1] - self.offsets[doc]
        at = np.minimum(self.offsets[doc] + j, max(len(self.flat) - 1, 0))
        text = np.asarray(self.flat[at], np.int32) if len(self.flat) else np.zeros(len(p), np.int32)
        real = len(p)
        out = {"tokens": np.zeros(self.row_len, np.int32), "tokens_segment_ids": np.zeros(self.row_len, np.int32),
               "tokens_positions": np.zeros(self.row_len, np.int32)}
        out["tokens"][:real] = np.where(j < size, text, self.eos_id)
        out["tokens_segment_ids"][:real] = doc - doc[0] + 1
        out["tokens_positions"][:real] = np.where(doc == doc[0], p - a, j)
        out["documents"] = np.array([doc[0], doc[-1]], np.int32)
        return out


def from_documents(docs: list[np.ndarray], eos_id: int, row_len: int) -> PackedRows:
    """PackedRows over in-memory documents (token arrays without their <eod>)."""
    lengths = np.array([len(d) for d in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    return PackedRows(flat, offsets, eos_id, row_len)


def validation_indices(rows: PackedRows, k: int) -> np.ndarray:
    """Which full rows make a validation set of at most `k` rows, spread over the whole split: all of them
    when `k` allows (each document then counts in proportion to its length); else first one row of each
    document that owns one (the row whose middle lies in it: every document longer than a row owns one),
    spread over the documents when there are more of those than `k`, and the rest of `k` spread evenly
    over the remaining rows. Deterministic: the same rows on every call and machine."""
    n = rows.full_rows
    if k >= n:
        return np.arange(n)
    middle = np.arange(n) * rows.row_len + rows.row_len // 2
    owner = np.searchsorted(rows.starts, middle, side="right") - 1
    firsts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # each owner's first row
    last = np.r_[firsts[1:], n] - 1
    picks = (firsts + last) // 2  # the middle row of each owner
    if len(picks) >= k:
        return np.sort(picks[_spread(len(picks), k)])
    rest = np.setdiff1d(np.arange(n), picks)
    return np.sort(np.concatenate([picks, rest[_spread(len(rest), k - len(picks))]]))


def _spread(n: int, k: int) -> np.ndarray:
    """k indices of range(n) spread evenly (k <= n)."""
    return (np.arange(k) * n) // k + (n // k) // 2 if k else np.zeros(0, np.int64)
