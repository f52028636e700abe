"""The pure parts of services/context/summaries.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import numpy as np
import redis.asyncio as redis

from meshgate import metrics
from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2
from meshgate.reasons import Reason
from services.context import store, summaries, token_counts
from services.context.assembly import Candidate, SessionCosts, TurnCost, plan, render
from services.context.servicer import ContextServicer, tokens_by_disposition
from services.context.store import StoredSession, session_key
from services.context.summaries import Summary, SummaryPolicy
from tests.unit.test_smollm2_tokenizer import build_smollm2_files

USER, ASSISTANT, SYSTEM = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_SYSTEM


def msg(role: int, content: str) -> common_pb2.Message:
    return common_pb2.Message(role=role, content=content)


def test_extractive_summary_keeps_the_specific_sentences_in_order() -> None:
    turns = [
        msg(SYSTEM, "You are a helpful assistant for the shipping desk."),
        msg(USER, "Hello there, how are you today? I hope all is well."),
        msg(ASSISTANT, "Fine thanks. Crate 4471 left Rotterdam for Lisbon on March 3."),
        msg(USER, "ok cool"),
        msg(ASSISTANT, "Maria Lopez signs for crate 4471 at dock 9 in Lisbon."),
    ]
    text = summaries.extractive_summary(turns, sentences=2)
    assert text == (
        "Crate 4471 left Rotterdam for Lisbon on March 3."
        " Maria Lopez signs for crate 4471 at dock 9 in Lisbon."
    )
    assert "helpful assistant" not in summaries.extractive_summary(turns)


def test_extractive_summary_finds_the_words_and_sentences_of_any_script() -> None:
    """A Latin-only word pattern found one sentence of three or more words
    in a Russian span, and none in a Chinese one (whose summary was then its
    first 300 characters, which compaction kept in place of the rest)."""
    russian = [
        msg(
            USER, "Привет! Меня зовут Мария, я живу в Лиссабоне уже пять лет. Мой код доступа к складу 4471."
        ),
        msg(ASSISTANT, "Понял, Мария. Я запомню, что код доступа 4471 и что вы в Лиссабоне."),
        msg(USER, "Груз 103 прибыл в док 7 в понедельник. Его подписал Педро в три часа дня."),
        msg(ASSISTANT, "Записал: груз 103, док 7, понедельник, подпись Педро, 15:00."),
    ]
    assert summaries.extractive_summary(russian) == (
        "Я запомню, что код доступа 4471 и что вы в Лиссабоне. Груз 103 прибыл в док 7 в понедельник."
        " Записал: груз 103, док 7, понедельник, подпись Педро, 15:00."
    )
    chinese = [
        msg(USER, "我叫玛丽亚，我住在里斯本。" * 30),
        msg(ASSISTANT, "货物103号星期一到达7号码头，佩德罗下午三点签收。"),
    ]
    # Sentences end at 。 with no space; one said thirty times is picked once.
    assert summaries.extractive_summary(chinese) == (
        "我叫玛丽亚，我住在里斯本。 货物103号星期一到达7号码头，佩德罗下午三点签收。"
    )


def test_extractive_summary_of_fragments_is_their_text() -> None:
    assert summaries.extractive_summary([msg(USER, "hi"), msg(ASSISTANT, "yo")]) == "hi yo"


def test_due_spans_are_complete_and_older_than_the_hot_window() -> None:
    policy = SummaryPolicy(span_turns=4, hot_window_turns=4)
    assert summaries.due_spans(7, policy) == []
    assert summaries.due_spans(8, policy) == [(0, 4)]
    assert summaries.due_spans(13, policy) == [(0, 4), (4, 8)]
    # Cut from where the summaries' coverage ends.
    assert summaries.due_spans(18, policy, start=6) == [(6, 10), (10, 14)]


def _summaries_of(*spans: tuple[int, int]) -> list[Summary]:
    return [Summary(f"id{f}-{e}", f, e, 1, 1, "extractive", f"s{f}-{e}") for f, e in spans]


def _spans(chosen: list[Summary]) -> list[tuple[int, int]]:
    return [(s.first_turn, s.end_turn) for s in chosen]


def test_coverage_with_one_span_length_is_every_summary() -> None:
    chosen = summaries.coverage(_summaries_of((8, 12), (0, 4), (4, 8)))
    assert _spans(chosen) == [(0, 4), (4, 8), (8, 12)]
    assert summaries.covered_end(chosen) == 12
    assert summaries.coverage([]) == [] and summaries.covered_end([]) == 0


def test_coverage_reaches_as_far_as_any_run_of_summaries_does() -> None:
    """Spans of 4 summarized to 16 and, after a restart with spans of 6 (as
    the code before cut them, from turn 0), to 24, compaction going to 24 on
    the strength of the latter: the greedy choice, shortest first, took the
    spans of 4 to 16, then none of (12, 18), and turns 16-17, compacted,
    were in no prompt."""
    stored = _summaries_of((0, 4), (4, 8), (8, 12), (12, 16), (0, 6), (6, 12), (12, 18), (18, 24))
    chosen = summaries.coverage(stored)
    # To 12 the finer run of the two (the next test says why).
    assert _spans(chosen) == [(0, 4), (4, 8), (8, 12), (12, 18), (18, 24)]
    assert summaries.covered_end(chosen) == 24


def test_coverage_takes_the_finer_of_two_runs_to_one_turn() -> None:
    """(0, 8) beside (0, 4), (4, 8): a prompt keeping turns 4-7 gives a
    summary only to a span it leaves out whole, so with (0, 8) chosen the
    turns 0-3, compacted, were in no prompt."""
    chosen = summaries.coverage(_summaries_of((0, 4), (4, 8), (0, 8)))
    assert _spans(chosen) == [(0, 4), (4, 8)]
    assert summaries.covered_end(chosen) == 8


def test_coverage_goes_on_after_a_turn_no_summary_starts_at() -> None:
    """A span named by digest whose content key is gone leaves a gap: the
    summaries after it still stand for their turns, but the run from turn 0
    (where the summarizer cuts new spans) ends before it."""
    chosen = summaries.coverage(_summaries_of((0, 4), (8, 12), (10, 14), (12, 16)))
    assert _spans(chosen) == [(0, 4), (8, 12), (12, 16)]
    assert summaries.covered_end(chosen) == 4


def _compaction_end(turn_count: int, compacted: int, policy: SummaryPolicy, *bytes_held) -> int:
    """compaction_end over the spans from turn 0 (one span length all along)."""
    spans = summaries.due_spans(turn_count, policy)
    return summaries.compaction_end(spans, turn_count, compacted, policy, *bytes_held)


def test_compaction_waits_for_the_cap_then_takes_summarized_spans_down_to_half_of_it() -> None:
    policy = SummaryPolicy(span_turns=4, hot_window_turns=4, compact_after_turns=8)
    # Within the cap (live turns), nothing; no cap, never.
    assert _compaction_end(8, 0, policy) == 0
    assert _compaction_end(16, 8, policy) == 8
    assert _compaction_end(100, 0, SummaryPolicy(span_turns=4, hot_window_turns=4)) == 0
    # Past it: whole spans, leaving at least half the cap live.
    assert _compaction_end(9, 0, policy) == 4
    assert _compaction_end(14, 0, policy) == 8
    assert _compaction_end(16, 0, policy) == 12
    assert _compaction_end(17, 8, policy) == 12
    # Only summarized spans go: the hot window is never compacted.
    wide_window = SummaryPolicy(span_turns=4, hot_window_turns=12, compact_after_turns=8)
    assert _compaction_end(16, 0, wide_window) == 4


def test_compaction_by_bytes_takes_summarized_spans_down_to_half_of_its_cap() -> None:
    policy = SummaryPolicy(span_turns=4, hot_window_turns=4, compact_after_bytes=1000)
    # 16 turns of 100 bytes: 1,600 held, past 1,000; spans end at 4, 8, 12.
    freeable = [100] * 16
    assert _compaction_end(16, 0, policy, freeable, 1600) == 12
    # Within the cap, nothing; past it, spans of 400 until 500 is left.
    assert _compaction_end(16, 0, policy, freeable, 1000) == 0
    assert _compaction_end(16, 0, policy, freeable, 1100) == 8
    assert _compaction_end(16, 0, policy, freeable, 1400) == 12
    # A span that frees nothing (system turns keep their bodies) does not
    # count toward it.
    system_first = [0] * 4 + [100] * 12
    assert _compaction_end(16, 0, policy, system_first, 1100) == 12
    # Compacted turns already freed theirs; the hot window and the
    # incomplete span are never taken, however much they hold.
    assert _compaction_end(16, 4, policy, [0] * 4 + [100] * 12, 1200) == 12
    assert _compaction_end(15, 0, policy, [10] * 8 + [1000] * 7, 7080) == 8
    # The turn cap's spans first, then more while bytes are still past half.
    both = SummaryPolicy(span_turns=2, hot_window_turns=2, compact_after_turns=8, compact_after_bytes=600)
    assert _compaction_end(9, 0, both, [1] * 9, 9) == 4
    assert _compaction_end(9, 0, both, [100] * 9, 900) == 6
    # No cap in bytes: bytes start nothing.
    uncapped = SummaryPolicy(span_turns=4, hot_window_turns=4)
    assert _compaction_end(16, 0, uncapped, freeable, 10**9) == 0


def test_plan_never_keeps_compacted_turns_but_their_system_and_pinned_ones() -> None:
    roles = [common_pb2.ROLE_SYSTEM, USER, ASSISTANT, USER, ASSISTANT, USER]
    costs = SessionCosts(np.array(roles), np.full(6, 5))
    relevance = np.array([0.0, 9.0, 9.0, 0.0, 0.0, 0.0])
    chosen = plan(costs, [TurnCost(USER, 5)], 1000, pinned_turns=[2], relevance=relevance, compacted=3)
    assert chosen.reasons[0] == pb.INCLUSION_REASON_SYSTEM
    assert chosen.reasons[1] == pb.INCLUSION_REASON_UNSPECIFIED
    assert chosen.reasons[2] == pb.INCLUSION_REASON_PINNED
    assert all(chosen.reasons[3:])
    newest = plan(costs, [TurnCost(USER, 5)], 1000, compacted=3)
    assert newest.kept() == [0, 3, 4, 5]


def test_versions_of_span_skip_undone_versions() -> None:
    # Versions 0..5 held 0, 2, 4, (undone), (undone), 4 turns; then 6 held 6.
    history = [0, 2, 4, None, None, 4, 6]
    assert summaries.versions_of_span(history, 0, 4, 6) == (1, 2)
    assert summaries.versions_of_span(history, 4, 6, 6) == (6, 6)
    # Without history, the current version stands for both.
    assert summaries.versions_of_span([], 0, 4, 9) == (9, 9)


def _summary(first: int, end: int, end_version: int, text: str = "s") -> Summary:
    return Summary(f"id{first}", first, end, first + 1, end_version, "extractive", text)


def test_valid_at_needs_the_summarys_versions_intact() -> None:
    history = [0, 1, 2, 3, None, 2]
    assert summaries.valid_at(_summary(0, 2, 2), history, 5)
    assert not summaries.valid_at(_summary(0, 2, 2), history, 1)
    assert not summaries.valid_at(_summary(2, 3, 4), history, 5)
    assert not summaries.valid_at(_summary(0, 2, 9), history, 9)


def test_a_session_stored_before_version_history_has_its_summaries_served() -> None:
    # No history: no revert (RevertSession refuses such a session) undid anything.
    assert summaries.valid_at(_summary(0, 2, 2), [], 5)
    assert not summaries.valid_at(_summary(0, 2, 9), [], 5)


def _assembled(dispositions: list[int], tokens: int, messages: list[common_pb2.Message]):
    response = pb.AssembleContextResponse()
    for index, disposition in enumerate(dispositions):
        response.manifest.entries.add(
            source=pb.SOURCE_SESSION, index=index, role=USER, tokens=10, disposition=disposition
        )
    response.manifest.entries.add(source=pb.SOURCE_REQUEST, index=0, role=USER, tokens=5)
    response.messages.extend(messages)
    response.manifest.prompt_tokens = tokens
    return response


DROPPED, INCLUDED = pb.DISPOSITION_DROPPED, pb.DISPOSITION_INCLUDED


def test_excluded_ranges_are_runs_of_turns_the_plan_left_out() -> None:
    reasons = [0, 0, pb.INCLUSION_REASON_RELEVANCE, 0, pb.INCLUSION_REASON_RECENCY, 0]
    assert summaries.excluded_ranges(reasons) == [(0, 2), (3, 4), (5, 6)]
    assert summaries.excluded_ranges([pb.INCLUSION_REASON_RECENCY]) == []
    assert summaries.excluded_ranges([]) == []


def test_add_summaries_fills_the_budget_oldest_first_and_marks_turns() -> None:
    kept = [msg(SYSTEM, "rules"), msg(USER, "t4"), msg(USER, "new")]
    response = _assembled([DROPPED] * 4 + [INCLUDED], 40, kept)
    first, second = _summary(0, 2, 2, "A"), _summary(2, 4, 4, "B")
    added = summaries.add_summaries(response, [first, second], [30, 30], budget=75, default_system_tokens=0)
    assert added == [first]
    # Only the first fits (40 + 30 <= 75 < 100).
    assert [m.content for m in response.messages] == [
        "rules",
        "Summary of earlier turns 1-2: A",
        "t4",
        "new",
    ]
    marked = [(e.index, e.disposition, e.summary_id) for e in response.manifest.entries[:4]]
    assert marked == [
        (0, pb.DISPOSITION_SUMMARIZED, "id0"),
        (1, pb.DISPOSITION_SUMMARIZED, "id0"),
        (2, DROPPED, ""),
        (3, DROPPED, ""),
    ]
    assert response.manifest.entries[-1].source == pb.SOURCE_SUMMARY
    assert response.manifest.prompt_tokens == 70
    assert [r.summary_id for r in response.inputs.summaries] == ["id0"]


def test_the_first_summary_replaces_the_templates_default_system_prompt() -> None:
    response = _assembled([DROPPED, DROPPED, INCLUDED], 50, [msg(USER, "t2"), msg(USER, "new")])
    summaries.add_summaries(response, [_summary(0, 2, 2)], [12], budget=55, default_system_tokens=8)
    # 50 - 8 (no default system prompt any more) + 12 = 54.
    assert response.manifest.prompt_tokens == 54
    assert response.messages[0].role == SYSTEM


async def test_a_summarys_tokens_are_counted_once_per_counter() -> None:
    build_smollm2_files()
    counters = token_counts.for_models(Settings().models)
    summarizer = summaries.Summarizer(None, None, SummaryPolicy(), None, list(counters.values()))
    counted = await summarizer._counted(_summary(0, 4, 4, "Maria signed for crate 104."))
    for counter in counters.values():
        assert counted.token_counts[counter.id] == (await counter.count([counted.message()]))[0]
    # Already counted: the same object back, nothing counted again.
    assert await summarizer._counted(counted) is counted


def test_tokens_by_disposition_match_the_manifest() -> None:
    rows = [TurnCost(USER, 10 + i) for i in range(6)]
    turns = SessionCosts.of(rows)
    texts = {i: msg(USER, f"t{i}") for i in range(6)}
    new = [Candidate(msg(USER, "q"), 7)]
    chosen = plan(turns, [TurnCost(USER, 7)], 40, recency_floor=2, relevance=np.zeros(6))
    response = render(chosen, turns, texts, new)
    added = summaries.add_summaries(response, [_summary(0, 2, 2)], [5], budget=60, default_system_tokens=0)
    assert added
    expected = dict.fromkeys(("included", "summarized", "dropped"), 0)
    names = {INCLUDED: "included", pb.DISPOSITION_SUMMARIZED: "summarized", DROPPED: "dropped"}
    for entry in response.manifest.entries:
        expected[names[entry.disposition]] += entry.tokens
    assert tokens_by_disposition(response.manifest, turns, chosen, added) == expected
    assert expected["summarized"] == 10 + 11


class _Sessions:
    """The session store's part the summarizer's memory reads: histories, counted."""

    def __init__(self) -> None:
        self.reads = 0

    async def history(self, tenant_id: str, session_id: str) -> list[int | None]:
        self.reads += 1
        return list(range(int(session_id)))


class _StoredSummaries:
    """A session named "<n>" has n // 16 spans summarized, 1 KB of text each."""

    async def spans(self, tenant_id: str, session_id: str) -> tuple[dict[tuple[int, int], Summary], dict]:
        text = "x" * 1000
        firsts = range(0, int(session_id) - 15, 16)
        whole = {(f, f + 16): Summary(f"{session_id}-{f}", f, f + 16, 0, 1, "extract", text) for f in firsts}
        return whole, {}

    async def all_of(self, tenant_id: str, session_id: str) -> list[Summary]:
        whole, _ = await self.spans(tenant_id, session_id)
        return [whole[span] for span in sorted(whole)]


