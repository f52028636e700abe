"""The context service over real gRPC sockets against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import shutil
import subprocess
import time

import grpc
import pytest
import redis.asyncio as redis
from structlog.testing import capture_logs

from meshgate import serving, tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings, Settings, load_settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.context import app, store, token_counts
from tests.integration.conftest import running as running_service
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration

SYSTEM, USER, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
MODEL = "tiny-gpt"
INCLUDED, DROPPED = pb.DISPOSITION_INCLUDED, pb.DISPOSITION_DROPPED


def make_settings(redis_url: str, **models: ModelSettings) -> Settings:
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.context.session_ttl_s = 600
    # No inference service runs for these tests: relevance from the words
    # alone, as when Embed cannot answer (the in-process embedder, the
    # default, is test_context_retrieval.py's).
    settings.context.embedder = "inference"
    if models:
        settings.models = models
    return settings


@contextlib.asynccontextmanager
async def running(settings: Settings):
    """The service in-process on a free port, and a stub over a real channel."""
    async with (
        running_service(app, "context", settings) as address,
        router_channel(address, "context") as channel,
    ):
        yield context_service_pb2_grpc.ContextServiceStub(channel)


@pytest.fixture(scope="module")
async def stub(redis_url: str):
    async with running(make_settings(redis_url)) as stub:
        yield stub


async def failure(call) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """Code, ErrorInfo reason and metadata of a call expected to fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    assert info is not None, caught.value
    return caught.value.code(), info.reason, dict(info.metadata)


def msg(role: int, content: str) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content)


def _tokens(text: str) -> int:
    tokenizer = tokenization.load(Settings().models[MODEL].tokenizer)
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def tokens_of(message: common_pb2.Message) -> int:
    """What the prompt pays for a message: its line of tiny-gpt's plain chat
    template ("user: ...\\n"), from the tokenizer itself."""
    rendered = tokenization.load_chat_template("").render_messages(
        [message],
        as_text=tokenization.as_text(Settings().models[MODEL].tokenizer),
        add_generation_prompt=False,
    )
    return _tokens(rendered.removeprefix(PROMPT_PREFIX))


# What the plain template puts before the first message, once per prompt.
PROMPT_PREFIX = "[CLS]"


# What every prompt of the plain template pays outside its messages: the
# [CLS] before the first and the assistant's cue after the last.
OUTSIDE_MESSAGES_TOKENS = _tokens(PROMPT_PREFIX) + _tokens("assistant:")


def prompt_length(messages) -> int:
    """Tokens of the whole prompt the inference service renders from ``messages``."""
    as_text = tokenization.as_text(Settings().models[MODEL].tokenizer)
    return _tokens(tokenization.load_chat_template("").render_messages(messages, as_text=as_text))


async def new_session(stub, tenant: str, *messages: common_pb2.Message) -> str:
    created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
    session_id = created.session.session_id
    if messages:
        await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, expected_version=0, messages=messages
            )
        )
    return session_id


# --- sessions ---------------------------------------------------------------


async def test_create_get_delete(stub, tenant) -> None:
    before_ms = int(time.time() * 1000)
    created = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session
    session_id = created.session_id
    assert len(session_id) == 32 and int(session_id, 16) >= 0
    assert created.tenant_id == tenant and created.version == 0
    assert abs(created.create_time_ms - before_ms) < 5_000

    got = (await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))).session
    assert got == created

    await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
    get = stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
    assert await failure(get) == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        {"session_id": session_id},
    )
    delete = stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
    assert (await failure(delete))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


async def test_client_chosen_id_is_kept_and_cannot_be_created_twice(stub, tenant) -> None:
    request = pb.CreateSessionRequest(tenant_id=tenant, session_id="chat_42-A")
    assert (await stub.CreateSession(request)).session.session_id == "chat_42-A"
    code, reason, _ = await failure(stub.CreateSession(request))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS")


@pytest.mark.parametrize("session_id", ["has space", "a:b", "x" * 129, "é"])
async def test_bad_session_ids_are_rejected(stub, tenant, session_id) -> None:
    create = stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
    assert (await failure(create))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SESSION_ID")
    get = stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
    assert (await failure(get))[1] == "INVALID_SESSION_ID"


