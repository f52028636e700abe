"""Admission control: limits per tenant, per API key and per model alias,
exact across any number of router replicas.

Every limit lives in Redis and is checked and charged by one Lua script per
Redis Cluster slot, so replicas share one truth: a script runs alone, and
either every limit it holds admits the turn and all are charged, or none is.
Keys, all under ``mg:router:limit:{<tag>}:<scope>:<id>``, where scope is
``tenant``, ``key`` (the first 16 hex digits of the key's SHA-256) or
``model``, and the hash tag puts a tenant's own counters and its keys'
counters in one slot (``{t:<tenant>}``) and a model alias's counters, which
every tenant shares, in another (``{m:<alias>}``):

- ``...:rpm`` and ``...:tpm`` (+ ``:sum``): requests and tokens per
  minute, as a sliding-window log: a sorted set of the turns admitted in
  the last 60 s (member ``<lease>:<cost>``, scored by admission time) and
  the sum of their costs. A turn of cost c is admitted when sum + c <=
  limit, so no trailing minute ever holds more than the limit. Chosen over
  GCRA / token buckets (O(1), but they admit a full burst and then refill
  continuously: up to twice the limit in one 60 s window, and in a short
  burst the refill alone overshoots) and over a sliding-window counter (two
  fixed buckets blended: an approximation). The log costs one entry per
  turn in the window, bounded by the limit for requests. A token
  reservation is settled by rewriting its entry to the real use.
- ``...:tokens:day:<YYYY-MM-DD>``, ``...:tokens:month:<YYYY-MM>`` and the
  ``cost:`` twins: budget counters per UTC calendar period (cost in
  nano-USD, integers so INCRBY stays exact); a new period is a new key, so
  budgets roll over at the period end by construction, and old keys expire.
- ``...:streams``: a sorted set of the open streams' lease ids, scored by
  when the lease expires (the longest a generation may last, plus a
  margin), so a replica that dies holding streams frees them eventually.
- ``mg:router:limit:{<tag>}:admit:<lease>``: a turn's mark, per script call,
  where the turn may be refused while a call of it may have run (a limit of
  it fails closed, or its calls are two: one slot may refuse while the
  other's times out), and on every top-up (whose growth is given back
  failing open too): "1" once its admit charged it ("3" its second admit,
  after a streams refusal), "2" once its top-up grew it, "0" once a
  release ran (below), kept as long as a stream's lease.
- ``mg:router:limit:{<tag>}:take:<take id>``: that a take of a session's
  summaries' usage was charged to the budgets of the slot (charge_take),
  set by the script that charges them.
- ``mg:router:limit:{<tag>}:settled:<call id>``: that a call of turns'
  settlements ran (_SETTLE_ONCE), one per call (up to _SETTLE_BATCH turns),
  kept script_calls.WRITTEN_MARK_TTL_S, so that the call sent again after a
  lost reply settles nothing twice ("0" from its start, "1" once it ended:
  a call found begun stopped midway on an error from Redis, and is given
  up). A turn's settlement is not written in the slot of a key of it that
  holds another type; the call's other turns are (_SETTLE_ONCE).

One round trip per turn on the hot path: the admit scripts of a turn (one
per slot: the tenant's, and the model's when it has limits) go in one
pipeline, and settlements are written in batches off the turn's path (one
script call per slot and flush, for many turns). A model's limits are
checked in their own script, so a turn the tenant's script admits and the
model's refuses (or the reverse) is refunded right away by a settlement to
nothing (by a release, below, where the other call timed out): no limit is
ever exceeded (each is checked atomically), but for that instant another
turn may see the refunded charge and be refused.

Tokens are reserved at admission: a bound on what inference will bill as
the prompt, the chat template rendered over the new messages (their UTF-8
bytes and the template's own, prompt_bound.py: every token of either
tokenizer covers at least one byte of the rendering), plus max_tokens. A
session turn's history, which the model reads and inference bills too, is
known only once assembled: the pipeline then grows the reservation to the
assembled prompt's bound (``top_up``, one more script call, only for a turn
a token or cost limit charges), before anything is generated, or the turn
is refused as admission would have refused it, and settles to nothing. So a
turn's settlement stays within what its limits were checked for; where it
cannot (docs/limits-and-usage.md lists where: a template that cannot be measured, a cache
hit's share of a longer prompt's answer, fail open), the whole use is still
charged and the excess logged. The settlement at the end of the turn
(success, failure or cancellation) replaces the reservation by the real
usage. A turn whose caller went away while its
admit (or top-up) script was in Redis is refunded in full (its growth given
back) when the reply comes (the script may have run).
Settlements are written within ``SETTLE_AFTER_S``: a stream's lease may
outlive its stream by that long, so a turn refused for concurrent streams
first writes this replica's pending settlements, waits out every other
replica's flush interval, and asks once more before the refusal stands.

Clock: windows use Redis's TIME unless a clock is injected (tests), so every
replica measures the same minute; calendar periods follow the caller's
clock (``time.time`` by default).

When Redis is unreachable or fails the script (out of memory, a read-only
replica), the limits a scope lists in ``fail_closed`` refuse the turn with
UNAVAILABLE; every other limit is waived (fail open). A turn so admitted
reserved nothing, and its settlement charges its budgets its whole use
(once Redis is back: a settlement Redis refuses is written again,
script_calls.Backlog); where the script may have run before the failure (a
timeout, a connection lost after the call was sent) what it charged stands
instead, as admitted (never_ran); but a top-up's growth is released
(below), the turn going on and settling from what admission reserved. A
turn refused where a call of it may have run (a limit failing closed
refuses it on that failure, or another slot's limit refuses it) is charged
nothing in the end: the router sends a release (``_RELEASE``, run again
until Redis answers it) that gives back what the admit charged, or the
top-up grew, only where the turn's mark says it did, and marks it released,
so that a call still on its way charges nothing. A top-up's growth so given
back (or, its caller gone, once its reply comes: ``_undo_abandoned_growth``)
is its budgets' alone, a delta that commutes with the turn's settlement
whichever reaches Redis first; a window's entry, renamed to the grown cost,
is the settlement's to move, which looks for it there too
(``Reservation.growth_unseen``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import fractions
import functools
import math
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import structlog
from google.rpc import error_details_pb2
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from meshgate import metrics, redis_access, telemetry
from meshgate.config import LimitSettings, PriceSettings, RouterSettings
from meshgate.errors import MeshgateError, retry_info, unavailable
from meshgate.reasons import Reason
from services.router.ledger import SUMMARY_USAGE, TAKE_MARKER_TTL_S, Ledger, UsageRecord
from services.router.prompt_bound import PromptBound, bound_of
from services.router.script_calls import (
    KEY_TYPES_LUA,
    MARK_WRITTEN,
    WRITTEN_MARK_TTL_S,
    Backlog,
    Skipped,
    begin_call_lua,
    never_ran,
    run_scripts,
)
from services.router.turn_journal import ROUTER_LOST, Tracked, TurnJournal

log = structlog.get_logger(__name__)

_MINUTE_MS = 60_000
NANO_USD = 1_000_000_000
# How long past a generation's deadline a stream's lease is kept.
_LEASE_MARGIN_MS = 60_000
# Budget counters outlive their period by this much.
_BUDGET_GRACE_S = 2 * 24 * 3600
# Settlements of turns ending within this long of each other are written
# together (at most _SETTLE_BATCH turns): the call's fixed cost, most of
# what settling cost the router per turn, is shared.
SETTLE_AFTER_S = 0.01
_SETTLE_BATCH = 128
# How long a settlement call's mark (_SETTLE_ONCE) is kept: past the longest a
# settlement is sent again (script_calls.WRITTEN_MARK_TTL_S).
_SETTLED_MARK_MS = WRITTEN_MARK_TTL_S * 1000

# Every key a script touches is in KEYS (a Redis Cluster routes a call by
# them), each once: a window's entries then its sum, a budget's counter, a
# streams set. ARGV: now_ms ('' = Redis TIME), then per turn its lease id and
# one word "kind a b cost k" per check, k the index of its key in KEYS
# (packed in one argument: redis-py's encoding of each argument was most of
# admission's CPU, and a batch of settlements names a key once, not per turn).
#   'w' window   a = limit, b = window ms: entries "<lease>:<cost>" scored by
#                their admission time, and the sum of their costs.
#   'b' budget   a = limit, b = seconds to keep the counter.
#   's' streams  a = limit, b = lease ms.
_PARSE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000 + t[2] / 1000
end
local function entry_cost(member) return tonumber(string.match(member, ':(%-?%d+)$')) end
-- The checks of one turn; a check's key is KEYS[k] (a window's sum, the next).
local function parse(words)
  local checks = {}
  for kind, a, b, cost, k in string.gmatch(words, '(%a) (%-?%d+) (%-?%d+) (%-?%d+) (%d+)') do
    -- Numbers, and the words as sent (a Lua number above 1e14 prints in
    -- exponent form, so members are built from the words).
    local check = {kind = kind, a = tonumber(a), b = tonumber(b), cost = cost, a_word = a, b_word = b}
    k = tonumber(k)
    check.key = KEYS[k]
    if kind == 'w' then check.sum_key = KEYS[k + 1] end
    checks[#checks + 1] = check
  end
  return checks
end
-- A window's entries that left it give their cost back (housekeeping, not
-- a charge: done even if a later check refuses).
local function expire(key, sum_key, b)
  local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now - b)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do freed = freed + entry_cost(member) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - b)
    redis.call('DECRBY', sum_key, freed)
  end
end
-- When a window's oldest entry leaves it (ms from now): what is left of it
-- next grows then (every entry costs something: _SETTLE_TURN).
local function frees_in(key, b)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return math.max(0, math.ceil(tonumber(oldest[2]) + b - now))
end
-- A window refusal's retry delay (ms): when enough of the oldest entries
-- to free ``need`` will have left.
local function retry_after(key, need, b)
  local freed = 0
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for j = 1, #entries, 2 do
    freed = freed + entry_cost(entries[j])
    if freed >= need then return math.ceil(tonumber(entries[j + 1]) + b - now) end
  end
  return b
end
"""