async def test_the_summaries_kept_in_memory_are_bounded_in_bytes(monkeypatch) -> None:
    # Sessions of 4,096 versions and 256 summaries: ~0.7 MB each, two fit in 1.5 MB.
    monkeypatch.setattr(summaries, "MAX_HOT_BYTES", 1_500_000)
    sessions = _Sessions()
    summarizer = summaries.Summarizer(sessions, _StoredSummaries(), SummaryPolicy(), None)

    async def assemble(session_id: str) -> None:
        await summarizer.summaries_for("t", session_id, 1, 0, [(0, 16)])

    for session_id in ("4096", "4097", "4098"):
        await assemble(session_id)
    assert sessions.reads == 3
    await assemble("4098")
    await assemble("4097")
    assert sessions.reads == 3  # the two newest are kept
    await assemble("4096")
    assert sessions.reads == 4  # the oldest was let go
    # A session larger than the whole bound is never kept.
    for _ in range(2):
        await assemble("65536")
    assert sessions.reads == 6


class _HeldSessions(_Sessions):
    """Sessions of no turns, whose reads wait for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.read_ids: list[str] = []

    async def read(self, tenant_id: str, session_id: str) -> StoredSession:
        self.read_ids.append(session_id)
        await self.release.wait()
        return StoredSession(version=1, create_time_ms=0, update_time_ms=0, turns=[], token_counts={})


async def test_at_most_max_summarizing_sessions_run_at_once_the_others_wait() -> None:
    sessions = _HeldSessions()
    summarizer = summaries.Summarizer(sessions, _StoredSummaries(), SummaryPolicy(), None, max_summarizing=3)
    count = 3 * 3
    for n in range(count):
        summarizer.schedule("t", str(n))
    await asyncio.sleep(0.01)
    assert len(sessions.read_ids) == 3
    summarizer.schedule("t", "0")  # reading: once more after this run
    sessions.release.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(sessions.read_ids) == count + 1:
            break
    assert sorted(sessions.read_ids, key=int) == ["0", *map(str, range(count))]
    await summarizer.close()


async def test_nothing_is_summarized_once_closed() -> None:
    sessions = _HeldSessions()
    summarizer = summaries.Summarizer(sessions, _StoredSummaries(), SummaryPolicy(), None)
    await summarizer.close()
    summarizer.schedule("t", "0")
    await asyncio.sleep(0.01)
    assert sessions.read_ids == []
    assert not summarizer._running


class _HeldSummaries(_StoredSummaries):
    """Each read of a session's summaries waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reading = asyncio.Event()

    async def all_of(self, tenant_id: str, session_id: str) -> list[Summary]:
        self.reading.set()
        await self.release.wait()
        return await super().all_of(tenant_id, session_id)


