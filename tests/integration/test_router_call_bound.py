"""router.max_concurrent_rpcs on a real router (in front of real context and
cache services, real Redis): with its ChatSession streams open up to the
bound, however idle, the next call is refused with RESOURCE_EXHAUSTED /
SERVICE_BUSY and its ErrorInfo, and once a stream closes the router serves
again."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import running_router
from tests.mesh import mesh_settings

pytestmark = pytest.mark.integration

KEY = "call-bound-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
LIMIT = 2


@pytest.fixture(scope="module")
async def router(redis_url):
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.router.dev_api_key = KEY
    settings.router.max_concurrent_rpcs = LIMIT
    # Nothing here embeds: no model loaded for it.
    settings.context.embedder = settings.cache.embedder = "inference"
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        yield router_service_pb2_grpc.RouterServiceStub(channel)


async def list_models(router) -> pb.ListModelsResponse | grpc.aio.AioRpcError:
    try:
        return await router.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error


async def test_calls_past_the_bound_are_refused_with_service_busy_until_a_stream_closes(router) -> None:
    # Idle streams (no turn sent) count while open. A stream reaches the
    # router a moment after it is opened, so one may arrive after a
    # ListModels of the loop below, and be the call refused: it is then
    # opened again, until the bound is held by streams alone.
    streams: list = []
    for _ in range(200):
        streams = [stream for stream in streams if not stream.done()]
        while len(streams) < LIMIT:
            streams.append(router.ChatSession(metadata=AUTH))
            await streams[-1].wait_for_connection()
        refused = await list_models(router)
        if isinstance(refused, grpc.aio.AioRpcError):
            break
        await asyncio.sleep(0.025)
    else:
        raise AssertionError("ListModels was never refused")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused)
    assert info.reason == Reason.SERVICE_BUSY
    assert (info.metadata["limit"], info.metadata["limit_value"], info.metadata["service"]) == (
        "max_concurrent_rpcs",
        str(LIMIT),
        "router",
    )
    # A stream that ends makes room.
    streams[0].cancel()
    for _ in range(200):
        served = await list_models(router)
        if isinstance(served, pb.ListModelsResponse):
            break
        await asyncio.sleep(0.025)
    assert served.models, served
    streams[1].cancel()