# One turn: returns {1, then per window check, in order, its use with this
# turn's charge and the ms until its oldest entry leaves it} when every check
# admits (all are then charged), else {0, index of the first refusing check,
# retry after ms, and a window's use without the turn}.
_ADMIT = (
    _PARSE
    + """
local lease = ARGV[2]
local checks = parse(ARGV[3])
-- A turn that may be refused while a call of it may have run is marked
-- (KEYS' last, set to ARGV[5], kept ARGV[4] ms: Admission._run_or_refuse),
-- for its release (_RELEASE). Released before this ran: its caller gave
-- up on it, and nobody reads this reply (_run_or_refuse would take it for
-- a failure). (A mark of the first admit is a charge refunded since, its
-- turn asking again with another mark: _admit_or_refuse.)
local mark_ms = ARGV[4]
if mark_ms and redis.call('GET', KEYS[#KEYS]) == '0' then return {2} end
for i, check in ipairs(checks) do
  local kind, a, b, key, sum_key = check.kind, check.a, check.b, check.key, check.sum_key
  local cost = tonumber(check.cost)
  if kind == 'w' then
    expire(key, sum_key, b)
    local used = tonumber(redis.call('GET', sum_key)) or 0
    if used + cost > a then return {0, i, retry_after(key, used + cost - a, b), used} end
  elseif kind == 'b' then
    local used = tonumber(redis.call('GET', key)) or 0
    if used + cost > a then return {0, i, 0} end
  elseif kind == 's' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= a then return {0, i, 1000} end
  end
end
local seen = {1}
for _, check in ipairs(checks) do
  local kind, b, cost, key = check.kind, check.b, check.cost, check.key
  if kind == 'w' then
    redis.call('ZADD', key, now, lease .. ':' .. cost)
    seen[#seen + 1] = redis.call('INCRBY', check.sum_key, cost)
    seen[#seen + 1] = frees_in(key, b)
    redis.call('PEXPIRE', key, b)
    redis.call('PEXPIRE', check.sum_key, b)
  elseif kind == 'b' then
    redis.call('INCRBY', key, cost)
    redis.call('EXPIRE', key, b)
  elseif kind == 's' then
    redis.call('ZADD', key, now + b, lease)
    redis.call('PEXPIRE', key, b)
  end
end
if mark_ms then redis.call('SET', KEYS[#KEYS], ARGV[5], 'PX', mark_ms) end
return seen
"""
)

# One turn's settlement, each check's word being "kind reserved used when k"
# (when: a budget's _Check.expires_at_s; a window's, the cost a top-up the
# turn did not see answer may have grown its entry to, else 0
# (Reservation.growth_unseen); 0 for streams): a window entry and a budget
# move from what was reserved to the real use; a stream's lease is
# released. An entry already out of its window is left alone: that window
# has passed.
_SETTLE_TURN = """
local function settle(lease, checks)
  for _, check in ipairs(checks) do
    local kind, reserved, used, key = check.kind, check.a, check.b, check.key
    local grown = kind == 'w' and check.cost ~= '0'
    if kind == 'w' and (used ~= reserved or grown) then
      local member, from = lease .. ':' .. check.a_word, reserved
      local score = used ~= reserved and redis.call('ZSCORE', key, member)
      if not score and grown then
        -- An entry the growth renamed (it landed unseen) moves from the
        -- grown cost; the budgets' growth is given back apart, either order.
        member, from = lease .. ':' .. check.cost, tonumber(check.cost)
        score = redis.call('ZSCORE', key, member)
      end
      if score and used ~= from then
        redis.call('ZREM', key, member)
        -- An entry of no use leaves the window: it would be its oldest and
        -- say a reset that frees nothing (the admit's x-ratelimit-reset-*).
        if used ~= 0 then redis.call('ZADD', key, score, lease .. ':' .. check.b_word) end
        redis.call('INCRBY', check.sum_key, used - from)
      end
    elseif kind == 'b' and used ~= reserved then
      if redis.call('EXISTS', key) == 1 then
        redis.call('INCRBY', key, used - reserved)
      elseif used > reserved and tonumber(check.cost) * 1000 > now then
        -- Admitted without Redis (nothing reserved), or the key gone: the
        -- use is charged anew, kept to its period's end (cost: when), as
        -- long from now as admission's keep-time is (the router's clock).
        redis.call('INCRBY', key, used - reserved)
        redis.call('EXPIRE', key, math.ceil(tonumber(check.cost) - now / 1000))
      end
    elseif kind == 's' then
      redis.call('ZREM', key, lease)
    end
  end
end
"""

# Any number of turns: ARGV is now_ms, then per turn its lease and its words.
_SETTLE = (
    _PARSE
    + _SETTLE_TURN
    + """
for t = 2, #ARGV, 2 do
  settle(ARGV[t], parse(ARGV[t + 1]))
end
return 1
"""
)

# The settlements of turns' ends (Admission.settle, settle_soon): as
# _SETTLE, but once per call: ARGV is now_ms, how long (ms) to keep the
# call's mark, then per turn its lease and its words; KEYS' last is the
# call's mark (_settled_key: a random id per call, kept by the call when it
# is sent again), set in the same script as the settlements. A call whose
# mark is set ran before, and settles nothing again: so a call whose reply
# was lost (a timeout, a connection lost after sending: it may have run) is
# sent again until Redis answers, as a release is, instead of being given
# up with its turns' reservations standing and their streams held until
# their leases expire (the tenant refused by concurrent_streams meanwhile).
# A turn is in one settlement call only (Reservation.settled), and a call
# is sent again exactly as it was made (script_calls.Backlog), so one mark
# a call is as safe as one a turn, and a batch of up to _SETTLE_BATCH turns
# leaves one key, not one per turn (~180 bytes for 660 s each: 120 MB at
# 1,000 turns a second).
#
# A batch holds many tenants' turns, and Redis does not roll a script back:
# one key of another type (a tenant's streams set, a window or a budget
# counter: an operator's or a bug's write) failed the call WRONGTYPE midway,
# the turns before it settled and those after not, the mark set, so the
# call sent again settled nothing more: other tenants' reservations stood
# and their streams stayed held (refused concurrent_streams for minutes).
# So before anything is written each turn's keys are asked their type, and
# a turn's checks in the slot (hash tag) of a key of another type are
# skipped whole, the rest written; so are those in the slot of a counter (a
# budget, a window's sum) whose string is not an integer, which INCRBY
# refuses alike. Per slot, not per turn: a model's keys
# (shared by every tenant) broken skip that slot's part of each turn, not
# each tenant's own, as a Redis Cluster's call per slot would. The mark is
# set first (MARK_BEGUN), then marked written (MARK_WRITTEN) last: a call
# that still stops midway (an error no check foresees) says so when sent
# again (STOPPED_BEFORE) and is given up, not counted settled. Returns 1; or {1, then per part skipped its
# turn's index among the call's (1-based), the key and the type it holds}
# (script_calls.skipped_in); or 0 where the mark says the call ran before,
# -1 where it says a run of it stopped midway.
_SETTLE_ONCE = (
    _PARSE
    + _SETTLE_TURN
    + begin_call_lua("'PX', ARGV[2]")
    + KEY_TYPES_LUA
    + """
-- Read only, before any turn is settled: the type each check's keys must
-- hold ('none': gone, or never made).
local must_hold, turns, skipped = {w = 'zset', b = 'string', s = 'zset'}, {}, {}
local function wrong(key, must)
  local held = must == 'string' and counter_holds(key) or holds(key)
  if held ~= 'none' and held ~= must then return held end
end
local function slot(key) return string.match(key, '{[^}]*}') or key end
for t = 3, #ARGV, 2 do
  local checks, broken, kept = parse(ARGV[t + 1]), {}, {}
  for _, check in ipairs(checks) do
    local tag = slot(check.key)
    if not broken[tag] then
      local key, found = check.key, wrong(check.key, must_hold[check.kind])
      if not found and check.sum_key then key, found = check.sum_key, wrong(check.sum_key, 'string') end
      if found then
        broken[tag] = true
        for _, value in ipairs({(t - 1) / 2, key, found}) do skipped[#skipped + 1] = value end
      end
    end
  end
  for _, check in ipairs(checks) do
    if not broken[slot(check.key)] then kept[#kept + 1] = check end
  end
  turns[#turns + 1] = {ARGV[t], kept}
end
for _, turn in ipairs(turns) do settle(turn[1], turn[2]) end
redis.call('SET', KEYS[#KEYS], '"""
    + MARK_WRITTEN
    + """', 'PX', ARGV[2])
if #skipped > 0 then return {1, unpack(skipped)} end
return 1
"""
)

# A turn refused where its admit or top-up may have run (a timeout), or
# going on failing open where its top-up may have: ARGV now_ms, its lease,
# its words giving back what that call charged (an admit's: to nothing; a
# top-up's: its budgets to what was reserved before, its windows left to
# the turn's settlement), how long to keep its mark (KEYS' last), and the
# mark that call sets. The charge is given back only where the mark says
# the call ran; then the mark says released ("0"), so a second release does
# nothing and an admit or top-up run after it charges nothing.
_RELEASE = (
    _PARSE
    + _SETTLE_TURN
    + """
local mark = KEYS[#KEYS]
if redis.call('GET', mark) == ARGV[5] then settle(ARGV[2], parse(ARGV[3])) end
redis.call('SET', mark, '0', 'PX', ARGV[4])
return 1
"""
)

# A take of a session's summaries' usage, charged to its budgets once per
# take id (Admission.charge_take): as _SETTLE's ARGV, with the take's
# marker's TTL in s after now_ms, and the marker KEYS' last (in the call's
# slot), set in the same script as the charge. Returns 1, or 0 where the
# marker was set already (charged before: nothing is charged again).
_CHARGE_TAKE = (
    _PARSE
    + _SETTLE_TURN
    + """
if not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', ARGV[2]) then return 0 end
for t = 3, #ARGV, 2 do
  settle(ARGV[t], parse(ARGV[t + 1]))
end
return 1
"""
)


# One admitted turn's reservation grows (Admission.top_up): its lease, then
# one word "kind a b reserved grown k" per window or budget that charges it
# more, its key KEYS[k], and as _ADMIT's its mark's keep-time and value
# (every top-up is marked: KEYS' last). Returns {1, then per window as
# _ADMIT's} when every check holds the growth (all are then charged: a
# window's entry is rewritten to the grown cost, kept at its admission
# time), else {0, index of the first refusing check, retry after ms, a
# window's use}, charging nothing: the turn's reservation stands as
# admitted; {2} where its growth was released before this ran.
_TOP_UP = (
    _PARSE
    + """
local lease = ARGV[2]
if redis.call('GET', KEYS[#KEYS]) == '0' then return {2} end
local checks = {}
for kind, a, b, reserved, grown, k in
    string.gmatch(ARGV[3], '(%a) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%d+)') do
  k = tonumber(k)
  checks[#checks + 1] = {
    kind = kind, a = tonumber(a), b = tonumber(b), key = KEYS[k], sum_key = KEYS[k + 1],
    member = lease .. ':' .. reserved, grown_member = lease .. ':' .. grown,
    more = tonumber(grown) - tonumber(reserved), grown = tonumber(grown),
  }
end
for i, check in ipairs(checks) do
  if check.kind == 'w' then
    expire(check.key, check.sum_key, check.b)
    -- The turn's entry; gone when it has left the window (admitted more
    -- than a window ago): then the grown cost is charged anew, from now.
    check.score = redis.call('ZSCORE', check.key, check.member)
    if not check.score then check.more = check.grown end
    local used = tonumber(redis.call('GET', check.sum_key)) or 0
    if used + check.more > check.a then
      return {0, i, retry_after(check.key, used + check.more - check.a, check.b), used}
    end
  else
    local used = tonumber(redis.call('GET', check.key)) or 0
    if used + check.more > check.a then return {0, i, 0} end
  end
end
local seen = {1}
for _, check in ipairs(checks) do
  if check.kind == 'w' then
    if check.score then redis.call('ZREM', check.key, check.member) end
    redis.call('ZADD', check.key, check.score or now, check.grown_member)
    seen[#seen + 1] = redis.call('INCRBY', check.sum_key, check.more)
    seen[#seen + 1] = frees_in(check.key, check.b)
    redis.call('PEXPIRE', check.key, check.b)
    redis.call('PEXPIRE', check.sum_key, check.b)
  else
    redis.call('INCRBY', check.key, check.more)
    redis.call('EXPIRE', check.key, check.b)
  end
end
redis.call('SET', KEYS[#KEYS], ARGV[5], 'PX', ARGV[4])
return seen
"""
)


