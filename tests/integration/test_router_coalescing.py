"""Coalescing and prompt templates through real services: the router in
front of real context, cache and inference services, real Redis and a real
Triton, whose own statistics count the generations."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import tritonclient.grpc.aio as triton_grpc

from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    TemplateMessageSettings,
    TemplateParameterSettings,
    TemplateSettings,
)
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router import coalescing
from tests.integration.conftest import running_router, service_settings
from tests.mesh import bounded_channel, router_channel

# Serial (make test runs it alone): a caller's deadline is a third of a solo answer.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

KEY = "coalescing-test-key"
AUTH = [("authorization", f"Bearer {KEY}")]
# Long enough that callers started together overlap (tiny-gpt: a few
# hundred tokens/s on this machine); identical callers share it anyway.
MAX_TOKENS = 200
CALLERS = 4


@pytest.fixture(scope="module")
async def services(redis_url, inference_address):
    """A stub of the router's public port, and one of its cache service
    (with the router's tokens), whose stats count the Stores."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.templates = [
        TemplateSettings(
            name="explain",
            version=1,
            messages=[
                TemplateMessageSettings(role="system", content="You explain $topic to $audience."),
                TemplateMessageSettings(role="user", content="Explain $topic in one line."),
            ],
            parameters=TemplateParameterSettings(max_tokens=5, temperature=0.0),
            models=["tiny-gpt"],
        )
    ]
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        cache = router_channel(settings.router.cache_address, "cache")
        cache_channel = await stack.enter_async_context(cache)
        yield (
            router_service_pb2_grpc.RouterServiceStub(channel),
            cache_service_pb2_grpc.CacheServiceStub(cache_channel),
        )


@pytest.fixture(scope="module")
def router(services):
    return services[0]


@pytest.fixture(scope="module")
def cache_stores(services):
    """Reads how many Stores the cache service has written."""
    cache = services[1]

    async def count() -> int:
        return (await cache.GetStats(cache_pb.GetStatsRequest())).stores

    return count


@pytest.fixture(scope="module")
async def triton_generations(triton_url):
    """Reads how many generation requests Triton's tiny_gpt has completed."""
    client = triton_grpc.InferenceServerClient(triton_url)

    async def count() -> int:
        statistics = await client.get_inference_statistics(model_name="tiny_gpt")
        (model,) = statistics.model_stats
        return model.inference_stats.success.count

    yield count
    await client.close()


def ask(text: str, **parameters) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS, **parameters),
        # No cache in the way: each call would otherwise be an exact hit.
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )


class Caller:
    """One Chat call, read in the background."""

    def __init__(self, router, request: pb.ChatRequest, timeout_s: float = 120) -> None:
        self.call = router.Chat(request, metadata=AUTH, timeout=timeout_s)
        self.pieces: list[str] = []
        self.completion: pb.ChatCompletion | None = None
        self.first_delta = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            if response.HasField("completion"):
                self.completion = response.completion
            else:
                self.pieces.append(response.delta.text)
                self.first_delta.set()

    @property
    def text(self) -> str:
        """The whole answer: the deltas, then what the completion carries
        (for a request that set completion_may_carry_text)."""
        return "".join(self.pieces) + (self.completion.text if self.completion else "")

    async def cancel(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def answer(router, request) -> tuple[str, pb.ChatCompletion]:
    caller = Caller(router, request)
    await caller.task
    assert caller.completion is not None
    return caller.text, caller.completion


async def settled(count, expected: int, timeout_s: float = 30.0) -> int:
    """Triton's count once it reaches ``expected`` (statistics are updated as
    a request's last response goes out, which may trail our completion)."""
    async with asyncio.timeout(timeout_s):
        while await count() < expected:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and no more arrive after it
    return await count()


async def test_identical_concurrent_greedy_requests_cost_one_generation_at_triton(router, triton_generations):
    question = "Why is the sky blue? Answer at length."
    before = await triton_generations()
    # Every other caller reads the last text on its completion: one flight serves both kinds.
    requests = [ask(question, temperature=0.0) for _ in range(CALLERS)]
    for request in requests[1::2]:
        request.completion_may_carry_text = True
    callers = [Caller(router, request) for request in requests]
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in callers)), 120)
    assert await settled(triton_generations, before + 1) == before + 1
    reference = callers[0]
    assert reference.completion.usage.completion_tokens > 0
    assert all(caller.completion.text for caller in callers[1::2])
    assert not any(caller.completion.text for caller in callers[::2])
    for caller in callers:
        assert caller.text == reference.text and caller.text
        # Each caller's completion carries (and is billed) the whole usage.
        assert caller.completion.usage == reference.completion.usage
        assert caller.completion.finish_reason == reference.completion.finish_reason


