"""The hot cache's coherence rules (services/context/hot_cache.py), without Redis."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from meshgate.common.v1 import common_pb2
from meshgate.embedding import Embeddings
from services.context.hot_cache import HotCache
from services.context.store import StoredSession
from services.context.turn_index import IndexedTurns, features


def session(version: int, *contents: str, updated_ms: int | None = None) -> StoredSession:
    now = int(time.time() * 1000) if updated_ms is None else updated_ms
    return StoredSession(
        version=version,
        create_time_ms=now,
        update_time_ms=now,
        turns=[common_pb2.Message(role=common_pb2.ROLE_USER, content=c) for c in contents],
        token_counts={"t": np.ones(len(contents), np.int64)},
    )


def live_cache(max_bytes: int = 1 << 20, ttl_s: int = 0) -> HotCache:
    cache = HotCache(max_bytes, ttl_s)
    cache.live = True
    return cache


def test_nothing_is_served_while_change_notices_may_be_missed() -> None:
    cache = HotCache(1 << 20)
    assert not cache.put("k", session(1, "a"), cache.ticket())
    cache.live = True
    assert cache.put("k", session(1, "a"), cache.ticket())
    cache.live = False
    assert cache.get("k") is None


def test_a_newer_version_announced_drops_the_entry_an_older_one_does_not() -> None:
    cache = live_cache()
    cache.put("k", session(3, "a"), cache.ticket())
    cache.announce("k", 3)  # this replica's own append, echoed back
    assert cache.get("k").version == 3
    cache.announce("k", 4)
    assert cache.get("k") is None


def test_a_read_that_raced_a_change_is_not_cached() -> None:
    cache = live_cache()
    ticket = cache.ticket()
    cache.announce("k", 5)  # arrives while the read of version 4 is in flight
    assert not cache.put("k", session(4, "a"), ticket)
    # The read of the announced version itself may be cached.
    assert cache.put("k", session(5, "a"), ticket)
    assert cache.get("k").version == 5


def test_an_older_version_announced_after_a_newer_one_does_not_let_a_stale_read_in() -> None:
    cache = live_cache()
    ticket = cache.ticket()  # a read that will see version 6
    cache.announce("k", 7)
    cache.announce("k", 6)  # this replica's own earlier append, announced last
    assert not cache.put("k", session(6, "stale"), ticket)
    assert cache.put("k", session(7, "fresh"), ticket)


def test_a_deletion_while_reading_refuses_any_version() -> None:
    cache = live_cache()
    ticket = cache.ticket()
    cache.announce("k", -1)
    cache.announce("k", 1)  # recreated and appended to
    assert not cache.put("k", session(7, "stale"), ticket)
    assert cache.put("k", session(1, "fresh"), cache.ticket())


def test_clearing_refuses_reads_begun_before() -> None:
    cache = live_cache()
    ticket = cache.ticket()
    cache.clear()
    assert not cache.put("k", session(1, "a"), ticket)
    assert cache.put("k", session(1, "a"), cache.ticket())


def test_clearing_refuses_reads_begun_before_of_a_session_announced_earlier() -> None:
    """A notice remembered from before the notices were lost (a reconnect
    clears the cache) let a read begun before the loss through: its ticket
    was newer than that notice, and what was missed is not known."""
    cache = live_cache()
    cache.announce("k", 1)
    ticket = cache.ticket()
    cache.clear()  # version 2 (a compaction, a deletion) may have been missed here
    assert not cache.put("k", session(1, "stale"), ticket)
    assert cache.put("k", session(2, "fresh"), cache.ticket())


def test_bounded_by_bytes_least_recently_used_first() -> None:
    cache = live_cache(max_bytes=3 * 1024)
    for key in ("a", "b", "c"):
        assert cache.put(key, session(1, "x" * 300), cache.ticket())
    cache.get("a")
    assert cache.put("d", session(1, "x" * 300), cache.ticket())
    assert cache.bytes <= 3 * 1024
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    # An entry larger than the whole cache is not kept.
    assert not cache.put("huge", session(1, "x" * 4096), cache.ticket())


def test_the_bound_counts_a_turn_in_utf8_bytes_not_characters() -> None:
    # 1,000 characters, 4,000 bytes: over the bound only in bytes.
    cache = live_cache(max_bytes=3 * 1024)
    assert not cache.put("emoji", session(1, "😀" * 1000), cache.ticket())
    assert cache.put("ascii", session(1, "x" * 1000), cache.ticket())
    assert cache.bytes >= 1000


def test_an_entry_is_not_served_once_its_session_may_have_expired() -> None:
    cache = live_cache(ttl_s=60)
    old = int(time.time() * 1000) - 61_000
    cache.put("k", session(1, "a", updated_ms=old), cache.ticket())
    assert cache.get("k") is None
    cache.put("k", session(1, "a"), cache.ticket())
    assert cache.get("k") is not None


def test_an_entry_goes_when_redis_said_its_session_expires_whatever_this_replicas_ttl() -> None:
    # Written under a shorter TTL than this replica's (0: kept forever),
    # the session expires in Redis by that one: its entry was served on.
    for ttl_s in (0, 600):
        cache = live_cache(ttl_s=ttl_s)
        expiring = dataclasses.replace(session(1, "a"), expires_at=time.monotonic() - 0.001)
        cache.put("k", expiring, cache.ticket())
        assert cache.get("k") is None
        lasting = dataclasses.replace(session(1, "a"), expires_at=time.monotonic() + 60)
        cache.put("k", lasting, cache.ticket())
        assert cache.get("k") is lasting


@dataclasses.dataclass
class _Index:
    """What attach_index reads of a turn index (turn_index.IndexedTurns)."""

    nbytes: int
    version: int = 1
    create_time_ms: int = 0
    first_live: int = 0


def index_of(entry: StoredSession, nbytes: int = 100, **differing) -> _Index:
    fields = {"version": entry.version, "create_time_ms": entry.create_time_ms, "first_live": entry.compacted}
    return _Index(nbytes, **(fields | differing))


def test_an_index_weighs_its_pinned_facts() -> None:
    empty = np.zeros(0, np.int64)
    facts = ["f" * 4096] * 100

    def index(pinned_facts: list[str]) -> IndexedTurns:
        return IndexedTurns(1, 0, empty, empty.astype(np.uint8), empty, None, {}, [], pinned_facts)

    assert index(facts).nbytes - index([]).nbytes >= 100 * 4096


def test_an_attached_index_counts_against_the_bound() -> None:
    cache = live_cache(max_bytes=10_000)
    older, newer = session(1, "a"), session(1, "b")
    cache.put("older", older, cache.ticket())
    cache.put("newer", newer, cache.ticket())
    before = cache.bytes
    assert cache.attach_index("newer", newer, index_of(newer, 3_000), cache.ticket())
    assert cache.bytes == before + 3_000 and cache.get("newer").index.nbytes == 3_000
    # Past the bound, the least recently used entry goes.
    cache.attach_index("newer", newer, index_of(newer, 9_000), cache.ticket())
    assert cache.get("older") is None and cache.get("newer") is not None
    assert cache.bytes <= 10_000
    # Not the entry cached any more (replaced by a newer read): nothing attached.
    replaced = session(2, "b")
    cache.put("newer", replaced, cache.ticket())
    assert not cache.attach_index("newer", newer, index_of(newer, 1), cache.ticket())
    assert replaced.index is None


def test_an_index_read_across_a_change_that_made_no_version_is_not_attached() -> None:
    # A compaction, a pin, a deletion: each announces -1, at no new version.
    cache = live_cache()
    ticket = cache.ticket()  # the index is read (before the compaction)...
    cache.announce("k", -1)
    compacted = session(6, "", "b")
    compacted.compacted = 1
    # ...and the session as compacted is read and cached meanwhile.
    assert cache.put("k", compacted, cache.ticket())
    assert not cache.attach_index("k", compacted, index_of(compacted), ticket)
    assert compacted.index is None
    # An index read after the change is.
    assert cache.attach_index("k", compacted, index_of(compacted), cache.ticket())


def test_an_index_read_across_a_newer_version_is_not_attached_the_entrys_own_is() -> None:
    cache = live_cache()
    entry = session(4, "a")
    cache.put("k", entry, cache.ticket())
    ticket = cache.ticket()
    cache.announce("k", 4)  # this replica's own append, echoed back
    assert cache.attach_index("k", entry, index_of(entry), ticket)
    ticket = cache.ticket()
    cache.announce("k", 5)
    assert cache.get("k") is None
    # Were an entry of version 4 cached again anyway, an index read before
    # the notice is not attached to it.
    entry_again = session(4, "a")
    assert cache.put("k", entry_again, cache.ticket())
    assert not cache.attach_index("k", entry_again, index_of(entry_again), ticket)


def test_an_index_of_another_version_life_or_compacted_prefix_is_not_attached() -> None:
    cache = live_cache()
    entry = session(3, "", "b", "c")
    entry.compacted = 1
    cache.put("k", entry, cache.ticket())
    ticket = cache.ticket()
    assert not cache.attach_index("k", entry, index_of(entry, version=2), ticket)
    assert not cache.attach_index(
        "k", entry, index_of(entry, create_time_ms=entry.create_time_ms - 1), ticket
    )
    assert not cache.attach_index("k", entry, index_of(entry, first_live=0), ticket)
    assert entry.index is None
    assert cache.attach_index("k", entry, index_of(entry), ticket)


def test_an_index_extended_by_another_embedders_vectors_keeps_none_of_the_old_ones() -> None:
    # As TurnIndex.write drops the rows in Redis: a hot session scores its
    # turns as a cold read of it would.
    turn = features([common_pb2.Message(role=common_pb2.ROLE_USER, content="The door is green.")])
    one = np.ones((1, 4), np.float32)
    empty = np.zeros(0, np.int64)
    index = IndexedTurns(1, 0, empty, empty.astype(np.uint8), empty, None, {}, [], [])
    index = index.extended(2, 0, turn, Embeddings(one, "minilm@2"))
    assert index.embedder == "minilm@2" and index.unit_vectors[0].any()
    same = index.extended(3, 1, turn, Embeddings(one, "minilm@2"))
    assert same.unit_vectors.all()
    upgraded = index.extended(3, 1, turn, Embeddings(one, "minilm@3"))
    assert upgraded.embedder == "minilm@3"
    assert not upgraded.unit_vectors[0].any() and upgraded.unit_vectors[1].all()
    # An append the embedder gave nothing keeps what there was.
    assert index.extended(3, 1, turn, None).embedder == "minilm@2"


def test_an_index_extended_by_an_older_revisions_vectors_keeps_the_newer_rows() -> None:
    # As TurnIndex.write keeps a newer revision's rows in Redis (servers of
    # both side by side): the appended turn has none, a gap for the backfill.
    turn = features([common_pb2.Message(role=common_pb2.ROLE_USER, content="The door is green.")])
    one = np.ones((1, 4), np.float32)
    empty = np.zeros(0, np.int64)
    index = IndexedTurns(1, 0, empty, empty.astype(np.uint8), empty, None, {}, [], [])
    index = index.extended(2, 0, turn, Embeddings(one, "minilm@3"))
    older = index.extended(3, 1, turn, Embeddings(one, "minilm@2"))
    assert older.embedder == "minilm@3" and older.vector_gaps
    assert older.unit_vectors[0].all() and not older.unit_vectors[1].any()
