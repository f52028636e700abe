"""A generation's or an embeddings request's time spent while an inference
service still works on it fails as the same time spent before a try does:
DEADLINE_EXCEEDED with the reason DEADLINE_EXCEEDED, over gRPC and over the
HTTP edge (504).

Real router, context and cache, and an inference service in front of the
real Triton over a TCP proxy that holds Triton's answers back: the service
is up and answers the router's health checks, but a generation or an
embedding sent there waits past router.max_generation_s. Before, the
router's own timer on that call ended it as a downstream failure
(DOWNSTREAM_FAILED, metadata code DEADLINE_EXCEEDED), while the same budget
found spent before a try was DEADLINE_EXCEEDED: one condition, two reasons
for a client to key on."""

from __future__ import annotations

import contextlib

import grpc
import httpx
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, Settings
from meshgate.errors import error_info
from meshgate.local.stack import free_port
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import running_inference, running_router, service_settings
from tests.mesh import bounded_channel, mesh_settings
from tests.tcp_proxy import TcpProxy

# Serial (make test runs it alone): races a service's deadline against the router's.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

API_KEY = "deadline-reasons-key"
MAX_GENERATION_S = 1.5


@pytest.fixture(scope="module")
async def held_router(redis_url, triton_url, inference_address):
    """The router's gRPC address and HTTP edge's base URL, its only
    deployment (and inference service) one whose Triton answers are held
    back. The cache embeds through the session's own inference service,
    which answers: only the turn's generation waits."""
    triton_port = int(triton_url.rsplit(":", 1)[1])
    async with contextlib.AsyncExitStack() as stack:
        proxy = TcpProxy(triton_port)
        stack.push_async_callback(proxy.close)
        inference_settings = Settings(mesh=mesh_settings())
        inference_settings.inference.triton_urls = [f"127.0.0.1:{await proxy.start()}"]
        # Probed once, at start: a probe held back would take the server out
        # of rotation, and the call waiting there would fail otherwise.
        inference_settings.inference.health_interval_s = 600
        held = await stack.enter_async_context(running_inference(inference_settings))
        settings = service_settings(redis_url, inference_address, API_KEY)
        settings.models = {
            "tiny-gpt": ModelSettings(
                deployments=[DeploymentSettings(name="held", address=held, model="tiny-gpt")]
            )
        }
        settings.router.max_generation_s = MAX_GENERATION_S
        settings.router.http_listen = f"127.0.0.1:{free_port()}"
        address = await stack.enter_async_context(running_router(settings))
        proxy.hold()
        yield address, f"http://{settings.router.http_listen}/v1"


def assert_generation_budget_spent(reason: str, metadata) -> None:
    assert reason == Reason.DEADLINE_EXCEEDED, (reason, metadata)
    assert metadata["max_generation_s"] == f"{MAX_GENERATION_S:g}", metadata
    # Where it was spent: in a call to an inference service.
    assert metadata["service"] == "inference", metadata


async def test_a_generation_budget_spent_during_a_try_is_deadline_exceeded_over_grpc(held_router):
    address, _ = held_router
    async with bounded_channel(address) as channel:
        router = router_service_pb2_grpc.RouterServiceStub(channel)
        # No deadline: the router's max_generation_s is the turn's only bound.
        call = router.Chat(
            pb.ChatRequest(
                model="tiny-gpt",
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Hello there")],
                parameters=common_pb2.GenerationParameters(max_tokens=4),
                cache_policy=pb.CACHE_POLICY_BYPASS,
            ),
            metadata=[("authorization", f"Bearer {API_KEY}")],
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
    info = error_info(failed.value)
    assert info is not None, failed.value
    assert_generation_budget_spent(info.reason, info.metadata)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/chat/completions",
            {
                "model": "tiny-gpt",
                "messages": [{"role": "user", "content": "Hello over HTTP"}],
                "max_tokens": 4,
            },
        ),
        ("/embeddings", {"model": "minilm", "input": ["a text the held service never embeds"]}),
    ],
    ids=["chat", "embeddings"],
)
async def test_a_generation_budget_spent_during_a_try_is_a_504_deadline_exceeded_over_http(
    held_router, path, body
):
    _, base_url = held_router
    async with httpx.AsyncClient(timeout=30) as http:
        answered = await http.post(base_url + path, json=body, headers={"authorization": f"Bearer {API_KEY}"})
    assert answered.status_code == 504, answered.text
    error = answered.json()["error"]
    assert error["type"] == "timeout_error", error
    assert_generation_budget_spent(error["code"], error["metadata"])
