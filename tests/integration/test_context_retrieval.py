"""Adaptive assembly through real services: the context service indexes turns
with embeddings from the real inference service (Triton's minilm) in real
Redis, and assembly keeps what the new message needs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid

import grpc
import numpy as np
import pytest
import redis.asyncio as redis

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.embedding import Embedding, Embeddings, older_embedder
from meshgate.errors import error_info
from services.context import app, assembly, relevance, store, token_counts, turn_index
from services.context import servicer as servicer_module
from services.context.hot_cache import HotCache
from services.context.servicer import MAX_PREFETCHES, ContextServicer
from services.context.store import SessionStore
from services.context.turn_index import TurnIndex
from tests.integration.conftest import running
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration

SYSTEM, USER, ASSISTANT = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
MODEL = "smollm2"
PLANTED = "By the way, the code for the storage unit on Elm Street is 4471."

FILLER = [
    ("How was the weekend?", "Pretty relaxed, we watched a couple of movies."),
    ("Any good ones?", "One comedy was fun, the thriller dragged a bit."),
    ("Did you cook anything?", "Just pasta with a tomato sauce, nothing fancy."),
    ("The weather has been grey all week.", "Yes, I keep hoping for some sun soon."),
    ("Are you still running in the mornings?", "Twice a week, a short loop around the park."),
    ("I should start doing that too.", "You should, it clears the head before work."),
    ("Work has been busy lately.", "Same here, lots of meetings and little time."),
    ("Did you finish that book?", "Almost, three chapters left to read."),
]


def conversation(repeats: int) -> list[common_pb2.Message]:
    """Small talk with one fact planted near the start."""
    turns = [common_pb2.Message(role=SYSTEM, content="You are a helpful assistant.")]
    turns.append(common_pb2.Message(role=USER, content=PLANTED))
    turns.append(common_pb2.Message(role=ASSISTANT, content="Noted, I will remember that."))
    for round_ in range(repeats):
        for question, answer in FILLER:
            turns.append(common_pb2.Message(role=USER, content=f"{question} ({round_})"))
            turns.append(common_pb2.Message(role=ASSISTANT, content=answer))
    return turns


def prompt_length(messages) -> int:
    """Tokens of the prompt smollm2's template renders from ``messages``, as the model sees it."""
    model = Settings().models[MODEL]
    tokenizer = tokenization.load(model.tokenizer)
    rendered = tokenization.load_chat_template(model.chat_template).render_messages(
        messages, as_text=tokenization.as_text(model.tokenizer)
    )
    return len(tokenizer.encode(rendered, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
async def stub(redis_url: str, inference_address: str):
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.context.session_ttl_s = 600
    settings.context.inference_address = inference_address
    async with (
        running(app, "context", settings) as address,
        router_channel(address, "context") as channel,
    ):
        yield context_service_pb2_grpc.ContextServiceStub(channel)


@contextlib.asynccontextmanager
async def session_with(stub, turns: list[common_pb2.Message]):
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
    session_id = created.session.session_id
    # In several appends, as a conversation grows.
    for start in range(0, len(turns), 10):
        await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, messages=turns[start : start + 10], any_version=True
            )
        )
    yield tenant, session_id


async def assemble(stub, tenant, session_id, question: str, budget: int, strategy=0, at_version=None):
    return await stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=session_id,
            new_messages=[common_pb2.Message(role=USER, content=question)],
            model=MODEL,
            max_prompt_tokens=budget,
            strategy=strategy,
            at_version=at_version,
        )
    )


def session_entries(response) -> list:
    return [e for e in response.manifest.entries if e.source == pb.SOURCE_SESSION]


def kept_contents(turns, response) -> list[str]:
    """The non-system session messages the manifest says the prompt holds,
    in order: packed turns as the lines of one transcript message, placed
    where the oldest of them would be."""
    contents: list[str] = []
    lines: list[str] = []
    for entry in session_entries(response):
        if entry.disposition != pb.DISPOSITION_INCLUDED or turns[entry.index].role == SYSTEM:
            continue
        if entry.packed:
            if not lines:
                contents.append(assembly.TRANSCRIPT_HEADER)
            lines.append(assembly.transcript_line(turns[entry.index]))
        else:
            contents.append(turns[entry.index].content)
    transcript = assembly.TRANSCRIPT_HEADER + "".join(lines)
    return [transcript if c is assembly.TRANSCRIPT_HEADER else c for c in contents]


async def test_a_rebuild_at_an_older_version_scores_with_the_vectors_as_the_first_assembly_did(stub) -> None:
    async with session_with(stub, conversation(repeats=6)) as (tenant, session_id):
        question = "What is the code of my storage unit?"
        first = await assemble(stub, tenant, session_id, question, 400)
        assert first.inputs.dense_scored
        later = [common_pb2.Message(role=USER, content="Where did you park the car?")]
        await stub.AppendTurns(
            pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=later, any_version=True)
        )
        rebuilt = await stub.AssembleContext(
            pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id=session_id,
                new_messages=[common_pb2.Message(role=USER, content=question)],
                model=MODEL,
                max_prompt_tokens=400,
                at_version=first.inputs.session_version,
            )
        )
    # The index, now at a newer version, still holds the older one's turns
    # first: the rebuild is scored with their vectors, so the same id means
    # the same prompt.
    assert rebuilt.inputs.session_version == first.inputs.session_version
    assert rebuilt.inputs.dense_scored
    assert rebuilt.assembly_id == first.assembly_id
    assert rebuilt.messages == first.messages and rebuilt.manifest == first.manifest


async def test_relevance_beats_recency_on_a_planted_fact(stub) -> None:
    turns = conversation(repeats=6)
    async with session_with(stub, turns) as (tenant, session_id):
        question = "What is the code of my storage unit?"
        adaptive = await assemble(stub, tenant, session_id, question, 400)
        newest = await assemble(stub, tenant, session_id, question, 400, pb.ASSEMBLY_STRATEGY_NEWEST)

    planted = session_entries(adaptive)[1]
    assert planted.disposition == pb.DISPOSITION_INCLUDED
    assert planted.reason == pb.INCLUSION_REASON_RELEVANCE
    # An older turn kept for its relevance: a line of the transcript message.
    assert planted.packed
    assert f"user: {PLANTED}\n" in adaptive.messages[1].content
    assert adaptive.inputs.packs_older_turns and not newest.inputs.packs_older_turns
    # Scored with the question's embedding, under this ranking; the newest strategy scores nothing.
    assert adaptive.inputs.dense_scored and adaptive.inputs.ranking == relevance.RANKING
    assert not newest.inputs.dense_scored and not newest.inputs.ranking
    # The same budget, newest first, cannot reach back that far.
    assert session_entries(newest)[1].disposition == pb.DISPOSITION_DROPPED
    assert PLANTED not in [m.content for m in newest.messages]
    # The newest turns are still there, by recency.
    assert session_entries(adaptive)[-1].reason == pb.INCLUSION_REASON_RECENCY
    # Both prompts cost exactly what the manifest says, within the budget.
    for response in (adaptive, newest):
        assert response.manifest.prompt_tokens == prompt_length(response.messages)
        assert response.manifest.prompt_tokens <= 400
    # The prompt is chronological: system, then kept turns in session order.
    kept = [e.index for e in session_entries(adaptive) if e.disposition == pb.DISPOSITION_INCLUDED]
    assert kept == sorted(kept) and kept[0] == 0
    contents = [m.content for m in adaptive.messages]
    assert contents[0] == turns[0].content
    expected = kept_contents(turns, adaptive)
    assert contents[1 : 1 + len(expected)] == expected