@dataclasses.dataclass(frozen=True)
class Scope:
    """Who a set of limits applies to: ("tenant", id), ("key", id, tenant)
    or ("model", alias)."""

    kind: str
    id: str
    limits: LimitSettings
    # The tenant an API key belongs to: its counters share the tenant's slot.
    tenant: str = ""

    @property
    def slot_tag(self) -> str:
        """The Redis Cluster hash tag of the scope's keys: a tenant's and its
        keys' counters share a slot; a model alias's (shared by every
        tenant) have their own."""
        if self.kind == "model":
            return f"{{m:{self.id}}}"
        return f"{{t:{self.tenant or self.id}}}"

    @property
    def prefix(self) -> str:
        return f"mg:router:limit:{self.slot_tag}:{self.kind}:{self.id}"


@dataclasses.dataclass(frozen=True)
class _Check:
    """One limit of a scope as the scripts take it, for one second (a
    budget's key and keep-time follow the calendar): built once per scope
    and second, not per turn."""

    scope: Scope
    limit: str
    # The check's keys, as the scripts take them (a window: entries, sum).
    keys: tuple[str, ...]
    kind: str
    a: int
    b: int
    # What a turn costs it: "requests" (one), "tokens" or "cost" (nano-USD).
    charges: str
    # Which script call of a turn the check goes in (see Admission).
    slot: str
    # A budget's period end plus its grace, in epoch seconds: a settlement
    # that finds its key gone (or never made: admitted without Redis)
    # makes it anew until then (_SETTLE).
    expires_at_s: int = 0

    @property
    def key(self) -> str:
        return self.keys[0]

    @functools.cached_property
    def word(self) -> str:
        """The check's word in an admit call, but for its cost."""
        return f"{_KIND_CODE[self.kind]} {self.a} {self.b} "

    def cost(self, tokens: int, nano_usd: int) -> int:
        if self.charges == "tokens":
            return tokens
        return nano_usd if self.charges == "cost" else 1


class _Plan:
    """A scope's checks, rebuilt when the second changes."""

    def __init__(self, scope: Scope, slot: str, lease_ms: int) -> None:
        self.scope = scope
        self._slot = slot
        self._lease_ms = lease_ms
        self._second = -1
        self._checks: tuple[_Check, ...] = ()

    def checks(self, second: int) -> tuple[_Check, ...]:
        if second != self._second:
            self._checks = self._build(second)
            self._second = second
        return self._checks

    def _build(self, second: int) -> tuple[_Check, ...]:
        limits, prefix, slot = self.scope.limits, self.scope.prefix, self._slot
        day, month, day_left_s, month_left_s = _period_ids(second)
        keep_day_s, keep_month_s = day_left_s + _BUDGET_GRACE_S, month_left_s + _BUDGET_GRACE_S
        checks = []
        for name, kind, suffixes, b, charges in (
            ("requests_per_minute", "window", ("rpm", "rpm:sum"), _MINUTE_MS, "requests"),
            ("tokens_per_minute", "window", ("tpm", "tpm:sum"), _MINUTE_MS, "tokens"),
            ("concurrent_streams", "streams", ("streams",), self._lease_ms, "requests"),
            ("tokens_per_day", "budget", (f"tokens:day:{day}",), keep_day_s, "tokens"),
            ("tokens_per_month", "budget", (f"tokens:month:{month}",), keep_month_s, "tokens"),
            ("cost_usd_per_day", "budget", (f"cost:day:{day}",), keep_day_s, "cost"),
            ("cost_usd_per_month", "budget", (f"cost:month:{month}",), keep_month_s, "cost"),
        ):
            value = getattr(limits, name)
            if value is None:
                continue
            limit = budget_nano_usd(value) if charges == "cost" else value
            keys = tuple(f"{prefix}:{suffix}" for suffix in suffixes)
            expires_at_s = second + b if kind == "budget" else 0
            checks.append(_Check(self.scope, name, keys, kind, limit, b, charges, slot, expires_at_s))
        return tuple(checks)


@dataclasses.dataclass(frozen=True, slots=True)
class WindowUse:
    """A rate window of a limited scope as admitting a turn left it (what a
    front end tells its caller: the HTTP edge's x-ratelimit-* headers)."""

    # "requests_per_minute" or "tokens_per_minute".
    limit: str
    # Whose: "tenant", "key" or "model".
    scope: str
    value: int
    # The window's use with this turn's charge (its tokens as reserved).
    used: int
    # Until its oldest entry leaves the window: when its use next falls.
    frees_in_ms: int
    # When Redis said so (time.monotonic()): a response that starts later
    # (a whole answer, after its generation) says the wait from then.
    said_at_s: float | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.value - self.used)

    def frees_in_ms_at(self, now_s: float) -> int:
        if self.said_at_s is None:
            return self.frees_in_ms
        return max(0, self.frees_in_ms - int((now_s - self.said_at_s) * 1000))


# The per-minute limits a front end tells its caller, in the order it does.
RATE_LIMITS = ("requests_per_minute", "tokens_per_minute")


def tightest_windows(windows: tuple[WindowUse, ...]) -> list[WindowUse]:
    """Of a turn's windows (Reservation.windows), for each of RATE_LIMITS
    that some scope sets, the one with the least remaining: what limits the
    caller's next turns first."""
    tightest = []
    for limit in RATE_LIMITS:
        window = min((w for w in windows if w.limit == limit), key=lambda w: w.remaining, default=None)
        if window is not None:
            tightest.append(window)
    return tightest


@dataclasses.dataclass
class Reservation:
    """What admission charged for one turn; settle it exactly once."""

    lease_id: str
    reserved_tokens: int
    reserved_nano_usd: int
    # Checks to settle: token rates, budgets, streams. Admitted without
    # Redis (fail open): nothing was charged, and its budgets alone, charged
    # the whole use when it settles, so later turns see it.
    checks: tuple[_Check, ...]
    settled: bool = False
    # The UTC day (YYYY-MM-DD) of its admission: its budgets' day, and the
    # ledger's for its record, whenever it ends (a turn admitted at
    # 23:59:59 and ended after midnight was in one day's budget and the
    # next day's ledger).
    day: str = ""
    # Admitted without Redis: its reservation is nothing (fail open).
    unchecked: bool = False
    # Admitted failing open where its admit may have run (a timeout): its
    # checks are only those its settlement finds by its lease (streams,
    # token windows), and it is not grown (top_up).
    admit_unsure: bool = False
    # The prices it was admitted at (None: none configured), which it is
    # billed at whenever it ends: a reload's prices apply from the next
    # turn, as its limits do.
    price: PriceSettings | None = None
    # The tokens and nano-USD a top-up of it grew it to where the turn did
    # not see it answer (its call failed after it was sent, was refused by
    # another slot, or its caller went away), so the growth may have landed:
    # a window's entry then bears the grown cost until the settlement moves
    # it (_SETTLE_TURN looks for it there too), and the budgets' growth is
    # given back apart (top_up). None once a top-up answered.
    growth_unseen: tuple[int, int] | None = None
    # Its scopes' rate windows as its admission left them (none admitted
    # without Redis, or failing open).
    windows: tuple[WindowUse, ...] = ()


def estimate_prompt_tokens(messages) -> int:
    """An upper bound on the tokens of the new messages' content: no token of
    a byte-level BPE or WordPiece vocabulary is shorter than one byte."""
    # ASCII text (most) is as many bytes as characters: no encoding needed.
    return sum(
        len(content) if content.isascii() else len(content.encode())
        for content in (message.content for message in messages)
    )


