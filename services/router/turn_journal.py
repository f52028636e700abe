"""Billing the turns of a router that stopped without settling them.

A turn is billed when it ends (admission's settlement, a ledger record). A
router killed outright (SIGKILL, its machine lost) ends none of the turns
it was serving: they were missing from GetUsage and the ledger. So each
router with a journal (``router.journal_interval_s`` > 0, the default) keeps
one in Redis of the turns it serves, and bills the turns of any journal
whose router stopped writing it.

- **The journal.** Every ``router.journal_interval_s`` while it holds
  turns, a router writes what each would be billed if it ended now (the
  record of a turn failed ``ROUTER_LOST``: admission.used_tokens of what
  went out) to a hash of its own, replacing the last snapshot, with its
  heartbeat (Redis's TIME: machines' clocks do not matter) in a sorted
  set; one script call per interval, none per turn. A turn is named by an
  id given at its first snapshot (``turn_id``), which its ledger record
  carries when it settles. A turn a snapshot named stays in the journal
  once it ended, as its settlement's record, until the ledger has written
  that (a record the ledger holds while Redis refuses it, a shard failing
  over, is not lost with a router killed meanwhile); one no snapshot named
  leaves at once (it ended within an interval of its first piece), but
  where the ledger holds records Redis refused or has a write unanswered
  for 0.1 s (Ledger.holding): then it is named at its settlement and kept
  alike (TurnAdmission.settle).
- **The claim.** Every router, every third of ``router.journal_stale_s``
  or so, claims the journals whose heartbeat is older than that (a lease:
  each is claimed by one router at a time), never its own (a router
  stalled alone, whose claim came due before its write), bills their turns
  (Ledger.record_claim), then deletes each one whose router did not write
  it meanwhile. A router claims only once it has reached the journals'
  slot (on a Redis Cluster, its master) without a failure for the stale
  time: after an outage every live router's heartbeat is as old as the
  outage, and the first claim would take them all.
- **Billed once.** The ledger's script writes a record naming a turn id
  whole only where that turn's mark is not set, and sets it (ledger.py): a
  turn is billed by its settlement or by a claim of its journal, whichever
  comes first. A claim's mark keeps what it billed, and a later record of
  the turn writes only its rest (ledger.CLAIMED_REST): a router stalled
  past the stale time (SIGSTOP, a machine suspended, a long GC pause), its
  turns claimed, resumes and serves them on, and their settlements bill
  what they used beyond the claim's snapshot. A snapshot that reaches
  Redis after the turn's settlement (they go on different connections), a
  claimer killed midway (the next claim bills what it did not), a stalled
  router and a router cut off from Redis while others reach it are all
  billed once.

What it bills: what had gone out by the last snapshot (within one interval
of what was delivered), or the turn's settlement's record where it had
ended; a turn the journal's snapshot found billed nothing (it delivered
nothing yet, used_tokens) is not in it. A claimed turn that then went on
(its router only stalled) is billed its rest when it ends (counted failed,
as the claim found it). A claim charges the tenant's budgets nothing:
admission reserved more than the turn used, and that reservation stands
(settled to what the turn used where its router resumes and ends it). A
router that stops gracefully writes its journal a last time: removed, or
kept with the records the ledger gave up as it stopped (Redis failing
then) of turns a snapshot named, for another router to bill.
The bounds: a journal no router claims within TURN_JOURNAL_TTL_S (no router
running for 10 minutes) expires, and its turns go unbilled; a stalled
router that comes back more than ledger.CLAIMED_TURN_MARKER_TTL_S after its
journal was claimed bills those turns again; a turn that ended before any
snapshot named it, settled before the ledger held records or had a write
unanswered for 0.1 s, is lost with its router while the ledger holds it;
so is one named at its settlement while the journal cannot be written
(on a Redis Cluster, the journals' master down with the slot the ledger
holds records for: the log's shares it on the cluster the tests build),
and the record a snapshot named a turn by is what a claim writes there.
On a Redis Cluster each slot a record goes to (the log's, the tenant's
totals') has its own mark, so each bills the turn once and in full, but
where the two raced one may count it failed (a claim's record first) and
the other not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import secrets
import time
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from meshgate import metrics, redis_access, telemetry
from meshgate.config import TURN_JOURNAL_TTL_S
from meshgate.errors import MeshgateError
from meshgate.tasks import cancel_and_wait
from services.router.ledger import Ledger, UsageRecord, pack, unpack

log = structlog.get_logger(__name__)
# Once a minute per journal: a claim meets a broken one at every stale time.
_broken_journals = telemetry.ThrottledLog(log, interval_s=60.0)

# The failure a claimed turn is recorded with (the ledger's failure field;
# a turn its caller left says "cancelled").
ROUTER_LOST = "router_lost"

# Every journal's keys share a slot (the hash tag), so that one script call
# writes a journal and its heartbeat, and one claims several.
_PREFIX = "mg:router:journal:{journals}:"
BEATS = _PREFIX + "beats"
# Turns a snapshot's records are computed for between two looks at the
# event loop: a snapshot of thousands of turns does not hold up their pieces.
_YIELD_EVERY = 256
# Journals one claim takes at most.
CLAIM_SIZE = 16
# Fields one HSET of a snapshot sets at most (Lua's unpack has a bound).
_HSET_CHUNK = 500


def journal_key(journal_id: str) -> str:
    return _PREFIX + journal_id


# Redis's TIME in microseconds (a double holds it exactly).
_NOW_US = "local now = redis.call('TIME')\nlocal us = tonumber(now[1]) * 1000000 + tonumber(now[2])\n"

# KEYS: BEATS, the journal. ARGV: the journal id, its TTL in s, then turn
# id and packed record pairs. Replaces the snapshot (and a claim's mark on
# it); with turns, sets the heartbeat to Redis's TIME, else removes the
# journal.
_WRITE = (
    _NOW_US
    + f"""