async def test_every_manifest_entry_says_why_it_is_in(stub) -> None:
    async with session_with(stub, conversation(repeats=3)) as (tenant, session_id):
        response = await assemble(stub, tenant, session_id, "Where is the storage unit?", 300)
    for entry in response.manifest.entries:
        if entry.disposition == pb.DISPOSITION_INCLUDED:
            assert entry.reason != pb.INCLUSION_REASON_UNSPECIFIED, entry
        else:
            assert entry.reason == pb.INCLUSION_REASON_UNSPECIFIED, entry
    reasons = {e.reason for e in response.manifest.entries}
    assert {
        pb.INCLUSION_REASON_SYSTEM,
        pb.INCLUSION_REASON_RECENCY,
        pb.INCLUSION_REASON_RELEVANCE,
        pb.INCLUSION_REASON_REQUEST,
    } <= reasons


async def test_a_pin_changes_the_assembly_id_and_a_rebuild_names_the_pins_it_took(stub) -> None:
    async with session_with(stub, conversation(repeats=1)) as (tenant, session_id):
        before = await assemble(stub, tenant, session_id, "Tell me a joke.", 500)
        assert before.inputs.pins_sha256 == ""
        fact = "The user's daughter is called Mirela."
        await stub.PinToSession(pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact=fact))
        after = await assemble(stub, tenant, session_id, "Tell me a joke.", 500)
        assert fact in [m.content for m in after.messages] and after.messages != before.messages
        # The same session version, another prompt: another id (it was the same).
        assert after.inputs.session_version == before.inputs.session_version
        assert after.inputs.pins_sha256 and after.assembly_id != before.assembly_id
        at = after.inputs.session_version
        rebuilt = await assemble(stub, tenant, session_id, "Tell me a joke.", 500, at_version=at)
        assert rebuilt.messages == after.messages and rebuilt.assembly_id == after.assembly_id


async def test_a_pin_no_prompt_can_hold_is_removed_by_unpinning_it(stub) -> None:
    async with session_with(stub, conversation(repeats=1)) as (tenant, session_id):
        # 4 KiB of digits: more tokens than the whole budget.
        fact = "0123456789 " * 372
        await stub.PinToSession(pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact=fact))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await assemble(stub, tenant, session_id, "hi", 500)
        assert error_info(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        # Before, nothing took the pin away (a revert keeps fact pins): every
        # later assembly of the session failed.
        unpinned = await stub.UnpinFromSession(
            pb.UnpinFromSessionRequest(tenant_id=tenant, session_id=session_id, fact=fact)
        )
        assert unpinned.pin_count == 0
        assert fact not in [m.content for m in (await assemble(stub, tenant, session_id, "hi", 500)).messages]
        here = {"tenant_id": tenant, "session_id": session_id}
        for request, reason in (
            (pb.UnpinFromSessionRequest(**here, fact=fact), "PIN_NOT_FOUND"),
            (pb.UnpinFromSessionRequest(**here, message_index=0), "PIN_NOT_FOUND"),
            (pb.UnpinFromSessionRequest(**here, message_index=-1), "INVALID_PIN"),
            (pb.UnpinFromSessionRequest(**here), "INVALID_PIN"),
            (pb.UnpinFromSessionRequest(tenant_id=tenant, session_id="nope", fact="x"), "SESSION_NOT_FOUND"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UnpinFromSession(request)
            assert error_info(caught.value).reason == reason, request
        # A pinned turn goes the same way.
        await stub.PinToSession(pb.PinToSessionRequest(**here, message_index=1))
        unpinned = await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**here, message_index=1))
        assert unpinned.pin_count == 0


@pytest.mark.parametrize("budget", [60, 120, 500, 4000])
async def test_a_pinned_fact_and_turn_survive_any_budget(stub, budget: int) -> None:
    turns = conversation(repeats=3)
    async with session_with(stub, turns) as (tenant, session_id):
        fact = "The user's daughter is called Mirela."
        pinned = await stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact=fact)
        )
        assert pinned.pin_count == 1
        pinned = await stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=5)
        )
        assert pinned.pin_count == 2
        for strategy in (pb.ASSEMBLY_STRATEGY_ADAPTIVE, pb.ASSEMBLY_STRATEGY_NEWEST):
            response = await assemble(stub, tenant, session_id, "Tell me a joke.", budget, strategy)
            contents = [m.content for m in response.messages]
            assert fact in contents and turns[5].content in contents
            facts = [e for e in response.manifest.entries if e.source == pb.SOURCE_PINNED_FACT]
            assert [(e.index, e.reason) for e in facts] == [(0, pb.INCLUSION_REASON_PINNED)]
            assert session_entries(response)[5].reason == pb.INCLUSION_REASON_PINNED
            assert response.manifest.prompt_tokens == prompt_length(response.messages) <= budget


async def test_pins_refuse_what_does_not_exist(stub) -> None:
    async with session_with(stub, conversation(repeats=1)) as (tenant, session_id):
        cases = [
            (
                pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=99),
                "PIN_TARGET_NOT_FOUND",
            ),
            # No turn of any session (0 is the oldest): the request is wrong,
            # not the session without it (it was NOT_FOUND PIN_TARGET_NOT_FOUND).
            (
                pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=-1),
                "INVALID_PIN",
            ),
            (pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id), "INVALID_PIN"),
            (pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact="  "), "INVALID_PIN"),
            (pb.PinToSessionRequest(tenant_id=tenant, session_id="nope", fact="x"), "SESSION_NOT_FOUND"),
        ]
        for request, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PinToSession(request)
            assert error_info(caught.value).reason == reason, request
        # Nothing was pinned by the refused calls.
        response = await assemble(stub, tenant, session_id, "hi", 60)
        assert all(e.reason != pb.INCLUSION_REASON_PINNED for e in response.manifest.entries)


async def test_a_session_holds_at_most_max_pins(stub) -> None:
    async with session_with(stub, conversation(repeats=1)) as (tenant, session_id):
        for n in range(1, turn_index.MAX_PINS + 1):
            request = pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact=f"fact {n}")
            assert (await stub.PinToSession(request)).pin_count == n
        for one_more in (
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact="one fact too many"),
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=0),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PinToSession(one_more)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info(caught.value)
            assert info.reason == "TOO_MANY_PINS" and info.metadata["limit"] == str(turn_index.MAX_PINS)
        response = await assemble(stub, tenant, session_id, "hi", 4000)
        assert "one fact too many" not in [m.content for m in response.messages]


async def test_an_unknown_strategy_is_refused(stub) -> None:
    async with session_with(stub, conversation(repeats=1)) as (tenant, session_id):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await assemble(stub, tenant, session_id, "hi", 300, strategy=42)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "UNKNOWN_STRATEGY"