def cost_nano_usd(price: PriceSettings | None, prompt_tokens: int, completion_tokens: int) -> int:
    """What the tokens cost, in whole nano-USD rounded up, in exact
    arithmetic: through binary floats, 3 tokens at $0.1 a million came to
    301 nano-USD (0.1 * 3 * 1000 = 300.00000000000006), about one turn in
    eight was billed a nano-USD over, and a budget of exactly the cost
    refused it."""
    if price is None:
        return 0
    prompt_num, prompt_den = _nano_usd_per_token(price.prompt_usd_per_million)
    completion_num, completion_den = _nano_usd_per_token(price.completion_usd_per_million)
    cost = prompt_tokens * prompt_num * completion_den + completion_tokens * completion_num * prompt_den
    return -(-cost // (prompt_den * completion_den))


def budget_nano_usd(usd: float) -> int:
    """A cost limit in whole nano-USD: the decimal written, rounded down, as
    turns are billed in whole nano-USD. Through a binary float and round(),
    a budget of $0.000123456789 admitted 123,457 nano-USD, 0.211 over it."""
    numerator, denominator = _exact(usd)
    return numerator * NANO_USD // denominator


def share_nano_usd(cost: int, fraction: float) -> int:
    """``fraction`` of ``cost`` (a cache hit's cache_hit_fraction), rounded up, exactly."""
    numerator, denominator = _exact(fraction)
    return -(-cost * numerator // denominator)


@functools.lru_cache(maxsize=1024)
def _exact(value: float) -> tuple[int, int]:
    """A configured number as the decimal the operator wrote (its shortest
    round-trip form), as a fraction: 0.1 is 1/10, not the binary float's
    3602879701896397/36028797018963968."""
    exact = fractions.Fraction(repr(value))
    return exact.numerator, exact.denominator


@functools.lru_cache(maxsize=1024)
def _nano_usd_per_token(usd_per_million: float) -> tuple[int, int]:
    numerator, denominator = _exact(usd_per_million)
    exact = fractions.Fraction(numerator * (NANO_USD // 1_000_000), denominator)
    return exact.numerator, exact.denominator


def used_tokens(turn, outcome) -> tuple[int, int]:
    """The prompt and completion tokens a turn (pipeline.Turn) is billed,
    as best known from its end (pipeline.Outcome)."""
    answer = outcome.answer
    ended_early = outcome.failure is not None or outcome.cancelled
    if not ended_early:
        # The inference service's count, come with its completion, or a
        # cached answer's usage.
        return answer.prompt_tokens, answer.completion_tokens
    if answer.prompt_tokens or answer.completion_tokens:
        # Counted, then ended (at its save, or by its caller): a caller that
        # got no piece of it was not given the completion. A speculative
        # generation (pipeline._Race) may finish before the caller hangs
        # up while the semantic lookup still decides, and its 200 tokens
        # were billed to a caller who received nothing.
        completion_tokens = answer.completion_tokens if outcome.delivered_bytes else 0
        return answer.prompt_tokens, completion_tokens
    if not outcome.delivered_bytes and not outcome.cancelled:
        # Failed before any piece came (no deployment could serve, the
        # context service was down): the turn got nothing, and pays nothing.
        return 0, 0
    # Failed or cancelled before the completion's count: the prompt as the
    # model counted it (the inference service's first delta carries it), or
    # before any delta as its assembly counted it (the context service
    # counts with the model's tokenizer and template), else as its
    # content's bytes bound it (a session turn's as assembled,
    # the history the model read with it; a caller hanging up before the
    # first piece pays for it too, as the model may have read it already),
    # and the completion tokens delivered: none before the first piece;
    # the count behind the last piece delivered (each delta carries it), or
    # the failure's delivered_tokens, where either came; else the bytes
    # delivered (no token is less than a byte), at most max_tokens: an
    # overcharge, never an undercharge (a caller reading all but the end of
    # an answer, then hanging up, must not have it free). The bounds are for
    # an inference service that sends no counts, or a failure before any:
    # at about 4 bytes a token of English, they charged a stop button ~4x.
    prompt_tokens = (
        outcome.prompt_tokens_read
        or outcome.prompt_tokens_assembled
        or estimate_prompt_tokens(turn.messages if outcome.prompt is None else outcome.prompt)
    )
    if not outcome.delivered_bytes:
        return prompt_tokens, 0
    if outcome.delivered_tokens is not None:
        return prompt_tokens, outcome.delivered_tokens
    return prompt_tokens, min(turn.max_tokens, outcome.delivered_bytes)


def admission_scopes(tenant, alias: str, settings: RouterSettings) -> list[Scope]:
    """The scopes whose limits a turn of ``tenant`` on ``alias`` must pass."""
    scopes = [
        Scope("tenant", tenant.id, tenant.limits),
        Scope("key", tenant.key_id, tenant.key_limits, tenant.id),
    ]
    model_limits = settings.model_limits.get(alias)
    if model_limits is not None:
        scopes.append(Scope("model", alias, model_limits))
    return scopes


@functools.lru_cache(maxsize=4)
def _period_ids(now_s: int) -> tuple[str, str, int, int]:
    """The UTC day and month of now, and the seconds to the end of each."""
    moment = datetime.datetime.fromtimestamp(now_s, datetime.UTC)
    day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day_start + datetime.timedelta(days=1)
    month_start = day_start.replace(day=1)
    next_month = (month_start + datetime.timedelta(days=32)).replace(day=1)
    return (
        day_start.strftime("%Y-%m-%d"),
        month_start.strftime("%Y-%m"),
        math.ceil(next_day.timestamp() - now_s),
        math.ceil(next_month.timestamp() - now_s),
    )


def _refusal(
    kind: str,
    scope_id: str,
    limit: str,
    limit_value,
    retry_after_s: float | None,
    reason: Reason,
    message: str,
) -> MeshgateError:
    """RESOURCE_EXHAUSTED for ``limit`` of the scope ``kind`` ``scope_id``,
    with a QuotaFailure and, given ``retry_after_s``, a RetryInfo."""
    subject = f"{kind}:{scope_id}"
    details = [
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
        )
    ]
    if retry_after_s is not None:
        details.append(retry_info(retry_after_s))
    return MeshgateError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason,
        message,
        {"limit": limit, "scope": kind, "limit_value": str(limit_value)},
        details=details,
    )


_KIND_CODE = {"window": "w", "budget": "b", "streams": "s"}
# What a turn's mark (_mark_key) says once a call of it ran: its admit
# charged it, its second admit (after a streams refusal) did, its top-up
# grew it (a release sets "0", the scripts' own). The second admit has its
# own: the first's "1" may stand for a charge refunded since, which a
# release looking for "1" would give back again.
_MARK_ADMITTED = "1"
_MARK_ADMITTED_AGAIN = "3"
_MARK_GROWN = "2"
# Scope plans kept at most: one per tenant, key and model alias in use.
_PLANS_KEPT = 4096


def _by_slot(checks, words) -> dict[str, tuple[list[_Check], list[str]]]:
    """The checks and their words, per script call."""
    if checks and not checks[0].slot:
        # One Redis instance: one call (every check's slot is "").
        return {"": (checks, words)}
    groups: dict[str, tuple[list[_Check], list[str]]] = {}
    for check, word in zip(checks, words, strict=True):
        group = groups.setdefault(check.slot, ([], []))
        group[0].append(check)
        group[1].append(word)
    return groups


class Admission:
    def __init__(
        self,
        redis,
        max_generation_s: float,
        clock: Callable[[], float] | None = None,
        split_by_slot: bool | None = None,
        take_marker_ttl_s: int = TAKE_MARKER_TTL_S,
    ) -> None:
        self._redis = redis
        self._take_marker_ttl_s = take_marker_ttl_s
        # On a Redis Cluster a script call's keys must share a slot: a turn
        # takes one call per slot (its tenant's, its model's), and a turn
        # one slot refuses is refunded in the others. One Redis instance
        # takes all of a turn's keys in one call, atomic across its scopes.
        self._split_by_slot = isinstance(redis, RedisCluster) if split_by_slot is None else split_by_slot
        self._admit_script = redis.register_script(_ADMIT)
        # Turns' ends, each settled once (_SETTLE_ONCE): run again however
        # they failed. Give-backs of a turn refused or of a growth, under a
        # lease the turn's end settles later, are not marked, and are given
        # up where they may have run.
        self._settlements = Backlog(
            redis.register_script(_SETTLE_ONCE), "settlement", idempotent=True, on_skipped=_given_up
        )
        self._give_backs = Backlog(redis.register_script(_SETTLE), "settlement")
        self._releases = Backlog(redis.register_script(_RELEASE), "release", idempotent=True)
        self._charge_take_script = redis.register_script(_CHARGE_TAKE)
        self._top_up_script = redis.register_script(_TOP_UP)
        self._lease_ms = int(max_generation_s * 1000) + _LEASE_MARGIN_MS
        self._clock = clock
        self._plans: dict[tuple[str, str, str], _Plan] = {}
        # Settlements waiting for the next batch: (reservation, tokens, nano_usd).
        self._unsettled: list[tuple[Reservation, int, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task] = set()
        # Admits (and top-ups) whose callers were cancelled while Redis
        # answered (admit, top_up).
        self._abandoned: set[asyncio.Future] = set()

    def _now_s(self) -> float:
        return self._clock() if self._clock else time.time()

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._now_s() * 1000)

    def _plan(self, scope: Scope) -> _Plan:
        """The scope's checks, planned when a scope (or its limits, after a
        reload) is first seen."""
        ident = (scope.kind, scope.id, scope.tenant)
        plan = self._plans.get(ident)
        if plan is None or plan.scope.limits is not scope.limits:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            slot = scope.slot_tag if self._split_by_slot else ""
            plan = self._plans[ident] = _Plan(scope, slot, self._lease_ms)
        return plan

    async def admit(
        self, scopes: list[Scope], prompt_tokens: int, max_tokens: int, price: PriceSettings | None = None
    ) -> Reservation:
        """Charges the turn to every scope's limits, or raises
        RESOURCE_EXHAUSTED naming the first limit that refuses it."""
        tokens = prompt_tokens + max_tokens
        nano_usd = cost_nano_usd(price, prompt_tokens, max_tokens)
        lease_id = uuid.uuid4().hex
        # Whole seconds: every turn of a second shares its checks.
        second = int(self._now_s())
        day = _period_ids(second)[0]
        scopes = [scope for scope in scopes if scope.limits.configured()]
        if not scopes:
            return Reservation(lease_id, tokens, nano_usd, (), day=day, price=price)
        checks = [check for scope in scopes for check in self._plan(scope).checks(second)]
        costs = [check.cost(tokens, nano_usd) for check in checks]
        for check, cost in zip(checks, costs, strict=True):
            # A turn no window or budget could ever hold must not wait for one.
            if check.kind != "streams" and cost > check.a:
                raise _refusal(
                    check.scope.kind, check.scope.id, check.limit, _limit_value(check), None,
                    Reason.REQUEST_EXCEEDS_LIMIT,
                    f"this request alone exceeds {check.scope.kind} limit {check.limit}",
                )  # fmt: skip
        words = [check.word + str(cost) for check, cost in zip(checks, costs, strict=True)]
        groups = list(_by_slot(checks, words).values())
        windows: list[WindowUse] = []
        admitting = asyncio.ensure_future(self._admit_or_refuse(lease_id, tokens, nano_usd, groups, windows))
        try:
            # Shielded: a caller cancelled once its script went out (hung
            # up, its deadline passed) must not leave a turn Redis admitted
            # unsettled, its stream lease held for max_generation_s plus a
            # margin and its reservation charged. The task reads the reply
            # and a turn it admitted is refunded (_refund_abandoned).
            refused = await asyncio.shield(admitting)
        except asyncio.CancelledError:
            charged = Reservation(lease_id, tokens, nano_usd, tuple(checks), day=day)
            admitting.add_done_callback(functools.partial(self._refund_abandoned, charged))
            # Awaited by drain(), before its last flush: a router stopping
            # must not leave the refund unwritten.
            self._abandoned.add(admitting)
            admitting.add_done_callback(self._abandoned.discard)
            raise
        except (*redis_access.CONNECTION_ERRORS, RedisError, RedisClusterException) as error:
            # Unreachable (a cluster none of whose nodes answers raises
            # RedisClusterException), or refusing to run the script (out of
            # memory under maxmemory, a read-only replica during a failover):
            # either way the limits cannot be checked, which the policy
            # below decides.
            _refuse_if_fail_closed(checks, error)
            log.warning("limits unavailable; admitting (fail open)", error=str(error))
            if not never_ran(error):
                # A timeout, or the connection lost after the call was sent:
                # the script may have charged the turn. Its budgets' charge
                # then stands (an overcharge): charging its use on top would
                # count it twice, and giving the reservation back could refund
                # what was never charged. Its stream lease and its token
                # windows' entries bear its lease id, so its settlement frees
                # and moves them where the script ran and touches nothing
                # where it did not: left out, the stream was held for
                # max_generation_s plus a minute after the turn ended (a Redis
                # stall past redis.timeout_s cost a tenant capped at 2 streams
                # one of them for 6 minutes).
                found_by_lease = tuple(
                    c for c in checks if c.kind != "budget" and c.limit != "requests_per_minute"
                )
                return Reservation(
                    lease_id, tokens, nano_usd, found_by_lease, day=day, price=price, admit_unsure=True
                )
            budgets = tuple(c for c in checks if c.kind == "budget")
            return Reservation(lease_id, 0, 0, budgets, day=day, unchecked=True, price=price)
        if refused is not None:
            raise refused.error
        settled = tuple(c for c in checks if c.limit != "requests_per_minute")
        return Reservation(lease_id, tokens, nano_usd, settled, day=day, price=price, windows=tuple(windows))

    async def _admit_or_refuse(
        self,
        lease_id: str,
        tokens: int,
        nano_usd: int,
        groups: list[tuple[list[_Check], list[str]]],
        windows: list[WindowUse],
    ) -> _Refused | None:
        refused = await self._try_admit(lease_id, tokens, nano_usd, groups, windows)
        if refused is not None and refused.kind == "streams":
            # The stream that holds the lease may have ended already, its
            # release waiting in some replica's batch (this one's too):
            # write ours, give the others one flush, ask once more. Ours are
            # written again after the wait: a stream of this replica that
            # ended during it is released in a batch not yet written, and
            # the turn was refused with the stream free (5 callers under
            # concurrent_streams = 5 on one router: 1 to 3 turns in 60).
            await self.flush()
            await asyncio.sleep(SETTLE_AFTER_S * 2)
            await self.flush()
            refused = await self._try_admit(lease_id, tokens, nano_usd, groups, windows, _MARK_ADMITTED_AGAIN)
        return refused

    def _refund_abandoned(self, charged: Reservation, admitting: asyncio.Task) -> None:
        """The admit of a caller that went away has answered: a turn it
        admitted is refunded in full (it never ran: no request either). A
        refusal was refunded where it was partial (_run_or_refuse); an admit
        that failed leaves nothing known to refund (a budget cannot be given
        back blindly: the script may not have run), as for a caller still
        there (admitted failing open: its stream lease expires on its own;
        refused: released by its mark, _run_or_refuse)."""
        if admitting.cancelled() or admitting.exception() is not None or admitting.result() is not None:
            return
        self._write_soon(self._write_settlements([(charged, 0, 0)], refund=True))

    def _write_soon(self, write: Coroutine) -> asyncio.Task:
        """Runs ``write`` off the caller's path; flush() and drain() wait for it."""
        task = asyncio.get_running_loop().create_task(write)
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)
        return task

    async def _try_admit(
        self,
        lease_id: str,
        tokens: int,
        nano_usd: int,
        groups: list[tuple[list[_Check], list[str]]],
        windows: list[WindowUse],
        mark: str = _MARK_ADMITTED,
    ) -> _Refused | None:
        """One admit script per slot, all in one round trip (_run_or_refuse:
        a turn refused keeps no charge in any slot, a failure is raised);
        ``windows`` gets the rate windows' use as the calls that admitted
        left them (of this try alone)."""
        charge = Reservation(lease_id, tokens, nano_usd, ())
        windows.clear()
        return await self._run_or_refuse(
            self._admit_script, mark, groups, charge, (0, 0), refund=True, windows=windows
        )

    async def _run_or_refuse(
        self,
        script,
        mark: str,
        groups: list[tuple[list[_Check], list[str]]],
        charge: Reservation,
        back_to: tuple[int, int],
        refund: bool = False,
        growth: bool = False,
        windows: list[WindowUse] | None = None,
    ) -> _Refused | None:
        """Runs ``script`` (admit or top-up: the same KEYS and ARGV layout)
        once per slot's checks and words, in one round trip, for the turn
        whose lease and charge (tokens, nano-USD) ``charge`` holds; returns
        the first refusal, or raises the first failure (a limit that refused
        the turn wins over one that could not be checked: raised, the failure
        would let it past a spent limit, failing open).

        A turn so refused, or failed where a limit of it fails closed, is
        served nothing, so what its calls charged is given back, from the
        charge to ``back_to`` (tokens, nano-USD; ``refund``: to nothing,
        requests too): a call that answered by a settlement now, one that
        failed but may have run (a timeout) by a release (_RELEASE) where
        the turn's ``mark``, which its calls then carry, says it ran. Such a
        refusal is raised: a second try under the same lease
        (_admit_or_refuse) would be undone by the release. A failure that
        fails open leaves an admit that may have run as it is: the turn is
        served, and what it charged stands, as admitted. A ``growth``
        (top_up) that may have run is released failing open too, as the turn
        goes on from what was reserved before, so its calls are always
        marked; its release gives back the budgets' growth alone (the turn's
        settlement, which follows, moves its windows' entries from wherever
        the growth left them: Reservation.growth_unseen). ``windows``, given,
        gets the rate windows' use the calls that admitted (or grew) said."""
        fails_closed = any(_failing_closed(checks) for checks, _ in groups)
        # Where the turn may be refused while a call of it may have run: on
        # a failure, failing closed; or by another call's refusal.
        marked = growth or fails_closed or len(groups) > 1
        lease_id = charge.lease_id
        now = self._now_arg()
        calls = []
        for checks, words in groups:
            keys, indexed = _one_turns_call(checks, words)
            args = [now, lease_id, indexed]
            if marked:
                keys.append(_mark_key(checks[0], lease_id))
                args += [self._lease_ms, mark]
            calls.append((keys, args))
        replies = await run_scripts(script, calls, raise_on_error=False)
        said_at_s = time.monotonic()
        refused, failed, charged, unsure = None, None, [], []
        for (checks, _), reply in zip(groups, replies, strict=True):
            if isinstance(reply, Exception):
                failed = failed or reply
                if not never_ran(reply):
                    unsure += checks
            elif reply[0] == 1:
                charged += checks
                if windows is not None:
                    # Each window check's use and when it frees, in order.
                    in_order = [check for check in checks if check.kind == "window"]
                    windows += (
                        WindowUse(check.limit, check.scope.kind, check.a, int(used), int(frees), said_at_s)
                        for check, used, frees in zip(in_order, reply[1::2], reply[2::2], strict=True)
                    )
            elif reply[0] == 2:
                # Released before it ran: charged nothing. Only a call whose
                # caller gave up on it is released, so no reply is read so.
                failed = failed or RuntimeError(f"{lease_id}'s call ran after its release")
            elif refused is None:
                refused = _Refused(checks[reply[1] - 1], reply[2], int(reply[3]) if len(reply) > 3 else None)
        if (refused is not None or failed is not None) and charged:
            given_back = dataclasses.replace(charge, checks=tuple(charged))
            await self._write_settlements([(given_back, *back_to)], refund)
        if unsure and (refused is not None or fails_closed or growth):
            self._release(dataclasses.replace(charge, checks=tuple(unsure)), back_to, refund, mark, growth)
            raise failed if refused is None else refused.error
        if refused is None and failed is not None:
            raise failed
        return refused

    def _release(
        self, charged: Reservation, back_to: tuple[int, int], refund: bool, mark: str, growth: bool
    ) -> None:
        """Gives back, off the caller's path, what calls that may have run
        charged (a turn refused: ``charged``'s checks those of the calls),
        from the charge to ``back_to`` (``refund``: to nothing), where the
        turn's marks say ``mark`` (_RELEASE); run again until Redis answers,
        as a release run twice releases once. A ``growth``'s windows are
        left to the turn's settlement (_run_or_refuse): their words move
        nothing, and their calls mark the turn all the same."""
        now = self._now_arg()
        words = _settlement_words(charged, *back_to, refund)
        if growth:
            unmoved = _settlement_words(charged, charged.reserved_tokens, charged.reserved_nano_usd, False)
            words = [
                kept if check.kind == "window" else word
                for check, word, kept in zip(charged.checks, words, unmoved, strict=True)
            ]
        calls = []
        for checks, slot_words in _by_slot(list(charged.checks), words).values():
            keys, indexed = _one_turns_call(checks, slot_words)
            keys.append(_mark_key(checks[0], charged.lease_id))
            calls.append((keys, [now, charged.lease_id, indexed, self._lease_ms, mark]))
        self._write_soon(self._releases.run(calls))

    async def top_up(self, reservation: Reservation, tokens: int, nano_usd: int) -> None:
        """Grows an admitted turn's reservation to ``tokens`` and
        ``nano_usd`` (a bound learnt after admission: a session turn's
        assembled prompt), or raises the refusal of the first limit that
        cannot hold it, as admit would have (the reservation then stands as
        admitted: the turn's settlement refunds it). One round trip, only
        where a token or cost limit is charged more; none for a turn whose
        limits are requests and streams alone, or that was admitted failing
        open (without Redis, or where its admit may have run: its budgets'
        charge is unknown)."""
        if reservation.settled or reservation.unchecked or reservation.admit_unsure or not reservation.checks:
            return
        reserved_tokens, reserved_nano_usd = reservation.reserved_tokens, reservation.reserved_nano_usd
        tokens, nano_usd = max(tokens, reserved_tokens), max(nano_usd, reserved_nano_usd)
        grown = [
            check
            for check in reservation.checks
            if check.kind != "streams"
            and check.cost(tokens, nano_usd) != check.cost(reserved_tokens, reserved_nano_usd)
        ]
        for check in grown:
            if check.cost(tokens, nano_usd) > check.a:
                raise _refusal(
                    check.scope.kind, check.scope.id, check.limit, _limit_value(check), None,
                    Reason.REQUEST_EXCEEDS_LIMIT,
                    f"this request alone exceeds {check.scope.kind} limit {check.limit}",
                )  # fmt: skip
        if grown:
            before = (reserved_tokens, reserved_nano_usd)
            # Until its answer is read, the growth may land unseen.
            reservation.growth_unseen = (tokens, nano_usd)
            windows: list[WindowUse] = []
            growing = asyncio.ensure_future(
                self._grow_or_refuse(reservation.lease_id, grown, before, tokens, nano_usd, windows)
            )
            try:
                # Shielded, as admit's script: a caller cancelled while the
                # script is in Redis must not leave the growth charged (a
                # budget would keep it: the turn settles from what was
                # reserved before). It is given back once Redis answers.
                refused = await asyncio.shield(growing)
            except asyncio.CancelledError:
                budgets = tuple(check for check in grown if check.kind == "budget")
                grew = Reservation(reservation.lease_id, tokens, nano_usd, budgets)
                growing.add_done_callback(functools.partial(self._undo_abandoned_growth, grew, before))
                self._abandoned.add(growing)
                growing.add_done_callback(self._abandoned.discard)
                raise
            except (*redis_access.CONNECTION_ERRORS, RedisError, RedisClusterException) as error:
                # As at admission: the limits cannot be checked. Failing open,
                # the turn goes on with what admission reserved; if the
                # script may have run, its growth is released (_run_or_refuse)
                # and the settlement finds its windows' entries (growth_unseen).
                _refuse_if_fail_closed(grown, error)
                log.warning("limits unavailable; the turn keeps what admission reserved", error=str(error))
                return
            if refused is not None:
                raise refused.error
            # The grown windows as the top-up left them, over admission's.
            grew = {(window.scope, window.limit): window for window in windows}
            reservation.windows = tuple(grew.pop((w.scope, w.limit), w) for w in reservation.windows) + tuple(
                grew.values()
            )
        reservation.reserved_tokens, reservation.reserved_nano_usd = tokens, nano_usd
        reservation.growth_unseen = None

    async def _grow_or_refuse(
        self,
        lease_id: str,
        grown: list[_Check],
        before: tuple[int, int],
        tokens: int,
        nano_usd: int,
        windows: list[WindowUse],
    ) -> _Refused | None:
        """One top-up script per slot, in one round trip (_run_or_refuse:
        where the growth is refused, every slot's growth is given back, to
        ``before``, the tokens and nano-USD reserved; a failure is raised,
        and a call that may have run released, failing open too); ``windows``
        gets the grown windows' use, as admit's."""
        reserved_tokens, reserved_nano_usd = before
        words = [
            f"{_KIND_CODE[check.kind]} {check.a} {check.b}"
            f" {check.cost(reserved_tokens, reserved_nano_usd)} {check.cost(tokens, nano_usd)}"
            for check in grown
        ]
        groups = list(_by_slot(grown, words).values())
        charge = Reservation(lease_id, tokens, nano_usd, ())
        script = self._top_up_script
        return await self._run_or_refuse(
            script, _MARK_GROWN, groups, charge, before, growth=True, windows=windows
        )

    def _undo_abandoned_growth(
        self, grew: Reservation, before: tuple[int, int], growing: asyncio.Task
    ) -> None:
        """The top-up of a caller that went away has answered: growth it
        charged to ``grew``'s budgets goes back to what was reserved, so the
        turn's settlement (from what was reserved) leaves the real use,
        whichever is written first. Its windows' entries are the
        settlement's to move (Reservation.growth_unseen)."""
        if not grew.checks:
            return
        if growing.cancelled() or growing.exception() is not None or growing.result() is not None:
            return
        self._write_soon(self._write_settlements([(grew, *before)]))

    def charge_spent(self, scopes: list[Scope], tokens: int, nano_usd: int) -> str:
        """Charges use no turn was admitted for (a session's summaries, made
        in the background) to the scopes' day and month budgets, as a turn
        admitted without Redis settles: nothing reserved, the whole use
        charged, whatever budget it passes (it is spent already; later turns
        see it). Not the per-minute windows: those pace the tenant's own
        requests, and the use came at no one request's time. Batched, as
        settle_soon. Returns the UTC day charged (the ledger's for it)."""
        spent = self._spent(scopes)
        self.settle_soon(spent, tokens, nano_usd)
        return spent.day

    async def charge_take(
        self, tenant_id: str, take_id: str, charges: list[tuple[list[Scope], int, int]]
    ) -> None:
        """Charges what a take of a session's summaries' usage spent (each
        charge: scopes, tokens, nano-USD) as charge_spent does, but now and
        once per take id: each script call (one per slot) sets the take's
        marker in its slot in the same script, kept as the ledger's
        (ledger.TAKE_MARKER_TTL_S), and
        one that finds it set charges nothing. So a take offered again (its
        router killed before acknowledging it, or its reply lost) is charged
        where it was not, whatever the ledger holds of it. Raises where a
        call failed: the take is not acknowledged, and is offered again."""
        batch = [(self._spent(scopes), tokens, nano_usd) for scopes, tokens, nano_usd in charges]
        calls = self._settlement_calls(
            [charge for charge in batch if charge[0].checks], extra_args=[self._take_marker_ttl_s]
        )
        # One Redis instance's one call is marked in the tenant's slot, as a
        # cluster's call of the tenant's budgets is.
        tenant_slot = Scope("tenant", tenant_id, LimitSettings()).slot_tag
        marked = [
            ([*keys, f"mg:router:limit:{slot or tenant_slot}:take:{take_id}"], args)
            for slot, (keys, args) in calls.items()
        ]
        try:
            await run_scripts(self._charge_take_script, marked)
        except (*redis_access.CONNECTION_ERRORS, RedisError, RedisClusterException) as error:
            raise redis_access.outage("a summary take's budgets cannot be charged", error) from error

    def _spent(self, scopes: list[Scope]) -> Reservation:
        """Use no turn was admitted for, to charge to the scopes' day and
        month budgets (none where no scope has one): nothing reserved."""
        second = int(self._now_s())
        budgets = tuple(
            check
            for scope in scopes
            if scope.limits.configured()
            for check in self._plan(scope).checks(second)
            if check.kind == "budget"
        )
        return Reservation(uuid.uuid4().hex, 0, 0, budgets, day=_period_ids(second)[0], unchecked=True)

    async def settle(self, reservation: Reservation, tokens: int, nano_usd: int) -> None:
        """Replaces the reservation by what the turn used and frees its
        stream, now."""
        if reservation.settled:
            return
        reservation.settled = True
        if reservation.checks:
            if _over(reservation, tokens, nano_usd):
                _warn_over(reservation, tokens, nano_usd)
            await self._write_settlements([(reservation, tokens, nano_usd)], once=True)

    def settle_soon(self, reservation: Reservation, tokens: int, nano_usd: int) -> None:
        """Settles within SETTLE_AFTER_S, batched with other turns: how the
        router settles, off the turn's path (and whether or not the turn's
        task is being cancelled)."""
        if reservation.settled:
            return
        reservation.settled = True
        if not reservation.checks:
            return
        if _over(reservation, tokens, nano_usd):
            _warn_over(reservation, tokens, nano_usd)
        self._unsettled.append((reservation, tokens, nano_usd))
        if len(self._unsettled) >= _SETTLE_BATCH:
            self._start_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SETTLE_AFTER_S, self._start_flush)

    def _start_flush(self) -> asyncio.Task | None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._unsettled = self._unsettled, []
        if not batch:
            return None
        return self._write_soon(self._write_settlements(batch, once=True))

    async def flush(self) -> None:
        """Writes every pending settlement."""
        self._start_flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    async def drain(self, until: float | None = None) -> None:
        """Writes every pending settlement, once the admits of callers that
        went away have answered (and queued their refunds); what Redis
        refuses is tried again until ``until`` (time.monotonic(); Backlog.drain)."""
        if self._abandoned:
            await asyncio.gather(*self._abandoned, return_exceptions=True)
        await self.flush()
        await self._settlements.drain(until)
        await self._give_backs.drain(until)
        await self._releases.drain(until)

    async def _write_settlements(
        self, batch: list[tuple[Reservation, int, int]], refund: bool = False, once: bool = False
    ) -> None:
        """One script call per slot for the whole batch: per turn, its lease
        and its checks of that slot, each from reserved to used (a refund:
        to nothing, requests too; a turn that ran was one request, whatever
        it used, so its requests window is not among the checks settled).
        ``once``: the batch's turns have ended, and each is settled once
        (_SETTLE_ONCE), its call sent again until Redis answers it."""
        if once:
            calls = self._settlement_calls(batch, refund, [_SETTLED_MARK_MS], once=True)
            await self._settlements.run(list(calls.values()))
            return
        # A call Redis refused is written again later (script_calls); one
        # that may have run is logged: what it gives back stands charged
        # (an overcharge).
        await self._give_backs.run(list(self._settlement_calls(batch, refund).values()))

    def _settlement_calls(
        self,
        batch: list[tuple[Reservation, int, int]],
        refund: bool = False,
        extra_args: list = (),
        once: bool = False,
    ) -> dict[str, tuple[list[str], list]]:
        """The KEYS and ARGV of _SETTLE's call per slot ("" on one Redis
        instance) for the batch; ``extra_args`` follow now_ms in ARGV.
        ``once``: _SETTLE_ONCE's, each call's mark last in its KEYS."""
        now = self._now_arg()
        # Per slot: its KEYS, where each key is in them, its ARGV.
        calls: dict[str, tuple[list[str], dict[str, int], list]] = {}
        # Per slot, a check of it: the mark's slot (once).
        slot_checks: dict[str, _Check] = {}
        for reservation, tokens, nano_usd in batch:
            words = _settlement_words(reservation, tokens, nano_usd, refund)
            for slot, (checks, slot_words) in _by_slot(reservation.checks, words).items():
                keys, index, args = calls.setdefault(slot, ([], {}, [now, *extra_args]))
                slot_checks.setdefault(slot, checks[0])
                indexed = []
                for check, word in zip(checks, slot_words, strict=True):
                    k = index.get(check.key)
                    if k is None:
                        k = index[check.key] = len(keys) + 1
                        keys += check.keys
                    indexed.append(f"{word} {k}")
                args += [reservation.lease_id, " ".join(indexed)]
        if once:
            for slot, (keys, _, _) in calls.items():
                keys.append(_settled_key(slot_checks[slot]))
        return {slot: (keys, args) for slot, (keys, _, args) in calls.items()}


