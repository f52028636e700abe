"""A turn on a full session, through the real router in front of real
context, cache and inference services (real Redis, real Triton): refused
with RESOURCE_EXHAUSTED / SESSION_FULL before anything is generated for it
(no delta reaches the caller, the usage ledger records no token), over gRPC
and over the HTTP edge (409), nothing stored lost; a turn that fits is
answered and stored as ever."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import httpx
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import error_info
from meshgate.local.stack import free_port
from meshgate.router.v1 import router_service_pb2 as pb
from tests.integration.conftest import (
    answer_of,
    keyed_tenants,
    router_and_context,
    service_settings,
)

pytestmark = pytest.mark.integration

MAX_TURNS = 4
MAX_SESSION_BYTES = 2048
USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


@pytest.fixture(scope="module")
async def mesh(redis_url, inference_address):
    """(router stub, context stub, tenant id, auth metadata, HTTP base URL):
    sessions capped at MAX_TURNS turns and MAX_SESSION_BYTES bytes, for a
    tenant of this module's alone (its usage rows are these tests')."""
    tenant = f"full-{uuid.uuid4().hex[:8]}"
    settings = service_settings(redis_url, inference_address)
    settings.context.max_turns = MAX_TURNS
    settings.context.max_session_bytes = MAX_SESSION_BYTES
    auth = keyed_tenants(settings, tenant)
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
    async with router_and_context(settings) as (router, context):
        yield router, context, tenant, auth[tenant], f"http://{settings.router.http_listen}/v1"


def turn(session_id: str, text: str) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        session_id=session_id,
        messages=[common_pb2.Message(role=USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=3, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def refused(call) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """A Chat stream that must fail before any response: its code and ErrorInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call:
            pytest.fail(f"nothing may reach the caller of a turn its session cannot store: {response}")
    info = error_info(caught.value)
    assert info is not None, caught.value
    return caught.value.code(), info.reason, dict(info.metadata)


async def stored(context, tenant: str, session_id: str) -> tuple[int, list[str]]:
    request = context_pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)
    session = (await context.GetSession(request)).session
    return session.version, [m.content for m in session.messages]


async def fill_to_max_turns(context, tenant: str, session_id: str) -> list[common_pb2.Message]:
    """Fills the session to MAX_TURNS in one append (t0, t1, ... from the
    user and the assistant in turn), through the context service; returns
    the messages."""
    full = [
        common_pb2.Message(role=USER if n % 2 == 0 else ASSISTANT, content=f"t{n}") for n in range(MAX_TURNS)
    ]
    await context.AppendTurns(
        context_pb.AppendTurnsRequest(
            tenant_id=tenant, session_id=session_id, any_version=True, messages=full
        )
    )
    return full


async def usage(router, auth) -> pb.UsageRow:
    """The tenant's tiny-gpt usage, once the ledger holds ``requests`` turns."""
    response = await router.GetUsage(pb.GetUsageRequest(), metadata=auth, timeout=10)
    rows = [row for row in response.rows if row.model == "tiny-gpt"]
    return rows[0] if rows else pb.UsageRow()


async def until_requests(router, auth, requests: int) -> pb.UsageRow:
    """Ledger records are written in batches just after a turn ends."""
    deadline = asyncio.get_running_loop().time() + 15
    while (row := await usage(router, auth)).requests < requests:
        assert asyncio.get_running_loop().time() < deadline, f"the ledger holds {row}"
        await asyncio.sleep(0.05)
    return row


async def test_a_turn_on_a_session_at_its_turn_cap_is_refused_before_generating(mesh) -> None:
    router, context, tenant, auth, _ = mesh
    before = await usage(router, auth)
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    # Room for two turns of a question and its answer: both answered and stored.
    answers = [await answer_of(router.Chat(turn(session_id, f"question {n}"), metadata=auth)) for n in (1, 2)]
    assert [completion.session_version for _, completion in answers] == [1, 2]
    generated = sum(completion.usage.completion_tokens for _, completion in answers)
    assert generated > 0
    held = await stored(context, tenant, session_id)
    assert held == (2, ["question 1", answers[0][0], "question 2", answers[1][0]])

    code, reason, metadata = await refused(router.Chat(turn(session_id, "question 3"), metadata=auth))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
    assert metadata == {
        "session_id": session_id,
        "unit": "turns",
        "limit": str(MAX_TURNS),
        "turns": str(MAX_TURNS),
        "max_turns": str(MAX_TURNS),
    }
    assert await stored(context, tenant, session_id) == held
    # The refused turn is in the ledger as a failure that generated nothing.
    row = await until_requests(router, auth, before.requests + 3)
    assert row.failures == before.failures + 1
    assert row.completion_tokens == before.completion_tokens + generated


