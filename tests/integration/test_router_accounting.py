"""Limits and the usage ledger wired into the router: a real router in front
of real context, cache and inference services, Redis and Triton. Every end
of a turn (completion, failure, the caller hanging up) settles its
reservation and frees its stream, and lands in the ledger, which GetUsage
reads back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    DeploymentSettings,
    LimitSettings,
    ModelSettings,
    PriceSettings,
    Settings,
    TenantSettings,
    hash_api_key,
)
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.admission import Scope
from services.router.ledger import STREAM
from tests.integration.conftest import (
    running_router,
    service_settings,
    triton_cancellations,
    until_triton_cancels,
)
from tests.mesh import bounded_channel, mesh_settings, router_channel

pytestmark = pytest.mark.integration

ADMIN_KEY = "accounting-admin-key"


@pytest.fixture(scope="module")
async def accounting(redis_url, inference_address):
    """(router stub, tenant id, the tenant's auth metadata, a Redis client)."""
    tenant = f"acct-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    settings = service_settings(redis_url, inference_address)
    dead = DeploymentSettings(name="dead", address="127.0.0.1:1", model="tiny-gpt", weight=1)
    settings.models["nowhere"] = ModelSettings(deployments=[dead])
    settings.router.tenants = [
        TenantSettings(
            id=tenant,
            api_key_sha256=[hash_api_key(key)],
            # One stream at a time: a stream that was not freed refuses the next turn.
            key_limits=LimitSettings(concurrent_streams=1, tokens_per_minute=100_000),
        )
    ]
    settings.router.prices = {
        "tiny-gpt": PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=2.0)
    }
    settings.router.admin_api_key_sha256 = [hash_api_key(ADMIN_KEY)]
    client = redis_access.connect(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.aclose)
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        auth = (("authorization", f"Bearer {key}"),)
        yield router_service_pb2_grpc.RouterServiceStub(channel), tenant, auth, client


