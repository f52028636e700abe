"""Coalescing and prompt templates through real services: the router (its
gRPC front end and its HTTP edge) in front of real context, cache and
inference services, real Redis and a real Triton, whose own statistics
count the generations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid

import grpc
import httpx
import pytest
import tritonclient.grpc.aio as triton_grpc
from google.rpc import error_details_pb2, status_pb2

from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    TemplateMessageSettings,
    TemplateParameterSettings,
    TemplateSettings,
    TenantSettings,
    hash_api_key,
)
from meshgate.errors import error_info
from meshgate.local.stack import free_port
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router import coalescing
from tests.integration.conftest import running_router, service_settings
from tests.integration.test_router_accounting import eventually
from tests.mesh import bounded_channel, router_channel

# Serial (make test runs it alone): a caller's deadline is a third of a solo answer.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

KEY = "coalescing-test-key"
AUTH = [("authorization", f"Bearer {KEY}")]
# Two configured tenants (the dev tenant is a third): A's keys bill apart
# (GetUsage has a row per key), B's turns must never share A's generations.
TENANT_A, TENANT_B = (f"coalescing-{name}-{uuid.uuid4().hex[:8]}" for name in "ab")
KEYS = {name: f"coalescing-key-{name}-{uuid.uuid4().hex[:8]}" for name in ("a1", "a2", "a3", "a4", "b1")}
# Long enough that callers started together overlap (tiny-gpt: a few
# hundred tokens/s on this machine); identical callers share it anyway.
MAX_TOKENS = 200
CALLERS = 4


def auth(key: str) -> list[tuple[str, str]]:
    """The call metadata of one of KEYS."""
    return [("authorization", f"Bearer {KEYS[key]}")]


@pytest.fixture(scope="module")
async def services(redis_url, inference_address):
    """A stub of the router's public port, one of its cache service (with
    the router's tokens), whose stats count the Stores, and the address of
    its HTTP edge."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.tenants = [
        TenantSettings(id=TENANT_A, api_key_sha256=[hash_api_key(KEYS[k]) for k in ("a1", "a2", "a3", "a4")]),
        TenantSettings(id=TENANT_B, api_key_sha256=[hash_api_key(KEYS["b1"])]),
    ]
    settings.router.http_listen = f"127.0.0.1:{free_port()}"
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
            settings.router.http_listen,
        )


@pytest.fixture(scope="module")
def router(services):
    return services[0]


@pytest.fixture(scope="module")
def http_edge(services) -> str:
    """The router's HTTP edge, host:port."""
    return services[2]


@pytest.fixture
def joined(monkeypatch) -> list[bool]:
    """Whether each generation asked of the router found an identical one
    under way (the router runs in this process, so its coalescer is this
    module's class), in the order they were asked for."""
    joined: list[bool] = []
    real_generate = coalescing.Coalescer.generate

    def recording_generate(self, flight_key, *args):
        joined.append(flight_key is not None and flight_key in self._flights)  # noqa: SLF001
        return real_generate(self, flight_key, *args)

    monkeypatch.setattr(coalescing.Coalescer, "generate", recording_generate)
    return joined


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
    """One Chat call, or one ChatSession turn on a stream of its own, read
    in the background."""

    def __init__(
        self, router, request: pb.ChatRequest | pb.ChatSessionRequest, timeout_s: float = 120, metadata=AUTH
    ) -> None:
        if isinstance(request, pb.ChatSessionRequest):
            self.call = router.ChatSession(iter([request]), metadata=metadata, timeout=timeout_s)
        else:
            self.call = router.Chat(request, metadata=metadata, timeout=timeout_s)
        self.pieces: list[str] = []
        self.completion: pb.ChatCompletion | None = None
        # A ChatSession turn's failure, reported in its stream.
        self.failure: status_pb2.Status | None = None
        self.first_delta = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            if response.HasField("completion"):
                self.completion = response.completion
            elif response.HasField("delta"):
                self.pieces.append(response.delta.text)
                self.first_delta.set()
            else:
                self.failure = status_pb2.Status.FromString(response.failure)

    def failure_info(self) -> error_details_pb2.ErrorInfo:
        info = error_details_pb2.ErrorInfo()
        assert self.failure is not None
        assert any(detail.Unpack(info) for detail in self.failure.details)
        return info

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
    router, triton_generations, joined
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

    joined.clear()
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


