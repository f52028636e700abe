"""Hit, miss and store counters, kept in Redis but counted in memory.

Redis makes them the mesh's totals (every cache replica adds to the same
hash) and lets them outlive a restart; counting in memory and flushing once
a second keeps that extra Redis write off the request path.

A flush whose reply is lost (a Redis timeout, a cancelled GetStats, a
shutdown mid-flush) may still have been applied, so its counts are sent
again as the same numbered batch, which Redis adds once: before, they went
back into the pending counts and were added twice (a bug hunt: 10 hits
whose flush timed out behind a stalled connection read 20).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import redis.asyncio as redis
import structlog

from meshgate.redis_access import CONNECTION_ERRORS, is_wrong_type, outage
from meshgate.tasks import cancel_and_wait
from services.cache import keys
from services.cache.store import wrong_type

log = structlog.get_logger(__name__)

FIELDS = ("exact_hits", "semantic_hits", "misses", "stores", "verifier_rejections", "wrong_hit_reports")
FLUSH_INTERVAL_S = 1.0
_FLUSH_ERRORS = (redis.RedisError, OSError)
# How long a process's mark of its last batch applied lives past that batch:
# a batch is resent within a flush interval once Redis answers again, so
# only an outage longer than this could add one twice; an idle or stopped
# process's mark goes with it.
_FLUSHED_MARK_TTL_MS = 24 * 3600 * 1000

# Adds one numbered batch of a process's counts, unless it was added already.
# The batch is marked added only after its counts are: Redis keeps what a
# script wrote before a command of it failed, so with the mark first a batch
# whose HINCRBY failed (the totals key holding another type, an operator's or
# another program's write) was marked added, and its resend added nothing (a
# review: of 13 stores counted, 12 lost). Totals of another type are refused
# before anything is written (the mark is set last, but a batch half added
# would be added again in full).
_ADD_BATCH = """
-- KEYS: the totals, the number of this process's last batch added
-- ARGV: the batch's number, how long that mark lives (ms), then field, count pairs
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[1]) then return 0 end
local held = redis.call('TYPE', KEYS[1])['ok']
if held ~= 'hash' and held ~= 'none' then
  return redis.error_reply('WRONGTYPE the cache totals hold a ' .. held .. ', not a hash')
end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""


class Stats:
    def __init__(self, client: redis.Redis, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._client = client
        self._flush_interval_s = flush_interval_s
        self.pending = dict.fromkeys(FIELDS, 0)
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._add_batch = client.register_script(_ADD_BATCH)
        self._flushed_key = keys.stats_flushed_key(secrets.token_hex(8))
        self._batches = 0
        # A batch taken from ``pending`` whose adding has not been confirmed:
        # its number and counts, sent again as they are.
        self._unconfirmed: tuple[int, dict[str, int]] | None = None

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait(self._flusher)
        with contextlib.suppress(*_FLUSH_ERRORS):
            await self.flush()

    async def flush(self) -> None:
        """Adds the counts to Redis's totals: first a batch whose adding
        failed before (it may have been added), then those counted since."""
        async with self._lock:
            if self._unconfirmed is not None:
                await self._add(*self._unconfirmed)
            counts = {name: n for name, n in self.pending.items() if n}
            if not counts:
                return
            self.pending = dict.fromkeys(FIELDS, 0)
            self._batches += 1
            self._unconfirmed = (self._batches, counts)
            await self._add(self._batches, counts)

    async def _add(self, number: int, counts: dict[str, int]) -> None:
        """Adds batch ``number`` once, however often it is sent."""
        pairs = [part for name, n in counts.items() for part in (name, n)]
        await self._add_batch(
            keys=[keys.STATS_KEY, self._flushed_key], args=[number, _FLUSHED_MARK_TTL_MS, *pairs]
        )
        self._unconfirmed = None

    async def totals(self) -> dict[str, int]:
        """The counters of every replica, this one's up to now. Totals held
        as another type than a hash are refused FAILED_PRECONDITION
        CACHE_KEY_WRONG_TYPE naming the key (raised, it was INTERNAL for
        everyone); meanwhile each replica keeps its counts, and adds them
        once the key is deleted."""
        try:
            await self.flush()
            stored = await self._client.hgetall(keys.STATS_KEY)
        except CONNECTION_ERRORS as error:
            raise outage("cache store unavailable", error) from error
        except redis.ResponseError as error:
            if not is_wrong_type(error):
                raise
            try:
                held = (await self._client.type(keys.STATS_KEY)).decode()
            except CONNECTION_ERRORS as lost:
                raise outage("cache store unavailable", lost) from error
            raise wrong_type(
                "stats",
                keys.STATS_KEY,
                held,
                "delete it: each cache replica keeps the counts it could not add, and adds them then",
            ) from error
        return {name: int(stored.get(name.encode(), 0)) for name in FIELDS}

    async def _flush_periodically(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except _FLUSH_ERRORS as error:
                # Counts are kept for the next attempt; one warning per outage.
                if not failing:
                    log.warning("cannot flush cache counters", error=str(error))
                failing = True
            else:
                failing = False
