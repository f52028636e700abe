"""Admission control: limits per tenant, per API key and per model alias,
exact across any number of router replicas.

Every limit lives in Redis and is checked and charged by one Lua script per
turn, so replicas share one truth: a script runs alone, and either every
limit of a turn admits it and all are charged, or none is charged (nothing
half-applied). Keys, all under ``mg:router:limit:{scope}:{id}``, where scope
is ``tenant``, ``key`` (the first 16 hex digits of the key's SHA-256) or
``model``:

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

Tokens are reserved at admission: the new messages' UTF-8 bytes (every
token of either tokenizer covers at least one byte, so this bounds their
tokens) plus max_tokens; the settlement at the end of the turn (success,
failure or cancellation) replaces the reservation by the real usage.

Clock: windows use Redis's TIME unless a clock is injected (tests), so every
replica measures the same minute; calendar periods follow the caller's
clock (``time.time`` by default).

When Redis is unreachable, the limits a scope lists in ``fail_closed`` refuse
the turn with UNAVAILABLE; every other limit is waived (fail open).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import math
import time
import uuid
from collections.abc import Callable

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from meshgate import redis_access
from meshgate.config import LimitSettings, PriceSettings, RouterSettings
from meshgate.errors import MeshgateError, unavailable
from meshgate.reasons import Reason
from services.router.ledger import Ledger, UsageRecord

log = structlog.get_logger(__name__)

_MINUTE_MS = 60_000
NANO_USD = 1_000_000_000
# How long past a generation's deadline a stream's lease is kept.
_LEASE_MARGIN_MS = 60_000
# Budget counters outlive their period by this much.
_BUDGET_GRACE_S = 2 * 24 * 3600

# Both scripts take ARGV: now_ms ('' = Redis TIME), the turn's lease id,
# then one word per check, "kind a b cost key" separated by spaces; a
# window's sum is at "<key>:sum". Packing a check into one argument, keys
# included, cut what the router encodes per turn from 92 arguments to 17
# (redis-py's argument encoding was most of admission's CPU). Keys named in
# ARGV rather than KEYS are fine on the mesh's one Redis instance, not on a
# Redis Cluster (whose slots need KEYS; the keys of a turn span scopes anyway).
#   'w' window   a = limit, b = window ms: entries "<lease>:<cost>" scored by
#                their admission time, and the sum of their costs.
#   'b' budget   a = limit, b = seconds to keep the counter.
#   's' streams  a = limit, b = lease ms.
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000 + t[2] / 1000
end
local function entry_cost(member) return tonumber(string.match(member, ':(%-?%d+)$')) end
local n = #ARGV - 2
local checks = {}
for i = 1, n do
  local kind, a, b, cost, key = string.match(ARGV[2 + i], '^(%a) (%-?%d+) (%-?%d+) (%-?%d+) (.+)$')
  -- Numbers, and the words as sent (a Lua number above 1e14 prints in
  -- exponent form, so members are built from the words).
  checks[i] = {kind, tonumber(a), tonumber(b), cost, key, key .. ':sum', a, b}
end
"""

# Returns {1} when every check admits (all are then charged), else
# {0, index of the first refusing check, retry after ms}.
_ADMIT = (
    _NOW
    + """
for i = 1, n do
  local kind, a, b, key, sum_key = checks[i][1], checks[i][2], checks[i][3], checks[i][5], checks[i][6]
  local cost = tonumber(checks[i][4])
  if kind == 'w' then
    -- Entries that left the window give their cost back (housekeeping,
    -- not a charge: done even if a later check refuses).
    local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now - b)
    if #expired > 0 then
      local freed = 0
      for _, member in ipairs(expired) do freed = freed + entry_cost(member) end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - b)
      redis.call('DECRBY', sum_key, freed)
    end
    local used = tonumber(redis.call('GET', sum_key)) or 0
    if used + cost > a then
      -- The retry delay: when enough of the oldest entries will have left.
      local need, freed = used + cost - a, 0
      local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + entry_cost(entries[j])
        if freed >= need then return {0, i, math.ceil(tonumber(entries[j + 1]) + b - now)} end
      end
      return {0, i, b}
    end
  elseif kind == 'b' then
    local used = tonumber(redis.call('GET', key)) or 0
    if used + cost > a then return {0, i, 0} end
  elseif kind == 's' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= a then return {0, i, 1000} end
  end
end
for i = 1, n do
  local kind, b, cost, key, sum_key = checks[i][1], checks[i][3], checks[i][4], checks[i][5], checks[i][6]
  if kind == 'w' then
    redis.call('ZADD', key, now, ARGV[2] .. ':' .. cost)
    redis.call('INCRBY', sum_key, cost)
    redis.call('PEXPIRE', key, b)
    redis.call('PEXPIRE', sum_key, b)
  elseif kind == 'b' then
    redis.call('INCRBY', key, cost)
    redis.call('EXPIRE', key, b)
  elseif kind == 's' then
    redis.call('ZADD', key, now + b, ARGV[2])
    redis.call('PEXPIRE', key, b)
  end
end
return {1}
"""
)

