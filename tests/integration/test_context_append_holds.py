"""Append holds over a real Redis (services/context/store.py, ``_HOLD``):
an assembly's append_reservation with a hold_id holds its room until its
append, so that assemblies at once on a nearly full session are checked
against each other's holds; the append releases its own hold, whatever it
answers, and counts no hold; a hold never appended (its router killed
mid-turn) expires and gives its room back; a lone turn is checked as
before the holds."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as redis

from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context.store import MAX_APPEND_HOLD_MS, SessionStore, holds_key
from tests.integration.test_context_service import (
    ASSISTANT,
    USER,
    failure,
    make_settings,
    msg,
    new_session,
    running,
)
from tests.integration.test_context_versions import append, assemble, contents

pytestmark = pytest.mark.integration

HOUR_MS = 3600 * 1000


def holding(hold_id: str, turn_count: int = 2, size_bytes: int = 10, hold_for_ms: int = HOUR_MS) -> dict:
    return {
        "append_reservation": pb.AppendReservation(
            turn_count=turn_count, size_bytes=size_bytes, hold_id=hold_id, hold_for_ms=hold_for_ms
        )
    }


@pytest.fixture
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _full_refusal(call) -> dict[str, str]:
    code, reason, metadata = await failure(call)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
    return metadata


# --- the scripts, through the store ------------------------------------------


async def test_holds_count_against_the_caps_until_their_appends_release_them(client, tenant) -> None:
    store = SessionStore(client, ttl_s=600, max_turns=6)
    await store.create(tenant, "s")
    await store.append(tenant, "s", None, [msg(USER, "t0"), msg(ASSISTANT, "t0")], {})
    # Room for 4 more turns: two holds of 2 fit, a third does not.
    await store.hold_room(tenant, "s", "a", HOUR_MS, 2, 10)
    await store.hold_room(tenant, "s", "b", HOUR_MS, 2, 10)
    with pytest.raises(MeshgateError) as refused:
        await store.hold_room(tenant, "s", "c", HOUR_MS, 2, 10)
    assert refused.value.reason == Reason.SESSION_FULL
    assert refused.value.metadata == {
        "session_id": "s",
        "unit": "turns",
        "limit": "6",
        "turns": "2",
        "max_turns": "6",
        "in_flight_turns": "4",
    }
    # A resend of a hold replaces it rather than holding twice.
    await store.hold_room(tenant, "s", "a", HOUR_MS, 2, 10)
    # The append of "a" lands (no hold counted against it) and releases its
    # hold: still no room for "c" (a's turns are stored now).
    await store.append(tenant, "s", None, [msg(USER, "a"), msg(ASSISTANT, "a")], {}, turn_id="a")
    assert set(await client.hkeys(holds_key(tenant, "s"))) == {b"b"}
    with pytest.raises(MeshgateError):
        await store.hold_room(tenant, "s", "c", HOUR_MS, 2, 10)
    # Released without an append (its turn failed): room for "c".
    await store.release_hold(tenant, "s", "b")
    await store.hold_room(tenant, "s", "c", HOUR_MS, 2, 10)


async def test_an_append_refused_releases_its_hold_and_one_without_a_hold_counts_none(client, tenant) -> None:
    store = SessionStore(client, ttl_s=600, max_turns=4)
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "a", HOUR_MS, 2, 10)
    await store.hold_room(tenant, "s", "b", HOUR_MS, 2, 10)
    # An append with no hold of its own (a direct AppendTurns) lands where
    # the caps allow, as before the holds.
    await store.append(tenant, "s", None, [msg(USER, "x"), msg(ASSISTANT, "x")], {})
    await store.append(tenant, "s", None, [msg(USER, "a"), msg(ASSISTANT, "a")], {}, turn_id="a")
    with pytest.raises(MeshgateError) as refused:
        await store.append(tenant, "s", None, [msg(USER, "b"), msg(ASSISTANT, "b")], {}, turn_id="b")
    assert refused.value.reason == Reason.SESSION_FULL
    # Refused for good: its hold goes with it, and the key with the last.
    assert await client.exists(holds_key(tenant, "s")) == 0


async def test_the_byte_cap_counts_the_bytes_held(client, tenant) -> None:
    store = SessionStore(client, ttl_s=600, max_session_bytes=100)
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "a", HOUR_MS, 2, 60)
    with pytest.raises(MeshgateError) as refused:
        await store.hold_room(tenant, "s", "b", HOUR_MS, 2, 41)
    assert refused.value.metadata == {
        "session_id": "s",
        "unit": "bytes",
        "limit": "100",
        "bytes": "0",
        "in_flight_bytes": "60",
    }
    await store.hold_room(tenant, "s", "b", HOUR_MS, 2, 40)


async def test_a_hold_never_appended_expires_and_gives_its_room_back(client, tenant) -> None:
    """Its router killed mid-turn: nothing releases it but its own time."""
    store = SessionStore(client, ttl_s=600, max_turns=2)
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "killed", HOUR_MS, 2, 10)
    with pytest.raises(MeshgateError):
        await store.hold_room(tenant, "s", "next", HOUR_MS, 2, 10)
    # Its key lives no longer than its hold; more than MAX_APPEND_HOLD_MS is taken as that.
    assert 0 < await client.pttl(holds_key(tenant, "s")) <= HOUR_MS
    await store.hold_room(tenant, "s", "long", 100 * HOUR_MS, 0, 0)
    assert await client.pttl(holds_key(tenant, "s")) <= MAX_APPEND_HOLD_MS
    await store.release_hold(tenant, "s", "long")
    # The hour passes (the test moves the hold's end into the past, for
    # Redis's clock is not the test's to move): the room is free again, and
    # the spent hold is gone.
    until, *rest = (await client.hget(holds_key(tenant, "s"), "killed")).split(b" ")
    await client.hset(holds_key(tenant, "s"), "killed", b" ".join([b"1", *rest]))
    await store.hold_room(tenant, "s", "next", HOUR_MS, 2, 10)
    assert set(await client.hkeys(holds_key(tenant, "s"))) == {b"next"}
    # And by Redis's own clock: a short hold lapses on its own.
    await store.release_hold(tenant, "s", "next")
    await store.hold_room(tenant, "s", "short", 50, 2, 10)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            await store.hold_room(tenant, "s", "after", HOUR_MS, 2, 10)
            break
        except MeshgateError:
            assert asyncio.get_running_loop().time() < deadline, "a 50 ms hold still held after 10 s"
            await asyncio.sleep(0.05)


async def test_a_hold_whose_turn_an_older_replica_stored_holds_nothing(client, tenant) -> None:
    """An append by a context replica of before the holds (a rolling
    upgrade) stores its turn but leaves its hold: the turn's id among the
    applied ones ends it, rather than its room staying held twice over."""
    store = SessionStore(client, ttl_s=600, max_turns=4)
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "upgraded", HOUR_MS, 2, 10)
    left = await client.hget(holds_key(tenant, "s"), "upgraded")
    await store.append(tenant, "s", None, [msg(USER, "q0"), msg(ASSISTANT, "a0")], {}, turn_id="upgraded")
    await client.hset(holds_key(tenant, "s"), "upgraded", left)  # as the older _APPEND leaves it
    # 2 stored and 2 asked fit 4: the stored turn's hold is not counted.
    await store.hold_room(tenant, "s", "next", HOUR_MS, 2, 10)
    assert set(await client.hkeys(holds_key(tenant, "s"))) == {b"next"}


async def test_a_resent_hold_refused_leaves_none_of_its_first(client, tenant) -> None:
    """An assembly whose reply was lost after its hold was written is sent
    again; if another turn took the room in between, the resend is refused,
    and the first hold must not keep the room until it expires."""
    store = SessionStore(client, ttl_s=600, max_turns=4)
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "resent", HOUR_MS, 2, 10)
    await store.hold_room(tenant, "s", "other", HOUR_MS, 2, 10)
    with pytest.raises(MeshgateError):
        await store.hold_room(tenant, "s", "resent", HOUR_MS, 3, 10)
    assert set(await client.hkeys(holds_key(tenant, "s"))) == {b"other"}


async def test_a_session_made_again_under_its_id_has_none_of_its_earlier_lifes_holds(client, tenant) -> None:
    """The holds are not one of the session's parts (its deletion leaves
    them to expire): each keeps the life it was made in (create_time_ms)."""
    store = SessionStore(client, ttl_s=600, max_turns=4)
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "dead", HOUR_MS, 2, 10)
    await store.delete(tenant, "s")
    await asyncio.sleep(0.01)  # another millisecond: another create_time_ms
    await store.create(tenant, "s")
    await store.hold_room(tenant, "s", "new", HOUR_MS, 4, 10)
    assert set(await client.hkeys(holds_key(tenant, "s"))) == {b"new"}


# --- through the context service ----------------------------------------------


async def test_assemblies_at_once_on_a_nearly_full_session_hold_room_for_each_other(
    redis_url, tenant
) -> None:
    settings = make_settings(redis_url)
    settings.context.max_turns = 4
    async with running(settings) as stub, running(settings) as other:
        session_id = await new_session(stub, tenant)
        await append(stub, tenant, session_id, "q0", "a0")
        # Room for one turn of two messages: of six assemblies at once,
        # through two replicas, one is granted, the rest refused up front.
        outcomes = await asyncio.gather(
            *(
                assemble(replica, tenant, session_id, **holding(f"turn{n}"))
                for n, replica in enumerate([stub, other] * 3)
            ),
            return_exceptions=True,
        )
        granted = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, pb.AssembleContextResponse)]
        assert len(granted) == 1, outcomes
        for outcome in outcomes:
            if not isinstance(outcome, pb.AssembleContextResponse):
                assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        # The granted turn appends (its hold released by its append); no room after it.
        request = pb.AppendTurnsRequest(
            tenant_id=tenant,
            session_id=session_id,
            any_version=True,
            turn_id=f"turn{granted[0]}",
            messages=[msg(USER, "q1"), msg(ASSISTANT, "a1")],
        )
        assert (await stub.AppendTurns(request)).version == 2
        assert await contents(stub, tenant, session_id) == (2, ["q0", "a0", "q1", "a1"])
        metadata = await _full_refusal(assemble(other, tenant, session_id, **holding("late")))
        assert (metadata["turns"], "in_flight_turns" in metadata) == ("4", False)


async def test_a_turn_that_ended_without_its_append_releases_its_room(redis_url, tenant) -> None:
    settings = make_settings(redis_url)
    settings.context.max_turns = 4
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append(stub, tenant, session_id, "q0", "a0")
        await assemble(stub, tenant, session_id, **holding("failed"))
        metadata = await _full_refusal(assemble(stub, tenant, session_id, **holding("next")))
        assert (metadata["turns"], metadata["in_flight_turns"]) == ("2", "2")
        release = pb.ReleaseAppendHoldRequest(tenant_id=tenant, session_id=session_id, hold_id="failed")
        await stub.ReleaseAppendHold(release)
        await stub.ReleaseAppendHold(release)  # idempotent
        assert (await assemble(stub, tenant, session_id, **holding("next"))).session_version == 1


async def test_a_lone_turn_near_the_cap_is_checked_as_before(redis_url, tenant) -> None:
    """A hold changes nothing for a turn with none beside it: room for
    exactly its turns is granted, one more is refused, as the append would."""
    settings = make_settings(redis_url)
    settings.context.max_turns = 4
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append(stub, tenant, session_id, "q0", "a0")
        metadata = await _full_refusal(assemble(stub, tenant, session_id, **holding("three", turn_count=3)))
        assert metadata == {
            "session_id": session_id,
            "unit": "turns",
            "limit": "4",
            "turns": "2",
            "max_turns": "4",
        }
        assert (await assemble(stub, tenant, session_id, **holding("two"))).session_version == 1
        assert await append(stub, tenant, session_id, "q1", "a1") == 2


async def test_a_session_far_from_its_caps_holds_nothing(redis_url, tenant) -> None:
    """Under half of every cap, with the reservation, no hold is written:
    the turns in flight would have to ask for half a cap together to pass
    it, and the assembly of a warm session stays without a Redis call."""
    settings = make_settings(redis_url)
    settings.context.max_turns = 10
    client = redis.Redis.from_url(redis_url)
    try:
        async with running(settings) as stub:
            session_id = await new_session(stub, tenant)
            await append(stub, tenant, session_id, "q0", "a0")
            await assemble(stub, tenant, session_id, **holding("far"))  # 2 + 2 of 10
            assert await client.exists(holds_key(tenant, session_id)) == 0
            await append(stub, tenant, session_id, "q1", "a1")
            await assemble(stub, tenant, session_id, **holding("near"))  # 4 + 2 of 10
            assert set(await client.hkeys(holds_key(tenant, session_id))) == {b"near"}
    finally:
        await client.aclose()


async def test_a_negative_hold_is_refused(redis_url, tenant) -> None:
    async with running(make_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant)
        code, reason, _ = await failure(assemble(stub, tenant, session_id, **holding("x", hold_for_ms=-1)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_APPEND_RESERVATION")