async def test_a_load_under_way_when_a_deletion_is_heard_is_not_kept() -> None:
    """It may have read the deleted session: kept, it would be served to a
    new session of that id that reaches the same version."""
    sessions, stored = _Sessions(), _HeldSummaries()
    summarizer = summaries.Summarizer(sessions, stored, SummaryPolicy(), None)
    loading = asyncio.ensure_future(summarizer.summaries_for("t", "32", 1, 0, [(0, 32)]))
    await asyncio.wait_for(stored.reading.wait(), 5)
    summarizer.drop_hot(session_key("t", "32"))
    stored.release.set()
    assert len(await loading) == 2  # this assembly's own read stands
    await summarizer.summaries_for("t", "32", 1, 0, [(0, 32)])
    assert sessions.reads == 2  # read again: the first load was not kept
    await summarizer.summaries_for("t", "32", 1, 0, [(0, 32)])
    assert sessions.reads == 2  # ... and this one was


class _AnsweringModel:
    """A summary model stand-in that answers ``answer(span)``."""

    model = "stand-in"

    def __init__(self, answer) -> None:
        self.answer = answer

    async def summarize(self, span: list[common_pb2.Message]) -> summaries.ModelAnswer:
        return summaries.ModelAnswer(self.answer(span), summaries.ModelSpend(self.model, 900, 40))