def session_turn(
    text: str, session_id: str = "", max_tokens: int = MAX_TOKENS, **strict
) -> pb.ChatSessionRequest:
    """A greedy turn of the session ``session_id`` (a new one when empty)."""
    return pb.ChatSessionRequest(
        model="tiny-gpt",
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        cache_policy=pb.CACHE_POLICY_BYPASS,
        **strict,
    )


async def session_messages(router, session_id: str, metadata=AUTH) -> list[tuple[int, str]]:
    found = await router.GetSession(
        pb.GetSessionRequest(session_id=session_id), metadata=metadata, timeout=10
    )
    return [(message.role, message.content) for message in found.session.messages]


async def billed(router, key: str, key_ids: set[str]) -> dict[str, pb.UsageRow]:
    """The GetUsage rows of tiny-gpt by key id, of ``key``'s tenant, once
    each of ``key_ids`` has one (the ledger writes just after each turn)
    and two reads half a second apart agree (a turn billed twice would
    have been by then)."""

    async def rows() -> dict[str, pb.UsageRow]:
        usage = await router.GetUsage(pb.GetUsageRequest(), metadata=auth(key), timeout=10)
        return {row.key_id: row for row in usage.rows if row.model == "tiny-gpt"}

    async def every_key_billed() -> dict[str, pb.UsageRow] | None:
        found = await rows()
        return found if key_ids <= found.keys() else None

    previous = await eventually(every_key_billed)
    for _ in range(20):
        await asyncio.sleep(0.5)
        current = await rows()
        if current == previous:
            return current
        previous = current
    raise AssertionError("the usage kept changing")


def key_id(key: str) -> str:
    """GetUsage's key id of one of KEYS."""
    return hash_api_key(KEYS[key])[:16]


async def test_turns_of_two_sessions_share_a_generation_and_each_is_stored_and_billed_as_its_own(
    router, triton_generations
):
    """Two new sessions of one tenant (a turn under each of two of its keys)
    whose prompts are identical share one generation: each session holds its
    own turn at its own version, and each key is billed the whole answer's
    usage, once. Another tenant's identical turn at the same moment
    generates apart: a generation, as a cache entry, is one tenant's."""
    question = "Tell me a long story about a lighthouse keeper."
    before = await triton_generations()
    callers = [Caller(router, session_turn(question), metadata=auth(key)) for key in ("a1", "a2", "b1")]
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in callers)), 120)
    # A1 and A2 shared one, B generated its own (all three shared: 1; none: 3).
    assert await settled(triton_generations, before + 2) == before + 2
    reference = callers[0].completion
    assert reference.usage.completion_tokens >= 50, "tiny-gpt stopped early; pick another prompt"
    for caller in callers:
        assert caller.failure is None and caller.text == callers[0].text
        assert caller.completion.usage == reference.usage and caller.completion.session_version == 1
    a1, a2, b1 = (caller.completion.session_id for caller in callers)
    assert len({a1, a2, b1}) == 3
    for session_id, key in ((a1, "a1"), (a2, "a2"), (b1, "b1")):
        assert await session_messages(router, session_id, auth(key)) == [
            (common_pb2.ROLE_USER, question),
            (common_pb2.ROLE_ASSISTANT, callers[0].text),
        ]
    usage = reference.usage
    rows = await billed(router, "a1", {key_id("a1"), key_id("a2")})
    rows.update(await billed(router, "b1", {key_id("b1")}))
    for key in ("a1", "a2", "b1"):
        row = rows[key_id(key)]
        assert (row.requests, row.failures) == (1, 0), key
        assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens), (
            key
        )


