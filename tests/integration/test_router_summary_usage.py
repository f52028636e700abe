"""The tokens the context service spends summarizing a tenant's session are
that tenant's usage: through real routers, context and inference service
(tiny-gpt on a real Triton writing the summaries), Redis underneath. A
summary's tokens wait on the session, which is listed as owing them, until a
router's sweep takes them (services/router/summary_usage.py): billed once,
under the key of the session's latest turn, in GetUsage (not as a
request), in the usage log, and in the tenant's token budget; by any router,
not only the one that served the session; and once though a take's reply
is lost."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import urllib.parse
import uuid

import pytest

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, PriceSettings, Settings, TenantSettings, hash_api_key
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.context import store as session_store
from services.router import app as router_app
from services.router.admission import Scope
from services.router.ledger import STREAM
from tests.integration.conftest import running, running_router, serve_tiny_gpt
from tests.integration.test_router_accounting import eventually, usage_row
from tests.mesh import bounded_channel, mesh_settings, router_channel
from tests.tcp_proxy import TcpProxy, evalsha_marker

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


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclasses.dataclass
class SummarizedSession:
    """A session of a fresh tenant (two keys) through a real router whose
    context service summarizes spans of 4 turns with tiny-gpt once 4 newer
    turns follow: after the fourth turn (its question and answer are two
    turns)."""

    tenant: str
    keys: tuple[str, str]
    stub: router_service_pb2_grpc.RouterServiceStub
    client: object
    settings: Settings
    session_id: str = ""

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.keys[0])

    async def chat(self, i: int, key: str = "", stub=None) -> pb.ChatCompletion:
        completion = None
        call = (stub or self.stub).Chat(
            turn(self.session_id, i), metadata=bearer(key or self.keys[0]), timeout=60
        )
        async for response in call:
            if response.HasField("completion"):
                completion = response.completion
        assert completion is not None
        return completion

    async def unbilled(self) -> dict | None:
        raw = await self.client.hget(session_store.unbilled_key(self.tenant, self.session_id), "unbilled")
        return json.loads(raw) if raw else None

    async def summaries_logged(self) -> list[dict]:
        return [
            fields
            for _, fields in await self.client.xrevrange(STREAM, count=1000)
            if fields[b"tenant"] == self.tenant.encode() and fields[b"cache_status"] == b"summary"
        ]


@contextlib.asynccontextmanager
async def summarized_session(
    redis_url, inference_address, prefix: str, collect_s: float, services_redis_url=""
):
    """``services_redis_url``: the Redis the services reach (a proxy of
    ``redis_url``, the test's own)."""
    tenant = f"{prefix}-{uuid.uuid4().hex[:8]}"
    keys = (f"key-{tenant}", f"other-key-{tenant}")
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = services_redis_url or redis_url
    settings.cache.inference_address = inference_address
    serve_tiny_gpt(settings, inference_address)
    settings.context.inference_address = inference_address
    settings.context.summary_model = MODEL
    settings.context.summary_span_turns = 4
    settings.context.summary_hot_window_turns = 4
    settings.router.summary_usage_collect_s = collect_s
    settings.router.tenants = [
        TenantSettings(
            id=tenant,
            api_key_sha256=[hash_api_key(key) for key in keys],
            limits=LimitSettings(tokens_per_day=10_000_000),
        )
    ]
    price = PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=2.0)
    settings.router.prices = {MODEL: price}
    client = redis_access.connect(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.aclose)
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        session = SummarizedSession(tenant, keys, stub, client, settings)
        created = await stub.CreateSession(pb.CreateSessionRequest(), metadata=session.auth)
        session.session_id = created.session_id
        yield session


async def test_a_sessions_summary_tokens_are_billed_once_though_no_turn_follows(
    redis_url, inference_address
) -> None:
    """The summary of turns 0-3 is written after the fourth turn, the
    session's last for a while: a sweep takes its tokens from the session
    and bills them; the next turn bills nothing more."""
    async with summarized_session(redis_url, inference_address, "sum", collect_s=0.5) as session:
        tenant, key, stub, auth, client = (
            session.tenant,
            session.keys[0],
            session.stub,
            session.auth,
            session.client,
        )
        turns = [await session.chat(i) for i in range(4)]

        async def billed():
            row = await usage_row(stub, auth, MODEL)
            return row if row is not None and row.summaries == 1 else None

        # No fifth turn: a sweep takes them 0.5 s or more after they were written.
        row = await eventually(billed, timeout_s=60.0)
        assert row.summary_prompt_tokens > 0 and row.summary_completion_tokens > 0
        assert row.requests == 4 and row.key_id == hash_api_key(key)[:16]
        turn_prompt = sum(t.usage.prompt_tokens for t in turns)
        turn_completion = sum(t.usage.completion_tokens for t in turns)
        assert row.prompt_tokens == turn_prompt + row.summary_prompt_tokens
        assert row.completion_tokens == turn_completion + row.summary_completion_tokens
        assert row.cost_nano_usd == row.prompt_tokens * 1000 + row.completion_tokens * 2000
        assert await session.unbilled() is None
        # The tenant's day budget is charged them too, after the fact.
        day = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
        budget = f"{Scope('tenant', tenant, LimitSettings()).prefix}:tokens:day:{day}"
        used = row.prompt_tokens + row.completion_tokens

        async def charged():
            return int(await client.get(budget) or 0) == used

        await eventually(charged, timeout_s=5.0)
        logged = await session.summaries_logged()
        assert len(logged) == 1 and int(logged[0][b"prompt_tokens"]) == row.summary_prompt_tokens

        # Once: the next turn, and the sweeps after it, bill no summary
        # again (the next span is due only after it).
        await session.chat(4)

        async def five_requests():
            after = await usage_row(stub, auth, MODEL)
            return after if after.requests == 5 else None

        await eventually(five_requests)
        await asyncio.sleep(1.5)
        after = await usage_row(stub, auth, MODEL)
        assert (after.summaries, after.summary_prompt_tokens, after.summary_completion_tokens) == (
            1,
            row.summary_prompt_tokens,
            row.summary_completion_tokens,
        )