async def test_a_model_summary_too_long_to_stand_for_its_span_is_extractive_instead() -> None:
    """Once its span is compacted, a summary is all that stands for its
    turns: one that fits no prompt (a 400 KB answer) left them out of every
    prompt, and one that repeats the span saved nothing."""
    build_smollm2_files()
    counters = list(token_counts.for_models(Settings().models).values())
    span = [
        msg(USER if i % 2 == 0 else ASSISTANT, f"Crate {100 + i} went to dock {i} in Lisbon. " * 8)
        for i in range(16)
    ]

    async def written(answer) -> tuple[str, str, summaries.ModelSpend | None]:
        summarizer = summaries.Summarizer(None, None, SummaryPolicy(), _AnsweringModel(answer), counters)
        return await summarizer._write(span, summaries._Run())

    # The model's tokens were spent whether or not its answer is kept.
    spent = summaries.ModelSpend("stand-in", 900, 40)
    short = "Crates 100 to 115 went to docks 0 to 15 in Lisbon."
    assert await written(lambda _: short) == (short, "model:stand-in", spent)
    extractive = (summaries.extractive_summary(span), "extractive", spent)
    # Huge; the transcript echoed; shorter than the span but past the tokens.
    assert await written(lambda _: "x " * 200_000) == extractive
    assert await written(summaries.transcript) == extractive
    assert await written(lambda _: "Lisbon dock crate. " * 200) == extractive


