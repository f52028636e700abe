"""Identical in-flight deterministic turns share one generation: through the
pipeline with fakes behind its stages (no Redis, Triton or sockets)."""

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

from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, RouterSettings
from meshgate.errors import MeshgateError, retry_info, unavailable
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.admission import used_tokens
from services.router.auth import Tenant
from services.router.coalescing import Coalescer, coalescing_key, is_deterministic
from services.router.pipeline import Answer, Budget, CacheStatus, Completion, Delta, Failure, Hit, Pipeline
from tests.clocks import Clock
from tests.unit.test_router_pipeline import MODELS, TENANT, FakeCache, FakeContexts, RecordingAdmission, user

PIECES = ("The ", "answer ", "is ", "forty-two.")
GREEDY = common_pb2.GenerationParameters(temperature=0.0)
# The prompt tokens a counting GatedGenerator's model read.
PROMPT_READ = 4
# The tests' deadlines are readings of a Clock that moves only when a test
# moves it: a deadline of real time (0.3 s) passed early on a loaded machine,
# before the step it was meant to come after. A caller left with MOMENT_S
# of its time waits that long in real time (asyncio's timer) where nothing
# else can end its wait: the timer, the behaviour under test, decides it.
MOMENT_S = 0.01


class GatedGenerator:
    """Yields each piece only once its gate opens, so a test decides who
    joins when; counts the generations it was asked for."""

    def __init__(
        self,
        pieces=PIECES,
        fail_at: int | None = None,
        finish_before_last=False,
        fails_with: MeshgateError | None = None,
        counts=False,
    ) -> None:
        self.pieces = pieces
        # As Deployments.generate fills them from the deltas' counts: the
        # prompt's (PROMPT_READ) and 2 completion tokens a piece so far.
        self.counts = counts
        self.fail_at = fail_at
        self.fails_with = fails_with or unavailable(Reason.STREAM_ENDED_EARLY, "backend died")
        # As FakeGenerator's (test_router_pipeline): the answer filled before
        # the last piece, as when the completion brings the last text.
        self.finish_before_last = finish_before_last
        self.gates = [asyncio.Event() for _ in pieces]
        self.calls = 0
        self.finished = 0
        self.cancelled = 0
        self.done = asyncio.Event()  # a generation yielded its every piece

    def open(self, count: int | None = None) -> None:
        for gate in self.gates[:count]:
            gate.set()

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.calls += 1
        try:
            for index, piece in enumerate(self.pieces):
                await self.gates[index].wait()
                if index == self.fail_at:
                    raise self.fails_with
                answer.deployment = "d1"
                if self.counts:
                    answer.prompt_tokens_read, answer.completion_tokens_so_far = PROMPT_READ, 2 * (index + 1)
                if self.finish_before_last and index == len(self.pieces) - 1:
                    self._finish(answer)
                yield piece
            self._finish(answer)
            self.finished += 1
            self.done.set()
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    def _finish(self, answer: Answer) -> None:
        answer.text = "".join(self.pieces)
        answer.prompt_tokens, answer.completion_tokens = 7, len(self.pieces)
        answer.finish_reason = "length"


