"""Hot cache hits, kept in the router.

An exact hit through the cache service costs a gRPC hop, a Redis GET and
the service's CPU on both sides, for an answer that does not change: most
of what a hit costs. The router keeps the answers of recent hits and
serves a repeat of the very same request (tenant, model, parameters and
messages, byte for byte) without leaving the process.

A semantic hit is kept the same way, under the key of the prompt that was
asked (not the entry's), so only a byte-identical repeat of that prompt is
served from it. Reusing it is reusing the verifier's verdict, which is a
function of what the copy's lifetime holds fixed: the asked prompt (the
key), the matched entry's question and vector (a Store replacing the entry
announces the entry; a report deleting it announces its tenant and model),
the asked prompt having no entry of its own (its Store announces the
prompt's entry id, under which the copy is filed too), the sub-partition's
strictness (raised only by a report, which announces the whole tenant and
model, below) and the threshold and verifier model (fixed for the cache
service's life; a replica restarted with others is bounded by
``max_age_s``, as a rolling restart is anyway). An entry stored later
that the cache would now prefer does not make the copy wrong, only not
the best; that, too, lasts at most ``max_age_s``.

Coherence with Redis (the truth): the cache service announces every entry
whose answer must stop being served (``meshgate/cache_notices.py``: a
reported wrong hit, an Invalidate, any Store) and every
router drops its copies on hearing it. The bound: a copy stops being served
as soon as the router reads the notice (one pub/sub delivery, about a
millisecond on one host). Pub/sub delivers at most once, so the copies are
trusted only while the subscription is up: they are dropped and bypassed
from the moment it breaks until it is back. A subscription that is up
proves nothing of the publisher: subscribed where the cache service does
not publish (``router.cache_redis_url`` not its Redis), a router hears no
notice, and served every copy for its whole age limit after an Invalidate.
Nor does a heartbeat heard prove it of every publisher: a router hearing
another mesh's Redis hears that mesh's cache services, and one cache
replica alone on another Redis than the others is heard by no router. So
each cache replica's heartbeat (every second,
``cache_notices.HEARTBEAT_INTERVAL_S``) carries an id of its own, which
its hits name, and a hit is copied, and its copy served, only while the
heartbeat it names has been heard within
``cache_notices.HEARTBEAT_LOST_AFTER_S``: none from a subscription's start
until its first, none from that long after the latest until the next. A
heartbeat after the router heard none for that long drops whatever was
held (what went unheard meanwhile is unknown). A silence of every
heartbeat, or hits that name one not heard, are logged once as a
warning, their end once at info. And no copy
is served longer than ``max_age_s`` after it was fetched, which also
bounds how long one outlives its entry's eviction (which announces
nothing) and a notice lost while a broken connection was not yet
detected. Expiry announces nothing either, but the lookup says how long
the entry had left to live (``expires_in_ms``), and the copy is served no
longer than that, never a hit the cache itself no longer has.

A lookup that was in flight while a notice arrived must not put back what
the notice removed: ``put`` is refused when a notice that concerns the copy
came after the lookup's ``ticket()``: one for an entry it is filed under,
for its tenant and model (or the whole tenant), the router's own ``forget``
of its key, or a reconnect. Every Store announces its entry, so under
miss-heavy traffic notices are not rare: refusing a put for any of them
would refuse most fills. Each notice gets a sequence number, and the
latest one per entry, scope and key is remembered in a bounded map; when
the map is trimmed, the trimmed notice's number becomes a floor below
which every ticket is refused (an extra hop, never a stale answer).

The local key is stricter than the cache's own (no whitespace folding, no
sorting of stop sequences): two requests the cache treats as one entry may
be two copies here, or one a copy and one a hop; never a wrong answer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import struct
import sys
import time

import structlog

from meshgate import cache_notices, redis_access
from services.router.pipeline import CachePlan, Hit

log = structlog.get_logger(__name__)

_LENGTH = struct.Struct("<I")
# Notices remembered for refusing puts: a lookup lasts milliseconds, and
# this many notices arriving within one only costs refused fills (the floor).
RECENT_NOTICES = 4096


@dataclasses.dataclass(slots=True)
class _Copy:
    hit: Hit
    # The entries whose notice drops it: the entry served and, for a
    # semantic hit, the asked prompt's own (see ``put``).
    entry_ids: tuple[str, ...]
    tenant_id: str
    model: str
    # The router's clock (monotonic): past it the copy is not served.
    served_until: float
    # The heartbeat of the cache replica that answered: unheard, the copy is
    # dropped (cache_notices.py).
    heartbeat_id: str
    # What holding it costs, about: the answer's text as Python holds it.
    size: int


class HotExactHits:
    """An LRU of at most ``max_entries`` hits (exact and semantic) holding
    at most ``max_bytes`` of answer text, each served for at most
    ``max_age_s`` after it was fetched (less if its entry expires sooner),
    and only while the heartbeat of the cache replica that answered it has
    been heard within ``heartbeat_lost_after_s``.

    The byte bound is what keeps the router's memory flat: 4,096 answers of
    a model with a long output limit are hundreds of MiB. An answer larger
    than a sixteenth of it is not kept at all (it would push out many small
    ones, and its hop is a small part of streaming it)."""

    def __init__(
        self,
        max_entries: int,
        max_age_s: float,
        clock=time.monotonic,
        recent_notices: int = RECENT_NOTICES,
        max_bytes: int = 64 * 1024 * 1024,
        heartbeat_lost_after_s: float = cache_notices.HEARTBEAT_LOST_AFTER_S,
    ) -> None:
        self._max_entries = max_entries
        self._max_age_s = max_age_s
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        self._copies: collections.OrderedDict[bytes, _Copy] = collections.OrderedDict()
        self._by_entry: dict[str, set[bytes]] = collections.defaultdict(set)
        # Numbers notices, forgets and reconnects; a ticket is the latest number.
        self._sequence = 0
        # What each recent notice concerned ("entry", id), ("scope", tenant,
        # model; "" for all its models), ("key", key) -> its latest number,
        # oldest first; a put whose ticket is below one that concerns it is
        # refused.
        self._recent: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._recent_notices = recent_notices
        # Every ticket below it is refused: a reconnect's or unreadable
        # notice's number, or the newest that trimming forgot.
        self._floor = 0
        # When the subscription came up (None: it is down; the listener says),
        # and each cache replica's latest heartbeat on it by its heartbeat id:
        # a replica's notices are known to arrive only while its heartbeat does.
        self._subscribed_at: float | None = None
        self._heard: dict[str, float] = {}
        self._heartbeat_lost_after_s = heartbeat_lost_after_s
        # Heartbeat ids that hits named and this subscription has not heard:
        # id -> (when first named, when last), for the gauge and the warning.
        self._named_unheard: dict[str, tuple[float, float]] = {}
        # Whether the copies' being out of use was logged and not its end.
        self._unheard_told = False

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def live(self) -> bool:
        """Whether the copies are in use: a cache replica's heartbeat has
        been heard, on the subscription that is up, within
        ``heartbeat_lost_after_s``, and no hit within that long named one
        that was not."""
        now = self._clock()
        return self._hears_any(now) and all(
            now - last > self._heartbeat_lost_after_s for _, last in self._named_unheard.values()
        )

    def _hears_any(self, now: float) -> bool:
        # A replica forgotten from _heard went silent past the bound, so the
        # latest heartbeat within it, if any, is still in _heard.
        return any(self._hears(heartbeat_id, now) for heartbeat_id in self._heard)

    def _hears(self, heartbeat_id: str, now: float) -> bool:
        heard_at = self._heard.get(heartbeat_id)
        return heard_at is not None and now - heard_at <= self._heartbeat_lost_after_s

    def subscribed(self, up: bool) -> None:
        """The listener's word that the subscription came up or broke:
        whatever changed meanwhile is unknown, and the copies wait for the
        new subscription's first heartbeat."""
        self.clear()
        self._subscribed_at = self._clock() if up else None
        self._heard.clear()
        self._named_unheard.clear()

    def check_heartbeat(self) -> None:
        """Logs (once) the copies going out of use for
        ``heartbeat_lost_after_s``: a subscription that heard no heartbeat,
        or hits naming one it does not hear; and (once) their coming back
        into use. A subscription that is down is the listener's to log."""
        if self._subscribed_at is None:
            return
        now = self._clock()
        bound_s = self._heartbeat_lost_after_s
        self._forget_heartbeats([named for named, at in self._heard.items() if now - at > bound_s])
        self._named_unheard = {
            named: times for named, times in self._named_unheard.items() if now - times[1] <= bound_s
        }
        if self.live:
            if self._unheard_told:
                self._unheard_told = False
                log.info("the cache service's heartbeat is heard again; hot copies in use")
            return
        if self._unheard_told:
            return
        if not self._hears_any(now):
            # A subscription that heard no heartbeat yet has bound_s from its
            # start; one that heard one has had longer, as it heard it since.
            if now - self._subscribed_at > bound_s:
                self._unheard_told = True
                log.warning(
                    "the cache service's heartbeat is not heard: hot copies bypassed until it is "
                    "(is router.cache_redis_url the cache service's redis.url?)",
                    unheard_for_s=bound_s,
                )
            return
        unheard = sorted(named for named, (first, _) in self._named_unheard.items() if now - first > bound_s)
        if unheard:
            self._unheard_told = True
            log.warning(
                "cache replicas answer hits whose heartbeat this router does not hear: their hits are "
                "not copied (is each replica's redis.url the Redis of router.cache_redis_url, "
                "and that Redis this mesh's?)",
                heartbeat_ids=unheard,
            )

    async def watch_heartbeat(self) -> None:
        """check_heartbeat once a heartbeat's interval, for as long as the router runs."""
        while True:
            await asyncio.sleep(cache_notices.HEARTBEAT_INTERVAL_S)
            self.check_heartbeat()

    @staticmethod
    def key(plan: CachePlan, messages) -> bytes:
        """The local key of ``messages`` under ``plan``; a turn asks for it
        up to three times (exact lookup, semantic lookup, store), and it
        costs a serialization of the whole prompt (~70 us for 40 KB), so it
        is computed once per plan and prompt."""
        known = plan.hot_exact_keys.get(id(messages))
        if known is not None and known[0] is messages:
            return known[1]
        digest = hashlib.blake2b(digest_size=16, person=b"mg-router-hot")
        parts = (
            plan.tenant_id.encode(),
            plan.model.encode(),
            plan.route.encode(),
            plan.parameters.SerializeToString(deterministic=True),
            *(message.SerializeToString(deterministic=True) for message in messages),
        )
        for part in parts:
            digest.update(_LENGTH.pack(len(part)))
            digest.update(part)
        key = digest.digest()
        plan.hot_exact_keys[id(messages)] = (messages, key)
        return key

    def get(self, key: bytes) -> Hit | None:
        copy = self._copies.get(key)
        if copy is None:
            return None
        now = self._clock()
        if now > copy.served_until or not self._hears(copy.heartbeat_id, now):
            self._drop(key)
            return None
        self._copies.move_to_end(key)
        return copy.hit

    def ticket(self) -> int:
        """Taken before a lookup whose hit may be ``put``."""
        return self._sequence

    def put(
        self,
        key: bytes,
        ticket: int,
        hit: Hit,
        entry_id: str,
        tenant_id: str,
        model: str,
        heartbeat_id: str,
        asked_entry_id: str = "",
        expires_in_s: float = 0.0,
    ) -> None:
        """Keeps ``hit`` under ``key``. A semantic hit's copy is filed under
        the matched entry and under ``asked_entry_id``, the asked prompt's
        own entry: a Store of that prompt (a refresh, on any router) creates
        it and announces it, and from then on the cache would answer the
        prompt with that entry's answer, not the matched one.

        ``expires_in_s``: what the entry had left to live when the cache
        read it (0: not said), counted from here, so a copy may outlive its
        entry by the lookup's way back (a notice's delay, about).

        ``heartbeat_id``: the heartbeat of the cache replica that answered
        (``LookupResponse.heartbeat_id``); unheard here (or empty: a cache
        from before the ids), the hit is not kept."""
        if not entry_id:
            return
        now = self._clock()
        if not self._hears(heartbeat_id, now):
            if heartbeat_id and self._subscribed_at is not None:
                first, _ = self._named_unheard.get(heartbeat_id, (now, now))
                self._named_unheard[heartbeat_id] = (first, now)
            return
        entry_ids = (
            (entry_id, asked_entry_id) if asked_entry_id and asked_entry_id != entry_id else (entry_id,)
        )
        concerns = (
            ("key", key),
            ("scope", tenant_id, model),
            ("scope", tenant_id, ""),
            *(("entry", filed_under) for filed_under in entry_ids),
        )
        if ticket < self._floor or any(self._recent.get(what, -1) > ticket for what in concerns):
            return
        self._drop(key)
        size = sys.getsizeof(hit.answer.text)
        if size > self._max_bytes // 16:
            return
        lifetime_s = min(self._max_age_s, expires_in_s) if expires_in_s > 0 else self._max_age_s
        self._copies[key] = _Copy(hit, entry_ids, tenant_id, model, now + lifetime_s, heartbeat_id, size)
        self._bytes += size
        for filed_under in entry_ids:
            self._by_entry[filed_under].add(key)
        while len(self._copies) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._copies)))

    def forget(self, key: bytes) -> None:
        """This router is replacing the entry (a Store): its own next turn
        must not wait for the notice to see the new answer."""
        self._note(("key", key))
        self._drop(key)

    def forget_scope(self, tenant_id: str, model: str) -> None:
        """Drops the tenant's copies (of ``model``, or all: ""), as the
        cache's notice of an Invalidate does; this router's own Invalidate
        calls it at once, not waiting for the notice."""
        self._note(("scope", tenant_id, model))
        stale = [
            key
            for key, copy in self._copies.items()
            if copy.tenant_id == tenant_id and (not model or copy.model == model)
        ]
        for key in stale:
            self._drop(key)

    def announce(self, data: bytes) -> None:
        """Applies one notice of the cache service."""
        notice = cache_notices.parse(data)
        match notice:
            case cache_notices.EntryNotice(entry_id=entry_id):
                self._note(("entry", entry_id))
                for key in list(self._by_entry.get(entry_id, ())):
                    self._drop(key)
            case cache_notices.ScopeNotice(tenant_id=tenant_id, model=model):
                self.forget_scope(tenant_id, model)
            case cache_notices.Heartbeat(heartbeat_id=heartbeat_id):
                self._heard_heartbeat(heartbeat_id)
            case None:
                # A notice this router cannot read may name anything.
                log.warning("unreadable cache notice; dropping every hot copy", notice=data[:64])
                self.clear()

    def _heard_heartbeat(self, heartbeat_id: str) -> None:
        now = self._clock()
        if not self._hears_any(now):
            # The subscription's first, or the first after a silence of
            # every replica's, in which notices may have gone unheard too.
            self.clear()
        elif heartbeat_id in self._heard and not self._hears(heartbeat_id, now):
            # This replica's first after its silence, before check_heartbeat
            # forgot it.
            self._forget_heartbeats([heartbeat_id])
        self._heard[heartbeat_id] = now
        self._named_unheard.pop(heartbeat_id, None)

    def _forget_heartbeats(self, silent: list[str]) -> None:
        """Drops the copies of the replicas whose heartbeats went silent, so
        that a copy is served only while its replica's heartbeat has been
        heard without a break since it was kept."""
        if not silent:
            return
        for heartbeat_id in silent:
            del self._heard[heartbeat_id]
        stale = [key for key, copy in self._copies.items() if copy.heartbeat_id in silent]
        for key in stale:
            self._drop(key)

    def clear(self) -> None:
        self._sequence += 1
        self._floor = self._sequence
        self._recent.clear()
        self._copies.clear()
        self._by_entry.clear()
        self._bytes = 0

    def _note(self, what: tuple) -> None:
        self._sequence += 1
        self._recent[what] = self._sequence
        self._recent.move_to_end(what)
        while len(self._recent) > self._recent_notices:
            _, forgotten = self._recent.popitem(last=False)
            self._floor = max(self._floor, forgotten)

    def _drop(self, key: bytes) -> None:
        copy = self._copies.pop(key, None)
        if copy is None:
            return
        self._bytes -= copy.size
        for entry_id in copy.entry_ids:
            keys = self._by_entry.get(entry_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_entry[entry_id]


def notice_listener(url: str, hits: HotExactHits, timeout_s: float) -> redis_access.ChannelListener:
    """Feeds ``hits`` the cache service's notices from its own Redis
    connection (each attempt bounded by ``timeout_s``, redis.timeout_s);
    drops and bypasses the copies while disconnected."""
    return redis_access.ChannelListener(
        url, cache_notices.CHANNEL, hits.announce, hits.subscribed, timeout_s=timeout_s
    )
