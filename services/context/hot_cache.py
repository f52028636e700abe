"""Hot sessions in process memory, in front of Redis.

Assembly for a session that was just appended to, or whose chat stream just
opened, should cost no Redis round trip: the session's turns and their
token counts (and whatever else assembly needs per turn) are kept here, in
an LRU bounded by bytes.

Coherence across replicas: Redis's version is the truth, and every script
that changes a session publishes ``<meta key> <new version>`` (``-1`` for a
deletion) on ``store.CHANGES_CHANNEL``. Each replica subscribes and drops
entries older than the version announced. Invalidation rather than a
version check per read, because a version check is itself a round trip,
which is what the cache is there to avoid. Pub/sub delivers at most once, so
the cache is trusted only while its subscription is up: it is emptied and
bypassed from the moment the subscription breaks until it is back.

A read that was in flight while a change was announced must not put the
older state back: ``put`` (and ``attach_index``, for a turn index read
apart from the turns) is refused when a newer version (or a deletion) was
announced for that session after the reader's ``ticket()``.

Expiry publishes nothing, so an entry is not served past the moment its
session may have expired in Redis: its last write plus the session TTL, or
sooner, when it was read, what Redis said it had left. A session written
under a shorter TTL than this replica's (``context.session_ttl_s`` raised,
or set to 0, through a rolling restart) keeps that one until its next
write; served on for this replica's TTL, each turn on it would be generated
and billed, then refused SESSION_NOT_FOUND at its append.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import structlog

from meshgate import redis_access
from meshgate.config import RedisSettings
from services.context.store import CHANGES_CHANNEL, StoredSession

log = structlog.get_logger(__name__)

# What a session's entry costs besides its turns' text and counts: the
# objects around them. An estimate; the bound is on the order of magnitude.
_ENTRY_OVERHEAD_BYTES = 512
_TURN_OVERHEAD_BYTES = 96
# Sessions whose last announcement is remembered, for refusing stale puts;
# older ones fall back to a conservative floor.
_MAX_ANNOUNCED = 65_536
DELETED = -1


def _size(session: StoredSession) -> int:
    # A turn holds its text as UTF-8 (ByteSize), up to 4 bytes a character:
    # counted in characters, 256 KiB turns of emoji held 63 MiB where 16 MiB
    # were counted, so the 256 MiB bound let ~1 GiB in.
    turns = sum(t.ByteSize() + _TURN_OVERHEAD_BYTES for t in session.turns)
    counts = sum(c.nbytes for c in session.token_counts.values())
    # Its retrieval index, when attached: float32 vectors weigh more than the texts.
    index = session.index.nbytes if session.index is not None else 0
    return _ENTRY_OVERHEAD_BYTES + turns + counts + index


@dataclasses.dataclass(slots=True)
class _Announcement:
    sequence: int
    version: int
    deleted_sequence: int


class HotCache:
    """An LRU of sessions (current version only), bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int, session_ttl_s: int = 0) -> None:
        self._max_bytes = max_bytes
        # 0: sessions never expire.
        self._session_ttl_ms = session_ttl_s * 1000
        self._entries: collections.OrderedDict[str, tuple[StoredSession, int]] = collections.OrderedDict()
        self._bytes = 0
        self._sequence = 0
        self._announced: collections.OrderedDict[str, _Announcement] = collections.OrderedDict()
        # Announcements forgotten to bound memory: a put for a session not
        # remembered is refused if it started before the newest of them.
        self._forgotten_sequence = 0
        # Entries are served only while change notices are known to arrive.
        self.live = False

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def ticket(self) -> int:
        """Take before reading Redis; hand to ``put`` with what was read."""
        return self._sequence

    def get(self, key: str) -> StoredSession | None:
        entry = self._entries.get(key) if self.live else None
        if entry is not None and self._may_have_expired(entry[0]):
            self._drop(key)
            entry = None
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, session: StoredSession, ticket: int) -> bool:
        """Caches ``session`` unless a change newer than it was announced
        since ``ticket``; returns whether it was cached."""
        if not self.live or not self._current(key, session.version, ticket):
            return False
        size = _size(session)
        if size > self._max_bytes:
            self._drop(key)
            return False
        self._drop(key)
        self._entries[key] = (session, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        return True

    def attach_index(self, key: str, session: StoredSession, index, ticket: int) -> bool:
        """Keeps ``index`` (services/context/turn_index.IndexedTurns, read
        after ``ticket``) with ``session``, its bytes counted against the
        bound like the turns'; returns whether it did. Only when ``session``
        is still the entry cached for ``key`` and the index describes it: the
        same version, life (``create_time_ms``) and compacted prefix, and no
        change announced since the ticket that the version does not show. A
        compaction, a pin and a deletion change no version, and while the
        index was read one of them could drop the entry and a later read
        cache the session as it became, at the same version: the index, as
        it was before, then told assembly fewer turns were compacted (their
        emptied texts went into prompts), or held the deleted life's pins."""
        entry = self._entries.get(key)
        if (
            entry is None
            or entry[0] is not session
            or not self._current(key, session.version, ticket)
            or index.version != session.version
            or index.create_time_ms != session.create_time_ms
            or index.first_live != session.compacted
        ):
            return False
        session.index = index
        size = _size(session)
        self._bytes += size - entry[1]
        self._entries[key] = (session, size)
        self._entries.move_to_end(key)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _may_have_expired(self, session: StoredSession) -> bool:
        if session.expires_at is not None and time.monotonic() >= session.expires_at:
            return True
        if not self._session_ttl_ms:
            return False
        # A second's margin for the clocks of Redis and this host.
        return time.time() * 1000 >= session.update_time_ms + self._session_ttl_ms - 1000

    def _current(self, key: str, version: int, ticket: int) -> bool:
        announced = self._announced.get(key)
        if announced is None:
            return self._forgotten_sequence <= ticket
        if announced.deleted_sequence > ticket:
            return False
        return announced.sequence <= ticket or announced.version <= version

    def announce(self, key: str, version: int) -> None:
        """A change notice: ``key`` is now at ``version`` (-1: deleted)."""
        self._sequence += 1
        previous = self._announced.pop(key, None)
        deleted_sequence = previous.deleted_sequence if previous else 0
        if version == DELETED:
            deleted_sequence = self._sequence
        elif previous is not None and previous.version > version:
            # Notices of one life's versions may come out of order: two
            # appends on this replica each announce as they end, the first
            # last when its index write is slow. An older notice replacing a
            # newer one let a read of the older version, in flight across
            # both, be cached as current (GetSession then missed the newer
            # turn). Versions only grow within a life, and a deletion between
            # lives is a notice of its own (above).
            version = previous.version
        self._announced[key] = _Announcement(self._sequence, version, deleted_sequence)
        if len(self._announced) > _MAX_ANNOUNCED:
            _, forgotten = self._announced.popitem(last=False)
            self._forgotten_sequence = max(self._forgotten_sequence, forgotten.sequence)
        entry = self._entries.get(key)
        if entry is not None and (version == DELETED or entry[0].version < version):
            self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        # Reads in flight began before whatever was missed: refuse them all,
        # those of sessions with a remembered notice too (one older than
        # their ticket would let them through).
        self._sequence += 1
        self._forgotten_sequence = self._sequence
        self._announced.clear()

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]


def _parse(data: bytes) -> tuple[str, int] | None:
    key, _, version = data.decode(errors="replace").rpartition(" ")
    try:
        return key, int(version)
    except ValueError:
        return None


def change_listener(
    url: str, cache: HotCache, summarizer=None, timeout_s: float = RedisSettings.timeout_s
) -> redis_access.ChannelListener:
    """Feeds ``cache`` the change notices of every replica, from its own
    Redis connection (each attempt bounded by ``timeout_s``,
    redis.timeout_s); empties and bypasses the cache while disconnected.
    The ``summarizer`` (services/context/summaries.py), if any, hears the
    deletions and the disconnections too, for the summaries it keeps."""

    def on_message(data: bytes) -> None:
        if (notice := _parse(data)) is not None:
            cache.announce(*notice)
            if summarizer is not None and notice[1] == DELETED:
                summarizer.drop_hot(notice[0])

    def set_live(live: bool) -> None:
        cache.clear()
        cache.live = live
        if summarizer is not None:
            summarizer.drop_hot(None)
            summarizer.notices_live = live

    return redis_access.ChannelListener(url, CHANGES_CHANNEL, on_message, set_live, timeout_s=timeout_s)
