"""context.max_session_bytes over a real Redis: the session's byte count
(meta's ``bytes``, services/context/store.py) is kept by the scripts that
change its turns, an append past the cap is refused whole, concurrent
appends near the cap never pass it, and a session stored before the count
is counted once, by the first append that needs it."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redis.asyncio as redis

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import store as session_store
from tests.integration.test_context_service import (
    ASSISTANT,
    SYSTEM,
    USER,
    failure,
    make_settings,
    msg,
    new_session,
    running,
)
from tests.integration.test_context_versions import append, contents

pytestmark = pytest.mark.integration


def _size(*turns) -> int:
    """What the turns take in Redis: their serialized encodings."""
    return sum(len(turn.SerializeToString()) for turn in turns)


async def _counted(client: redis.Redis, tenant: str, session_id: str) -> int | None:
    raw = await client.hget(session_store.key(tenant, session_id, "meta"), "bytes")
    return None if raw is None else int(raw)


async def _stored(client: redis.Redis, tenant: str, session_id: str) -> int:
    """The bytes the session's turns hold, measured on the list itself."""
    turns = await client.lrange(session_store.key(tenant, session_id, "turns"), 0, -1)
    return sum(len(turn) for turn in turns)


@pytest.fixture
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_the_count_follows_appends_compaction_reverts_and_forks(client) -> None:
    sessions = session_store.SessionStore(client, ttl_s=600, max_session_bytes=1 << 20)
    tenant, session_id, fork_id = "bytes", uuid.uuid4().hex, uuid.uuid4().hex
    first = [msg(SYSTEM, "You answer tersely."), msg(USER, "My cat is called zebulon.")]
    second = [msg(ASSISTANT, "Noted." * 40), msg(USER, "And the harbour?" * 30)]
    third = [msg(ASSISTANT, "It is north." * 50)]
    try:
        await sessions.create(tenant, session_id)
        assert await _counted(client, tenant, session_id) == 0
        await sessions.append(tenant, session_id, 0, first, {})
        await sessions.append(tenant, session_id, 1, second, {})
        await sessions.append(tenant, session_id, 2, third, {})
        assert await _counted(client, tenant, session_id) == _size(*first, *second, *third)
        assert await _counted(client, tenant, session_id) == await _stored(client, tenant, session_id)

        # A fork at version 2 holds (and counts) the first two appends' turns.
        await sessions.fork(tenant, session_id, 2, fork_id)
        assert await _counted(client, tenant, fork_id) == _size(*first, *second)

        # Compacting the first four turns empties three bodies (the system turn keeps its own).
        assert await sessions.compact(tenant, session_id, 3, 4, [0]) == 4
        assert await _counted(client, tenant, session_id) == _size(first[0], *third)
        assert await _counted(client, tenant, session_id) == await _stored(client, tenant, session_id)

        # A revert to version 2 drops the last turn and its bytes.
        await sessions.revert(tenant, session_id, 2, None)
        assert await _counted(client, tenant, session_id) == _size(first[0])
        assert await _counted(client, tenant, session_id) == await _stored(client, tenant, session_id)
    finally:
        await sessions.delete(tenant, session_id)
        await sessions.delete(tenant, fork_id)


