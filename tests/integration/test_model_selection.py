"""Model selection through real services: a router in front of real
context, cache and inference services (real Redis, real Triton), with an
alias "auto" that selects between a "fast" and a "strong" alias. Both are
tiny-gpt on the one Triton here (smollm2 would add seconds of loading and
nothing to what is tested: which alias, and so which deployment, answers);
their deployments have names of their own, so the completion's deployment
shows where the turn really went (the strong alias has two, balanced by
least_outstanding), and the prompt's embedding comes from the real minilm
model through the inference service's Embed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import (
    DeploymentSettings,
    ModelSettings,
    SelectionSettings,
    Settings,
    TenantSettings,
    hash_api_key,
)
from meshgate.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2_grpc
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.model_selection import FEATURE_SCAN_CHARS
from tests.integration.conftest import answer_of, running_router, service_settings
from tests.mesh import bounded_channel

# Serial (make test runs it alone): bounds a call's latency beside prompts at 0.4 s.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

KEY = "selection-test-key"
PREMIUM_KEY = "selection-premium-key"

STRONG_DEPLOYMENTS = ("strong-a", "strong-b")

EASY = "What is the capital of France?"
HARD = (
    "Write a Python function that merges k sorted lists in O(n log k) time. It must not use heapq, "
    "should handle empty lists, and then explain step by step why it is correct."
)


def _settings(redis_url: str, inference_address: str, embedding_timeout_s: float) -> Settings:
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.tenants = [
        TenantSettings(id="gold", api_key_sha256=[hash_api_key(PREMIUM_KEY)], tier="premium")
    ]
    rules = SelectionSettings(
        fast="fast", strong="strong", strong_tiers=["premium"], embedding_timeout_s=embedding_timeout_s
    )
    settings.models = {
        "auto": ModelSettings(max_output_tokens=32, selection=rules),
        "fast": ModelSettings(
            deployments=[DeploymentSettings(name="fast-local", address=inference_address, model="tiny-gpt")]
        ),
        "strong": ModelSettings(
            routing_strategy="least_outstanding",
            deployments=[
                DeploymentSettings(name=name, address=inference_address, model="tiny-gpt")
                for name in STRONG_DEPLOYMENTS
            ],
        ),
    }
    return settings


@contextlib.asynccontextmanager
async def _router(settings: Settings):
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        yield router_service_pb2_grpc.RouterServiceStub(channel)


@pytest.fixture(scope="module")
async def router(redis_url, inference_address):
    async with _router(_settings(redis_url, inference_address, embedding_timeout_s=5.0)) as stub:
        yield stub


async def _completion(stub, text: str, key: str = KEY) -> tuple[str, pb.ChatCompletion]:
    request = pb.ChatRequest(
        model="auto",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=4),
        # Each turn generated: a cached answer would say nothing of routing.
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )
    return await answer_of(stub.Chat(request, metadata=[("authorization", f"Bearer {key}")], timeout=60))


async def test_an_easy_question_goes_to_the_fast_model_and_the_completion_says_why(router):
    text, completion = await _completion(router, EASY)
    assert text
    assert (completion.selected_model, completion.deployment) == ("fast", "fast-local")
    # The real embedding was used (the reason would say features_only otherwise).
    assert completion.selection_reason == "complexity"
    assert 0.0 < completion.selection_score < 0.5


async def test_a_hard_request_goes_to_the_strong_model(router):
    _, completion = await _completion(router, HARD)
    assert completion.selected_model == "strong"
    assert completion.deployment in STRONG_DEPLOYMENTS
    assert completion.selection_reason == "complexity"
    assert completion.selection_score >= 0.5


async def test_turns_selected_onto_an_alias_are_balanced_over_its_deployments(router):
    """Asking where to embed the prompt ranked the strong alias's
    deployments, which turns least_outstanding's rotation of ties; the turn
    then ranked them again to generate: two turns of the rotation a turn,
    so every turn on idle deployments went to the same one of the two."""
    deployments = [(await _completion(router, HARD))[1].deployment for _ in range(4)]
    assert sorted(deployments) == sorted(STRONG_DEPLOYMENTS * 2), deployments


async def test_prompts_of_full_stops_before_a_letter_do_not_stall_other_callers(router):
    # The prompt's sentence count, tried from every mark of a run of them,
    # scanned the run again to the letter after it: ~0.6 s of the router's
    # event loop per prompt, during which it answered nobody. The selection
    # comes first; tiny-gpt's context then refuses these prompts (a model
    # with a longer one answers them).
    prompts = [f"{uuid.uuid4().hex} " + "." * (FEATURE_SCAN_CHARS - 34) + "x" for _ in range(4)]
    metadata = [("authorization", f"Bearer {KEY}")]
    turns = asyncio.ensure_future(
        asyncio.gather(*(_completion(router, prompt) for prompt in prompts), return_exceptions=True)
    )
    # Another caller's cheapest call, answered from memory, meanwhile; the
    # pause after it is timed too (all of this test shares the router's
    # event loop, so a stall can fall in either).
    slowest = 0.0
    while not turns.done():
        started = time.perf_counter()
        await router.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
        await asyncio.sleep(0.01)
        slowest = max(slowest, time.perf_counter() - started)
    refusals = await turns
    assert all(isinstance(refusal, grpc.aio.AioRpcError) for refusal in refusals), refusals
    assert {refusal.code() for refusal in refusals} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert slowest < 0.4, f"a ListModels call and a 10 ms pause took {slowest:.2f} s beside the prompts"


async def test_a_premium_tenant_gets_the_strong_model_for_an_easy_question(router):
    _, completion = await _completion(router, EASY, key=PREMIUM_KEY)
    assert completion.selected_model == "strong"
    assert completion.deployment in STRONG_DEPLOYMENTS
    assert (completion.selection_reason, completion.selection_score) == ("tier", 0.0)


async def test_a_model_that_selects_nothing_reports_itself_and_no_reason(router):
    request = pb.ChatRequest(
        model="fast",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=HARD)],
        parameters=common_pb2.GenerationParameters(max_tokens=4),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )
    completion = None
    async for response in router.Chat(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60):
        if response.HasField("completion"):
            completion = response.completion
    assert (completion.selected_model, completion.selection_reason) == ("fast", "")


async def test_without_the_embedding_in_time_the_features_decide_and_the_turn_is_answered(
    redis_url, inference_address
):
    # A deadline no Embed call can meet. gRPC sends deadlines in whole
    # milliseconds, so the inference service may see up to ~1 ms left: time
    # enough for a vector it remembers (its memo holds EASY and HARD from the
    # tests above), not for Triton's ~5 ms. So each question here is one no
    # earlier call has embedded; the Embed has to reach Triton and misses.
    settings = _settings(redis_url, inference_address, embedding_timeout_s=1e-6)
    async with _router(settings) as stub:
        for prompt, model in ((EASY, "fast"), (HARD, "strong")):
            text, completion = await _completion(stub, f"{prompt} ({uuid.uuid4().hex})")
            assert text
            assert completion.selected_model == model
            assert completion.selection_reason == "complexity_features_only"


async def test_invalidating_a_selecting_alias_removes_the_answers_it_stored(redis_url, inference_address):
    """A bug hunt: answers of "auto" are stored under the model it chose,
    so InvalidateCache of "auto" removed nothing and they went on being
    served. Both of its models' answers go now."""
    settings = _settings(redis_url, inference_address, embedding_timeout_s=5.0)
    settings.router.admin_api_key_sha256 = [hash_api_key("selection-admin")]
    admin_auth = [("authorization", "Bearer selection-admin")]
    question = f"{EASY} ({uuid.uuid4().hex})"

    async def ask(stub) -> pb.ChatCompletion:
        request = pb.ChatRequest(
            model="auto",
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=question)],
            parameters=common_pb2.GenerationParameters(max_tokens=4, temperature=0.0),
        )
        return (
            await answer_of(stub.Chat(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60))
        )[1]

    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        assert (await ask(stub)).cache_status == pb.CACHE_STATUS_MISS
        assert (await ask(stub)).cache_status == pb.CACHE_STATUS_EXACT_HIT
        removed = await admin.InvalidateCache(
            admin_service_pb2.InvalidateCacheRequest(tenant_id="dev", model="auto"),
            metadata=admin_auth,
            timeout=30,
        )
        assert removed.entries_removed >= 1
        assert (await ask(stub)).cache_status == pb.CACHE_STATUS_MISS