async def test_tenant_is_required(stub) -> None:
    for call in (
        stub.CreateSession(pb.CreateSessionRequest()),
        stub.GetSession(pb.GetSessionRequest(session_id="s")),
        stub.AppendTurns(pb.AppendTurnsRequest(session_id="s", messages=[msg(USER, "x")])),
        stub.AssembleContext(
            pb.AssembleContextRequest(new_messages=[msg(USER, "x")], model=MODEL, max_prompt_tokens=9)
        ),
    ):
        assert (await failure(call))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "TENANT_REQUIRED")


async def test_a_tenant_id_longer_than_any_tenants_is_refused(stub) -> None:
    # It would key the hot sessions, notices and summaries kept in memory.
    long = "t" * 513
    for call in (
        stub.CreateSession(pb.CreateSessionRequest(tenant_id=long)),
        stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=long, session_id="s", messages=[msg(USER, "x")])),
    ):
        assert (await failure(call))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "SCOPE_TOO_LARGE")


async def test_another_tenants_session_is_not_found(stub, tenant) -> None:
    session_id = await new_session(stub, tenant, msg(USER, "secret"))
    intruder = f"{tenant}-other"
    calls = [
        stub.GetSession(pb.GetSessionRequest(tenant_id=intruder, session_id=session_id)),
        stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=intruder,
                session_id=session_id,
                expected_version=1,
                messages=[msg(USER, "x")],
            )
        ),
        stub.AssembleContext(
            pb.AssembleContextRequest(
                tenant_id=intruder, session_id=session_id, model=MODEL, max_prompt_tokens=100
            )
        ),
        stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=intruder, session_id=session_id)),
    ]
    for call in calls:
        assert (await failure(call))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    # The owner's session is untouched, and the same id is free for the other tenant.
    got = await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
    assert [m.content for m in got.session.messages] == ["secret"]
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=intruder, session_id=session_id))


# --- appends ----------------------------------------------------------------


async def test_append_checks_the_version(stub, tenant) -> None:
    session_id = await new_session(stub, tenant)

    def append(version: int, *messages: common_pb2.Message):
        return stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, expected_version=version, messages=messages
            )
        )

    assert (await append(0, msg(USER, "hi"), msg(ASSISTANT, "hello"))).version == 1
    assert await failure(append(0, msg(USER, "stale"))) == (
        grpc.StatusCode.ABORTED,
        "VERSION_CONFLICT",
        {"current_version": "1"},
    )
    assert (await failure(append(5, msg(USER, "future"))))[2] == {"current_version": "1"}
    assert (await append(1, msg(USER, "again"))).version == 2

    session = (await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))).session
    assert session.version == 2
    assert [(m.role, m.content) for m in session.messages] == [
        (USER, "hi"),
        (ASSISTANT, "hello"),
        (USER, "again"),
    ]
    assert session.update_time_ms >= session.create_time_ms


async def test_concurrent_writers_never_lose_a_turn(stub, tenant) -> None:
    session_id = await new_session(stub, tenant)
    writers = 8

    async def write(n: int) -> int:
        """Appends one turn, retrying at the version the conflict reports."""
        version, conflicts = 0, 0
        while True:
            request = pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                expected_version=version,
                messages=[msg(USER, f"writer {n}")],
            )
            try:
                await stub.AppendTurns(request)
                return conflicts
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                assert error.code() == grpc.StatusCode.ABORTED and info.reason == "VERSION_CONFLICT"
                version = int(info.metadata["current_version"])
                conflicts += 1

    conflicts = await asyncio.gather(*(write(n) for n in range(writers)))
    # Everyone started at version 0, so exactly one got through without a conflict.
    assert sorted(c == 0 for c in conflicts) == [False] * (writers - 1) + [True]
    session = (await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))).session
    assert session.version == writers
    assert sorted(m.content for m in session.messages) == sorted(f"writer {n}" for n in range(writers))


