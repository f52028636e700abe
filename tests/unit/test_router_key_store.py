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
    """The Redis calls of a KeyStore over records in memory. A GET reads its
    value when asked, as Redis does, and answers once ``gate`` (when set) is
    set: the first GET after it is set is held, so a test can hold one read
    in flight while others go on."""

    def __init__(self, *records: KeyRecord) -> None:
        self.values = {keys_module._RECORD.format(r.key_hash): r.to_json() for r in records}
        self.ids = {r.key_id: r.key_hash.encode() for r in records}
        self.gets: list[str] = []
        self.gate: asyncio.Event | None = None
        self.down = False

    async def get(self, name: str):
        self.gets.append(name)
        value = self.values.get(name)
        gate, self.gate = self.gate, None
        if gate is not None:
            await gate.wait()
        if self.down:
            raise redis.exceptions.ConnectionError("connection refused")
        return value

    async def hget(self, name: str, key: str):
        return self.ids.get(key)

    async def time(self):
        # The write's deadline (KeyStore._not_after) is Redis's to check;
        # the script in memory below writes whenever it is run.
        return 1_800_000_000, 0

    def register_script(self, source: str):
        assert source == keys_module._WRITE_IF_UNCHANGED

        async def write_if_unchanged(keys, args):
            # The script, in memory: the records are written only if the one
            # checked still holds what the writer read ("" for absent). These
            # tests send no request ids (keys[2], args[1:3]).
            assert args[1] == ""
            if self.values.get(keys[0], "") != args[0]:
                return 0
            for i in range(3, len(keys), 2):
                first = 3 + 5 * (i - 3) // 2
                value, _, key_hash, key_id = args[first : first + 4]
                self.values[keys[i]] = value
                self.ids[key_id] = key_hash.encode()
            return 1

        return write_if_unchanged


async def _until_asked(fake: CountingRedis, gets: int) -> None:
    """Until the store has sent ``gets`` GETs (its reads run as tasks of
    their own, a few loop turns after a lookup starts)."""
    for _ in range(100):
        if len(fake.gets) >= gets:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(fake.gets)} GETs sent, not {gets}")


def record(secret: str) -> KeyRecord:
    return KeyRecord(hash_api_key(secret), "acme", ("*",), LimitSettings(), created_at=1.0)


async def test_calls_asking_for_one_key_at_once_share_one_get():
    live = record(new_secret())
    fake = CountingRedis(live)
    release = fake.gate = asyncio.Event()
    store = KeyStore(fake)
    asks = [asyncio.ensure_future(store.lookup(live.key_hash)) for _ in range(16)]
    await _until_asked(fake, 1)
    release.set()
    assert all(found == live for found in await asyncio.gather(*asks))
    assert len(fake.gets) == 1


async def test_a_cancelled_caller_ends_neither_the_shared_get_nor_the_others_wait():
    live = record(new_secret())
    fake = CountingRedis(live)
    release = fake.gate = asyncio.Event()
    store = KeyStore(fake)
    first = asyncio.ensure_future(store.lookup(live.key_hash))
    second = asyncio.ensure_future(store.lookup(live.key_hash))
    await _until_asked(fake, 1)
    first.cancel()
    release.set()
    assert await second == live
    assert first.cancelled() and len(fake.gets) == 1


async def test_a_get_whose_callers_all_left_still_ends_and_is_cached():
    # Cancelling it would waste the read and send the next caller to Redis again.
    live = record(new_secret())
    fake = CountingRedis(live)
    release = fake.gate = asyncio.Event()
    store = KeyStore(fake)
    asks = [asyncio.ensure_future(store.lookup(live.key_hash)) for _ in range(2)]
    await _until_asked(fake, 1)
    for ask in asks:
        ask.cancel()
    await asyncio.gather(*asks, return_exceptions=True)
    release.set()
    for _ in range(10):  # the abandoned GET's task lands a few loop turns later
        await asyncio.sleep(0)
    assert await store.lookup(live.key_hash) == live
    assert all(ask.cancelled() for ask in asks) and len(fake.gets) == 1


async def test_a_flood_of_made_up_keys_never_pushes_a_live_key_out_of_the_cache(monkeypatch):
    # Both bounds far below the flood: absences kept with the records found
    # would empty them too.
    monkeypatch.setattr(keys_module, "_ABSENT_MAX_ENTRIES", 50)
    monkeypatch.setattr(keys_module, "_CACHE_MAX_ENTRIES", 10)
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
    assert len(store._absent) <= 50 and not set(made_up) & set(store._found)
    # An absence within its time is cached too: the same wrong key again costs nothing.
    assert await store.lookup(made_up[-1]) is None
    assert len(fake.gets) == gets


async def test_a_key_revoked_while_its_get_is_under_way_is_never_served_from_that_get():
    live = record(new_secret())
    fake = CountingRedis(live)
    store = KeyStore(fake, clock=lambda: 2.0)
    # A GET reads the live record; its answer is held back while the key is revoked.
    release = fake.gate = asyncio.Event()
    asked_before = asyncio.ensure_future(store.lookup(live.key_hash))
    await _until_asked(fake, 1)
    await store.revoke(live.key_id)
    asked_after = asyncio.ensure_future(store.lookup(live.key_hash))
    await asyncio.sleep(0)
    release.set()
    # The caller from before the revocation may get what was read; none
    # after, and the stale record is not kept for the next.
    assert (await asked_before).revoked_at is None
    assert (await asked_after).revoked_at == 2.0
    assert (await store.lookup(live.key_hash)).revoked_at == 2.0


async def test_callers_sharing_a_failed_get_each_get_their_own_error():
    live = record(new_secret())
    fake = CountingRedis(live)
    fake.down = True
    release = fake.gate = asyncio.Event()
    store = KeyStore(fake)
    asks = [asyncio.ensure_future(store.lookup(live.key_hash)) for _ in range(3)]
    await _until_asked(fake, 1)
    release.set()
    errors = await asyncio.gather(*asks, return_exceptions=True)
    assert all(isinstance(error, MeshgateError) for error in errors)
    assert len({id(error) for error in errors}) == 3 and len(fake.gets) == 1


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
