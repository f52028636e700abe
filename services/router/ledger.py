"""The usage ledger: what every completed or failed turn used, durably.

Two kinds of keys, written together by one Lua script on one Redis
instance (so the log and the aggregates never disagree); on a Redis Cluster
the log and each tenant's totals, in different slots, are separate calls of
one round trip (a call that fails leaves the others written):

- ``mg:router:usage:log``, a stream: one entry per turn with tenant, key
  id, model alias, deployment, prompt and completion tokens, tokens a cache
  hit saved, cache status, cost (nano-USD), latency (ms) and the failure
  reason ("" when it completed; a turn billed by a claim of its router's
  journal that then went on has a second entry for the rest, cache status
  ``claimed_rest``: CLAIMED_REST), and for the usage of a session's summaries
  (cache status ``summary``, taken from the session by a router's sweep,
  services/router/summary_usage.py: no request) how many
  summaries it was; trimmed to about
  ``router.usage_stream_max_len`` entries. A turn refused at admission is
  counted in the totals only (``submit(..., logged=False)``): refusals cost
  the caller almost nothing, and a tenant hammering past its limit would
  otherwise fill the log and trim every tenant's real records out of it.
- ``mg:router:usage:{t:<tenant>}:<YYYY-MM-DD>``, a hash per tenant and UTC
  day (hash-tagged into the slot of the tenant's limit counters): field
  ``<key id>|<model>|<metric>`` -> running total, for the metrics in
  :data:`METRICS`; kept ``router.usage_retention_days``.

Every call writes once: it sets, in the same script, a marker in its own
slot (marker(): the tenant's day hash's, the log's), and a call whose marker
is set already writes nothing (the marker says "begun" until its last write
says "written": a call found begun stopped midway on an error from Redis,
and is given up, script_calls.STOPPED_BEFORE). A record whose key holds
another type (or a total not an integer) is not written, the call's others
are (_RECORD). A turn's records are marked per call (``...:written:<call
id>``, a random id the call keeps when it is sent again), kept
script_calls.WRITTEN_MARK_TTL_S: so a call whose reply was lost (a timeout,
a connection lost after sending: it may have run) is sent again until Redis
answers (script_calls.Backlog, idempotent), rather than given up and the
turn missing from GetUsage. The records of a take of a session's summaries'
usage are marked per take id (record_take: ``...:take:<take id>``): the take
may be offered again to another router, its taker killed before
acknowledging it, so its marker is kept as long as the context service may
hold the take (TAKE_MARKER_TTL_S). A record of a turn the router's turn
journal named (services/router/turn_journal.py) carries its turn id, and is
written once per turn whichever call writes it first, its settlement's or a
claim of the journal's: a mark per turn id in the slot of the call
(``...{t:<tenant>}:turn:<turn id>`` beside the totals,
``{mg:router:usage:log}:turn:<turn id>`` beside the log), kept
SETTLED_TURN_MARKER_TTL_S, or CLAIMED_TURN_MARKER_TTL_S when a claim set it.
A claim's mark keeps what it billed (AMOUNTS): the router whose journal it
claimed may only have stalled, and its turns go on; a later record of the
turn (its settlement, a claim of a later snapshot) writes the rest, what it
has beyond the mark's (a CLAIMED_REST record: no request again), once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import secrets
import time
from collections.abc import Callable, Sequence

import grpc
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from meshgate import metrics, redis_access, telemetry
from meshgate.config import ContextSettings, summary_usage_ttl_s
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router.script_calls import (
    KEY_TYPES_LUA,
    MARK_WRITTEN,
    STOPPED_BEFORE,
    WRITTEN_BEFORE,
    WRITTEN_MARK_TTL_S,
    Backlog,
    Skipped,
    begin_call_lua,
    is_counter,
    run_scripts,
    skipped_in,
)

log = structlog.get_logger(__name__)

STREAM = "mg:router:usage:log"
METRICS = (
    "requests",
    "failures",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "saved_tokens",
    "cost_nano_usd",
    "latency_ms",
    # What the context service's summaries of the tenant's sessions used, of
    # the prompt and completion tokens above (pipeline.SummarySpend).
    "summaries",
    "summary_prompt_tokens",
    "summary_completion_tokens",
)
# The cache status of a record of a session's summaries' usage: not a turn
# (no request), tokens a model spent on the session in the background.
SUMMARY_USAGE = "summary"

# Separates a record's values in the one argument that carries them all:
# one argument instead of 42 (redis-py's encoding of each argument was most
# of the router's CPU per record).
_SEPARATOR = "\x1f"


@dataclasses.dataclass(frozen=True)
class UsageRecord:
    tenant: str
    key_id: str
    model: str
    # The deployment that served it; "" where none did (a cache hit, a turn
    # failed before any took it, a summaries' or an embeddings' record).
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    # Tokens a cache hit did not generate (the cached answer's).
    saved_tokens: int
    cache_status: str
    cost_nano_usd: int
    latency_ms: int
    failure: str = ""
    # The UTC day (YYYY-MM-DD) its totals go to: its admission's, the day
    # its budgets were charged (admission.Reservation.day); "" for the day
    # it is written.
    day: str = ""
    # A record of a session's summaries' usage (cache_status SUMMARY_USAGE):
    # how many summaries; 0 for a turn.
    summaries: int = 0
    # The id the router's turn journal (services/router/turn_journal.py)
    # named the turn by, where one of its snapshots held the turn or its
    # settlement came while the ledger held records; "" for any other.
    # Such a turn is written once whichever writes it first: its
    # settlement, or another router's claim of the journal of its router
    # (killed, or stalled), a mark per turn id set in the same script; after
    # a claim, a later record writes only its rest (CLAIMED_REST).
    turn_id: str = ""


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(UsageRecord))
# Each field's type (annotations are strings here: __future__), to unpack.
_FIELD_TYPES = tuple({"str": str, "int": int}[field.type] for field in dataclasses.fields(UsageRecord))

# The numbers of a record its tenant's totals add up as they are (the
# counts, requests and the others, come once per turn, from its first
# record): what a claim's mark of a turn keeps of what it billed, so that a
# later record of the turn adds only the rest (the claimed router had only
# stalled, and its turns went on).
AMOUNTS = ("prompt_tokens", "completion_tokens", "saved_tokens", "cost_nano_usd", "latency_ms")
# The cache status of the record that bills the rest of a claimed turn: not
# a turn (no request: the claim's record counted it), the AMOUNTS its
# settlement (or a later claim's snapshot) had beyond what was billed, its
# failure that record's (how the turn ended; router_lost from a claim).
CLAIMED_REST = "claimed_rest"

# KEYS: every key written: the stream first when ARGV[4] is "1", then the
# day hash of each tenant and day whose totals are written (when ARGV[5] is
# "1"), then the call's marker (marker(), in the slot of the key before
# it). ARGV: stream max length, retention s, the UTC day (YYYY-MM-DD) of
# records that name none, the two flags, the marker's TTL in s, the TTL in
# s of the marks of its records that name a turn id, "1" for a claim's
# call (else "0"), then one argument per record: the UsageRecord's values
# in field order, joined by _SEPARATOR. The aggregates are derived here
# from the values; a tenant's day hash is named as day_key() names it. A
# record naming a turn id is written whole only where its mark
# (turn_marker(), in the slot of what the call writes: the tenant's
# totals', else the log's) was not set yet; where a claim set it, as its
# AMOUNTS (joined by ':'), only what the record has beyond them (the rest,
# a CLAIMED_REST record: none where it has nothing more), the mark then
# holding what is billed now; where a settlement set it ('1'), not at all.
# A settlement's mark is '1' (the turn billed as it ended: nothing more to
# bill), a claim's its AMOUNTS.
#
# A record is written whole or not at all: before anything is written, each
# record's keys (the log, its turn's mark, its tenant's day hash) are asked
# their type, and a record one of whose keys holds another type (an
# operator's or a bug's write) is skipped, the others written. Redis does
# not roll a script back: a WRONGTYPE midway left the records before it
# written and those after it not, the call's marker set, so the call sent
# again wrote nothing more, and one tenant's broken key lost every other
# tenant's records after its own in the call (up to _BATCH). The marker is
# set first (MARK_BEGUN) and marked written (MARK_WRITTEN) last: a call
# that still stops midway (an error no check foresees) says so when sent
# again (script_calls.STOPPED_BEFORE), and is given up, not counted
# written. A record one of whose totals holds what HINCRBY refuses (not an
# integer: script_calls.not_counter) is skipped as one whose key holds
# another type is. Returns 1; or {1, then per skipped record its index
# among the call's (1-based), the key and the type it holds}
# (script_calls.skipped_in); or 0 where the call's marker says it
# was written before (nothing is written again), -1 where it says a run of
# it stopped midway.
_RECORD = (
    "local names = {"
    + ", ".join(f"'{name}'" for name in _FIELD_NAMES)
    + "}\nlocal amounts = {"
    + ", ".join(f"'{name}'" for name in AMOUNTS)
    + "}\nlocal metrics = {"
    + ", ".join(f"'{name}'" for name in METRICS)
    + "}"
    + """
