"""The tokens the context service spends summarizing a tenant's session are
that tenant's usage: through a real router, context and inference service
(tiny-gpt on a real Triton writing the summaries), Redis underneath. A
summary's tokens wait on the session until its next turn's append takes
them; the router then bills them, once, under that turn's key: in GetUsage
(not as a request), in the usage log, and in the tenant's token budget."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import uuid

import pytest

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, PriceSettings, Settings, TenantSettings, hash_api_key
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.context import store as session_store
from services.router.admission import Scope
from services.router.ledger import STREAM
from tests.integration.conftest import running_router, serve_tiny_gpt
from tests.integration.test_router_accounting import eventually, usage_row
from tests.mesh import bounded_channel, mesh_settings

pytestmark = pytest.mark.integration

MODEL = "tiny-gpt"


def turn(session_id: str, i: int) -> pb.ChatRequest:
    text = (
        f"Crate {100 + i} went to dock {i} in Lisbon on Monday, and Maria signed for it at {i + 1} pm."
        f" The crate held {i + 3} boxes of tiles for the museum on Rua Augusta."
    )
    return pb.ChatRequest(
        model=MODEL,
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=8, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


@dataclasses.dataclass
class SummarizedSession:
    """A session of a fresh tenant through a real router whose context
    service summarizes spans of 4 turns with tiny-gpt once 4 newer turns
    follow: after the fourth turn (its question and answer are two turns)."""

    tenant: str
    key: str
    stub: router_service_pb2_grpc.RouterServiceStub
    client: object
    session_id: str = ""

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)

    async def chat(self, i: int) -> pb.ChatCompletion:
        completion = None
        async for response in self.stub.Chat(turn(self.session_id, i), metadata=self.auth, timeout=60):
            if response.HasField("completion"):
                completion = response.completion
        assert completion is not None
        return completion


@contextlib.asynccontextmanager
async def summarized_session(redis_url, inference_address, prefix: str, collect_s: float | None = None):
    tenant = f"{prefix}-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.cache.inference_address = inference_address
    serve_tiny_gpt(settings, inference_address)
    settings.context.inference_address = inference_address
    settings.context.summary_model = MODEL
    settings.context.summary_span_turns = 4
    settings.context.summary_hot_window_turns = 4
    if collect_s is not None:
        settings.router.summary_usage_collect_s = collect_s
    settings.router.tenants = [
        TenantSettings(
            id=tenant, api_key_sha256=[hash_api_key(key)], limits=LimitSettings(tokens_per_day=10_000_000)
        )
    ]
    price = PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=2.0)
    settings.router.prices = {MODEL: price}
    client = redis_access.connect(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.aclose)
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        session = SummarizedSession(tenant, key, router_service_pb2_grpc.RouterServiceStub(channel), client)
        created = await session.stub.CreateSession(pb.CreateSessionRequest(), metadata=session.auth)
        session.session_id = created.session_id
        yield session


async def test_a_sessions_summary_tokens_are_billed_to_its_tenant_with_its_next_turn_once(
    redis_url, inference_address
) -> None:
    async with summarized_session(redis_url, inference_address, "sum") as session:
        tenant, key, stub, auth, client = (
            session.tenant,
            session.key,
            session.stub,
            session.auth,
            session.client,
        )
        session_id, chat = session.session_id, session.chat
        turns = [await chat(i) for i in range(4)]
        meta = session_store.session_key(tenant, session_id)

        async def unbilled():
            raw = await client.hget(meta, "unbilled")
            return json.loads(raw) if raw else None

        # The summary of turns 0-3 is written in the background: its tokens
        # wait on the session, billed to no one yet.
        spent = await eventually(unbilled, timeout_s=60.0)
        assert list(spent) == [MODEL]
        prompt_tokens, completion_tokens, summaries = spent[MODEL]
        assert prompt_tokens > 0 and completion_tokens > 0 and summaries == 1
        before = await usage_row(stub, auth, MODEL)
        assert before.summaries == 0 and before.summary_prompt_tokens == 0

        # The next turn's append takes them, and the router bills them.
        turns.append(await chat(4))
        assert await unbilled() is None

        async def billed():
            row = await usage_row(stub, auth, MODEL)
            return row if row.requests == 5 and row.summaries == 1 else None

        row = await eventually(billed)
        assert row.summary_prompt_tokens == prompt_tokens
        assert row.summary_completion_tokens == completion_tokens
        turn_prompt = sum(t.usage.prompt_tokens for t in turns)
        turn_completion = sum(t.usage.completion_tokens for t in turns)
        assert row.prompt_tokens == turn_prompt + prompt_tokens
        assert row.completion_tokens == turn_completion + completion_tokens
        assert row.cost_nano_usd == row.prompt_tokens * 1000 + row.completion_tokens * 2000
        assert row.key_id == hash_api_key(key)[:16]
        # The tenant's day budget is charged them too, after the fact.
        day = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
        budget = f"{Scope('tenant', tenant, LimitSettings()).prefix}:tokens:day:{day}"
        used = row.prompt_tokens + row.completion_tokens

        async def charged():
            return int(await client.get(budget) or 0) == used

        await eventually(charged, timeout_s=5.0)
        logged = [
            fields
            for _, fields in await client.xrevrange(STREAM, count=1000)
            if fields[b"tenant"] == tenant.encode() and fields[b"cache_status"] == b"summary"
        ]
        assert len(logged) == 1 and int(logged[0][b"prompt_tokens"]) == prompt_tokens

        # Once: the turn after bills no summary again (the next span is due
        # only after it).
        turns.append(await chat(5))

        async def six_requests():
            row = await usage_row(stub, auth, MODEL)
            return row if row.requests == 6 else None

        await eventually(six_requests)
        await asyncio.sleep(0.2)
        after = await usage_row(stub, auth, MODEL)
        assert (after.summaries, after.summary_prompt_tokens) == (1, prompt_tokens)
        turn_prompt = sum(t.usage.prompt_tokens for t in turns)
        assert after.prompt_tokens == turn_prompt + prompt_tokens


async def test_a_sessions_summary_tokens_are_billed_once_though_no_turn_follows(
    redis_url, inference_address
) -> None:
    """The summary of turns 0-3 is written after the fourth turn, the
    session's last for a while: the router takes its tokens from the
    session itself (TakeSummaryUsage) and bills them; the next turn's
    append then finds nothing to bill again."""
    async with summarized_session(redis_url, inference_address, "idle", collect_s=0.5) as session:
        tenant, key, stub, auth, client = (
            session.tenant,
            session.key,
            session.stub,
            session.auth,
            session.client,
        )
        session_id, chat = session.session_id, session.chat
        turns = [await chat(i) for i in range(4)]

        async def billed():
            row = await usage_row(stub, auth, MODEL)
            return row if row is not None and row.summaries == 1 else None

        # No fifth turn: the router asks (0.5, 2, 8 and 32 s after the fourth).
        row = await eventually(billed, timeout_s=45.0)
        assert row.summary_prompt_tokens > 0 and row.summary_completion_tokens > 0
        assert row.requests == 4 and row.key_id == hash_api_key(key)[:16]
        assert row.prompt_tokens == sum(t.usage.prompt_tokens for t in turns) + row.summary_prompt_tokens
        assert await client.hget(session_store.session_key(tenant, session_id), "unbilled") is None
        logged = [
            fields
            for _, fields in await client.xrevrange(STREAM, count=1000)
            if fields[b"tenant"] == tenant.encode() and fields[b"cache_status"] == b"summary"
        ]
        assert len(logged) == 1 and int(logged[0][b"prompt_tokens"]) == row.summary_prompt_tokens

        # The next turn's append takes nothing more (no span is due after it).
        await chat(4)

        async def five_requests():
            after = await usage_row(stub, auth, MODEL)
            return after if after.requests == 5 else None

        await eventually(five_requests)
        await asyncio.sleep(1.0)
        after = await usage_row(stub, auth, MODEL)
        assert (after.summaries, after.summary_prompt_tokens, after.summary_completion_tokens) == (
            1,
            row.summary_prompt_tokens,
            row.summary_completion_tokens,
        )