class Caller:
    """One caller's turn, run as its own task, recording what it received."""

    def __init__(self, turns: Pipeline, chat: pb.ChatRequest, tenant: Tenant = TENANT, budget=None) -> None:
        self.events: list = []
        self._received = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(turns.run(chat, tenant, "", budget or Budget())))

    async def _run(self, stream) -> None:
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                self.events.append(event)
                self._received.set()

    @property
    def deltas(self) -> list[str]:
        return [event.text for event in self.events if isinstance(event, Delta)]

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    async def until_pieces(self, count: int) -> None:
        """Until the first ``count`` pieces arrived (pieces waiting together
        come as one delta)."""
        async with asyncio.timeout(5):
            while len(self.text) < len("".join(PIECES[:count])):
                self._received.clear()
                await self._received.wait()

    async def cancel(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def chat(parameters=GREEDY, text="What is the answer?", policy=pb.CACHE_POLICY_BYPASS) -> pb.ChatRequest:
    return pb.ChatRequest(model="m", messages=[user(text)], parameters=parameters, cache_policy=policy)


def pipeline(
    generator: GatedGenerator, admission=None, cache=None, clock=time.monotonic, **settings
) -> Pipeline:
    """``clock``: the one the callers' Budgets read (Budget.of(seconds, clock))."""
    return Pipeline(
        RouterSettings(**settings),
        MODELS,
        FakeContexts(),
        cache or FakeCache(),
        generator,
        admission=admission,
        clock=clock,
    )


async def finished(generator: GatedGenerator) -> None:
    """Until the generation yielded its last piece (the shared flight's end
    is on the clock as it reads then)."""
    await asyncio.wait_for(generator.done.wait(), 5)


async def settle_all(*callers: Caller) -> None:
    async with asyncio.timeout(5):
        await asyncio.gather(*(caller.task for caller in callers))


# --- what may be shared ---------------------------------------------------------


def test_only_greedy_or_seeded_parameters_are_deterministic():
    assert is_deterministic(common_pb2.GenerationParameters(temperature=0.0))
    assert is_deterministic(common_pb2.GenerationParameters(temperature=0.8, seed=3))
    # Unset temperature is the model's default, sampled with a fresh seed.
    assert not is_deterministic(common_pb2.GenerationParameters())
    assert not is_deterministic(common_pb2.GenerationParameters(temperature=0.7))


def test_the_key_separates_everything_that_changes_the_output():
    prompt = [user("hi")]
    base = coalescing_key("t1", "m", prompt, GREEDY)
    assert base is not None
    assert coalescing_key("t1", "m", [user("hi")], common_pb2.GenerationParameters(temperature=0.0)) == base
    different = [
        coalescing_key("t2", "m", prompt, GREEDY),
        coalescing_key("t1", "m2", prompt, GREEDY),
        coalescing_key("t1", "m", [user("hi!")], GREEDY),
        coalescing_key("t1", "m", [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="hi")], GREEDY),
        coalescing_key("t1", "m", prompt, common_pb2.GenerationParameters(temperature=0.0, max_tokens=3)),
        coalescing_key("t1", "m", prompt, common_pb2.GenerationParameters(temperature=0.0, stop=["x"])),
        coalescing_key("t1", "m", [user("h"), user("i")], GREEDY),
        # The same alias answered by another model (a reload re-pointed it).
        coalescing_key("t1", "m", prompt, GREEDY, route="other-model"),
    ]
    assert base not in different and len(set(different)) == len(different)
    # Lengths are part of the key: "t1"+"m" never equals "t"+"1m".
    assert coalescing_key("t", "1m", prompt, GREEDY) != base
    assert coalescing_key("t1", "m", prompt, common_pb2.GenerationParameters(temperature=0.5)) is None


# --- sharing ----------------------------------------------------------------


async def test_identical_concurrent_turns_cost_one_generation_and_get_the_whole_answer():
    generator = GatedGenerator()
    admission = RecordingAdmission()
    turns = pipeline(generator, admission)
    callers = [Caller(turns, chat()) for _ in range(5)]
    await asyncio.sleep(0.01)
    generator.open()
    await settle_all(*callers)
    assert generator.calls == 1 and generator.finished == 1
    for caller in callers:
        assert "".join(caller.deltas) == "".join(PIECES)
        completion = caller.events[-1]
        assert isinstance(completion, Completion)
        # Each caller is billed what its answer says: the whole generation.
        assert completion.answer.completion_tokens == len(PIECES)
        assert completion.answer.prompt_tokens == 7
        assert completion.answer.deployment == "d1"
    assert [outcome.answer.completion_tokens for _, outcome in admission.settled] == [len(PIECES)] * 5
    assert turns._coalescer.in_flight == 0


async def test_a_late_joiner_gets_the_pieces_so_far_then_the_live_stream():
    generator = GatedGenerator()
    turns = pipeline(generator)
    first = Caller(turns, chat())
    generator.open(2)
    await first.until_pieces(2)
    late = Caller(turns, chat())
    await late.until_pieces(2)
    assert late.text == "".join(PIECES[:2])
    generator.open()
    await settle_all(first, late)
    assert generator.calls == 1
    assert late.text == first.text == "".join(PIECES)
    assert isinstance(late.events[-1], Completion)


