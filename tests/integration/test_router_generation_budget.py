"""A turn's generation, over every deployment it tries, lasts at most
router.max_generation_s when its caller set no deadline.

Real router, context and cache, and two inference services in front of one
real Triton, each over a TCP proxy that holds Triton's answers back: both
inference services are up and answer the router's health checks SERVING,
but a generation sent to either waits. The first deployment's then fails
late, before any output (its proxy drops the connection, as a Triton server
that died), which the router hands to the second. Before, that try got a
fresh max_generation_s of its own, so the turn lasted about the first's
wait plus the whole of max_generation_s again: the router's health checks
end the calls only of a service that answers nothing, and these answer."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
import structlog

from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, Settings
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import running_inference, running_router, service_settings
from tests.mesh import bounded_channel, mesh_settings
from tests.tcp_proxy import TcpProxy

# Serial (make test runs it alone): bounds a failover by what is left of a budget.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

API_KEY = "generation-budget-key"
MAX_GENERATION_S = 4.0
# When the first deployment's generation fails, before any output: most of
# the turn's budget is gone by then.
FIRST_FAILS_AFTER_S = 3.0
# Room for a loaded machine past the budget; well short of the first's wait
# plus a fresh budget (7 s), which the turn took before.
SLACK_S = 1.5


def inference_settings(triton_url: str) -> Settings:
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    # Probed once, at start: probes left unanswered while the test holds
    # Triton's answers back would take the server out of rotation and end
    # the generation waiting there, which is not what this test is about.
    settings.inference.health_interval_s = 600
    return settings


async def test_a_deployment_failing_late_leaves_the_next_only_what_is_left_of_the_generations_budget(
    redis_url, triton_url
):
    triton_port = int(triton_url.rsplit(":", 1)[1])
    async with contextlib.AsyncExitStack() as stack:
        proxies, deployments = {}, []
        # "first" weighs more: while both are idle it is tried first.
        for name, weight in (("first", 2.0), ("second", 1.0)):
            proxy = proxies[name] = TcpProxy(triton_port)
            stack.push_async_callback(proxy.close)
            inference = await stack.enter_async_context(
                running_inference(inference_settings(f"127.0.0.1:{await proxy.start()}"))
            )
            deployments.append(
                DeploymentSettings(name=name, address=inference, model="tiny-gpt", weight=weight)
            )
        settings = service_settings(redis_url, deployments[1].address, API_KEY)
        settings.models = {
            "tiny-gpt": ModelSettings(routing_strategy="least_outstanding", deployments=deployments)
        }
        settings.router.max_generation_s = MAX_GENERATION_S
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        router = router_service_pb2_grpc.RouterServiceStub(channel)

        for proxy in proxies.values():
            proxy.hold()
        request = pb.ChatRequest(
            model="tiny-gpt",
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Hello there")],
            parameters=common_pb2.GenerationParameters(max_tokens=4),
            cache_policy=pb.CACHE_POLICY_BYPASS,
        )
        started = time.monotonic()
        # No deadline: the router's max_generation_s is the turn's only bound.
        call = router.Chat(request, metadata=[("authorization", f"Bearer {API_KEY}")])
        with structlog.testing.capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as failed:
            async with asyncio.timeout(3 * MAX_GENERATION_S):
                turn = asyncio.ensure_future(call.read())
                await asyncio.sleep(FIRST_FAILS_AFTER_S)
                assert not turn.done(), turn
                await proxies["first"].close()
                await turn
        took_s = time.monotonic() - started

    handed_on = [
        log["deployment"] for log in logs if log["event"] == "deployment unavailable or busy, trying the next"
    ]
    assert handed_on == ["first"], logs
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
    # Spent during the second try: the same reason as before a try.
    assert error_info(failed.value).reason == Reason.DEADLINE_EXCEEDED, failed.value
    assert MAX_GENERATION_S - 0.1 < took_s < MAX_GENERATION_S + SLACK_S, took_s
