"""A session's summaries' usage is billed exactly once, though a router dies
between a take and its ledger write: through a real context service and a
real router over a real Redis (no model: the usage is written into the
session's usage record as a summary's writer writes it)."""

from __future__ import annotations

import asyncio
import datetime
import uuid

import pytest
import redis.asyncio as redis

from meshgate.common.v1 import common_pb2
from meshgate.config import (
    LimitSettings,
    PriceSettings,
    Settings,
    TenantSettings,
    hash_api_key,
    summary_usage_ttl_s,
)
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.mesh_auth import TenantTokens
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.context import app as context_app
from services.context import store as session_store
from services.router import app as router_app
from services.router.admission import Scope
from services.router.downstream import ContextService
from services.router.ledger import STREAM
from tests.integration.conftest import running
from tests.integration.test_router_accounting import eventually
from tests.mesh import bounded_channel, mesh_settings, router_channel

pytestmark = pytest.mark.integration

MODEL = "summarizer"


async def test_usage_a_router_took_and_died_before_billing_is_billed_once(redis_url) -> None:
    """A router takes a session's summaries' usage from the context service
    (its own client's take) and dies before its ledger write: the take is
    held for it, and a router sweeping after the claim period is offered
    the same take, bills it, and no sweep after bills it again, to the
    ledger and to the budgets. Its markers live as long as the context
    service may hold the take: kept a day, a take written and offered again
    later than that (no router sweeping meanwhile) was billed twice."""
    tenant = f"died-{uuid.uuid4().hex[:8]}"
    key = f"key-{tenant}"
    key_id = hash_api_key(key)[:16]
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.models = {}
    settings.router.dev_tenant = False
    settings.router.tenants = [
        TenantSettings(
            id=tenant, api_key_sha256=[hash_api_key(key)], limits=LimitSettings(tokens_per_day=10_000)
        )
    ]
    settings.router.prices = {
        MODEL: PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=2.0)
    }
    # The claim period: a take held for a dead router is offered again after it.
    settings.router.summary_usage_collect_s = 0.3
    client = redis.Redis.from_url(redis_url)
    try:
        async with running(context_app, "context", settings) as context_address:
            settings.router.context_address = context_address
            async with router_channel(context_address, "context") as channel:
                stub = context_service_pb2_grpc.ContextServiceStub(channel)
                created = await stub.CreateSession(context_pb.CreateSessionRequest(tenant_id=tenant))
                session_id = created.session.session_id
                await stub.AppendTurns(
                    context_pb.AppendTurnsRequest(
                        tenant_id=tenant,
                        session_id=session_id,
                        any_version=True,
                        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="x")],
                        key_id=key_id,
                    )
                )
                # What a summary's writer does (summaries.SummaryStore.put), without a model.
                await session_store.OwedSessions(client).mark(tenant, session_id)
                record = session_store.unbilled_key(tenant, session_id)
                await client.hset(record, "unbilled", f'{{"{MODEL}": [40, 10, 1]}}')

                # The router that dies: its claim and its take, answered; no ledger write.
                dying = ContextService(stub, TenantTokens(None, 60), settings.router)
                claimed = await dying.claim_owed_summary_usage(0.0, 100)
                assert [owed.session_id for owed in claimed if owed.tenant_id == tenant] == [session_id]
                take_id = uuid.uuid4().hex
                await dying.take_summary_usage(tenant, session_id, take_id)
                assert await client.hget(record, "unbilled") is None

            async with (
                running(router_app, "router", settings) as address,
                bounded_channel(address) as channel,
            ):
                router = router_service_pb2_grpc.RouterServiceStub(channel)
                auth = (("authorization", f"Bearer {key}"),)

                async def billed():
                    usage = await router.GetUsage(pb.GetUsageRequest(), metadata=auth, timeout=10)
                    return [row for row in usage.rows if row.summaries]

                (row,) = await eventually(billed, timeout_s=10.0)
                assert (row.key_id, row.model, row.summaries) == (key_id, MODEL, 1)
                assert (row.summary_prompt_tokens, row.summary_completion_tokens) == (40, 10)
                # Once: the sweeps of 1.5 s more (several claim periods) bill nothing again.
                await asyncio.sleep(1.5)
                assert await billed() == [row]
        budget = Scope("tenant", tenant, LimitSettings()).prefix
        day = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
        assert int(await client.get(f"{budget}:tokens:day:{day}")) == 50
        held_for_s = summary_usage_ttl_s(settings.context.session_ttl_s)
        for marker in (
            f"mg:router:usage:{{t:{tenant}}}:take:{take_id}",
            f"mg:router:limit:{{t:{tenant}}}:take:{take_id}",
        ):
            assert held_for_s - 60 < await client.ttl(marker) <= held_for_s, marker
        logged = [
            fields
            for _, fields in await client.xrevrange(STREAM, count=1000)
            if fields[b"tenant"] == tenant.encode() and fields[b"cache_status"] == b"summary"
        ]
        assert len(logged) == 1
    finally:
        await client.aclose()
