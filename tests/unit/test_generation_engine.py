"""The shared continuous-batching engine of tiny_gpt and smollm2: per-request
validation, sampling, and per-sequence isolation inside a batch.

The scheduler runs a real (small, seeded) tiny_gpt; only the response
sender is a recorder, standing in for Triton's."""

from __future__ import annotations

import itertools
import json
import threading

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from tests.unit import model_repository_modules

WINDOW = 64


@pytest.fixture(scope="module")
def engine():
    return model_repository_modules.load("generation/engine.py")


@pytest.fixture(scope="module")
def model():
    core = model_repository_modules.load("tiny_gpt/1/tiny_gpt_core.py")
    config = core.GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_context=WINDOW)
    return core.TinyGPT(core.init_weights(config, seed=5), config)


def params(engine, **values):
    return engine.SamplingParams.from_json(json.dumps(values), WINDOW)


@pytest.mark.parametrize(
    "raw, message",
    [
        ('{"temperature": NaN}', "temperature must be finite"),
        ('{"temperature": Infinity}', "temperature must be finite"),
        ('{"temperature": "inf"}', "temperature must be finite"),
        ('{"temperature": -0.5}', "temperature must be >= 0"),
        ('{"top_p": NaN}', "top_p must be finite"),
        ('{"top_p": 0}', r"top_p must be in \(0, 1\]"),
        ('{"top_p": 1.5}', r"top_p must be in \(0, 1\]"),
        ('{"seed": -1}', "seed must be >= 0"),
        ('{"seed": 1.5}', "seed must be an integer"),
        ('{"max_tokens": 0}', r"max_tokens must be in \[1, 63\]"),
        ('{"max_tokens": 64}', r"max_tokens must be in \[1, 63\]"),
        ('{"max_tokens": Infinity}', "max_tokens must be an integer"),
        ('{"max_tokens": true}', "max_tokens must be an integer"),
        ('{"top_k": -2}', "top_k must be"),
        ('{"stop": [1]}', "stop must be a string or a list of strings"),
        ('{"beam_width": 2}', "unsupported sampling parameters"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_invalid_sampling_values_are_refused(engine, raw, message):
    with pytest.raises(ValueError, match=message):
        engine.SamplingParams.from_json(raw, WINDOW)


def test_valid_sampling_values_parse_like_vllm(engine):
    assert engine.SamplingParams.from_json("", WINDOW) == engine.SamplingParams()
    parsed = engine.SamplingParams.from_json(
        '{"max_tokens": "8", "temperature": "0.7", "top_p": 0.9, "seed": 3, "stop": "##", "top_k": null}',
        WINDOW,
    )
    assert parsed == engine.SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=3, stop=("##",))


def test_a_prompt_that_leaves_no_room_for_max_tokens_is_refused(engine):
    engine.check_prompt_fits(prompt_tokens=48, max_tokens=16, max_context=WINDOW)
    with pytest.raises(ValueError, match="at most 48 prompt tokens"):
        engine.check_prompt_fits(prompt_tokens=49, max_tokens=16, max_context=WINDOW)


def test_greedy_is_argmax_and_sampling_is_seeded(engine):
    logits = np.array([0.1, 3.0, 0.2, 2.9], np.float32)
    assert engine.sample(logits, engine.SamplingParams(temperature=0.0), np.random.default_rng()) == 1

    nucleus = engine.SamplingParams(temperature=1.0, top_p=0.9)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [engine.sample(logits, nucleus, rng) for _ in range(50)]

    assert draws(5) == draws(5)
    # top_p=0.9 keeps only the two large logits (they hold >90% of the mass).
    assert set(draws(5)) == {1, 3}
    top_1 = engine.SamplingParams(temperature=1.0, top_k=1)
    rng = np.random.default_rng(0)
    assert {engine.sample(logits, top_1, rng) for _ in range(20)} == {1}


@pytest.mark.parametrize("temperature", [1e-300, 1e-320, 5e-6])
def test_a_tiny_positive_temperature_samples_greedily_rather_than_failing(engine, temperature):
    """Logits over 1e-320 overflowed to inf: 'no valid distribution', and
    the request failed as a model error (INTERNAL)."""
    logits = np.array([0.1, 9.0, 0.2, 8.9], np.float32)
    sampling = params(engine, temperature=temperature)
    assert engine.sample(logits, sampling, np.random.default_rng(1)) == 1


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.0, 0.5), (0.0, 1.0)])
def test_sampling_never_returns_a_token_outside_the_vocabulary(engine, temperature, top_p):
    nan_logits = np.full(10, np.nan, np.float32)
    with pytest.raises(ValueError):
        sampling = engine.SamplingParams(temperature=temperature, top_p=top_p)
        engine.sample(nan_logits, sampling, np.random.default_rng())