async def billed_by_a_sweeping_router(session, key: str, timeout_s: float, then_s: float = 0.0):
    """The usage row of the session's summaries, once a router of the same
    settings sweeping every 0.2 s (one that never served the session) has
    billed them, as ``key``'s tenant reads it; the router sweeps ``then_s``
    longer before it stops."""
    sweeping = dataclasses.replace(
        session.settings, router=dataclasses.replace(session.settings.router, summary_usage_collect_s=0.2)
    )
    async with running(router_app, "router", sweeping) as address, bounded_channel(address) as channel:
        other = router_service_pb2_grpc.RouterServiceStub(channel)

        async def billed():
            usage = await other.GetUsage(pb.GetUsageRequest(), metadata=bearer(key), timeout=10)
            return [row for row in usage.rows if row.summaries]

        (row,) = await eventually(billed, timeout_s=timeout_s)
        await asyncio.sleep(then_s)
    return row


async def test_any_router_bills_a_summary_under_the_key_of_the_sessions_latest_turn(
    redis_url, inference_address
) -> None:
    """The router that served the session sweeps only once an hour (as good
    as stopped, or as a router whose asks for the session were over): a
    router that never served it bills the summary, to the key of its latest
    turn."""
    async with summarized_session(redis_url, inference_address, "other", collect_s=3600) as session:
        first_key, latest_key = session.keys
        for i in range(3):
            await session.chat(i, first_key)
        await session.chat(3, latest_key)
        # The session keeps the key's id, as usage rows show it, not its hash.
        meta = session_store.session_key(session.tenant, session.session_id)
        assert await session.client.hget(meta, "latest_key") == hash_api_key(latest_key)[:16].encode()
        row = await billed_by_a_sweeping_router(session, latest_key, timeout_s=60.0)
        assert row.key_id == hash_api_key(latest_key)[:16] and row.summaries == 1
        assert row.summary_prompt_tokens > 0 and row.requests == 1
        assert await session.unbilled() is None
        assert len(await session.summaries_logged()) == 1


async def test_a_summary_of_a_session_deleted_before_any_sweep_is_billed(
    redis_url, inference_address
) -> None:
    """The session is deleted (ContextService.DeleteSession) after its
    summary is written and before any router sweeps: the summary's tokens
    were spent on the tenant's session all the same, and a router that
    sweeps later bills them, to the key of its latest turn."""
    async with summarized_session(redis_url, inference_address, "deleted", collect_s=3600) as session:
        latest_key = session.keys[1]
        for i in range(3):
            await session.chat(i)
        await session.chat(3, latest_key)
        spent = await eventually(session.unbilled, timeout_s=60.0)
        context_address = session.settings.router.context_address
        async with router_channel(context_address, "context") as channel:
            context = context_service_pb2_grpc.ContextServiceStub(channel)
            await context.DeleteSession(
                context_pb.DeleteSessionRequest(tenant_id=session.tenant, session_id=session.session_id)
            )
        # Once: the sweeps after it (1 s of them) find nothing more to bill.
        row = await billed_by_a_sweeping_router(session, latest_key, timeout_s=20.0, then_s=1.0)
        assert len(await session.summaries_logged()) == 1
        ((prompt_tokens, completion_tokens, summaries),) = spent.values()
        assert (row.summaries, row.summary_prompt_tokens, row.summary_completion_tokens) == (
            summaries,
            prompt_tokens,
            completion_tokens,
        )
        assert row.key_id == hash_api_key(latest_key)[:16]
        assert await session.unbilled() is None


async def test_a_take_whose_reply_is_lost_is_billed_once(redis_url, inference_address) -> None:
    """The context service's take of the session's summaries' usage runs in
    Redis, and its reply never comes back (the connection breaks): the
    router sends the take again with its take id, which answers what the
    first took."""
    proxy = TcpProxy(urllib.parse.urlsplit(redis_url).port)
    proxied = f"redis://127.0.0.1:{await proxy.start()}/0"
    take_script = session_store._TAKE_UNBILLED
    try:
        async with summarized_session(
            redis_url, inference_address, "lost", collect_s=1.0, services_redis_url=proxied
        ) as session:
            # Loaded, so that the take runs on its first send (EVALSHA).
            await session.client.script_load(take_script)
            for i in range(4):
                await session.chat(i)
            spent = await eventually(session.unbilled, timeout_s=60.0)
            # A sweep takes it 1 s or more after it was written: its reply is held.
            proxy.hold_when_sent(evalsha_marker(take_script))

            async def taken():
                return await session.unbilled() is None

            await eventually(taken, timeout_s=10.0)
            assert proxy.drop_held() == 1

            async def billed():
                row = await usage_row(session.stub, session.auth, MODEL)
                return row if row.summaries else None

            row = await eventually(billed, timeout_s=10.0)
            ((prompt_tokens, completion_tokens, summaries),) = spent.values()
            assert (row.summaries, row.summary_prompt_tokens, row.summary_completion_tokens) == (
                summaries,
                prompt_tokens,
                completion_tokens,
            )
            # Once: the router's later sweeps find nothing more to bill.
            await asyncio.sleep(2.5)
            assert len(await session.summaries_logged()) == 1
    finally:
        await proxy.close()
