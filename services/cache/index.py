"""In-memory vector indexes of semantic entries, one per sub-partition.

Redis holds the truth; an index is a resident copy for cosine search, rebuilt
from Redis on first use and topped up from it afterwards (entries carry a
global sequence number, so "what is new since" is one range query). Every
method runs to completion without awaiting, so on the single event loop a
Store never interleaves with a search half-way.

A small index is searched exactly: one matrix-vector product (4,096 x 384
floats: 0.4 ms p50 here). The scan is memory-bound and grows with the
partition (1.3 ms p50 and 4 ms p99 at 8k rows, tens of milliseconds at
100k), so from ``cache.approximate_index_from`` rows on an HNSW graph (usearch)
proposes ``GRAPH_CANDIDATES`` rows and the exact float32 rows rank them: the
graph holds int8 copies (384 bytes a row) because the ranking is exact
anyway, and oversampling then ranking is what brings recall against the
exact scan above 0.99 (bench/cache_scale_bench.py measured the choice).
Graph keys are sequence numbers, which name one version of one entry and
never repeat, so a replaced or removed row is removed from the graph by its
number while rows move inside the matrix.

Adding rows to the graph is slow (0.15-0.75 ms a row here, 15-75 s for the
100k rows of a partition rebuilt after a restart), so a batch of more than
``INLINE_GRAPH_ADDS`` rows is added by a worker thread (usearch releases the
GIL while it adds). Meanwhile the graph is out of service: nothing on the
loop touches it, searches scan the exact rows (complete, only slower), and
removals wait in a list applied when the worker is done.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import dataclasses
import math
import threading

import numpy as np

# Before usearch: usearch loads numkong's library with RTLD_GLOBAL, and its C++
# runtime symbols then stand before libstdc++'s for every library loaded after
# it, so a process that imported this module before anything else C++ (the
# services import grpc first) crashed in onnxruntime's import (SIGSEGV in
# std::codecvt): the cache's local embedder (meshgate.minilm) loads it. A
# deployment without it (cache.embedder = "inference") needs none of this.
with contextlib.suppress(ImportError):
    import onnxruntime  # noqa: F401
from usearch.index import Index as GraphIndex  # noqa: E402

from services.cache.verifier import analyze

# Bound on how many indexes stay resident (the bound on rows is the
# cache.max_resident_rows setting); an index pushed out is only reloaded from
# Redis on its next use.
MAX_RESIDENT_INDEXES = 65_536
# Distinct words of a sub-partition's first-stage postings that weigh as
# much as a row (its 384-dimension vector, numbers and id): ~80 B a word
# against ~1.7 KB a row (tracemalloc, questions of 1 KiB of distinct
# words: 11.7 KB of postings a row). Counted against the bound on rows, or
# 1.2M rows of such questions in sub-partitions below the graph's size
# would hold ~14 GB of postings the bound never saw.
POSTED_WORDS_PER_ROW = 20
# Rows the graph proposes per search, and the breadth of its search and of
# its construction. Measured at 200k rows: construction breadth 64 built in
# 15 s (128: 38 s) at the same recall of the exact top 5 (0.999) once the
# search breadth is 128 and 64 rows are ranked exactly (64/32: 0.98).
GRAPH_CANDIDATES = 64
GRAPH_CONNECTIVITY = 16
GRAPH_EXPANSION_ADD = 64
GRAPH_EXPANSION_SEARCH = 128
# Threads for a batch addition (an index loading from Redis); 0 would take
# every core, and the cache shares its machine with the other services.
GRAPH_BUILD_THREADS = 2
# Pending rows the loop adds to the graph itself before a search (tens of
# milliseconds at most); a larger batch goes to a worker thread.
INLINE_GRAPH_ADDS = 64
# One batch at a time across all indexes: the cache shares its two build
# threads' worth of cores with the other services.
_GRAPH_BUILDS = threading.BoundedSemaphore(1)


def _add_to_graph(graph: GraphIndex, keys: np.ndarray, vectors: np.ndarray) -> None:
    with _GRAPH_BUILDS:
        graph.add(keys, vectors, copy=True, threads=GRAPH_BUILD_THREADS)


class _GraphBatch:
    """One batch of rows being added to a graph by a daemon thread: a
    rebuild must never delay the process's exit."""

    def __init__(self, graph: GraphIndex, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(graph, keys, vectors), name="cache-graph-build", daemon=True
        )
        self._thread.start()

    def _run(self, graph: GraphIndex, keys: np.ndarray, vectors: np.ndarray) -> None:
        try:
            _add_to_graph(graph, keys, vectors)
        except BaseException as error:  # noqa: BLE001 - handed to the loop, which rebuilds
            self.error = error
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


