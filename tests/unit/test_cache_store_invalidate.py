"""An Invalidate that fails partway still announces it (CacheStore.invalidate),
but tells its own failure, and does not wait long on a notice to a Redis that
does not answer: the store's logic over a stand-in client (the real-Redis case,
a connection dropped midway, is tests/integration/test_cache_servicer.py's)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as redis

from meshgate.errors import MeshgateError
from services.cache import store as store_module


class _UnansweringRedis:
    """Refuses every script (the connection is gone) and never answers a
    publish (a Redis whose packets are dropped: a connect timeout's wait)."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def register_script(self, script: str):
        async def run(**_):
            raise redis.ConnectionError("Connection reset by peer")

        return run

    async def publish(self, channel, message) -> None:
        self.published.append(message)
        await asyncio.sleep(3600)


@pytest.fixture(autouse=True)
def short_notice_wait(monkeypatch):
    monkeypatch.setattr(store_module, "_NOTICE_AFTER_FAILURE_S", 0.1)


async def test_a_failed_invalidate_tells_its_failure_without_waiting_out_its_notice():
    client = _UnansweringRedis()
    cache = store_module.CacheStore(client, 10)
    async with asyncio.timeout(store_module._NOTICE_AFTER_FAILURE_S + 5):
        with pytest.raises(MeshgateError) as raised:
            await cache.invalidate("tenant-a", "", ttl_ms=1000)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    # The script's failure, not the notice's.
    assert isinstance(raised.value.__cause__, redis.ConnectionError)
    # It was tried all the same.
    assert client.published == [store_module.cache_notices.scope_notice("tenant-a", "")]


async def test_a_cancelled_invalidate_is_cancelled_once_its_notice_is_tried():
    client = _UnansweringRedis()
    cache = store_module.CacheStore(client, 10)

    async def held_scripts(**_):
        await asyncio.sleep(3600)

    cache._mark_invalidated = held_scripts
    invalidating = asyncio.ensure_future(cache.invalidate("tenant-a", "m", ttl_ms=1000))
    await asyncio.sleep(0.01)
    invalidating.cancel()
    async with asyncio.timeout(store_module._NOTICE_AFTER_FAILURE_S + 5):
        with pytest.raises(asyncio.CancelledError):
            await invalidating
    assert client.published == [store_module.cache_notices.scope_notice("tenant-a", "m")]
