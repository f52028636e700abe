"""What a turn is billed, however it ends: the pipeline's settle stage over
TurnAdmission, with fakes behind the pipeline's other stages and in place
of Redis (what is settled and recorded is read off them)."""

from __future__ import annotations

import asyncio
import contextlib

from meshgate.config import ModelSettings, PriceSettings, RouterSettings
from meshgate.errors import partly_delivered, unavailable
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from services.router.admission import Reservation, TurnAdmission, estimate_prompt_tokens
from services.router.pipeline import (
    Answer,
    Assembly,
    Budget,
    CacheStatus,
    Completion,
    Delta,
    Failure,
    Hit,
    Pipeline,
)
from tests.unit.test_router_pipeline import TENANT, FakeCache, FakeContexts, FakeGenerator, request

MAX_TOKENS = 200
MODELS = {
    "m": ModelSettings(context_window_tokens=4096, max_output_tokens=512, default_max_tokens=MAX_TOKENS)
}
# 1 USD a million tokens each way: 1000 nano-USD a token.
PRICES = {"m": PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=1.0)}
PROMPT = estimate_prompt_tokens(request("tell me a long story").messages)


def chat() -> pb.ChatRequest:
    return request("tell me a long story", pb.CACHE_POLICY_BYPASS)


async def events_of(turns, asked: pb.ChatRequest | None = None) -> list:
    return [event async for event in turns.run(asked or chat(), TENANT, "", Budget())]


class SettledAdmission:
    """Admission's settle_soon, recorded: the tokens of each turn."""

    def __init__(self) -> None:
        self.settled: list[int] = []

    def settle_soon(self, reservation, tokens: int, nano_usd: int) -> None:
        assert nano_usd == tokens * 1000  # PRICES
        self.settled.append(tokens)


class RecordedLedger:
    def __init__(self) -> None:
        self.records: list = []

    def submit(self, usage, logged: bool = True) -> None:
        self.records.append(usage)


class StallingGenerator(FakeGenerator):
    """Its pieces, then no completion until ``release`` is set."""

    def __init__(self, pieces) -> None:
        super().__init__(pieces)
        self.release = asyncio.Event()

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.prompts.append([m.content for m in prompt])
        self.started.set()
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece
        await self.release.wait()
        self._finish(answer)


# The prompt tokens a counting generator's model read (the content alone is
# PROMPT bytes), and the completion tokens each of its pieces took.
PROMPT_READ = 6
TOKENS_A_PIECE = 2


def counted(answer: Answer, pieces_so_far: int) -> None:
    """The counts behind the pieces so far, as Deployments.generate fills
    them from the inference service's deltas."""
    answer.prompt_tokens_read = PROMPT_READ
    answer.completion_tokens_so_far = TOKENS_A_PIECE * pieces_so_far


class CountingGenerator(StallingGenerator):
    """StallingGenerator, each piece's counts on the answer as it is yielded."""

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.prompts.append([m.content for m in prompt])
        self.started.set()
        for index, piece in enumerate(self.pieces, 1):
            await asyncio.sleep(0)
            counted(answer, index)
            yield piece
        await self.release.wait()
        self._finish(answer)


class FailingGenerator(FakeGenerator):
    """Its pieces, then the inference service's failure, which counts the
    tokens behind what it delivered (None: it does not)."""

    def __init__(self, pieces, delivered_tokens: int | None, counts=False) -> None:
        super().__init__(pieces)
        self.delivered_tokens = delivered_tokens
        # Whether its deltas carried counts (CountingGenerator's).
        self.counts = counts

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        for index, piece in enumerate(self.pieces, 1):
            await asyncio.sleep(0)
            if self.counts:
                counted(answer, index)
            yield piece
        failure = unavailable(Reason.STREAM_ENDED_EARLY, "triton died")
        raise partly_delivered(failure, len(self.pieces), sum(map(len, self.pieces)), self.delivered_tokens)


