"""What context.max_bytes_per_tenant counts of a session beside its turns,
through the real context service (gRPC) over a real Redis: its pins and its
summaries, each as what it holds now (store.BESIDE_TURNS), so an unpin gives
its bytes back and summaries written in the background take the tenant's room."""

from __future__ import annotations

import uuid

import grpc
import pytest

from meshgate.context.v1 import context_service_pb2 as pb
from services.context import store as session_store
from tests.integration.test_context_service import ASSISTANT, USER, failure, make_settings, msg, running
from tests.integration.test_context_versions import _until

pytestmark = pytest.mark.integration

FACT = "f" * 4000


def bounded(redis_url: str, max_bytes_per_tenant: int):
    settings = make_settings(redis_url)
    settings.context.max_bytes_per_tenant = max_bytes_per_tenant
    return settings


async def counted(client, tenant: str) -> dict[bytes, int]:
    """The tenant's record (store.TenantHoldings): its fields as numbers."""
    record = await client.hgetall(session_store.holdings_key(tenant, "bytes"))
    return {field: int(value) for field, value in record.items()}


async def test_an_unpin_gives_the_pins_bytes_back(redis_url, redis_client) -> None:
    """Unpins gave nothing back until the session was deleted or expired:
    a tenant bounded at 20,000 bytes that pinned and unpinned a 4 KB fact
    four times was counted 16,520 bytes for an empty session with no pin,
    and its fifth pin was refused SESSION_QUOTA_EXCEEDED. Pinning what the
    session held pinned already counted its bytes once more each time."""
    tenant = f"holdings-{uuid.uuid4().hex[:8]}"
    async with running(bounded(redis_url, 20_000)) as stub:
        created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
        here = {"tenant_id": tenant, "session_id": created.session.session_id}
        empty = await counted(redis_client, tenant)
        assert empty[b"total"] == session_store.SESSION_OVERHEAD_BYTES
        for _ in range(10):
            await stub.PinToSession(pb.PinToSessionRequest(**here, fact=FACT))
            await stub.PinToSession(pb.PinToSessionRequest(**here, fact=FACT))
            pinned = (await counted(redis_client, tenant))[b"total"]
            assert pinned == empty[b"total"] + len(f"f:{FACT}") + session_store.PIN_OVERHEAD_BYTES
            await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**here, fact=FACT))
            assert await counted(redis_client, tenant) == empty
        # What the bound refuses is what the session holds: five facts do not fit.
        for n in range(4):
            await stub.PinToSession(pb.PinToSessionRequest(**here, fact=f"{n}{FACT}"))
        code, reason, metadata = await failure(stub.PinToSession(pb.PinToSessionRequest(**here, fact=FACT)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
        assert int(metadata["bytes"]) == (await counted(redis_client, tenant))[b"total"]


async def test_a_sessions_summaries_are_counted_once_written(redis_url, redis_client) -> None:
    """A session's summaries (its summaries hash, and each one's content key
    beside it) took Redis memory that the tenant's count left out, so a
    tenant could hold its bound in turns and their summaries on top. They
    are counted as what the session's summaries hash holds once the
    summarizer writes them (in the background: never refused)."""
    tenant = f"holdings-{uuid.uuid4().hex[:8]}"
    settings = bounded(redis_url, 1024 * 1024)
    settings.context.summary_model = ""  # extractive: no inference service runs here
    settings.context.summary_span_turns = 4
    settings.context.summary_hot_window_turns = 4
    async with running(settings) as stub:
        created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
        session_id = created.session.session_id
        for k in range(4):
            turns = [
                msg(USER, f"Question {k}: where do the crates go?"),
                msg(ASSISTANT, f"To Lisbon, dock {k}."),
            ]
            await stub.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant, session_id=session_id, expected_version=k, messages=turns
                )
            )
        summaries_key = session_store.key(tenant, session_id, "summaries")
        meta_key = session_store.key(tenant, session_id, "meta")

        async def summaries_counted() -> bool:
            summaries = await redis_client.hgetall(summaries_key)
            turn_bytes = int(await redis_client.hget(meta_key, "bytes"))
            beside = sum(
                len(span) + 2 * len(summary) + session_store.SUMMARY_OVERHEAD_BYTES
                for span, summary in summaries.items()
            )
            total = (await counted(redis_client, tenant))[b"total"]
            return bool(summaries) and total == session_store.held_by(turn_bytes, 8) + beside

        await _until(summaries_counted)


async def test_a_resent_append_is_answered_at_the_tenants_bound(redis_url, redis_client) -> None:
    """An append applied and counted, then sent again with its turn id (the
    router's own resend after an UNAVAILABLE whose reply was lost): the
    tenant's room was asked before the turn id, so at its bound the resend
    was refused RESOURCE_EXHAUSTED SESSION_QUOTA_EXCEEDED (4,337 bytes
    held, 3,057 more past 5,000) for a turn the session holds, and the
    router told its caller the turn was not stored. It is answered as a
    replay, whatever the room, as a create's resend is; another turn is
    still refused."""
    tenant = f"holdings-{uuid.uuid4().hex[:8]}"
    async with running(bounded(redis_url, 5_000)) as stub:
        created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
        here = {"tenant_id": tenant, "session_id": created.session.session_id, "any_version": True}
        turn = [msg(USER, "q" * 900), msg(ASSISTANT, "a" * 100)]
        append = pb.AppendTurnsRequest(**here, turn_id="turn-1", messages=turn)
        assert (await stub.AppendTurns(append)).version == 1
        held = await counted(redis_client, tenant)

        resent = await stub.AppendTurns(append)
        assert (resent.version, resent.replayed) == (1, True)
        assert await counted(redis_client, tenant) == held
        another = stub.AppendTurns(pb.AppendTurnsRequest(**here, turn_id="turn-2", messages=turn))
        code, reason, _ = await failure(another)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")


async def test_a_pin_the_session_holds_is_answered_at_the_tenants_bound(redis_url, redis_client) -> None:
    """A pin the session holds already adds nothing (the pin script answers
    it), but the tenant's room was asked first: at the bound, pinning it
    again (the router's own resend of a PinToSession after an UNAVAILABLE,
    or its caller's) was refused SESSION_QUOTA_EXCEEDED (2,410 bytes held,
    1,130 more past 3,539) for a pin that was there."""
    tenant = f"holdings-{uuid.uuid4().hex[:8]}"
    fact = "z" * 1000
    pin_bytes = len(f"f:{fact}") + session_store.PIN_OVERHEAD_BYTES
    # Room for the session and its pin, not for the pin twice.
    bound = session_store.SESSION_OVERHEAD_BYTES + 2 * pin_bytes - 1
    async with running(bounded(redis_url, bound)) as stub:
        created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
        here = {"tenant_id": tenant, "session_id": created.session.session_id}
        assert (await stub.PinToSession(pb.PinToSessionRequest(**here, fact=fact))).pin_count == 1
        held = await counted(redis_client, tenant)

        assert (await stub.PinToSession(pb.PinToSessionRequest(**here, fact=fact))).pin_count == 1
        assert await counted(redis_client, tenant) == held
        another = stub.PinToSession(pb.PinToSessionRequest(**here, fact=f"y{fact}"))
        code, reason, _ = await failure(another)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
