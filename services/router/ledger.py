"""The usage ledger: what every completed or failed turn used, durably.

Two kinds of keys, written together by one Lua script (so the log and the
aggregates never disagree):

- ``mg:router:usage:log``, a stream: one entry per turn with tenant, key
  id, model alias, deployment, prompt and completion tokens, tokens a cache
  hit saved, cache status, cost (nano-USD), latency (ms) and the failure
  reason ("" when it completed); trimmed to about
  ``router.usage_stream_max_len`` entries.
- ``mg:router:usage:{tenant}:{YYYY-MM-DD}``, a hash per tenant and UTC day:
  field ``<key id>|<model>|<metric>`` -> running total, for the metrics in
  :data:`METRICS`; kept ``router.usage_retention_days``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from meshgate import redis_access
from meshgate.errors import unavailable
from meshgate.reasons import Reason

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
)

# Separates a record's values in the one argument that carries them all:
# one argument instead of 42 (redis-py's encoding of each argument was most
# of the router's CPU per record).
_SEPARATOR = "\x1f"


@dataclasses.dataclass(frozen=True)
class UsageRecord:
    tenant: str
    key_id: str
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    # Tokens a cache hit did not generate (the cached answer's).
    saved_tokens: int
    cache_status: str
    cost_nano_usd: int
    latency_ms: int
    failure: str = ""


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(UsageRecord))

# KEYS: the stream, the tenant's day hash. ARGV: stream max length,
# retention s, then the UsageRecord's values in field order, joined by
# _SEPARATOR. The aggregates are derived here from the values.
_RECORD = (
    "local names = {" + ", ".join(f"'{name}'" for name in _FIELD_NAMES) + "}"
    + """
local values, entry = {}, {}
for value in string.gmatch(ARGV[3] .. '\\31', '(.-)\\31') do values[#values + 1] = value end
for i, name in ipairs(names) do
  entry[#entry + 1] = name
  entry[#entry + 1] = values[i]
  values[name] = values[i]
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(entry))
local increments = {
  requests = 1,
  failures = values.failure ~= '' and 1 or 0,
  cache_hits = string.sub(values.cache_status, -3) == 'hit' and 1 or 0,
  prompt_tokens = values.prompt_tokens, completion_tokens = values.completion_tokens,
  saved_tokens = values.saved_tokens, cost_nano_usd = values.cost_nano_usd,
  latency_ms = values.latency_ms,
}
local prefix = values.key_id .. '|' .. values.model .. '|'
for metric, increment in pairs(increments) do
  if tonumber(increment) ~= 0 then redis.call('HINCRBY', KEYS[2], prefix .. metric, increment) end
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
)


class Ledger:
    def __init__(
        self, redis, stream_max_len: int, retention_days: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._record = redis.register_script(_RECORD)
        self._stream_max_len = stream_max_len
        self._retention_s = retention_days * 24 * 3600
        self._clock = clock

    @staticmethod
    def _day_key(tenant: str, day: datetime.date) -> str:
        return f"mg:router:usage:{tenant}:{day:%Y-%m-%d}"

    def today(self) -> datetime.date:
        """The current UTC day, as the ledger files records."""
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).date()

    async def record(self, usage: UsageRecord) -> None:
        day = self.today()
        # A separator inside a value (a tenant id could hold one) would shift
        # every value after it: it is dropped.
        packed = _SEPARATOR.join(
            str(getattr(usage, name)).replace(_SEPARATOR, "") for name in _FIELD_NAMES
        )
        try:
            await self._record(
                keys=[STREAM, self._day_key(usage.tenant, day)],
                args=[self._stream_max_len, self._retention_s, packed],
            )
        except RedisError as error:
            # The caller has its answer; a lost record is logged, not raised.
            log.error("usage not recorded", tenant=usage.tenant, model=usage.model, error=str(error))

    async def usage(
        self, tenant: str, first_day: datetime.date, last_day: datetime.date
    ) -> dict[tuple[str, str], dict[str, int]]:
        """Totals per (key id, model) over the days, both ends included."""
        days = [first_day + datetime.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
        pipe = self._redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self._day_key(tenant, day))
        totals: dict[tuple[str, str], dict[str, int]] = {}
        try:
            replies = await pipe.execute()
        except redis_access.CONNECTION_ERRORS as error:
            raise unavailable(Reason.REDIS_UNAVAILABLE, f"usage cannot be read: {error}") from error
        for fields in replies:
            for field, value in fields.items():
                key_id, rest = field.decode().split("|", 1)
                model, metric = rest.rsplit("|", 1)
                row = totals.setdefault((key_id, model), dict.fromkeys(METRICS, 0))
                row[metric] += int(value)
        return totals