redis.call('DEL', KEYS[2])
if #ARGV < 3 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
for i = 3, #ARGV, {2 * _HSET_CHUNK} do
  redis.call('HSET', KEYS[2], unpack(ARGV, i, math.min(i + {2 * _HSET_CHUNK - 1}, #ARGV)))
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], us, ARGV[1])
return 1
"""
)

# The field of a journal that names the claim under way (a turn id is hex).
_CLAIM_MARK = "~claim"

# KEYS: BEATS. ARGV: the stale time in us, the most journals, the claim's
# id, the claiming router's own journal id (never its own: a router stalled
# whose claim runs before its write would bill its own turns as lost).
# Claims the journals whose heartbeat is older: each one's heartbeat is set
# to now (no other claim takes it for the stale time) and it is marked with
# the claim's id (a write of its router's removes the mark). Returns each
# journal's id and its snapshot (HGETALL's pairs, the mark's with them), or
# false for one whose key holds another type than a hash (an operator's or
# another program's write: no turns of ours): its heartbeat is set too, so
# it takes no claim's place until stale again, and nothing else is touched.
# Read before written: one such key failed the script after the journals
# before it were marked and before any reply, so no lost router's turns were
# billed again while it stood (a review).
_CLAIM = (
    _NOW_US
    + f"""
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', us - tonumber(ARGV[1]), 'LIMIT', 0, ARGV[2])
local claimed = {{}}
for _, id in ipairs(stale) do
  if id ~= ARGV[4] then
    local key = '{_PREFIX}' .. id
    local held = redis.call('TYPE', key)['ok']
    redis.call('ZADD', KEYS[1], us, id)
    claimed[#claimed + 1] = id
    if held == 'hash' or held == 'none' then
      if held == 'hash' then redis.call('HSET', key, '{_CLAIM_MARK}', ARGV[3]) end
      claimed[#claimed + 1] = redis.call('HGETALL', key)
    else
      claimed[#claimed + 1] = false
    end
  end
end
return claimed
"""
)

# KEYS: BEATS, the journal. ARGV: its id, the claim's id. Deletes a claimed
# journal, unless its router wrote it since (a stalled router come back: the
# claim's mark is gone from it). Returns 1 if deleted.
_FINISH = f"""
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('HGET', KEYS[2], '{_CLAIM_MARK}') ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


class Tracked:
    """A turn the journal holds while it is served (TurnJournal.track),
    and once it ended, until the ledger has its record (settled)."""

    __slots__ = ("_journal", "_record_of", "turn_id", "_record", "_packed")

    def __init__(self, journal: TurnJournal, record_of: Callable[[], UsageRecord | None]) -> None:
        self._journal = journal
        # What the turn would be billed if it ended now, failed ROUTER_LOST
        # (its turn_id this one's); None where nothing (it delivered nothing
        # yet). Its settlement's record once it ended.
        self._record_of = record_of
        # Given at the turn's first snapshot; "" until then.
        self.turn_id = ""
        # The record last packed, and its packing: a turn whose record did
        # not change since the last snapshot is not packed again.
        self._record: UsageRecord | None = None
        self._packed = ""

    def packed(self) -> str | None:
        """The turn's record as a snapshot holds it, None where it has none."""
        usage = self._record_of()
        if usage is None:
            return None
        if usage is not self._record:
            # Its turn id on it: the record a claim bills is marked by it.
            named = dataclasses.replace(usage, turn_id=self.turn_id)
            self._record, self._packed = usage, pack(named)
        return self._packed

    def name(self) -> None:
        """Gives the turn its id, where it has none: at a snapshot that
        holds it, or at its settlement while the ledger holds records
        (TurnAdmission.settle), so that it is kept until its own is written."""
        self.turn_id = self.turn_id or secrets.token_hex(8)

    def settled(self, usage: UsageRecord | None) -> Callable[[bool], None] | None:
        """The turn ended, billed ``usage`` (its settlement's record; None
        where none is written). A turn no snapshot named leaves the journal
        now; one a snapshot named stays, as ``usage`` says, until the ledger
        has written it: returns what to tell (Ledger.submit's on_written),
        so that a router killed while its record is held (a Redis shard
        failing over) leaves it to a claim, not lost."""
        if not self.turn_id or usage is None:
            self._journal._live.pop(self, None)
            return None
        self._record_of = lambda: usage
        return self._written

    def _written(self, written: bool) -> None:
        # Given up while the router stops (Redis down): left in the journal
        # that close() keeps, for another router's claim to bill.
        if written or not self._journal._stopping:
            self._journal._live.pop(self, None)


class TurnJournal:
    def __init__(
        self,
        redis,
        ledger: Ledger,
        interval_s: float,
        stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._ledger = ledger
        self._interval_s = interval_s
        self._stale_s = stale_s
        self.journal_id = secrets.token_hex(8)
        self._write_script = redis.register_script(_WRITE)
        self._claim_script = redis.register_script(_CLAIM)
        self._finish_script = redis.register_script(_FINISH)
        # The turns held (a dict: insertion order, O(1) removal).
        self._live: dict[Tracked, None] = {}
        # Whether the journal in Redis holds turns (so an empty one is
        # written once, to remove it).
        self._holds_turns = False
        # Since when (monotonic) this router has reached Redis without a
        # failure; None: not now. A router claims only after stale_s of it,
        # so that after an outage every live router has written its journal
        # again before any claims (each one's heartbeat was as old as the
        # outage, and claimed, their turns went on unbilled past the claim).
        self._reachable_since: float | None = None
        # Set as the router stops (stop_settling): records the ledger gives
        # up then stay in the journal.
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._said_unwritten = self._said_unclaimed = False

    def stop_settling(self) -> None:
        """The router stops (TurnAdmission.drain, before the ledger's): a
        record the ledger gives up from now on stays in the journal that
        close() writes, for another router's claim to bill."""
        self._stopping = True

    def track(self, record_of: Callable[[], UsageRecord | None]) -> Tracked:
        tracked = Tracked(self, record_of)
        self._live[tracked] = None
        return tracked

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_every()), loop.create_task(self._claim_every())]

    async def write(self) -> bool:
        """Writes the snapshot of the turns held now (or removes the journal
        once none is left); returns whether it called Redis (not when
        nothing was held, nor written before). Raises where Redis failed."""
        fields: list[str] = []
        for index, tracked in enumerate(list(self._live)):
            if index and not index % _YIELD_EVERY:
                await asyncio.sleep(0)
            if tracked not in self._live:
                # Ended since the list was taken (a yield): its settlement
                # may have named no id, and it is not to be named now.
                continue
            # The id before the record: a turn that settles from now on
            # carries it (no await between here and the snapshot's send
            # but the yields above, after which an id given stays given).
            named = bool(tracked.turn_id)
            tracked.name()
            try:
                packed = tracked.packed()
            except Exception:
                # One turn's bug leaves it out, not every other turn
                # unjournaled (and claimed at an old snapshot).
                log.exception("a turn's journal record failed")
                packed = None
            if packed is not None:
                fields += [tracked.turn_id, packed]
            elif not named:
                # In no snapshot (it delivered nothing yet): no id, so no
                # mark for its record and no hold once it ends.
                tracked.turn_id = ""
        if not fields and not self._holds_turns:
            return False
        # A write that fails may have run: the journal may hold these turns.
        self._holds_turns = self._holds_turns or bool(fields)
        await self._write_script(
            keys=[BEATS, journal_key(self.journal_id)], args=[self.journal_id, TURN_JOURNAL_TTL_S, *fields]
        )
        self._holds_turns = bool(fields)
        return True

    async def claim(self) -> dict[str, int]:
        """Claims the journals whose router stopped writing them (not this
        one's), bills their turns and deletes them; returns each one's id
        and how many turns it held (each billed here or, before, by its
        settlement). Raises where Redis failed (what was claimed is claimed
        again after the stale time)."""
        claim_id = secrets.token_hex(8)
        reply = await self._claim_script(
            keys=[BEATS], args=[round(self._stale_s * 1_000_000), CLAIM_SIZE, claim_id, self.journal_id]
        )
        claimed: dict[str, int] = {}
        for journal_id, flat in zip(reply[::2], reply[1::2], strict=True):
            journal_id = journal_id.decode()
            if flat is None:
                _broken_journals.warning(
                    "a lost router's journal key holds another type: nothing of it billed; "
                    "delete the key once looked at",
                    per=journal_id,
                    key=journal_key(journal_id),
                )
                continue
            records = []
            for field, packed in zip(flat[::2], flat[1::2], strict=True):
                if field.decode() == _CLAIM_MARK:
                    continue
                try:
                    # Named by its field, whatever its record says: the mark
                    # that bills it once is its turn id's.
                    records.append(dataclasses.replace(unpack(packed.decode()), turn_id=field.decode()))
                except ValueError:
                    # A router of another version's (a rolling upgrade
                    # that changed the record): not billed, not a claim
                    # failed for ever.
                    log.warning("a lost router's turn could not be read", journal=journal_id)
            if records:
                await self._ledger.record_claim(records)
                metrics.router().lost_turns_claimed.inc(len(records))
                log.warning(
                    "claimed the turns of a router that stopped writing its journal",
                    journal=journal_id,
                    turns=len(records),
                )
            await self._finish_script(keys=[BEATS, journal_key(journal_id)], args=[journal_id, claim_id])
            claimed[journal_id] = len(records)
        return claimed

    def reached(self, ok: bool) -> None:
        """That a call to Redis succeeded (or failed) just now."""
        if not ok:
            self._reachable_since = None
        elif self._reachable_since is None:
            self._reachable_since = self._clock()

    def may_claim(self) -> bool:
        """Whether this router has reached the journals' slot without a
        failure for the stale time: every live router has had the time to
        write its journal since (after an outage, each one's heartbeat is as
        old as it was)."""
        since = self._reachable_since
        return since is not None and self._clock() - since >= self._stale_s

    async def _write_every(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                # Reached only where it called Redis: an idle router's
                # write calls nothing, and must not count an outage as
                # reachable time.
                if await self.write():
                    self.reached(True)
                self._said_unwritten = False
            except (*redis_access.CONNECTION_ERRORS, RedisError) as error:
                self.reached(False)
                # Said once an outage: the next interval writes it whole again.
                if not self._said_unwritten:
                    self._said_unwritten = True
                    log.warning("the turn journal cannot be written", error=str(error))
            except Exception:
                log.exception("the turn journal was not written")

    async def _claim_every(self) -> None:
        while True:
            # Routers started together do not claim together.
            await asyncio.sleep(self._stale_s / 3 * random.uniform(0.5, 1.5))
            await self.claim_when_due()

    async def claim_when_due(self) -> None:
        """One pass of the claim loop: claims where this router may
        (may_claim), else looks at the journals' slot, which starts the
        count."""
        try:
            if not self.may_claim():
                # The journals' own slot, not a PING: a cluster answers a
                # PING from any node, so during a failover of the journals'
                # master the count ran while no router could write its
                # journal, and the first claim once it was back took the
                # live routers' (their turns billed as lost, their ends not).
                await self._redis.exists(BEATS)
                self.reached(True)
                return
            await self.claim()
            self._said_unclaimed = False
        except (*redis_access.CONNECTION_ERRORS, RedisError, MeshgateError) as error:
            self.reached(False)
            # Claimed again once the claim's lease (the stale time) ends;
            # said once an outage.
            if not self._said_unclaimed:
                self._said_unclaimed = True
                log.warning("lost routers' journals not claimed", error=str(error))
        except Exception:
            log.exception("lost routers' journals not claimed")

    async def close(self) -> None:
        """Stops writing and claiming, and writes the journal a last time
        (called after admission's drain): removed where every turn's record
        was written, else kept with those given up (Redis failing as the
        router stopped), for another router's claim to bill."""
        for task in self._tasks:
            await cancel_and_wait(task)
        try:
            await self.write()
        except (*redis_access.CONNECTION_ERRORS, RedisError) as error:
            # Left to expire, or to a claim: each of its turns that settled
            # was written with its mark, and is not billed again.
            log.warning("the turn journal was not written as the router stopped", error=str(error))
