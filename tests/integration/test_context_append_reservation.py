"""AssembleContext's append_reservation over a real Redis: an assembly for a
turn whose append would be refused is refused as that append would be (the
same code and ErrorInfo: VERSION_CONFLICT first, then SESSION_FULL), from
wherever the session is read (a hot session's memory, with no Redis round
trip; the turn index; a whole read), on the same caps and counts as the
append: compaction frees turns and bytes for both alike, a session whose
bytes were never counted is left to its append, and a hot copy takes the
count its append made."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshgate.context.v1 import context_service_pb2 as pb
from services.context import store as session_store
from tests.integration.test_context_service import (
    ASSISTANT,
    MODEL,
    USER,
    failure,
    make_settings,
    msg,
    new_session,
    running,
)
from tests.integration.test_context_versions import (
    _data_commands,
    _own_redis,
    _reads_nothing,
    _settled,
    _until,
    append,
    assemble,
    contents,
)

pytestmark = pytest.mark.integration


def reserving(turn_count: int, size_bytes: int, expected_version: int | None = None) -> dict:
    reservation = pb.AppendReservation(turn_count=turn_count, size_bytes=size_bytes)
    if expected_version is not None:
        reservation.expected_version = expected_version
    return {"append_reservation": reservation}


def _size(*texts: str) -> int:
    """What turns of these texts take in the session (alternating user and assistant)."""
    return sum(msg(USER if i % 2 == 0 else ASSISTANT, t).ByteSize() for i, t in enumerate(texts))


async def test_the_turn_cap_refuses_up_front_as_the_append_does_from_every_read_path(
    tmp_path, tenant
) -> None:
    settings = make_settings("")
    settings.context.max_turns = 4
    async with _own_redis(tmp_path) as (url, client):
        settings.redis.url = url
        async with running(settings) as stub, running(settings) as cold:
            session_id = await new_session(stub, tenant)
            # Room for this turn: it is assembled as ever.
            assert (await assemble(stub, tenant, session_id, **reserving(2, 10))).session_version == 0
            await append(stub, tenant, session_id, "q0", "a0")
            await append(stub, tenant, session_id, "q1", "a1")
            code, reason, appended = await failure(append(stub, tenant, session_id, "q2", "a2"))
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")

            # The replica that appended holds the session hot (once its
            # change notices flow): the refusal then reads nothing from Redis.
            async def refused() -> None:
                outcome = await failure(assemble(stub, tenant, session_id, **reserving(2, 10)))
                assert outcome == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL", appended)

            await _until(lambda: _reads_nothing(client, refused))
            # A replica that never read it plans from the turn index.
            assert await failure(assemble(cold, tenant, session_id, **reserving(2, 10))) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "SESSION_FULL",
                appended,
            )
            # A fork (no turn index of its own) is read whole.
            await stub.ForkSession(
                pb.ForkSessionRequest(
                    tenant_id=tenant, session_id=session_id, version=2, new_session_id="fork"
                )
            )
            code, reason, forked = await failure(assemble(cold, tenant, "fork", **reserving(2, 10)))
            assert (code, reason, forked["turns"], forked["limit"]) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "SESSION_FULL",
                "4",
                "4",
            )
            # What still fits is not refused, and nothing stored changed.
            assert (await assemble(cold, tenant, session_id, **reserving(0, 0))).session_version == 2
            assert await contents(stub, tenant, session_id) == (2, ["q0", "a0", "q1", "a1"])

            # Compaction frees live turns for both checks alike (once its
            # notice has reached the replicas holding the session hot).
            sessions = session_store.SessionStore(client, ttl_s=600)
            assert await sessions.compact(tenant, session_id, 2, 2, []) == 2

            async def fits() -> bool:
                try:
                    await assemble(stub, tenant, session_id, **reserving(2, 10))
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False
                return True

            await _until(fits)
            assert await append(stub, tenant, session_id, "q2", "a2") == 3


async def test_the_byte_cap_refuses_up_front_as_the_append_does(tmp_path, tenant) -> None:
    settings = make_settings("")
    settings.context.max_session_bytes = 4096
    async with _own_redis(tmp_path) as (url, client):
        settings.redis.url = url
        async with running(settings) as stub, running(settings) as cold:
            session_id = await new_session(stub, tenant)
            await append(stub, tenant, session_id, "q" * 1000, "a" * 1000)

            # Hot (once change notices flow): after the next append the
            # replica holds it again (its entry extended, or read back by the
            # prefetch the append starts), and the check reads nothing.
            await _until(lambda: _reads_nothing(client, lambda: assemble(stub, tenant, session_id)))
            await append(stub, tenant, session_id, "q" * 500, "a" * 500)
            held = _size("q" * 1000, "a" * 1000, "q" * 500, "a" * 500)
            room = 4096 - held
            # A session's first refusal at what it holds starts a summarizer
            # run (servicer._compacting_when_full), which reads it in the
            # background: settled before the count.
            await failure(assemble(stub, tenant, session_id, **reserving(1, room + 1)))
            before = await _settled(client)
            # Up to the cap exactly: assembled; a byte more: refused; from memory.
            assert (await assemble(stub, tenant, session_id, **reserving(1, room))).session_version == 2
            code, reason, reserved = await failure(
                assemble(stub, tenant, session_id, **reserving(1, room + 1))
            )
            assert await _data_commands(client) == before
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
            assert reserved == {
                "session_id": session_id,
                "unit": "bytes",
                "limit": "4096",
                "bytes": str(held),
            }
            # A replica that never read it plans from the turn index: the same
            # count read there, the same refusal.
            assert await failure(assemble(cold, tenant, session_id, **reserving(1, room + 1))) == (
                code,
                reason,
                reserved,
            )
            # The append of that many bytes is refused with the very same ErrorInfo.
            overhead = _size("q" * room) - room
            too_big = "q" * (room + 1 - overhead)
            assert _size(too_big) == room + 1
            assert await failure(append(stub, tenant, session_id, too_big)) == (code, reason, reserved)
            assert (await contents(stub, tenant, session_id))[0] == 2


async def test_a_tenant_its_bound_refused_is_refused_up_front_from_memory(
    tmp_path, tenant, monkeypatch
) -> None:
    """context.max_bytes_per_tenant is counted in a record the assembly does
    not read: the replica remembers the tenant its record refused, with what
    it held, and refuses reservations past the bound on that, reading
    nothing; what later calls there find it holds replaces that, and the
    memory lapses after store.QUOTA_REFUSAL_KEPT_S."""
    monkeypatch.setattr(session_store, "QUOTA_REFUSAL_KEPT_S", 2.0)
    settings = make_settings("")
    # Two sessions, room for one turn of 2 KB and not for two.
    bound = 6976 + 2 * session_store.SESSION_OVERHEAD_BYTES
    settings.context.max_bytes_per_tenant = bound
    async with _own_redis(tmp_path) as (url, client):
        settings.redis.url = url
        async with running(settings) as stub, running(settings) as cold:
            spare = await new_session(stub, tenant)
            session_id = await new_session(stub, tenant)
            await append(stub, tenant, session_id, "q" * 1000, "a" * 1000)
            await _until(lambda: _reads_nothing(client, lambda: assemble(stub, tenant, session_id)))
            code, reason, at_append = await failure(append(stub, tenant, session_id, "q" * 1000, "a" * 1000))
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
            held = int(at_append["bytes"])
            # A turn of two messages counts 1,024 bytes each beside its own.
            room = bound - held - 2 * session_store.TURN_OVERHEAD_BYTES

            # Up to the bound on what it held: assembled; a byte more:
            # refused as the append was, from memory (the session is hot).
            assert (await assemble(stub, tenant, session_id, **reserving(2, room))).session_version == 1
            before = await _settled(client)
            refused = await failure(assemble(stub, tenant, session_id, **reserving(2, room + 1)))
            assert await _data_commands(client) == before
            assert refused == (code, reason, at_append)
            # A replica whose record never refused the tenant leaves it to the append.
            assert (await assemble(cold, tenant, session_id, **reserving(2, room + 1))).session_version == 1

            # A delete on the replica gives its bytes back there at once.
            await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=spare))
            room += session_store.SESSION_OVERHEAD_BYTES
            assert (await assemble(stub, tenant, session_id, **reserving(2, room))).session_version == 1
            refused = await failure(assemble(stub, tenant, session_id, **reserving(2, room + 1)))
            freed = str(held - session_store.SESSION_OVERHEAD_BYTES)
            assert refused == (code, reason, {**at_append, "bytes": freed})
            # Past QUOTA_REFUSAL_KEPT_S, nothing is believed: left to the append.
            await asyncio.sleep(2.0)
            assert (await assemble(stub, tenant, session_id, **reserving(2, room + 1))).session_version == 1


async def test_a_session_whose_bytes_were_never_counted_is_left_to_its_append(tmp_path, tenant) -> None:
    settings = make_settings("")
    settings.context.max_session_bytes = 4096
    async with _own_redis(tmp_path) as (url, client):
        settings.redis.url = url
        async with running(settings) as stub:
            session_id = await new_session(stub, tenant)
            await append(stub, tenant, session_id, "q" * 1500, "a" * 1500)
            # As a session stored before the count: meta has no bytes.
            await client.hdel(session_store.key(tenant, session_id, "meta"), "bytes")
            async with running(settings) as fresh:
                # Not guessed at: assembled, and the append counts it and decides.
                assert (await assemble(fresh, tenant, session_id, **reserving(1, 2000))).session_version == 1

                # That assembly's prefetch holds it hot, uncounted as read
                # (before the append below counts it in Redis, changing no
                # version: the copy stands).
                await _until(lambda: _reads_nothing(client, lambda: assemble(fresh, tenant, session_id)))
                code, reason, metadata = await failure(append(fresh, tenant, session_id, "q" * 1990))
                assert (code, reason, metadata["bytes"]) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "SESSION_FULL",
                    str(_size("q" * 1500, "a" * 1500)),
                )
                # After an append that fits, the replica holds it hot again
                # with the count that append's script made (its copy extended,
                # or read back by the prefetch the append starts): from then
                # on it is checked by bytes, from memory.
                assert await append(fresh, tenant, session_id, "q" * 10) == 2
                held = _size("q" * 1500, "a" * 1500, "q" * 10)
                # The first refusal at this amount starts a summarizer run
                # (servicer._compacting_when_full): settled before the count.
                await failure(assemble(fresh, tenant, session_id, **reserving(1, 4096 - held + 1)))
                before = await _settled(client)
                refused = await failure(assemble(fresh, tenant, session_id, **reserving(1, 4096 - held + 1)))
                assert await _data_commands(client) == before
                assert refused == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "SESSION_FULL",
                    {"session_id": session_id, "unit": "bytes", "limit": "4096", "bytes": str(held)},
                )


async def test_a_stale_expected_version_is_refused_first_as_the_append_refuses_it(redis_url, tenant) -> None:
    settings = make_settings(redis_url)
    settings.context.max_turns = 2
    async with running(settings) as stub, running(settings) as cold:
        session_id = await new_session(stub, tenant)
        # At version 0, not full: the version alone refuses it.
        conflict = await failure(assemble(stub, tenant, session_id, **reserving(2, 10, expected_version=3)))
        assert conflict == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT", {"current_version": "0"})
        await append(stub, tenant, session_id, "q0", "a0")
        # Full and at version 1: an append expecting version 0 is told of
        # the version, not of the cap, and so is the assembly reserving it,
        # from a replica that appended and from one that never read it.
        stale = await failure(append(stub, tenant, session_id, "q1", "a1", version=0))
        assert stale == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT", {"current_version": "1"})
        for replica in (stub, cold):
            reserved = reserving(2, 10, expected_version=0)
            assert await failure(assemble(replica, tenant, session_id, **reserved)) == stale
        # At its version, the cap decides, for both alike.
        full = await failure(append(stub, tenant, session_id, "q1", "a1", version=1))
        assert full[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
        reserved = reserving(2, 10, expected_version=1)
        assert await failure(assemble(cold, tenant, session_id, **reserved)) == full
        assert await contents(stub, tenant, session_id) == (1, ["q0", "a0"])


@pytest.mark.parametrize(
    ("fields", "session", "refusal"),
    [
        (reserving(-1, 0), True, "INVALID_APPEND_RESERVATION"),
        (reserving(1, -5), True, "INVALID_APPEND_RESERVATION"),
        (reserving(1, 10), False, "INVALID_APPEND_RESERVATION"),
        ({**reserving(1, 10), "at_version": 0}, True, "INVALID_APPEND_RESERVATION"),
        (reserving(1, 10, expected_version=-1), True, "INVALID_VERSION"),
    ],
)
async def test_a_reservation_that_cannot_be_checked_is_invalid(
    redis_url, tenant, fields, session, refusal
) -> None:
    async with running(make_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant) if session else ""
        request = pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=session_id,
            new_messages=[msg(USER, "and now?")],
            model=MODEL,
            max_prompt_tokens=400,
            **fields,
        )
        code, reason, _ = await failure(stub.AssembleContext(request))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, refusal)