async def test_a_joiners_span_links_to_the_span_its_shared_generation_ran_under():
    """A joiner's trace has no inference hop: its span (the server span of
    its call) links to the one current where the generation started."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    generator = GatedGenerator()
    turns = pipeline(generator)

    callers: dict[str, Caller] = {}
    spans_open: list[asyncio.Task] = []

    async def call(name: str) -> Caller:
        """A caller's turn under a span open until it ends, as its call's server span is."""
        made = asyncio.Event()

        async def traced() -> None:
            with tracer.start_as_current_span(name):
                callers[name] = Caller(turns, chat())  # its task copies the context
                made.set()
                await callers[name].task

        spans_open.append(asyncio.ensure_future(traced()))
        await made.wait()
        return callers[name]

    first = await call("first")
    generator.open(1)
    await first.until_pieces(1)
    late = await call("late")
    await late.until_pieces(1)
    generator.open()
    await settle_all(first, late)
    await asyncio.gather(*spans_open)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert not spans["first"].links
    (link,) = spans["late"].links
    assert link.context == spans["first"].context
    assert link.attributes == {"meshgate.link": "coalesced_generation"}


async def test_every_caller_of_a_shared_generation_knows_its_last_piece():
    generator = GatedGenerator(finish_before_last=True)
    turns = pipeline(generator)
    first = Caller(turns, chat())
    generator.open(2)
    await first.until_pieces(2)
    late = Caller(turns, chat())  # joins midway: the pieces so far come as one delta
    await late.until_pieces(2)
    generator.open()
    await settle_all(first, late)
    assert generator.calls == 1
    for caller in (first, late):
        marks = [event.last for event in caller.events if isinstance(event, Delta)]
        assert marks[-1] and not any(marks[:-1]), marks
        assert caller.text == "".join(PIECES) and isinstance(caller.events[-1], Completion)


async def test_pieces_that_arrived_together_reach_a_caller_as_one_delta():
    generator = GatedGenerator()
    generator.open()  # every piece is there before the caller reads one
    turns = pipeline(generator)
    caller = Caller(turns, chat())
    await settle_all(caller)
    assert caller.deltas == ["".join(PIECES)]
    assert isinstance(caller.events[-1], Completion)


async def test_after_a_generation_ends_the_next_identical_turn_generates_anew():
    generator = GatedGenerator()
    generator.open()
    turns = pipeline(generator)
    first = Caller(turns, chat())
    await settle_all(first)
    second = Caller(turns, chat())
    await settle_all(second)
    assert generator.calls == 2


async def test_one_caller_cancelling_leaves_the_others_their_whole_answer():
    generator = GatedGenerator()
    admission = RecordingAdmission()
    turns = pipeline(generator, admission)
    leaving, staying = Caller(turns, chat()), Caller(turns, chat())
    generator.open(1)
    await leaving.until_pieces(1)
    await staying.until_pieces(1)
    # The one that started the generation leaves: it goes on for the other.
    await leaving.cancel()
    generator.open()
    await settle_all(staying)
    assert generator.calls == 1 and generator.cancelled == 0 and generator.finished == 1
    assert staying.text == "".join(PIECES)
    assert isinstance(staying.events[-1], Completion)
    assert sorted(outcome.cancelled for _, outcome in admission.settled) == [False, True]


async def test_the_last_caller_cancelling_cancels_the_generation():
    generator = GatedGenerator()
    turns = pipeline(generator)
    callers = [Caller(turns, chat()) for _ in range(3)]
    generator.open(1)
    for caller in callers:
        await caller.until_pieces(1)
    for caller in callers[:2]:
        await caller.cancel()
    assert generator.cancelled == 0
    await callers[2].cancel()
    assert generator.cancelled == 1 and generator.finished == 0
    assert turns._coalescer.in_flight == 0
    # Nothing is left to join: the next identical turn generates afresh.
    generator.open()
    again = Caller(turns, chat())
    await settle_all(again)
    assert generator.calls == 2 and again.text == "".join(PIECES)


async def test_a_failure_fails_every_caller_with_what_it_received():
    generator = GatedGenerator(fail_at=2)
    turns = pipeline(generator)
    first = Caller(turns, chat())
    generator.open(1)
    await first.until_pieces(1)
    late = Caller(turns, chat())
    await late.until_pieces(1)
    generator.open()
    await settle_all(first, late)
    assert generator.calls == 1
    for caller in (first, late):
        failure = caller.events[-1]
        assert isinstance(failure, Failure)
        assert failure.error.reason == Reason.STREAM_ENDED_EARLY
        assert caller.text == "".join(PIECES[:2])
        assert failure.error.metadata["delivered_deltas"] == str(len(caller.deltas))
        assert failure.error.metadata["delivered_chars"] == str(len("".join(PIECES[:2])))
    # Each caller holds its own error, not one shared object.
    assert first.events[-1].error is not late.events[-1].error


async def test_a_refusal_before_any_piece_reaches_every_caller_with_when_to_retry():
    """Every deployment refused the shared generation for the tenant's full
    queue (Deployments.generate): each caller gets that refusal, its
    RetryInfo included, and no delivered_* (it received nothing)."""
    queue_full = MeshgateError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.TOO_MANY_QUEUED_GENERATIONS,
        "this tenant has its most generations waiting",
        {"limit": "max_queued_generations_per_tenant"},
        details=[retry_info(0.5)],
    )
    generator = GatedGenerator(fail_at=0, fails_with=queue_full)
    turns = pipeline(generator)
    callers = [Caller(turns, chat()) for _ in range(3)]
    await asyncio.sleep(0.01)
    generator.open()
    await settle_all(*callers)
    assert generator.calls == 1
    for caller in callers:
        (failure,) = caller.events
        assert isinstance(failure, Failure)
        assert (failure.error.code, failure.error.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.TOO_MANY_QUEUED_GENERATIONS,
        )
        assert failure.error.details == [retry_info(0.5)]
        assert "delivered_deltas" not in failure.error.metadata


# --- what a shared answer is stored with ------------------------------------------


class FencingCache(FakeCache):
    """Gives each exact lookup or fence read the store_fence of that moment,
    as the cache service does (``invalidate`` moves it), unless
    ``fence_fails``; records the fence each Store carries."""

    def __init__(self, fence_fails: bool = False) -> None:
        super().__init__()
        self.fence_fails = fence_fails
        self.invalidations = 0
        self.stored_fences: list[str | None] = []

    def invalidate(self) -> None:
        self.invalidations += 1

    def _read_fence(self, plan) -> None:
        if not self.fence_fails:
            plan.store_fence[:] = [f"fence {self.invalidations}"]

    async def lookup(self, plan, messages, budget, semantic):
        if not semantic:
            self._read_fence(plan)
        return await super().lookup(plan, messages, budget, semantic)

    async def read_fence(self, plan, messages, budget) -> None:
        self._read_fence(plan)
        await super().read_fence(plan, messages, budget)

    async def store(self, plan, messages, answer, budget) -> None:
        self.stored_fences.append(answer.store_fence)
        await super().store(plan, messages, answer, budget)


async def test_a_turn_joining_a_generation_begun_before_an_invalidate_stores_with_the_fence_read_before_it():
    """The joiner's own lookup came after the Invalidate: its fence held, so
    a Store with it would keep the answer generated before it. The one
    Store of the shared answer carries the starter's."""
    generator = GatedGenerator()
    cache = FencingCache()
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    starter = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    generator.open(1)
    await starter.until_pieces(1)
    cache.invalidate()
    joiner = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    await joiner.until_pieces(1)
    generator.open()
    await settle_all(starter, joiner)
    assert generator.calls == 1
    assert isinstance(starter.events[-1], Completion) and isinstance(joiner.events[-1], Completion)
    assert cache.stored_fences == ["fence 0"]