class Recorder:
    """engine.Sender that keeps what a client would receive."""

    def __init__(self):
        self.texts: list[str] = []
        self.finish_reason = None
        self.tokens = 0
        self.cached_tokens: int | None = None
        self.error: tuple[str, str] | None = None
        self.done = threading.Event()

    def is_cancelled(self) -> bool:
        return False

    def send(self, text, finish_reason, new_tokens, final, cached_tokens):
        assert not self.done.is_set(), "a response after the final one"
        self.cached_tokens = cached_tokens
        self.texts.append(text)
        self.tokens += new_tokens
        self.finish_reason = finish_reason
        if final:
            self.done.set()

    def fail(self, message, kind):
        assert not self.done.is_set(), "an error after the final response"
        self.error = (message, kind)
        self.done.set()


def vocabulary(engine):
    # Token i decodes as "<i>": enough to follow text and stop strings.
    return engine.Vocabulary(
        decode=lambda ids: "".join(f"<{i}>" for i in ids),
        stop_ids=frozenset({0}),
        never_sampled=np.array([0]),
    )


def generation(engine, prompt_ids, sampling: engine.SamplingParams, name="g"):
    return engine.Generation(
        request_id=name,
        sender=Recorder(),
        prompt="",
        prompt_ids=prompt_ids,
        params=sampling,
        stream=True,
        prepend_prompt=False,
    )


def run_to_completion(engine, model, generations, timeout=60):
    scheduler = engine.Scheduler("test", model, vocabulary(engine), max_active=8)
    # Queue everything first so the batch forms at once, then start the scheduler.
    for g in generations:
        scheduler.submit(g)
    scheduler.start()
    try:
        for g in generations:
            assert g.sender.done.wait(timeout), f"{g.request_id} never finished"
    finally:
        scheduler.shutdown()


PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11], [12], [20, 21]]


def test_batched_generation_streams_what_each_sequence_gets_alone(engine, model):
    greedy = engine.SamplingParams(max_tokens=12, temperature=0.0)
    alone = []
    for prompt in PROMPTS:
        g = generation(engine, prompt, greedy)
        run_to_completion(engine, model, [g])
        alone.append(g)
    together = [generation(engine, prompt, greedy) for prompt in PROMPTS]
    run_to_completion(engine, model, together)

    for a, b in zip(alone, together):
        assert b.sender.error is None
        assert "".join(b.sender.texts) == "".join(a.sender.texts)
        assert (b.sender.finish_reason, b.sender.tokens) == ("length", 12)


def test_a_sequence_that_fails_while_sampling_fails_alone(engine, model):
    good = engine.SamplingParams(max_tokens=10, temperature=0.8, seed=1)
    # Built directly, past from_json's checks: what once reached the
    # sampler and failed the whole batch.
    bad = engine.SamplingParams(max_tokens=10, temperature=float("nan"), seed=1)
    generations = [generation(engine, prompt, good, f"good-{i}") for i, prompt in enumerate(PROMPTS)]
    generations.insert(2, generation(engine, [5, 6], bad, "bad"))
    run_to_completion(engine, model, generations)

    assert generations[2].sender.error == ("test: internal error during generation", "internal")
    for g in generations[:2] + generations[3:]:
        assert g.sender.error is None
        assert (g.sender.finish_reason, g.sender.tokens) == ("length", 10)


