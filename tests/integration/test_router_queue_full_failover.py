"""A tenant's full generation queue at one deployment's inference service
(RESOURCE_EXHAUSTED TOO_MANY_QUEUED_GENERATIONS, services/inference/
generation_slots.py) sends its turn to the model's next deployment, as
UNAVAILABLE before any text does; only when every deployment is full for
the tenant does the caller get that refusal, with its RetryInfo.

Real router, context and cache, and two inference services in front of one
real Triton, each admitting one tiny_gpt generation at a time
(``generation_slots = 1``) and queueing one more per tenant
(``max_queued_generations_per_tenant = 1``): a generation of the tenant's,
asked of that inference service directly, and one waiting behind it fill
its queue there. Triton's answers to the first are then held back (a TCP
proxy between that inference service and Triton), so that it holds the slot
for as long as the test needs, however fast the machine. Before, the router
passed the first deployment's refusal straight to the caller while the
other had room."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest

from meshgate import mesh_auth
from meshgate.common.v1 import common_pb2
from meshgate.config import DEV_TENANT_ID, DeploymentSettings, ModelSettings, Settings
from meshgate.errors import error_info, retry_after_s
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.inference.generation_slots import QUEUE_FULL_RETRY_AFTER_S
from tests.integration.conftest import answer_of, running_inference, running_router, service_settings
from tests.mesh import bounded_channel, mesh_settings, router_channel
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

API_KEY = "queue-full-failover-key"
DEPLOYMENTS = ("first", "second")


def inference_settings(triton_url: str) -> Settings:
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = [triton_url]
    # Probed once, at start: probes left unanswered while a test holds
    # Triton's answers back would take the server out of rotation.
    settings.inference.health_interval_s = 600
    settings.inference.models["tiny-gpt"].generation_slots = 1
    settings.inference.max_queued_generations_per_tenant = 1
    return settings


@pytest.fixture(scope="module")
async def mesh(redis_url, triton_url):
    """The router's stub, and per deployment (``first``, weight 2: tried
    first while both are idle; ``second``) its inference service's address
    and the proxy between it and Triton."""
    triton_port = int(triton_url.rsplit(":", 1)[1])
    async with contextlib.AsyncExitStack() as stack:
        deployments = {}
        for name in DEPLOYMENTS:
            proxy = TcpProxy(triton_port)
            stack.push_async_callback(proxy.close)
            proxied = f"127.0.0.1:{await proxy.start()}"
            address = await stack.enter_async_context(running_inference(inference_settings(proxied)))
            deployments[name] = (address, proxy)
        settings = service_settings(redis_url, deployments["second"][0], API_KEY)
        settings.models = {
            "tiny-gpt": ModelSettings(
                routing_strategy="least_outstanding",
                deployments=[
                    DeploymentSettings(
                        name=name, address=address, model="tiny-gpt", weight=2.0 if name == "first" else 1.0
                    )
                    for name, (address, _) in deployments.items()
                ],
            )
        }
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        yield router_service_pb2_grpc.RouterServiceStub(channel), deployments


def generation() -> inference_pb.GenerateRequest:
    return inference_pb.GenerateRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"Tell a story {uuid.uuid4().hex}")],
        parameters=common_pb2.GenerationParameters(max_tokens=400, temperature=1.0),
        tenant_id=DEV_TENANT_ID,
    )


@contextlib.asynccontextmanager
async def tenants_queue_full(deployment: tuple[str, TcpProxy]):
    """The dev tenant's queue for tiny_gpt full at a deployment's inference
    service: a generation of its own holds the one slot (Triton's answers
    to it held back) and another waits; a third asked there is refused
    (checked). Both end on leaving."""
    address, proxy = deployment
    # Minted per call, as the router does: tokens live 30 s.
    tokens = mesh_auth.Mesh(mesh_settings(), "router").tenant_tokens()
    async with router_channel(address, "inference") as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        calls = []

        def generate(timeout_s: float = 60):
            call = stub.Generate(
                generation(), metadata=tokens.metadata(DEV_TENANT_ID, "inference"), timeout=timeout_s
            )
            calls.append(call)
            return call

        try:
            running = generate()
            await running.read()  # its first text: it holds the slot
            proxy.hold()
            generate()
            await asyncio.sleep(0.5)  # in the queue by now (in-process, on this loop)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in generate(timeout_s=5):
                    pass
            assert error_info(refused.value).reason == Reason.TOO_MANY_QUEUED_GENERATIONS, refused.value
            yield running
        finally:
            for call in calls:
                call.cancel()
            proxy.release()


def question(text: str = "Hello there") -> pb.ChatRequest:
    # Greedy: turns go through the router's coalescer, as a shared generation.
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=4, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


def chat(router, request: pb.ChatRequest):
    return router.Chat(request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=30)


async def answered_by(router, request: pb.ChatRequest) -> str:
    _, completion = await answer_of(chat(router, request))
    return completion.deployment


async def test_a_turn_refused_for_the_tenants_full_queue_at_one_deployment_is_answered_by_the_next(mesh):
    router, deployments = mesh
    assert await answered_by(router, question()) == "first"
    async with tenants_queue_full(deployments["first"]) as running:
        # As many turns as open a circuit on failures (BreakerPolicy
        # .failures_to_open), two of them at once: one shared generation.
        answered = [await answered_by(router, question(f"turn {n}")) for n in range(3)]
        answered += await asyncio.gather(*(answered_by(router, question("together")) for _ in range(2)))
        assert not running.done()
    assert answered == ["second"] * 5
    # A full queue is a busy, healthy server: its circuit stayed closed, so
    # it is first again (weight 2) once it has room.
    assert await answered_by(router, question("after")) == "first"


async def test_the_tenants_queue_full_at_every_deployment_is_the_callers_with_when_to_retry(mesh):
    router, deployments = mesh
    async with tenants_queue_full(deployments["first"]), tenants_queue_full(deployments["second"]):
        refusals = []
        for call in [chat(router, question("together")) for _ in range(2)]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await answer_of(call)
            refusals.append(refused.value)
    for refusal in refusals:
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refusal)
        assert info.reason == Reason.TOO_MANY_QUEUED_GENERATIONS
        assert info.metadata["limit"] == "max_queued_generations_per_tenant"
        assert retry_after_s(refusal) == QUEUE_FULL_RETRY_AFTER_S