# The same layout, each check's word being "kind reserved used 0 key": a window
# entry and a budget move from what was reserved to the real use; a
# stream's lease is released. An entry already out of its window is left
# alone: that window has passed.
_SETTLE = (
    _NOW
    + """
for i = 1, n do
  local check = checks[i]
  local kind, reserved, used, key, sum_key = check[1], check[2], check[3], check[5], check[6]
  if kind == 'w' and used ~= reserved then
    local member = ARGV[2] .. ':' .. check[7]
    local score = redis.call('ZSCORE', key, member)
    if score then
      redis.call('ZREM', key, member)
      redis.call('ZADD', key, score, ARGV[2] .. ':' .. check[8])
      redis.call('INCRBY', sum_key, used - reserved)
    end
  elseif kind == 'b' and used ~= reserved then
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, used - reserved) end
  elseif kind == 's' then
    redis.call('ZREM', key, ARGV[2])
  end
end
return 1
"""
)


@dataclasses.dataclass(frozen=True)
class Scope:
    """Who a set of limits applies to: ("tenant", id), ("key", id) or ("model", alias)."""

    kind: str
    id: str
    limits: LimitSettings

    @property
    def prefix(self) -> str:
        return f"mg:router:limit:{self.kind}:{self.id}"


@dataclasses.dataclass(frozen=True)
class _Check:
    scope: Scope
    limit: str
    key: str
    kind: str
    a: int
    b: int
    cost: int


@dataclasses.dataclass
class Reservation:
    """What admission charged for one turn; settle it exactly once."""

    lease_id: str
    reserved_tokens: int
    reserved_nano_usd: int
    # Checks to settle: token rates, budgets, streams. Empty when admitted
    # without Redis (fail open): nothing was charged, nothing to settle.
    checks: tuple[_Check, ...]
    settled: bool = False


def estimate_prompt_tokens(messages) -> int:
    """An upper bound on the tokens of the new messages' content: no token of
    a byte-level BPE or WordPiece vocabulary is shorter than one byte."""
    return sum(len(message.content.encode()) for message in messages)


def cost_nano_usd(price: PriceSettings | None, prompt_tokens: int, completion_tokens: int) -> int:
    if price is None:
        return 0
    usd_per_million = (
        prompt_tokens * price.prompt_usd_per_million + completion_tokens * price.completion_usd_per_million
    )
    return math.ceil(usd_per_million * (NANO_USD // 1_000_000))


def admission_scopes(tenant, alias: str, settings: RouterSettings) -> list[Scope]:
    """The scopes whose limits a turn of ``tenant`` on ``alias`` must pass."""
    scopes = [Scope("tenant", tenant.id, tenant.limits), Scope("key", tenant.key_id, tenant.key_limits)]
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


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, math.ceil(seconds * 1000)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _refusal(
    check: _Check, limit_value, retry_after_s: float | None, reason: Reason, message: str
) -> MeshgateError:
    subject = f"{check.scope.kind}:{check.scope.id}"
    details = [
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
        )
    ]
    if retry_after_s is not None:
        details.append(_retry_info(retry_after_s))
    return MeshgateError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason,
        message,
        {"limit": check.limit, "scope": check.scope.kind, "limit_value": str(limit_value)},
        details=details,
    )