local log, totals, claim = ARGV[4] == '1', ARGV[5] == '1', ARGV[8] == '1'
"""
    + begin_call_lua("'EX', ARGV[6]")
    + KEY_TYPES_LUA
    + """
-- Read only, before any record is written: each record's keys and the type
-- each must hold ('none': not made yet); a record with a key of another
-- type is skipped whole.
local records, skipped = {}, {}
for r = 9, #ARGV do
  local values, fields = {}, {}
  for value in string.gmatch(ARGV[r] .. '\\31', '(.-)\\31') do fields[#fields + 1] = value end
  for i, name in ipairs(names) do values[name] = fields[i] end
  local record, wants = {values = values}, {}
  if log then wants[#wants + 1] = {KEYS[1], 'stream'} end
  if values.turn_id ~= '' then
    record.mark = totals and ('mg:router:usage:{t:' .. values.tenant .. '}:turn:' .. values.turn_id)
      or ('{' .. KEYS[1] .. '}:turn:' .. values.turn_id)
    wants[#wants + 1] = {record.mark, 'string'}
  end
  if totals then
    local day = values.day ~= '' and values.day or ARGV[3]
    record.day_key = 'mg:router:usage:{t:' .. values.tenant .. '}:' .. day
    wants[#wants + 1] = {record.day_key, 'hash'}
  end
  local broken
  for _, want in ipairs(wants) do
    local found = holds(want[1])
    if not broken and found ~= 'none' and found ~= want[2] then broken = {r - 8, want[1], found} end
  end
  if not broken and totals and holds(record.day_key) == 'hash' then
    -- A total HINCRBY refuses (not_counter) would stop the call midway as
    -- a key of another type would.
    local fields = {}
    for i, metric in ipairs(metrics) do fields[i] = values.key_id .. '|' .. values.model .. '|' .. metric end
    for i, total in ipairs(redis.call('HMGET', record.day_key, unpack(fields))) do
      if not_counter(total or nil) then
        broken = {r - 8, record.day_key, 'hash, ' .. fields[i] .. ' not an integer'}
        break
      end
    end
  end
  if broken then
    for _, value in ipairs(broken) do skipped[#skipped + 1] = value end
  else
    records[#records + 1] = record
  end
end
for _, record in ipairs(records) do
  local values, mark = record.values, record.mark
  -- Whether the record is written whole (a turn's first), or its rest only.
  local whole, rest = true, false
  if mark then
    local billed = redis.call('GET', mark)
    if not billed then
      local kept = '1'
      if claim then
        kept = {}
        for i, name in ipairs(amounts) do kept[i] = values[name] end
        kept = table.concat(kept, ':')
      end
      redis.call('SET', mark, kept, 'EX', ARGV[7])
    else
      whole = false
      local before = {}
      for number in string.gmatch(billed, '[^:]+') do before[#before + 1] = tonumber(number) end
      -- A claim's mark: what it billed. A settlement's ('1', as an older
      -- version's claim's was) says the turn is billed: nothing more.
      if #before == #amounts then
        local now = {}
        for i, name in ipairs(amounts) do
          local amount = tonumber(values[name])
          now[i] = string.format('%d', math.max(amount, before[i]))
          values[name] = string.format('%d', math.max(amount - before[i], 0))
          -- Time alone is no rest for a later claim (latency always grows:
          -- each claim of a turn that used nothing more would log it again);
          -- it is for a settlement, whose entry then says how the turn
          -- ended (the claim's says router_lost).
          rest = rest or ((not claim or name ~= 'latency_ms') and amount > before[i])
        end
        -- A claim's mark holds what is billed now; a settlement's says the
        -- turn ended, billed whole.
        if not claim then
          redis.call('SET', mark, '1', 'EX', ARGV[7])
        elseif rest then
          redis.call('SET', mark, table.concat(now, ':'), 'EX', ARGV[7])
        end
      end
    end
  end
  if rest then values.cache_status = '"""
    + CLAIMED_REST
    + """' end
  if (whole or rest) and log then
    local entry = {}
    for _, name in ipairs(names) do
      entry[#entry + 1] = name
      entry[#entry + 1] = values[name]
    end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(entry))
  end
  if (whole or rest) and totals then
    local summary = values.cache_status == '"""
    + SUMMARY_USAGE
    + """'
    -- The counts once per turn, by its first record (a rest's are 0).
    local increments = {
      requests = (summary or rest) and 0 or 1,
      summaries = values.summaries,
      summary_prompt_tokens = summary and values.prompt_tokens or 0,
      summary_completion_tokens = summary and values.completion_tokens or 0,
      failures = (whole and values.failure ~= '') and 1 or 0,
      cache_hits = (whole and string.sub(values.cache_status, -3) == 'hit') and 1 or 0,
      prompt_tokens = values.prompt_tokens, completion_tokens = values.completion_tokens,
      saved_tokens = values.saved_tokens, cost_nano_usd = values.cost_nano_usd,
      latency_ms = values.latency_ms,
    }
    local prefix = values.key_id .. '|' .. values.model .. '|'
    for metric, increment in pairs(increments) do
      if tonumber(increment) ~= 0 then redis.call('HINCRBY', record.day_key, prefix .. metric, increment) end
    end
    redis.call('EXPIRE', record.day_key, ARGV[2])
  end
end
redis.call('SET', KEYS[#KEYS], '"""
    + MARK_WRITTEN
    + """', 'EX', ARGV[6])
if #skipped > 0 then return {1, unpack(skipped)} end
return 1
"""
)


# Where a call's records begin in its ARGV (0-based; ARGV[9] in the script).
_RECORDS_FROM = 8


def _unreadable(key: str, held: str) -> MeshgateError:
    """GetUsage's refusal of a day's totals it cannot add up (an operator's
    or another program's write), logged with the key in full."""
    log.warning("a tenant's usage totals cannot be read", key=key, held=held)
    return MeshgateError(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.USAGE_TOTALS_UNREADABLE,
        f"a day's usage totals hold {held} in Redis, not what the router writes there; "
        "an operator must mend or delete the key",
        {"key": key, "held": held},
    )


# A tenant's records skipped for a key of another type (_RECORD) are logged
# once per this long per tenant, each line with the count left unlogged
# since: a broken key skips every record of its tenant, and a busy tenant's
# would flood the log.
_SKIPPED_LOG_INTERVAL_S = 60.0
_skipped_log = telemetry.ThrottledLog(log, _SKIPPED_LOG_INTERVAL_S)


def day_key(tenant: str, day: str) -> str:
    """A tenant's totals of one UTC day (YYYY-MM-DD), in its limits' slot."""
    return f"mg:router:usage:{{t:{tenant}}}:{day}"


def marker(key: str, name: str) -> str:
    """That a call was written, in the slot of ``key``, the call's last
    written: the log (a key without a hash tag hashes whole, so its name as
    a tag shares its slot) or a tenant's day hash (its tag)."""
    if key == STREAM:
        return f"{{{STREAM}}}:{name}"
    return f"{key.rsplit(':', 1)[0]}:{name}"


def turn_marker(tenant: str, turn_id: str, in_log: bool = False) -> str:
    """That a journaled turn's record was written (the script's mark, as it
    names it: for tests and operators): in the tenant's slot by a call that
    writes its totals, else (``in_log``: a Cluster's log-only call) in the
    log's."""
    if in_log:
        return marker(STREAM, f"turn:{turn_id}")
    return f"mg:router:usage:{{t:{tenant}}}:turn:{turn_id}"


def take_marker(key: str, take_id: str) -> str:
    """That a take's records were written by a call (record_take)."""
    return marker(key, f"take:{take_id}")


def _call_marker(key: str) -> str:
    """That a call of submitted records was written: a fresh id per call
    (64 random bits), kept by the call when it is sent again; a call, not a
    turn, as a call is held exactly as it was made (Backlog), and so one
    mark covers its records, up to _BATCH of them."""
    return marker(key, f"written:{secrets.token_hex(8)}")


# How long a take's markers (the ledger's, and its budgets':
# admission.Admission.charge_take) are kept: as long as the context service
# may hold the take and offer it again, its usage record's lifetime
# (config.summary_usage_ttl_s, from context.session_ttl_s), so that no take is offered
# again once they are gone (they were kept a day, the record a week past the
# session's TTL: a take written and offered again more than a day later,
# no router sweeping meanwhile, was billed twice). The router passes the
# configured one (app.py); this is the default configuration's.
TAKE_MARKER_TTL_S = summary_usage_ttl_s(ContextSettings().session_ttl_s)


# How long the mark of a journaled turn's record is kept, set by its
# settlement: longer than a snapshot of the journal that held the turn may
# still be claimed (turn_journal.JOURNAL_TTL_S: the snapshot was written
# before the turn settled, and expires first), by the longest a snapshot's
# write may take to reach Redis (a write is sent within redis.timeout_s);
# set by a claim: as long as the router whose journal it was may still
# come back (stalled: SIGSTOP, a machine suspended) and settle the turn
# itself, its rest billed then (the mark holds what the claim billed; the
# settlement's then, as any settlement's, is kept SETTLED_TURN_MARKER_TTL_S).
# A mark (133 B of Redis measured on 6.2: used_memory over 100,000 keys)
# per slot written (one; two on a Redis Cluster, the log's and the totals')
# per journaled turn (one in flight when a snapshot was taken: about every
# streamed answer), not per turn; at 100 such turns a second the
# settlements' marks hold ~16 MB (32 MB on a Cluster, the log's half on one
# shard). A claim's, holding its AMOUNTS, 173-181 B (measured alike), only
# for the turns of lost routers.
SETTLED_TURN_MARKER_TTL_S = 20 * 60
CLAIMED_TURN_MARKER_TTL_S = 7 * 24 * 3600


def pack(usage: UsageRecord) -> str:
    """A record as the script reads it: its values in field order, joined
    by _SEPARATOR (one dropped from inside a value: a tenant id could hold
    one, and would shift every value after it)."""
    return _SEPARATOR.join(str(getattr(usage, name)).replace(_SEPARATOR, "") for name in _FIELD_NAMES)


def unpack(packed: str) -> UsageRecord:
    """The record :func:`pack` packed (a turn journal's snapshot of it)."""
    values = packed.split(_SEPARATOR)
    if len(values) != len(_FIELD_NAMES):
        raise ValueError(f"a packed usage record has {len(_FIELD_NAMES)} values, not {len(values)}")
    return UsageRecord(*(kind(value) for kind, value in zip(_FIELD_TYPES, values, strict=True)))


# A ledger write unanswered this long says Redis hangs (a healthy one
# answers within milliseconds): Ledger.holding.
_SLOW_WRITE_S = 0.1

# Records submitted within this long of each other go to Redis in one call
# (at most _BATCH of them): the call's fixed cost, most of the router's CPU
# per record, is shared. A router killed outright loses at most this much.
_FLUSH_AFTER_S = 0.02
_BATCH = 128


class Ledger:
    def __init__(
        self,
        redis,
        stream_max_len: int,
        retention_days: int,
        clock: Callable[[], float] = time.time,
        split_by_slot: bool | None = None,
        take_marker_ttl_s: int = TAKE_MARKER_TTL_S,
    ) -> None:
        self._redis = redis
        self._take_marker_ttl_s = take_marker_ttl_s
        # A Redis Cluster takes the log and each tenant's totals in their own
        # calls (their keys are in different slots); one instance, one call.
        self._split_by_slot = isinstance(redis, RedisCluster) if split_by_slot is None else split_by_slot
        self._script = redis.register_script(_RECORD)
        # Every call marks itself written (_call_marker): one whose reply
        # was lost is sent again, and written once. The records a call
        # skipped (a key of another type) are logged and given up there.
        self._backlog = Backlog(self._script, "ledger", idempotent=True, on_skipped=self._given_up)
        self._stream_max_len = stream_max_len
        self._retention_s = retention_days * 24 * 3600
        self._clock = clock
        # Records to write, each with whether it goes to the log too.
        self._buffer: list[tuple[UsageRecord, bool]] = []
        # What to tell once the buffer's records are written or given up.
        self._on_written: list[Callable[[bool], None]] = []
        # Each write under way, and when it began (monotonic): one slow to
        # answer says Redis hangs before any call failed (holding).
        self._flushing: dict[asyncio.Task, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def reconfigure(self, stream_max_len: int, retention_days: int) -> None:
        """Reloaded bounds, for the records written from now on: GetUsage
        answers for the new retention (RouterServicer.reconfigure), so the
        totals written after a reload must be kept as long."""
        self._stream_max_len = stream_max_len
        self._retention_s = retention_days * 24 * 3600

    def today(self) -> datetime.date:
        """The current UTC day, as the ledger files records."""
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).date()

    async def record(self, usage: UsageRecord) -> None:
        """Writes one record now."""
        await self._write([(usage, True)])

    def submit(
        self, usage: UsageRecord, logged: bool = True, on_written: Callable[[bool], None] | None = None
    ) -> None:
        """Writes a record soon (within _FLUSH_AFTER_S), batched with others:
        how the router records turns, off their critical path; one not
        ``logged`` goes to the totals only, not to the log. ``on_written``
        is told once it is written (True) or given up (False): the turn
        journal holds the turn until then."""
        self._buffer.append((usage, logged))
        if on_written is not None:
            self._on_written.append(on_written)
        if len(self._buffer) >= _BATCH:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_AFTER_S, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._buffer = self._buffer, []
        told, self._on_written = self._on_written, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._write(batch, told))
            self._flushing[task] = time.monotonic()
            task.add_done_callback(self._flushing.pop)

    @property
    def holding(self) -> bool:
        """Whether records may wait a while to be written: calls Redis
        refused are held to be written again (an outage, a shard failing
        over), or a write has gone unanswered for _SLOW_WRITE_S (a Redis
        that hangs: nothing failed before its timeout, redis.timeout_s). A
        turn ending now is kept in the turn journal until its record is
        written (TurnAdmission.settle)."""
        if len(self._backlog):
            return True
        oldest = min(self._flushing.values(), default=None)
        return oldest is not None and time.monotonic() - oldest > _SLOW_WRITE_S

    async def drain(self, until: float | None = None) -> None:
        """Writes every submitted record (before Redis closes), trying what
        Redis refuses again until ``until`` (Backlog.drain)."""
        self._flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        await self._backlog.drain(until)

    async def record_take(self, take_id: str, records: list[UsageRecord]) -> bool:
        """Writes now the records of a take of a session's summaries' usage
        (services/router/summary_usage.py), once per take id: a take
        written before (offered again, its taker dead before acknowledging
        it) writes nothing again. Returns whether its totals were written
        now. Raises where a call failed (nothing held: the take stays held
        at the context service, which offers it again)."""
        calls = self._calls(
            [(usage, True) for usage in records],
            lambda key: take_marker(key, take_id),
            self._take_marker_ttl_s,
        )
        try:
            replies = await run_scripts(self._script, calls)
        except (*redis_access.CONNECTION_ERRORS, RedisError) as error:
            raise redis_access.outage("a summary take's usage cannot be written", error) from error
        for (keys, args), reply in zip(calls, replies, strict=True):
            self._given_up(keys, args, skipped_in(reply))
            if reply == STOPPED_BEFORE:
                # Its write before failed midway (raised: the take offered
                # again); what it wrote stands, and no run can tell the rest.
                # Not raised again: the take would be offered for a week.
                metrics.router().deferred_writes.labels("ledger", "given_up").inc()
                log.error(
                    "a summary take's usage was not written whole: its write before stopped midway",
                    take_id=take_id,
                    tenant=records[0].tenant if records else "",
                )
        # The totals' call is the last: the only one, or the tenant's day hash's.
        return replies[-1] not in (WRITTEN_BEFORE, STOPPED_BEFORE)

    async def record_claim(self, records: list[UsageRecord]) -> None:
        """Writes now the records of the turns of a claimed journal
        (services/router/turn_journal.py), each once per turn id: a turn
        its settlement wrote (or a claim before) is not written again.
        Raises where a call failed (the journal stays, to be claimed again)."""
        calls = self._calls(
            [(usage, True) for usage in records],
            _call_marker,
            WRITTEN_MARK_TTL_S,
            CLAIMED_TURN_MARKER_TTL_S,
            claim=True,
        )
        try:
            replies = await run_scripts(self._script, calls)
        except (*redis_access.CONNECTION_ERRORS, RedisError) as error:
            raise redis_access.outage("a lost router's turns cannot be billed", error) from error
        # A turn skipped (a key of another type) is not billed by a claim
        # again either: the journal is deleted as billed.
        for (keys, args), reply in zip(calls, replies, strict=True):
            self._given_up(keys, args, skipped_in(reply))

    def _given_up(self, keys: list[str], args: list, skipped: list[Skipped]) -> None:
        """Logs (per tenant, throttled) and counts the records a call did not
        write, as a key of theirs held another type (_RECORD): given up, not
        sent again (the key holds what it holds until someone looks)."""
        for one in skipped:
            usage = unpack(args[_RECORDS_FROM + one.index - 1])
            if one.key == STREAM:
                kind = "usage log"
            elif one.key == day_key(usage.tenant, usage.day or args[2]):
                kind = "usage totals"
            else:
                kind = "turn mark"
            metrics.router().deferred_writes.labels("ledger", "given_up").inc()
            _skipped_log.warning(
                "a usage record was not written: a key it writes holds another type or a non-integer",
                per=usage.tenant,
                tenant=usage.tenant,
                key_kind=kind,
                key=one.key,
                holds=one.holds,
                model=usage.model,
                turn_id=usage.turn_id,
            )

    async def _write(
        self, records: list[tuple[UsageRecord, bool]], told: Sequence[Callable[[bool], None]] = ()
    ) -> None:
        # The callers have their answers: a call that failed is sent again
        # later, until Redis answers it (script_calls).
        done = None
        if told:

            def done(written: bool) -> None:
                for tell in told:
                    tell(written)

        await self._backlog.run(self._calls(records, _call_marker, WRITTEN_MARK_TTL_S), done)

    def _calls(
        self,
        records: list[tuple[UsageRecord, bool]],
        marker_of: Callable[[str], str],
        marker_ttl_s: int,
        turn_marker_ttl_s: int = SETTLED_TURN_MARKER_TTL_S,
        claim: bool = False,
    ) -> list[tuple[list[str], list]]:
        """The script calls that write ``records`` (each with whether it
        goes to the log), each marked by ``marker_of`` its last key, kept
        ``marker_ttl_s``; the marks of its records of journaled turns kept
        ``turn_marker_ttl_s``, holding what they billed where ``claim``
        (a claim of a journal's: its turns may go on, and settle later)."""
        ttls = [marker_ttl_s, turn_marker_ttl_s, "1" if claim else "0"]
        packed = [pack(usage) for usage, _ in records]
        today = f"{self.today():%Y-%m-%d}"
        header = [self._stream_max_len, self._retention_s, today]
        # The day hash of each record: its own day's, else today's.
        hashes = [
            day_key(usage.tenant.replace(_SEPARATOR, ""), usage.day.replace(_SEPARATOR, "") or today)
            for usage, _ in records
        ]
        logged = [values for values, (_, to_log) in zip(packed, records, strict=True) if to_log]
        if self._split_by_slot:
            by_hash: dict[str, list[str]] = {}
            for key, values in zip(hashes, packed, strict=True):
                by_hash.setdefault(key, []).append(values)
            calls = [([STREAM], [*header, "1", "0", *ttls, *logged])] if logged else []
            calls += [([key], [*header, "0", "1", *ttls, *rows]) for key, rows in by_hash.items()]
        elif len(logged) == len(packed):
            calls = [([STREAM, *dict.fromkeys(hashes)], [*header, "1", "1", *ttls, *packed])]
        else:
            # The script's two flags hold for a whole call: the records that
            # go to the log in one, those that do not in another.
            calls = []
            in_log = [to_log for _, to_log in records]
            for part, flag in ((True, "1"), (False, "0")):
                keys = [key for key, to_log in zip(hashes, in_log, strict=True) if to_log is part]
                rows = [values for values, to_log in zip(packed, in_log, strict=True) if to_log is part]
                if rows:
                    stream = [STREAM] if part else []
                    calls.append(([*stream, *dict.fromkeys(keys)], [*header, flag, "1", *ttls, *rows]))
        return [([*keys, marker_of(keys[-1])], args) for keys, args in calls]

    async def usage(
        self, tenant: str, first_day: datetime.date, last_day: datetime.date
    ) -> dict[tuple[str, str], dict[str, int]]:
        """Totals per (key id, model) over the days, both ends included."""
        days = [first_day + datetime.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
        keys = [day_key(tenant, f"{day:%Y-%m-%d}") for day in days]
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        totals: dict[tuple[str, str], dict[str, int]] = {}
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (*redis_access.CONNECTION_ERRORS, RedisError) as error:
            raise redis_access.outage("usage cannot be read", error) from error
        for key, fields in zip(keys, replies, strict=True):
            if redis_access.is_wrong_type(fields):
                # An operator's write: UNAVAILABLE (as any Redis error was)
                # told the caller to retry what no retry mends.
                raise _unreadable(key, "another type than a hash")
            if isinstance(fields, Exception):
                raise redis_access.outage("usage cannot be read", fields)
            for field, value in fields.items():
                key_id, bar, rest = field.decode(errors="replace").partition("|")
                model, bar_again, metric = rest.rpartition("|")
                if not (bar and bar_again) or metric not in METRICS:
                    # A newer replica's metric (a rolling upgrade that adds
                    # one, as the summaries' did), or no field the router
                    # writes: left out, not the whole read failed INTERNAL.
                    continue
                if not is_counter(value):
                    held = f"a total that is not an integer ({key_id}|{model}|{metric})"
                    raise _unreadable(key, held)
                row = totals.setdefault((key_id, model), dict.fromkeys(METRICS, 0))
                row[metric] += int(value)
        return totals
