"""A reload re-applies router.max_concurrent_rpcs (services/router/app.py
reload): a real router (its context, cache and inference never called,
its Redis never reached: ListModels and a turn refused up front need none)
over 127.0.0.1, its bound changed while a stream is in flight."""

from __future__ import annotations

import contextlib
import dataclasses

import grpc

from meshgate import serving
from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router import app as router_app
from tests.mesh import mesh_settings

KEY = "reload-call-bound-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


def settings_bounded_at(max_calls: int) -> Settings:
    settings = Settings(mesh=mesh_settings())
    # Nothing listens there: nothing here may need Redis.
    settings.redis.url = "redis://127.0.0.1:9/0"
    settings.router = dataclasses.replace(
        settings.router, dev_api_key=KEY, http_listen="", hot_exact_entries=0, max_concurrent_rpcs=max_calls
    )
    return settings


@contextlib.asynccontextmanager
async def router(settings: Settings):
    """(a stub to a router started with ``settings``, its Service)."""
    service = serving.Service("router", router_app.SERVICE_NAMES)
    cleanup = await router_app.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield router_service_pb2_grpc.RouterServiceStub(channel), service
    finally:
        await serving.stop(service, grace_s=0)


async def held_stream(stub) -> grpc.aio.StreamStreamCall:
    """A ChatSession stream, admitted (it answered a turn with no model in the stream)."""
    stream = stub.ChatSession(metadata=AUTH)
    await stream.write(pb.ChatSessionRequest())
    assert (await stream.read()).failure
    return stream


async def busy_limit(stub) -> str | None:
    """The bound ListModels was refused at, or None when it was served."""
    try:
        await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        assert info.reason == Reason.SERVICE_BUSY, error
        return info.metadata["limit_value"]
    return None


async def test_a_reload_applies_a_new_bound_to_a_router_with_calls_in_flight():
    async with router(settings_bounded_at(1)) as (stub, service):
        first = await held_stream(stub)
        assert await busy_limit(stub) == "1"
        (reload,) = service.reload_hooks
        reload(settings_bounded_at(2))
        assert await busy_limit(stub) is None
        second = await held_stream(stub)
        # The stream held across the reload still counts: two of two.
        assert await busy_limit(stub) == "2"
        reload(settings_bounded_at(0))
        assert await busy_limit(stub) is None
        first.cancel()
        second.cancel()
