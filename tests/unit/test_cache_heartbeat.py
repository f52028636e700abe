"""services/cache/heartbeat.py: what the cache service publishes for the
routers' copies of hot hits, and how it rides out a Redis outage."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
import structlog

from meshgate import cache_notices
from services.cache.heartbeat import Heartbeat


class FlakyRedis:
    """Refuses the publishes numbered in ``refused`` (from 0)."""

    def __init__(self, refused: range) -> None:
        self.refused = refused
        self.attempts = 0
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, channel: str, message: bytes) -> int:
        self.attempts += 1
        if self.attempts - 1 in self.refused:
            raise redis.ConnectionError("refused")
        self.published.append((channel, message))
        return 1


async def test_a_heartbeat_goes_out_at_start_and_every_interval_through_an_outage_warned_of_once():
    client = FlakyRedis(refused=range(2, 6))
    heartbeat = Heartbeat(client, interval_s=0.01)
    with structlog.testing.capture_logs() as logs:
        heartbeat.start()
        await asyncio.sleep(0)
        published = (cache_notices.CHANNEL, cache_notices.heartbeat(heartbeat.heartbeat_id))
        assert client.published == [published]
        while len(client.published) < 4:
            await asyncio.sleep(0.01)
        await heartbeat.close()
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert set(client.published) == {published}


def test_each_replicas_heartbeat_carries_an_id_of_its_own():
    """A router copies a hit only while it hears the heartbeat of the
    replica that answered it: the replicas' heartbeats must not pass for
    each other's."""
    first, second = Heartbeat(FlakyRedis(refused=range(0))), Heartbeat(FlakyRedis(refused=range(0)))
    assert first.heartbeat_id != second.heartbeat_id
    assert cache_notices.parse(cache_notices.heartbeat(first.heartbeat_id)) == cache_notices.Heartbeat(
        first.heartbeat_id
    )