class Admission:
    def __init__(
        self,
        redis,
        max_generation_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._redis = redis
        self._admit_script = redis.register_script(_ADMIT)
        self._settle_script = redis.register_script(_SETTLE)
        self._lease_ms = int(max_generation_s * 1000) + _LEASE_MARGIN_MS
        self._clock = clock
        # Settlements that must finish even when the turn's task is cancelled.
        self._pending: set[asyncio.Task] = set()

    def _now_s(self) -> float:
        return self._clock() if self._clock else time.time()

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._now_s() * 1000)

    def _checks(self, scopes: list[Scope], tokens: int, nano_usd: int, now_s: float) -> list[_Check]:
        # Whole seconds: the same answer for every turn of a second (cached).
        day, month, day_left_s, month_left_s = _period_ids(int(now_s))
        checks = []
        for scope in scopes:
            limits, prefix = scope.limits, scope.prefix
            if limits.requests_per_minute:
                checks.append(
                    _Check(scope, "requests_per_minute", f"{prefix}:rpm", "window",
                           limits.requests_per_minute, _MINUTE_MS, 1)
                )  # fmt: skip
            if limits.tokens_per_minute:
                checks.append(
                    _Check(scope, "tokens_per_minute", f"{prefix}:tpm", "window",
                           limits.tokens_per_minute, _MINUTE_MS, tokens)
                )  # fmt: skip
            if limits.concurrent_streams:
                checks.append(
                    _Check(scope, "concurrent_streams", f"{prefix}:streams", "streams",
                           limits.concurrent_streams, self._lease_ms, 1)
                )  # fmt: skip
            for name, value, key, left_s, cost in (
                ("tokens_per_day", limits.tokens_per_day, f"tokens:day:{day}", day_left_s, tokens),
                ("tokens_per_month", limits.tokens_per_month, f"tokens:month:{month}", month_left_s, tokens),
                ("cost_usd_per_day", limits.cost_usd_per_day, f"cost:day:{day}", day_left_s, nano_usd),
                (
                    "cost_usd_per_month",
                    limits.cost_usd_per_month,
                    f"cost:month:{month}",
                    month_left_s,
                    nano_usd,
                ),
            ):
                if value is None:
                    continue
                limit = round(value * NANO_USD) if name.startswith("cost") else value
                checks.append(
                    _Check(scope, name, f"{prefix}:{key}", "budget", limit, left_s + _BUDGET_GRACE_S, cost)
                )
        return checks

    async def admit(
        self, scopes: list[Scope], prompt_tokens: int, max_tokens: int, price: PriceSettings | None = None
    ) -> Reservation:
        """Charges the turn to every scope's limits, or raises
        RESOURCE_EXHAUSTED naming the first limit that refuses it."""
        tokens = prompt_tokens + max_tokens
        nano_usd = cost_nano_usd(price, prompt_tokens, max_tokens)
        lease_id = uuid.uuid4().hex
        scopes = [scope for scope in scopes if scope.limits.configured()]
        if not scopes:
            return Reservation(lease_id, tokens, nano_usd, ())
        now_s = self._now_s()
        checks = self._checks(scopes, tokens, nano_usd, now_s)
        for check in checks:
            # A turn no window or budget could ever hold must not wait for one.
            if check.kind != "streams" and check.cost > check.a:
                raise _refusal(
                    check, _limit_value(check), None, Reason.REQUEST_EXCEEDS_LIMIT,
                    f"this request alone exceeds {check.scope.kind} limit {check.limit}",
                )  # fmt: skip
        args = [self._now_arg(), lease_id]
        args += [f"{_KIND_CODE[c.kind]} {int(c.a)} {int(c.b)} {int(c.cost)} {c.key}" for c in checks]
        try:
            admitted = await self._admit_script(args=args)
        except redis_access.CONNECTION_ERRORS as error:
            closed = [c for c in checks if c.limit in c.scope.limits.fail_closed]
            if closed:
                raise unavailable(
                    Reason.LIMITS_UNAVAILABLE,
                    f"limits cannot be checked and {closed[0].limit} is configured to fail closed",
                    limit=closed[0].limit,
                    scope=closed[0].scope.kind,
                ) from error
            log.warning("limits unavailable; admitting (fail open)", error=str(error))
            return Reservation(lease_id, tokens, nano_usd, ())
        if admitted[0] != 1:
            check = checks[admitted[1] - 1]
            if check.kind == "budget":
                period_left_s = check.b - _BUDGET_GRACE_S
                raise _refusal(
                    check, _limit_value(check), period_left_s, Reason.BUDGET_EXHAUSTED,
                    f"the {check.scope.kind}'s {check.limit} budget is spent until the period ends",
                )  # fmt: skip
            raise _refusal(
                check, _limit_value(check), admitted[2] / 1000, Reason.RATE_LIMITED,
                f"{check.scope.kind} limit {check.limit} reached",
            )  # fmt: skip
        settled = tuple(c for c in checks if c.limit != "requests_per_minute")
        return Reservation(lease_id, tokens, nano_usd, settled)

    async def settle(self, reservation: Reservation, tokens: int, nano_usd: int) -> None:
        """Replaces the reservation by what the turn used and frees its stream."""
        if reservation.settled:
            return
        reservation.settled = True
        if not reservation.checks:
            return
        args = [self._now_arg(), reservation.lease_id]
        for check in reservation.checks:
            used = nano_usd if check.limit.startswith("cost") else tokens
            args.append(f"{_KIND_CODE[check.kind]} {int(check.cost)} {int(used)} 0 {check.key}")
        try:
            await self._settle_script(args=args)
        except redis_access.CONNECTION_ERRORS as error:
            # The reservation stands (an overcharge, never an undercharge),
            # and the stream's lease expires on its own.
            log.warning("settlement failed; the reservation stands", error=str(error))

    def settle_in_background(self, reservation: Reservation, tokens: int, nano_usd: int) -> None:
        """Settles even when the caller's task is being cancelled."""
        task = asyncio.get_running_loop().create_task(self.settle(reservation, tokens, nano_usd))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