@pytest.mark.parametrize("model", ["smollm2", "tiny-gpt"])
async def test_a_packed_prompt_costs_what_its_manifest_says(stub, redis_url: str, model: str) -> None:
    """Through the real service: older relevant turns packed into one
    transcript message, each listed with its line's tokens, and the rendered
    prompt as long as the manifest says, also for a session whose turns were
    stored before transcript lines were counted (counted once, then stored)."""
    turns = conversation(repeats=12)
    counter = token_counts.for_models(Settings().models)[model]
    async with session_with(stub, turns) as (tenant, session_id):
        meta = store.key(tenant, session_id, "meta")
        client = redis.Redis.from_url(redis_url)
        try:
            # As if stored before this change: no line counts. A pin drops the hot copy.
            assert await client.hdel(meta, f"tokens:{counter.line_id}") == 1
            pin = pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact="Hi.")
            await stub.PinToSession(pin)
            responses = [
                await stub.AssembleContext(
                    pb.AssembleContextRequest(
                        tenant_id=tenant,
                        session_id=session_id,
                        new_messages=[common_pb2.Message(role=USER, content="What is the unit's code?")],
                        model=model,
                        max_prompt_tokens=budget,
                    )
                )
                for budget in (300, 300, 700)
            ]
            stored = await client.hget(meta, f"tokens:{counter.line_id}")
        finally:
            await client.aclose()
    assert stored is not None and len(stored) == 4 * len(turns)
    for response in responses:
        entries = response.manifest.entries
        packed = [e for e in entries if e.packed]
        assert packed and all(e.reason == pb.INCLUSION_REASON_RELEVANCE for e in packed[:1])
        assert entries[1].packed  # the planted fact
        assert [e.tokens for e in packed] == await counter.count_lines([turns[e.index] for e in packed])
        (frame,) = [e for e in entries if e.source == pb.SOURCE_TRANSCRIPT]
        assert frame.tokens == counter.transcript_tokens
        transcript = [m for m in response.messages if m.content.startswith(assembly.TRANSCRIPT_HEADER)]
        assert transcript == [assembly.transcript(turns[e.index] for e in packed)]
        rendered = prompt_tokens_of(model, response.messages)
        assert response.manifest.prompt_tokens == rendered <= response.manifest.budget_tokens
        outside = counter.template_tokens
        included = sum(e.tokens for e in entries if e.disposition == pb.DISPOSITION_INCLUDED)
        assert included + outside.prompt_prefix + outside.generation_prompt == rendered
    # The first call (counting the lines) and the second (reading them) agree.
    assert responses[0].messages == responses[1].messages
    # Its inputs say packing was allowed, so the same id always means the same prompt.
    assert all(r.inputs.packs_older_turns for r in responses)
    assert responses[0].assembly_id == responses[1].assembly_id
    assert len([e for e in responses[2].manifest.entries if e.packed]) > len(
        [e for e in responses[0].manifest.entries if e.packed]
    )


def prompt_tokens_of(model: str, messages) -> int:
    settings = Settings().models[model]
    rendered = tokenization.load_chat_template(settings.chat_template).render_messages(
        messages, as_text=tokenization.as_text(settings.tokenizer)
    )
    return len(tokenization.load(settings.tokenizer).encode(rendered, add_special_tokens=False).ids)


class NoDeadline:
    """The servicer context of a call made without a deadline, for calling
    the servicer in-process (AppendTurns reads its time left)."""

    def time_remaining(self) -> None:
        return None


async def test_a_cold_packed_assembly_plans_from_the_index(redis_url: str) -> None:
    """Packing needs the turns' line counts: a session's index read gives them
    (stored at append), so a cold assembly still reads only the chosen turns'
    texts, never the whole session."""
    client = redis.Redis.from_url(redis_url)
    models = Settings().models
    servicer = ContextServicer(
        SessionStore(client, 0),
        models,
        token_counts.for_models(models),
        HotCache(0),
        TurnIndex(client, 0),
    )
    whole_reads = 0
    read = servicer._read

    async def counted_read(*args, **kwargs):
        nonlocal whole_reads
        whole_reads += 1
        return await read(*args, **kwargs)

    servicer._read = counted_read
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    try:
        created = await servicer.CreateSession(pb.CreateSessionRequest(tenant_id=tenant), None)
        session_id = created.session.session_id
        turns = conversation(repeats=12)
        for start in range(0, len(turns), 16):
            await servicer.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant,
                    session_id=session_id,
                    messages=turns[start : start + 16],
                    any_version=True,
                ),
                NoDeadline(),
            )
        # What the appends set off in the background (warming a hot cache of no room) is done.
        await asyncio.gather(*servicer._prefetches.values())
        whole_reads = 0
        response = await servicer.AssembleContext(
            pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id=session_id,
                new_messages=[common_pb2.Message(role=USER, content="What is the unit's code?")],
                model=MODEL,
                max_prompt_tokens=400,
            ),
            None,
        )
    finally:
        await client.aclose()
    assert whole_reads == 0
    assert response.manifest.entries[1].packed
    assert response.manifest.prompt_tokens == prompt_length(response.messages) <= 400


async def test_prefetches_are_one_per_session_and_bounded_in_number(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    models = Settings().models
    servicer = ContextServicer(
        SessionStore(client, 0), models, token_counts.for_models(models), HotCache(0), TurnIndex(client, 0)
    )
    reads: list[str] = []

    async def slow_read(tenant_id: str, session_id: str, *args) -> None:
        reads.append(session_id)
        await asyncio.sleep(0.05)  # still in flight when the next calls come

    servicer._read = slow_read
    try:
        for session_id in ["same"] * 10 + [f"other-{n}" for n in range(2 * MAX_PREFETCHES)]:
            await servicer.PrefetchSession(
                pb.PrefetchSessionRequest(tenant_id="t", session_id=session_id), None
            )
        await asyncio.gather(*servicer._prefetches.values())
    finally:
        await client.aclose()
    assert reads.count("same") == 1 and len(reads) == MAX_PREFETCHES


@pytest.mark.parametrize("notice_first", [True, False], ids=["notice-during-read", "notice-after-read"])
async def test_an_append_during_a_prefetch_leaves_the_session_hot_at_its_version(
    redis_url: str, notice_first: bool
) -> None:
    """A prefetch reads version 1; an append makes version 2 while it is in
    flight. Whether the change notice arrives before or after that read ends,
    the session ends hot at version 2: the append's ask is not dropped."""
    client = redis.Redis.from_url(redis_url)
    models = Settings().models
    hot = HotCache(64 * 1024 * 1024)
    hot.live = True  # as when the change subscription is up; the notices are delivered below
    servicer = ContextServicer(SessionStore(client, 0), models, token_counts.for_models(models), hot)
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    read_versions: list[int] = []
    read_started, release = asyncio.Event(), asyncio.Event()
    redis_read = servicer._store.read

    async def held_read(*args, **kwargs):
        stored = await redis_read(*args, **kwargs)
        read_versions.append(stored.version)
        read_started.set()
        await release.wait()
        return stored

    try:
        session_id = (
            await servicer.CreateSession(pb.CreateSessionRequest(tenant_id=tenant), None)
        ).session.session_id
        key = store.session_key(tenant, session_id)

        async def append(content: str) -> int:
            request = pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                messages=[common_pb2.Message(role=USER, content=content)],
                any_version=True,
            )
            return (await servicer.AppendTurns(request, NoDeadline())).version

        assert await append("first") == 1
        # The append's own warming (no hot entry of version 0 to extend) is done.
        await asyncio.gather(*servicer._prefetches.values())
        hot.clear()  # so that the prefetch below reads Redis
        servicer._store.read = held_read
        servicer.prefetch(tenant, session_id)
        await read_started.wait()
        assert await append("second") == 2
        if notice_first:
            hot.announce(key, 2)  # what the change listener does with the append's notice
        release.set()
        await asyncio.gather(*servicer._prefetches.values())
        if not notice_first:
            hot.announce(key, 2)
    finally:
        await client.aclose()
    assert read_versions == [1, 2]
    cached = hot.get(key)
    assert cached is not None and cached.version == 2
    assert [t.content for t in cached.turns] == ["first", "second"]


