"""The manifest says exactly what the prompt holds, for random sessions over
the real context service and Redis: with pins, packing, summaries present
and absent, forks and reverts, every turn it lists as included is in the
prompt exactly once (as its message, or as a line of the transcript
message when packed), no dropped turn's text is there and no summarized
one's outside its summary, the summaries listed are the summary messages
sent, and a rebuild from the same inputs at the assembly's version
(at_version) is byte-identical, later appends notwithstanding."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import error_info
from meshgate.reasons import Reason
from services.context import assembly
from services.context.summaries import SummaryStore
from tests.integration.test_context_service import (
    ASSISTANT,
    MODEL,
    SYSTEM,
    USER,
    make_settings,
    msg,
    prompt_length,
    running,
)

pytestmark = pytest.mark.integration

# Each turn and fact starts with a marker no drawn text holds (its
# brackets are outside the alphabet), so where its text went can be told.
_TEXT = st.text(
    alphabet=st.sampled_from(
        list("abcdeklmnoqrxyz     .,?!\n\t") + ["\x00", "\u200f", "\u202e", "\u05d0", "é", "🦒", "\ufeff"]
    ),
    max_size=120,
)
# Now and then a turn too large to fit beside the newest ones: the newest
# strategy stops there, leaving room for the summaries of older spans.
_TURN_TEXT = st.one_of(_TEXT, _TEXT, _TEXT, _TEXT.map(lambda t: t + " filler words of a long turn" * 40))
# A system turn mid-history now and then: always kept, it keeps its span
# from being wholly left out, which a summary needs.
_ROLE = st.sampled_from([USER] * 5 + [ASSISTANT] * 4 + [SYSTEM])
_STRATEGY = st.sampled_from([pb.ASSEMBLY_STRATEGY_ADAPTIVE, pb.ASSEMBLY_STRATEGY_NEWEST])
_TENANT = "manifest-property"
_SUMMARY = "Summary of earlier turns "


def _marker(label: str) -> str:
    return f"\u27e6{label}\u27e7"


@pytest.fixture(scope="module")
async def stub(redis_url: str):
    settings = make_settings(redis_url)
    # Summaries of every four turns older than the newest four, extractive
    # (no model), so that random sessions of a dozen turns get some.
    settings.context.summary_span_turns = 4
    settings.context.summary_hot_window_turns = 4
    settings.context.summary_model = ""
    settings.context.compact_after_turns = 0
    async with running(settings) as stub:
        yield stub


@pytest.fixture(scope="module")
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _settled(client: redis.Redis) -> None:
    """Until Redis sees no data command for 0.03 s: the summarizer's and
    the prefetches' background work is done. (They run on this test's
    event loop, the service being in-process, each a chain of sub-
    millisecond Redis calls: a pause that long is their end.)"""
    previous = None
    for _ in range(300):
        stats = await client.info("commandstats")
        current = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_ping"))
        if current == previous:
            return
        previous = current
        await asyncio.sleep(0.03)


def _check_manifest(response: pb.AssembleContextResponse, turns: list[common_pb2.Message], facts) -> None:
    manifest = response.manifest
    session_entries = [e for e in manifest.entries if e.source == pb.SOURCE_SESSION]
    assert [e.index for e in session_entries] == list(range(len(turns)))
    summary_entries = [e for e in manifest.entries if e.source == pb.SOURCE_SUMMARY]
    assert [e.summary_id for e in summary_entries] == [r.summary_id for r in response.inputs.summaries]
    # The summaries sent are those listed, one message each.
    summaries = [m for m in response.messages if m.role == SYSTEM and m.content.startswith(_SUMMARY)]
    assert len(summaries) == len(summary_entries), (summaries, summary_entries)
    others = "".join(m.content for m in response.messages if m not in summaries)
    transcripts = [e for e in manifest.entries if e.source == pb.SOURCE_TRANSCRIPT]
    packed = [e.index for e in session_entries if e.packed]
    assert len(transcripts) == (1 if packed else 0)
    prompt = "".join(m.content for m in response.messages)
    for entry, turn in zip(session_entries, turns, strict=True):
        if "\u27e7" not in turn.content:
            continue  # no text to look for: its caller checks it by its message
        mark = turn.content[: turn.content.index("\u27e7") + 1]
        if entry.disposition == pb.DISPOSITION_INCLUDED:
            assert prompt.count(mark) == 1, (entry, prompt)
            if entry.packed:
                line = assembly.transcript_line(turn)
                assert line in prompt and turn not in response.messages, entry
            else:
                assert list(response.messages).count(turn) == 1, entry
        elif entry.disposition == pb.DISPOSITION_SUMMARIZED:
            assert entry.summary_id in {r.summary_id for r in response.inputs.summaries}
            assert mark not in others, (entry, others)
        else:
            assert entry.disposition == pb.DISPOSITION_DROPPED, entry
            assert mark not in prompt, (entry, prompt)
    for fact in facts:
        assert list(response.messages).count(msg(SYSTEM, fact)) == 1
    # And its count is the prompt's length as the model's template renders it.
    assert manifest.prompt_tokens == prompt_length(response.messages)


def _request(
    session_id: str, question: str, budget: int, strategy: int, **fields
) -> pb.AssembleContextRequest:
    return pb.AssembleContextRequest(
        tenant_id=_TENANT,
        session_id=session_id,
        new_messages=[msg(USER, question)],
        model=MODEL,
        max_prompt_tokens=budget,
        strategy=strategy,
        **fields,
    )


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_the_manifest_says_what_the_prompt_holds(stub, client, data) -> None:
    session_id = uuid.uuid4().hex
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=_TENANT, session_id=session_id))
    count = data.draw(st.integers(0, 24), label="turns")
    turns = [msg(data.draw(_ROLE), _marker(str(i)) + " " + data.draw(_TURN_TEXT)) for i in range(count)]
    at = version = 0
    while at < count:
        chunk = data.draw(st.integers(1, 3))
        appended = pb.AppendTurnsRequest(
            tenant_id=_TENANT,
            session_id=session_id,
            expected_version=version,
            messages=turns[at : at + chunk],
        )
        version = (await stub.AppendTurns(appended)).version
        at += chunk
    facts = [_marker(f"f{j}") + " " + data.draw(_TEXT) for j in range(data.draw(st.integers(0, 2)))]
    for fact in facts:
        if not fact.strip():
            continue
        await stub.PinToSession(pb.PinToSessionRequest(tenant_id=_TENANT, session_id=session_id, fact=fact))
    for index in data.draw(st.lists(st.integers(0, max(count - 1, 0)), max_size=2)) if count else []:
        await stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=_TENANT, session_id=session_id, message_index=index)
        )
    current = (await stub.GetSession(pb.GetSessionRequest(tenant_id=_TENANT, session_id=session_id))).session
    # The versions a fork may name: a revert undoes those after its target.
    readable = list(range(current.version + 1))
    if current.version and data.draw(st.booleans(), label="revert"):
        back_to = data.draw(st.integers(0, current.version - 1))
        reverted = await stub.RevertSession(
            pb.RevertSessionRequest(
                tenant_id=_TENANT, session_id=session_id, version=back_to, expected_version=current.version
            )
        )
        readable = [*range(back_to + 1), reverted.version]
    if data.draw(st.booleans(), label="fork"):
        fork_id = uuid.uuid4().hex
        await stub.ForkSession(
            pb.ForkSessionRequest(
                tenant_id=_TENANT,
                session_id=session_id,
                version=data.draw(st.sampled_from(readable)),
                new_session_id=fork_id,
            )
        )
        session_id = fork_id
    if data.draw(st.booleans(), label="summaries settled"):
        await _settled(client)
    current = (await stub.GetSession(pb.GetSessionRequest(tenant_id=_TENANT, session_id=session_id))).session
    budget = data.draw(st.integers(40, 500), label="budget")
    strategy = data.draw(_STRATEGY)
    question = data.draw(_TEXT, label="question") + " xyz"
    request = _request(session_id, question, budget, strategy)
    try:
        response = await stub.AssembleContext(request)
    except grpc.aio.AioRpcError as error:
        # Only a budget too small for what every prompt must hold.
        assert error_info(error).reason == Reason.CONTEXT_WINDOW_EXCEEDED, error
        return
    assert response.session_version == current.version
    _check_manifest(response, list(current.messages), [f for f in facts if f.strip()])
    dispositions = {pb.Disposition.Name(e.disposition) for e in response.manifest.entries}
    event(f"dispositions: {sorted(dispositions)}")
    event(f"packed: {any(e.packed for e in response.manifest.entries)}")
    event(f"summaries sent: {len(response.inputs.summaries)}")
    spans, _ = await SummaryStore(client, 0).spans(_TENANT, session_id)
    event(f"summaries stored: {bool(spans)}")
    # A rebuild at the assembly's version, after a later append, is the same prompt.
    await stub.AppendTurns(
        pb.AppendTurnsRequest(
            tenant_id=_TENANT,
            session_id=session_id,
            expected_version=current.version,
            messages=[msg(USER, _marker("later") + " xyz later turn")],
        )
    )
    rebuilt = await stub.AssembleContext(
        _request(session_id, question, budget, strategy, at_version=current.version)
    )
    if rebuilt.assembly_id == response.assembly_id:
        assert rebuilt.SerializeToString(deterministic=True) == response.SerializeToString(deterministic=True)
    else:
        # Only a summary written since may tell them apart.
        assert rebuilt.inputs.summaries != response.inputs.summaries, (rebuilt.inputs, response.inputs)


async def test_edge_turns_are_in_the_prompt_as_the_manifest_says(stub) -> None:
    """Turns with no text, only whitespace, only a NUL or a right-to-left
    mark, a system message in the middle of the history and a turn larger
    than the whole budget: packed or not, kept or dropped, each where its
    manifest entry says, and counted exactly."""
    session_id = uuid.uuid4().hex
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=_TENANT, session_id=session_id))
    turns = [
        msg(USER, _marker("0") + " what is in crate 7?"),
        msg(ASSISTANT, ""),
        msg(USER, _marker("2") + " \u200f\u05d0 crate 7 \u202e"),
        msg(ASSISTANT, "   \n\t"),
        msg(SYSTEM, _marker("4") + " speak of crates only"),
        msg(USER, "\x00"),
        msg(ASSISTANT, _marker("6") + " crate 7 holds" + " crate 7 holds more" * 400),
        msg(USER, _marker("7") + " and crate 8? \x00 crate 7 again"),
        msg(ASSISTANT, _marker("8") + " crate 8 holds pears"),
    ]
    await stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=_TENANT, session_id=session_id, messages=turns))
    for strategy in (pb.ASSEMBLY_STRATEGY_ADAPTIVE, pb.ASSEMBLY_STRATEGY_NEWEST):
        for budget in (60, 90, 150, 512):
            response = await stub.AssembleContext(_request(session_id, "crate 7?", budget, strategy))
            entries = {e.index: e for e in response.manifest.entries if e.source == pb.SOURCE_SESSION}
            # The turn larger than the budget is never sent.
            assert entries[6].disposition == pb.DISPOSITION_DROPPED
            # The unmarked turns (no text to find) by their messages or lines.
            for index in (1, 3, 5):
                if entries[index].disposition != pb.DISPOSITION_INCLUDED:
                    assert turns[index] not in response.messages
                elif entries[index].packed:
                    transcript = next(m for m in response.messages if m.content.startswith("Earlier"))
                    assert assembly.transcript_line(turns[index]) in transcript.content
                else:
                    assert list(response.messages).count(turns[index]) == 1
            _check_manifest(response, turns, facts=[])
