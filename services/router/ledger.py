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

# KEYS: the stream, the tenant's day hash. ARGV: stream max length,
# retention s, "<key>|<model>|" prefix, then the stream entry's field/value
# pairs count n, n*2 values, then (metric, increment) pairs.
_RECORD = """
local n = tonumber(ARGV[4])
local entry = {}
for i = 5, 4 + 2 * n do entry[#entry + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(entry))
for i = 5 + 2 * n, #ARGV, 2 do
  if ARGV[i + 1] ~= '0' then redis.call('HINCRBY', KEYS[2], ARGV[3] .. ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


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
        entry = {field.name: str(getattr(usage, field.name)) for field in dataclasses.fields(usage)}
        increments = {
            "requests": 1,
            "failures": 1 if usage.failure else 0,
            "cache_hits": 1 if usage.cache_status.endswith("hit") else 0,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "saved_tokens": usage.saved_tokens,
            "cost_nano_usd": usage.cost_nano_usd,
            "latency_ms": usage.latency_ms,
        }
        args: list = [self._stream_max_len, self._retention_s, f"{usage.key_id}|{usage.model}|", len(entry)]
        for name, value in entry.items():
            args += [name, value]
        for name, value in increments.items():
            args += [name, value]
        try:
            await self._record(keys=[STREAM, self._day_key(usage.tenant, day)], args=args)
        except redis_access.CONNECTION_ERRORS as error:
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