@pytest.fixture(scope="module")
async def nameless_stub(redis_url: str, inference_address: str):
    """A context service that embeds each question's nameless form with it
    (context.embed_nameless_question)."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.context.session_ttl_s = 600
    settings.context.inference_address = inference_address
    settings.context.embed_nameless_question = True
    async with (
        running(app, "context", settings) as address,
        router_channel(address, "context") as channel,
    ):
        yield context_service_pb2_grpc.ContextServiceStub(channel)


async def test_a_name_the_conversation_never_uses_still_finds_the_planted_fact(nameless_stub, stub) -> None:
    turns = conversation(repeats=6)
    async with session_with(nameless_stub, turns) as (tenant, session_id):
        # "Priya" is in no turn: the real Embed call carries the question and "code storage unit".
        question = "What is the code of Priya's storage unit?"
        adaptive = await assemble(nameless_stub, tenant, session_id, question, 400)
        # The same session and question on a service without the nameless form (one Redis).
        without = await assemble(stub, tenant, session_id, question, 400)
        # "Elm" is in a turn: the nameless form leaves the question alone.
        on_elm = "What is the code of the storage unit on Elm Street?"
        named, named_without = [
            await assemble(s, tenant, session_id, on_elm, 400) for s in (nameless_stub, stub)
        ]
    planted = session_entries(adaptive)[1]
    assert planted.disposition == pb.DISPOSITION_INCLUDED
    assert planted.reason == pb.INCLUSION_REASON_RELEVANCE
    assert adaptive.inputs.dense_scored
    # The ranking names the nameless form where it moved the question, so a
    # rebuild without it is never taken for the same assembly ...
    assert adaptive.inputs.ranking == relevance.RANKING_NAMELESS != without.inputs.ranking
    assert adaptive.assembly_id != without.assembly_id
    # ... and only there: an assembly it left alone is the same with or without it.
    assert named.inputs.dense_scored and named.inputs.ranking == relevance.RANKING
    assert named.assembly_id == named_without.assembly_id
    assert named.messages == named_without.messages


@pytest.fixture(scope="module")
async def inference_stub(redis_url: str, inference_address: str):
    """A context service that embeds questions and turns through the
    inference service (context.embedder = "inference"; the other fixtures'
    services run the default, "local")."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.context.session_ttl_s = 600
    settings.context.inference_address = inference_address
    settings.context.embedder = "inference"
    async with (
        running(app, "context", settings) as address,
        router_channel(address, "context") as channel,
    ):
        yield context_service_pb2_grpc.ContextServiceStub(channel)


async def test_an_assembly_with_the_local_embedder_ranks_as_with_the_inference_service(
    stub, inference_stub
) -> None:
    """Turns embedded through the inference service (Triton), questions
    embedded either way (one Redis, so one session for both services): the
    same turns kept, for the same reasons, in the same prompt."""
    async with session_with(inference_stub, conversation(repeats=6)) as (tenant, session_id):
        answers = {}
        for question in ("What is the code of my storage unit?", "Did you finish that book?"):
            answers[question] = [
                await assemble(s, tenant, session_id, question, 400) for s in (stub, inference_stub)
            ]
    for local, remote in answers.values():
        assert local.inputs.dense_scored and remote.inputs.dense_scored
        assert [(e.index, e.disposition, e.reason) for e in session_entries(local)] == [
            (e.index, e.disposition, e.reason) for e in session_entries(remote)
        ]
        assert local.messages == remote.messages
    # The planted fact is found by meaning through the local embedder too.
    local, _ = answers["What is the code of my storage unit?"]
    assert session_entries(local)[1].disposition == pb.DISPOSITION_INCLUDED
    assert session_entries(local)[1].reason == pb.INCLUSION_REASON_RELEVANCE


async def test_an_append_of_more_turns_than_one_embed_call_takes_stores_every_vector(
    inference_stub, redis_url: str
) -> None:
    """200 turns in one append, through the inference service, which takes
    at most inference.max_embed_texts (128) texts a call: every turn is
    stored with its vector, none with the zero row of a turn left without."""
    count = 200
    assert count > Settings().inference.max_embed_texts
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    created = await inference_stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
    session_id = created.session.session_id
    messages = [
        common_pb2.Message(role=(USER, ASSISTANT)[i % 2], content=f"Locker {i} holds box number {i * 7}.")
        for i in range(count)
    ]
    await inference_stub.AppendTurns(
        pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=messages, any_version=True)
    )
    client = redis.Redis.from_url(redis_url)
    try:
        packed = await client.get(store.key(tenant, session_id, "ix:vectors"))
    finally:
        await client.aclose()
    assert packed, "the append stored no vectors at all"
    vectors = np.frombuffer(packed, np.int8).reshape(count, -1)
    assert vectors.shape[1] > 0
    assert (vectors != 0).any(axis=1).all()


class RevisedEmbedder:
    """A vector per text from ``table`` (else a random one from the text),
    named as made by ``embedder``: turning it to another name is the
    inference service's Triton upgraded to another revision of the model."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.embedder = "fake@1"

    def _vector(self, text: str) -> np.ndarray:
        if text in self.table:
            return self.table[text]
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        vector = np.random.default_rng(seed).standard_normal(16).astype(np.float32)
        return vector / np.linalg.norm(vector)

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding:
        return Embedding(self._vector(text), self.embedder)

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None) -> Embeddings:
        return Embeddings(np.stack([self._vector(t) for t in texts]), self.embedder)

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None) -> list[Embedding]:
        return [Embedding(self._vector(t), self.embedder) for t in texts]


async def test_turn_vectors_of_another_revision_are_never_scored_against_the_question(redis_url: str) -> None:
    """A session's turns embedded by one revision of the model, its next
    question by another (an upgrade under a 7-day session): a cosine between
    them means nothing, so the turns rank by their words until they have
    vectors of the new revision (an append's, or the backfill's, which the
    tests below follow); a fork then takes the rows and their embedder along."""
    unrelated = "The cat is called Tom."
    question = "Which colour is the door?"
    direction = np.zeros(16, np.float32)
    direction[0] = 1.0
    # Under revision 1 the unrelated turn lies where revision 2 puts the question.
    embedder = RevisedEmbedder({unrelated: direction})
    client = redis.Redis.from_url(redis_url)
    models = Settings().models
    index = TurnIndex(client, 0)
    servicer = ContextServicer(
        SessionStore(client, 0),
        models,
        token_counts.for_models(models),
        HotCache(0),
        index,
        embedder=embedder,
    )
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"

    async def append(*contents: str) -> None:
        messages = [common_pb2.Message(role=USER, content=c) for c in contents]
        request = pb.AppendTurnsRequest(
            tenant_id=tenant, session_id=session_id, messages=messages, any_version=True
        )
        await servicer.AppendTurns(request, NoDeadline())

    async def dense_scored() -> bool:
        request = pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=session_id,
            new_messages=[common_pb2.Message(role=USER, content=question)],
            model=MODEL,
            max_prompt_tokens=400,
        )
        return (await servicer.AssembleContext(request, None)).inputs.dense_scored

    try:
        created = await servicer.CreateSession(pb.CreateSessionRequest(tenant_id=tenant), None)
        session_id = created.session.session_id
        await append(unrelated, "We met on Monday.", "The weather was fine.")
        embedder.embedder = "fake@2"
        embedder.table = {question: direction}
        assert not await dense_scored()
        # Revision 2's append: the session scores by revision 2's vectors from now on.
        await append("The door is painted green.")
        indexed = await index.read(tenant, session_id, None)
        assert indexed.embedder == "fake@2" and indexed.unit_vectors[3].any()
        assert await dense_scored()
        forked = await servicer.ForkSession(
            pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=2), None
        )
        assert (await index.read(tenant, forked.session.session_id, None)).embedder == "fake@2"
    finally:
        await client.aclose()


class GatedEmbedder(RevisedEmbedder):
    """A RevisedEmbedder whose calls for any of ``held`` texts wait until
    ``opened`` is set (``entered`` says one is waiting): a backfill held
    mid-way, between its read of the session and its write."""

    def __init__(self, table: dict[str, np.ndarray], held: set[str]) -> None:
        super().__init__(table)
        self.held = held
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()
        self.opened.set()

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None) -> list[Embedding]:
        if not self.opened.is_set() and self.held.intersection(texts):
            self.entered.set()
            await self.opened.wait()
        return await super().embed_each_or_none(texts, timeout_s)


DOOR_QUESTION = "Which colour is the door?"
# No word in common with the question: found by its vector or not at all.
DOOR_TURN = "It is painted green, the entrance at the front."
SMALL_TALK = [f"{question} {answer}" for question, answer in FILLER]


@contextlib.asynccontextmanager
async def revised_session(
    redis_url: str,
    table: dict[str, np.ndarray],
    held: set[str] = frozenset(),
    embedder: RevisedEmbedder | None = None,
):
    """A session of DOOR_TURN then SMALL_TALK, its turns embedded by
    revision 1 of ``embedder`` (a GatedEmbedder holding ``held`` when
    none), which then turns to revision 2; yields the servicer, its index,
    the session's (tenant, id), the embedder and its Redis client."""
    embedder = GatedEmbedder({}, set(held)) if embedder is None else embedder
    async with appended_session(redis_url, embedder, [[DOOR_TURN, *SMALL_TALK]]) as (
        servicer,
        index,
        session,
        client,
    ):
        assert (await index.read(*session, None)).embedder == "fake@1"
        embedder.embedder = "fake@2"
        embedder.table = table
        yield servicer, index, session, embedder, client


