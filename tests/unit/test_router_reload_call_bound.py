"""A reload re-applies router.max_concurrent_rpcs and
router.max_concurrent_rpcs_per_tenant (services/router/app.py reload): a
real router (its context, cache and inference never called, its Redis never
reached: ListModels and a turn refused up front need none) over 127.0.0.1,
its bounds changed while streams are in flight."""

from __future__ import annotations

import contextlib
import dataclasses

import grpc

from meshgate import serving
from meshgate.config import Settings, TenantSettings, hash_api_key
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router import app as router_app
from tests.mesh import CALL_TIMEOUT_S, bounded_channel, chat_session_admitted, mesh_settings

KEY = "reload-call-bound-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
OTHER_KEY = "reload-call-bound-other-key"
OTHER = (("authorization", f"Bearer {OTHER_KEY}"),)
# A tenant that holds nothing: its calls probe the replica's bound.
PROBE_KEY = "reload-call-bound-probe-key"
PROBE = (("authorization", f"Bearer {PROBE_KEY}"),)


def settings_bounded_at(max_calls: int, tenant_cap: int) -> Settings:
    """A bound of ``max_calls`` (0: none) and each tenant's calls and
    streams capped at ``tenant_cap``."""
    settings = Settings(mesh=mesh_settings())
    # Nothing listens there: nothing here may need Redis.
    settings.redis.url = "redis://127.0.0.1:9/0"
    settings.router = dataclasses.replace(
        settings.router,
        dev_api_key=KEY,
        tenants=[
            TenantSettings(id=tenant_id, api_key_sha256=[hash_api_key(key)], models=["*"])
            for tenant_id, key in (("other", OTHER_KEY), ("probe", PROBE_KEY))
        ],
        http_listen="",
        hot_exact_entries=0,
        max_concurrent_rpcs=max_calls,
        max_concurrent_rpcs_per_tenant=tenant_cap,
        max_session_streams_per_tenant=tenant_cap,
    )
    return settings


@contextlib.asynccontextmanager
async def router(settings: Settings):
    """(a stub to a router started with ``settings``, its Service)."""
    service = serving.Service("router", router_app.SERVICE_NAMES)
    cleanup = await router_app.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    try:
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            yield router_service_pb2_grpc.RouterServiceStub(channel), service
    finally:
        await serving.stop(service, grace_s=0)


async def held_stream(stub, metadata=AUTH) -> grpc.aio.StreamStreamCall:
    """A ChatSession stream, admitted (it said so before its first turn,
    and answered a turn with no model in the stream)."""
    stream = stub.ChatSession(metadata=metadata, timeout=CALL_TIMEOUT_S)
    assert await chat_session_admitted(stream), await stream.code()
    await stream.write(pb.ChatSessionRequest())
    assert (await stream.read()).failure
    return stream


async def refused_at(stub, metadata=PROBE, reason=Reason.SERVICE_BUSY) -> str | None:
    """The bound or cap the caller's ListModels was refused at (with
    ``reason``), or None when it was served."""
    try:
        await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        assert info.reason == reason, error
        return info.metadata["limit_value"]
    return None


async def test_a_reload_applies_a_new_bound_to_a_router_with_calls_in_flight():
    # Each tenant's calls capped below the bound, as the settings require.
    async with router(settings_bounded_at(2, tenant_cap=1)) as (stub, service):
        held = [await held_stream(stub), await held_stream(stub, OTHER)]
        assert await refused_at(stub) == "2"
        (reload,) = service.reload_hooks
        reload(settings_bounded_at(3, tenant_cap=2))
        assert await refused_at(stub) is None
        held.append(await held_stream(stub))
        # The streams held across the reload still count: three of three.
        assert await refused_at(stub) == "3"
        reload(settings_bounded_at(0, tenant_cap=2))
        assert await refused_at(stub) is None
        for stream in held:
            stream.cancel()


async def test_a_reload_applies_a_new_cap_on_each_tenants_calls_with_calls_in_flight():
    async with router(settings_bounded_at(0, tenant_cap=1)) as (stub, service):
        held = [await held_stream(stub)]
        assert await refused_at(stub, AUTH, Reason.TOO_MANY_CALLS_IN_FLIGHT) == "1"
        (reload,) = service.reload_hooks
        reload(settings_bounded_at(0, tenant_cap=2))
        assert await refused_at(stub, AUTH) is None
        held.append(await held_stream(stub))
        # The stream held across the reload still counts: two of two.
        assert await refused_at(stub, AUTH, Reason.TOO_MANY_CALLS_IN_FLIGHT) == "2"
        reload(settings_bounded_at(0, tenant_cap=0))
        assert await refused_at(stub, AUTH) is None
        for stream in held:
            stream.cancel()