def test_a_stored_summary_decodes_with_the_fields_this_code_knows() -> None:
    stored = _summary(0, 4, 4, "Maria signed.")
    encoded = json.dumps(dataclasses.asdict(stored))
    assert summaries.decode(encoded.encode()) == stored
    # A newer replica's field, as in a rolling upgrade: left out.
    newer = json.dumps({**dataclasses.asdict(stored), "quality": 0.9})
    assert summaries.decode(newer.encode()) == stored
    # What will not decode at all stands for nothing.
    missing = json.dumps({k: v for k, v in dataclasses.asdict(stored).items() if k != "text"})
    for raw in (missing, "{not json", "[1, 2]"):
        assert summaries.decode(raw.encode()) is None


class _BrokenSessions(_HeldSessions):
    """Reads that raise what no handler names (a bug, data this code cannot read)."""

    async def read(self, tenant_id: str, session_id: str) -> StoredSession:
        self.read_ids.append(session_id)
        await self.release.wait()
        raise TypeError("Summary.__init__() got an unexpected keyword argument 'quality'")


async def test_a_run_that_fails_on_any_exception_is_logged_and_runs_again_if_asked() -> None:
    """It died with the exception ("Task exception was never retrieved"),
    and the run an append asked for meanwhile never came."""
    sessions = _BrokenSessions()
    summarizer = summaries.Summarizer(sessions, _StoredSummaries(), SummaryPolicy(), None)
    summarizer.schedule("t", "0")
    task = summarizer._running["t", "0"]
    await asyncio.sleep(0.01)
    summarizer.schedule("t", "0")  # an append while it runs
    sessions.release.set()
    await asyncio.wait_for(asyncio.wait([task]), 5)
    assert task.exception() is None
    assert sessions.read_ids == ["0", "0"]
    assert not summarizer._running