# Turns' settlements skipped for a key of another type (_SETTLE_ONCE) are
# logged once per this long per scope's slot (a tenant's, a model's), each
# line with the count left unlogged since: a broken key skips every turn of
# its tenant, and a busy tenant's would flood the log.
_SKIPPED_LOG_INTERVAL_S = 60.0
_skipped_log = telemetry.ThrottledLog(log, _SKIPPED_LOG_INTERVAL_S)


def _given_up(keys: list[str], args: list, skipped: list[Skipped]) -> None:
    """Logs (per slot, throttled) and counts the turns' settlements a call
    did not write, as a key of theirs held another type (_SETTLE_ONCE):
    given up, not sent again (the key holds what it holds until someone
    looks); that turn's reservation stands in that slot, its stream held
    until its lease expires."""
    for one in skipped:
        # ARGV: now_ms, the mark's keep-time, then a lease and its words per turn.
        lease = args[2 + 2 * (one.index - 1)]
        # mg:router:limit:{t:<tenant>}:<scope>:<id>:<limit...>
        tag, _, rest = one.key.partition("}:")
        tag = tag.partition("{")[2]
        scope, _, rest = rest.partition(":")
        limit = rest.partition(":")[2]
        metrics.router().deferred_writes.labels("settlement", "given_up").inc()
        _skipped_log.warning(
            "a turn's settlement was not written: a key it writes holds another type or a non-integer",
            per=tag,
            tenant=tag[2:] if tag.startswith("t:") else "",
            model=tag[2:] if tag.startswith("m:") else "",
            scope=scope,
            key_kind=limit,
            key=one.key,
            holds=one.holds,
            lease=lease,
        )