@dataclasses.dataclass(slots=True)
class TopUps:
    """How an index's top-ups from Redis follow each other (the cache
    servicer's ``_top_up``): one at a time, and a caller that waited for
    one begun after it asked takes its outcome instead of reading again."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # Top-ups begun, and the number of the last one that finished whole,
    # with the wrong-hit count it read.
    begun: int = 0
    finished: int = 0
    strictness: int = 0
    # When the top-up holding the lock began or last had a reply from Redis
    # (the event loop's clock): one whose read has hung (a stalled
    # connection) is waited for no longer than the servicer's bound.
    progress_at: float = 0.0


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

    def __init__(self, dimensions: int, max_entries: int, approximate_from: int) -> None:
        self.dimensions = dimensions
        self.max_entries = max(1, max_entries)
        # Every entry with a sequence number up to this one has been applied.
        self.synced_seq = 0
        # Whether a load from Redis has reached the end of the partition:
        # until then the index is partial, and lookups wait for the load
        # (services/cache/servicer.py, ``_synced``) rather than search it.
        self.loaded = False
        self.top_ups = TopUps()
        self._vectors = np.empty((1, dimensions), np.float32)
        self._seqs = np.empty(1, np.int64)
        self._expires_ms = np.empty(1, np.int64)
        self._ids: list[str] = []
        self._questions: list[str] = []
        self._rows: dict[str, int] = {}
        # Whether any row may have expired: checking all expiry times on
        # every search would cost a millisecond at 1M rows.
        self._earliest_expiry_ms = np.iinfo(np.int64).max
        self._approximate_from = max(1, approximate_from)
        self._graph: GraphIndex | None = None
        # Rows of the graph by sequence number, and the sequence numbers not
        # in it yet: they are added in one batch before the next search
        # (batches build far faster than single additions when an index
        # loads from Redis). A pending number no longer in ``_graph_rows``
        # was removed before it was added.
        self._graph_rows: dict[int, int] = {}
        self._graph_pending: list[int] = []
        # A batch being added off the loop, and the numbers removed meanwhile.
        self._graph_batch: _GraphBatch | None = None
        self._removed_during_batch: list[int] = []
        # The entries whose stored question holds each content word's stem
        # (as the verifier analyzes them: Analysis.stems), for the lookup's first stage
        # (``may_match``). Kept only below the graph's size: analyzing every
        # row of a 100k rebuild would hold the loop for seconds. An entry is
        # named by its sequence number (rows move, numbers do not); a word
        # of one entry holds the plain number, of more an array of them:
        # 242 B an entry at 3,001 entries, words included, against 657 B
        # with sets of entry ids (tracemalloc; bench/cache_first_stage.py
        # prints it).
        self._postings: dict[str, int | array.array] | None = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._rows

    @property
    def allocated_rows(self) -> int:
        return len(self._seqs)

    @property
    def weight_rows(self) -> int:
        """What the registry bounds: the rows allocated, and the distinct
        words of the postings in rows of the same memory."""
        words = len(self._postings) if self._postings is not None else 0
        return self.allocated_rows + words // POSTED_WORDS_PER_ROW

    @property
    def approximate(self) -> bool:
        return self._graph is not None

    def may_match(self, words: frozenset[str], min_share: float = 0.0) -> bool:
        """Whether some stored question holds at least ``min_share`` of
        ``words`` (the stems of the question looked up: Analysis.stems), and at
        least one of them: the lookup's first stage, which decides whether
        the question is worth embedding (``cache.first_stage_word_share``
        says why a share and which). Always True for a partition too large
        to keep postings for."""
        postings = self._postings
        if postings is None:
            return True
        needed = max(1, math.ceil(min_share * len(words) - 1e-9))
        if needed == 1:
            return any(word in postings for word in words)
        # Counting over the postings of a 3,000-question partition's words
        # takes tens of microseconds (bench/cache_first_stage.py); the
        # first entry to reach the count ends it.
        shared: collections.Counter[int] = collections.Counter()
        for word in words:
            holders = postings.get(word, ())
            for holder in (holders,) if isinstance(holders, int) else holders:
                shared[holder] += 1
                if shared[holder] >= needed:
                    return True
        return False

    @property
    def building(self) -> bool:
        """Whether a worker is adding a batch to the graph (searches scan
        exactly until it is done)."""
        return self._graph_batch is not None and not self._graph_batch.done()

    @property
    def resident_bytes(self) -> int:
        """The arrays' and the graph's memory: not the Python ids and texts,
        nor a partition's postings below the graph's size (words included,
        bench/cache_first_stage.py traces those with tracemalloc)."""
        arrays = self._vectors.nbytes + self._seqs.nbytes + self._expires_ms.nbytes
        return arrays + (self._graph.memory_usage if self._graph is not None else 0)

    def upsert(
        self,
        entry_id: str,
        seq: int,
        expires_ms: int,
        vector: np.ndarray,
        question: str = "",
        *,
        now_ms: int = 0,
    ) -> None:
        """Adds or replaces an entry; a replay of an older version is ignored.

        When full, drops the rows expired by ``now_ms`` (the caller's clock;
        0: none has), then evicts the oldest entry if still full, as the
        store does (a Store trims expired rows among its oldest before it
        evicts the oldest), so both agree on which live entries a full
        sub-partition keeps. Evicting
        the oldest first dropped a live entry Redis kept: a replica's index
        full with a long-lived entry and one expired gave up the long-lived
        one for another replica's Store, and missed it for good, though
        Redis still held it and a fresh replica hit it.
        """
        row = self._rows.get(entry_id)
        if row is not None:
            if seq > self._seqs[row]:
                self._graph_forget(row)
                self._index_words(int(self._seqs[row]), self._questions[row], remove=True)
                self._set_row(row, seq, expires_ms, vector)
                self._questions[row] = question
                self._index_words(seq, question)
                self._graph_note(row)
            return
        if len(self._ids) >= self.max_entries and self.live_rows(now_ms) >= self.max_entries:
            oldest = int(np.argmin(self._seqs[: len(self._ids)]))
            if self._seqs[oldest] > seq:
                return
            self._remove_row(oldest)
        row = len(self._ids)
        if row == self.allocated_rows:
            self._grow()
        self._ids.append(entry_id)
        self._questions.append(question)
        self._index_words(seq, question)
        self._rows[entry_id] = row
        self._set_row(row, seq, expires_ms, vector)
        if self._graph is not None:
            self._graph_note(row)
        elif len(self._ids) >= self._approximate_from:
            self._start_graph()
            self._postings = None

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
        size = self.live_rows(now_ms)
        if size == 0:
            return []
        if self._graph is not None and self._graph_ready():
            found = self._graph.search(query, max(count, GRAPH_CANDIDATES), exact=False).keys.tolist()
            # The graph never returns a removed key; the lookup stays safe if it did.
            candidates = np.array(
                [row for row in map(self._graph_rows.get, found) if row is not None], np.int64
            )
            similarities = self._vectors[candidates] @ query
        else:
            candidates = None
            similarities = self._vectors[:size] @ query
        # A partial sort: only the best ``count`` rows are ordered.
        order = (
            np.argpartition(-similarities, count - 1)[:count]
            if len(similarities) > count
            else np.arange(len(similarities))
        )
        order = order[np.argsort(-similarities[order], kind="stable")]
        rows = candidates[order] if candidates is not None else order
        return [
            Match(
                self._ids[row],
                float(similarity),
                int(self._seqs[row]),
                self._questions[row],
                self._vectors[row].copy(),
            )
            for row, similarity in zip(rows.tolist(), similarities[order].tolist())
            if similarity >= min_similarity
        ]

    def live_rows(self, now_ms: int) -> int:
        """The rows left once those expired by ``now_ms`` are dropped."""
        if now_ms >= self._earliest_expiry_ms:
            self._drop_expired(now_ms)
        return len(self._ids)

    def versions(self) -> tuple[list[str], np.ndarray]:
        """A copy of the rows' entry ids and sequence numbers (16 bytes a
        row: the ids themselves are shared), for a check against Redis that
        awaits while rows move."""
        return list(self._ids), self._seqs[: len(self._ids)].copy()

    def mark_synced(self, seq: int) -> None:
        self.synced_seq = max(self.synced_seq, seq)

    def _set_row(self, row: int, seq: int, expires_ms: int, vector: np.ndarray) -> None:
        self._vectors[row] = vector
        self._seqs[row] = seq
        self._expires_ms[row] = expires_ms
        self._earliest_expiry_ms = min(self._earliest_expiry_ms, expires_ms)

    def _start_graph(self) -> None:
        self._graph = GraphIndex(
            ndim=self.dimensions,
            metric="ip",
            dtype="i8",
            connectivity=GRAPH_CONNECTIVITY,
            expansion_add=GRAPH_EXPANSION_ADD,
            expansion_search=GRAPH_EXPANSION_SEARCH,
        )
        self._graph_pending = self._seqs[: len(self._ids)].tolist()
        self._graph_rows = {seq: row for row, seq in enumerate(self._graph_pending)}

    def _graph_note(self, row: int) -> None:
        if self._graph is not None:
            seq = int(self._seqs[row])
            self._graph_rows[seq] = row
            self._graph_pending.append(seq)
            # Only a search adds the pending numbers: Stores with no lookup
            # between them (exact traffic, a load) grew the list by one per
            # Store without bound. Those of removed or replaced versions go.
            if len(self._graph_pending) > 2 * len(self._ids) + 1024:
                self._graph_pending = list(
                    dict.fromkeys(seq for seq in self._graph_pending if seq in self._graph_rows)
                )

    def _graph_forget(self, row: int) -> None:
        if self._graph is None:
            return
        seq = int(self._seqs[row])
        del self._graph_rows[seq]
        if self._graph_batch is not None:
            self._removed_during_batch.append(seq)
        else:
            # Removing a pending number from the graph is a no-op.
            self._graph.remove(seq)

    def _graph_ready(self) -> bool:
        """Brings the graph up to date if that is quick; whether it may be
        searched now. A batch too large to add inline is handed to a worker
        and the graph stays out of service until the worker is done."""
        batch = self._graph_batch
        if batch is not None:
            if not batch.done():
                return False
            self._graph_batch = None
            removed, self._removed_during_batch = self._removed_during_batch, []
            if batch.error is not None:
                # The graph's state is unknown: start over from the rows.
                self._start_graph()
            elif removed:
                self._graph.remove(np.asarray(removed, np.uint64))
        # A number may be pending twice: removed before it was added, then
        # upserted again (a replay of the same version); the graph refuses
        # a duplicate key, so each goes once.
        seqs = list(dict.fromkeys(seq for seq in self._graph_pending if seq in self._graph_rows))
        self._graph_pending = []
        if not seqs:
            return True
        rows = np.fromiter((self._graph_rows[seq] for seq in seqs), np.int64, len(seqs))
        keys = np.asarray(seqs, np.uint64)
        # Fancy indexing copies: the worker never sees rows move.
        vectors = self._vectors[rows]
        if len(seqs) <= INLINE_GRAPH_ADDS:
            self._graph.add(keys, vectors, copy=True, threads=GRAPH_BUILD_THREADS)
            return True
        self._graph_batch = _GraphBatch(self._graph, keys, vectors)
        return False

    def wait_for_graph(self, timeout: float | None = None) -> bool:
        """Blocks until no batch is being added (for tests and benchmarks;
        the service never waits); whether that happened within ``timeout``."""
        batch = self._graph_batch
        return batch is None or batch.wait(timeout)

    def _grow(self) -> None:
        # Doubling keeps the many one-entry sub-partitions (one per
        # conversation) small while appends stay amortized O(1).
        rows = min(self.max_entries, 2 * self.allocated_rows)
        self._vectors = np.resize(self._vectors, (rows, self.dimensions))
        self._seqs = np.resize(self._seqs, rows)
        self._expires_ms = np.resize(self._expires_ms, rows)

    def _index_words(self, seq: int, question: str, *, remove: bool = False) -> None:
        """Adds the entry version ``seq`` to the postings of its question's
        content words' stems, or removes it."""
        postings = self._postings
        if postings is None:
            return
        seq = int(seq)  # one number object shared by all its words
        for word in analyze(question).stems:
            holders = postings.get(word)
            if not remove:
                if holders is None:
                    postings[word] = seq
                elif isinstance(holders, int):
                    postings[word] = array.array("q", (holders, seq))
                else:
                    holders.append(seq)
            elif isinstance(holders, int):
                del postings[word]
            else:
                holders.remove(seq)
                if len(holders) == 1:
                    postings[word] = holders[0]

    def _remove_row(self, row: int) -> None:
        self._graph_forget(row)
        last = len(self._ids) - 1
        removed = self._ids[row]
        self._index_words(int(self._seqs[row]), self._questions[row], remove=True)
        if row != last:
            if self._graph is not None:
                self._graph_rows[int(self._seqs[last])] = row
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

    def _drop_expired(self, now_ms: int) -> None:
        """Removes the rows expired by ``now_ms``, each as a removal does
        (the last row moved into its place), from the highest row down: the
        rows above one being removed are live by then, so the row moved in
        is a live one. Entries stored over time expire over time, so a busy
        index has a few rows expired at nearly every search: compacting
        every array and rebuilding every id's row for them copied the whole
        index each time (a bug hunt: 1M rows of 384 dimensions, 1-3.6 s a
        lookup once they began to expire a millisecond apart)."""
        size = len(self._ids)
        for row in np.flatnonzero(self._expires_ms[:size] <= now_ms)[::-1].tolist():
            self._remove_row(row)
        size = len(self._ids)
        self._earliest_expiry_ms = int(self._expires_ms[:size].min()) if size else np.iinfo(np.int64).max