def billed_pipeline(generator, contexts=None, cache=None, **settings):
    router_settings = RouterSettings(prices=PRICES, **settings)
    admission, ledger = SettledAdmission(), RecordedLedger()
    stages = TurnAdmission(admission, router_settings, ledger)

    async def admit(turn):
        # What it settles is recorded by SettledAdmission; the day is the ledger's.
        return Reservation("lease", 0, 0, (), day="2026-12-03", price=PRICES["m"])

    stages.admit = admit
    turns = Pipeline(
        router_settings, MODELS, contexts or FakeContexts(), cache or FakeCache(), generator, stages
    )
    return turns, admission, ledger


async def read_then_hang_up(turns, pieces: int, asked: pb.ChatRequest | None = None) -> list:
    """Reads ``pieces`` deltas of a turn, then cancels it, as a caller that
    hangs up (or whose deadline passes) does."""
    got: list = []

    async def read() -> None:
        async for event in turns.run(asked or chat(), TENANT, "", Budget()):
            got.append(event)

    reading = asyncio.ensure_future(read())
    async with asyncio.timeout(5):
        while len(got) < pieces:
            await asyncio.sleep(0.001)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    return got


async def test_a_caller_hanging_up_before_the_completion_pays_the_tokens_the_model_read_and_produced():
    """The stop button: 40 pieces read, then the caller hangs up. It pays
    the prompt tokens the model read and the completion tokens behind the
    pieces it received, as the deltas counted them (86); it paid the
    prompt's bytes (20) and a token a byte delivered (150): 170, twice
    over here and ~4x for English on a real tokenizer (on the mesh, 40
    for a cancel after 2 pieces the model read and produced 15 tokens for)."""
    turns, admission, ledger = billed_pipeline(CountingGenerator(tuple(f"t{i} " for i in range(40))))
    got = await read_then_hang_up(turns, 40)
    assert all(isinstance(event, Delta) for event in got)
    completion = TOKENS_A_PIECE * 40
    assert admission.settled == [PROMPT_READ + completion]
    [record] = ledger.records
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT_READ, completion)
    assert (record.cost_nano_usd, record.failure) == ((PROMPT_READ + completion) * 1000, "cancelled")


async def test_a_stream_cut_midway_by_a_failure_that_counts_nothing_pays_the_last_pieces_count():
    """A deadline passing on the inference call: its failure says no
    delivered_tokens, the deltas did."""
    turns, admission, ledger = billed_pipeline(FailingGenerator(("a ", "b ", "c "), None, counts=True))
    events = await events_of(turns)
    assert isinstance(events[-1], Failure)
    assert admission.settled == [PROMPT_READ + 3 * TOKENS_A_PIECE]
    assert (ledger.records[0].prompt_tokens, ledger.records[0].completion_tokens) == (PROMPT_READ, 6)


async def test_a_caller_gone_before_a_speculative_first_piece_went_out_pays_the_prompt_the_model_read():
    """The generation's first piece came (with the model's prompt count)
    while the semantic lookup decided; the caller hung up before it went
    out: it pays the prompt as the model counted it, and no completion."""
    cache = FakeCache()
    cache.answered.clear()  # the semantic lookup never answers
    generator = CountingGenerator(("t0 ",))
    turns, admission, ledger = billed_pipeline(generator, cache=cache)
    reading = asyncio.ensure_future(events_of(turns, request("tell me a long story", pb.CACHE_POLICY_USE)))
    await asyncio.wait_for(generator.started.wait(), 5)
    await asyncio.sleep(0.05)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    assert admission.settled == [PROMPT_READ]
    assert (ledger.records[0].prompt_tokens, ledger.records[0].completion_tokens) == (PROMPT_READ, 0)


async def test_a_caller_hanging_up_before_the_completion_without_counts_pays_the_reservation_bound():
    """All but the end of a long answer read, then the caller hangs up: the
    deltas carry no token counts (an inference service from before them),
    so it pays the prompt as reserved and a
    token a byte delivered, at most max_tokens (here 640 bytes: the bound),
    never nothing (it was billed nothing: a budget bypass)."""
    turns, admission, ledger = billed_pipeline(StallingGenerator(tuple(f"t{i} " for i in range(150))))
    got = await read_then_hang_up(turns, 150)
    assert all(isinstance(event, Delta) for event in got)
    assert admission.settled == [PROMPT + MAX_TOKENS]
    [record] = ledger.records
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT, MAX_TOKENS)
    assert (record.cost_nano_usd, record.failure) == ((PROMPT + MAX_TOKENS) * 1000, "cancelled")


