"""The router's turn pipeline with fakes behind its stage interfaces: no
Redis, Triton or sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshgate import telemetry
from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, RouterSettings
from meshgate.errors import MeshgateError, invalid_argument, not_found, unavailable
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.auth import Tenant
from services.router.pipeline import (
    Answer,
    Appended,
    Assembly,
    Budget,
    CacheStatus,
    Completion,
    Delta,
    Failure,
    Hit,
    Pipeline,
    SummarySpend,
    _Race,
    replay_pieces,
)

TENANT = Tenant("t1", frozenset({"*"}))
MODELS = {"m": ModelSettings(context_window_tokens=512, max_output_tokens=64, default_max_tokens=8)}


def user(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)


def request(text="hello", policy=pb.CACHE_POLICY_USE, **fields) -> pb.ChatRequest:
    return pb.ChatRequest(model="m", messages=[user(text)], cache_policy=policy, **fields)


class FakeContexts:
    def __init__(self, version: int = 3, outage: bool = False) -> None:
        self.version = version
        self.outage = outage
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.assembled: list[str] = []
        self.appended: list[tuple[str, int, str]] = []
        self.append_error: MeshgateError | None = None
        # (session, turn id) of every assembly, and of every hold released.
        self.holds: list[tuple[str, str]] = []
        self.released: list[tuple[str, str]] = []
        self.appended_turn_ids: list[str] = []
        # Sessions an assembly finds none of (SESSION_NOT_FOUND).
        self.missing: set[str] = set()
        # What the session's summaries spent, for the next append to report.
        self.summary_spend: tuple[SummarySpend, ...] = ()

    async def create_session(self, tenant, budget, request_id="") -> str:
        self.created.append(tenant.id)
        return f"s{len(self.created)}"

    async def delete_session(self, tenant, session_id) -> None:
        self.deleted.append(session_id)

    async def assemble(self, turn):
        self.assembled.append(turn.session_id)
        self.holds.append((turn.session_id, turn.turn_id))
        if turn.session_id in self.missing:
            raise not_found(Reason.SESSION_NOT_FOUND, f"no session {turn.session_id}")
        if self.outage and not turn.session_id:
            return None
        history = [user("earlier")] if turn.session_id else []
        return Assembly([*history, *turn.messages], self.version if turn.session_id else 0)

    async def append(self, turn, session_id, after_version, answer) -> Appended:
        if self.append_error is not None:
            raise self.append_error
        self.appended.append((session_id, after_version, answer.text))
        self.appended_turn_ids.append(turn.turn_id)
        spend, self.summary_spend = self.summary_spend, ()
        return Appended(after_version + 1, spend)

    async def release_hold(self, turn, session_id) -> None:
        self.released.append((session_id, turn.turn_id))


class FakeCache:
    """Answers an exact hit from the exact lookup and any other hit from the
    semantic one, which waits for ``answered``, like the cache service."""

    def __init__(self, hit: Hit | None = None) -> None:
        self.hit = hit
        self.answered = asyncio.Event()
        self.answered.set()
        self.exact_lookups: list[list[str]] = []
        self.lookups: list[list[str]] = []  # the semantic ones
        self.fence_reads: list[list[str]] = []
        self.stored: list[tuple[list[str], str]] = []

    async def lookup(self, plan, messages, budget, semantic):
        exact = self.hit if self.hit is not None and self.hit.status is CacheStatus.EXACT_HIT else None
        if not semantic:
            self.exact_lookups.append([m.content for m in messages])
            return exact
        self.lookups.append([m.content for m in messages])
        await self.answered.wait()
        return self.hit

    async def read_fence(self, plan, messages, budget) -> None:
        self.fence_reads.append([m.content for m in messages])

    async def store(self, plan, messages, answer, budget) -> None:
        self.stored.append(([m.content for m in messages], answer.text))


class FakeGenerator:
    """``finish_before_last``: the answer is filled before the last piece
    is yielded, as Deployments.generate fills it when the inference
    service's completion brings the last text (else after it, as when the
    completion comes alone)."""

    def __init__(
        self, pieces=("Hel", "lo ", "there"), fail_after: int | None = None, finish_before_last=False
    ) -> None:
        self.pieces = pieces
        self.fail_after = fail_after
        self.finish_before_last = finish_before_last
        self.prompts: list[list[str]] = []
        self.session_ids: list[str] = []
        self.started = asyncio.Event()
        self.closed = False

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.prompts.append([m.content for m in prompt])
        self.session_ids.append(session_id)
        self.started.set()
        try:
            for index, piece in enumerate(self.pieces):
                if index == self.fail_after:
                    raise unavailable(Reason.STREAM_ENDED_EARLY, "backend died")
                await asyncio.sleep(0)
                if self.finish_before_last and index == len(self.pieces) - 1:
                    self._finish(answer)
                yield piece
            self._finish(answer)
        finally:
            self.closed = True

    def _finish(self, answer: Answer) -> None:
        answer.text = "".join(self.pieces)
        answer.prompt_tokens, answer.completion_tokens = 5, len(self.pieces)
        answer.finish_reason, answer.deployment = "length", "d1"


class RecordingAdmission:
    def __init__(self, refuse: MeshgateError | None = None, round_trip: asyncio.Event | None = None) -> None:
        self.refuse = refuse
        # Set: admission waits for it, as for Redis, and says it waits.
        self.round_trip = round_trip
        self.admitting = asyncio.Event()
        self.settled: list = []
        self.refusals: list = []
        self.summary_spends: list = []

    def waits(self, turn) -> bool:
        return self.round_trip is not None

    async def admit(self, turn):
        self.admitting.set()
        if self.round_trip is not None:
            await self.round_trip.wait()
        if self.refuse is not None:
            raise self.refuse
        return ("grant", turn.max_tokens)

    async def settle(self, grant, turn, outcome) -> None:
        self.settled.append((grant, outcome))

    def refused(self, turn, outcome) -> None:
        self.refusals.append(outcome)

    def summaries_spent(self, tenant, spends) -> None:
        self.summary_spends.append((tenant.id, spends))


def pipeline(contexts=None, cache=None, generator=None, admission=None, **settings):
    parts = {
        "contexts": contexts or FakeContexts(),
        "cache": cache or FakeCache(),
        "generator": generator or FakeGenerator(),
    }
    built = Pipeline(RouterSettings(**settings), MODELS, admission=admission, **parts)
    return built, parts


async def events_of(stream) -> list:
    return [event async for event in stream]


def texts(events) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


async def test_a_stateless_miss_streams_the_generation_and_stores_it():
    turns, parts = pipeline()
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert texts(events) == "Hello there"
    completion = events[-1]
    assert isinstance(completion, Completion)
    assert completion.cache_status is CacheStatus.MISS
    assert completion.answer.deployment == "d1"
    assert completion.session_id == ""
    assert parts["cache"].stored == [(["hello"], "Hello there")]
    assert parts["contexts"].appended == []


async def test_an_exact_hit_is_answered_before_any_generation_starts():
    hit = Hit(Answer(text="Paris, of course.", completion_tokens=4), CacheStatus.EXACT_HIT, 1.0)
    turns, parts = pipeline(cache=FakeCache(hit))
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert texts(events) == "Paris, of course."
    assert events[-1].cache_status is CacheStatus.EXACT_HIT
    # No inference, no assembly and no semantic lookup for an exact hit.
    assert not parts["generator"].started.is_set() and parts["generator"].prompts == []
    assert parts["cache"].exact_lookups == [["hello"]] and parts["cache"].lookups == []
    assert parts["contexts"].assembled == [] and parts["cache"].stored == []


async def test_a_hit_is_replayed_in_word_pieces_and_the_generation_is_cancelled():
    text = "Paris is the capital of France and has been for a long time."
    hit = Hit(Answer(text=text, completion_tokens=14, deployment="d0"), CacheStatus.SEMANTIC_HIT, 0.95)
    cache = FakeCache(hit)
    cache.answered.clear()
    # Unpaced (the default), pieces of up to replay_burst_chars.
    turns, parts = pipeline(cache=cache, replay_burst_chars=12)
    running = asyncio.ensure_future(events_of(turns.run(request(), TENANT, "", Budget())))
    # The hit answers once the speculative generation is under way.
    await asyncio.wait_for(parts["generator"].started.wait(), 5)
    cache.answered.set()
    events = await running
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert len(deltas) > 3
    assert "".join(deltas) == text
    assert all(piece.endswith(" ") for piece in deltas[:-1])
    # Only the last piece says so (a front end may send it with the completion).
    assert [e.last for e in events if isinstance(e, Delta)] == [False] * (len(deltas) - 1) + [True]
    assert events[-1].cache_status is CacheStatus.SEMANTIC_HIT
    assert events[-1].answer.completion_tokens == 14
    # Nothing generated went out, and the speculative generation was ended.
    assert "Hel" not in deltas
    assert parts["generator"].closed
    assert parts["cache"].stored == []


async def test_generation_starts_during_the_lookup_but_waits_for_its_answer():
    cache = FakeCache()
    cache.answered.clear()
    turns, parts = pipeline(cache=cache)
    stream = turns.run(request(), TENANT, "", Budget())
    first = asyncio.ensure_future(anext(stream))
    await asyncio.wait_for(parts["generator"].started.wait(), 5)
    await asyncio.sleep(0.01)
    assert not first.done()  # a generated piece waits for the lookup's miss
    cache.answered.set()
    assert (await first) == Delta("Hel")
    rest = await events_of(stream)
    assert isinstance(rest[-1], Completion)


async def test_without_speculation_generation_starts_after_a_miss():
    cache = FakeCache()
    cache.answered.clear()
    turns, parts = pipeline(cache=cache, speculative_generation=False)
    stream = turns.run(request(), TENANT, "", Budget())
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert not parts["generator"].started.is_set()
    cache.answered.set()
    assert (await first) == Delta("Hel")
    await events_of(stream)


async def test_bypass_skips_the_lookup_and_the_store():
    turns, parts = pipeline()
    events = await events_of(turns.run(request(policy=pb.CACHE_POLICY_BYPASS), TENANT, "", Budget()))
    assert events[-1].cache_status is CacheStatus.BYPASSED
    assert parts["cache"].lookups == parts["cache"].exact_lookups == [] and parts["cache"].stored == []


@pytest.mark.parametrize("session_id", ["", "s1"], ids=["stateless", "session turn"])
async def test_a_refresh_reads_its_store_fence_before_generating_and_looks_nothing_up(session_id):
    """Its Store must carry a fence read before the answer was generated,
    as a lookup's miss gives one (CachePlan.store_fence)."""
    generator = FakeGenerator()
    generating_at_the_read = []

    class Fencing(FakeCache):
        async def read_fence(self, plan, messages, budget) -> None:
            generating_at_the_read.append(generator.started.is_set())
            await super().read_fence(plan, messages, budget)

    cache = Fencing()
    turns, _ = pipeline(cache=cache, generator=generator)
    stream = turns.run(request(policy=pb.CACHE_POLICY_REFRESH), TENANT, session_id, Budget())
    assert (await anext(stream)) == Delta("Hel")
    prompt = ["earlier", "hello"] if session_id else ["hello"]
    assert cache.fence_reads == [prompt] and generating_at_the_read == [False]
    assert generator.prompts == [prompt]
    events = await events_of(stream)
    assert events[-1].cache_status is CacheStatus.MISS
    assert cache.exact_lookups == cache.lookups == []
    assert cache.stored == [(prompt, "Hello there")]