async def test_appends_at_any_version_all_land_and_a_replayed_turn_id_is_not_applied_twice(
    stub, tenant
) -> None:
    session_id = await new_session(stub, tenant)
    writers = 16

    def append(n: int, turn_id: str) -> pb.AppendTurnsRequest:
        return pb.AppendTurnsRequest(
            tenant_id=tenant,
            session_id=session_id,
            any_version=True,
            turn_id=turn_id,
            messages=[msg(USER, f"question {n}"), msg(ASSISTANT, f"answer {n}")],
        )

    responses = await asyncio.gather(*(stub.AppendTurns(append(n, f"turn-{n}")) for n in range(writers)))
    assert sorted(r.version for r in responses) == list(range(1, writers + 1))
    assert not any(r.replayed for r in responses)

    # A retry after a lost reply: same turn id, answered with the first version.
    replay = await stub.AppendTurns(append(3, "turn-3"))
    assert replay.replayed and replay.version == responses[3].version

    session = (await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))).session
    assert session.version == writers
    contents = [m.content for m in session.messages]
    assert len(contents) == 2 * writers
    for i in range(0, len(contents), 2):
        n = contents[i].removeprefix("question ")
        assert contents[i + 1] == f"answer {n}", "a turn's messages must stay adjacent"
    assert sorted(contents[::2]) == sorted(f"question {n}" for n in range(writers))