class FailsForOneCache:
    """The real model, except that decoding raises whenever one chosen sequence takes part."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.poisoned = None

    def new_cache(self, tokens):
        cache = self.model.new_cache(tokens)
        if self.poisoned is None:
            self.poisoned = cache
        return cache

    def prefill(self, token_ids, cache):
        return self.model.prefill(token_ids, cache)

    def decode(self, token_ids, caches):
        if any(cache is self.poisoned for cache in caches):
            raise FloatingPointError("boom")
        return self.model.decode(token_ids, caches)


def test_a_sequence_that_fails_while_decoding_fails_alone(engine, model):
    greedy = engine.SamplingParams(max_tokens=6, temperature=0.0)
    generations = [generation(engine, prompt, greedy, f"g{i}") for i, prompt in enumerate(PROMPTS)]
    run_to_completion(engine, FailsForOneCache(model), generations)

    assert generations[0].sender.error == ("test: internal error during generation", "internal")
    for g in generations[1:]:
        assert g.sender.error is None
        assert g.sender.tokens == 6


def test_streamed_text_never_shows_a_stop_string(engine, model):
    free_run = generation(engine, [3, 4, 5], engine.SamplingParams(max_tokens=12, temperature=0.0))
    run_to_completion(engine, model, [free_run])
    text = "".join(free_run.sender.texts)
    # Five characters from the second half: longer than one token's text,
    # so a careless hold-back would leak its beginning.
    stop = text[text.index(">", len(text) // 2) + 1 :][:5]

    with_stop = engine.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    stopped = generation(engine, [3, 4, 5], with_stop)
    run_to_completion(engine, model, [stopped])

    assert stopped.sender.finish_reason == "stop"
    assert "".join(stopped.sender.texts) == text[: text.index(stop)]
    for sent in range(1, len(stopped.sender.texts) + 1):
        assert stop not in "".join(stopped.sender.texts[:sent])


# The stream interval (engine.StreamInterval): a scripted model, a fake
# clock and the scheduler's loop driven on the test's thread, so which token
# goes out in which response is exact.

STEP_S = 1 / 64  # binary fractions: the clock's sums are exact
INTERVAL = 8 * STEP_S  # eight steps' worth of tokens a response under load

# Byte-level tokens, as smollm2's BPE: 1 and 2 are the two bytes of "é", so
# a character can span tokens and decode as U+FFFD until its second byte.
BYTES = {1: b"\xc3", 2: b"\xa9", 3: b"a", 4: b"b", 5: b" ", 6: b"!", 7: b"xy"}


def byte_vocabulary(engine):
    return engine.Vocabulary(
        decode=lambda ids: b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace"),
        stop_ids=frozenset({0}),
        never_sampled=np.array([], dtype=np.int64),
    )


class ScriptedModel:
    """Logits that make greedy sampling follow a script: the prompt [k] plays scripts[k]."""

    class Cache:
        def __init__(self):
            self.script: list[int] = []
            self.position = 0

    def __init__(self, scripts: list[list[int]]):
        self.scripts = scripts

    def new_cache(self, tokens):
        return self.Cache()

    def _logits(self, cache) -> np.ndarray:
        logits = np.zeros(len(BYTES) + 1, np.float32)
        logits[cache.script[cache.position]] = 1.0
        return logits

    def prefill(self, token_ids, cache):
        cache.script = self.scripts[token_ids[0]]
        return self._logits(cache)

    def decode(self, token_ids, caches):
        for cache in caches:
            cache.position += 1
        return np.stack([self._logits(cache) for cache in caches])


class FakeClock:
    """The scheduler reads it once a step; each read is the next step's start.
    A prefill adds its own time (advance) on top of the step it falls in."""

    def __init__(self, step_durations):
        self.durations = itertools.cycle(step_durations)
        self.now = -next(self.durations)
        self.reads: list[float] = []  # each step's start

    def __call__(self) -> float:
        self.now += next(self.durations)
        self.reads.append(self.now)
        return self.now

    def longest_step(self) -> float:
        """From one step's start to the next, admissions' prefills included."""
        return max((b - a for a, b in zip(self.reads, self.reads[1:])), default=0.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Responses:
    """engine.Sender recording each response and when (the fake clock) it was sent."""

    failure: tuple[str, str] | None = None  # never set here: a failure fails the test

    def __init__(self, clock):
        self.clock = clock
        self.sent: list[tuple[str, int, bool, float]] = []  # text, tokens, final, time
        self.finish_reason = None

    def is_cancelled(self) -> bool:
        return False

    def send(self, text, finish_reason, new_tokens, final, cached_tokens):
        assert not (self.sent and self.sent[-1][2]), "a response after the final one"
        self.sent.append((text, new_tokens, final, self.clock.now))
        self.finish_reason = finish_reason

    def fail(self, message, kind):
        raise AssertionError(f"failed: {message} ({kind})")

    @property
    def text(self) -> str:
        return "".join(text for text, _, _, _ in self.sent)

    @property
    def tokens(self) -> int:
        return sum(tokens for _, tokens, _, _ in self.sent)


def stream_scripts(
    engine,
    scripts,
    interval,
    step_durations=(STEP_S,),
    stop=(),
    max_tokens=None,
    arrivals=None,
    prefill_s=0.0,
    sender=lambda clock, k: Responses(clock),
):
    """Every script streamed, script k submitted before loop pass arrivals[k]
    (default: all before the first) and each prefill taking prefill_s; each stream's Responses."""
    clock = FakeClock(step_durations)
    scheduler = engine.Scheduler(
        "test",
        ScriptedModel(scripts),
        byte_vocabulary(engine),
        max_active=8,
        on_prefill=lambda: clock.advance(prefill_s),
        stream_interval=interval,
        clock=clock,
    )
    streams, waiting = [], []
    for k, script in enumerate(scripts):
        sampling = engine.SamplingParams(
            max_tokens=max_tokens or len(script), temperature=0.0, stop=tuple(stop)
        )
        g = generation(engine, [k], sampling, f"s{k}")
        g.sender = sender(clock, k)
        waiting.append((arrivals[k] if arrivals else 0, k, g))
        streams.append(g.sender)
    # The scheduler's loop (Scheduler.run), on this thread: deterministic.
    # Only when busy or something arrived (an idle one waits for the inbox);
    # at most 6 scripts: all fit at once.
    waiting.sort(key=lambda arrival: arrival[:2])
    loop_pass = 0
    while scheduler._active or scheduler._prefilling or waiting:
        while waiting and waiting[0][0] <= loop_pass:
            scheduler.submit(waiting.pop(0)[2])
        if scheduler._active or scheduler._prefilling or scheduler._inbox.qsize():
            scheduler._loop_once()
        else:
            scheduler._step_began = None  # as Scheduler.run: idle time is no step's duration
        loop_pass += 1
    assert all(s.failure or (s.sent and s.sent[-1][2]) for s in streams), "a stream never finished"
    return streams