async def test_the_genai_span_covers_the_whole_turn_and_carries_its_usage(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("test"))
    turns, _ = pipeline()
    first_delta_ns = None
    async for event in turns.run(request(policy=pb.CACHE_POLICY_BYPASS), TENANT, "", Budget()):
        if isinstance(event, Delta) and first_delta_ns is None:
            assert exporter.get_finished_spans() == ()  # the turn is not over
            first_delta_ns = time.time_ns()
    (span,) = exporter.get_finished_spans()
    assert span.name == "chat m" and span.start_time <= first_delta_ns <= span.end_time
    assert span.attributes["gen_ai.request.max_tokens"] == 8
    assert span.attributes["gen_ai.usage.output_tokens"] == 3
    assert span.attributes["meshgate.cache_status"] == "bypassed"


async def test_a_stateless_turn_goes_out_as_sent_when_the_context_service_is_down():
    # Long enough that only the context service could say whether it fits.
    text = "as sent " * 80
    turns, parts = pipeline(contexts=FakeContexts(outage=True))
    events = await events_of(turns.run(request(text), TENANT, "", Budget()))
    assert isinstance(events[-1], Completion)
    assert parts["contexts"].assembled == [""]
    assert parts["generator"].prompts == [[text]]


async def test_a_stateless_prompt_that_surely_fits_skips_assembly():
    turns, parts = pipeline()
    events = await events_of(turns.run(request("short", policy=pb.CACHE_POLICY_BYPASS), TENANT, "", Budget()))
    assert isinstance(events[-1], Completion)
    assert parts["contexts"].assembled == []
    assert parts["generator"].prompts == [["short"]]


