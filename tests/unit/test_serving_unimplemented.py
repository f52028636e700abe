"""A method of a service's API that its servicer does not implement, over a
real socket (meshgate/serving.py's server, its error interceptor): grpc's
generated base class raises NotImplementedError for it, which every
service answers UNIMPLEMENTED with ErrorInfo METHOD_NOT_IMPLEMENTED, not
as a bug (INTERNAL, logged with a traceback)."""

from __future__ import annotations

import contextlib

import grpc
import pytest
import structlog.testing

from meshgate import serving
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.mesh import bounded_channel, rpc_outcomes


class OneMethodRouter(router_service_pb2_grpc.RouterServiceServicer):
    """Implements ListModels alone, which fails as a bug of ours might."""

    async def ListModels(self, request, context):
        raise NotImplementedError("a bug that says so")


async def nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def router_stub():
    service = serving.Service("router", ["meshgate.router.v1.RouterService"])
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(OneMethodRouter(), service.server)
    port = await serving.start(service, "127.0.0.1:0", nothing)
    try:
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            yield router_service_pb2_grpc.RouterServiceStub(channel)
    finally:
        await serving.stop(service, grace_s=0)


async def failure(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("GetSession", lambda stub: stub.GetSession(pb.GetSessionRequest(session_id="s"))),
        ("Chat", lambda stub: stub.Chat(pb.ChatRequest()).read()),
        ("ChatSession", lambda stub: stub.ChatSession(iter([pb.ChatSessionRequest()])).read()),
    ],
    ids=["unary", "server streaming", "bidirectional"],
)
async def test_a_method_the_servicer_does_not_implement_is_unimplemented_with_error_info(method, call):
    """It was INTERNAL "internal error", logged as an unhandled error."""
    full_name = f"/meshgate.router.v1.RouterService/{method}"
    before = rpc_outcomes("router", f"RouterService/{method}")["UNIMPLEMENTED"]
    with structlog.testing.capture_logs() as logs:
        async with router_stub() as stub:
            refused = await failure(call(stub))
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    info = error_info(refused)
    assert (info.domain, info.reason) == ("meshgate", Reason.METHOD_NOT_IMPLEMENTED)
    assert dict(info.metadata) == {"method": full_name}
    assert refused.details() == f"this service does not implement {full_name}"
    assert [entry for entry in logs if entry["event"] == "unhandled error"] == []
    assert rpc_outcomes("router", f"RouterService/{method}")["UNIMPLEMENTED"] == before + 1


async def test_a_not_implemented_error_of_our_own_code_is_still_a_bug():
    with structlog.testing.capture_logs() as logs:
        async with router_stub() as stub:
            refused = await failure(stub.ListModels(pb.ListModelsRequest()))
    assert refused.code() == grpc.StatusCode.INTERNAL
    assert error_info(refused).reason == Reason.INTERNAL
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["unhandled error"]