@contextlib.asynccontextmanager
async def appended_session(redis_url: str, embedder: RevisedEmbedder, appends: list[list[str]]):
    """A session of ``appends`` (each a list of user turns, one AppendTurns
    each) by an in-process servicer on real Redis whose turns ``embedder``
    embeds; yields the servicer, its index, the session's (tenant, id) and
    the Redis client."""
    client = redis.Redis.from_url(redis_url)
    models = Settings().models
    index = TurnIndex(client, 600)
    servicer = ContextServicer(
        SessionStore(client, 600),
        models,
        token_counts.for_models(models),
        HotCache(0),
        index,
        embedder=embedder,
        # A turn is in the prompt as itself or not at all: the ranking decides.
        pack_older_turns=False,
    )
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    try:
        created = await servicer.CreateSession(pb.CreateSessionRequest(tenant_id=tenant), None)
        session = (tenant, created.session.session_id)
        for contents in appends:
            messages = [common_pb2.Message(role=USER, content=c) for c in contents]
            await servicer.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant, session_id=session[1], messages=messages, any_version=True
                ),
                NoDeadline(),
            )
        yield servicer, index, session, client
    finally:
        await servicer.close()
        await client.aclose()


async def assemble_door_question(
    servicer: ContextServicer, session: tuple[str, str]
) -> pb.AssembleContextResponse:
    """Room for the question and two or three turns besides the newest."""
    request = pb.AssembleContextRequest(
        tenant_id=session[0],
        session_id=session[1],
        new_messages=[common_pb2.Message(role=USER, content=DOOR_QUESTION)],
        model=MODEL,
        max_prompt_tokens=150,
    )
    return await servicer.AssembleContext(request, None)


async def test_after_a_revision_change_a_sessions_turns_are_embedded_again_in_the_background(
    redis_url: str,
) -> None:
    """A session's turns embedded by revision 1, its questions by revision 2
    (an upgrade under a 7-day session): the first assembly ranks by words
    (the old rows are not comparable) and has the turns embedded again in
    the background, so the next ones score them by meaning again and find
    the old turn that answers the question (no word in common with it)."""
    direction = np.zeros(16, np.float32)
    direction[0] = 1.0
    table = {DOOR_QUESTION: direction, DOOR_TURN: direction}
    async with revised_session(redis_url, table) as (servicer, index, session, _, _):
        first = await assemble_door_question(servicer, session)
        assert not first.inputs.dense_scored
        assert DOOR_TURN not in [m.content for m in first.messages]
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        indexed = await index.read(*session, None)
        assert indexed.embedder == "fake@2"
        assert indexed.unit_vectors.any(axis=1).all()
        again = await assemble_door_question(servicer, session)
        assert again.inputs.dense_scored
        assert DOOR_TURN in [m.content for m in again.messages]


async def test_an_append_during_a_backfill_keeps_the_rows_it_wrote(redis_url: str) -> None:
    """An append of the new revision while the backfill embeds the old turns
    (it read the session before): the append drops the old rows and writes
    its own; the backfill's write then fills the old turns' rows only, and
    the append's row stays as the append wrote it."""
    async with revised_session(redis_url, {}, held={DOOR_TURN}) as (servicer, index, session, embedder, _):
        embedder.opened.clear()
        await assemble_door_question(servicer, session)
        await asyncio.wait_for(embedder.entered.wait(), 10)
        appended = common_pb2.Message(role=USER, content="The door is painted green.")
        await servicer.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=session[0], session_id=session[1], messages=[appended], any_version=True
            ),
            NoDeadline(),
        )
        before = await index.read(*session, None)
        assert before.embedder == "fake@2" and before.unit_vectors[-1].any()
        assert not before.unit_vectors[:-1].any()
        embedder.opened.set()
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        after = await index.read(*session, None)
        assert after.embedder == "fake@2"
        np.testing.assert_array_equal(after.unit_vectors[-1], before.unit_vectors[-1])
        assert after.unit_vectors.any(axis=1).all()


async def deleted_while_its_backfill_is_held(servicer, session, embedder, client) -> None:
    """Deletes ``session`` while ``embedder`` holds its backfill's Embed,
    then lets that go: the backfill's write must find the session gone and
    write nothing, so that no key of it is left (one written then would
    have had no TTL, and been a later session's of the id)."""
    await asyncio.wait_for(embedder.entered.wait(), 10)
    await servicer.DeleteSession(pb.DeleteSessionRequest(tenant_id=session[0], session_id=session[1]), None)
    embedder.opened.set()
    await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
    assert await client.exists(*store.session_keys(*session)) == 0


async def test_a_session_deleted_during_its_backfill_leaves_nothing_behind(redis_url: str) -> None:
    """A session deleted while its backfill embeds its turns: the backfill's
    write finds it gone and writes nothing, so no key of it is left (one
    written then would have had no TTL, and been a later session's of the id)."""
    async with revised_session(redis_url, {}, held={DOOR_TURN}) as (servicer, _, session, embedder, client):
        embedder.opened.clear()
        await assemble_door_question(servicer, session)
        await deleted_while_its_backfill_is_held(servicer, session, embedder, client)


class UnavailableFor(RevisedEmbedder):
    """A RevisedEmbedder that gives no vectors (None, as the inference
    service's embedder does for a call that failed or timed out) for a call
    holding any of ``down``'s texts, until ``down`` is emptied."""

    def __init__(self, table: dict[str, np.ndarray], down: set[str]) -> None:
        super().__init__(table)
        self.down = down

    async def embed_each_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> list[Embedding | None]:
        if self.down.intersection(texts):
            return [None] * len(texts)
        return await super().embed_each_or_none(texts, timeout_s)