LONG_SCRIPT = [3, 4, 5, 6, 7] * 6  # 30 tokens, each with text


def test_under_load_deltas_after_the_first_go_out_once_an_interval(engine):
    interval = engine.StreamInterval(seconds=INTERVAL, min_active=4)
    held = stream_scripts(engine, [LONG_SCRIPT] * 4, interval)
    unheld = stream_scripts(engine, [LONG_SCRIPT] * 4, engine.StreamInterval())

    for stream, alone in zip(held, unheld):
        assert len(alone.sent) == 30  # one response a token without the interval
        # The first text at once (step 0), then eight tokens a response,
        # the final one with what was left, in the very step that ended it.
        assert [(tokens, final) for _, tokens, final, _ in stream.sent] == [
            (1, False),
            (8, False),
            (8, False),
            (8, False),
            (5, True),
        ]
        assert stream.sent[0][3] == 0.0
        assert stream.sent[-1][3] == 29 * STEP_S
        assert stream.text == alone.text
        assert stream.tokens == alone.tokens == 30
        assert stream.finish_reason == alone.finish_reason == "length"


def test_below_min_active_every_token_is_a_response(engine):
    interval = engine.StreamInterval(seconds=INTERVAL, min_active=4)
    streams = stream_scripts(engine, [LONG_SCRIPT] * 3, interval)
    for stream in streams:
        assert [tokens for _, tokens, _, _ in stream.sent] == [1] * 30


def test_a_model_slower_than_the_interval_streams_token_by_token(engine):
    # A step that takes longer than the interval (smollm2 on CPU): holding a
    # token for the next one would make every gap two steps long.
    interval = engine.StreamInterval(seconds=INTERVAL, min_active=1)
    streams = stream_scripts(engine, [LONG_SCRIPT] * 2, interval, step_durations=(INTERVAL + STEP_S,))
    for stream in streams:
        assert [tokens for _, tokens, _, _ in stream.sent] == [1] * 30


