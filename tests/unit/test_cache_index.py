"""The in-memory vector index: top-1 search, eviction order, expiry, memory bounds."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import tracemalloc

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from services.cache import index as index_module
from services.cache.index import IndexRegistry, VectorIndex
from services.cache.verifier import analyze

DIMS = 8
FAR_FUTURE = 2**62


def unit(*components: float) -> np.ndarray:
    vector = np.zeros(DIMS, np.float32)
    vector[: len(components)] = components
    return vector / np.linalg.norm(vector)


def test_best_is_the_most_similar_entry():
    index = VectorIndex(DIMS, max_entries=10, approximate_from=10**9)
    assert index.best(unit(1), now_ms=0) is None
    index.upsert("a", 1, FAR_FUTURE, unit(1, 0))
    index.upsert("b", 2, FAR_FUTURE, unit(1, 1))
    index.upsert("c", 3, FAR_FUTURE, unit(0, 1))
    match = index.best(unit(1, 0.2), now_ms=0)
    assert match.entry_id == "a"
    assert match.similarity == pytest.approx(float(unit(1, 0) @ unit(1, 0.2)))
    assert index.best(unit(0.2, 1), now_ms=0).entry_id == "c"


def test_growth_keeps_every_row():
    index = VectorIndex(DIMS, max_entries=100, approximate_from=10**9)
    for i in range(40):
        index.upsert(f"e{i}", i + 1, FAR_FUTURE, unit(*([0] * (i % DIMS)), 1))
    assert len(index) == 40
    for i in range(DIMS):
        assert index.best(unit(*([0] * i), 1), now_ms=0).similarity == pytest.approx(1.0)


def test_full_index_evicts_the_lowest_sequence_number():
    index = VectorIndex(DIMS, max_entries=3, approximate_from=10**9)
    # Arrival order differs from sequence order, as after a reload.
    index.upsert("second", 20, FAR_FUTURE, unit(0, 1))
    index.upsert("first", 10, FAR_FUTURE, unit(1))
    index.upsert("third", 30, FAR_FUTURE, unit(0, 0, 1))
    index.upsert("fourth", 40, FAR_FUTURE, unit(0, 0, 0, 1))
    assert "first" not in index
    assert all(e in index for e in ("second", "third", "fourth"))
    index.upsert("fifth", 50, FAR_FUTURE, unit(0, 0, 0, 0, 1))
    assert "second" not in index
    # An entry older than everything kept is not let back in.
    index.upsert("stale", 5, FAR_FUTURE, unit(1))
    assert "stale" not in index and len(index) == 3


def test_upsert_replaces_only_with_a_newer_version():
    index = VectorIndex(DIMS, max_entries=3, approximate_from=10**9)
    index.upsert("a", 2, FAR_FUTURE, unit(1))
    index.upsert("a", 1, FAR_FUTURE, unit(0, 1))
    assert index.best(unit(1), now_ms=0).similarity == pytest.approx(1.0)
    index.upsert("a", 3, FAR_FUTURE, unit(0, 1))
    assert len(index) == 1
    assert index.best(unit(0, 1), now_ms=0).seq == 3


def test_remove_with_seq_spares_a_newer_version():
    index = VectorIndex(DIMS, max_entries=3, approximate_from=10**9)
    index.upsert("a", 1, FAR_FUTURE, unit(1))
    index.upsert("b", 2, FAR_FUTURE, unit(0, 1))
    index.upsert("a", 3, FAR_FUTURE, unit(1))
    index.remove("a", seq=1)
    assert "a" in index
    index.remove("a", seq=3)
    assert "a" not in index
    assert index.best(unit(1), now_ms=0).entry_id == "b"


def test_expired_rows_are_never_returned_and_are_dropped():
    index = VectorIndex(DIMS, max_entries=10, approximate_from=10**9)
    index.upsert("expires", 1, 1_000, unit(1))
    index.upsert("lives", 2, 5_000, unit(1, 1))
    index.upsert("other", 3, 5_000, unit(0, 0, 1))
    assert index.best(unit(1), now_ms=999).entry_id == "expires"
    assert index.best(unit(1), now_ms=1_000).entry_id == "lives"
    assert "expires" not in index and len(index) == 2
    # The rows moved by the compaction still answer correctly.
    assert index.best(unit(0, 0, 1), now_ms=1_000).entry_id == "other"
    assert index.best(unit(1), now_ms=5_000) is None
    assert len(index) == 0


def test_a_few_expired_rows_are_dropped_without_copying_the_index():
    """Entries stored over time expire over time: a busy index has a few
    rows expired at nearly every search. Dropping them compacted every
    array, a copy of the whole index per search (at 1M rows of 384
    dimensions, 1-3.6 s a lookup); each is now removed as a removal is.
    Measured in bytes allocated, not time: 20,000 rows of 64 dimensions
    hold 5 MB of vectors, a row 256 bytes."""
    dims, rows = 64, 20_000
    index = VectorIndex(dims, max_entries=rows, approximate_from=10**9)
    vectors = np.random.default_rng(7).standard_normal((rows, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in range(rows):
        # Every hundredth row expires at 1,000 + i; the rest later.
        index.upsert(f"e{i}", i + 1, 1_000 + i if i % 100 == 0 else FAR_FUTURE, vectors[i])
    tracemalloc.start()
    try:
        found = index.nearest(vectors[rows - 1], now_ms=1_000 + 250, count=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # e0, e100 and e200 expired; the search's own arrays are ~100 KB.
    assert len(index) == rows - 3 and not any(e in index for e in ("e0", "e100", "e200"))
    assert peak < 1_000_000, peak
    assert found[0].entry_id == f"e{rows - 1}"
    # The row moved into each expired one's place still answers as itself.
    for i in (rows - 1, rows - 2, rows - 3, 300, 99):
        assert index.best(vectors[i], now_ms=1_250).entry_id == f"e{i}"


def test_registry_pushes_out_the_least_recently_used_index():
    registry = IndexRegistry(max_entries=100, max_rows=8, approximate_from=10**9)
    for name in ("p:a", "p:b", "q:c"):
        index = registry.get_or_create(name, DIMS)
        for i in range(3):
            index.upsert(f"{name}{i}", i + 1, FAR_FUTURE, unit(1))
        registry.settle(name)
    # Each holds 4 allocated rows: only two fit in 8.
    assert registry.get("p:a") is None
    assert registry.get("p:b") is not None and registry.get("q:c") is not None
    assert registry.resident_rows == 8
    # What they hold: 3 entries each (the gauge said the 8 allocated).
    assert registry.resident_entries == 6
    registry.drop_prefix("p:")
    assert len(registry) == 1 and registry.resident_rows == 4 and registry.resident_entries == 3


def test_an_index_that_settles_is_marked_recently_used():
    registry = IndexRegistry(max_entries=100, max_rows=10, approximate_from=10**9)
    loading = registry.get_or_create("loading", DIMS)
    loading.upsert("l0", 1, FAR_FUTURE, unit(1))
    registry.settle("loading")
    registry.get_or_create("b", DIMS).upsert("b0", 2, FAR_FUTURE, unit(1))
    registry.settle("b")
    # Its next batch (as a load from Redis settles after each): now the
    # most recently used, so the next index over the bound pushes out "b".
    loading.upsert("l1", 3, FAR_FUTURE, unit(1))
    registry.settle("loading")
    # 8 rows allocated beside 2 and 1: one of the others must go.
    crowded = registry.get_or_create("c", DIMS)
    for i in range(5):
        crowded.upsert(f"c{i}", 4 + i, FAR_FUTURE, unit(1))
    registry.settle("c")
    assert registry.holds("loading", loading) and registry.get("b") is None


def test_registry_counts_the_postings_words_as_rows():
    registry = IndexRegistry(max_entries=100, max_rows=16, approximate_from=10**9)
    for name in ("a", "b"):
        index = registry.get_or_create(name, DIMS)
        for i in range(3):
            index.upsert(f"{name}{i}", i + 1, FAR_FUTURE, unit(1))
        registry.settle(name)
    wordy = registry.get_or_create("c", DIMS)
    # 3 questions of 100 distinct words each: 15 rows' worth beside 4 allocated.
    letters = "bcdfghjklmnpqrstvwxz"
    for i in range(3):
        words = [letters[(n // 20) % 20] + "a" + letters[n % 20] + "o" + letters[i] for n in range(100)]
        wordy.upsert(f"c{i}", i + 1, FAR_FUTURE, unit(1), " ".join(words))
    assert len(analyze(" ".join(words)).stems) == 100
    registry.settle("c")
    assert wordy.weight_rows == 4 + 300 // index_module.POSTED_WORDS_PER_ROW
    assert registry.get("a") is None and registry.get("b") is None and registry.get("c") is wordy
    assert registry.resident_rows == wordy.weight_rows


def test_registry_bounds_the_number_of_indexes():
    registry = IndexRegistry(max_entries=100, max_rows=1000, approximate_from=10**9, max_indexes=2)
    for name in ("a", "b", "c"):
        registry.get_or_create(name, DIMS)
        registry.settle(name)
    registry.get("b")
    registry.get_or_create("d", DIMS)
    registry.settle("d")
    assert [n for n in "abcd" if registry.get(n) is not None] == ["b", "d"]


def test_registry_replaces_an_index_of_another_size():
    registry = IndexRegistry(max_entries=10, max_rows=100, approximate_from=10**9)
    old = registry.get_or_create("k", DIMS)
    old.upsert("a", 1, FAR_FUTURE, unit(1))
    new = registry.get_or_create("k", 2 * DIMS)
    assert new is not old and new.dimensions == 2 * DIMS and len(new) == 0


def test_stores_with_no_search_between_them_keep_the_graphs_pending_list_bounded():
    """Only a search adds the graph's pending rows; a replica storing again
    and again with no lookup (exact traffic, replaced entries) grew the
    list by one number per Store."""
    rng = np.random.default_rng(5)
    index = VectorIndex(16, max_entries=100, approximate_from=50)
    vectors = _random_units(rng, 100, 16)
    for i, vector in enumerate(vectors):
        index.upsert(f"e{i}", i + 1, FAR_FUTURE, vector)
    for seq in range(101, 20_001):
        index.upsert(f"e{seq % 100}", seq, FAR_FUTURE, vectors[seq % 100])
    assert len(index._graph_pending) <= 2 * len(index) + 1024
    # What is pending is still added: the newest version of each entry is found.
    index.nearest(vectors[7], 0, 1)
    assert index.wait_for_graph(timeout=120)
    assert index.nearest(vectors[7], 0, 1)[0].entry_id == "e7"


@pytest.fixture
def deterministic_graph_builds(monkeypatch):
    """Builds graphs with one thread. With two, usearch links concurrent
    insertions in whatever order the threads reach them, so each build is a
    different graph: on these 2k random rows the recall of the exact top 5
    varied from 0.96 to 1.0 between builds of the same rows (0.75% of builds
    under the 0.99 bar, more often on a loaded machine). One thread builds the
    same graph every time (recall 1.0 in 400 of 400 builds), so a recall bar
    judges the index's bookkeeping, not the scheduler; the recall of the
    production thread count at scale is bench/cache_scale_bench.py's to show."""
    monkeypatch.setattr(index_module, "GRAPH_BUILD_THREADS", 1)