async def test_a_caller_hanging_up_before_any_piece_pays_the_prompt_only():
    generator = StallingGenerator(())
    turns, admission, ledger = billed_pipeline(generator)
    reading = asyncio.ensure_future(events_of(turns))
    await asyncio.wait_for(generator.started.wait(), 5)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await asyncio.sleep(0)
    assert admission.settled == [PROMPT]
    assert (ledger.records[0].prompt_tokens, ledger.records[0].completion_tokens) == (PROMPT, 0)


class OneBatch(FakeGenerator):
    """The whole answer in one batch: the completion's count, then its text."""

    async def generate(
        self, alias, prompt, parameters, budget, answer, session_id="", read_ahead=True, tenant_id=""
    ):
        self.started.set()
        answer.text = "x" * 200
        answer.prompt_tokens, answer.completion_tokens = PROMPT, 200
        answer.finish_reason, answer.deployment = "length", "d1"
        yield answer.text


async def test_a_caller_hanging_up_while_the_lookup_decides_pays_no_speculative_completion():
    """The speculative generation finished (its one batch carries the
    count) while the semantic lookup was still out, and the caller hung up
    before it answered, having received nothing: it was billed the 200
    completion tokens too (a bug hunt's repro)."""
    cache = FakeCache()
    cache.answered.clear()  # the semantic lookup never answers
    generator = OneBatch(())
    turns, admission, ledger = billed_pipeline(generator, cache=cache)
    got: list = []

    asked = request("tell me a long story", pb.CACHE_POLICY_USE)

    async def read() -> None:
        async for event in turns.run(asked, TENANT, "", Budget()):
            got.append(event)

    reading = asyncio.ensure_future(read())
    await asyncio.wait_for(generator.started.wait(), 5)
    await asyncio.sleep(0.05)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    assert got == []
    assert admission.settled == [PROMPT]
    [record] = ledger.records
    assert (record.prompt_tokens, record.completion_tokens, record.failure) == (PROMPT, 0, "cancelled")


class SlowStoreCache(FakeCache):
    """A cache whose Store (after a generated answer) does not return."""

    def __init__(self) -> None:
        super().__init__()
        self.storing = asyncio.Event()

    async def store(self, plan, messages, answer, budget) -> None:
        self.storing.set()
        await asyncio.Event().wait()


async def test_a_caller_gone_while_the_last_piece_waits_for_the_completion_pays_no_completion():
    """A caller whose completion may carry the last text (the HTTP edge's
    SSE, completion_may_carry_text) has that piece held while the turn
    saves; gone meanwhile, it received nothing, yet the held piece counted
    as delivered and it paid the whole completion (a bug hunt's repro:
    (5, 1) for a one-piece answer never received)."""
    cache = SlowStoreCache()
    generator = FakeGenerator(("Paris.",), finish_before_last=True)
    turns, admission, ledger = billed_pipeline(generator, cache=cache)
    got: list = []
    asked = request("tell me a long story", pb.CACHE_POLICY_USE)

    async def read() -> None:
        async for event in turns.run(asked, TENANT, "", Budget(), carry_last_text=True):
            got.append(event)

    reading = asyncio.ensure_future(read())
    await asyncio.wait_for(cache.storing.wait(), 5)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    assert got == []
    # Its prompt as inference counted it (FakeGenerator: 5), no completion.
    assert admission.settled == [5]
    [record] = ledger.records
    assert (record.prompt_tokens, record.completion_tokens, record.failure) == (5, 0, "cancelled")


async def test_a_stream_failing_midway_pays_what_inference_says_it_delivered():
    turns, admission, ledger = billed_pipeline(FailingGenerator(("a ", "b ", "c "), delivered_tokens=7))
    events = await events_of(turns)
    assert isinstance(events[-1], Failure) and events[-1].error.metadata["delivered_tokens"] == "7"
    assert admission.settled == [PROMPT + 7]
    [record] = ledger.records
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT, 7)
    assert record.failure == "STREAM_ENDED_EARLY"