async def test_invalid_appends_are_rejected(stub, tenant) -> None:
    session_id = await new_session(stub, tenant)

    async def reason_of(messages, version: int = 0, turn_id: str = "", key_id: str = "") -> str:
        call = stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                expected_version=version,
                messages=messages,
                turn_id=turn_id,
                key_id=key_id,
            )
        )
        code, reason, _ = await failure(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        return reason

    assert await reason_of([]) == "EMPTY_MESSAGES"
    assert await reason_of([msg(USER, "ok"), msg(common_pb2.ROLE_UNSPECIFIED, "x")]) == "INVALID_ROLE"
    assert await reason_of([msg(USER, "a" * (1024 * 1024 + 1))]) == "MESSAGE_TOO_LARGE"
    # Under the limit in characters, over it in UTF-8 bytes.
    assert await reason_of([msg(USER, "é" * (512 * 1024 + 1))]) == "MESSAGE_TOO_LARGE"
    assert await reason_of([msg(USER, "x")], version=-1) == "INVALID_VERSION"
    assert await reason_of([msg(USER, "x")] * 1025) == "TOO_MANY_MESSAGES"
    assert await reason_of([msg(USER, "x")], turn_id="t" * 129) == "INVALID_TURN_ID"
    assert await reason_of([msg(USER, "x")], turn_id="t x") == "INVALID_TURN_ID"
    assert await reason_of([msg(USER, "x")], turn_id="t\tx") == "INVALID_TURN_ID"
    # Only a key id as the router writes it: the session keeps it. A key's
    # whole SHA-256 is more of the key than any other service is shown.
    assert await reason_of([msg(USER, "x")], key_id="A" * 16) == "INVALID_KEY_ID"
    assert await reason_of([msg(USER, "x")], key_id="a" * 15) == "INVALID_KEY_ID"
    assert await reason_of([msg(USER, "x")], key_id="a" * 64) == "INVALID_KEY_ID"
    # Nothing was stored by the rejected calls; exactly 1 MiB is accepted.
    ok = pb.AppendTurnsRequest(
        tenant_id=tenant,
        session_id=session_id,
        expected_version=0,
        messages=[msg(USER, "a" * 1024 * 1024)],
    )
    assert (await stub.AppendTurns(ok)).version == 1


async def test_a_take_id_is_checked_as_a_turn_id_is_and_a_claim_names_a_sessions_key(
    stub, tenant, redis_url
) -> None:
    session_id = await new_session(stub, tenant)
    for take_id in ("t" * 129, "t x"):
        call = stub.TakeSummaryUsage(
            pb.TakeSummaryUsageRequest(tenant_id=tenant, session_id=session_id, take_id=take_id)
        )
        assert (await failure(call))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TAKE_ID")
        call = stub.AcknowledgeSummaryUsage(
            pb.AcknowledgeSummaryUsageRequest(tenant_id=tenant, session_id=session_id, take_id=take_id)
        )
        assert (await failure(call))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TAKE_ID")
    # A held take is acknowledged by its id: it needs one.
    call = stub.TakeSummaryUsage(
        pb.TakeSummaryUsageRequest(tenant_id=tenant, session_id=session_id, hold_until_acknowledged=True)
    )
    assert (await failure(call))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TAKE_ID")
    key = "c" * 16
    await stub.AppendTurns(
        pb.AppendTurnsRequest(
            tenant_id=tenant,
            session_id=session_id,
            any_version=True,
            messages=[msg(USER, "x")],
            key_id=key,
        )
    )
    # What a summary's writer does (summaries.SummaryStore.put), without a model.
    client = redis.Redis.from_url(redis_url)
    try:
        await store.OwedSessions(client).mark(tenant, session_id)
        await client.hset(store.session_key(tenant, session_id), "unbilled", '{"m": [5, 1, 1]}')
    finally:
        await client.aclose()
    claimed = await stub.ClaimOwedSummaryUsage(pb.ClaimOwedSummaryUsageRequest(owed_for_ms=0))
    assert pb.OwedSummaryUsage(tenant_id=tenant, session_id=session_id, key_id=key) in claimed.sessions
    taken = await stub.TakeSummaryUsage(
        pb.TakeSummaryUsageRequest(tenant_id=tenant, session_id=session_id, take_id="once")
    )
    assert [(u.model, u.prompt_tokens, u.completion_tokens, u.summaries) for u in taken.summary_usage] == [
        ("m", 5, 1, 1)
    ]
    assert taken.take_id == "once"


async def test_append_to_missing_session_is_not_found(stub, tenant) -> None:
    call = stub.AppendTurns(
        pb.AppendTurnsRequest(tenant_id=tenant, session_id="nope", messages=[msg(USER, "x")])
    )
    assert (await failure(call))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


async def test_token_counts_are_stored_at_append(stub, tenant, redis_url) -> None:
    texts = ["Hello there, how are you?", "Fine, thanks! And you?"]
    session_id = await new_session(stub, tenant, *(msg(USER, t) for t in texts))
    counter = token_counts.for_models(Settings().models)[MODEL]
    client = redis.Redis.from_url(redis_url)
    try:
        stored = await client.hget(store.session_key(tenant, session_id), f"tokens:{counter.id}")
    finally:
        await client.aclose()
    assert stored is not None
    assert [int.from_bytes(stored[i : i + 4], "little") for i in range(0, len(stored), 4)] == [
        tokens_of(msg(USER, t)) for t in texts
    ]


def and_then(tenant: str, session_id: str, model: str = MODEL) -> pb.AssembleContextRequest:
    """An assembly of the session with one more short question, whole."""
    return pb.AssembleContextRequest(
        tenant_id=tenant,
        session_id=session_id,
        new_messages=[msg(USER, "and?")],
        model=model,
        max_prompt_tokens=100_000,
    )


async def test_a_session_expiring_before_this_replicas_ttl_says_is_not_assembled_from_memory(
    redis_url, tenant
) -> None:
    """A bug hunt's finding: a hot session was served until its last write
    plus this replica's session TTL, but Redis expires it by the TTL it was
    last written with. Written under a shorter one (session_ttl_s raised
    through a rolling restart, or 0 for "kept forever, from their next
    write"), a session read into memory went on being assembled after Redis
    expired it: each turn on it was generated and billed, then refused
    SESSION_NOT_FOUND at its append, for up to the new TTL."""
    shorter = make_settings(redis_url)
    shorter.context.session_ttl_s = 1
    async with running(shorter) as before:
        session_id = await new_session(before, tenant, msg(USER, "remember me"))
    async with running(make_settings(redis_url)) as after:  # 600 s from here on
        assemble = and_then(tenant, session_id)
        assembled = await after.AssembleContext(assemble)  # read into memory
        assert [m.content for m in assembled.messages] == ["remember me", "and?"]
        await asyncio.sleep(1.1)  # past the TTL Redis holds it by
        assert (await failure(after.AssembleContext(assemble)))[:2] == (
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )


async def test_an_append_refused_session_not_found_drops_the_copy_in_memory(stub, tenant, redis_url) -> None:
    """A session gone from Redis without a notice (expired early by an
    operator's PEXPIRE, or deleted on a replica whose notice has not come)
    was still assembled from memory after its append was refused
    SESSION_NOT_FOUND, so every next turn on it was generated and billed
    before that same refusal."""
    session_id = await new_session(stub, tenant, msg(USER, "remember me"))
    assemble = and_then(tenant, session_id)
    await stub.AssembleContext(assemble)  # read into memory
    client = redis.Redis.from_url(redis_url)
    try:
        # Gone the way an expiry goes: announcing nothing.
        await client.delete(*store.session_keys(tenant, session_id))
    finally:
        await client.aclose()
    append = pb.AppendTurnsRequest(
        tenant_id=tenant, session_id=session_id, expected_version=1, messages=[msg(USER, "and?")]
    )
    assert (await failure(stub.AppendTurns(append)))[:2] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert (await failure(stub.AssembleContext(assemble)))[:2] == (
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


# --- surviving restarts and outages -----------------------------------------


async def test_sessions_survive_a_restart_of_the_service(redis_url, tenant) -> None:
    settings = make_settings(redis_url)
    async with running(settings) as first:
        session_id = await new_session(first, tenant, msg(USER, "remember me"))
    async with running(settings) as second:
        got = await second.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
        assert got.session.version == 1
        assert [m.content for m in got.session.messages] == ["remember me"]
        appended = await second.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                expected_version=1,
                messages=[msg(ASSISTANT, "I do")],
            )
        )
        assert appended.version == 2