async def test_a_turn_refused_at_its_append_fails_alone_beside_the_session_sharing_its_generation(
    router, triton_generations, joined
):
    """Two sessions with the same history ask the same strict turn at once,
    and one generation answers both. Another turn lands in the second
    session meanwhile: that session's turn is refused at its append
    (VERSION_CONFLICT, saying what it delivered), and nothing of it reaches
    the first, whose turn completes whole and is stored."""
    opening = [Caller(router, session_turn("Say something about owls.", max_tokens=8)) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*(caller.task for caller in opening)), 60)
    assert opening[0].text == opening[1].text, "the two sessions' histories differ"
    (ours_id, version), (theirs_id, _) = (
        (caller.completion.session_id, caller.completion.session_version) for caller in opening
    )
    history = await session_messages(router, ours_id)

    joined.clear()
    before = await triton_generations()
    question = "Tell me a long story about a lighthouse keeper, please."
    ours, theirs = (
        Caller(router, session_turn(question, session_id, expected_session_version=version))
        for session_id in (ours_id, theirs_id)
    )
    await asyncio.wait_for(asyncio.gather(ours.first_delta.wait(), theirs.first_delta.wait()), 60)
    assert joined == [False, True], "the two turns did not share a generation"
    other = Caller(router, session_turn("Hello.", theirs_id, max_tokens=2))
    await asyncio.wait_for(other.task, 60)
    assert not ours.task.done(), (
        "the shared generation ended before the other turn landed; pick a longer answer"
    )
    assert other.completion.session_version == version + 1
    await asyncio.wait_for(asyncio.gather(ours.task, theirs.task), 120)
    assert await settled(triton_generations, before + 2) == before + 2  # the shared one and the other turn's

    assert theirs.completion is None
    assert theirs.failure.code == grpc.StatusCode.ABORTED.value[0]
    info = theirs.failure_info()
    assert info.reason == Reason.VERSION_CONFLICT
    assert int(info.metadata["delivered_chars"]) == len(theirs.text) > 0
    assert ours.failure is None and ours.completion.session_version == version + 1
    assert ours.text == theirs.text
    assert await session_messages(router, ours_id) == [
        *history,
        (common_pb2.ROLE_USER, question),
        (common_pb2.ROLE_ASSISTANT, ours.text),
    ]


async def streamed_answer(client: httpx.AsyncClient, body: dict, key: str) -> str:
    """The text of a streamed /v1/chat/completions answer (its [DONE] seen)."""
    text, done = [], False
    headers = {"authorization": f"Bearer {KEYS[key]}"}
    async with client.stream(
        "POST", "/chat/completions", json={**body, "stream": True}, headers=headers
    ) as got:
        assert got.status_code == 200
        async for line in got.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event  # a failure midway
                text.extend(choice["delta"].get("content") or "" for choice in event["choices"])
    assert done, "the stream ended without [DONE]"
    return "".join(text)


async def posted_on_a_socket(address: str, body: dict, key: str) -> socket.socket:
    """A connection that sent a non-streamed /v1/chat/completions request
    and reads nothing back: its client can go away by closing it."""
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    connection = socket.socket()
    connection.setblocking(False)
    await loop.sock_connect(connection, (host, int(port)))
    payload = json.dumps(body)
    await loop.sock_sendall(
        connection,
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {KEYS[key]}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n{payload}".encode(),
    )
    return connection


async def test_a_non_streamed_http_caller_going_away_leaves_those_sharing_its_generation_the_whole_answer(
    router, http_edge, triton_generations, joined
):
    """A gRPC call, a streamed and a non-streamed HTTP request, identical,
    share one generation. The non-streamed one's client goes away mid-way:
    the other two get the whole answer, each billed it; the one gone is
    billed as cancelled before its answer, with no completion tokens."""
    question = "Tell me about the history of bread, please."
    alone, alone_completion = await answer(router, ask(question, temperature=0.0))
    assert alone_completion.usage.completion_tokens >= 50, "tiny-gpt stopped early; pick another prompt"
    body = {
        "model": "tiny-gpt",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "cache_policy": "bypass",
    }
    joined.clear()
    before = await triton_generations()
    over_grpc = Caller(router, ask(question, temperature=0.0), metadata=auth("a4"))
    await asyncio.wait_for(over_grpc.first_delta.wait(), 60)
    async with httpx.AsyncClient(base_url=f"http://{http_edge}/v1", timeout=120) as client:
        streamed = asyncio.ensure_future(streamed_answer(client, body, "a4"))
        whole = await posted_on_a_socket(http_edge, body, "a3")

        async def all_asked() -> bool:
            return len(joined) == 3

        await eventually(all_asked)
        assert joined == [False, True, True], "the HTTP requests did not join the gRPC call's generation"
        assert not over_grpc.task.done(), (
            "the generation ended before the client went away; pick a longer answer"
        )
        whole.close()
        streamed_text = await asyncio.wait_for(streamed, 120)
    await asyncio.wait_for(over_grpc.task, 120)
    assert over_grpc.text == alone and streamed_text == alone
    assert over_grpc.completion.usage == alone_completion.usage
    assert await settled(triton_generations, before + 1) == before + 1

    rows = await billed(router, "a3", {key_id("a3"), key_id("a4")})
    gone, stayed = rows[key_id("a3")], rows[key_id("a4")]
    assert (gone.requests, gone.failures, gone.completion_tokens) == (1, 1, 0)
    assert (stayed.requests, stayed.failures) == (2, 0)
    assert stayed.completion_tokens == 2 * alone_completion.usage.completion_tokens
    assert stayed.prompt_tokens == 2 * alone_completion.usage.prompt_tokens


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