async def test_callers_sharing_a_generation_store_its_answer_once(router, triton_generations, cache_stores):
    """Each caller stored the shared answer under the one entry: as many
    Stores (Redis writes, notices to every router's hot tier, quota
    charges) as callers, for one generation."""
    request = ask("Why is the sea salty? Answer at length.", temperature=0.0)
    request.cache_policy = pb.CACHE_POLICY_USE
    generations, stores = await triton_generations(), await cache_stores()
    callers = [Caller(router, request) for _ in range(CALLERS)]
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in callers)), 120)
    assert await settled(triton_generations, generations + 1) == generations + 1
    # Every caller's completion waited for the Store: it is done.
    assert await cache_stores() == stores + 1
    assert {caller.completion.cache_status for caller in callers} == {pb.CACHE_STATUS_MISS}
    # And it holds the shared answer.
    text, completion = await answer(router, request)
    assert completion.cache_status == pb.CACHE_STATUS_EXACT_HIT and text == callers[0].text


async def test_the_answer_is_stored_once_when_the_caller_that_began_it_leaves(router, cache_stores):
    request = ask("Tell me about the history of coffee, please.", temperature=0.0)
    request.cache_policy = pb.CACHE_POLICY_USE
    stores = await cache_stores()
    first = Caller(router, request)
    await asyncio.wait_for(first.first_delta.wait(), 60)
    late = [Caller(router, request) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*(caller.first_delta.wait() for caller in late)), 60)
    await first.cancel()
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in late)), 120)
    assert late[0].completion.usage.completion_tokens >= 50, "tiny-gpt stopped early; pick another prompt"
    assert await cache_stores() == stores + 1
    text, completion = await answer(router, request)
    assert completion.cache_status == pb.CACHE_STATUS_EXACT_HIT and text == late[0].text


async def test_sampled_requests_each_generate(router, triton_generations):
    before = await triton_generations()
    callers = [Caller(router, ask("Why is the sky blue? Sampled.")) for _ in range(CALLERS)]
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in callers)), 120)
    assert await settled(triton_generations, before + CALLERS) == before + CALLERS


async def test_one_caller_cancelling_leaves_the_others_the_whole_answer(router, triton_generations):
    request = ask("Tell me about the history of tea, please.", seed=7, temperature=0.9)
    alone, alone_completion = await answer(router, request)
    # Long enough that the callers below overlap.
    assert alone_completion.usage.completion_tokens >= 50, "tiny-gpt stopped early; pick another prompt"

    before = await triton_generations()
    first = Caller(router, request)
    await asyncio.wait_for(first.first_delta.wait(), 60)
    late = [Caller(router, request) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*(caller.first_delta.wait() for caller in late)), 60)
    # The caller whose turn started the generation leaves mid-stream.
    await first.cancel()
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in late)), 120)
    for caller in late:
        # The late joiners got the pieces they missed, then the live stream.
        assert caller.text == alone
        assert caller.completion.usage == alone_completion.usage
    assert await settled(triton_generations, before + 1) == before + 1