_KIND_CODE = {"window": "w", "budget": "b", "streams": "s"}


def _limit_value(check: _Check):
    return getattr(check.scope.limits, check.limit)


class TurnAdmission:
    """The router pipeline's admit and settle stages (``pipeline.Admission``)
    over :class:`Admission`: the scopes, reservation and real use of a turn,
    and its record in the usage ledger."""

    def __init__(self, admission: Admission, settings: RouterSettings, ledger: Ledger | None = None) -> None:
        self._admission = admission
        self._settings = settings
        # Records each turn, batched off the caller's critical path.
        self._ledger = ledger

    def reconfigure(self, settings: RouterSettings) -> None:
        """New limits and prices (a reload) apply from the next turn; a turn
        already admitted settles against the scopes it was admitted with."""
        self._settings = settings

    async def admit(self, turn) -> Reservation:
        return await self._admission.admit(
            admission_scopes(turn.tenant, turn.model_alias, self._settings),
            estimate_prompt_tokens(turn.messages),
            turn.max_tokens,
            self._settings.prices.get(turn.model_alias),
        )

    async def settle(self, grant: Reservation, turn, outcome) -> None:
        price = self._settings.prices.get(turn.model_alias)
        answer = outcome.answer
        full_cost = cost_nano_usd(price, answer.prompt_tokens, answer.completion_tokens)
        hit = outcome.cache_status is not None and outcome.cache_status.is_hit
        if hit:
            # A hit spent no model tokens and costs the configured share.
            tokens, nano_usd = 0, math.ceil(full_cost * (price.cache_hit_fraction if price else 0.0))
        else:
            # Failed or cancelled turns are charged what the answer reached.
            tokens, nano_usd = answer.prompt_tokens + answer.completion_tokens, full_cost
        if self._ledger is not None:
            self._record(turn, outcome, hit, nano_usd)
        if outcome.cancelled:
            # The turn's task is being cancelled: settle off it.
            self._admission.settle_in_background(grant, tokens, nano_usd)
        else:
            await self._admission.settle(grant, tokens, nano_usd)

    def _record(self, turn, outcome, hit: bool, nano_usd: int) -> None:
        answer = outcome.answer
        status = outcome.cache_status.value if outcome.cache_status is not None else "none"
        # A hang-up is no error reason: the ledger says "cancelled".
        failure = "cancelled" if outcome.cancelled else str(outcome.failure or "")
        usage = UsageRecord(
            tenant=turn.tenant.id,
            key_id=turn.tenant.key_id,
            model=turn.model_alias,
            deployment=answer.deployment,
            prompt_tokens=0 if hit else answer.prompt_tokens,
            completion_tokens=0 if hit else answer.completion_tokens,
            # A hit's cached answer: the tokens it did not spend.
            saved_tokens=answer.prompt_tokens + answer.completion_tokens if hit else 0,
            cache_status=status,
            cost_nano_usd=nano_usd,
            latency_ms=round(outcome.elapsed_s * 1000),
            failure=failure,
        )
        self._ledger.submit(usage)

    async def drain(self) -> None:
        """Waits for settlements and ledger records still in flight (before
        Redis closes)."""
        await self._admission.drain()
        if self._ledger is not None:
            await self._ledger.drain()