@pytest.mark.parametrize(
    "messages",
    [
        # 8 max_tokens leave 504 of the window's 512: 600 bytes might not fit.
        [user("x" * 600)],
        # Assembly would put the system message first.
        [user("hi"), common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="be brief"), user("again")],
    ],
)
async def test_a_stateless_prompt_that_might_change_is_assembled(messages):
    turns, parts = pipeline()
    chat = pb.ChatRequest(model="m", messages=messages, cache_policy=pb.CACHE_POLICY_BYPASS)
    events = await events_of(turns.run(chat, TENANT, "", Budget()))
    assert isinstance(events[-1], Completion)
    assert parts["contexts"].assembled == [""]


async def test_a_session_turn_answers_from_its_history_and_appends():
    turns, parts = pipeline(contexts=FakeContexts(version=3))
    events = await events_of(turns.run(request("next"), TENANT, "s9", Budget()))
    assert parts["generator"].prompts == [["earlier", "next"]]
    # The cache keys a session turn on the whole prompt it answered.
    assert parts["cache"].lookups == parts["cache"].exact_lookups == [["earlier", "next"]]
    assert parts["contexts"].appended == [("s9", 3, "Hello there")]
    assert (events[-1].session_id, events[-1].session_version) == ("s9", 4)
    # Routing sees the session (session affinity over deployments).
    assert parts["generator"].session_ids == ["s9"]


async def test_what_a_sessions_summaries_spent_is_billed_to_the_tenant_of_the_turn_whose_append_took_it():
    contexts = FakeContexts(version=3)
    spend = (SummarySpend("summarizer", 400, 60, 2),)
    contexts.summary_spend = spend
    admission = RecordingAdmission()
    turns, _ = pipeline(contexts=contexts, admission=admission)
    await events_of(turns.run(request("next"), TENANT, "s9", Budget()))
    assert admission.summary_spends == [(TENANT.id, spend)]
    # The turn itself settles as before; the next append took nothing more.
    assert len(admission.settled) == 1
    await events_of(turns.run(request("again"), TENANT, "s9", Budget()))
    assert admission.summary_spends == [(TENANT.id, spend)]


async def test_a_strict_turn_at_another_version_is_refused_before_generating():
    turns, parts = pipeline(contexts=FakeContexts(version=3))
    events = await events_of(turns.run(request(expected_session_version=2), TENANT, "s9", Budget()))
    assert events == [events[0]] and isinstance(events[0], Failure)
    error = events[0].error
    assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, Reason.VERSION_CONFLICT)
    assert error.metadata["current_version"] == "3"
    assert parts["generator"].prompts == []