async def test_the_last_caller_cancelling_ends_the_generation(router, triton_generations):
    request = ask("Describe a long walk along the river at dawn.", temperature=0.0)
    alone, _ = await answer(router, request)
    callers = [Caller(router, request) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*(caller.first_delta.wait() for caller in callers)), 60)
    for caller in callers:
        await caller.cancel()
    # Nothing is left to join: the next identical request generates afresh
    # and gets the whole answer.
    before = await triton_generations()
    again, completion = await answer(router, request)
    assert again == alone and completion.finish_reason
    assert await settled(triton_generations, before + 1) == before + 1


async def test_a_joiner_cancelled_by_its_deadline_does_not_end_the_shared_generation(
    router, triton_generations, monkeypatch
):
    """A caller that joined a generation under way and then went away (its
    own client deadline passed, so gRPC cancelled its call) leaves the
    generation to the caller that started it, whole, with one generation at
    Triton."""
    request = ask("Tell me a long story about a lighthouse keeper.", temperature=0.0)
    request.parameters.max_tokens = 256
    started = asyncio.get_running_loop().time()
    alone, alone_completion = await answer(router, request)
    alone_s = asyncio.get_running_loop().time() - started
    assert alone_completion.usage.completion_tokens >= 200, "tiny-gpt stopped early; pick another prompt"

    # Whether each call found an identical generation under way (the router
    # runs in this process, so its coalescer is this module's class).
    joined: list[bool] = []
    real_generate = coalescing.Coalescer.generate

    def recording_generate(self, flight_key, *args):
        joined.append(flight_key is not None and flight_key in self._flights)  # noqa: SLF001
        return real_generate(self, flight_key, *args)

    monkeypatch.setattr(coalescing.Coalescer, "generate", recording_generate)
    before = await triton_generations()
    patient = Caller(router, request)
    await asyncio.wait_for(patient.first_delta.wait(), 60)
    # Its deadline, a third of what the whole answer took alone, passes
    # while the shared generation still has most of the answer to go, and
    # leaves it a third of that time (~0.13 s) to reach the coalescer on a
    # busy machine (a quarter left ~0.09 s).
    hurried = Caller(router, request, timeout_s=alone_s / 3)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(hurried.task, 60)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert hurried.completion is None
    assert joined == [False, True], "the hurried caller never joined the generation under way"
    await asyncio.wait_for(patient.task, 120)
    assert patient.text == alone and patient.completion.usage == alone_completion.usage
    assert await settled(triton_generations, before + 1) == before + 1


async def test_a_template_is_invoked_by_name(router):
    request = pb.ChatRequest(
        template=pb.TemplateInvocation(name="explain", variables={"topic": "tides", "audience": "sailors"}),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )
    text, completion = await answer(router, request)
    assert text
    # The template's default max_tokens (5) applied.
    assert 0 < completion.usage.completion_tokens <= 5
    # Greedy by the template's defaults: the same as the rendered request sent by hand.
    by_hand = pb.ChatRequest(
        model="tiny-gpt",
        messages=[
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="You explain tides to sailors."),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="Explain tides in one line."),
        ],
        parameters=common_pb2.GenerationParameters(max_tokens=5, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
    )
    assert (await answer(router, by_hand))[0] == text


@pytest.mark.parametrize(
    ("invocation", "code", "reason"),
    [
        (pb.TemplateInvocation(name="nope"), grpc.StatusCode.NOT_FOUND, Reason.TEMPLATE_NOT_FOUND),
        (
            pb.TemplateInvocation(name="explain", version=2, variables={"topic": "a", "audience": "b"}),
            grpc.StatusCode.NOT_FOUND,
            Reason.TEMPLATE_NOT_FOUND,
        ),
        (
            pb.TemplateInvocation(name="explain", variables={"topic": "tides"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.TEMPLATE_VARIABLE_MISSING,
        ),
    ],
)
async def test_bad_template_invocations_get_a_clear_status(router, invocation, code, reason):
    call = router.Chat(pb.ChatRequest(template=invocation), metadata=AUTH, timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == code
    assert error_info(raised.value).reason == reason
