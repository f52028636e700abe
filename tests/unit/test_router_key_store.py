"""The KeyStore's lookup cache (services/router/keys.py): what a flood of
made-up keys may cost, and what a GET is shared by. Redis is a fake that
counts GETs (the store's Redis calls themselves are covered by
tests/integration/test_router_keys.py on a real Redis)."""

import asyncio

import grpc
import pytest
import redis.exceptions

from meshgate.config import LimitSettings, hash_api_key
from meshgate.errors import MeshgateError
from services.router import keys as keys_module
from services.router.keys import KeyRecord, KeyStore, new_secret


class CountingRedis:
    """GET over records in memory; each GET waits for ``gate`` (when set),
    so a test can hold reads in flight."""

    def __init__(self, *records: KeyRecord) -> None:
        self.values = {keys_module._RECORD.format(r.key_hash): r.to_json() for r in records}
        self.gets: list[str] = []
        self.gate: asyncio.Event | None = None
        self.down = False

    async def get(self, name: str):
        self.gets.append(name)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise redis.exceptions.ConnectionError("connection refused")
        return self.values.get(name)


def record(secret: str) -> KeyRecord:
    return KeyRecord(hash_api_key(secret), "acme", ("*",), LimitSettings(), created_at=1.0)


async def test_calls_asking_for_one_key_at_once_share_one_get():
    live = record(new_secret())
    fake = CountingRedis(live)
    fake.gate = asyncio.Event()
    store = KeyStore(fake)
    asks = [asyncio.ensure_future(store.lookup(live.key_hash)) for _ in range(16)]
    await asyncio.sleep(0)
    fake.gate.set()
    assert all(found == live for found in await asyncio.gather(*asks))
    assert len(fake.gets) == 1


async def test_a_cancelled_caller_ends_neither_the_shared_get_nor_the_others_wait():
    live = record(new_secret())
    fake = CountingRedis(live)
    fake.gate = asyncio.Event()
    store = KeyStore(fake)
    first = asyncio.ensure_future(store.lookup(live.key_hash))
    second = asyncio.ensure_future(store.lookup(live.key_hash))
    await asyncio.sleep(0)
    first.cancel()
    fake.gate.set()
    assert await second == live
    assert first.cancelled() and len(fake.gets) == 1


async def test_a_flood_of_made_up_keys_never_pushes_a_live_key_out_of_the_cache(monkeypatch):
    monkeypatch.setattr(keys_module, "_ABSENT_MAX_ENTRIES", 50)
    live = record(new_secret())
    fake = CountingRedis(live)
    store = KeyStore(fake)
    assert await store.lookup(live.key_hash) == live
    made_up = [hash_api_key(new_secret()) for _ in range(200)]
    for key_hash in made_up:
        assert await store.lookup(key_hash) is None
    gets = len(fake.gets)
    # Four times the absences kept: the live record is still cached (no GET),
    # and the absences were emptied, not grown past their bound.
    assert await store.lookup(live.key_hash) == live
    assert len(fake.gets) == gets
    assert len(store._absent) <= 50
    # An absence within its time is cached too: the same wrong key again costs nothing.
    assert await store.lookup(made_up[-1]) is None
    assert len(fake.gets) == gets


async def test_redis_down_fails_closed_with_unavailable_and_caches_nothing():
    live = record(new_secret())
    fake = CountingRedis(live)
    fake.down = True
    store = KeyStore(fake)
    with pytest.raises(MeshgateError) as refused:
        await store.lookup(live.key_hash)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "REDIS_UNAVAILABLE"
    fake.down = False
    assert await store.lookup(live.key_hash) == live
    assert len(fake.gets) == 2
