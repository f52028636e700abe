"""ForkSession against context.max_bytes_per_tenant, through the real
context service over a real Redis: a fork holds the pins it copies (every
pinned fact of its source, and the pins of the turns it takes) as a pin
does, so the tenant's room it asks for before writing counts them with its
turns, and a fork whose turns and pins do not fit is refused
RESOURCE_EXHAUSTED SESSION_QUOTA_EXCEEDED, making nothing."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from meshgate.context.v1 import context_service_pb2 as pb
from services.context import store as session_store
from tests.integration.test_context_fork_request_ids import sessions_of
from tests.integration.test_context_service import ASSISTANT, USER, failure, msg, new_session, running
from tests.integration.test_context_tenant_holdings import bounded, counted

pytestmark = pytest.mark.integration

QUESTION, ANSWER = "Where do the crates go?", "Lisbon."


def pin_bytes(pin: str) -> int:
    """What the tenant's record counts for one pin, as the turn index stores it."""
    return len(pin.encode()) + session_store.PIN_OVERHEAD_BYTES


async def pinned_source(stub, tenant: str, facts: list[str], turns_pinned: int = 0) -> str:
    source = await new_session(stub, tenant, msg(USER, QUESTION), msg(ASSISTANT, ANSWER))
    for fact in facts:
        await stub.PinToSession(pb.PinToSessionRequest(tenant_id=tenant, session_id=source, fact=fact))
    for index in range(turns_pinned):
        pin = pb.PinToSessionRequest(tenant_id=tenant, session_id=source, message_index=index)
        await stub.PinToSession(pin)
    return source


async def test_a_fork_whose_pins_pass_the_bound_is_refused(redis_url, redis_client) -> None:
    """A reviewer's repro: bounded at 100,000 bytes, a session of one turn
    pair and 20 pinned facts of 4,000 bytes held 85,940; a fork at version
    0 was asked for its turns alone (none: 1,280 bytes), and then copied
    the 20 facts, taking the tenant to 178,080, and 10 forks at once to
    337,580 (3.4 times the bound). Each is refused now, at once too, and
    the tenant's count stays what its source holds."""
    tenant = f"fork-quota-{uuid.uuid4().hex[:8]}"
    facts = [f"{n:02d}" + "f" * 3998 for n in range(20)]
    async with running(bounded(redis_url, 100_000)) as stub:
        source = await pinned_source(stub, tenant, facts)
        held = await counted(redis_client, tenant)
        assert held[b"total"] < 100_000
        assert held[f"p:{source}".encode()] == sum(pin_bytes(f"f:{fact}") for fact in facts)

        for version in (0, 1):
            fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=version)
            code, reason, metadata = await failure(stub.ForkSession(fork))
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
            assert int(metadata["bytes"]) == held[b"total"]

        at_once = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0)
        refusals = await asyncio.gather(*(failure(stub.ForkSession(at_once)) for _ in range(10)))
        assert {refusal[:2] for refusal in refusals} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
        }
        assert await sessions_of(redis_client, tenant) == {source}
        assert await counted(redis_client, tenant) == held


async def test_a_fork_asks_for_what_it_is_counted_once_written(redis_url, redis_client) -> None:
    """The room a fork asks for is what the tenant's record counts for it
    once made: its turns and every pin it copies (its source's facts, and
    the pins of the turns it takes). With room for its source and one fork,
    the first fork is made and counted so, and a second is refused: asked
    for its turns alone, it fitted, and took the tenant past the bound."""
    tenant = f"fork-quota-{uuid.uuid4().hex[:8]}"
    facts = [f"{n}" + "g" * 1999 for n in range(3)]
    async with running(bounded(redis_url, 1 << 30)) as stub:
        source = await pinned_source(stub, tenant, facts, turns_pinned=2)
        source_held = (await counted(redis_client, tenant))[b"total"]
    # The fork takes all of its source's turns: their bytes as stored (meta's count).
    turn_bytes = int(await redis_client.hget(session_store.key(tenant, source, "meta"), "bytes"))
    pins = [f"f:{fact}" for fact in facts] + ["t:0", "t:1"]
    fork_bytes = session_store.held_by(turn_bytes, 2) + sum(map(pin_bytes, pins))
    # Room for the source and one fork: not for a second.
    bound = source_held + 2 * fork_bytes - 1
    async with running(bounded(redis_url, bound)) as stub:
        fork = pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=1)
        first = (await stub.ForkSession(fork)).session.session_id
        record = await counted(redis_client, tenant)
        assert record[b"total"] == source_held + fork_bytes
        assert record[f"p:{first}".encode()] == sum(map(pin_bytes, pins))

        code, reason, metadata = await failure(stub.ForkSession(fork))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_QUOTA_EXCEEDED")
        assert int(metadata["bytes"]) == source_held + fork_bytes
        assert await sessions_of(redis_client, tenant) == {source, first}
        assert await counted(redis_client, tenant) == record