async def test_a_joiner_of_a_generation_whose_starter_left_stores_with_the_starters_fence():
    generator = GatedGenerator()
    cache = FencingCache()
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    starter = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    generator.open(1)
    await starter.until_pieces(1)
    cache.invalidate()
    joiner = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    await joiner.until_pieces(1)
    await starter.cancel()
    generator.open()
    await settle_all(joiner)
    assert generator.calls == 1 and joiner.text == "".join(PIECES)
    assert cache.stored_fences == ["fence 0"]


@pytest.mark.parametrize(
    ("starter_policy", "fence_fails"),
    [(pb.CACHE_POLICY_BYPASS, False), (pb.CACHE_POLICY_REFRESH, True)],
    ids=["bypassing starter", "starter whose fence read failed"],
)
async def test_a_joiner_of_a_generation_begun_without_a_fence_does_not_store(starter_policy, fence_fails):
    """Nothing read before the generation began would refuse its answer's
    Store after an Invalidate: the joiner's Store carries no fence, as its
    starter's does (CacheService.store then sends nothing)."""
    generator = GatedGenerator()
    cache = FencingCache(fence_fails=fence_fails)
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    starter = Caller(turns, chat(policy=starter_policy))
    generator.open(1)
    await starter.until_pieces(1)
    cache.invalidate()
    cache.fence_fails = False
    joiner = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    await joiner.until_pieces(1)
    generator.open()
    await settle_all(starter, joiner)
    assert generator.calls == 1 and joiner.text == "".join(PIECES)
    assert cache.stored_fences == [None]