async def test_a_stream_failing_midway_without_a_count_pays_a_token_a_byte_delivered():
    turns, admission, _ = billed_pipeline(FailingGenerator(("a ", "b "), delivered_tokens=None))
    events = await events_of(turns)
    assert isinstance(events[-1], Failure)
    assert admission.settled == [PROMPT + 4]


async def test_a_stream_failing_before_any_piece_pays_nothing():
    turns, admission, ledger = billed_pipeline(FailingGenerator((), delivered_tokens=None))
    events = await events_of(turns)
    assert isinstance(events[-1], Failure)
    assert admission.settled == [0]
    assert (ledger.records[0].prompt_tokens, ledger.records[0].completion_tokens) == (0, 0)


async def test_a_completed_turn_pays_the_inference_count():
    turns, admission, _ = billed_pipeline(FakeGenerator())
    events = await events_of(turns)
    assert isinstance(events[-1], Completion)
    assert admission.settled == [5 + 3]  # FakeGenerator's usage


async def shared_then_one_hangs_up(generator):
    """Two identical greedy turns sharing one generation of ``generator``'s
    40 pieces: one reads 3 pieces and hangs up, the other reads it all.
    Returns what the first received, and the admission both settled with."""
    turns, admission, _ = billed_pipeline(generator)
    greedy = chat()
    greedy.parameters.temperature = 0.0
    staying = asyncio.ensure_future(asyncio.wait_for(events_of(turns, greedy), 5))
    received = await read_then_hang_up(turns, 3, greedy)
    generator.release.set()
    events = await staying
    assert isinstance(events[-1], Completion)
    assert len(generator.prompts) == 1  # one generation, shared
    return received, admission


async def test_a_reader_leaving_a_shared_generation_pays_as_an_unshared_turn_cut_off_there():
    """Two identical greedy turns share one generation: the one that hangs
    up after some pieces pays for what it received, as it would alone (the
    tokens behind its pieces); the one that stays pays the whole
    generation's count."""
    received, admission = await shared_then_one_hangs_up(
        CountingGenerator(tuple(f"t{i} " for i in range(40)))
    )
    pieces = sum(event.text.count("t") for event in received)
    assert sorted(admission.settled) == sorted([PROMPT_READ + TOKENS_A_PIECE * pieces, 5 + 40])


async def test_a_reader_leaving_a_shared_generation_without_counts_pays_a_token_a_byte():
    received, admission = await shared_then_one_hangs_up(
        StallingGenerator(tuple(f"t{i} " for i in range(40)))
    )
    delivered = sum(len(event.text.encode()) for event in received)
    assert sorted(admission.settled) == sorted([PROMPT + delivered, 5 + 40])


def cached_hit() -> Hit:
    text = "Paris is the capital of France. " * 10
    return Hit(
        Answer(text=text, prompt_tokens=50, completion_tokens=80, finish_reason="stop"),
        CacheStatus.EXACT_HIT,
        1.0,
    )


async def test_a_hit_whose_session_append_fails_is_billed_as_a_hit():
    """The hit's answer went out, then the turn failed at its save: no model
    token was spent, so it pays a hit's share (0 here), never the cached
    usage at full price."""
    contexts = FakeContexts()
    contexts.append_error = unavailable(Reason.DOWNSTREAM_FAILED, "context down")
    turns, admission, ledger = billed_pipeline(FakeGenerator(), contexts, FakeCache(cached_hit()))
    events = [event async for event in turns.run(request("capital of France?"), TENANT, "s1", Budget())]
    assert isinstance(events[-1], Failure)
    assert admission.settled == [0]
    [record] = ledger.records
    assert (record.cache_status, record.prompt_tokens, record.completion_tokens) == ("exact_hit", 0, 0)
    assert (record.saved_tokens, record.cost_nano_usd) == (130, 0)


async def test_a_hits_ledger_record_names_no_deployment_and_a_generated_ones_names_its_own():
    """An operator adds up the ledger's log per deployment: a hit (exact,
    semantic or the router's hot copy, one path here) was served by no
    deployment. The one whose generation was stored is the completion's
    to name (ChatCompletion.deployment), not the record of this turn's use."""
    stored = cached_hit()
    stored.answer.deployment = "d1"
    turns, _, ledger = billed_pipeline(FakeGenerator(), cache=FakeCache(stored))
    events = await events_of(turns, request("capital of France?"))
    assert isinstance(events[-1], Completion) and events[-1].answer.deployment == "d1"
    [record] = ledger.records
    assert (record.cache_status, record.deployment) == ("exact_hit", "")

    turns, _, ledger = billed_pipeline(FakeGenerator())
    await events_of(turns)
    [record] = ledger.records
    assert (record.cache_status, record.deployment) == ("bypassed", "d1")