async def test_redis_outage_is_unavailable_and_service_recovers(tmp_path: pathlib.Path, tenant) -> None:
    port = free_port()

    def start_redis() -> subprocess.Popen:
        process = redis_server.launch(port, tmp_path)
        redis_server.wait_ready(port)
        return process

    def stop_redis(process: subprocess.Popen) -> None:
        process.terminate()
        process.wait(10)

    process = start_redis()
    try:
        async with running(make_settings(f"redis://127.0.0.1:{port}/0")) as stub:
            session_id = await new_session(stub, tenant, msg(USER, "before"))
            get = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)
            await asyncio.to_thread(stop_redis, process)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSession(get)
            # Nothing of the error Redis's client raised, which names its
            # host and port: those are for the service's log.
            refused = (caught.value.code(), error_info(caught.value).reason, caught.value.details())
            assert refused == (grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE", "session store unavailable")
            append = stub.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant,
                    session_id=session_id,
                    expected_version=1,
                    messages=[msg(USER, "during")],
                )
            )
            assert (await failure(append))[1] == "REDIS_UNAVAILABLE"

            process = await asyncio.to_thread(start_redis)
            got = await stub.GetSession(get)
            assert [m.content for m in got.session.messages] == ["before"]
    finally:
        stop_redis(process)


# --- assembly ---------------------------------------------------------------


@dataclasses.dataclass
class Conversation:
    session_id: str
    turns: list[common_pb2.Message]


@pytest.fixture
async def conversation(stub, tenant) -> Conversation:
    turns = [
        msg(SYSTEM, "You are a terse assistant who answers in one sentence."),
        msg(USER, "What is the capital of France?"),
        msg(ASSISTANT, "Paris is the capital of France."),
        msg(USER, "And what river runs through it?"),
        msg(ASSISTANT, "The Seine runs through Paris."),
        msg(USER, "How long is that river, roughly?"),
        msg(ASSISTANT, "About 777 kilometres from source to sea."),
    ]
    return Conversation(await new_session(stub, tenant, *turns), turns)