def _settlement_words(reservation: Reservation, tokens: int, nano_usd: int, refund: bool) -> list[str]:
    """Each of the reservation's checks' word in a settlement (_SETTLE_TURN),
    from what was reserved to ``tokens`` and ``nano_usd`` (a refund: to
    nothing, requests too)."""
    reserved_tokens, reserved_nano_usd = reservation.reserved_tokens, reservation.reserved_nano_usd
    grown = reservation.growth_unseen
    return [
        f"{_KIND_CODE[check.kind]} {check.cost(reserved_tokens, reserved_nano_usd)}"
        f" {0 if refund else check.cost(tokens, nano_usd)}"
        f" {check.cost(*grown) if grown and check.kind == 'window' else check.expires_at_s}"
        for check in reservation.checks
    ]


def _one_turns_call(checks: list[_Check], words: list[str]) -> tuple[list[str], str]:
    """The KEYS of one turn's script call over ``checks`` and its checks'
    words, each given its key's index in them."""
    keys, indexed = [], []
    for check, word in zip(checks, words, strict=True):
        indexed.append(f"{word} {len(keys) + 1}")
        keys += check.keys
    return keys, " ".join(indexed)


def _mark_key(check: _Check, lease_id: str) -> str:
    """A turn's mark, in the slot of the call ``check`` is in (on a Redis
    Cluster, a call's checks share their scope's hash tag)."""
    return f"mg:router:limit:{check.scope.slot_tag}:admit:{lease_id}"