def test_the_first_text_is_not_held_when_earlier_responses_carried_none(engine):
    # "é" then text: the first token is half a character (an empty
    # response); the first text goes out the step it is complete.
    interval = engine.StreamInterval(seconds=INTERVAL, min_active=1)
    (stream,) = stream_scripts(engine, [[1, 2] + LONG_SCRIPT[:10]], interval)
    assert stream.sent[:2] == [("", 1, False, 0.0), ("é", 1, False, STEP_S)]
    assert stream.text == "é" + "ab !xy" * 2


def test_held_text_never_shows_a_stop_string(engine):
    # "!xy" holds back two characters at each step; held responses must
    # still never carry a beginning of the stop string.
    interval = engine.StreamInterval(seconds=INTERVAL, min_active=1)
    (stream,) = stream_scripts(engine, [LONG_SCRIPT], interval, stop=["!xya"])
    (unheld,) = stream_scripts(engine, [LONG_SCRIPT], engine.StreamInterval(), stop=["!xya"])
    assert stream.finish_reason == unheld.finish_reason == "stop"
    assert stream.text == unheld.text == "ab "
    assert len(stream.sent) < len(unheld.sent)


class CancelledAt(Responses):
    """A stream whose client cancels at a clock time: the scheduler sees it at its next step."""

    def __init__(self, clock, at: float):
        super().__init__(clock)
        self.at = at

    def is_cancelled(self) -> bool:
        return self.clock.now >= self.at

    def send(self, text, finish_reason, new_tokens, final, cached_tokens):
        assert self.failure is None, "a response after the cancellation"
        super().send(text, finish_reason, new_tokens, final, cached_tokens)

    def fail(self, message, kind):
        assert self.failure is None, "a second failure"
        self.failure = (message, kind)


def test_a_stream_cancelled_while_tokens_are_held_fails_cancelled_and_sends_nothing_more(engine):
    interval = engine.StreamInterval(seconds=INTERVAL, min_active=1)
    # Stream 0 sends its first token at step 0 and tokens 1-8 at step 8, then
    # holds tokens 9-11 when its client cancels at step 12.
    cancel_at = 12 * STEP_S
    cancelled, neighbour = stream_scripts(
        engine,
        [LONG_SCRIPT] * 2,
        interval,
        sender=lambda clock, k: CancelledAt(clock, cancel_at) if k == 0 else Responses(clock),
    )
    assert [(tokens, final, when) for _, tokens, final, when in cancelled.sent] == [
        (1, False, 0.0),
        (8, False, 8 * STEP_S),
    ]
    assert cancelled.failure == ("request was cancelled", "cancelled")
    # The held tokens never went out, and the other stream ran to its end.
    assert (neighbour.text, neighbour.tokens, neighbour.finish_reason) == ("ab !xy" * 6, 30, "length")


TOKENS = st.sampled_from(sorted(BYTES))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    scripts=st.lists(st.lists(TOKENS, min_size=1, max_size=24), min_size=1, max_size=6),
    arrivals=st.lists(st.integers(0, 30), min_size=6, max_size=6),
    interval_steps=st.integers(0, 12),
    min_active=st.integers(1, 7),
    step_durations=st.lists(st.integers(1, 16).map(lambda n: n * STEP_S / 4), min_size=1, max_size=8),
    prefill_steps=st.integers(0, 48),
    stop=st.lists(st.sampled_from(["é", "!x", "a b", "yé", "b"]), max_size=2),
)
def test_held_streams_carry_exactly_the_unheld_text_and_tokens(
    engine, scripts, arrivals, interval_steps, min_active, step_durations, prefill_steps, stop
):
    interval = engine.StreamInterval(seconds=interval_steps * STEP_S, min_active=min_active)
    timing = dict(step_durations=step_durations, arrivals=arrivals, prefill_s=prefill_steps * STEP_S)
    held = stream_scripts(engine, scripts, interval, stop=stop, **timing)
    # Never holding (min_active out of reach), but reading the clock each
    # step when the held run does, so both runs' clocks agree.
    never_holds = engine.StreamInterval(seconds=interval.seconds, min_active=len(scripts) + 1)
    unheld = stream_scripts(engine, scripts, never_holds, stop=stop, **timing)
    for stream, alone in zip(held, unheld):
        assert stream.text == alone.text
        assert stream.tokens == alone.tokens
        assert stream.finish_reason == alone.finish_reason
        assert len(stream.sent) <= len(alone.sent)
        for sent in range(1, len(stream.sent) + 1):
            shown = "".join(text for text, _, _, _ in stream.sent[:sent])
            assert alone.text.startswith(shown)
            assert not any(s in shown for s in stop)

        # Unheld, each token is one response, sent when the token was made.
        made = [when for _, _, _, when in alone.sent]
        # engine.Scheduler._holds' bound: a response's oldest token waited
        # less than the interval plus one step, a step that admits streams
        # counting their prefills (the clock's longest step, from start to start).
        oldest = 0
        for _, tokens, _, when in stream.sent:
            assert 0 <= when - made[oldest] < interval.seconds + stream.clock.longest_step() + 1e-12
            oldest += tokens
        # Never held before the first text: the time to first token is unchanged.
        first_text = [when for text, _, _, when in stream.sent if text]
        assert first_text[:1] == [when for text, _, _, when in alone.sent if text][:1]


