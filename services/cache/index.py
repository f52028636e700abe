"""In-memory vector indexes of semantic entries, one per sub-partition.

Redis holds the truth; an index is a resident copy for cosine search, rebuilt
from Redis on first use and topped up from it afterwards (entries carry a
global sequence number, so "what is new since" is one range query). Every
method runs to completion without awaiting, so on the single event loop a
Store never interleaves with a search half-way. A sub-partition holds at most
``max_entries_per_partition`` rows, so a search is one matrix-vector product
of bounded size (10,000 x 384 floats: half a millisecond), cheap enough to
stay on the loop.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

# Bounds on what all indexes together keep resident; an index pushed out is
# only reloaded from Redis on its next use. 131,072 rows of 384 float32 are
# 192 MiB.
MAX_RESIDENT_ROWS = 131_072
MAX_RESIDENT_INDEXES = 65_536


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    entry_id: str
    similarity: float
    seq: int
    # The stored question, for the verifier; "" for entries stored before
    # questions were kept.
    question: str = ""
    vector: np.ndarray | None = None


class VectorIndex:
    """Rows of L2-normalized vectors with their entry ids, sequence numbers
    and expiry times; removal swaps the last row in, so rows are unordered."""

    def __init__(self, dimensions: int, max_entries: int) -> None:
        self.dimensions = dimensions
        self.max_entries = max(1, max_entries)
        # Every entry with a sequence number up to this one has been applied.
        self.synced_seq = 0
        self._vectors = np.empty((1, dimensions), np.float32)
        self._seqs = np.empty(1, np.int64)
        self._expires_ms = np.empty(1, np.int64)
        self._ids: list[str] = []
        self._questions: list[str] = []
        self._rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._rows

    @property
    def allocated_rows(self) -> int:
        return len(self._seqs)

    def upsert(
        self, entry_id: str, seq: int, expires_ms: int, vector: np.ndarray, question: str = ""
    ) -> None:
        """Adds or replaces an entry; a replay of an older version is ignored.

        Evicts the oldest entry when full, as the store does, so both agree
        on which entries a full sub-partition keeps.
        """
        row = self._rows.get(entry_id)
        if row is not None:
            if seq > self._seqs[row]:
                self._set_row(row, seq, expires_ms, vector)
                self._questions[row] = question
            return
        if len(self._ids) >= self.max_entries:
            oldest = int(np.argmin(self._seqs[: len(self._ids)]))
            if self._seqs[oldest] > seq:
                return
            self._remove_row(oldest)
        row = len(self._ids)
        if row == self.allocated_rows:
            self._grow()
        self._ids.append(entry_id)
        self._questions.append(question)
        self._rows[entry_id] = row
        self._set_row(row, seq, expires_ms, vector)

    def remove(self, entry_id: str, seq: int | None = None) -> None:
        """Drops an entry; with ``seq``, only that version of it."""
        row = self._rows.get(entry_id)
        if row is not None and (seq is None or self._seqs[row] == seq):
            self._remove_row(row)

    def best(self, query: np.ndarray, now_ms: int) -> Match | None:
        """The most similar live entry; expired rows are dropped on the way."""
        found = self.nearest(query, now_ms, 1)
        return found[0] if found else None

    def nearest(
        self, query: np.ndarray, now_ms: int, count: int, min_similarity: float = -1.0
    ) -> list[Match]:
        """Up to ``count`` live entries at or above ``min_similarity``, most
        similar first; expired rows are dropped on the way."""
        size = len(self._ids)
        if size == 0:
            return []
        live = self._expires_ms[:size] > now_ms
        if not live.all():
            self._keep(live)
            size = len(self._ids)
            if size == 0:
                return []
        similarities = self._vectors[:size] @ query
        # A partial sort: only the best ``count`` rows are ordered.
        rows = np.argpartition(-similarities, count - 1)[:count] if size > count else np.arange(size)
        rows = rows[np.argsort(-similarities[rows], kind="stable")]
        return [
            Match(
                self._ids[row],
                float(similarities[row]),
                int(self._seqs[row]),
                self._questions[row],
                self._vectors[row].copy(),
            )
            for row in rows.tolist()
            if similarities[row] >= min_similarity
        ]

    def mark_synced(self, seq: int) -> None:
        self.synced_seq = max(self.synced_seq, seq)

    def _set_row(self, row: int, seq: int, expires_ms: int, vector: np.ndarray) -> None:
        self._vectors[row] = vector
        self._seqs[row] = seq
        self._expires_ms[row] = expires_ms

    def _grow(self) -> None:
        # Doubling keeps the many one-entry sub-partitions (one per
        # conversation) small while appends stay amortized O(1).
        rows = min(self.max_entries, 2 * self.allocated_rows)
        self._vectors = np.resize(self._vectors, (rows, self.dimensions))
        self._seqs = np.resize(self._seqs, rows)
        self._expires_ms = np.resize(self._expires_ms, rows)

    def _remove_row(self, row: int) -> None:
        last = len(self._ids) - 1
        removed = self._ids[row]
        if row != last:
            moved = self._ids[last]
            self._vectors[row] = self._vectors[last]
            self._seqs[row] = self._seqs[last]
            self._expires_ms[row] = self._expires_ms[last]
            self._ids[row] = moved
            self._questions[row] = self._questions[last]
            self._rows[moved] = row
        self._ids.pop()
        self._questions.pop()
        del self._rows[removed]

    def _keep(self, mask: np.ndarray) -> None:
        kept = int(mask.sum())
        size = len(mask)
        self._vectors[:kept] = self._vectors[:size][mask]
        self._seqs[:kept] = self._seqs[:size][mask]
        self._expires_ms[:kept] = self._expires_ms[:size][mask]
        kept_mask = mask.tolist()
        self._ids = [entry_id for entry_id, keep in zip(self._ids, kept_mask) if keep]
        self._questions = [question for question, keep in zip(self._questions, kept_mask) if keep]
        self._rows = {entry_id: row for row, entry_id in enumerate(self._ids)}


class IndexRegistry:
    """The resident indexes, least recently used first, within memory bounds."""

    def __init__(
        self,
        max_entries: int,
        max_rows: int = MAX_RESIDENT_ROWS,
        max_indexes: int = MAX_RESIDENT_INDEXES,
    ) -> None:
        self._max_entries = max_entries
        self._max_rows = max_rows
        self._max_indexes = max_indexes
        self._indexes: collections.OrderedDict[str, VectorIndex] = collections.OrderedDict()
        self._counted_rows: dict[str, int] = {}
        self._rows = 0

    def __len__(self) -> int:
        return len(self._indexes)

    @property
    def resident_rows(self) -> int:
        return self._rows

    def get(self, key: str) -> VectorIndex | None:
        index = self._indexes.get(key)
        if index is not None:
            self._indexes.move_to_end(key)
        return index

    def get_or_create(self, key: str, dimensions: int) -> VectorIndex:
        """The index of ``key``; a new, empty one if it has vectors of
        another size (the embedding model changed)."""
        index = self.get(key)
        if index is None or index.dimensions != dimensions:
            self._forget(key)
            index = VectorIndex(dimensions, self._max_entries)
            self._indexes[key] = index
            self._counted_rows[key] = 0
        return index

    def settle(self, key: str) -> None:
        """Accounts for the growth of ``key``'s index and pushes out the
        least recently used others while over the bounds."""
        index = self._indexes.get(key)
        if index is None:
            return
        self._rows += index.allocated_rows - self._counted_rows[key]
        self._counted_rows[key] = index.allocated_rows
        while len(self._indexes) > 1 and (
            self._rows > self._max_rows or len(self._indexes) > self._max_indexes
        ):
            oldest = next(iter(self._indexes))
            if oldest == key:
                self._indexes.move_to_end(key)
                oldest = next(iter(self._indexes))
            self._forget(oldest)

    def drop_prefix(self, prefix: str) -> None:
        for key in [k for k in self._indexes if k.startswith(prefix)]:
            self._forget(key)

    def _forget(self, key: str) -> None:
        if self._indexes.pop(key, None) is not None:
            self._rows -= self._counted_rows.pop(key)
