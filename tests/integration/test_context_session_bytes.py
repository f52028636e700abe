"""context.max_session_bytes over a real Redis: the session's byte count
(meta's ``bytes``, services/context/store.py) is kept by the scripts that
change its turns, an append past the cap is refused whole, concurrent
appends near the cap never pass it, a session stored before the count
is counted once, by the first append that needs it, the count never goes
below 0, and past half the cap the summarizer compacts by bytes, so a
session of big turns keeps taking appends."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redis.asyncio as redis

from meshgate import serving
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import store as session_store
from services.context.turn_index import TurnIndex
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
from tests.integration.test_context_versions import _settled, _until, append, contents

pytestmark = pytest.mark.integration


def _size(*turns) -> int:
    """What the turns take in Redis: their serialized encodings."""
    return sum(len(turn.SerializeToString()) for turn in turns)


def _counts(appended: session_store.Appended) -> tuple[int, bool, int | None]:
    """What an append reports about the count (not which life of the session it wrote)."""
    return appended.version, appended.replayed, appended.held_bytes


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


async def test_a_replayed_append_counts_once_and_a_pinned_turn_kept_through_compaction_counts(client) -> None:
    sessions = session_store.SessionStore(client, ttl_s=600, max_session_bytes=1 << 20)
    tenant, session_id = "bytes", uuid.uuid4().hex
    turns = [msg(USER, "Remember the harbour code 4417." * 10), msg(ASSISTANT, "Noted." * 30)]
    later = [msg(USER, "And the lighthouse?" * 20)]
    try:
        await sessions.create(tenant, session_id)
        # The append reports the count it left; its replay appends nothing and reports none.
        assert _counts(await sessions.append(tenant, session_id, 0, turns, {}, turn_id="once")) == (
            1,
            False,
            _size(*turns),
        )
        # The retry of the same append (same turn id) is answered, not applied: counted once.
        assert _counts(await sessions.append(tenant, session_id, None, turns, {}, turn_id="once")) == (
            1,
            True,
            None,
        )
        assert await _counted(client, tenant, session_id) == _size(*turns)
        await sessions.append(tenant, session_id, 1, later, {})

        # Turn 0 pinned: its body stays through compaction, and so do its bytes.
        await TurnIndex(client, ttl_s=600).pin(tenant, session_id, "t:0", 0)
        assert await sessions.compact(tenant, session_id, 2, 2, []) == 2
        assert await _counted(client, tenant, session_id) == _size(turns[0], *later)
        assert await _counted(client, tenant, session_id) == await _stored(client, tenant, session_id)
    finally:
        await sessions.delete(tenant, session_id)


async def test_turns_an_older_replica_appended_uncounted_never_take_the_count_below_0(client) -> None:
    sessions = session_store.SessionStore(client, ttl_s=600, max_session_bytes=1 << 20)
    tenant, session_id = "bytes", uuid.uuid4().hex
    first, second = [msg(USER, "a" * 300)], [msg(ASSISTANT, "b" * 900), msg(USER, "c" * 900)]
    meta = session_store.key(tenant, session_id, "meta")
    try:
        await sessions.create(tenant, session_id)
        await sessions.append(tenant, session_id, 0, first, {})
        await sessions.append(tenant, session_id, 1, second, {})
        # As if an older replica had appended `second`: its turns stored, never counted.
        await client.hset(meta, "bytes", _size(*first))
        # The revert drops more than the count holds: 0, not negative.
        await sessions.revert(tenant, session_id, 1, None)
        assert await _counted(client, tenant, session_id) == 0
        await sessions.append(tenant, session_id, None, second, {})
        await client.hset(meta, "bytes", 100)
        # Compaction alike.
        assert await sessions.compact(tenant, session_id, 3, 3, []) == 3
        assert await _counted(client, tenant, session_id) == 0
    finally:
        await sessions.delete(tenant, session_id)


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
        # Without a cap, nothing counts it (nor invents a count from 0), nor reports one.
        assert (await uncapped.append(tenant, session_id, 1, [msg(USER, "hello")], {})).held_bytes is None
        assert await _counted(client, tenant, session_id) is None
        await uncapped.revert(tenant, session_id, 1, None)
        assert await _counted(client, tenant, session_id) is None

        new = msg(ASSISTANT, "v" * 100)
        capped = session_store.SessionStore(client, ttl_s=600, max_session_bytes=_size(*old) + _size(new))
        assert _counts(await capped.append(tenant, session_id, None, [new], {})) == (
            4,
            False,
            _size(*old, new),
        )
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


async def test_a_session_too_large_to_send_is_refused_with_error_info(redis_url, client) -> None:
    """With no byte cap (0), a session may outgrow one gRPC answer: GetSession
    says so, where gRPC ended the call without ErrorInfo. Within the cap it
    cannot (ContextSettings refuses a cap above MAX_READABLE_SESSION_BYTES)."""
    settings = make_settings(redis_url)
    settings.context.max_session_bytes = 0
    tenant = "bytes-too-large"
    async with running(settings) as uncapped:
        session_id = await new_session(uncapped, tenant)
        # Stored straight (the service's appends would count every turn's
        # tokens, 40 s of CPU for these 36 MiB): what GetSession reads is the same.
        turn = msg(USER, "x" * (1 << 20))
        await session_store.SessionStore(client, ttl_s=600).append(tenant, session_id, None, [turn] * 36, {})
        code, reason, metadata = await failure(
            uncapped.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
        )
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE")
    assert int(metadata["bytes"]) > int(metadata["limit"]) == serving.MAX_MESSAGE_BYTES


def _compacting(redis_url: str, cap: int):
    """Settings whose summarizer (extractive) spans and hot window are 2
    turns, so that a session of a few big turns is compacted by bytes."""
    settings = make_settings(redis_url)
    settings.context.max_session_bytes = cap
    settings.context.summary_model = ""
    settings.context.summary_span_turns = 2
    settings.context.summary_hot_window_turns = 2
    return settings


async def test_a_session_stored_past_a_lowered_cap_is_compacted_and_takes_appends_again(
    redis_url, client
) -> None:
    """A session stored under a larger cap (the default went from 64 to 24
    MiB) is past the new one: its next append is refused, and before, only
    an append that succeeded started the summarizer, so it stayed full."""
    settings = _compacting(redis_url, 10 * _size(msg(USER, "q" * 1000)))
    tenant = "bytes-lowered-cap"
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        turns = [msg(USER if i % 2 == 0 else ASSISTANT, f"{i}" + "q" * 999) for i in range(12)]
        await session_store.SessionStore(client, ttl_s=600).append(tenant, session_id, None, turns, {})
        code, reason, _ = await failure(append(stub, tenant, session_id, "hi", "there"))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")

        get = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)

        async def compacted() -> bool:
            return (await stub.GetSession(get)).session.compacted_turns > 0

        await _until(compacted, timeout_s=30)
        assert await append(stub, tenant, session_id, "hi", "there") == 2


async def test_a_session_of_big_turns_is_compacted_by_bytes_and_keeps_taking_appends(
    redis_url, client
) -> None:
    """Turns of ~1 KiB, far under the turn soft cap: compaction starts by
    bytes, past half the cap, so the session takes many times what the cap
    alone would allow, its newest turns verbatim, its oldest summarized."""
    cap = 8 * _size(msg(USER, "q" * 1000))
    settings = _compacting(redis_url, cap)
    tenant = "bytes-compaction"
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        get = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)

        async def within_half_the_cap() -> bool:
            return await _counted(client, tenant, session_id) <= cap // 2

        # 40 turns, 5 times what the cap holds: every append succeeds once
        # the summarizer's run after the one before has compacted.
        for k in range(20):
            assert await append(stub, tenant, session_id, f"{k}" + "q" * 999, f"{k}" + "a" * 999) == k + 1
            await _until(within_half_the_cap, timeout_s=30)
        session = (await stub.GetSession(get)).session
        assert session.version == 20
        assert session.compacted_turns >= 40 - 4
        texts = [m.content for m in session.messages]
        assert texts[-2:] == ["19" + "q" * 999, "19" + "a" * 999]
        assert texts[: session.compacted_turns] == [""] * session.compacted_turns
        assert await _counted(client, tenant, session_id) == await _stored(client, tenant, session_id)
        # The compacted turns are covered by summaries, which stand for them.
        spans = await client.hkeys(session_store.key(tenant, session_id, "summaries"))
        ends = {int(field.decode().partition("-")[2]) for field in spans}
        assert session.compacted_turns in ends


async def test_unpinning_a_turn_compaction_kept_compacts_it_and_frees_its_bytes_on_every_replica(
    redis_url, client
) -> None:
    """Compaction keeps a pinned turn's body (and its bytes); unpinned, the
    turn was left verbatim for good: counted against the cap, its text in
    GetSession though no prompt could use it. Its unpin now empties it as
    the compaction would have, in one script: the count drops by its bytes,
    no version is made (as for a compaction, or any pin), and another
    replica's hot copy shows it empty too. A system turn keeps its body
    pinned or not, and an emptied turn cannot be pinned again."""
    settings = _compacting(redis_url, 8 * _size(msg(USER, "q" * 1000)))
    tenant = "bytes-unpin"
    system, pinned = msg(SYSTEM, "You answer tersely."), msg(USER, "pinned" + "p" * 994)
    async with running(settings) as stub, running(settings) as other:
        session_id = await new_session(stub, tenant, system, pinned)
        for index in (0, 1):
            await stub.PinToSession(
                pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=index)
            )
        get = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)

        async def compacted_past_the_pins() -> bool:
            return (await stub.GetSession(get)).session.compacted_turns > 2

        for k in range(1, 6):
            await append(stub, tenant, session_id, f"{k}" + "q" * 999, f"{k}" + "a" * 999)
        await _until(compacted_past_the_pins, timeout_s=30)
        await _settled(client)
        version, texts = await contents(stub, tenant, session_id)
        assert texts[:3] == [system.content, pinned.content, ""]
        # Hot on the other replica, pinned turn and all.
        assert (await contents(other, tenant, session_id))[1][1] == pinned.content
        held = await _counted(client, tenant, session_id)
        assert held == await _stored(client, tenant, session_id)

        unpin = pb.UnpinFromSessionRequest(tenant_id=tenant, session_id=session_id, message_index=1)
        assert (await stub.UnpinFromSession(unpin)).pin_count == 1
        assert await contents(stub, tenant, session_id) == (version, [system.content, "", *texts[2:]])
        assert await _counted(client, tenant, session_id) == held - _size(pinned)
        assert await _counted(client, tenant, session_id) == await _stored(client, tenant, session_id)

        async def emptied_on_the_other_replica() -> bool:
            return (await contents(other, tenant, session_id))[1][1] == ""

        await _until(emptied_on_the_other_replica)

        # The system turn keeps its body (and bytes) unpinned, as compaction keeps it.
        unpin.message_index = 0
        assert (await stub.UnpinFromSession(unpin)).pin_count == 0
        assert (await contents(stub, tenant, session_id))[1][0] == system.content
        assert await _counted(client, tenant, session_id) == held - _size(pinned)
        # The emptied turn's text is gone: pinning it again is refused, not a pin of nothing.
        pin = stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=1)
        )
        assert (await failure(pin))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_COMPACTED")