async def test_assembly_keeps_system_and_newest_turns_within_budget(stub, tenant, conversation) -> None:
    turns = conversation.turns
    new = [msg(USER, "Which cities does it pass?")]
    costs = [tokens_of(m) for m in turns]
    new_cost = tokens_of(new[0])
    # Room for the system message, the new message, the cue and the three
    # newest turns, one token short of the fourth newest.
    budget = costs[0] + new_cost + OUTSIDE_MESSAGES_TOKENS + sum(costs[4:]) + costs[3] - 1

    response = await stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=conversation.session_id,
            new_messages=new,
            model=MODEL,
            max_prompt_tokens=budget,
            strategy=pb.ASSEMBLY_STRATEGY_NEWEST,
        )
    )

    assert list(response.messages) == [turns[0], *turns[4:], new[0]]
    entries = [(e.source, e.index, e.role, e.tokens, e.disposition) for e in response.manifest.entries]
    expected_session = [
        (pb.SOURCE_SESSION, i, m.role, costs[i], INCLUDED if i == 0 or i >= 4 else DROPPED)
        for i, m in enumerate(turns)
    ]
    assert entries == [*expected_session, (pb.SOURCE_REQUEST, 0, USER, new_cost, INCLUDED)]
    assert response.manifest.prompt_tokens == costs[0] + sum(costs[4:]) + new_cost + OUTSIDE_MESSAGES_TOKENS
    assert response.manifest.prompt_tokens == prompt_length(response.messages)
    assert response.manifest.budget_tokens == budget
    assert response.manifest.tokenizer == Settings().models[MODEL].tokenizer
    assert response.session_version == 1


async def test_assembly_with_ample_budget_keeps_everything(stub, tenant, conversation) -> None:
    response = await stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=conversation.session_id,
            new_messages=[msg(USER, "Thanks!")],
            model=MODEL,
            max_prompt_tokens=100_000,
        )
    )
    assert list(response.messages) == [*conversation.turns, msg(USER, "Thanks!")]
    # The budget never exceeds the model's context window.
    assert response.manifest.budget_tokens == Settings().models[MODEL].context_window_tokens
    assert response.manifest.prompt_tokens == prompt_length([*conversation.turns, msg(USER, "Thanks!")])


async def test_new_messages_over_budget_exceed_the_context_window(stub, tenant) -> None:
    text = "word " * 50
    call = stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant, new_messages=[msg(USER, text)], model=MODEL, max_prompt_tokens=20
        )
    )
    assert await failure(call) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CONTEXT_WINDOW_EXCEEDED",
        {"tokens": str(tokens_of(msg(USER, text)) + OUTSIDE_MESSAGES_TOKENS), "budget": "20"},
    )


async def test_new_messages_far_over_budget_are_refused_without_counting_them_all(stub, tenant) -> None:
    """A review's finding: 127 messages of 256 KiB (a request the router
    admits) were all tokenized to refuse a budget of 448 tokens: 1.3 GB
    and 10.7 s of the context service, several at once enough to have it
    killed for memory. Counted until they pass the budget, the refusal says
    how many tokens at least (here: the first message's)."""
    text = "word " * (256 * 1024 // 5)
    call = stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant, new_messages=[msg(USER, text)] * 100, model=MODEL, max_prompt_tokens=448
        ),
        timeout=20,
    )
    assert await failure(call) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CONTEXT_WINDOW_EXCEEDED",
        {"tokens": str(tokens_of(msg(USER, text)) + OUTSIDE_MESSAGES_TOKENS), "budget": "448"},
    )


async def test_stateless_assembly(stub, tenant) -> None:
    new = [msg(SYSTEM, "Be brief."), msg(USER, "Hi")]
    response = await stub.AssembleContext(
        pb.AssembleContextRequest(tenant_id=tenant, new_messages=new, model=MODEL, max_prompt_tokens=50)
    )
    assert list(response.messages) == new
    assert response.session_version == 0
    assert [e.source for e in response.manifest.entries] == [pb.SOURCE_REQUEST] * 2
    assert response.manifest.prompt_tokens == prompt_length(new)