async def test_a_backfill_stopped_midway_is_finished_by_a_later_read(redis_url: str, monkeypatch) -> None:
    """A backfill that stopped after some of its chunks (the embedder
    unavailable for one, as under load; a restart of the replica alike)
    leaves the rest of the turns without vectors: a later assembly, after
    the embedder is back, has them embedded. Assemblies tell whether a
    session lacks vectors by its first live row alone, so a backfill that
    wrote that row first and then stopped left the others zero for good."""
    monkeypatch.setattr(servicer_module, "BACKFILL_CHUNK_TURNS", 4)
    monkeypatch.setattr(servicer_module, "BACKFILL_TURNS_PER_S", 1000.0)
    # DOOR_TURN is turn 0, SMALL_TALK[i] turn i + 1: turn 5 is in the second chunk.
    async with revised_session(redis_url, {}, embedder=UnavailableFor({}, set())) as opened:
        servicer, index, session, embedder, _ = opened
        embedder.down = {SMALL_TALK[4]}
        await assemble_door_question(servicer, session)
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        embedder.down = set()
        # The next question, after the conversation went on.
        appended = common_pb2.Message(role=USER, content="And the windows?")
        await servicer.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=session[0], session_id=session[1], messages=[appended], any_version=True
            ),
            NoDeadline(),
        )
        await assemble_door_question(servicer, session)
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        indexed = await index.read(*session, None)
        assert indexed.embedder == "fake@2"
        assert indexed.unit_vectors.any(axis=1).all(), np.flatnonzero(~indexed.unit_vectors.any(axis=1))


class FailsOnce(RevisedEmbedder):
    """A RevisedEmbedder that gives no vectors for the first call holding
    any of ``texts`` (an Embed that failed or timed out, once), then does."""

    def __init__(self, table: dict[str, np.ndarray], texts: set[str]) -> None:
        super().__init__(table)
        self.texts = set(texts)

    async def embed_each_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> list[Embedding | None]:
        if self.texts.intersection(texts):
            self.texts.clear()
            return [None] * len(texts)
        return await super().embed_each_or_none(texts, timeout_s)


@contextlib.asynccontextmanager
async def session_with_a_gap(redis_url: str, embedder: RevisedEmbedder):
    """A session of SMALL_TALK[:4], DOOR_TURN and SMALL_TALK[4:], in three
    appends, by an in-process servicer on real Redis; ``embedder`` decides
    which get vectors. Yields the servicer, its index, the session's
    (tenant, id) and the Redis client."""
    async with appended_session(redis_url, embedder, [SMALL_TALK[:4], [DOOR_TURN], SMALL_TALK[4:]]) as made:
        yield made


async def append_one(servicer: ContextServicer, session: tuple[str, str], text: str):
    """One user turn appended to ``session``, at whatever version it is."""
    return await servicer.AppendTurns(
        pb.AppendTurnsRequest(
            tenant_id=session[0],
            session_id=session[1],
            messages=[common_pb2.Message(role=USER, content=text)],
            any_version=True,
        ),
        NoDeadline(),
    )


def door_direction() -> np.ndarray:
    direction = np.zeros(16, np.float32)
    direction[0] = 1.0
    return direction


async def door_turn_found_by_its_vector(servicer, index, session) -> None:
    """Once the backfills in flight end, every turn has a vector, and the
    door question (which shares no word with DOOR_TURN) finds it by it."""
    await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
    indexed = await index.read(*session, None)
    assert indexed.unit_vectors.any(axis=1).all(), np.flatnonzero(~indexed.unit_vectors.any(axis=1))
    answer = await assemble_door_question(servicer, session)
    assert answer.inputs.dense_scored
    assert DOOR_TURN in [m.content for m in answer.messages]


async def test_a_turn_the_embedder_gave_no_vector_at_its_append_is_embedded_soon(redis_url: str) -> None:
    """The embedder fails the one append of DOOR_TURN (unavailable, or its
    deadline passed) and works again at once: the turn is stored without a
    vector, in the middle of the session, and the append itself has it
    embedded in the background, with no read of the session needed."""
    table = {DOOR_QUESTION: door_direction(), DOOR_TURN: door_direction()}
    embedder = FailsOnce(table, {DOOR_TURN})
    async with session_with_a_gap(redis_url, embedder) as (servicer, index, session, _):
        assert not embedder.texts, "the embedder never failed the append"
        await door_turn_found_by_its_vector(servicer, index, session)


async def test_a_turn_left_without_a_vector_is_embedded_by_a_later_read(redis_url: str, monkeypatch) -> None:
    """The embedder down for the append of DOOR_TURN and still down for the
    append's own attempt: the turn is found by words only (not at all, for
    the question, which shares none of its words) until the embedder is
    back; then the next assemblies have it embedded and find it."""
    # A read asks again at once, as one does BACKFILL_ASKED_FOR_S later.
    monkeypatch.setattr(servicer_module, "BACKFILL_ASKED_FOR_S", 0.0)
    table = {DOOR_QUESTION: door_direction(), DOOR_TURN: door_direction()}
    embedder = UnavailableFor(table, {DOOR_TURN})
    async with session_with_a_gap(redis_url, embedder) as (servicer, index, session, _):
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        before = await assemble_door_question(servicer, session)
        assert DOOR_TURN not in [m.content for m in before.messages]
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        embedder.down = set()
        await assemble_door_question(servicer, session)
        await door_turn_found_by_its_vector(servicer, index, session)


def context_settings(redis_url: str, append_embed_timeout_s: float | None = None) -> Settings:
    """A context service's settings on this Redis, its turns and questions
    embedded in its own process; an ``append_embed_timeout_s`` too short
    for any turn to be embedded makes a replica whose appends store them
    without vectors (as under an embedder too busy to answer in time)."""
    settings = Settings(mesh=mesh_settings())
    settings.redis.url = redis_url
    settings.context.session_ttl_s = 600
    settings.context.pack_older_turns = False
    if append_embed_timeout_s is not None:
        settings.context.append_embed_timeout_s = append_embed_timeout_s
    return settings


async def stored_rows(
    client: redis.Redis, tenant: str, session_id: str, turns: int, dimensions: int = 384
) -> np.ndarray:
    """The session's int8 vector rows as Redis holds them (no compaction: from turn 0)."""
    packed = await client.get(store.key(tenant, session_id, "ix:vectors")) or b""
    rows = np.zeros((turns, dimensions), np.int8)
    held = np.frombuffer(packed, np.int8)[: rows.size]
    rows.reshape(-1)[: len(held)] = held
    return rows