def _settled_key(check: _Check) -> str:
    """That a call of turns' settlements ran (_SETTLE_ONCE): a fresh id (64
    random bits) per call, in the slot of the call ``check`` is in."""
    return f"mg:router:limit:{check.scope.slot_tag}:settled:{secrets.token_hex(8)}"


def _over(reservation: Reservation, tokens: int, nano_usd: int) -> bool:
    """Whether a turn checked against its reservation used more (one
    admitted without Redis was checked against nothing, and said so then)."""
    if reservation.unchecked:
        return False
    return tokens > reservation.reserved_tokens or nano_usd > reservation.reserved_nano_usd


def _warn_over(reservation: Reservation, tokens: int, nano_usd: int) -> None:
    """A turn billed more than it reserved: its limits were checked against
    less than it used. Its settlement still charges the whole use (later
    turns see it), but the overshoot it may have made is told here: only
    where docs/limits-and-usage.md says it can happen."""
    log.warning(
        "a turn used more than admission reserved; its limits may be overshot by the difference",
        reserved_tokens=reservation.reserved_tokens,
        used_tokens=tokens,
        reserved_nano_usd=reservation.reserved_nano_usd,
        used_nano_usd=nano_usd,
    )


def _failing_closed(checks: list[_Check]) -> list[_Check]:
    """Those of ``checks`` whose limits refuse a turn they cannot check."""
    return [c for c in checks if c.limit in c.scope.limits.fail_closed]


def _refuse_if_fail_closed(checks: list[_Check], error: Exception) -> None:
    """Redis could not check ``checks``: UNAVAILABLE if one of their limits
    is configured to fail closed; else the caller goes on (fail open)."""
    closed = _failing_closed(checks)
    if closed:
        raise unavailable(
            Reason.LIMITS_UNAVAILABLE,
            f"limits cannot be checked and {closed[0].limit} is configured to fail closed",
            limit=closed[0].limit,
            scope=closed[0].scope.kind,
        ) from error


@dataclasses.dataclass(frozen=True)
class _Refused:
    check: _Check
    retry_after_ms: int
    # A window's use the turn did not fit in (None for other limits).
    used: int | None = None

    @property
    def kind(self) -> str:
        return self.check.kind

    @property
    def error(self) -> MeshgateError:
        check = self.check
        if check.kind == "budget":
            period_left_s = check.b - _BUDGET_GRACE_S
            return _refusal(
                check.scope.kind, check.scope.id, check.limit, _limit_value(check), period_left_s,
                Reason.BUDGET_EXHAUSTED,
                f"the {check.scope.kind}'s {check.limit} budget is spent until the period ends",
            )  # fmt: skip
        refused = _refusal(
            check.scope.kind, check.scope.id, check.limit, _limit_value(check), self.retry_after_ms / 1000,
            Reason.RATE_LIMITED,
            f"{check.scope.kind} limit {check.limit} reached",
        )  # fmt: skip
        if check.kind == "window" and self.used is not None:
            # What the window holds for a smaller turn (x-ratelimit-remaining-*).
            refused.metadata["limit_remaining"] = str(max(0, check.a - self.used))
        return refused


def _limit_value(check: _Check):
    return getattr(check.scope.limits, check.limit)