async def test_an_append_past_the_cap_is_refused_and_stores_nothing(client) -> None:
    turn = msg(USER, "x" * 1000)
    cap = 3 * _size(turn)
    sessions = session_store.SessionStore(client, ttl_s=600, max_session_bytes=cap)
    tenant, session_id = "bytes", uuid.uuid4().hex
    try:
        await sessions.create(tenant, session_id)
        await sessions.append(tenant, session_id, 0, [turn, turn], {"counter": [5, 5]})
        before = await client.hgetall(session_store.key(tenant, session_id, "meta"))
        with pytest.raises(MeshgateError) as refused:
            await sessions.append(tenant, session_id, 1, [turn, turn], {"counter": [5, 5]}, turn_id="t1")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == Reason.SESSION_FULL
        assert refused.value.metadata == {
            "session_id": session_id,
            "unit": "bytes",
            "limit": str(cap),
            "bytes": str(2 * _size(turn)),
        }
        # Nothing of it stored: not a turn, a count, a version, a turn id or a history entry.
        after = await client.hgetall(session_store.key(tenant, session_id, "meta"))
        assert {k: v for k, v in after.items() if k != b"update_time_ms"} == {
            k: v for k, v in before.items() if k != b"update_time_ms"
        }
        assert len((await sessions.read(tenant, session_id)).turns) == 2
        assert not await client.hexists(session_store.key(tenant, session_id, "turn_ids"), "t1")
        assert await sessions.history(tenant, session_id) == [0, 2]
        # What still fits is appended: exactly up to the cap.
        assert (await sessions.append(tenant, session_id, 1, [turn], {}))[0] == 2
        assert await _counted(client, tenant, session_id) == cap
    finally:
        await sessions.delete(tenant, session_id)


async def test_concurrent_appends_near_the_cap_never_pass_it(client) -> None:
    turn = msg(USER, "y" * 500)
    fits = 10
    cap = fits * _size(turn) + _size(turn) // 2
    sessions = session_store.SessionStore(client, ttl_s=600, max_session_bytes=cap)
    tenant, session_id = "bytes", uuid.uuid4().hex
    try:
        await sessions.create(tenant, session_id)
        outcomes = await asyncio.gather(
            *(sessions.append(tenant, session_id, None, [turn], {}) for _ in range(3 * fits)),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, MeshgateError)]
        assert len(refused) == 2 * fits
        assert all(o.reason == Reason.SESSION_FULL for o in refused)
        assert await _counted(client, tenant, session_id) == fits * _size(turn)
        assert await _stored(client, tenant, session_id) == fits * _size(turn)
    finally:
        await sessions.delete(tenant, session_id)


async def test_a_session_stored_before_the_count_is_counted_by_its_next_append(client) -> None:
    tenant, session_id = "bytes", uuid.uuid4().hex
    old = [msg(USER, "z" * 600), msg(ASSISTANT, "w" * 600)]
    uncapped = session_store.SessionStore(client, ttl_s=600)
    try:
        await uncapped.create(tenant, session_id)
        await uncapped.append(tenant, session_id, 0, old, {})
        # As a session stored before this change: no count.
        await client.hdel(session_store.key(tenant, session_id, "meta"), "bytes")
        # Without a cap, nothing counts it (nor invents a count from 0).
        await uncapped.append(tenant, session_id, 1, [msg(USER, "hello")], {})
        assert await _counted(client, tenant, session_id) is None
        await uncapped.revert(tenant, session_id, 1, None)
        assert await _counted(client, tenant, session_id) is None

        new = msg(ASSISTANT, "v" * 100)
        capped = session_store.SessionStore(client, ttl_s=600, max_session_bytes=_size(*old) + _size(new))
        assert (await capped.append(tenant, session_id, None, [new], {}))[0] == 4
        assert await _counted(client, tenant, session_id) == _size(*old, new)
        # Counted from what it held, not from 0: the next turn would pass the cap.
        with pytest.raises(MeshgateError) as refused:
            await capped.append(tenant, session_id, None, [new], {})
        assert refused.value.metadata["bytes"] == str(_size(*old, new))
    finally:
        await uncapped.delete(tenant, session_id)


async def test_the_service_refuses_an_append_past_its_byte_cap(redis_url) -> None:
    settings = make_settings(redis_url)
    settings.context.max_session_bytes = 4096
    tenant = "bytes-service"
    async with running(settings) as capped:
        session_id = await new_session(capped, tenant)
        await append(capped, tenant, session_id, "q" * 1500, "a" * 1500)
        code, reason, metadata = await failure(append(capped, tenant, session_id, "q" * 1500))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
        assert (metadata["unit"], metadata["limit"]) == ("bytes", "4096")
        assert int(metadata["bytes"]) > 3000
        assert await contents(capped, tenant, session_id) == (1, ["q" * 1500, "a" * 1500])
        assert await append(capped, tenant, session_id, "q" * 500) == 2