class _ForkingStore:
    async def fork(
        self, tenant_id: str, session_id: str, version: int, new_session_id: str, send=None
    ) -> tuple[str, int]:
        return new_session_id, 1

    async def revert(self, tenant_id: str, session_id: str, version: int, expected: int | None) -> int:
        return version + 1


class _RecordingSummarizer:
    def __init__(self) -> None:
        self.scheduled: list[tuple[str, str]] = []

    def schedule(self, tenant_id: str, session_id: str) -> None:
        self.scheduled.append((tenant_id, session_id))


async def test_a_fork_and_a_revert_schedule_a_summarizer_run() -> None:
    """Runs were started by appends only: a fork had no summary of its old
    turns, and its prompts left them out, until something was appended."""
    summarizer = _RecordingSummarizer()
    servicer = ContextServicer(_ForkingStore(), Settings().models, {}, summarizer=summarizer)
    await servicer.ForkSession(
        pb.ForkSessionRequest(tenant_id="t", session_id="s", version=3, new_session_id="f"), None
    )
    assert summarizer.scheduled == [("t", "f")]
    await servicer.RevertSession(pb.RevertSessionRequest(tenant_id="t", session_id="s", version=2), None)
    assert summarizer.scheduled == [("t", "f"), ("t", "s")]


class _HungModel:
    """A model that never answers: each call ends at its deadline, as
    ModelSummarizer's does (DEADLINE_EXCEEDED)."""

    model = "hung"

    def __init__(self) -> None:
        self.calls = 0

    async def summarize(self, span: list[common_pb2.Message]) -> summaries.ModelAnswer:
        self.calls += 1
        await asyncio.sleep(0.01)
        raise MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DOWNSTREAM_FAILED, "deadline")