class TurnAdmission:
    """The router pipeline's admit and settle stages (``pipeline.Admission``)
    over :class:`Admission`: the scopes, reservation and real use of a turn,
    and its record in the usage ledger."""

    def __init__(
        self,
        admission: Admission,
        settings: RouterSettings,
        ledger: Ledger | None = None,
        journal: TurnJournal | None = None,
    ) -> None:
        self._admission = admission
        self._settings = settings
        # Records each turn, batched off the caller's critical path.
        self._ledger = ledger
        # Holds the turns served, for another router to bill were this one
        # killed (turn_journal.py).
        self._journal = journal
        # Chat template (ModelSettings.chat_template) -> its PromptBound,
        # measured at its first limited turn; None: it cannot be measured.
        self._bounds: dict[str, PromptBound | None] = {}

    def reconfigure(self, settings: RouterSettings) -> None:
        """New limits and prices (a reload) apply from the next turn; a turn
        already admitted settles against the scopes and prices it was
        admitted with (Reservation.price). Templates are measured again as
        turns use them (only those in use are kept)."""
        self._settings = settings
        self._bounds = {}

    def waits(self, turn) -> bool:
        """Whether some limit applies to ``turn`` (admit then asks Redis)."""
        scopes = admission_scopes(turn.tenant, turn.model_alias, self._settings)
        return any(scope.limits.configured() for scope in scopes)

    async def admit(self, turn) -> Reservation:
        scopes = [
            scope
            for scope in admission_scopes(turn.tenant, turn.model_alias, self._settings)
            if scope.limits.configured()
        ]
        prompt_tokens = estimate_prompt_tokens(turn.messages)
        if scopes:
            # Inference bills the rendered prompt: the template's own text
            # too. Only for a turn some limit charges (the others reserve
            # nothing), so a turn without limits measures nothing more.
            prompt_tokens += self._template_tokens(turn, len(turn.messages))
        return await self._admission.admit(
            scopes, prompt_tokens, turn.max_tokens, self._settings.prices.get(turn.model_alias)
        )

    async def reserve_prompt(self, grant: Reservation, turn, prompt) -> None:
        """Grows ``grant`` to cover ``prompt``, the messages the model will
        be sent, where they may cost more than admission reserved for the
        turn's own (a session's assembled history), or raises the refusal of
        the limit that cannot hold them (the turn then settles the grant to
        nothing). No round trip unless a token or cost limit charged the
        turn and the prompt's bound is above the reservation."""
        if not isinstance(grant, Reservation) or not grant.checks:
            return  # no limit charged the turn (or admitted failing open)
        prompt_tokens = estimate_prompt_tokens(prompt) + self._template_tokens(turn, len(prompt))
        tokens = prompt_tokens + turn.max_tokens
        if tokens <= grant.reserved_tokens:
            return
        nano_usd = cost_nano_usd(grant.price, prompt_tokens, turn.max_tokens)
        await self._admission.top_up(grant, tokens, nano_usd)

    def _template_tokens(self, turn, message_count: int) -> int:
        """At most how many tokens the turn's chat template adds to a prompt
        of ``message_count`` messages (prompt_bound.py: a token is a byte or
        more of the rendering, as of its content). 0 for a template that
        cannot be measured: its turns reserve their content alone (the
        docs/limits-and-usage.md says so, and pipeline's prompt_bounds logs it)."""
        template = turn.model.chat_template
        try:
            bound = self._bounds[template]
        except KeyError:
            bound = self._bounds[template] = bound_of(template, turn.model_alias)
        return 0 if bound is None else bound.template_bytes(message_count)

    async def settle(self, grant: Reservation, turn, outcome) -> None:
        if outcome.tracked is not None and self._ledger.holding:
            # Redis refusing the ledger's calls (a shard failing over): its
            # record may be held too, so the journal keeps the turn until it
            # is written, were this router killed meanwhile.
            outcome.tracked.name()
        tokens, nano_usd, usage = self._billed(grant, turn, outcome)
        if self._ledger is not None:
            tracked = outcome.tracked
            if tracked is None:
                self._ledger.submit(usage)
            else:
                # A turn its journal named stays there until its record is written.
                self._ledger.submit(usage, on_written=tracked.settled(usage))
        # Batched, off the turn's path: it holds for a cancelled turn too.
        self._admission.settle_soon(grant, tokens, nano_usd)

    def track(self, grant: Reservation, turn, outcome_of: Callable[..., Any]) -> Tracked | None:
        """The turn in the router's journal while it is served
        (turn_journal.py), so that a router killed before it settles does
        not leave it unbilled: ``outcome_of(failure, tracked=...)`` is its
        outcome (pipeline.Outcome) were it to end now so. None without a
        journal."""
        if self._journal is None or self._ledger is None:
            return None
        progress: tuple | None = None
        record: UsageRecord | None = None

        def record_of() -> UsageRecord | None:
            nonlocal progress, record
            outcome = outcome_of(ROUTER_LOST, tracked=tracked)
            answer = outcome.answer
            # What the record is computed from, but the time: unchanged
            # since the last snapshot, the record is (a snapshot of
            # thousands of turns recomputes only those that moved).
            now = (
                outcome.delivered_bytes,
                outcome.delivered_tokens,
                outcome.prompt_tokens_read,
                outcome.prompt_tokens_assembled,
                outcome.prompt is None,
                answer.prompt_tokens,
                answer.completion_tokens,
                answer.deployment,
                outcome.cache_status,
                tracked.turn_id,
            )
            if now != progress:
                _, _, usage = self._billed(grant, turn, outcome)
                # A turn that delivered nothing is billed nothing (used_tokens).
                billed = usage.prompt_tokens or usage.completion_tokens or usage.saved_tokens
                progress, record = now, usage if billed else None
            return record

        tracked = self._journal.track(record_of)
        return tracked

    def _billed(self, grant: Reservation, turn, outcome) -> tuple[int, int, UsageRecord]:
        """What a turn that ended so is billed: the tokens and cost its
        budgets are charged, and its ledger record."""
        price = grant.price
        prompt_tokens, completion_tokens = used_tokens(turn, outcome)
        full_cost = cost_nano_usd(price, prompt_tokens, completion_tokens)
        hit = outcome.cache_status is not None and outcome.cache_status.is_hit
        if hit:
            # A hit spent no model tokens and costs the configured share.
            tokens, nano_usd = 0, share_nano_usd(full_cost, price.cache_hit_fraction) if price else 0
        else:
            tokens, nano_usd = prompt_tokens + completion_tokens, full_cost
        usage = self._usage_record(turn, outcome, hit, prompt_tokens, completion_tokens, nano_usd, grant.day)
        return tokens, nano_usd, usage

    def refused(self, turn, outcome) -> None:
        """Records a turn admission refused: a failure that used nothing, on
        the day it was refused, as ``settle`` records one refused by
        reserve_prompt (GetUsage counts a tenant's refused turns however far
        they got)."""
        if self._ledger is not None:
            # In the totals, not the log: a refusal costs its caller nothing,
            # and the log's length is every tenant's (ledger.py).
            self._ledger.submit(self._usage_record(turn, outcome, False, 0, 0, 0, ""), logged=False)

    def summaries_spent(self, tenant, spends) -> None:
        """What the summaries of a session of ``tenant`` spent on each model
        (pipeline.SummarySpend), reported by an older context service's
        append: billed as bill_summary_take bills a take, the ledger's
        record batched."""
        for scopes, tokens, nano_usd, usage in self._summary_charges(tenant, spends):
            day = self._admission.charge_spent(scopes, tokens, nano_usd)
            if self._ledger is not None:
                self._ledger.submit(dataclasses.replace(usage, day=day))

    async def bill_summary_take(self, tenant, take_id: str, spends) -> None:
        """What a sweep's take (summary_usage.py) of a session's summaries
        took, now and once per take id: to the ledger (Ledger.record_take)
        and to the budgets (Admission.charge_take), each written once
        whichever write of it first ran (a router that took it before and
        died, or lost a write's reply, before acknowledging it). Raises
        where a write failed: the take is not acknowledged, and is offered
        again."""
        charges = list(self._summary_charges(tenant, spends))
        if self._ledger is not None:
            await self._ledger.record_take(take_id, [usage for *_, usage in charges])
        await self._admission.charge_take(
            tenant.id, take_id, [(scopes, tokens, nano_usd) for scopes, tokens, nano_usd, _ in charges]
        )

    def _summary_charges(self, tenant, spends):
        """Each spend's charge: billed to the tenant and key as that model's
        usage (its alias's prices and limits: the summary model's name as an
        alias), to their budgets after the fact (Admission.charge_spent), and
        to the ledger as a summary record, not a request: its scopes, tokens,
        cost and ledger record (for the day it is written)."""
        for spend in spends:
            price = self._settings.prices.get(spend.model)
            nano_usd = cost_nano_usd(price, spend.prompt_tokens, spend.completion_tokens)
            usage = UsageRecord(
                tenant=tenant.id,
                key_id=tenant.key_id,
                model=spend.model,
                deployment="",
                prompt_tokens=spend.prompt_tokens,
                completion_tokens=spend.completion_tokens,
                saved_tokens=0,
                cache_status=SUMMARY_USAGE,
                cost_nano_usd=nano_usd,
                latency_ms=0,
                summaries=spend.summaries,
            )
            scopes = admission_scopes(tenant, spend.model, self._settings)
            yield scopes, spend.prompt_tokens + spend.completion_tokens, nano_usd, usage

    async def admit_embedding(self, tenant, model: str, input_tokens_bound: int) -> Reservation:
        """An embedding request's admission (services/router/embeddings.py):
        the scopes of a turn on ``model``, reserving ``input_tokens_bound``
        and nothing to generate (Admission.admit leaves out unlimited scopes)."""
        scopes = admission_scopes(tenant, model, self._settings)
        return await self._admission.admit(scopes, input_tokens_bound, 0, self._settings.prices.get(model))

    def settle_embedding(
        self, grant: Reservation, tenant, model: str, input_tokens: int, elapsed_s: float, failure: str
    ) -> None:
        """Settles an embedding request to ``input_tokens`` (the tokens the
        model read; 0 for one that failed, the reservation's bound for one
        abandoned: embeddings.py) and records it in the ledger."""
        nano_usd = cost_nano_usd(grant.price, input_tokens, 0)
        if self._ledger is not None:
            usage = UsageRecord(
                tenant=tenant.id,
                key_id=tenant.key_id,
                model=model,
                deployment="",
                prompt_tokens=input_tokens,
                completion_tokens=0,
                saved_tokens=0,
                cache_status="none",
                cost_nano_usd=nano_usd,
                latency_ms=round(elapsed_s * 1000),
                failure=failure,
                day=grant.day,
            )
            self._ledger.submit(usage)
        self._admission.settle_soon(grant, input_tokens, nano_usd)

    def _usage_record(
        self,
        turn,
        outcome,
        hit: bool,
        prompt_tokens: int,
        completion_tokens: int,
        nano_usd: int,
        day: str,
    ) -> UsageRecord:
        answer = outcome.answer
        status = outcome.cache_status.value if outcome.cache_status is not None else "none"
        # A hang-up is no error reason: the ledger says "cancelled".
        failure = "cancelled" if outcome.cancelled else str(outcome.failure or "")
        return UsageRecord(
            tenant=turn.tenant.id,
            key_id=turn.tenant.key_id,
            model=turn.model_alias,
            # A hit was served by no deployment: the one whose generation
            # was stored is its completion's to name (ChatCompletion), not
            # a record an operator adds up per deployment.
            deployment="" if hit else answer.deployment,
            prompt_tokens=0 if hit else prompt_tokens,
            completion_tokens=0 if hit else completion_tokens,
            # A hit's cached answer: the tokens it did not spend.
            saved_tokens=prompt_tokens + completion_tokens if hit else 0,
            cache_status=status,
            cost_nano_usd=nano_usd,
            latency_ms=round(outcome.elapsed_s * 1000),
            failure=failure,
            day=day,
            turn_id=outcome.tracked.turn_id if outcome.tracked is not None else "",
        )

    async def drain(self, until: float | None = None) -> None:
        """Waits for settlements and ledger records still in flight (before
        Redis closes), trying what Redis refuses again until ``until``
        (time.monotonic(): the stop's deadline; None: once more)."""
        if self._journal is not None:
            self._journal.stop_settling()
        await self._admission.drain(until)
        if self._ledger is not None:
            await self._ledger.drain(until)


class Hold:
    """One place a tenant holds (:meth:`_TenantHolds.open`), given back
    once: by :meth:`release` or when its call's task ends, whichever comes
    first; the later one does nothing. The HTTP edge releases at its
    response's end, as uvicorn may start the connection's next request
    before the task of the one answered has ended."""

    def __init__(self, give_back: Callable[[], None] | None) -> None:
        # None once given back (or for a place never counted: no cap).
        self._give_back = give_back

    def release(self, _call: asyncio.Task | None = None) -> None:
        """Gives the place back, if not yet; also the call task's done
        callback (``_call``: the task, unused)."""
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


class _TenantHolds:
    """What each tenant holds on this replica for as long as a gRPC call of
    its runs, at most ``cap`` per tenant (0: no cap); one more is refused
    with RESOURCE_EXHAUSTED, the subclass's reason and a QuotaFailure
    (metadata ``limit``, ``scope`` tenant, ``limit_value``). In this
    replica's memory, not Redis like the limits above: what it counts is
    this replica's calls, and ends with them."""

    # The setting that caps it, the reason a refusal carries, and that
    # refusal's message (``{cap}``: the cap).
    _LIMIT: str
    _REASON: Reason
    _REFUSAL: str
    # A refusal's RetryInfo (and the HTTP edge's Retry-After), if any.
    _RETRY_AFTER_S: float | None = None

    def __init__(self, cap: int) -> None:
        self._cap = cap
        # Only tenants holding one: a tenant whose last one ends is removed.
        self._open: dict[str, int] = {}

    def reconfigure(self, cap: int) -> None:
        """A new cap (a reload) applies to what is opened from now on; what
        is held already still counts."""
        self._cap = cap

    def open(self, tenant_id: str, call: asyncio.Task) -> Hold:
        """Counts one of ``tenant_id`` in, until ``call`` (the task gRPC runs
        the call in) is done, however it ends: answered, failed, or
        cancelled (its caller cancelled or went away, its deadline passed),
        or until the returned hold is released, whichever comes first.
        Refuses it past the cap."""
        if not self._cap:
            return Hold(None)
        held = self._open.get(tenant_id, 0)
        if held >= self._cap:
            raise _refusal(
                "tenant", tenant_id, self._LIMIT, self._cap, self._RETRY_AFTER_S, self._REASON,
                self._REFUSAL.format(cap=self._cap),
            )  # fmt: skip
        self._open[tenant_id] = held + 1
        hold = Hold(functools.partial(self._closed, tenant_id))
        call.add_done_callback(hold.release)
        return hold

    def held(self, tenant_id: str) -> int:
        """What ``tenant_id`` holds: for the tests to read (the router itself
        needs only open's refusal)."""
        return self._open.get(tenant_id, 0)

    def _closed(self, tenant_id: str) -> None:
        left = self._open[tenant_id] - 1
        if left:
            self._open[tenant_id] = left
        else:
            del self._open[tenant_id]


class SessionStreams(_TenantHolds):
    """The ChatSession streams each tenant holds open on this replica, at
    most ``router.max_session_streams_per_tenant``; one more is refused at
    open with TOO_MANY_SESSION_STREAMS. An open stream is charged no turn
    until it sends one, so this is what bounds the idle streams one key
    holds. Each stream is also one of its tenant's calls (TenantCalls)."""

    _LIMIT = "max_session_streams_per_tenant"
    _REASON = Reason.TOO_MANY_SESSION_STREAMS
    _REFUSAL = "the tenant holds its most ChatSession streams open on this replica ({cap}); close one first"


class TenantCalls(_TenantHolds):
    """The gRPC calls of the RouterService each tenant has in flight on this
    replica, streams included, and its HTTP edge requests, at most
    ``router.max_concurrent_rpcs_per_tenant``; one more is refused before
    its request is read with TOO_MANY_CALLS_IN_FLIGHT (services/router/auth.py
    CallerGate counts a call in once its key is checked). Below
    ``router.max_concurrent_rpcs`` (the settings refuse a cap not below it),
    so one key cannot hold every place of the replica: a call holds its
    place however idle, a Chat whose message never comes until its
    deadline. The admin credential's calls are never counted."""

    _LIMIT = "max_concurrent_rpcs_per_tenant"
    _REASON = Reason.TOO_MANY_CALLS_IN_FLIGHT
    _REFUSAL = "the tenant has its most calls (gRPC and HTTP) in flight on this replica ({cap}); retry later"
    # Calls end by themselves (unlike open streams, which the client closes):
    # a short wait, as SERVICE_BUSY's.
    _RETRY_AFTER_S = 1.0