def _random_units(rng: np.random.Generator, count: int, dims: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dims)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_approximate_index_agrees_with_the_exact_scan_through_replacements_removals_and_expiry(
    deterministic_graph_builds,
):
    rng = np.random.default_rng(7)
    dims = 32
    exact = VectorIndex(dims, max_entries=5000, approximate_from=10**9)
    approximate = VectorIndex(dims, max_entries=5000, approximate_from=100)
    vectors = _random_units(rng, 1500, dims)
    seq = 0
    for i, vector in enumerate(vectors):
        seq += 1
        # Every tenth entry expires early; the rest live on.
        expires = 1_000 if i % 10 == 0 else FAR_FUTURE
        for index in (exact, approximate):
            index.upsert(f"e{i}", seq, expires, vector, f"q{i}")
    assert approximate.approximate and not exact.approximate
    # Replace some vectors (a newer version moves the entry) and remove others.
    for i in range(1, 1500, 7):
        seq += 1
        moved = _random_units(rng, 1, dims)[0]
        for index in (exact, approximate):
            index.upsert(f"e{i}", seq, FAR_FUTURE, moved, f"moved{i}")
    for i in range(3, 1500, 11):
        for index in (exact, approximate):
            index.remove(f"e{i}")
    now_ms = 2_000
    # The first search hands the graph's rows to a worker; once it is done
    # the graph answers.
    approximate.nearest(vectors[0], now_ms, 5)
    assert approximate.wait_for_graph(timeout=120)
    agreed = 0
    queries = vectors[rng.integers(0, len(vectors), 200)] + 0.05 * _random_units(rng, 200, dims)
    for query in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        expected = exact.nearest(query, now_ms, 5)
        found = approximate.nearest(query, now_ms, 5)
        similarities = [m.similarity for m in found]
        assert len(found) == 5 and similarities == sorted(similarities, reverse=True)
        # Whatever the graph proposes is a live, current row with its exact similarity.
        for match in found:
            assert match.entry_id in exact and match.seq == exact._seqs[exact._rows[match.entry_id]]
            assert match.similarity == pytest.approx(float(match.vector @ query), abs=1e-5)
        agreed += len({m.entry_id for m in expected} & {m.entry_id for m in found})
    assert len(approximate) == len(exact)
    assert agreed / (5 * len(queries)) >= 0.99