def ask(text: str, model: str = "tiny-gpt", max_tokens: int = 8) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def eventually(check, timeout_s: float = 15.0):
    """Polls ``check`` (async, returns a truthy value when done)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


def limit_key(tenant: str, tenant_key_hash: str, suffix: str) -> str:
    return f"{Scope('key', tenant_key_hash[:16], LimitSettings(), tenant).prefix}:{suffix}"


async def usage_row(stub, auth, model: str, **request) -> pb.UsageRow | None:
    usage = await stub.GetUsage(pb.GetUsageRequest(**request), metadata=auth, timeout=10)
    rows = [row for row in usage.rows if row.model == model]
    return rows[0] if rows else None


async def settled_usage_row(stub, auth, model: str) -> pb.UsageRow | None:
    """The row once the earlier tests' records are in (the ledger writes
    them in batches, just after each turn): two reads alike."""
    previous = await usage_row(stub, auth, model)
    for _ in range(50):
        await asyncio.sleep(0.2)
        current = await usage_row(stub, auth, model)
        if current == previous:
            return current
        previous = current
    raise AssertionError("usage kept changing")


async def test_a_completed_turn_settles_to_its_real_use_and_is_billed_in_the_ledger(accounting):
    stub, tenant, auth, client = accounting
    key_hash = hash_api_key(f"key-{tenant}")
    completion = None
    async for response in stub.Chat(ask("count the stars", max_tokens=8), metadata=auth, timeout=60):
        if response.HasField("completion"):
            completion = response.completion
    assert completion is not None
    used = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert used > 0
    # The key's one stream is free for the caller's next turn at once,
    # though settlements are written in batches just after a call ends.
    async for response in stub.Chat(ask("and again"), metadata=auth, timeout=60):
        last = response
    assert last.HasField("completion")
    prompt_tokens = completion.usage.prompt_tokens + last.completion.usage.prompt_tokens
    completion_tokens = completion.usage.completion_tokens + last.completion.usage.completion_tokens
    used = prompt_tokens + completion_tokens

    # Both reservations (prompt bytes + max_tokens) became the real use, and
    # the stream was freed, within a bound.
    async def settled():
        tokens = int(await client.get(limit_key(tenant, key_hash, "tpm:sum")) or 0)
        return tokens == used and await client.zcard(limit_key(tenant, key_hash, "streams")) == 0

    await eventually(settled, timeout_s=2.0)

    async def recorded():
        row = await usage_row(stub, auth, "tiny-gpt")
        return row if row is not None and row.requests >= 2 else None

    row = await recorded() or await eventually(recorded)
    assert row.key_id == key_hash[:16] and row.failures == 0
    assert (row.prompt_tokens, row.completion_tokens) == (prompt_tokens, completion_tokens)
    expected_nano_usd = prompt_tokens * 1000 + completion_tokens * 2000
    assert row.cost_nano_usd == expected_nano_usd
    # The admin credential reads the same row; the tenant's key cannot read another tenant.
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    assert (await usage_row(stub, admin, "tiny-gpt", tenant_id=tenant)).requests == row.requests
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetUsage(pb.GetUsageRequest(tenant_id="dev"), metadata=auth, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).reason == Reason.ADMIN_REQUIRED


async def test_a_failed_turn_frees_its_stream_and_is_recorded_as_a_failure(accounting):
    stub, tenant, auth, client = accounting
    key_hash = hash_api_key(f"key-{tenant}")
    before = int(await client.get(limit_key(tenant, key_hash, "tpm:sum")) or 0)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stub.Chat(ask("anyone there?", model="nowhere"), metadata=auth, timeout=60):
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

    # Nothing was generated: the reservation settled to nothing, and the
    # stream was freed.
    async def settled():
        tokens = int(await client.get(limit_key(tenant, key_hash, "tpm:sum")) or 0)
        return tokens == before and await client.zcard(limit_key(tenant, key_hash, "streams")) == 0

    await eventually(settled, timeout_s=2.0)

    async def failure_recorded():
        row = await usage_row(stub, auth, "nowhere")
        return row if row is not None and row.failures == 1 else None

    row = await eventually(failure_recorded)
    assert row.requests == 1 and row.completion_tokens == 0 and row.cost_nano_usd == 0


async def freed_and_billed_for_what_it_read(accounting, before):
    """After a caller hung up mid-turn: the key's one stream is given back
    and the turn is recorded as a failure billed for what it read (before
    its completion: its prompt bytes and max_tokens, the deltas carrying no
    counts), never nothing."""
    stub, tenant, auth, client = accounting
    streams = limit_key(tenant, hash_api_key(f"key-{tenant}"), "streams")

    async def freed():
        return await client.zcard(streams) == 0

    await eventually(freed)

    async def cancellation_recorded():
        row = await usage_row(stub, auth, "tiny-gpt")
        return row if row is not None and row.failures > before.failures else None

    row = await eventually(cancellation_recorded)
    assert row.requests == before.requests + 1
    assert row.prompt_tokens > before.prompt_tokens
    assert row.completion_tokens > before.completion_tokens
    assert row.cost_nano_usd > before.cost_nano_usd


async def test_a_caller_hanging_up_mid_stream_frees_its_stream_and_pays_for_what_it_read(accounting):
    stub, tenant, auth, client = accounting
    key_hash = hash_api_key(f"key-{tenant}")
    before = await usage_row(stub, auth, "tiny-gpt") or pb.UsageRow()
    call = stub.Chat(ask("tell me a long story", max_tokens=200), metadata=auth, timeout=60)
    async for response in call:
        assert response.HasField("delta")
        break  # one piece, then hang up
    # While the stream is open, the key's one stream is taken.
    assert await client.zcard(limit_key(tenant, key_hash, "streams")) == 1
    call.cancel()

    await freed_and_billed_for_what_it_read(accounting, before)
    # The key's stream is free again: the next turn is admitted.
    async for response in stub.Chat(ask("and now?"), metadata=auth, timeout=60):
        last = response
    assert last.HasField("completion")


async def test_a_session_stream_cancelled_mid_turn_ends_its_generation_and_frees_its_stream(
    accounting, triton_server
):
    """ChatSession, a yielding handler whose writes are gRPC's own: the
    client cancelling mid-turn still cancels the turn's request inside
    Triton, gives back the key's one stream, and bills what it read."""
    stub, tenant, auth, client = accounting
    _, log_path = triton_server
    key_hash = hash_api_key(f"key-{tenant}")
    before = await settled_usage_row(stub, auth, "tiny-gpt") or pb.UsageRow()
    cancelled_before = triton_cancellations(log_path)
    call = stub.ChatSession(metadata=auth, timeout=60)
    await call.initial_metadata()
    turn = ask("tell me a long story about a session", max_tokens=200)
    await call.write(
        pb.ChatSessionRequest(model=turn.model, messages=turn.messages, parameters=turn.parameters)
    )
    assert (await call.read()).HasField("delta")
    assert await client.zcard(limit_key(tenant, key_hash, "streams")) == 1
    call.cancel()

    await until_triton_cancels(log_path, cancelled_before)
    await freed_and_billed_for_what_it_read(accounting, before)