async def test_a_hit_whose_caller_hangs_up_mid_replay_is_billed_as_a_hit():
    generator = FakeGenerator()
    turns, admission, ledger = billed_pipeline(generator, cache=FakeCache(cached_hit()), replay_pause_s=0.01)
    await read_then_hang_up(turns, 2, request("capital of France?"))
    assert not generator.prompts  # answered from the cache alone
    assert admission.settled == [0]
    assert (ledger.records[0].cache_status, ledger.records[0].failure) == ("exact_hit", "cancelled")


async def test_a_session_turn_failing_midway_pays_the_assembled_prompt_the_model_read():
    """Its history went to the model with its new message: the prompt it
    pays is the assembled one's bytes, not the new message's alone."""
    contexts = FakeContexts()  # assembles [user("earlier"), *new messages]
    turns, admission, ledger = billed_pipeline(FailingGenerator(("a ", "b "), delivered_tokens=3), contexts)
    events = [event async for event in turns.run(chat(), TENANT, "s1", Budget())]
    assert isinstance(events[-1], Failure)
    assembled = PROMPT + len("earlier")
    assert admission.settled == [assembled + 3]
    assert (ledger.records[0].prompt_tokens, ledger.records[0].completion_tokens) == (assembled, 3)


# What CountedAssembly says its prompts hold: the context service's count
# with the model's tokenizer and template (its manifest's prompt_tokens).
ASSEMBLED_COUNT = 9


class CountedAssembly(FakeContexts):
    """FakeContexts' prompts, with their count as the context service's
    manifest gives it."""

    async def assemble(self, turn):
        assembled = await super().assemble(turn)
        return Assembly(assembled.messages, assembled.version, ASSEMBLED_COUNT)


async def cut_before_the_first_piece(asked: pb.ChatRequest, session_id: str) -> tuple[list, list]:
    """Runs ``asked`` until its generation starts, then hangs up, before any
    piece: what was settled, and recorded in the ledger."""
    generator = StallingGenerator(())
    turns, admission, ledger = billed_pipeline(generator, CountedAssembly())

    async def read() -> None:
        async for _ in turns.run(asked, TENANT, session_id, Budget()):
            raise AssertionError("no event comes before the generation's first piece")

    reading = asyncio.ensure_future(read())
    await asyncio.wait_for(generator.started.wait(), 5)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    return admission.settled, ledger.records


async def test_a_session_turn_cut_before_its_first_piece_pays_its_assembled_count():
    """Its assembly counted the prompt exactly (the manifest), before the
    model's first delta could: it paid the assembled messages' bytes
    (PROMPT + len("earlier"), 27 here) instead."""
    settled, [record] = await cut_before_the_first_piece(chat(), "s1")
    assert settled == [ASSEMBLED_COUNT]
    assert (record.prompt_tokens, record.completion_tokens, record.failure) == (
        ASSEMBLED_COUNT,
        0,
        "cancelled",
    )


async def test_a_stateless_turn_assembled_and_cut_before_its_first_piece_pays_its_assembled_count():
    """A stateless prompt whose byte bound does not fit the window is
    assembled (prompt_bound.py), so counted there too."""
    long = request("word " * 800, pb.CACHE_POLICY_BYPASS)
    settled, [record] = await cut_before_the_first_piece(long, "")
    assert settled == [ASSEMBLED_COUNT]
    assert (record.prompt_tokens, record.completion_tokens) == (ASSEMBLED_COUNT, 0)


async def test_a_stateless_turn_that_surely_fits_is_not_assembled_and_pays_its_bytes_when_cut():
    """No assembly, no count before the model's: the bytes bound stands."""
    settled, [record] = await cut_before_the_first_piece(chat(), "")
    assert settled == [PROMPT]
    assert record.prompt_tokens == PROMPT