async def test_a_gap_left_by_a_replica_that_stopped_is_filled_by_another_after_a_restart(
    redis_url: str,
) -> None:
    """Real context services on one Redis: replica A appends turns with their
    vectors; replica B, whose embedder never answers in time, appends one
    turn in the middle without a vector and stops before anything could
    embed it; A is restarted (it remembers nothing of the session). A's
    next assemblies find the gap and fill it, so the turn is found by
    meaning again, not by its words alone for the rest of the session."""
    client = redis.Redis.from_url(redis_url)
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"

    async def append(stub, contents) -> None:
        messages = [common_pb2.Message(role=USER, content=c) for c in contents]
        request = pb.AppendTurnsRequest(
            tenant_id=tenant, session_id=session_id, messages=messages, any_version=True
        )
        await stub.AppendTurns(request)

    try:
        async with (
            running(app, "context", context_settings(redis_url)) as address,
            router_channel(address, "context") as channel,
        ):
            replica_a = context_service_pb2_grpc.ContextServiceStub(channel)
            created = await replica_a.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
            session_id = created.session.session_id
            await append(replica_a, SMALL_TALK[:4])
            async with (
                running(app, "context", context_settings(redis_url, 1e-6)) as address_b,
                router_channel(address_b, "context") as channel_b,
            ):
                await append(context_service_pb2_grpc.ContextServiceStub(channel_b), [DOOR_TURN])
            await append(replica_a, SMALL_TALK[4:])
        turns = len(SMALL_TALK) + 1
        rows = await stored_rows(client, tenant, session_id, turns)
        assert np.flatnonzero(~rows.any(axis=1)).tolist() == [4], "B's append was not the one gap"
        async with (
            running(app, "context", context_settings(redis_url)) as address,
            router_channel(address, "context") as channel,
        ):
            replica_a = context_service_pb2_grpc.ContextServiceStub(channel)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while not (rows := await stored_rows(client, tenant, session_id, turns)).any(axis=1).all():
                assert loop.time() < deadline, f"turn 4 still has no vector: {rows[4].any()}"
                await assemble(replica_a, tenant, session_id, DOOR_QUESTION, 150)
                await asyncio.sleep(0.5)
    finally:
        await client.aclose()


class FailsOnceThenHeld(GatedEmbedder):
    """Gives no vectors for the first call holding any of ``fail_once``'s
    texts (each fails one call: an append's), and holds later calls for
    ``held``'s until ``opened`` is set (the backfill's), as GatedEmbedder."""

    def __init__(self, fail_once: set[str], held: set[str]) -> None:
        super().__init__({}, held)
        self.fail_once = set(fail_once)
        self.opened.clear()

    async def embed_each_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> list[Embedding | None]:
        if failing := self.fail_once.intersection(texts):
            self.fail_once -= failing
            return [None] * len(texts)
        return await super().embed_each_or_none(texts, timeout_s)


async def test_a_gap_backfill_writes_nothing_into_a_session_deleted_meanwhile(redis_url: str) -> None:
    """The append's backfill of DOOR_TURN held between its read and its
    write while the session is deleted: it writes nothing, so no key of the
    session is left (one written then would outlive it, and be a later
    session's of the id)."""
    embedder = FailsOnceThenHeld({DOOR_TURN}, {DOOR_TURN})
    async with session_with_a_gap(redis_url, embedder) as (servicer, _, session, client):
        await deleted_while_its_backfill_is_held(servicer, session, embedder, client)


async def test_a_gap_backfill_writes_nothing_into_a_session_reverted_meanwhile(redis_url: str) -> None:
    """The append's backfill of DOOR_TURN (turn 4) held while the session is
    reverted to before it and another turn appended there, also without a
    vector: DOOR_TURN's vector never lands in that turn's row; the
    backfill reads the session again and gives the new turn its own."""
    replacement = "The windows were replaced last spring."
    embedder = FailsOnceThenHeld({DOOR_TURN, replacement}, {DOOR_TURN})
    async with session_with_a_gap(redis_url, embedder) as (servicer, _, session, client):
        await asyncio.wait_for(embedder.entered.wait(), 10)
        await servicer.RevertSession(
            pb.RevertSessionRequest(tenant_id=session[0], session_id=session[1], version=1, any_version=True),
            None,
        )
        appended = await append_one(servicer, session, replacement)
        assert not embedder.fail_once, "the replacement's append was given a vector"
        assert not (await stored_rows(client, *session, 5, 16))[4].any()
        embedder.opened.set()
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        rows = await stored_rows(client, *session, 5, 16)
        assert (await servicer._index.read(*session, None)).version == appended.version
    np.testing.assert_array_equal(rows[4], relevance.quantize(embedder._vector(replacement)[None])[0])
    assert not np.array_equal(rows[4], relevance.quantize(embedder._vector(DOOR_TURN)[None])[0])


async def test_a_gap_left_while_a_backfill_runs_is_still_asked_for_after_it(redis_url: str) -> None:
    """Another append stores a turn without a vector while the backfill of
    DOOR_TURN embeds it: the backfill's end does not clear the index's
    count of such writes (it moved since its read), so the next read has
    the new gap filled too instead of taking the session for whole."""
    late = "The windows were replaced last spring."
    embedder = FailsOnceThenHeld({DOOR_TURN, late}, {DOOR_TURN})
    async with session_with_a_gap(redis_url, embedder) as (servicer, index, session, _):
        await asyncio.wait_for(embedder.entered.wait(), 10)
        await append_one(servicer, session, late)
        assert not embedder.fail_once, "the late turn's append was given a vector"
        embedder.opened.set()
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        indexed = await index.read(*session, None)
        assert indexed.vector_gaps
        assert np.flatnonzero(~indexed.unit_vectors.any(axis=1)).tolist() == [len(indexed.roles) - 1]
        # Two gap writes, counted as a posting is packed (4 bytes): a replica
        # from before the field reads it as a term's postings, and failed to
        # load a session whose value was HINCRBY's decimal "2".
        held = await index._client.hget(store.key(*session, "ix:postings"), store.GAPS_FIELD)
        assert held == np.array([2], dtype="<u4").tobytes()
        await assemble_door_question(servicer, session)
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        indexed = await index.read(*session, None)
        assert indexed.unit_vectors.any(axis=1).all()
        assert not indexed.vector_gaps


async def test_a_stale_settle_leaves_a_newer_gap_asked_for(redis_url: str, monkeypatch) -> None:
    """Two replicas read a session's gaps; one fills them and settles;
    an append then leaves a new gap; the other's settle, of its earlier
    read, comes last. The count was reset by the first settle and began
    again at 1 with the new gap: the stale settle found the bytes it had
    read and cleared the new gap's count, so that turn (not the first live
    row) was never asked for again (a review's repro on real Redis)."""
    monkeypatch.setattr(servicer_module, "BACKFILL_ASKED_FOR_S", 0.0)
    late = "The windows were replaced last spring."
    table = {DOOR_QUESTION: door_direction(), DOOR_TURN: door_direction()}
    embedder = UnavailableFor(table, {DOOR_TURN})
    async with session_with_a_gap(redis_url, embedder) as (servicer, index, session, _):
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        embedder.down = set()
        stale = await index.vector_gaps(*session, None)  # the other replica's read
        assert stale.positions == [4]
        await assemble_door_question(servicer, session)  # this one fills and settles
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        assert not (await index.read(*session, None)).vector_gaps
        embedder.down = {late}
        await append_one(servicer, session, late)
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        assert (await index.read(*session, None)).vector_gaps
        assert await index.settle(*session, stale) == -1
        indexed = await index.read(*session, None)
        assert indexed.vector_gaps
        assert np.flatnonzero(~indexed.unit_vectors.any(axis=1)).tolist() == [len(indexed.roles) - 1]


class CountingEmbedder(RevisedEmbedder):
    """A RevisedEmbedder that counts the texts it embedded for appends and backfills."""

    def __init__(self) -> None:
        super().__init__({})
        self.texts = 0

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None) -> list[Embedding]:
        self.texts += len(texts)
        return await super().embed_each_or_none(texts, timeout_s)