def test_approximate_index_never_returns_a_removed_entry():
    rng = np.random.default_rng(3)
    index = VectorIndex(16, max_entries=1000, approximate_from=50)
    vectors = _random_units(rng, 300, 16)
    for i, vector in enumerate(vectors):
        index.upsert(f"e{i}", i + 1, FAR_FUTURE, vector)
    index.nearest(vectors[0], 0, 5)  # the graph is built here, off the loop
    assert index.wait_for_graph(timeout=120)
    index.remove("e0")
    assert all(m.entry_id != "e0" for m in index.nearest(vectors[0], 0, 5))
    # Eviction when full removes the oldest from the graph as well.
    small = VectorIndex(16, max_entries=60, approximate_from=50)
    for i, vector in enumerate(vectors[:60]):
        small.upsert(f"e{i}", i + 1, FAR_FUTURE, vector)
    small.nearest(vectors[0], 0, 1)
    small.upsert("new", 1000, FAR_FUTURE, vectors[100])
    assert "e0" not in small
    assert all(m.entry_id != "e0" for m in small.nearest(vectors[0], 0, 5))
    assert small.nearest(vectors[100], 0, 1)[0].entry_id == "new"


@pytest.fixture
def gated_graph_builds(monkeypatch):
    """Holds every batch added off the loop until the test opens the gate,
    so that "during a rebuild" is a state, not a race."""
    gate = threading.Event()
    real_add = index_module._add_to_graph

    def add_after_gate(graph, keys, vectors):
        gate.wait(timeout=120)
        real_add(graph, keys, vectors)

    monkeypatch.setattr(index_module, "_add_to_graph", add_after_gate)
    yield gate
    gate.set()