async def test_a_first_session_turn_creates_its_session_only_once_valid():
    turns, parts = pipeline()
    refused = await events_of(turns.run(request(""), TENANT, "", Budget(), create_session=True))
    bad = pb.ChatRequest(model="m", cache_policy=pb.CACHE_POLICY_USE)  # no messages
    refused += await events_of(turns.run(bad, TENANT, "", Budget(), create_session=True))
    assert [e.error.reason for e in refused if isinstance(e, Failure)][-1] == Reason.EMPTY_MESSAGES
    assert parts["contexts"].created == [TENANT.id]  # the first (empty text) turn was valid
    events = await events_of(turns.run(request(), TENANT, "", Budget(), create_session=True))
    assert events[-1].session_id == "s2"
    assert parts["generator"].session_ids == ["s1", "s2"]


async def test_a_strict_first_session_turn_at_another_version_creates_no_session():
    """The session a first turn creates starts at version 0: a turn expecting
    another is refused before it is created, not by its assembly after."""
    contexts = FakeContexts(version=0)
    turns, _ = pipeline(contexts=contexts)
    refused = []
    for expected in (2, -1):
        strict = request(expected_session_version=expected)
        refused += await events_of(turns.run(strict, TENANT, "", Budget(), create_session=True))
    errors = [(e.error.code, e.error.reason, e.error.metadata) for e in refused if isinstance(e, Failure)]
    assert errors == [
        (grpc.StatusCode.ABORTED, Reason.VERSION_CONFLICT, {"current_version": "0"}),
        (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_VERSION, {"field": "expected_session_version"}),
    ]
    assert contexts.created == contexts.assembled == []
    first = request(expected_session_version=0)
    events = await events_of(turns.run(first, TENANT, "", Budget(), create_session=True))
    assert (events[-1].session_id, events[-1].session_version) == ("s1", 1)


async def test_a_strict_turn_of_no_session_is_refused_naming_the_field():
    """A review's finding: a stateless turn setting expected_session_version
    was answered (from the cache, or generated), saved nowhere, the strict
    ordering it asked for silently dropped."""
    contexts = FakeContexts(version=0)
    turns, parts = pipeline(contexts=contexts)
    events = await events_of(turns.run(request(expected_session_version=5), TENANT, "", Budget()))
    assert [(e.error.code, e.error.reason, e.error.metadata) for e in events if isinstance(e, Failure)] == [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.UNSUPPORTED_PARAMETER,
            {"field": "expected_session_version"},
        )
    ]
    assert contexts.created == contexts.assembled == []
    assert parts["generator"].session_ids == []


async def until_deleted(contexts: FakeContexts) -> list[str]:
    """The sessions deleted, once the pipeline's deletion in the background has run."""
    for _ in range(100):
        if contexts.deleted:
            break
        await asyncio.sleep(0)
    return contexts.deleted


async def test_a_session_a_turn_created_and_failed_before_storing_anything_in_is_deleted_unnamed():
    """Left, it was an empty session per failed try of a session_id "new"
    turn (the openai SDK resends a 5xx): nothing was stored in it, and no
    answer had named it."""
    turns, parts = pipeline(generator=FakeGenerator(fail_after=1))
    events = await events_of(turns.run(request(), TENANT, "", Budget(), create_session=True))
    assert isinstance(events[-1], Failure) and events[-1].session_id == ""
    assert "session_id" not in events[-1].error.metadata
    assert await until_deleted(parts["contexts"]) == ["s1"]
    assert parts["contexts"].appended == []