async def test_after_the_model_times_out_a_run_and_the_next_ones_summarize_extractively() -> None:
    """Each span waited its own timeout (120 s by default), one after another,
    and compaction waited for all of them."""
    model = _HungModel()
    summarizer = summaries.Summarizer(None, None, SummaryPolicy(), model)
    spans = [[msg(USER, f"Crate {i} went to dock {i} in Lisbon today.")] for i in range(3)]
    run = summaries._Run()
    for span in spans:
        # No answer, no count of what the model spent: nothing to bill.
        assert await summarizer._write(span, run) == (summaries.extractive_summary(span), "extractive", None)
    assert model.calls == 1
    # Another run meanwhile does not wait for it either ...
    assert (await summarizer._write(spans[0], summaries._Run()))[1] == "extractive"
    assert model.calls == 1
    # ... until it has rested.
    summarizer._model_rests_until = 0.0
    await summarizer._write(spans[0], summaries._Run())
    assert model.calls == 2


class _OverlappingSummaries(_StoredSummaries):
    """Spans of 4 turns and, after a restart with summary_span_turns = 6, of 6."""

    async def all_of(self, tenant_id: str, session_id: str) -> list[Summary]:
        spans = [(0, 4), (0, 6), (4, 8), (6, 12), (8, 12), (12, 18), (16, 20)]
        return [Summary(f"id{f}-{e}", f, e, 1, 1, "extractive", f"s{f}-{e}") for f, e in spans]