def test_searches_scan_exactly_while_a_large_batch_joins_the_graph(
    gated_graph_builds, deterministic_graph_builds
):
    rng = np.random.default_rng(11)
    dims = 32
    exact = VectorIndex(dims, max_entries=10_000, approximate_from=10**9)
    index = VectorIndex(dims, max_entries=10_000, approximate_from=100)
    vectors = _random_units(rng, 2000, dims)
    for i, vector in enumerate(vectors):
        for each in (exact, index):
            each.upsert(f"e{i}", i + 1, FAR_FUTURE, vector, f"q{i}")
    # More rows than the loop adds inline: the first search hands them to a
    # worker and is answered by the exact scan, as is every search meanwhile.
    assert len(index) > index_module.INLINE_GRAPH_ADDS
    for query in vectors[:20]:
        assert [m.entry_id for m in index.nearest(query, 0, 5)] == [
            m.entry_id for m in exact.nearest(query, 0, 5)
        ]
    assert index.building
    # Changes meanwhile: a removal waits for the worker, a Store joins later.
    for each in (exact, index):
        each.remove("e0")
        each.upsert("late", 5000, FAR_FUTURE, vectors[1], "late")
    assert all(m.entry_id != "e0" for m in index.nearest(vectors[0], 0, 5))
    assert index.building
    gated_graph_builds.set()
    assert index.wait_for_graph(timeout=120)
    found = index.nearest(vectors[1], 0, 2)
    assert not index.building and index.approximate
    assert {m.entry_id for m in found} == {"e1", "late"}
    # The removal reached the graph: it proposes e0 to nobody.
    assert index._graph.count(1) == 0 and "e0" not in index  # e0 had sequence number 1
    agreed = sum(
        len({m.entry_id for m in index.nearest(q, 0, 5)} & {m.entry_id for m in exact.nearest(q, 0, 5)})
        for q in vectors[100:300]
    )
    assert agreed / (5 * 200) >= 0.99