async def test_a_session_a_cancelled_turn_created_is_deleted():
    generator = FakeGenerator(pieces=("a ",) * 1000)
    turns, parts = pipeline(generator=generator)

    async def consume():
        async with contextlib.aclosing(
            turns.run(request(), TENANT, "", Budget(), create_session=True)
        ) as events:
            async for event in events:
                if isinstance(event, Delta):
                    await asyncio.sleep(3600)  # the caller stops reading

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(generator.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await until_deleted(parts["contexts"]) == ["s1"]


async def test_a_session_created_as_its_turn_is_cancelled_is_deleted_once_created():
    """A bug hunt's finding: a ChatSession cancelled while the context
    service was creating its first turn's session left that session, empty
    and listed, for context.session_ttl_s (the reply with its id was lost
    with the cancelled call): 9 of 60 streams cancelled 0-40 ms after their
    first message, on the real mesh."""
    contexts = FakeContexts()
    creating, release = asyncio.Event(), asyncio.Event()
    create = contexts.create_session

    async def slow_create(tenant, budget, request_id=""):
        creating.set()
        await release.wait()  # the context service still creating it
        return await create(tenant, budget, request_id)

    contexts.create_session = slow_create
    turns, _ = pipeline(contexts=contexts)
    task = asyncio.ensure_future(events_of(turns.run(request(), TENANT, "", Budget(), create_session=True)))
    await asyncio.wait_for(creating.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await until_deleted(contexts) == ["s1"]


async def test_a_session_a_turn_created_and_began_to_store_in_is_kept_and_named():
    """Its append failed, but may have landed: the session may hold the
    turn, and the failure names it so the caller can go on with it."""
    contexts = FakeContexts()
    contexts.append_error = unavailable(Reason.REDIS_UNAVAILABLE, "down")
    turns, _ = pipeline(contexts=contexts)
    events = await events_of(turns.run(request(), TENANT, "", Budget(), create_session=True))
    assert isinstance(events[-1], Failure) and events[-1].session_id == "s1"
    assert events[-1].error.metadata["session_id"] == "s1"
    # A completed turn keeps its session too.
    contexts.append_error = None
    assert (await events_of(turns.run(request(), TENANT, "", Budget(), create_session=True)))[
        -1
    ].session_id == "s2"
    for _ in range(10):  # time for a deletion in the background, were there one
        await asyncio.sleep(0)
    assert contexts.deleted == []


@pytest.mark.parametrize("finish_before_last", [False, True])
async def test_only_a_piece_the_generation_said_was_its_last_is_marked_last(finish_before_last):
    turns, _ = pipeline(generator=FakeGenerator(finish_before_last=finish_before_last))
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    marks = [event.last for event in events if isinstance(event, Delta)]
    # Filled only after the last piece (the completion came alone), the
    # pipeline cannot know which piece was the last: none is marked.
    assert marks == [False, False, finish_before_last]
    assert texts(events) == "Hello there" and isinstance(events[-1], Completion)


async def test_the_last_piece_comes_on_the_completion_for_a_front_end_that_asks():
    turns, _ = pipeline(generator=FakeGenerator(finish_before_last=True))
    events = await events_of(turns.run(request(), TENANT, "", Budget(), carry_last_text=True))
    assert [e.text for e in events[:-1]] == ["Hel", "lo "]
    assert isinstance(events[-1], Completion) and events[-1].text == "there"
    # Not asked: every piece a delta, the completion without text.
    events = await events_of(turns.run(request("other"), TENANT, "", Budget()))
    assert [e.text for e in events[:-1]] == ["Hel", "lo ", "there"] and events[-1].text == ""


async def test_a_failed_save_sends_the_held_last_piece_as_a_delta_before_the_failure():
    contexts = FakeContexts()
    contexts.append_error = unavailable(Reason.REDIS_UNAVAILABLE, "down")
    turns, _ = pipeline(contexts=contexts, generator=FakeGenerator(finish_before_last=True))
    events = await events_of(turns.run(request(), TENANT, "s1", Budget(), carry_last_text=True))
    assert [e.text for e in events[:-1]] == ["Hel", "lo ", "there"]
    assert isinstance(events[-1], Failure) and events[-1].error.metadata["delivered_deltas"] == "3"


class EveryPieceMarkedLast(FakeGenerator):
    """Breaks Generator's contract (a finish reason only when no piece
    follows), as a retried call's leftover completion once did."""

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        answer.finish_reason = "stop"
        async for piece in super().generate(
            alias, prompt, parameters, budget, answer, session_id, read_ahead
        ):
            yield piece


async def test_no_text_is_lost_or_reordered_when_more_than_one_piece_is_marked_last():
    turns, _ = pipeline(generator=EveryPieceMarkedLast())
    events = await events_of(turns.run(request(), TENANT, "", Budget(), carry_last_text=True))
    assert [e.text for e in events[:-1]] == ["Hel", "lo "]
    assert events[-1].text == "there"


async def test_a_failed_save_after_the_answer_says_how_much_was_delivered():
    contexts = FakeContexts()
    contexts.append_error = unavailable(Reason.REDIS_UNAVAILABLE, "down")
    turns, _ = pipeline(contexts=contexts)
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert texts(events) == "Hello there"
    failure = events[-1]
    assert isinstance(failure, Failure)
    assert failure.error.reason == Reason.REDIS_UNAVAILABLE
    assert failure.error.metadata["delivered_deltas"] == "3"
    assert failure.error.metadata["delivered_chars"] == str(len("Hello there"))


async def test_an_answer_sent_whole_goes_out_on_its_completion_and_a_failure_delivered_none():
    """A front end that sends the answer whole or not at all (a non-streamed
    HTTP answer): no deltas; a turn that fails holds nothing its caller got,
    so its failure names none delivered and it is settled with none."""
    admission = RecordingAdmission()
    contexts = FakeContexts()
    turns, _ = pipeline(contexts=contexts, admission=admission)
    [completion] = await events_of(turns.run(request(), TENANT, "", Budget(), whole=True))
    assert isinstance(completion, Completion) and completion.answer.text == "Hello there"
    contexts.append_error = unavailable(Reason.REDIS_UNAVAILABLE, "down")
    [failure] = await events_of(turns.run(request(), TENANT, "s1", Budget(), whole=True))
    assert isinstance(failure, Failure) and failure.error.reason == Reason.REDIS_UNAVAILABLE
    assert not [name for name in failure.error.metadata if name.startswith("delivered_")]
    [(_, answered), (_, failed)] = admission.settled
    assert (answered.delivered_bytes, failed.delivered_bytes) == (len("Hello there"), 0)


async def test_a_generation_failing_midway_ends_in_a_failure_not_a_short_answer():
    turns, parts = pipeline(generator=FakeGenerator(fail_after=2))
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert texts(events) == "Hello "
    assert isinstance(events[-1], Failure)
    assert events[-1].error.reason == Reason.STREAM_ENDED_EARLY
    assert parts["cache"].stored == []


async def test_a_generation_failing_during_a_hit_does_not_matter():
    hit = Hit(Answer(text="cached"), CacheStatus.SEMANTIC_HIT, 0.93)
    turns, _ = pipeline(cache=FakeCache(hit), generator=FakeGenerator(fail_after=0))
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert texts(events) == "cached"
    assert events[-1].cache_status is CacheStatus.SEMANTIC_HIT
    assert events[-1].similarity == pytest.approx(0.93)


async def test_a_refused_turn_does_no_work_needs_no_settling_and_is_recorded_as_refused():
    refusal = MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT", "over the limit")
    admission = RecordingAdmission(refuse=refusal)
    turns, parts = pipeline(admission=admission)
    events = await events_of(turns.run(request(), TENANT, "", Budget(), create_session=True))
    assert events == [Failure(refusal)]
    assert parts["contexts"].created == [] and parts["generator"].prompts == []
    assert admission.settled == []
    # For the usage ledger, as a turn refused once its history is known is.
    [outcome] = admission.refusals
    assert outcome.failure == "LIMIT" and outcome.answer.prompt_tokens == 0 and not outcome.cancelled


async def test_settle_sees_a_completion_once():
    admission = RecordingAdmission()
    turns, _ = pipeline(admission=admission)
    await events_of(turns.run(request(), TENANT, "", Budget()))
    [(grant, outcome)] = admission.settled
    assert grant == ("grant", 8)  # max_tokens resolved to the model's default
    assert (outcome.failure, outcome.cancelled, outcome.cache_status) == (None, False, CacheStatus.MISS)
    assert outcome.answer.completion_tokens == 3


async def test_settle_sees_a_failure_once():
    admission = RecordingAdmission()
    turns, _ = pipeline(admission=admission, generator=FakeGenerator(fail_after=1))
    await events_of(turns.run(request(), TENANT, "", Budget()))
    [(_, outcome)] = admission.settled
    assert outcome.failure == Reason.STREAM_ENDED_EARLY and not outcome.cancelled
    # Its metrics and span count a miss that failed, not a turn of no cache status.
    assert outcome.cache_status is CacheStatus.MISS


async def test_settle_sees_a_cancelled_turn_once_and_the_generation_ends():
    admission = RecordingAdmission()
    generator = FakeGenerator(pieces=("a ",) * 1000)
    turns, _ = pipeline(admission=admission, generator=generator)

    async def consume():
        async with contextlib.aclosing(turns.run(request(), TENANT, "", Budget())) as events:
            async for event in events:
                if isinstance(event, Delta):
                    await asyncio.sleep(3600)  # the caller stops reading

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(generator.started.wait(), 5)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [(_, outcome)] = admission.settled
    assert outcome.cancelled and outcome.failure is None
    assert outcome.cache_status is CacheStatus.MISS
    assert generator.closed


async def test_a_bug_in_a_stage_fails_the_turn_as_internal():
    class Broken(FakeContexts):
        async def assemble(self, turn):
            raise KeyError("bug")

    turns, _ = pipeline(contexts=Broken())
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert [type(e) for e in events] == [Failure]
    assert events[0].error.reason == Reason.INTERNAL
    assert "bug" not in events[0].error.message


class BugAfterTwoPieces(FakeGenerator):
    """Counts each piece's tokens, as the inference service does, then hits
    a bug (an unexpected exception, not a MeshgateError)."""

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        for count, piece in enumerate(("Hel", "lo "), 1):
            answer.completion_tokens_so_far = count
            yield piece
        raise KeyError("bug")


DELIVERED_BEFORE_THE_BUG = {"delivered_deltas": "2", "delivered_chars": "6", "delivered_tokens": "2"}


@pytest.mark.parametrize(
    ("options", "delivered"),
    [
        ({}, DELIVERED_BEFORE_THE_BUG),
        ({"carry_last_text": True}, DELIVERED_BEFORE_THE_BUG),
        # Sent whole or not at all: the caller got none of it.
        ({"whole": True}, {}),
    ],
)
async def test_a_bug_after_pieces_went_out_says_how_much_went_out(options, delivered):
    """Its INTERNAL said nothing of the two pieces the caller held: a
    fragment a client could not tell from a short answer cut by a bug."""
    admission = RecordingAdmission()
    turns, _ = pipeline(generator=BugAfterTwoPieces(), admission=admission)
    events = await events_of(turns.run(request(), TENANT, "s1", Budget(), **options))
    failure = events[-1]
    assert isinstance(failure, Failure) and failure.error.reason == Reason.INTERNAL
    assert "bug" not in failure.error.message
    said = {name: value for name, value in failure.error.metadata.items() if name.startswith("delivered_")}
    assert said == delivered
    [(_, outcome)] = admission.settled
    assert outcome.delivered_tokens == (2 if delivered else None)


@pytest.mark.parametrize(
    ("pause_s", "expected_pieces"),
    [
        # Unpaced: every piece is waiting at once, so up to 24 characters each.
        (0.0, ["Paris is the capital of ", "France and has been for ", "a long time."]),
        # Paced: the smaller pieces, a pause apart.
        (0.001, ["Paris is ", "the ", "capital ", "of France ", "and has ", "been for ", "a long ", "time."]),
    ],
)
async def test_an_unpaced_hit_goes_in_larger_pieces_than_a_paced_one(pause_s, expected_pieces):
    text = "Paris is the capital of France and has been for a long time."
    hit = Hit(Answer(text=text, completion_tokens=14), CacheStatus.EXACT_HIT, 1.0)
    turns, _ = pipeline(
        cache=FakeCache(hit), replay_piece_chars=10, replay_burst_chars=24, replay_pause_s=pause_s
    )
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert [e.text for e in events if isinstance(e, Delta)] == expected_pieces
    assert events[-1].cache_status is CacheStatus.EXACT_HIT


async def test_a_replayed_hits_pieces_carry_its_completion_tokens_shared_out_by_characters():
    """They carried none: a replay cut midway (the router's stop) said no
    delivered_tokens, though the entry knows its completion's count."""
    text = "Paris is the capital of France and has been for a long time."
    hit = Hit(Answer(text=text, completion_tokens=14), CacheStatus.EXACT_HIT, 1.0)
    turns, _ = pipeline(cache=FakeCache(hit), replay_piece_chars=10, replay_pause_s=0.001)
    deltas = [e for e in await events_of(turns.run(request(), TENANT, "", Budget())) if isinstance(e, Delta)]
    # 9, 13, 21, ... of 60 characters: 14 x 9 / 60 = 2.1, rounded up; the
    # last piece the entry's own count.
    assert [(len(d.text), d.completion_tokens) for d in deltas] == [
        (9, 3),
        (4, 4),
        (8, 5),
        (10, 8),
        (8, 10),
        (9, 12),
        (7, 13),
        (5, 14),
    ]
    # An entry that counted none says none.
    uncounted = Hit(Answer(text=text), CacheStatus.EXACT_HIT, 1.0)
    turns, _ = pipeline(cache=FakeCache(uncounted), replay_piece_chars=10)
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert {e.completion_tokens for e in events if isinstance(e, Delta)} == {0}


def test_replay_pieces_keep_whole_words_and_the_exact_text():
    text = "one two  three\nfour supercalifragilistic five "
    pieces = replay_pieces(text, 8)
    assert "".join(pieces) == text
    assert "supercalifragilistic " in pieces  # a long word is a piece of its own
    assert all(len(p) <= 8 for p in pieces if " " in p.strip())
    assert replay_pieces("", 8) == []
    # Leading whitespace is no piece of its own (an answer that starts with a
    # space and then one long run of characters is one message, not two).
    assert replay_pieces(" " + "x" * 40, 8) == [" " + "x" * 40]
    assert replay_pieces("\n\nab cd", 2) == ["\n\nab ", "cd"]


def test_budget_caps_each_step_at_the_deadline():
    assert Budget().within(10) == 10
    assert Budget.of(None).within(10) == 10
    assert 0 < Budget.of(2).within(10) <= 2
    assert Budget.of(-1).within(10) == 0
    assert dataclasses.is_dataclass(Budget)


async def test_the_exact_lookup_runs_while_admission_waits_and_answers_once_admitted():
    hit = Hit(Answer(text="Paris.", completion_tokens=2), CacheStatus.EXACT_HIT, 1.0)
    round_trip = asyncio.Event()
    admission = RecordingAdmission(round_trip=round_trip)
    turns, parts = pipeline(cache=FakeCache(hit), admission=admission)
    stream = turns.run(request(), TENANT, "", Budget())
    first = asyncio.ensure_future(anext(stream))
    await asyncio.wait_for(admission.admitting.wait(), 5)
    await asyncio.sleep(0.01)
    # Looked up during admission's round trip, but nothing goes out before it.
    assert parts["cache"].exact_lookups == [["hello"]]
    assert not first.done()
    round_trip.set()
    assert (await first) == Delta("Paris.", last=True, completion_tokens=2)
    events = await events_of(stream)
    assert events[-1].cache_status is CacheStatus.EXACT_HIT
    assert parts["cache"].exact_lookups == [["hello"]]  # not looked up twice


async def test_a_turn_refused_after_its_early_lookup_gets_no_hit():
    hit = Hit(Answer(text="Paris.", completion_tokens=2), CacheStatus.EXACT_HIT, 1.0)
    round_trip = asyncio.Event()
    round_trip.set()
    refusal = MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, "slow down")
    admission = RecordingAdmission(refuse=refusal, round_trip=round_trip)
    turns, parts = pipeline(cache=FakeCache(hit), admission=admission)
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert [type(e) for e in events] == [Failure]
    assert events[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert parts["generator"].prompts == []


async def test_without_a_round_trip_in_admission_the_lookup_waits_for_it():
    admission = RecordingAdmission()
    turns, parts = pipeline(admission=admission)
    turn = turns.validate(request(), TENANT, "", Budget(), False)
    assert turns._exact_lookup_beside_admission(turn) is None
    await events_of(turns.run(request(), TENANT, "", Budget()))
    assert parts["cache"].exact_lookups == [["hello"]]


async def test_a_bug_in_admission_fails_only_that_turn():
    class Broken(RecordingAdmission):
        async def admit(self, turn):
            raise RuntimeError("bug")

    admission = Broken()
    turns, parts = pipeline(admission=admission)
    events = await events_of(turns.run(request(), TENANT, "", Budget()))
    assert [type(e) for e in events] == [Failure]
    assert events[0].error.code == grpc.StatusCode.INTERNAL
    assert parts["generator"].prompts == [] and admission.settled == []


def test_an_alias_pointed_at_another_model_by_a_reload_gets_another_cache_scope():
    """Cache and hot-copy keys named the alias alone: re-pointed from
    tiny-gpt to smollm2, it went on serving tiny-gpt's answers for a day."""
    built, _ = pipeline()
    tenant = Tenant("t", frozenset({"*"}))
    before = built.validate(request(), tenant, "", Budget(), False).cache
    repointed = ModelSettings(
        context_window_tokens=512,
        max_output_tokens=64,
        default_max_tokens=8,
        deployments=[DeploymentSettings(model="smollm2")],
    )
    built.reconfigure(RouterSettings(), {"m": repointed})
    after = built.validate(request(), tenant, "", Budget(), False).cache
    assert (before.model, before.route) == ("m", "tiny-gpt")
    assert (after.model, after.route) == ("m", "smollm2")


async def test_a_turn_cancelled_as_a_hit_stops_its_generation_stays_cancelled() -> None:
    """On a hit the race cancels the generation's first piece and waits for
    it to end; a cancel of the turn landing in that wait (its caller gone,
    the router's stop) is the turn's, and must not end with the piece's:
    lost, the turn went on to serve and bill the hit to no one."""
    generating = asyncio.Event()

    async def generation():
        generating.set()
        await asyncio.Event().wait()
        yield "never"

    hit = Hit(Answer(), CacheStatus.EXACT_HIT, 1.0)
    lookup = asyncio.get_running_loop().create_future()
    served = []

    async def turn() -> None:
        async with _Race(lookup, generation(), speculative=True) as race:
            served.append(await race.hit())

    running = asyncio.create_task(turn())
    await generating.wait()
    lookup.set_result(hit)
    # One turn for the race to take the hit and cancel the piece; it then
    # waits for the piece to end.
    await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert served == []


async def _released_soon(contexts: FakeContexts) -> list[tuple[str, str]]:
    """The holds released (in a task of the pipeline's, after the turn ended)."""
    for _ in range(50):
        await asyncio.sleep(0)
    return contexts.released


async def test_a_session_turn_appends_under_the_turn_id_its_assembly_held_room_for():
    """The append names the hold (its turn id): the context service's append
    script releases it, and nothing else need be sent."""
    turns, parts = pipeline()
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert isinstance(events[-1], Completion)
    contexts = parts["contexts"]
    [(session_id, hold_id)] = contexts.holds
    assert session_id == "s1" and hold_id
    assert contexts.appended_turn_ids == [hold_id]
    assert await _released_soon(contexts) == []


async def test_a_session_turn_that_fails_before_its_append_releases_its_hold():
    """Otherwise its room stays held until the hold expires (the turn's
    deadline, or router.max_generation_s and its append's tries), and turns
    sent after it on a nearly full session are refused for room no turn uses."""
    turns, parts = pipeline(generator=FakeGenerator(fail_after=1))
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert isinstance(events[-1], Failure)
    contexts = parts["contexts"]
    assert contexts.appended == []
    assert await _released_soon(contexts) == contexts.holds == [("s1", contexts.holds[0][1])]


async def test_a_session_turn_whose_append_fails_before_its_script_releases_its_hold():
    """An append refused before its script ran (its tries UNAVAILABLE, the
    tenant's SESSION_QUOTA_EXCEEDED) deleted no hold: the turn's failure
    gives it back (a release after an append that landed finds nothing)."""
    turns, parts = pipeline()
    contexts = parts["contexts"]
    contexts.append_error = unavailable(Reason.REDIS_UNAVAILABLE, "redis down")
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert isinstance(events[-1], Failure)
    assert contexts.holds and await _released_soon(contexts) == contexts.holds


async def test_a_session_turn_whose_caller_goes_while_it_saves_releases_its_hold():
    turns, parts = pipeline()
    contexts = parts["contexts"]

    async def gone(session_id):
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        await events_of(turns.run(request(), TENANT, "s1", Budget(), before_saving=gone))
    assert contexts.holds and await _released_soon(contexts) == contexts.holds


@pytest.mark.parametrize(
    "refusal",
    [
        invalid_argument(Reason.INVALID_SESSION_ID, "session_id must be 1 to 128 characters"),
        not_found(Reason.SESSION_NOT_FOUND, "no such session"),
    ],
)
async def test_a_session_turn_whose_id_its_assembly_refused_releases_nothing(refusal):
    """A review's finding: a session id the context service refused (a 1 MB
    one) was sent back to it in a release and logged whole: refused on its
    request or session, the assembly made no hold."""

    class Refusing(FakeContexts):
        async def assemble(self, turn):
            await super().assemble(turn)
            raise refusal

    turns, parts = pipeline(contexts=Refusing())
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert isinstance(events[-1], Failure) and events[-1].error.reason == refusal.reason
    assert await _released_soon(parts["contexts"]) == []


async def test_a_session_turn_its_assembly_refused_as_full_releases_nothing():
    """The hold is the assembly's last step: a refusal made none."""

    class Full(FakeContexts):
        async def assemble(self, turn):
            await super().assemble(turn)
            raise MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL, "full")

    turns, parts = pipeline(contexts=Full())
    events = await events_of(turns.run(request(), TENANT, "s1", Budget()))
    assert isinstance(events[-1], Failure) and events[-1].error.reason == Reason.SESSION_FULL
    assert await _released_soon(parts["contexts"]) == []
