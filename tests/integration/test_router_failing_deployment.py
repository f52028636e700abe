"""Deployments whose health check answers SERVING and that can take no
turn. One whose every generation fails inside it: its Triton's tiny_gpt
loaded weights that break every forward pass (a final layer norm one entry
too long), so each request fails in the model, INTERNAL MODEL_ERROR, while
the model reads ready. The router must take it out of rotation on those
failures (its circuit), though it hands none of those turns on (the model
may have run). Before, only UNAVAILABLE counted against a deployment: beside
a healthy one it kept its share of the turns for good (22 of 40 failed, a
bug hunt).

One whose model setting names a model its inference service does not serve
(misconfigured): refused before anything ran, so counted against it and
handed on, and a caller told of the alias it asked for, never the model."""

from __future__ import annotations

import shutil
import uuid

import grpc
import numpy as np
import pytest
import structlog

from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, Settings
from meshgate.errors import error_info
from meshgate.local import triton
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests.integration.conftest import (
    answer_of,
    build_model_weights,
    launched_triton,
    running_inference,
    running_router,
    service_settings,
)
from tests.mesh import bounded_channel, mesh_settings

pytestmark = pytest.mark.integration

API_KEY = "failing-deployment-key"


@pytest.fixture(scope="module")
async def broken_inference(tmp_path_factory):
    """An inference service in front of a Triton whose tiny_gpt loads and
    reads ready, but fails every generation."""
    build_model_weights()
    repository = tmp_path_factory.mktemp("broken") / "repository"
    for model in ("tiny_gpt", "generation"):
        shutil.copytree(triton.DEFAULT_MODEL_REPOSITORY / model, repository / model)
    weights_path = repository / "tiny_gpt" / "1" / "weights.npz"
    with np.load(weights_path) as archive:
        weights = {name: archive[name] for name in archive.files}
    weights["ln_f.g"] = np.ones(weights["ln_f.g"].shape[0] + 1, np.float32)
    np.savez(weights_path, **weights)
    with launched_triton(tmp_path_factory, ("tiny_gpt",), repository) as (url, _):
        settings = Settings(mesh=mesh_settings())
        settings.inference.triton_urls = [url]
        async with running_inference(settings) as address:
            yield address


AUTH = (("authorization", f"Bearer {API_KEY}"),)


def chat_request() -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"hello {uuid.uuid4().hex}")],
        parameters=common_pb2.GenerationParameters(max_tokens=2),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


async def answered_by(stub) -> str:
    """The deployment that answered a turn, or the failure's code and reason."""
    try:
        call = stub.Chat(chat_request(), metadata=AUTH, timeout=30)
        return (await answer_of(call))[1].deployment
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name} {error_info(error).reason}"


async def test_a_deployment_serving_but_failing_every_generation_leaves_rotation(
    redis_url, inference_address, broken_inference
):
    settings = service_settings(redis_url, inference_address, API_KEY)
    settings.models = {
        "tiny-gpt": ModelSettings(
            # The broken one weighs more: while both admit traffic, every
            # turn goes to it first (least outstanding per unit of weight).
            routing_strategy="least_outstanding",
            deployments=[
                DeploymentSettings(name="broken", address=broken_inference, weight=2.0),
                DeploymentSettings(name="steady", address=inference_address),
            ],
        )
    }
    async with running_router(settings) as address, bounded_channel(address) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        answered = [await answered_by(stub) for _ in range(6)]
    # The failures that open a circuit (BreakerPolicy.failures_to_open),
    # each the caller's to see; then the steady one, while the circuit is
    # open (10 s: far longer than these turns).
    assert answered == [f"INTERNAL {Reason.MODEL_ERROR}"] * 3 + ["steady"] * 3


def misconfigured(inference_address: str, weight: float = 1.0) -> DeploymentSettings:
    """A deployment whose model setting names a model its inference service
    does not serve (a typo of tiny-gpt): every Generate there is refused
    NOT_FOUND MODEL_NOT_FOUND, "model 'tiny-gtp' is not served here",
    before any of it runs."""
    return DeploymentSettings(name="typo", address=inference_address, model="tiny-gtp", weight=weight)


# The router's log of each turn the misconfigured deployment refused.
REFUSED_THERE = "deployment's inference service does not serve its model; trying the next"


def refusals_logged(logs) -> int:
    return sum(entry["event"] == REFUSED_THERE and entry["model"] == "tiny-gtp" for entry in logs)


async def test_a_deployment_not_serving_its_model_leaves_rotation_and_hands_its_turns_on(
    redis_url, inference_address
):
    """Before, each refusal went to the caller as its own (NOT_FOUND
    MODEL_NOT_FOUND, the deployment's internal model named) and did not
    count against the deployment: weighing more, it took every turn, and
    6 of 6 failed."""
    settings = service_settings(redis_url, inference_address, API_KEY)
    settings.models = {
        "tiny-gpt": ModelSettings(
            # The misconfigured one weighs more: while both admit traffic,
            # every turn goes to it first (least outstanding per unit of weight).
            routing_strategy="least_outstanding",
            deployments=[
                misconfigured(inference_address, weight=2.0),
                DeploymentSettings(name="steady", address=inference_address),
            ],
        )
    }
    with structlog.testing.capture_logs() as logs:
        async with running_router(settings) as address, bounded_channel(address) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            answered = [await answered_by(stub) for _ in range(6)]
    # Nothing of a turn ran there, so each went on to the steady one.
    assert answered == ["steady"] * 6
    # Tried first until its circuit opened (BreakerPolicy.failures_to_open),
    # then not at all while it is open (10 s: far longer than these turns).
    assert refusals_logged(logs) == 3


async def test_a_turn_only_a_misconfigured_deployment_could_take_names_the_alias_not_its_model(
    redis_url, inference_address
):
    settings = service_settings(redis_url, inference_address, API_KEY)
    settings.models = {"tiny-gpt": ModelSettings(deployments=[misconfigured(inference_address)])}
    with structlog.testing.capture_logs() as logs:
        async with running_router(settings) as address, bounded_channel(address) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            assert await answered_by(stub) == f"UNAVAILABLE {Reason.NO_DEPLOYMENT_AVAILABLE}"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await answer_of(stub.Chat(chat_request(), metadata=AUTH, timeout=30))
    # The alias the caller asked for, not the model its deployment names:
    # that, with the deployment and its address, is the router's log's.
    assert refused.value.details() == (
        "no deployment of 'tiny-gpt' could serve: a deployment of it is misconfigured "
        "(its inference service does not serve its model)"
    )
    assert refusals_logged(logs) == 2