async def test_a_second_concurrent_stream_of_the_key_is_refused_with_quota_failure(accounting):
    stub, _, auth, _ = accounting
    first = stub.Chat(ask("a long one", max_tokens=200), metadata=auth, timeout=60)
    async for _ in first:
        break
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Chat(ask("me too"), metadata=auth, timeout=60):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused.value)
        assert (info.reason, info.metadata["limit"]) == (Reason.RATE_LIMITED, "concurrent_streams")
    finally:
        first.cancel()


async def test_a_turn_refused_at_admission_is_in_the_ledger_as_one_refused_once_its_history_is_known(
    redis_url,
):
    """A day's 200 tokens: a stateless turn of 300 bytes is refused at
    admission, a session turn of two bytes over a history of 300 (within
    the model's window) once assembled (the reservation's top-up). The
    second was in GetUsage as a failure and the first not at all: the
    tenant's refused traffic counted by the stage that refused it. Both are now, as failures that used
    nothing; the log names the second's reason, and not the first (a refusal
    at admission costs its caller nothing, and a tenant hammering past its
    limit would fill the log every tenant shares). Needs no model: neither
    reaches inference."""
    tenant = f"refused-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.tenants = [
        TenantSettings(
            id=tenant, api_key_sha256=[hash_api_key(key)], limits=LimitSettings(tokens_per_day=200)
        )
    ]
    auth = (("authorization", f"Bearer {key}"),)
    history = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="!" * 300)
    client = redis_access.connect(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.aclose)
        address = await stack.enter_async_context(running_router(settings))
        stub = router_service_pb2_grpc.RouterServiceStub(
            await stack.enter_async_context(bounded_channel(address))
        )
        context = context_service_pb2_grpc.ContextServiceStub(
            await stack.enter_async_context(router_channel(settings.router.context_address, "context"))
        )
        session_id = (await stub.CreateSession(pb.CreateSessionRequest(), metadata=auth)).session_id
        await context.AppendTurns(
            context_pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, any_version=True, messages=[history]
            )
        )
        session_turn = ask("hi")
        session_turn.session_id = session_id
        reasons = []
        for request in (ask("?" * 300), session_turn):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for response in stub.Chat(request, metadata=auth, timeout=30):
                    pytest.fail(f"a refused turn sends nothing: {response}")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            reasons.append(error_info(refused.value).reason)

        async def both_recorded():
            row = await usage_row(stub, auth, "tiny-gpt")
            return row if row is not None and row.requests == 2 else None

        row = await eventually(both_recorded)
        assert row.failures == 2
        assert (row.prompt_tokens, row.completion_tokens, row.cost_nano_usd) == (0, 0, 0)
        logged = [fields for _, fields in await client.xrange(STREAM) if fields[b"tenant"].decode() == tenant]
        assert [fields[b"failure"].decode() for fields in logged] == reasons[1:]
