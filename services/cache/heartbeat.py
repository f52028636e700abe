"""The cache service's heartbeat on its notices' channel
(``meshgate/cache_notices.py``): each replica's carries an id of its own,
which its hits name, and a router copies a hit only while it hears the
heartbeat the hit names. A router that hears another Redis than the
replica's (another mesh's, or the others' where this replica alone is on
another) keeps no copy of its hits, rather than serving each for its
whole age limit after the notice that should have dropped it."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
import structlog

from meshgate import cache_notices
from meshgate.redis_access import CONNECTION_ERRORS
from meshgate.tasks import cancel_and_wait

log = structlog.get_logger(__name__)


class Heartbeat:
    """Publishes ``cache_notices.heartbeat(heartbeat_id)`` every
    ``interval_s``, as the notices are published (plain PUBLISH, forwarded
    to every node of a cluster): the first at start."""

    def __init__(self, client: redis.Redis, interval_s: float = cache_notices.HEARTBEAT_INTERVAL_S) -> None:
        self._client = client
        self._interval_s = interval_s
        self.heartbeat_id = cache_notices.new_heartbeat_id()
        self._message = cache_notices.heartbeat(self.heartbeat_id)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _beat(self) -> None:
        failing = False
        while True:
            try:
                await self._client.publish(cache_notices.CHANNEL, self._message)
            except (*CONNECTION_ERRORS, redis.RedisError) as error:
                # The routers bypass their copies meanwhile; one warning per outage.
                if not failing:
                    log.warning("cannot publish the cache notices' heartbeat", error=str(error))
                failing = True
            else:
                failing = False
            await asyncio.sleep(self._interval_s)