class PieceCounter:
    """A model that records the prompt pieces its prefill is given; every
    step's logits pick token 1."""

    class Cache:
        def __init__(self):
            self.length = 0

    def __init__(self):
        self.pieces: list[int] = []

    def new_cache(self, tokens):
        return self.Cache()

    def prefill(self, token_ids, cache):
        self.pieces.append(len(token_ids))
        cache.length += len(token_ids)
        return self._logits()

    def decode(self, token_ids, caches):
        return np.stack([self._logits() for _ in caches])

    @staticmethod
    def _logits():
        logits = np.zeros(4, np.float32)
        logits[1] = 1.0
        return logits


class CancelledAfterFirstPiece(Recorder):
    def __init__(self, model: PieceCounter):
        super().__init__()
        self.model = model

    def is_cancelled(self) -> bool:
        return bool(self.model.pieces)


def test_a_request_cancelled_while_its_long_prompt_is_read_stops_at_the_next_piece(engine):
    """A bug hunt: 2,000 prompt tokens of smollm2 were read whole, ~11 s,
    after their caller had gone, every other sequence waiting."""
    chunk = engine.PREFILL_CHUNK_TOKENS
    model = PieceCounter()
    sampling = params(engine, max_tokens=3, temperature=0)
    gone = generation(engine, [2] * (3 * chunk + 10), sampling, name="gone")
    gone.sender = CancelledAfterFirstPiece(model)
    scheduler = engine.Scheduler("test", model, vocabulary(engine), max_active=8)
    scheduler.submit(gone)
    scheduler.start()
    try:
        assert gone.sender.done.wait(10)
        assert gone.sender.error == ("request was cancelled", "cancelled")
        assert model.pieces == [chunk]
        # The scheduler serves the next request, and a long prompt not
        # cancelled is read in pieces, whole.
        model.pieces.clear()
        kept = generation(engine, [2] * (chunk + 10), sampling, name="kept")
        scheduler.submit(kept)
        assert kept.sender.done.wait(10)
        assert kept.sender.error is None and kept.sender.tokens == 3
        assert model.pieces == [chunk, 10]
    finally:
        scheduler.shutdown()


class StepLog(PieceCounter):
    """A PieceCounter that also logs each batched decoding step's size, in
    order with the prefill pieces."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, int]] = []

    def prefill(self, token_ids, cache):
        self.log.append(("prefill", len(token_ids)))
        return super().prefill(token_ids, cache)

    def decode(self, token_ids, caches):
        self.log.append(("decode", len(caches)))
        return super().decode(token_ids, caches)


def logged_scheduler(engine) -> tuple[StepLog, object]:
    """A scheduler over a StepLog model, driven by scheduler_passes."""
    model = StepLog()
    return model, engine.Scheduler("test", model, vocabulary(engine), max_active=8)


def scheduler_passes(scheduler, passes: int) -> None:
    """Scheduler.run's loop, on this thread: deterministic."""
    for _ in range(passes):
        scheduler._loop_once()