class GatedStoreCache(FakeCache):
    """Holds every Store until ``release`` is set; counts the Stores begun
    and those cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.begun = self.cancelled = 0
        self.storing = asyncio.Event()
        self.release = asyncio.Event()

    async def store(self, plan, messages, answer, budget) -> None:
        self.begun += 1
        self.storing.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await super().store(plan, messages, answer, budget)


async def storing(cache: GatedStoreCache, *callers: Caller) -> None:
    """Until a Store began and every caller reached its own (a few loop
    turns: nothing else is under way)."""
    await asyncio.wait_for(cache.storing.wait(), 5)
    await asyncio.sleep(0.05)
    assert not any(isinstance(caller.events[-1], Completion) for caller in callers)


async def test_callers_sharing_a_generation_store_its_answer_once_and_complete_after_it():
    """Each caller would write the same entry: a Redis write, a notice to
    every router's hot tier and a quota charge each. Each completion still
    waits for it, so a follow-up finds the entry."""
    generator = GatedGenerator()
    cache = GatedStoreCache()
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    callers = [Caller(turns, chat(policy=pb.CACHE_POLICY_USE)) for _ in range(3)]
    generator.open(1)
    await asyncio.gather(*(caller.until_pieces(1) for caller in callers))
    generator.open()
    await storing(cache, *callers)
    assert cache.begun == 1
    cache.release.set()
    await settle_all(*callers)
    assert all(isinstance(caller.events[-1], Completion) for caller in callers)
    assert cache.stored == [(["What is the answer?"], "".join(PIECES))]


async def sharing_the_first_piece(cache: GatedStoreCache, joiner_kind=Caller) -> tuple[Caller, Caller]:
    """A caller that began a generation and one that joined it, each with
    its first piece; the rest is released."""
    generator = GatedGenerator()
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    starter = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    generator.open(1)
    await starter.until_pieces(1)
    joiner = joiner_kind(turns, chat(policy=pb.CACHE_POLICY_USE))
    await joiner.until_pieces(1)
    generator.open()
    return starter, joiner


async def test_the_shared_store_goes_on_when_the_caller_that_began_it_leaves():
    cache = GatedStoreCache()
    # The starter reads the end first, and so begins the Store.
    starter, joiner = await sharing_the_first_piece(cache)
    await storing(cache, starter, joiner)
    await starter.cancel()
    cache.release.set()
    await settle_all(joiner)
    assert isinstance(joiner.events[-1], Completion)
    assert (cache.begun, cache.cancelled) == (1, 0)
    assert cache.stored == [(["What is the answer?"], "".join(PIECES))]


async def test_a_caller_sharing_a_generation_that_comes_to_store_after_its_store_ended_stores_nothing():
    """However late a caller sharing the answer comes to store, the entry
    is written once: it finds the Store done, not a Store to begin."""
    cache = GatedStoreCache()
    cache.release.set()
    first, late = await sharing_the_first_piece(cache, StallingCaller)
    await settle_all(first)
    assert isinstance(first.events[-1], Completion) and cache.begun == 1
    late.resume.set()
    await settle_all(late)
    assert isinstance(late.events[-1], Completion) and late.text == "".join(PIECES)
    assert cache.begun == 1
    assert cache.stored == [(["What is the answer?"], "".join(PIECES))]


async def test_the_last_caller_leaving_cancels_the_store():
    generator = GatedGenerator()
    cache = GatedStoreCache()
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    caller = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    generator.open()
    await storing(cache, caller)
    await caller.cancel()
    assert (cache.begun, cache.cancelled) == (1, 1) and cache.stored == []


async def test_a_caller_waits_for_a_slow_store_no_longer_than_its_deadline():
    """The Store runs under no caller's deadline (below), but each caller
    waits for it within its own: a cache that does not answer held the
    completion past the caller's deadline (its client saw
    DEADLINE_EXCEEDED for an answer it had), where the Store's own call,
    bounded by that deadline, used to give up in time."""
    generator = GatedGenerator()
    cache = GatedStoreCache()  # never released: a cache that does not answer
    clock = Clock()
    turns = pipeline(generator, cache=cache, clock=clock)
    caller = StallingCaller(turns, chat(policy=pb.CACHE_POLICY_USE), budget=Budget.of(60, clock))
    generator.open()
    await caller.until_pieces(len(PIECES))
    # Its client reads on with a moment of its time left: the caller goes
    # to the Store, which only its deadline's timer can end its wait for.
    clock.now += 60 - MOMENT_S
    caller.resume.set()
    await settle_all(caller)
    assert isinstance(caller.events[-1], Completion) and caller.text == "".join(PIECES)
    # Left by its only caller, the Store was cancelled, as a caller going away leaves it.
    assert (cache.begun, cache.cancelled) == (1, 1) and cache.stored == []


class TimedStoreCache(FakeCache):
    """Stores as the cache service does within the time the router gives
    its Store (CacheService.store: a call timeout of the budget's time
    within router.downstream_timeout_s): a budget already spent ends the
    call DEADLINE_EXCEEDED, which the router logs, storing nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.cut_short = 0

    async def store(self, plan, messages, answer, budget) -> None:
        if budget.within(RouterSettings().downstream_timeout_s) <= 0:
            self.cut_short += 1
            return
        await super().store(plan, messages, answer, budget)