async def test_invalid_assembly_requests(stub, tenant) -> None:
    new = [msg(USER, "Hi")]
    cases = [
        (
            pb.AssembleContextRequest(
                tenant_id=tenant, new_messages=new, model="gpt-nope", max_prompt_tokens=50
            ),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            pb.AssembleContextRequest(tenant_id=tenant, new_messages=new, model=MODEL, max_prompt_tokens=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TOKEN_BUDGET",
        ),
        (
            pb.AssembleContextRequest(tenant_id=tenant, model=MODEL, max_prompt_tokens=50),
            grpc.StatusCode.INVALID_ARGUMENT,
            "EMPTY_MESSAGES",
        ),
        (
            pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id="missing",
                new_messages=new,
                model=MODEL,
                max_prompt_tokens=50,
            ),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        ),
        (
            pb.AssembleContextRequest(
                tenant_id=tenant,
                new_messages=[msg(common_pb2.ROLE_UNSPECIFIED, "x")],
                model=MODEL,
                max_prompt_tokens=50,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ROLE",
        ),
    ]
    for request, code, reason in cases:
        assert (await failure(stub.AssembleContext(request)))[:2] == (code, reason)


async def test_a_tokenizer_configured_later_counts_old_turns_once(
    redis_url, tenant, tmp_path: pathlib.Path
) -> None:
    """Turns stored before a model's tokenizer existed are counted on first
    use and the counts stored, so later assemblies read them."""
    default = Settings().models[MODEL]
    async with running(make_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant, msg(USER, "Old turn one."), msg(ASSISTANT, "Two."))

    # Same vocabulary, different file: a tokenizer the stored counts do not cover.
    copy = tmp_path / "tokenizer.json"
    shutil.copyfile(tokenization.resolve(default.tokenizer), copy)
    with copy.open("a") as f:
        f.write("\n")
    other = dataclasses.replace(default, tokenizer=str(copy))
    settings = make_settings(redis_url, **{MODEL: default, "other": other})
    field = f"tokens:{token_counts.for_models({'other': other})['other'].id}"
    meta_key = store.session_key(tenant, session_id)
    client = redis.Redis.from_url(redis_url)
    try:
        assert await client.hget(meta_key, field) is None
        async with running(settings) as stub:
            request = pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id=session_id,
                new_messages=[msg(USER, "New.")],
                model="other",
                max_prompt_tokens=200,
            )
            first = await stub.AssembleContext(request)
            assert len(await client.hget(meta_key, field)) == 2 * 4
            # Appends now extend the completed counts.
            await stub.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant,
                    session_id=session_id,
                    expected_version=1,
                    messages=[msg(USER, "New.")],
                )
            )
            assert len(await client.hget(meta_key, field)) == 3 * 4
            second = await stub.AssembleContext(request)
    finally:
        await client.aclose()
    assert first.manifest.tokenizer == str(copy)
    turns = [msg(USER, "Old turn one."), msg(ASSISTANT, "Two."), msg(USER, "New.")]
    assert [e.tokens for e in first.manifest.entries] == [tokens_of(m) for m in turns]
    assert [e.tokens for e in second.manifest.entries] == [tokens_of(m) for m in [*turns, turns[-1]]]
    assert second.session_version == 2


# --- reload -------------------------------------------------------------------


def _models_toml(**aliases: ModelSettings) -> str:
    lines = []
    for alias, model in aliases.items():
        lines += [
            f"[models.{alias}]",
            f"context_window_tokens = {model.context_window_tokens}",
            f'tokenizer = "{model.tokenizer}"',
            f'chat_template = "{model.chat_template}"',
        ]
    return "\n".join(lines) + "\n"


