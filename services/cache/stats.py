"""Hit, miss and store counters, kept in Redis but counted in memory.

Redis makes them the mesh's totals (every cache replica adds to the same
hash) and lets them outlive a restart; counting in memory and flushing once
a second keeps that extra Redis write off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as redis
import structlog

from meshgate.redis_access import CONNECTION_ERRORS, outage
from meshgate.tasks import cancel_and_wait
from services.cache import keys

log = structlog.get_logger(__name__)

FIELDS = ("exact_hits", "semantic_hits", "misses", "stores", "verifier_rejections", "wrong_hit_reports")
FLUSH_INTERVAL_S = 1.0
_FLUSH_ERRORS = (redis.RedisError, OSError)


class Stats:
    def __init__(self, client: redis.Redis, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._client = client
        self._flush_interval_s = flush_interval_s
        self.pending = dict.fromkeys(FIELDS, 0)
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait(self._flusher)
        with contextlib.suppress(*_FLUSH_ERRORS):
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            counts = {name: n for name, n in self.pending.items() if n}
            if not counts:
                return
            self.pending = dict.fromkeys(FIELDS, 0)
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for name, n in counts.items():
                        pipe.hincrby(keys.STATS_KEY, name, n)
                    await pipe.execute()
            except BaseException:
                for name, n in counts.items():
                    self.pending[name] += n
                raise

    async def totals(self) -> dict[str, int]:
        """The counters of every replica, this one's up to now."""
        try:
            await self.flush()
            stored = await self._client.hgetall(keys.STATS_KEY)
        except CONNECTION_ERRORS as error:
            raise outage("cache store unavailable", error) from error
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