async def test_a_session_under_two_revisions_side_by_side_follows_the_newer_and_never_goes_back(
    redis_url: str,
) -> None:
    """Servers of revisions 2 and 3 side by side (an upgrade under way):
    an append of either, or a question of either, made the session's index
    that revision's, dropping the other's rows, and the backfill embedded
    every live turn again at each change: here its rows changed revision at
    each of the 12 steps (90 texts embedded, 36 now). The index follows
    the newer revision it has seen: an append of the older leaves its turns
    to the backfill, which gives them the newer's vectors; a question of the
    older has nothing embedded where the rows lack none of the newer's."""
    embedder = CountingEmbedder()
    embedder.embedder = "fake@2"
    async with appended_session(redis_url, embedder, [[DOOR_TURN, *SMALL_TALK]]) as opened:
        servicer, index, session, _ = opened
        seen = []
        embedded_for_older_questions = []
        for step in range(6):
            embedder.embedder = ("fake@3", "fake@2")[step % 2]
            appended = common_pb2.Message(role=USER, content=f"Turn {step} of the upgrade.")
            await servicer.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=session[0], session_id=session[1], messages=[appended], any_version=True
                ),
                NoDeadline(),
            )
            await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
            seen.append((await index.read(*session, None)).embedder)
            embedder.embedder = ("fake@2", "fake@3")[step % 2]
            before = embedder.texts
            await assemble_door_question(servicer, session)
            await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
            seen.append((await index.read(*session, None)).embedder)
            if step % 2 == 0:
                embedded_for_older_questions.append(embedder.texts - before)
        assert seen == ["fake@3"] * 12
        # The older revision's turns were given the newer's vectors.
        assert (await index.read(*session, None)).unit_vectors.any(axis=1).all()
        # The first, after revision 3's append dropped revision 2's rows, asked
        # for the backfill of revision 3 (which revision 2 answered: given up).
        assert embedded_for_older_questions[1:] == [0, 0]


@pytest.mark.parametrize(
    "embedder, than, older",
    [
        ("minilm@2", "minilm@3", True),
        ("minilm@3", "minilm@2", False),
        ("minilm@9", "minilm@10", True),  # by number, not as text
        ("minilm@2", "minilm@2", False),
        ("other@2", "minilm@3", False),  # another model: not known older, it replaces
        ("minilm@2", "", False),
        ("", "minilm@2", False),
        ("minilm@a", "minilm@b", False),
        ("a@b@2", "a@b@3", True),
    ],
)
async def test_the_index_scripts_order_revisions_as_the_services_do(
    redis_url: str, embedder: str, than: str, older: bool
) -> None:
    """The scripts that write rows (turn_index.OLDER_EMBEDDER) and the
    servicer (meshgate.embedding.older_embedder) must agree on which
    revision is the older, or an assembly asks for a backfill its write refuses."""
    client = redis.Redis.from_url(redis_url)
    try:
        by_script = await client.eval(
            turn_index.OLDER_EMBEDDER + "return older_embedder(ARGV[1], ARGV[2]) and 1 or 0",
            0,
            embedder,
            than,
        )
    finally:
        await client.aclose()
    assert (bool(by_script), older_embedder(embedder, than)) == (older, older)


class OlderServerFor(RevisedEmbedder):
    """A RevisedEmbedder whose texts in ``older`` come back from a server of
    revision fake@2 (servers of two side by side: another Embed call), the
    rest as ``embedder`` says."""

    def __init__(self, older: set[str]) -> None:
        super().__init__({})
        self.older = older

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None) -> list[Embedding]:
        return [Embedding(self._vector(t), "fake@2" if t in self.older else self.embedder) for t in texts]


async def test_an_append_whose_texts_two_revisions_embedded_keeps_the_newers_vectors(
    redis_url: str, monkeypatch
) -> None:
    """An append's vectors of two revisions (its question remembered from
    its assembly, its turns from calls two servers answered) were kept of
    the revision of the last text embedded: here the older, whose write
    the index of the newer refuses, so none of the three turns had a
    vector, the question's and the first reply's of the newer thrown away.
    They are kept of the newer: only the older's turn is a gap."""
    monkeypatch.setattr(servicer_module, "MAX_VECTOR_BACKFILLS", 0)  # the append's write alone
    embedder = OlderServerFor(set())
    embedder.embedder = "fake@3"
    async with appended_session(redis_url, embedder, [[DOOR_TURN, *SMALL_TALK]]) as opened:
        servicer, index, session, _ = opened
        await assemble_door_question(servicer, session)  # remembered, as revision 3 embedded it
        reply, follow_up = "Green, as the shutters.", "And the windows?"
        embedder.older = {follow_up}
        turns = [(USER, DOOR_QUESTION), (ASSISTANT, reply), (USER, follow_up)]
        await servicer.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=session[0],
                session_id=session[1],
                messages=[common_pb2.Message(role=role, content=text) for role, text in turns],
                any_version=True,
            ),
            NoDeadline(),
        )
        indexed = await index.read(*session, None)
        assert indexed.embedder == "fake@3"
        assert indexed.unit_vectors[-3:].any(axis=1).tolist() == [True, True, False]
        assert indexed.vector_gaps


class AlternatingServers(RevisedEmbedder):
    """A RevisedEmbedder whose calls for turns (appends, backfills) are
    answered by servers of ``revisions`` in turn, one call each (servers
    of two revisions side by side), once ``revisions`` is set; questions
    as ``embedder`` says. Counts the turns' texts embedded."""

    def __init__(self) -> None:
        super().__init__({})
        self.revisions: list[str] = []
        self.texts = 0

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None) -> list[Embedding]:
        self.texts += len(texts)
        if not self.revisions:
            return await super().embed_each_or_none(texts, timeout_s)
        revision = self.revisions.pop(0)
        self.revisions.append(revision)
        return [Embedding(self._vector(t), revision) for t in texts]


async def test_a_backfill_keeps_the_chunks_its_revision_embedded_when_another_answers_some(
    redis_url: str, monkeypatch
) -> None:
    """A backfill toward revision 3 over servers of 3 and 2 answering its
    chunks in turn gave its whole pass up at the first chunk of 2: of the
    9 turns, 1 row written (the first chunk's), the chunks after the one of
    2 not embedded, left to later reads, a chunk of 3 each. The chunks of 3
    are written, those of 2 left gaps for the next read, which asks again."""
    monkeypatch.setattr(servicer_module, "BACKFILL_CHUNK_TURNS", 4)
    monkeypatch.setattr(servicer_module, "BACKFILL_TURNS_PER_S", 1000.0)
    embedder = AlternatingServers()
    embedder.embedder = "fake@2"
    # DOOR_TURN and SMALL_TALK: 9 turns, chunks of turns 8, 4-7 and 0-3, the last first.
    async with appended_session(redis_url, embedder, [[DOOR_TURN, *SMALL_TALK]]) as opened:
        servicer, index, session, _ = opened
        embedder.embedder, embedder.revisions = "fake@3", ["fake@3", "fake@2"]
        await assemble_door_question(servicer, session)
        await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        indexed = await index.read(*session, None)
        assert indexed.embedder == "fake@3"
        # Turn 0's row comes last, once every other gap has one.
        assert np.flatnonzero(indexed.unit_vectors.any(axis=1)).tolist() == [1, 2, 3, 8]
        # The next read asks for the rest, and the chunks of 3 fill them.
        for _ in range(3):
            await assemble_door_question(servicer, session)
            await asyncio.wait_for(asyncio.gather(*servicer._backfills.tasks.values()), 10)
        assert (await index.read(*session, None)).unit_vectors.any(axis=1).all()