async def test_a_shared_store_runs_under_no_callers_deadline():
    """The Store of a shared answer is no caller's, as its generation is
    not: begun by a caller whose deadline is spent, it would be cut short
    for the callers still waiting for it, and none of them would store the
    entry (they find that Store done: keep_finished)."""
    generator = GatedGenerator()
    cache = TimedStoreCache()
    clock = Clock()
    turns = pipeline(generator, cache=cache, clock=clock)
    hurried = StallingCaller(turns, chat(policy=pb.CACHE_POLICY_USE), budget=Budget.of(1, clock))
    patient = StallingCaller(turns, chat(policy=pb.CACHE_POLICY_USE), budget=Budget.of(60, clock))
    generator.open(1)
    await hurried.until_pieces(1)
    await patient.until_pieces(1)
    generator.open()
    await finished(generator)  # within the hurried caller's deadline
    clock.now += 2
    # The hurried caller's client read on only after its deadline: its turn
    # reaches the Store (begins it) with none of its time left.
    hurried.resume.set()
    await settle_all(hurried)
    assert isinstance(hurried.events[-1], Completion), "the hurried caller reached its Store"
    patient.resume.set()
    await settle_all(patient)
    assert isinstance(patient.events[-1], Completion) and patient.text == "".join(PIECES)
    assert cache.cut_short == 0
    assert cache.stored == [(["What is the answer?"], "".join(PIECES))]


# --- what is never shared ------------------------------------------------------


async def test_other_tenants_sampled_turns_and_a_disabled_setting_do_not_share():
    cases = [
        (chat(), chat(), {"tenant": Tenant("t2", frozenset({"*"}))}, {}),
        (chat(common_pb2.GenerationParameters()), chat(common_pb2.GenerationParameters()), {}, {}),
        (chat(), chat(text="Another question?"), {}, {}),
        (chat(), chat(), {}, {"coalesce_generations": False}),
    ]
    for first_chat, second_chat, second_caller, settings in cases:
        generator = GatedGenerator()
        turns = pipeline(generator, **settings)
        first = Caller(turns, first_chat)
        second = Caller(turns, second_chat, **second_caller)
        await asyncio.sleep(0.01)
        generator.open()
        await settle_all(first, second)
        assert generator.calls == 2, (first_chat, second_caller, settings)
        assert first.text == second.text == "".join(PIECES)