async def test_a_model_alias_a_reload_adds_is_assembled_and_one_it_takes_out_is_refused(
    redis_url, tenant, tmp_path
) -> None:
    """The context service reloaded nothing: an alias a reload added to the
    router was listed and routed there, and each of its session turns was
    refused MODEL_NOT_FOUND here until a restart. Now SIGHUP (or the file's
    change) gives it the file's aliases: a new tokenizer and template is
    read then, and the session's turns appended before it are counted with
    it at their first assembly, exactly."""
    defaults = Settings().models
    mesh = mesh_settings()
    config = tmp_path / "meshgate.toml"
    base = (
        f'[redis]\nurl = "{redis_url}"\n'
        f'[mesh]\nca_file = "{mesh.ca_file}"\ncert_file = "{mesh.cert_file}"\nkey_file = "{mesh.key_file}"\n'
        '[context]\nembedder = "inference"\nsession_ttl_s = 600\n'
    )
    config.write_text(base + _models_toml(**{MODEL: defaults[MODEL]}))
    settings = load_settings(config, environ={})
    service = serving.Service("context", app.SERVICE_NAMES)
    service.config_path, service.settings_in_use = str(config), settings
    port = await serving.start(service, "127.0.0.1:0", await app.setup(service, settings))
    try:
        async with router_channel(f"127.0.0.1:{port}", "context") as channel:
            stub = context_service_pb2_grpc.ContextServiceStub(channel)
            texts = ["Hello there, how are you?", "Fine, thanks! And you?"]
            session_id = await new_session(stub, tenant, *(msg(USER, t) for t in texts))

            def question(model: str) -> pb.AssembleContextRequest:
                return and_then(tenant, session_id, model)

            assert (await failure(stub.AssembleContext(question("chat"))))[:2] == (
                grpc.StatusCode.NOT_FOUND,
                "MODEL_NOT_FOUND",
            )

            # With a context setting changed too, which needs a restart (it says so).
            longer = base.replace("session_ttl_s = 600", "session_ttl_s = 900")
            config.write_text(longer + _models_toml(**{MODEL: defaults[MODEL], "chat": defaults["smollm2"]}))
            with capture_logs() as logs:
                assert serving.reload_configuration(service)
            assert [e["setting"] for e in logs if e["event"].endswith("only after a restart")] == [
                "context.session_ttl_s"
            ]
            assert [e["alias"] for e in logs if e["event"].startswith("model alias added")] == ["chat"]
            chat = await stub.AssembleContext(question("chat"))
            # Counted with smollm2's tokenizer and template: the whole prompt
            # as the inference service would render it for that alias.
            template = tokenization.load_chat_template(defaults["smollm2"].chat_template)
            rendered = template.render_messages(
                list(chat.messages), as_text=tokenization.as_text(defaults["smollm2"].tokenizer)
            )
            tokenizer = tokenization.load(defaults["smollm2"].tokenizer)
            assert [m.content for m in chat.messages][-3:] == [*texts, "and?"]
            assert chat.manifest.prompt_tokens == len(
                tokenizer.encode(rendered, add_special_tokens=False).ids
            )
            assert (
                chat.manifest.prompt_tokens
                != (await stub.AssembleContext(question(MODEL))).manifest.prompt_tokens
            )

            # A template that cannot be read refuses the reload whole: both
            # aliases in use stay, the one it would have added is not.
            missing = tmp_path / "later.jinja"
            broken = dataclasses.replace(defaults["smollm2"], chat_template=str(missing))
            config.write_text(
                base + _models_toml(**{MODEL: defaults[MODEL], "chat": defaults["smollm2"], "broken": broken})
            )
            assert not serving.reload_configuration(service)
            for model in (MODEL, "chat"):
                await stub.AssembleContext(question(model))
            assert (await failure(stub.AssembleContext(question("broken"))))[:2] == (
                grpc.StatusCode.NOT_FOUND,
                "MODEL_NOT_FOUND",
            )
            # The file put in place, a SIGHUP reads the same settings again
            # (a review: "unchanged since it was refused" until the settings
            # file itself was edited).
            shutil.copy(tokenization.resolve(defaults["smollm2"].chat_template), missing)
            assert serving.reload_configuration(service)
            for model in (MODEL, "chat", "broken"):
                await stub.AssembleContext(question(model))

            config.write_text(base + _models_toml(**{"chat": defaults["smollm2"]}))
            assert serving.reload_configuration(service)
            assert (await failure(stub.AssembleContext(question(MODEL))))[:2] == (
                grpc.StatusCode.NOT_FOUND,
                "MODEL_NOT_FOUND",
            )
            await stub.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant, session_id=session_id, expected_version=1, messages=[msg(USER, "more")]
                )
            )
            assert [m.content for m in (await stub.AssembleContext(question("chat"))).messages][-4:] == [
                *texts,
                "more",
                "and?",
            ]
    finally:
        await serving.stop(service, grace_s=1)