def test_a_long_prompt_is_read_between_the_running_streams_steps(engine):
    """Read whole, a long prompt held every running stream of the model for
    its whole length (2,000 tokens of smollm2: ~11 s without a token); the
    running streams now take a step after each piece."""
    chunk = engine.PREFILL_CHUNK_TOKENS
    model, scheduler = logged_scheduler(engine)
    sampling = params(engine, max_tokens=20, temperature=0)
    running = generation(engine, [2, 3], sampling, name="running")
    scheduler.submit(running)
    scheduler_passes(scheduler, 1)
    assert model.log == [("prefill", 2), ("decode", 1)]
    model.log.clear()
    long = generation(engine, [2] * (3 * chunk + 10), sampling, name="long")
    scheduler.submit(long)
    scheduler_passes(scheduler, 4)
    pieces = [("prefill", chunk), ("decode", 1)] * 3
    assert model.log == [*pieces, ("prefill", 10), ("decode", 2)]
    # One token a pass for the running stream, none for the long one until read.
    assert running.sender.tokens == 5 and long.sender.tokens == 1
    assert running.sender.error is None and long.sender.error is None


class Leaves(Recorder):
    def __init__(self):
        super().__init__()
        self.gone = False

    def is_cancelled(self) -> bool:
        return self.gone


def test_a_request_whose_client_left_while_it_waited_behind_a_long_prompt_is_not_read(engine):
    chunk = engine.PREFILL_CHUNK_TOKENS
    model, scheduler = logged_scheduler(engine)
    sampling = params(engine, max_tokens=2, temperature=0)
    long = generation(engine, [2] * (2 * chunk), sampling, name="long")
    waiting = generation(engine, [3] * 7, sampling, name="waiting")
    waiting.sender = Leaves()
    scheduler.submit(long)
    scheduler.submit(waiting)
    scheduler_passes(scheduler, 1)
    assert model.log == [("prefill", chunk)]
    waiting.sender.gone = True
    scheduler_passes(scheduler, 3)
    assert waiting.sender.error == ("request was cancelled", "cancelled")
    assert ("prefill", 7) not in model.log
    assert long.sender.done.is_set() and long.sender.error is None


class BrokenSender(Recorder):
    def is_cancelled(self) -> bool:
        raise RuntimeError("the response sender is gone")


def test_a_sender_that_fails_at_admission_fails_its_request_alone(engine):
    """A review: the admission check outside any guard lost the request
    (never answered) and failed every other request of the model."""
    model, scheduler = logged_scheduler(engine)
    sampling = params(engine, max_tokens=6, temperature=0)
    running = generation(engine, [2, 3], sampling, name="running")
    scheduler.submit(running)
    scheduler_passes(scheduler, 1)
    broken = generation(engine, [2, 3], sampling, name="broken")
    broken.sender = BrokenSender()
    scheduler.submit(broken)
    scheduler_passes(scheduler, 6)
    assert broken.sender.error == ("test: internal error during generation", "internal")
    assert running.sender.error is None and running.sender.tokens == 6


def test_short_prompts_that_arrive_together_are_read_in_one_pause(engine):
    chunk = engine.PREFILL_CHUNK_TOKENS
    model, scheduler = logged_scheduler(engine)
    sampling = params(engine, max_tokens=5, temperature=0)
    third = chunk // 3
    for k in range(4):
        scheduler.submit(generation(engine, [2] * third, sampling, name=f"g{k}"))
    scheduler_passes(scheduler, 2)
    # Three fit the pass's budget whole, the fourth's first piece fills it.
    rest = chunk - 3 * third
    assert model.log == [
        *[("prefill", third)] * 3,
        ("prefill", rest),
        ("decode", 3),
        ("prefill", third - rest),
        ("decode", 4),
    ]


def test_a_prompt_read_in_pieces_gives_the_logits_of_the_whole(engine):
    core = model_repository_modules.load("tiny_gpt/1/tiny_gpt_core.py")
    config = core.GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_context=700)
    model = core.TinyGPT(core.init_weights(config, seed=5), config)
    prompt = np.random.default_rng(3).integers(1, 50, 600).tolist()
    whole = model.prefill(prompt, model.new_cache(len(prompt)))
    cache, chunk = model.new_cache(len(prompt)), engine.PREFILL_CHUNK_TOKENS
    for start in range(0, len(prompt), chunk):
        pieces = model.prefill(prompt[start : start + chunk], cache)
    np.testing.assert_allclose(pieces, whole, rtol=1e-4, atol=1e-5)
