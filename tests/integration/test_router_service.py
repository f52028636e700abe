"""The router in-process in front of real context, cache and inference
services (real Redis, real Triton): fallbacks, sessions, cache policies."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshgate import redis_access, serving
from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, RouterSettings, Settings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import error_info
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.cache import app as cache_app
from services.context import store as session_store
from services.inference import app as inference_app
from services.router import app as router_app
from services.router.servicer import SAVING_METADATA
from tests.integration.conftest import (
    answer_of,
    router_and_context,
    running,
    running_router,
    service_settings,
    wait_until_serving,
)
from tests.mesh import CALL_TIMEOUT_S, bounded_channel, mesh_settings

pytestmark = pytest.mark.integration

KEY = "router-test-key"
AUTH = [("authorization", f"Bearer {KEY}")]


@pytest.fixture(scope="module")
async def mesh(redis_url, inference_address):
    """The router in front of in-process context and cache services; yields
    (router stub, context stub) so tests can check what was stored."""
    settings = service_settings(redis_url, inference_address, KEY)
    (live,) = settings.models["tiny-gpt"].deployments
    # Heavily weighted but dead: every request tries it first and must fall back.
    dead = DeploymentSettings(name="dead", address="127.0.0.1:1", model="tiny-gpt", weight=1000)
    settings.models["with-fallback"] = ModelSettings(deployments=[dead, live])
    async with router_and_context(settings) as stubs:
        yield stubs


@pytest.fixture(scope="module")
def router(mesh):
    return mesh[0]


def ask(text, model="tiny-gpt", policy=pb.CACHE_POLICY_USE, max_tokens=6, **parameters):
    return pb.ChatRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, **parameters),
        cache_policy=policy,
    )


async def completion_of(call) -> pb.ChatCompletion:
    return (await answer_of(call))[1]


async def test_falls_back_to_a_live_deployment_before_the_first_token(router):
    for i in range(4):
        completion = await completion_of(
            router.Chat(
                ask(f"fallback {i}", model="with-fallback", policy=pb.CACHE_POLICY_BYPASS), metadata=AUTH
            )
        )
        assert completion.deployment == "live"
        assert completion.cache_status == pb.CACHE_STATUS_BYPASSED


async def test_cache_policies(router):
    bypassed = await completion_of(router.Chat(ask("policy q", policy=pb.CACHE_POLICY_BYPASS), metadata=AUTH))
    assert bypassed.cache_status == pb.CACHE_STATUS_BYPASSED
    # Bypass stored nothing, so this is a miss, and it stores.
    first_text, first = await answer_of(router.Chat(ask("policy q"), metadata=AUTH))
    assert first.cache_status == pb.CACHE_STATUS_MISS
    hit = await completion_of(router.Chat(ask("policy q"), metadata=AUTH))
    assert hit.cache_status == pb.CACHE_STATUS_EXACT_HIT
    # Refresh skips the read and overwrites: later hits serve the new answer.
    new_text, refreshed = await answer_of(
        router.Chat(ask("policy q", policy=pb.CACHE_POLICY_REFRESH), metadata=AUTH)
    )
    assert refreshed.cache_status == pb.CACHE_STATUS_MISS
    assert new_text != first_text, "the model samples at its default temperature"
    served_text, served = await answer_of(router.Chat(ask("policy q"), metadata=AUTH))
    assert served.cache_status == pb.CACHE_STATUS_EXACT_HIT
    assert served_text == new_text


async def test_chat_session_keeps_one_session_over_a_bidirectional_stream(router):
    requests = [
        pb.ChatSessionRequest(
            model="tiny-gpt",
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
            parameters=common_pb2.GenerationParameters(max_tokens=4),
        )
        for text in ("first turn", "second turn", "third turn")
    ]
    completions = []
    deltas_before_completion = 0
    async for response in router.ChatSession(iter(requests), metadata=AUTH, timeout=CALL_TIMEOUT_S):
        if response.HasField("delta"):
            deltas_before_completion += 1
        else:
            assert deltas_before_completion > 0
            deltas_before_completion = 0
            completions.append(response.completion)
    assert [c.session_version for c in completions] == [1, 2, 3]
    assert len({c.session_id for c in completions}) == 1 and completions[0].session_id
    # Each later turn's prompt holds the earlier ones.
    prompts = [c.usage.prompt_tokens for c in completions]
    assert prompts[0] < prompts[1] < prompts[2]


async def test_list_models_shows_aliases_with_windows(router):
    models = await router.ListModels(pb.ListModelsRequest(), metadata=AUTH)
    assert {(m.alias, m.context_window_tokens) for m in models.models} == {
        ("tiny-gpt", 512),
        ("with-fallback", 512),
    }


async def test_strict_session_versions_refuse_stale_turns_before_generating(router):
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=AUTH)).session_id

    def turn(text, expected):
        request = ask(text, policy=pb.CACHE_POLICY_BYPASS)
        request.session_id = session_id
        request.expected_session_version = expected
        return request

    first = await completion_of(router.Chat(turn("one", 0), metadata=AUTH))
    assert first.session_version == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in router.Chat(turn("stale", 0), metadata=AUTH):
            pytest.fail(f"a stale turn must not be answered: {response}")
    assert caught.value.code() == grpc.StatusCode.ABORTED
    info = error_info(caught.value)
    assert (info.reason, info.metadata["current_version"]) == ("VERSION_CONFLICT", "1")
    second = await completion_of(router.Chat(turn("two", 1), metadata=AUTH))
    assert second.session_version == 2


async def test_a_refused_first_turn_creates_no_session(router, redis_url):
    client = redis_access.connect(redis_url)

    async def sessions_of_dev() -> int:
        return len([key async for key in client.scan_iter(match=session_store.key("dev", "*", "meta"))])

    before = await sessions_of_dev()
    responses = [
        r async for r in router.ChatSession(iter([pb.ChatSessionRequest(model="tiny-gpt")]), metadata=AUTH)
    ]
    assert [r.WhichOneof("event") for r in responses] == ["failure"]
    assert failure_of(responses[0]) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "EMPTY_MESSAGES")
    assert await sessions_of_dev() == before
    await client.aclose()


@pytest.mark.parametrize(
    ("expected", "code", "reason"),
    [
        (3, grpc.StatusCode.ABORTED, "VERSION_CONFLICT"),
        (-1, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
    ],
    ids=["later", "negative"],
)
async def test_a_strict_first_turn_at_another_version_creates_no_session(
    router, redis_url, expected, code, reason
):
    """A ChatSession's first turn, which creates its session, expecting a
    version the new session is not at (it starts at 0): the session was
    created, then the turn's assembly refused the version, and the empty
    session stayed, named in the failure for the stream to go on with."""
    client = redis_access.connect(redis_url)

    async def sessions_of_dev() -> int:
        return len([key async for key in client.scan_iter(match=session_store.key("dev", "*", "meta"))])

    before = await sessions_of_dev()
    turn = pb.ChatSessionRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="strict first turn")],
        expected_session_version=expected,
    )
    responses = [r async for r in router.ChatSession(iter([turn]), metadata=AUTH, timeout=CALL_TIMEOUT_S)]
    assert [r.WhichOneof("event") for r in responses] == ["failure"]
    assert failure_of(responses[0]) == (code.value[0], reason)
    assert await sessions_of_dev() == before
    await client.aclose()


def failure_of(response: pb.ChatSessionResponse) -> tuple[int, str]:
    """The code and ErrorInfo reason of a ChatSession failure event."""
    status = status_pb2.Status.FromString(response.failure)
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return status.code, info.reason


async def test_chat_session_reports_each_failed_turn_and_goes_on(router):
    """Pipelined turns, the second invalid: every turn gets its real status
    with ErrorInfo, in order, and the stream carries on with the next turn."""

    def turn(text: str, **parameters) -> pb.ChatSessionRequest:
        return pb.ChatSessionRequest(
            model="tiny-gpt",
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)] if text else [],
            parameters=common_pb2.GenerationParameters(max_tokens=3, **parameters),
        )

    requests = [turn("first"), turn(""), turn("third", temperature=7.0), turn("fourth")]
    outcomes = []
    async for response in router.ChatSession(iter(requests), metadata=AUTH, timeout=CALL_TIMEOUT_S):
        kind = response.WhichOneof("event")
        if kind == "completion":
            outcomes.append(("ok", response.completion.session_version))
        elif kind == "failure":
            outcomes.append(failure_of(response))
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert outcomes == [("ok", 1), (invalid, "EMPTY_MESSAGES"), (invalid, "INVALID_TEMPERATURE"), ("ok", 2)]


async def test_a_chat_session_turn_refused_for_its_session_leaves_the_streams_session(router):
    """A turn refused for the session it names (not found, not an id),
    before anything was stored, became the stream's session: every later
    turn naming none failed the same way. They continue the last session a
    turn was answered on, or start one where none was."""

    def turn(text: str, session_id: str = "") -> pb.ChatSessionRequest:
        return pb.ChatSessionRequest(
            model="tiny-gpt",
            session_id=session_id,
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
            parameters=common_pb2.GenerationParameters(max_tokens=3),
            cache_policy=pb.CACHE_POLICY_BYPASS,
        )

    requests = [
        turn("first", session_id=uuid.uuid4().hex),
        turn("second"),
        turn("third", session_id="not a session id"),
        turn("fourth"),
    ]
    outcomes = []
    async for response in router.ChatSession(iter(requests), metadata=AUTH, timeout=CALL_TIMEOUT_S):
        kind = response.WhichOneof("event")
        if kind == "completion":
            outcomes.append(("answered", response.completion.session_id, response.completion.session_version))
        elif kind == "failure":
            outcomes.append(("failed", *failure_of(response)))
    created = outcomes[1][1]
    assert outcomes == [
        ("failed", grpc.StatusCode.NOT_FOUND.value[0], "SESSION_NOT_FOUND"),
        ("answered", created, 1),
        ("failed", grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_SESSION_ID"),
        ("answered", created, 2),
    ]


async def test_concurrent_turns_on_one_session_all_land(mesh):
    """32 non-strict turns at once on one session: every one is acknowledged,
    stored exactly once, and its question and answer sit side by side."""
    router, context = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=AUTH)).session_id
    turns = 32

    async def one(n: int) -> tuple[str, pb.ChatCompletion]:
        request = ask(f"concurrent turn {n}", policy=pb.CACHE_POLICY_BYPASS, max_tokens=2)
        request.session_id = session_id
        return await answer_of(router.Chat(request, metadata=AUTH))

    answers = await asyncio.gather(*(one(n) for n in range(turns)))
    assert sorted(c.session_version for _, c in answers) == list(range(1, turns + 1))

    session = (
        await context.GetSession(context_pb.GetSessionRequest(tenant_id="dev", session_id=session_id))
    ).session
    assert session.version == turns
    pairs = [(session.messages[i], session.messages[i + 1]) for i in range(0, len(session.messages), 2)]
    assert len(session.messages) == 2 * turns
    assert sorted(q.content for q, _ in pairs) == sorted(f"concurrent turn {n}" for n in range(turns))
    answer_of_question = {q.content: a.content for q, a in pairs}
    for n, (text, _) in enumerate(answers):
        assert answer_of_question[f"concurrent turn {n}"] == text
    assert all((q.role, a.role) == (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT) for q, a in pairs)


async def test_a_failure_mid_stream_ends_the_stream_non_ok_without_fallback(redis_url, triton_url):
    """The inference service dies after the first tokens: the caller must see an
    error, not a short answer passed off as complete, and no second deployment
    may start over (the caller already has part of an answer)."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.inference.triton_urls = [triton_url]
    settings.inference.health_interval_s = 0.5
    settings.router.dev_api_key = KEY
    async with contextlib.AsyncExitStack() as stack:
        doomed = serving.Service("inference", inference_app.SERVICE_NAMES)
        port = await serving.start(doomed, "127.0.0.1:0", await inference_app.setup(doomed, settings))
        stack.push_async_callback(serving.stop, doomed, 0)  # if the test fails before stopping it
        await wait_until_serving(doomed)
        spare = await stack.enter_async_context(running(inference_app, "inference", settings))
        settings.cache.inference_address = spare
        settings.models = {
            "tiny-gpt": ModelSettings(
                deployments=[
                    DeploymentSettings(name="doomed", address=f"127.0.0.1:{port}", weight=1000),
                    DeploymentSettings(name="spare", address=spare, weight=1),
                ]
            )
        }
        address = await stack.enter_async_context(running_router(settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        router = router_service_pb2_grpc.RouterServiceStub(channel)

        call = router.Chat(
            ask("a long one", policy=pb.CACHE_POLICY_BYPASS, max_tokens=200, temperature=0.0), metadata=AUTH
        )
        call_deltas = 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in call:
                assert response.HasField("delta"), "a completion must not follow a broken stream"
                call_deltas += 1
                if call_deltas == 2:
                    await serving.stop(doomed, grace_s=0)
        assert call_deltas >= 2, caught.value
        assert caught.value.code() != grpc.StatusCode.OK


async def test_stateless_requests_are_served_while_the_context_service_is_down(redis_url, inference_address):
    """The context service only fits a stateless prompt to the window: without
    it such requests go out as sent; a session turn, which needs its history,
    fails with UNAVAILABLE and its reason."""
    settings = service_settings(redis_url, inference_address, KEY)
    settings.router.context_address = "127.0.0.1:1"  # nothing listens there
    async with contextlib.AsyncExitStack() as stack:
        settings.router.cache_address = await stack.enter_async_context(running(cache_app, "cache", settings))
        address = await stack.enter_async_context(running(router_app, "router", settings))
        channel = await stack.enter_async_context(bounded_channel(address))
        router = router_service_pb2_grpc.RouterServiceStub(channel)

        text, completion = await answer_of(
            router.Chat(ask("served without context", policy=pb.CACHE_POLICY_BYPASS), metadata=AUTH)
        )
        assert text and completion.usage.completion_tokens > 0
        # ~300 tokens in 600 bytes: the router's byte bound cannot tell it
        # fits tiny-gpt's 512, so it asks the context service, finds it
        # down, and sends the prompt as is.
        text, completion = await answer_of(
            router.Chat(ask("a " * 300, policy=pb.CACHE_POLICY_BYPASS), metadata=AUTH)
        )
        assert text and completion.usage.prompt_tokens > 300

        request = ask("a session turn", policy=pb.CACHE_POLICY_BYPASS)
        request.session_id = "some-session"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answer_of(router.Chat(request, metadata=AUTH))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value) is not None


async def test_a_stateless_prompt_longer_than_the_window_is_refused_with_the_exact_count(router):
    """The router skips the context service only for prompts that surely
    fit; one that does not is still measured there, with the model's
    tokenizer and template."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await answer_of(router.Chat(ask("word " * 700, policy=pb.CACHE_POLICY_BYPASS), metadata=AUTH))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == Reason.CONTEXT_WINDOW_EXCEEDED
    assert int(info.metadata["tokens"]) > int(info.metadata["budget"]) == 512 - 6


async def test_a_session_longer_than_the_window_keeps_being_answered(mesh):
    """The context service fits the prompt to the window with the model's own
    count, [CLS] included: a history of far more than 512 tokens must leave a
    prompt the model accepts (one token over and tiny_gpt refuses it)."""
    router, context = mesh
    session_id = (await router.CreateSession(pb.CreateSessionRequest(), metadata=AUTH)).session_id
    long_turn = " ".join(f"word{n}" for n in range(60))
    for n in range(12):
        await context.AppendTurns(
            context_pb.AppendTurnsRequest(
                tenant_id="dev",
                session_id=session_id,
                any_version=True,
                messages=[
                    common_pb2.Message(role=common_pb2.ROLE_USER, content=f"{n} {long_turn}"),
                    common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=long_turn),
                ],
            )
        )
    for max_tokens in (1, 7, 64):
        request = ask("and now?", policy=pb.CACHE_POLICY_BYPASS, max_tokens=max_tokens)
        request.session_id = session_id
        # One token, carried on the completion: nothing goes out before the turn is stored.
        request.completion_may_carry_text = max_tokens == 1
        call = router.Chat(request, metadata=AUTH)
        _, completion = await answer_of(call)
        # The window is filled to within a turn of it, never past it.
        assert 512 - 200 < completion.usage.prompt_tokens + max_tokens <= 512
        if max_tokens == 1:
            # Nothing went out before the turn was stored: its headers, sent
            # then, say it is committed to be stored (a call failing bare
            # after them, its router killed, may have stored the turn).
            assert set(SAVING_METADATA) <= set(await call.initial_metadata())


async def test_a_hit_streams_in_whole_word_pieces_like_a_generated_answer(router):
    # Long enough for several pieces of router.replay_burst_chars (greedy
    # tiny-gpt answers with two characters a token).
    question = ask("replay q", max_tokens=240, temperature=0.0)
    first_text, first = await answer_of(router.Chat(question, metadata=AUTH))
    assert first.cache_status == pb.CACHE_STATUS_MISS
    pieces, hit = [], None
    async for response in router.Chat(question, metadata=AUTH):
        if response.HasField("completion"):
            hit = response.completion
        else:
            pieces.append(response.delta.text)
    assert hit.cache_status == pb.CACHE_STATUS_EXACT_HIT
    assert "".join(pieces) == first_text
    assert hit.usage.completion_tokens == first.usage.completion_tokens
    # Unpaced (the default): several pieces, each cut after whitespace and
    # no longer than router.replay_burst_chars unless it is one long word.
    burst_chars = RouterSettings().replay_burst_chars
    assert len(first_text) > 2 * burst_chars and len(first_text.split()) > 4, first_text
    assert len(pieces) > 2
    assert all(piece[-1].isspace() for piece in pieces[:-1])
    assert all(len(piece) <= burst_chars or len(piece.split()) == 1 for piece in pieces)


async def test_a_client_that_reads_the_completions_text_gets_the_same_answer_in_fewer_messages(router):
    def carrying(request: pb.ChatRequest) -> pb.ChatRequest:
        carried = pb.ChatRequest()
        carried.CopyFrom(request)
        carried.completion_may_carry_text = True
        return carried

    # Greedy: the same text every time it is generated.
    bypass = ask("carried q", policy=pb.CACHE_POLICY_BYPASS, max_tokens=24, temperature=0.0)
    plain_text, _ = await answer_of(router.Chat(bypass, metadata=AUTH))
    carried_text, carried = await answer_of(router.Chat(carrying(bypass), metadata=AUTH))
    assert carried_text == plain_text and plain_text
    assert carried.finish_reason and carried.cache_status == pb.CACHE_STATUS_BYPASSED
    # tiny-gpt's last tokens come with its final response (its decoupled
    # model sends them together), so the last text rides on the completion.
    assert carried.text and plain_text.endswith(carried.text)

    # A miss stored by a carrying client is the whole answer, deltas and all.
    question = ask("carried q", max_tokens=24, temperature=0.0)
    stored_text, stored = await answer_of(router.Chat(carrying(question), metadata=AUTH))
    assert stored.cache_status == pb.CACHE_STATUS_MISS and stored_text == plain_text and stored.text
    hit_text, hit = await answer_of(router.Chat(question, metadata=AUTH))
    assert hit.cache_status == pb.CACHE_STATUS_EXACT_HIT and hit_text == plain_text
    assert hit.text == ""  # a client that did not ask gets every text as a delta

    # A short hit comes whole on its completion: one message.
    responses = [response async for response in router.Chat(carrying(question), metadata=AUTH)]
    assert [response.WhichOneof("event") for response in responses] == ["completion"]
    assert responses[0].completion.text == plain_text
    assert responses[0].completion.cache_status == pb.CACHE_STATUS_EXACT_HIT
