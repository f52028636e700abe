"""A method of a service's API that its servicer does not implement, over a
real socket (meshgate/serving.py's server, its error interceptor): grpc's
generated base class raises NotImplementedError for it, which every
service answers UNIMPLEMENTED with ErrorInfo METHOD_NOT_IMPLEMENTED, not
as a bug (INTERNAL, logged with a traceback)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import structlog.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshgate import metrics, serving
from meshgate.errors import UNKNOWN_METHOD, error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.mesh import bounded_channel, rpc_outcomes
from tests.unit.test_telemetry_stream_close import spans  # noqa: F401 (a fixture)


class OneMethodRouter(router_service_pb2_grpc.RouterServiceServicer):
    """Implements ListModels alone, which fails as a bug of ours might."""

    async def ListModels(self, request, context):
        raise NotImplementedError("a bug that says so")


async def nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def router_channel():
    service = serving.Service("router", ["meshgate.router.v1.RouterService"])
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(OneMethodRouter(), service.server)
    port = await serving.start(service, "127.0.0.1:0", nothing)
    try:
        async with bounded_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await serving.stop(service, grace_s=0)


@contextlib.asynccontextmanager
async def router_stub():
    async with router_channel() as channel:
        yield router_service_pb2_grpc.RouterServiceStub(channel)


async def failure(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("GetSession", lambda stub: stub.GetSession(pb.GetSessionRequest(session_id="s"))),
        ("Chat", lambda stub: stub.Chat(pb.ChatRequest()).read()),
        # No request sent: a request the client's iterator wrote after the
        # server had ended the call raced its status, which grpc-core then
        # gave as INTERNAL "Internal error from Core" (once in CI, 2026-12-07).
        ("ChatSession", lambda stub: stub.ChatSession().read()),
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
            # The server counts the call as its handler ends, which may come
            # after the caller has the status: waited for here, before the
            # server stops with no grace and cancels what is still running
            # (a CI run read the count before it, and once without it).
            for _ in range(200):
                if rpc_outcomes("router", f"RouterService/{method}")["UNIMPLEMENTED"] > before:
                    break
                await asyncio.sleep(0.01)
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


def metric_methods() -> set[str]:
    """Every method label of this process's RPC metrics."""
    return {
        sample.labels["method"]
        for family in metrics.REGISTRY.collect()
        if family.name == "meshgate_rpc_requests"
        for sample in family.samples
    }


@pytest.mark.parametrize(
    "method", ["/meshgate.router.v1.RouterService/NoSuchMethod", "/made.up.v1.Service/Anything"]
)
async def test_a_method_in_no_api_is_unimplemented_with_error_info_and_named_in_no_metric_or_span(
    method,
    spans,  # noqa: F811
):
    """gRPC answered it itself: UNIMPLEMENTED "Method not found!", without
    ErrorInfo. The caller's name must not become a metric series or a span
    name (any string would); health and reflection still answer beside it."""
    before = rpc_outcomes("router", UNKNOWN_METHOD)["UNIMPLEMENTED"]
    async with router_channel() as channel:
        unknown = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        refused = await failure(unknown(b""))
        # A method of the API, for the spans' sake: it is traced.
        await failure(router_service_pb2_grpc.RouterServiceStub(channel).GetSession(pb.GetSessionRequest()))
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        reflected = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        listed = {service.name for service in (await reflected.read()).list_services_response.service}
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    info = error_info(refused)
    assert (info.domain, info.reason) == ("meshgate", Reason.METHOD_NOT_IMPLEMENTED)
    assert dict(info.metadata) == {"method": method}
    assert refused.details() == f"this service has no method {method}"
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "meshgate.router.v1.RouterService" in listed
    assert rpc_outcomes("router", UNKNOWN_METHOD)["UNIMPLEMENTED"] == before + 1
    made_up = method.rpartition("/")[2]
    assert not [label for label in metric_methods() if made_up in label]
    names = [span.name for span in spans.get_finished_spans()]
    assert method not in names and "/meshgate.router.v1.RouterService/GetSession" in names