def test_a_failed_batch_is_rebuilt_from_the_rows(monkeypatch):
    rng = np.random.default_rng(5)
    index = VectorIndex(16, max_entries=1000, approximate_from=50)
    vectors = _random_units(rng, 200, 16)
    for i, vector in enumerate(vectors):
        index.upsert(f"e{i}", i + 1, FAR_FUTURE, vector)
    real_add = index_module._add_to_graph
    failures = []

    def fail_once(graph, keys, vectors):
        if not failures:
            failures.append(len(keys))
            raise MemoryError("no room for the graph")
        real_add(graph, keys, vectors)

    monkeypatch.setattr(index_module, "_add_to_graph", fail_once)
    assert index.nearest(vectors[3], 0, 1)[0].entry_id == "e3"  # exact, meanwhile
    assert index.wait_for_graph(timeout=60)
    # The next search sees the failure and starts over with every row.
    assert index.nearest(vectors[4], 0, 1)[0].entry_id == "e4"
    assert failures == [200]
    assert index.wait_for_graph(timeout=60)
    assert index.nearest(vectors[5], 0, 1)[0].entry_id == "e5"
    assert not index.building and len(index._graph) == 200


def test_resident_bytes_counts_the_rows_arrays_then_the_graphs_int8_copies_too():
    rows, row_bytes = 40, DIMS * 4 + 8 + 8  # a float32 vector, a sequence number, an expiry
    vectors = np.random.default_rng(3).standard_normal((rows, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = VectorIndex(DIMS, max_entries=rows, approximate_from=10**9)
    graphed = VectorIndex(DIMS, max_entries=rows, approximate_from=1)
    for i, vector in enumerate(vectors):
        exact.upsert(f"e{i}", i + 1, FAR_FUTURE, vector, f"Question number {i}?")
        graphed.upsert(f"e{i}", i + 1, FAR_FUTURE, vector, f"Question number {i}?")
    graphed.nearest(vectors[0], 0, 1)  # hands the pending rows to the graph
    assert graphed.wait_for_graph(timeout=60) and graphed.approximate and not exact.approximate
    assert exact.allocated_rows == graphed.allocated_rows == rows
    assert exact.resident_bytes == rows * row_bytes
    # The graph holds an int8 copy of each row (a byte a dimension) and its links.
    assert graphed.resident_bytes >= rows * row_bytes + rows * DIMS


def test_may_match_follows_the_stored_questions_content_words():
    index = VectorIndex(DIMS, max_entries=3, approximate_from=10)
    words = lambda text: analyze(text).stems  # noqa: E731
    assert not index.may_match(words("How do I bake sourdough bread?"))  # empty
    index.upsert("a", 1, FAR_FUTURE, unit(1), "How do I bake sourdough bread?")
    assert index.may_match(words("Best flour for sourdough?"))
    # Function words are no evidence: "how do I" is shared, "bake" is not.
    assert not index.may_match(words("How do I change a tyre?"))
    # A newer version of the entry replaces its words.
    index.upsert("a", 2, FAR_FUTURE, unit(1), "How do I change a tyre?")
    assert index.may_match(words("How do I change a tyre?"))
    assert not index.may_match(words("Best flour for sourdough?"))
    # Removal, eviction and expiry take their words away.
    index.upsert("b", 3, 1_000, unit(0, 1), "Who wrote Hamlet?")
    assert index.may_match(words("When was Hamlet written?"))
    index.nearest(unit(1), 2_000, 1)  # b has expired
    assert not index.may_match(words("When was Hamlet written?"))
    index.remove("a")
    assert not index.may_match(words("How do I change a tyre?"))
    questions = ("Who painted Guernica?", "Where is Timbuktu?", "What is photosynthesis?")
    questions += ("How tall is Everest?",)
    for i, question in enumerate(questions):
        index.upsert(f"c{i}", 10 + i, FAR_FUTURE, unit(1, i), question)
    # Full at three: the oldest was evicted, and its words with it.
    assert len(index) == 3 and not index.may_match(words("Who painted Guernica?"))
    assert index.may_match(words("How tall is Everest?"))


def test_a_partition_on_the_graph_keeps_no_word_counts():
    index = VectorIndex(DIMS, max_entries=100, approximate_from=5)
    for i in range(5):
        index.upsert(f"e{i}", i + 1, FAR_FUTURE, unit(1, i), f"Question number {i}?")
    # Too large to be worth counting: every question may match.
    assert index.approximate and index.may_match(analyze("Anything else entirely?").stems)


def test_may_match_needs_one_stored_question_with_the_share_of_the_words():
    index = VectorIndex(DIMS, max_entries=10, approximate_from=10)
    words = lambda text: analyze(text).stems  # noqa: E731
    index.upsert("a", 1, FAR_FUTURE, unit(1), "How do I bake sourdough bread at home?")
    index.upsert("b", 2, FAR_FUTURE, unit(0, 1), "What is the quickest way to learn Python?")
    # {best, learn, play, guitar, home}: one word in each stored question,
    # 1/5 in either, is below 0.3 even though the two together hold 2/5.
    guitar = words("What is the best way to learn to play the guitar at home?")
    assert index.may_match(guitar) and index.may_match(guitar, 0.2)
    assert not index.may_match(guitar, 0.3)
    # {good, book, read} against a stored {book, worth, reading}: 2/3, as
    # "reading" and "read" have one stem (verifier.stem).
    index.upsert("c", 3, FAR_FUTURE, unit(1, 1), "Which books are worth reading?")
    books = words("What are good books to read?")
    assert index.may_match(books, 0.6) and not index.may_match(books, 0.7)
    # A replaced question takes its words out of the postings.
    index.upsert("c", 4, FAR_FUTURE, unit(1, 1), "Who painted the Sistine Chapel?")
    assert not index.may_match(books)
    assert index.may_match(words("Which artist painted the Sistine Chapel ceiling?"), 0.5)
    assert not index.may_match(words("What is it?"), 0.3)  # no content word
    assert not index.may_match(guitar, 1.0)


def test_a_version_removed_before_the_graph_added_it_may_come_back():
    index = VectorIndex(DIMS, max_entries=10, approximate_from=2)
    index.upsert("a", 1, FAR_FUTURE, unit(1, 0))
    index.upsert("b", 2, FAR_FUTURE, unit(0, 1))
    index.remove("b", 2)
    index.upsert("b", 2, FAR_FUTURE, unit(0, 1))  # the same version, replayed
    assert index.best(unit(0, 1), now_ms=0).entry_id == "b"


QUESTIONS = (
    "How do I bake sourdough bread?",
    "Best flour for sourdough bread?",
    "How tall is Everest?",
    "Who painted Guernica?",
    "",
)
_OPERATIONS = st.lists(
    st.one_of(
        # A new version of an entry (the next sequence number).
        st.tuples(
            st.just("upsert"),
            st.sampled_from("abcdef"),
            st.sampled_from(QUESTIONS),
            st.sampled_from((10, 20, FAR_FUTURE)),
        ),
        # An earlier upsert again (a replay: older than the entry's version
        # or than every kept entry, or the same version).
        st.tuples(st.just("replay"), st.integers(0, 50)),
        st.tuples(st.just("remove"), st.sampled_from("abcdef"), st.booleans()),
        # A search at this time, which drops the expired rows.
        st.tuples(st.just("search"), st.sampled_from((0, 15, 25))),
    ),
    max_size=40,
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    operations=_OPERATIONS,
    max_entries=st.integers(1, 5),
    approximate_from=st.sampled_from((10**9, 4)),
)
def test_postings_always_equal_a_recomputation_from_the_live_entries(
    operations, max_entries, approximate_from
):
    index = VectorIndex(DIMS, max_entries=max_entries, approximate_from=approximate_from)
    upserts: list[tuple[str, int, int, str]] = []
    for operation in operations:
        match operation:
            case ("upsert", entry_id, question, expires_ms):
                upserts.append((entry_id, len(upserts) + 1, expires_ms, question))
                entry_id, seq, expires_ms, question = upserts[-1]
            case ("replay", which):
                if not upserts:
                    continue
                entry_id, seq, expires_ms, question = upserts[which % len(upserts)]
            case ("remove", entry_id, only_its_version):
                seq = (
                    int(index._seqs[index._rows[entry_id]])
                    if entry_id in index and only_its_version
                    else None
                )
                index.remove(entry_id, seq)
                continue
            case ("search", now_ms):
                index.nearest(unit(1), now_ms, 1)
                continue
        index.upsert(entry_id, seq, expires_ms, unit(1), question)

    if index.approximate:
        assert index._postings is None
        return
    expected: dict[str, set[int]] = {}
    for row in range(len(index)):
        for word in analyze(index._questions[row]).stems:
            expected.setdefault(word, set()).add(int(index._seqs[row]))
    postings = {}
    for word, holders in index._postings.items():
        if isinstance(holders, int):
            postings[word] = {holders}
        else:
            # An array holds two numbers or more, each once.
            assert len(holders) >= 2 and len(set(holders)) == len(holders)
            postings[word] = set(holders)
    assert postings == expected


def test_the_entries_gauge_reads_while_lookups_reorder_the_registry():
    """A scrape runs on the metrics server's thread while lookups reorder
    the registry (get): iterating it there raised 'OrderedDict mutated
    during iteration', and the whole scrape failed (HTTP 500)."""
    registry = IndexRegistry(max_entries=10, max_rows=10**9, approximate_from=10**9)
    for i in range(20_000):
        registry.get_or_create(f"p:{i}", DIMS)
    failures: list[Exception] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                assert registry.resident_entries == 0
            except RuntimeError as error:
                failures.append(error)
                return

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        deadline = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < deadline and not failures:
            registry.get(f"p:{i % 20_000}")
            i += 1
    finally:
        done.set()
        scraper.join()
    assert not failures


def test_a_process_that_imports_the_index_first_can_load_the_local_embedder():
    """usearch puts its C++ runtime symbols first for every library loaded
    after it: imported before anything else C++, onnxruntime's import
    (meshgate.minilm, the cache's local embedder) crashed the process with
    SIGSEGV, as bench/cache_natural.py did once it used the index."""
    script = "import services.cache.index, meshgate.minilm; print('loaded')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "loaded"), done.stderr[-2000:]


def test_the_index_loads_without_onnxruntime_where_the_cache_embeds_through_inference():
    """cache.embedder = "inference" needs no onnxruntime (meshgate/embedding.py
    says to set it where the package is missing): loading it before usearch is
    done only where it is installed (a final read found the import required)."""
    script = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "import services.cache.app, services.cache.index; print('loaded')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "loaded"), done.stderr[-2000:]