class IndexRegistry:
    """The resident indexes, least recently used first, within memory bounds."""

    def __init__(
        self,
        max_entries: int,
        max_rows: int,
        approximate_from: int,
        max_indexes: int = MAX_RESIDENT_INDEXES,
    ) -> None:
        self._max_entries = max_entries
        self._approximate_from = approximate_from
        self._max_rows = max_rows
        self._max_indexes = max_indexes
        self._indexes: collections.OrderedDict[str, VectorIndex] = collections.OrderedDict()
        self._counted_rows: dict[str, int] = {}
        self._rows = 0

    def __len__(self) -> int:
        return len(self._indexes)

    @property
    def resident_entries(self) -> int:
        """The entries the indexes hold (a scrape's sum: up to MAX_RESIDENT_INDEXES of them).
        Read on the metrics server's thread while lookups reorder the
        registry on the event loop's: list() copies the indexes in one C
        call, under the GIL, where iterating the live view raised
        'OrderedDict mutated during iteration' and failed the scrape."""
        return sum(len(index) for index in list(self._indexes.values()))

    @property
    def resident_rows(self) -> int:
        """The indexes' rows, their postings' words counted as rows (``VectorIndex.weight_rows``)."""
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
            index = VectorIndex(dimensions, self._max_entries, self._approximate_from)
            self._indexes[key] = index
            self._counted_rows[key] = 0
        return index

    def holds(self, key: str, index: VectorIndex) -> bool:
        """Whether ``index`` is still the one resident under ``key`` (not
        pushed out, nor replaced by one of another size), without marking
        it used."""
        return self._indexes.get(key) is index

    def settle(self, key: str, *, used: bool = True) -> None:
        """Accounts for the growth of ``key``'s index, marks it recently
        used (unless not ``used``), and pushes out the least recently used
        others while over the bounds. Marked used: an index loading from
        Redis settles after each batch, and a long load must not drift to
        the front of the queue and be pushed out by the very loads it waits
        beside. Not ``used``: a background check of its rows against Redis
        (the cache servicer's _drop_rows_gone), which no lookup asked for
        since the one that started it; marked used, an index checked after
        another was looked up outlived that one."""
        index = self._indexes.get(key)
        if index is None:
            return
        if used:
            self._indexes.move_to_end(key)
        weight = index.weight_rows
        self._rows += weight - self._counted_rows[key]
        self._counted_rows[key] = weight
        while len(self._indexes) > 1 and (
            self._rows > self._max_rows or len(self._indexes) > self._max_indexes
        ):
            # Used, ``key`` is last and more than one is resident: never itself.
            self._forget(next(iter(self._indexes)))

    def drop(self, key: str, index: VectorIndex) -> None:
        """Forgets ``index`` if it is still the one resident under ``key``
        (not one loaded afresh since)."""
        if self.holds(key, index):
            self._forget(key)

    def drop_prefix(self, prefix: str) -> None:
        for key in [k for k in self._indexes if k.startswith(prefix)]:
            self._forget(key)

    def _forget(self, key: str) -> None:
        if self._indexes.pop(key, None) is not None:
            self._rows -= self._counted_rows.pop(key)