async def test_a_turn_past_the_byte_cap_is_refused_before_generating_and_a_smaller_one_fits(mesh) -> None:
    router, context, tenant, auth, _ = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    old = common_pb2.Message(role=USER, content="x" * 1800)
    await context.AppendTurns(
        context_pb.AppendTurnsRequest(
            tenant_id=tenant, session_id=session_id, any_version=True, messages=[old]
        )
    )
    before = await usage(router, auth)
    # Its question alone would take the session past the cap: refused, nothing generated.
    code, reason, metadata = await refused(router.Chat(turn(session_id, "y" * 300), metadata=auth))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
    assert metadata == {
        "session_id": session_id,
        "unit": "bytes",
        "limit": str(MAX_SESSION_BYTES),
        "bytes": str(old.ByteSize()),
    }
    row = await until_requests(router, auth, before.requests + 1)
    assert (row.failures, row.completion_tokens) == (before.failures + 1, before.completion_tokens)
    # A short one still fits, answer included: answered and stored.
    text, completion = await answer_of(router.Chat(turn(session_id, "and?"), metadata=auth))
    assert completion.session_version == 2
    assert await stored(context, tenant, session_id) == (2, ["x" * 1800, "and?", text])


async def test_the_http_edge_refuses_a_turn_on_a_full_session_with_409(mesh) -> None:
    router, context, tenant, auth, base_url = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    await fill_to_max_turns(context, tenant, session_id)
    body = {
        "model": "tiny-gpt",
        "messages": [{"role": "user", "content": "one more?"}],
        "max_tokens": 3,
        "session_id": session_id,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        response = await http.post("/chat/completions", json=body, headers=dict(auth))
    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("conflict_error", "SESSION_FULL")
    assert await stored(context, tenant, session_id) == (1, [f"t{n}" for n in range(MAX_TURNS)])


async def test_a_stale_strict_turn_on_a_full_session_is_refused_as_its_append_would_be(mesh) -> None:
    router, context, tenant, auth, _ = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    full = await fill_to_max_turns(context, tenant, session_id)
    # What the append answers a writer still at version 0: the version, before the cap.
    with pytest.raises(grpc.aio.AioRpcError) as appended:
        await context.AppendTurns(
            context_pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, expected_version=0, messages=full[:2]
            )
        )
    info = error_info(appended.value)
    append_refusal = (appended.value.code(), info.reason, dict(info.metadata))
    assert append_refusal == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT", {"current_version": "1"})

    stale = turn(session_id, "one more?")
    stale.expected_session_version = 0
    assert await refused(router.Chat(stale, metadata=auth)) == append_refusal
    # At its version, the cap refuses it.
    current = turn(session_id, "one more?")
    current.expected_session_version = 1
    code, reason, metadata = await refused(router.Chat(current, metadata=auth))
    assert (code, reason, metadata["unit"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL", "turns")
    assert await stored(context, tenant, session_id) == (1, [f"t{n}" for n in range(MAX_TURNS)])


async def test_turns_sent_at_once_on_a_nearly_full_session_are_refused_up_front_but_what_fits(mesh) -> None:
    """Each assembly holds room for its turn's append until that append, so
    of 6 turns sent at once on a session 2 messages under its cap, 1 is
    answered and stored and 5 are refused before anything is generated for
    them (before the holds: 1 stored, 5 answered in full and then refused by
    their appends, their streams ending SESSION_FULL with delivered_*)."""
    router, context, tenant, auth, _ = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
    await context.AppendTurns(
        context_pb.AppendTurnsRequest(
            tenant_id=tenant,
            session_id=session_id,
            any_version=True,
            messages=[
                common_pb2.Message(role=USER, content="t0"),
                common_pb2.Message(role=ASSISTANT, content="t1"),
            ],
        )
    )
    before = await usage(router, auth)

    async def outcome(n: int):
        deltas = 0
        try:
            async for response in router.Chat(turn(session_id, f"at once {n}"), metadata=auth):
                if response.HasField("delta"):
                    deltas += 1
                elif response.HasField("completion"):
                    return "stored", response.completion
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return (error.code(), info.reason, deltas, "delivered_deltas" in info.metadata), None
        pytest.fail("a Chat stream ended with neither a completion nor an error")

    outcomes = await asyncio.gather(*(outcome(n) for n in range(6)))
    stored_turns = [completion for kind, completion in outcomes if kind == "stored"]
    refusals = [kind for kind, _ in outcomes if kind != "stored"]
    assert len(stored_turns) == 1, outcomes
    assert refusals == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL", 0, False)] * 5
    version, messages = await stored(context, tenant, session_id)
    assert (version, len(messages)) == (2, MAX_TURNS)
    # Nothing was generated for the 5: the ledger bills only the stored turn's tokens.
    row = await until_requests(router, auth, before.requests + 6)
    assert row.failures == before.failures + 5
    assert row.completion_tokens == before.completion_tokens + stored_turns[0].usage.completion_tokens