async def test_a_prompt_gets_no_two_summaries_of_the_same_turn() -> None:
    """After a restart with another span length, summaries of both overlapped
    in one prompt, and the manifest named the later one for the turns both
    covered: it no longer said what was sent."""
    summarizer = summaries.Summarizer(_Sessions(), _OverlappingSummaries(), SummaryPolicy(), None)
    found = await summarizer.summaries_for("t", "32", 1, 0, [(0, 20)])
    assert [(s.first_turn, s.end_turn) for s in found] == [(0, 4), (4, 8), (8, 12), (12, 18)]
    response = _assembled([DROPPED] * 20 + [INCLUDED], 40, [msg(USER, "t20"), msg(USER, "new")])
    added = summaries.add_summaries(response, found, [5] * len(found), budget=1000, default_system_tokens=0)
    assert added == found
    marked = [e.summary_id for e in response.manifest.entries[:20]]
    expected = [s.summary_id for s in found for _ in range(s.first_turn, s.end_turn)]
    assert marked == expected + [""] * 2


class _RecordingInference:
    """An inference stub whose Generate answers at once and keeps the request."""

    def __init__(self) -> None:
        self.requests: list[inference_service_pb2.GenerateRequest] = []

    async def _answer(self):
        yield inference_service_pb2.GenerateResponse(
            completion=inference_service_pb2.GenerateCompletion(
                text="Alice met Bob.",
                finish_reason="stop",
                usage=common_pb2.Usage(prompt_tokens=61, completion_tokens=5),
            )
        )

    def Generate(self, request, timeout=None):
        self.requests.append(request)
        return self._answer()


async def test_a_model_summary_is_asked_for_as_background_work() -> None:
    """Summaries take a model's slots only when no tenant's generation
    waits (services/inference/generation_slots.py); a summary asked for as
    a tenant's would stand in line with that tenant's own turns."""
    inference = _RecordingInference()
    model = summaries.ModelSummarizer(inference, "smollm2", timeout_s=5)
    turns = [common_pb2.Message(role=common_pb2.ROLE_USER, content="Alice met Bob in Paris.")]
    # With what inference counted, for the session's tenant's usage.
    assert await model.summarize(turns) == summaries.ModelAnswer(
        "Alice met Bob.", summaries.ModelSpend("smollm2", 61, 5)
    )
    (request,) = inference.requests
    assert request.background
    assert not request.tenant_id


class _UnlinkFails:
    """A Redis that failed between a session's delete and its summaries'
    content keys' (store.drop_summary_copies)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def unlink(self, *keys: str) -> int:
        self.asked += keys
        raise redis.ConnectionError("connection reset")


async def test_summary_copies_not_deleted_are_counted_and_the_delete_stands() -> None:
    client = _UnlinkFails()
    digest = "ab" * 32
    before = metrics.REGISTRY.get_sample_value("meshgate_context_summary_copies_left_total") or 0.0
    # A value damaged in Redis names no key of the tenant's; a digest named twice is one key.
    await store.drop_summary_copies(client, "t", [digest, "not-a-digest", digest])
    assert client.asked == [store.summary_copy_key("t", digest)]
    assert metrics.REGISTRY.get_sample_value("meshgate_context_summary_copies_left_total") == before + 1


def test_a_span_longer_than_the_model_reads_reaches_it_with_every_turn_in_part():
    """16 answers of ~900 characters: cut at the end, the last three never
    reached the model, whose summary then stood for them once compacted."""
    long_turns = [
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=f"FACT{i} " + "word " * 180)
        for i in range(15)
    ]
    short = common_pb2.Message(role=common_pb2.ROLE_USER, content="FACT15 the short one stays whole.")
    turns = [*long_turns[:8], short, *long_turns[8:]]
    text = summaries.transcript(turns)
    assert len(text) <= summaries.MAX_TRANSCRIPT_CHARS
    assert all(f"FACT{i} " in text for i in range(16))
    assert "user: FACT15 the short one stays whole.\n" in text
    # A span that fits is sent as it is.
    assert summaries.transcript(turns[:3]) == "\n".join(
        f"{'user' if t.role == common_pb2.ROLE_USER else 'assistant'}: {t.content}" for t in turns[:3]
    )