async def test_a_turn_after_a_reload_pointed_the_alias_at_another_model_does_not_join_the_old_generation():
    """The old model's answer would reach the new turn's caller and its
    cache entry, under the new route."""

    def answered_by(model: str) -> dict[str, ModelSettings]:
        deployment = DeploymentSettings(name="d", address="127.0.0.1:1", model=model)
        return {"m": dataclasses.replace(MODELS["m"], deployments=[deployment])}

    generator = GatedGenerator()
    turns = Pipeline(RouterSettings(), answered_by("old"), FakeContexts(), FakeCache(), generator)
    before = Caller(turns, chat())
    await asyncio.sleep(0.01)
    turns.reconfigure(RouterSettings(), answered_by("new"))
    after = Caller(turns, chat())
    await asyncio.sleep(0.01)
    generator.open()
    await settle_all(before, after)
    assert generator.calls == 2


async def test_callers_with_different_deadlines_share_and_each_deadline_ends_only_its_caller():
    generator = GatedGenerator()
    admission = RecordingAdmission()
    clock = Clock()
    turns = pipeline(generator, admission, clock=clock)
    patient = Caller(turns, chat(), budget=Budget.of(60, clock))
    generator.open(1)
    await patient.until_pieces(1)
    # Joins with a moment of its time left: it receives the first piece at
    # once, then waits for the next, which does not come (its gate is
    # shut): only its deadline's timer ends that wait.
    hurried = Caller(turns, chat(), budget=Budget.of(MOMENT_S, clock))
    await settle_all(hurried)
    assert hurried.deltas == [PIECES[0]]
    failure = hurried.events[-1]
    assert isinstance(failure, Failure)
    assert failure.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure.error.reason == Reason.DEADLINE_EXCEEDED
    assert failure.error.metadata["delivered_deltas"] == str(len(hurried.deltas))
    # The generation goes on for the caller still waiting.
    assert generator.cancelled == 0
    generator.open()
    await settle_all(patient)
    assert generator.calls == 1 and patient.text == "".join(PIECES)
    assert isinstance(patient.events[-1], Completion)


async def test_a_caller_a_shared_generation_cuts_off_is_told_and_billed_the_tokens_behind_its_own_pieces():
    """The hurried caller leaves at its deadline with the first piece: the
    tokens behind that piece (2), not the generation's count by then, nor
    none (its deadline's failure counts nothing), nor its bytes."""
    generator = GatedGenerator(counts=True)
    admission = RecordingAdmission()
    clock = Clock()
    turns = pipeline(generator, admission, clock=clock)
    patient = Caller(turns, chat(), budget=Budget.of(60, clock))
    generator.open(1)
    await patient.until_pieces(1)
    hurried = Caller(turns, chat(), budget=Budget.of(MOMENT_S, clock))
    await settle_all(hurried)
    generator.open()
    await settle_all(patient)
    failure = hurried.events[-1]
    assert isinstance(failure, Failure) and failure.error.reason == Reason.DEADLINE_EXCEEDED
    assert failure.error.metadata["delivered_tokens"] == "2"
    hurried_outcome = next(outcome for _, outcome in admission.settled if outcome.failure)
    assert (hurried_outcome.prompt_tokens_read, hurried_outcome.delivered_tokens) == (PROMPT_READ, 2)
    turn = turns.validate(chat(), TENANT, "", Budget(), False)
    assert used_tokens(turn, hurried_outcome) == (PROMPT_READ, 2)


