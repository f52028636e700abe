"""A real router (context, cache, inference, Triton tiny_gpt, Redis) where one
tenant's router keys (its streams counter, its usage day hash) hold another
type: another tenant's turns, settled and recorded in the same batches,
are still settled and billed (a review's end-to-end reproduction: before
the fix the other tenant's streams stayed held, refused concurrent_streams,
and its served turns were missing from GetUsage)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid

import grpc
import pytest

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, TenantSettings, hash_api_key
from meshgate.errors import error_info
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.admission import Scope
from services.router.ledger import day_key
from tests.integration.conftest import running_router, service_settings
from tests.mesh import bounded_channel

pytestmark = pytest.mark.integration


def _ask(text: str, max_tokens: int = 4) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def test_a_tenant_whose_keys_hold_another_type_leaves_another_tenants_turns_settled_and_billed(
    redis_url, inference_address
):
    broken, victim = f"brk-{uuid.uuid4().hex[:6]}", f"vic-{uuid.uuid4().hex[:6]}"
    settings = service_settings(redis_url, inference_address)
    settings.router.tenants = [
        TenantSettings(
            id=tenant,
            api_key_sha256=[hash_api_key(f"key-{tenant}")],
            limits=LimitSettings(concurrent_streams=1 if tenant == victim else 50),
        )
        for tenant in (broken, victim)
    ]
    client = redis_access.connect(redis_url)
    today = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
    await client.set(day_key(broken, today), "not a hash")
    await client.set(Scope("tenant", broken, LimitSettings()).prefix + ":streams", "not a sorted set")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.aclose)
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        auth = {tenant: (("authorization", f"Bearer key-{tenant}"),) for tenant in (broken, victim)}
        stop = asyncio.Event()

        async def broken_tenant_turns() -> None:
            # Its turns end beside the victim's, in the same batches.
            while not stop.is_set():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for _ in stub.Chat(
                        _ask(f"noise {uuid.uuid4().hex[:4]}", 2), metadata=auth[broken], timeout=30
                    ):
                        pass

        noise = [asyncio.create_task(broken_tenant_turns()) for _ in range(3)]
        served, refused = 0, []
        try:
            for turn in range(12):
                try:
                    # One stream at a time: each turn needs the last's released.
                    async for _ in stub.Chat(_ask(f"victim turn {turn}"), metadata=auth[victim], timeout=30):
                        pass
                    served += 1
                except grpc.aio.AioRpcError as error:
                    info = error_info(error)
                    refused.append((error.code().name, info.reason if info else None))
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*noise)
        assert (served, refused) == (12, [])
        # Past the ledger's and the settlements' first retries (0.5 s, 1 s).
        for _ in range(40):
            usage = await stub.GetUsage(pb.GetUsageRequest(days=1), metadata=auth[victim], timeout=10)
            if sum(row.requests for row in usage.rows) >= 12:
                break
            await asyncio.sleep(0.1)
        assert sum(row.requests for row in usage.rows) == 12
        assert sum(row.failures for row in usage.rows) == 0
