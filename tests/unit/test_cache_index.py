"""The in-memory vector index: top-1 search, eviction order, expiry, memory bounds."""

from __future__ import annotations

import numpy as np
import pytest

from services.cache.index import IndexRegistry, VectorIndex

DIMS = 8
FAR_FUTURE = 2**62


def unit(*components: float) -> np.ndarray:
    vector = np.zeros(DIMS, np.float32)
    vector[: len(components)] = components
    return vector / np.linalg.norm(vector)


def test_best_is_the_most_similar_entry():
    index = VectorIndex(DIMS, max_entries=10)
    assert index.best(unit(1), now_ms=0) is None
    index.upsert("a", 1, FAR_FUTURE, unit(1, 0))
    index.upsert("b", 2, FAR_FUTURE, unit(1, 1))
    index.upsert("c", 3, FAR_FUTURE, unit(0, 1))
    match = index.best(unit(1, 0.2), now_ms=0)
    assert match.entry_id == "a"
    assert match.similarity == pytest.approx(float(unit(1, 0) @ unit(1, 0.2)))
    assert index.best(unit(0.2, 1), now_ms=0).entry_id == "c"


def test_growth_keeps_every_row():
    index = VectorIndex(DIMS, max_entries=100)
    for i in range(40):
        index.upsert(f"e{i}", i + 1, FAR_FUTURE, unit(*([0] * (i % DIMS)), 1))
    assert len(index) == 40
    for i in range(DIMS):
        assert index.best(unit(*([0] * i), 1), now_ms=0).similarity == pytest.approx(1.0)


def test_full_index_evicts_the_lowest_sequence_number():
    index = VectorIndex(DIMS, max_entries=3)
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
    index = VectorIndex(DIMS, max_entries=3)
    index.upsert("a", 2, FAR_FUTURE, unit(1))
    index.upsert("a", 1, FAR_FUTURE, unit(0, 1))
    assert index.best(unit(1), now_ms=0).similarity == pytest.approx(1.0)
    index.upsert("a", 3, FAR_FUTURE, unit(0, 1))
    assert len(index) == 1
    assert index.best(unit(0, 1), now_ms=0).seq == 3


def test_remove_with_seq_spares_a_newer_version():
    index = VectorIndex(DIMS, max_entries=3)
    index.upsert("a", 1, FAR_FUTURE, unit(1))
    index.upsert("b", 2, FAR_FUTURE, unit(0, 1))
    index.upsert("a", 3, FAR_FUTURE, unit(1))
    index.remove("a", seq=1)
    assert "a" in index
    index.remove("a", seq=3)
    assert "a" not in index
    assert index.best(unit(1), now_ms=0).entry_id == "b"


def test_expired_rows_are_never_returned_and_are_dropped():
    index = VectorIndex(DIMS, max_entries=10)
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


def test_registry_pushes_out_the_least_recently_used_index():
    registry = IndexRegistry(max_entries=100, max_rows=8)
    for name in ("p:a", "p:b", "q:c"):
        index = registry.get_or_create(name, DIMS)
        for i in range(3):
            index.upsert(f"{name}{i}", i + 1, FAR_FUTURE, unit(1))
        registry.settle(name)
    # Each holds 4 allocated rows: only two fit in 8.
    assert registry.get("p:a") is None
    assert registry.get("p:b") is not None and registry.get("q:c") is not None
    assert registry.resident_rows == 8
    registry.drop_prefix("p:")
    assert len(registry) == 1 and registry.resident_rows == 4


def test_registry_bounds_the_number_of_indexes():
    registry = IndexRegistry(max_entries=100, max_indexes=2)
    for name in ("a", "b", "c"):
        registry.get_or_create(name, DIMS)
        registry.settle(name)
    registry.get("b")
    registry.get_or_create("d", DIMS)
    registry.settle("d")
    assert [n for n in "abcd" if registry.get(n) is not None] == ["b", "d"]


def test_registry_replaces_an_index_of_another_size():
    registry = IndexRegistry(max_entries=10)
    old = registry.get_or_create("k", DIMS)
    old.upsert("a", 1, FAR_FUTURE, unit(1))
    new = registry.get_or_create("k", 2 * DIMS)
    assert new is not old and new.dimensions == 2 * DIMS and len(new) == 0