class StallingCaller(Caller):
    """A caller whose client stops reading after the first delta until ``resume`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        self.resume = asyncio.Event()
        super().__init__(*args, **kwargs)

    async def _run(self, stream) -> None:
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                self.events.append(event)
                self._received.set()
                await self.resume.wait()


async def test_a_deadline_that_passes_while_pieces_wait_still_ends_that_caller():
    """A caller that never had to wait for a piece (its client was slow) was
    never timed: past its deadline it got the rest and a completion."""
    generator = GatedGenerator()
    clock = Clock()
    turns = pipeline(generator, clock=clock)
    hurried = StallingCaller(turns, chat(), budget=Budget.of(1, clock))
    patient = Caller(turns, chat(), budget=Budget.of(60, clock))
    generator.open(1)
    await hurried.until_pieces(1)
    await patient.until_pieces(1)
    clock.now += 2
    # The rest arrives after the hurried caller's deadline, while its client is stalled.
    generator.open()
    await settle_all(patient)
    assert patient.text == "".join(PIECES) and isinstance(patient.events[-1], Completion)
    hurried.resume.set()
    await settle_all(hurried)
    failure = hurried.events[-1]
    assert isinstance(failure, Failure), failure
    assert failure.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert hurried.text == PIECES[0]
    assert failure.error.metadata["delivered_deltas"] == "1"


async def test_a_generation_finished_within_the_deadline_completes_for_a_slow_reader():
    generator = GatedGenerator()
    generator.open()
    clock = Clock()
    turns = pipeline(generator, clock=clock)
    slow = StallingCaller(turns, chat(), budget=Budget.of(1, clock))
    await slow.until_pieces(1)
    await finished(generator)
    clock.now += 2  # the client reads on after the deadline
    slow.resume.set()
    await settle_all(slow)
    assert slow.text == "".join(PIECES) and isinstance(slow.events[-1], Completion)


async def test_every_caller_leaving_by_its_deadline_cancels_the_generation():
    generator = GatedGenerator()
    clock = Clock()
    turns = pipeline(generator, clock=clock)
    first, second = (Caller(turns, chat(), budget=Budget.of(seconds, clock)) for seconds in (10, 20))
    generator.open(1)
    await first.until_pieces(1)
    await second.until_pieces(1)
    # Each deadline passes while its caller waits; the next piece finds it passed.
    clock.now += 15
    generator.open(2)
    await settle_all(first)
    assert first.events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await second.until_pieces(2)
    assert generator.cancelled == 0, "the second caller still reads the generation"
    clock.now += 10
    generator.open(3)
    await settle_all(second)
    assert second.events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert second.text == "".join(PIECES[:2])
    assert generator.cancelled == 1 and generator.finished == 0
    assert turns._coalescer.in_flight == 0


async def test_a_cache_hit_before_reading_neither_starts_nor_keeps_a_shared_generation():
    """Without speculation a turn asks for its generation, then looks up the
    cache; on a hit it closes the generation unread. The flight had started
    at once and counted the closed caller forever: it ran to its end for
    nobody, and outlived every other caller too."""
    hit = Hit(Answer(text="cached"), CacheStatus.SEMANTIC_HIT, 0.93)
    generator = GatedGenerator()
    turns = Pipeline(
        RouterSettings(speculative_generation=False), MODELS, FakeContexts(), FakeCache(hit), generator
    )
    cached = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    await settle_all(cached)
    assert cached.text == "cached" and isinstance(cached.events[-1], Completion)
    assert generator.calls == 0
    assert turns._coalescer.in_flight == 0


async def test_a_joiner_that_closes_unread_leaves_the_generation_to_the_last_reader():
    generator = GatedGenerator()
    coalescer = Coalescer()

    def start(answer, deadline):
        return generator.generate("m", [], GREEDY, Budget(deadline), answer)

    reading = coalescer.generate(b"k", start, Answer(), Answer, None)
    unread = coalescer.generate(b"k", start, Answer(), Answer, None)
    generator.open(1)
    assert await anext(reading) == PIECES[0]
    await unread.aclose()
    await reading.aclose()
    assert generator.cancelled == 1 and coalescer.in_flight == 0


async def test_a_cache_hit_during_a_speculative_shared_generation_cancels_it():
    hit = Hit(Answer(text="cached"), CacheStatus.SEMANTIC_HIT, 0.93)
    cache = FakeCache(hit)
    cache.answered.clear()
    generator = GatedGenerator()
    turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), cache, generator)
    cached = Caller(turns, chat(policy=pb.CACHE_POLICY_USE))
    async with asyncio.timeout(5):
        while generator.calls == 0:  # the generation starts while the lookup runs
            await asyncio.sleep(0.005)
    cache.answered.set()
    await settle_all(cached)
    assert cached.text == "cached" and isinstance(cached.events[-1], Completion)
    assert generator.cancelled == 1 and generator.finished == 0
    assert turns._coalescer.in_flight == 0
