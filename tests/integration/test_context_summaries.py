"""Summaries of older spans through the real context service and Redis:
written in the background after appends, extractively or by a real model
through the inference service, added to prompts that leave their turns out,
named in the manifest, kept across a restart and dropped by a revert."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import grpc
import pytest
import redis.asyncio as redis

from meshgate import serving
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.inference.v1 import inference_service_pb2_grpc
from services.context import app as context_app
from services.context import store as session_store
from services.context import summaries as summaries_lib
from services.context import token_counts
from services.context.store import session_key
from services.context.summaries import SummaryStore
from tests.integration.test_context_service import (
    ASSISTANT,
    MODEL,
    USER,
    make_settings,
    msg,
    new_session,
    prompt_length,
    running,
)
from tests.integration.test_context_versions import _data_commands, _own_redis, _settled
from tests.mesh import router_channel

pytestmark = pytest.mark.integration

SPAN = 4


def summary_settings(redis_url: str, model: str = ""):
    settings = make_settings(redis_url)
    settings.context.summary_span_turns = SPAN
    settings.context.summary_hot_window_turns = 4
    settings.context.summary_model = model
    return settings


def turn_text(i: int) -> str:
    if i == 8:
        # Too large to fit beside the newest turns: everything older is left out.
        return " ".join(f"Filler sentence {k} repeats the weather report." for k in range(30))
    return (
        f"Crate {100 + i} went to dock {i} in Lisbon on Monday. "
        f"Maria signed for crate {100 + i} at {i + 1} pm."
    )


async def append_turns(stub, tenant: str, session_id: str, count: int, first: int = 0) -> None:
    """Appends turns ``first`` to ``count - 1``, turn i at version i + 1."""
    for i in range(first, count):
        role = USER if i % 2 == 0 else ASSISTANT
        await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                expected_version=i,
                messages=[msg(role, turn_text(i))],
            )
        )


async def wait_for_spans(client: redis.Redis, tenant: str, session_id: str, count: int) -> dict:
    store = SummaryStore(client, 0)
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        spans, _ = await store.spans(tenant, session_id)
        if len(spans) >= count:
            return spans
        assert asyncio.get_running_loop().time() < deadline, f"only {spans} summarized"
        await asyncio.sleep(0.05)


async def assemble(stub, tenant: str, session_id: str, budget: int = 300, **fields):
    request = pb.AssembleContextRequest(
        tenant_id=tenant,
        session_id=session_id,
        new_messages=[msg(USER, "Who signed?")],
        model=MODEL,
        max_prompt_tokens=budget,
        **fields,
    )
    # Newest-first keeps the left-out turns a known run (the adaptive
    # strategy, where there is one, picks by relevance).
    if "strategy" in pb.AssembleContextRequest.DESCRIPTOR.fields_by_name:
        strategies = pb.AssembleContextRequest.DESCRIPTOR.fields_by_name["strategy"].enum_type
        request.strategy = strategies.values_by_name["ASSEMBLY_STRATEGY_NEWEST"].number
    return await stub.AssembleContext(request)


def check_summaries_in(response, summaries: dict) -> list[tuple[int, int]]:
    """Every summary in the prompt covers exactly the turns the manifest
    marks with its id; returns the spans included."""
    refs = {ref.summary_id: ref for ref in response.inputs.summaries}
    summarized: dict[str, list[int]] = {}
    for entry in response.manifest.entries:
        if entry.source == pb.SOURCE_SESSION and entry.disposition == pb.DISPOSITION_SUMMARIZED:
            summarized.setdefault(entry.summary_id, []).append(entry.index)
    assert set(summarized) == set(refs)
    included = []
    for summary_id, indexes in summarized.items():
        ref = refs[summary_id]
        assert indexes == list(range(ref.first_turn, ref.end_turn))
        stored = summaries[ref.first_turn, ref.end_turn]
        assert (stored.summary_id, stored.first_version, stored.end_version) == (
            summary_id,
            ref.first_version,
            ref.end_version,
        )
        # Turn i came with version i + 1.
        assert (ref.first_version, ref.end_version) == (ref.first_turn + 1, ref.end_turn)
        assert any(stored.text in m.content for m in response.messages)
        included.append((ref.first_turn, ref.end_turn))
    summary_entries = [e for e in response.manifest.entries if e.source == pb.SOURCE_SUMMARY]
    assert sorted(e.summary_id for e in summary_entries) == sorted(refs)
    # Each summary's tokens were counted when it was written, for every
    # configured tokenizer and template, and assembly used that count.
    stored_by_id = {s.summary_id: s for s in summaries.values()}
    for entry in summary_entries:
        assert entry.tokens in stored_by_id[entry.summary_id].token_counts.values()
    # The count stays exact with the summaries in the prompt.
    assert response.manifest.prompt_tokens == prompt_length(response.messages)
    assert response.manifest.prompt_tokens <= response.manifest.budget_tokens
    return sorted(included)


async def test_extractive_summaries_cover_exactly_the_turns_the_manifest_says(redis_url, tenant) -> None:
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url)
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        summaries = await wait_for_spans(client, tenant, session_id, 2)
        assert set(summaries) == {(0, 4), (4, 8)}
        assert {s.method for s in summaries.values()} == {"extractive"}
        assert all(s.token_counts for s in summaries.values())
        assert "Maria" in summaries[0, 4].text or "Crate" in summaries[0, 4].text
        response = await assemble(stub, tenant, session_id)
        assert check_summaries_in(response, summaries) == [(0, 4), (4, 8)]
        # Tighter budgets take fewer, oldest first, and stay exact.
        included = [
            check_summaries_in(await assemble(stub, tenant, session_id, budget=b), summaries)
            for b in (140, 100, 60)
        ]
        assert included[-1] == [] and all(spans in ([], [(0, 4)]) for spans in included)

    # Restarts lose nothing: a new process finds and uses the same summaries.
    async with running(settings) as restarted:
        again = await assemble(restarted, tenant, session_id)
        assert again.messages == response.messages and again.manifest == response.manifest

        # A revert to before the second span's last turn undoes its summary (and
        # not the first's); the next appends summarize the new turns afresh.
        await restarted.RevertSession(
            pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=6, any_version=True)
        )
        after = await assemble(restarted, tenant, session_id, budget=512)
        assert [(r.first_turn, r.end_turn) for r in after.inputs.summaries] in ([], [(0, 4)])
        assert all(e.disposition != pb.DISPOSITION_SUMMARIZED or e.index < 4 for e in after.manifest.entries)
    await client.aclose()


async def test_the_chat_model_writes_summaries_through_the_inference_service(
    redis_url, inference_address, tenant
) -> None:
    client = redis.Redis.from_url(redis_url)
    # tiny-gpt: a real model on the real Triton, fast enough for a test
    # (smollm2, the default, writes the same way at ~30 tokens/s).
    settings = summary_settings(redis_url, model="tiny-gpt")
    settings.context.inference_address = inference_address
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        # Turns long enough that its answer (up to MAX_SUMMARY_TOKENS) is
        # shorter than their span: one that is not is not kept (extractive).
        for i in range(12):
            text = " ".join(f"{turn_text(i)} Note {k}." for k in range(3))
            request = pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, expected_version=i)
            request.messages.append(msg(role_of(i), text))
            await stub.AppendTurns(request)
        summaries = await wait_for_spans(client, tenant, session_id, 2)
        assert {s.method for s in summaries.values()} == {"model:tiny-gpt"}
        assert all(s.text.strip() for s in summaries.values())
        response = await assemble(stub, tenant, session_id, budget=512)
        for first, end in check_summaries_in(response, summaries):
            assert summaries[first, end].method == "model:tiny-gpt"
    await client.aclose()


async def test_after_appends_settle_an_assembly_with_summaries_reads_nothing_from_redis(
    tmp_path, tenant
) -> None:
    async with _own_redis(tmp_path) as (url, client), running(summary_settings(url)) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        summaries = await wait_for_spans(client, tenant, session_id, 2)
        # Once the summarizer and the prefetch are done, the session, its
        # counts and its summaries are all in memory.
        before = await _settled(client)
        response = await assemble(stub, tenant, session_id)
        assert await _data_commands(client) == before
        assert check_summaries_in(response, summaries) == [(0, 4), (4, 8)]


def role_of(i: int) -> int:
    return USER if i % 2 == 0 else ASSISTANT


async def until(condition, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "never held"
        await asyncio.sleep(0.05)


async def test_a_summary_keeps_its_own_sessions_versions_when_another_session_shares_its_turns(
    redis_url, tenant
) -> None:
    """Session A's turns came one version each, B's (the same turns) in one
    append: B's summary of the span must not lend A its versions, or a
    revert of A would keep a summary of turns it undid."""
    client = redis.Redis.from_url(redis_url)
    store = SummaryStore(client, 0)
    async with running(summary_settings(redis_url)) as stub:
        a = await new_session(stub, tenant)
        await append_turns(stub, tenant, a, 8)
        await wait_for_spans(client, tenant, a, 1)
        b = await new_session(stub, tenant)
        turns = [msg(role_of(i), turn_text(i)) for i in range(8)]
        await stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=tenant, session_id=b, messages=turns))
        b_spans = await wait_for_spans(client, tenant, b, 1)
        assert (b_spans[0, SPAN].first_version, b_spans[0, SPAN].end_version) == (1, 1)
        a_spans, _ = await store.spans(tenant, a)
        assert (a_spans[0, SPAN].first_version, a_spans[0, SPAN].end_version) == (1, SPAN)
        # A back to version 2 (turns 0 and 1): its summary of turns 0-3 is undone.
        await stub.RevertSession(
            pb.RevertSessionRequest(tenant_id=tenant, session_id=a, version=2, any_version=True)
        )
        await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=a, any_version=True, messages=[msg(USER, "A new turn two.")]
            )
        )
        response = await assemble(stub, tenant, a, budget=512)
        assert not response.inputs.summaries
    await client.aclose()


async def test_a_compacted_spans_summary_is_the_sessions_own_not_the_shared_copys(redis_url, tenant) -> None:
    """Once a span is compacted its summary is all that stands for it: the
    copy kept by content for other sessions (which expires on its own) is
    not what the session's prompt reads."""
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url)
    settings.context.compact_after_turns = 8
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        meta = session_key(tenant, session_id)

        async def compacted():
            return int(await client.hget(meta, "compacted") or 0) >= SPAN

        await until(compacted)
        shared = [k async for k in client.scan_iter(match=f"mg:context:{tenant}:summary:*")]
        assert shared
        await client.delete(*shared)
    # A new process: nothing of the session's summaries in memory.
    async with running(settings) as restarted:
        response = await assemble(restarted, tenant, session_id, budget=2000)
        assert (0, SPAN) in [(r.first_turn, r.end_turn) for r in response.inputs.summaries]
    await client.aclose()


async def test_a_session_deleted_on_one_replica_leaves_no_summary_in_anothers(redis_url, tenant) -> None:
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url)
    async with running(settings) as one, running(settings) as two:
        session_id = await new_session(two, tenant)
        await append_turns(two, tenant, session_id, 12)
        await wait_for_spans(client, tenant, session_id, 2)
        old = await assemble(two, tenant, session_id)
        assert old.inputs.summaries  # held in replica two's memory now, at this version
        await one.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
        await one.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
        # The same number of turns, so the same version, nothing else alike; summarized as before.
        for i in range(12):
            text = f"Paulo moved box {i} to Porto today." if i != 8 else turn_text(8)
            request = pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, expected_version=i)
            request.messages.append(msg(role_of(i), text))
            await one.AppendTurns(request)
        await wait_for_spans(client, tenant, session_id, 2)
        response = await assemble(two, tenant, session_id)
        assert response.session_version == old.session_version
        summaries = [m.content for m in response.messages if m.content.startswith("Summary of")]
        assert summaries and not any("Crate" in text for text in summaries), summaries
    await client.aclose()


async def shared_copies(client: redis.Redis, tenant: str) -> dict[bytes, str]:
    """The tenant's content-keyed summaries (SummaryStore's copies for other
    sessions to reuse): key -> the summary's text."""
    found = [key async for key in client.scan_iter(match=f"mg:context:{tenant}:summary:*")]
    texts = [json.loads(raw)["text"] for raw in [await client.get(key) for key in found]]
    return dict(zip(found, texts, strict=True))


async def test_a_deleted_sessions_summaries_leave_no_text_in_redis(redis_url, tenant) -> None:
    """The content keys hold what was said, counted toward no session once
    it is gone: the delete takes them with the session's own keys. A fork
    holding the same turns keeps its own summaries (its hash holds them
    whole), and its next summaries are made again where it needs them."""
    client = redis.Redis.from_url(redis_url)
    async with running(summary_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        summaries = await wait_for_spans(client, tenant, session_id, 2)
        fork = "fork-of-deleted"
        await stub.ForkSession(
            pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=12, new_session_id=fork)
        )
        fork_summaries = await wait_for_spans(client, tenant, fork, 2)
        texts = {summary.text for summary in summaries.values()}
        assert set((await shared_copies(client, tenant)).values()) == texts
        await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
        assert await shared_copies(client, tenant) == {}
        response = await assemble(stub, tenant, fork)
        assert check_summaries_in(response, fork_summaries) == [(0, SPAN), (SPAN, 2 * SPAN)]
    await client.aclose()


async def test_a_delete_whose_summaries_hold_a_damaged_value_is_answered(redis_url, tenant) -> None:
    """A summaries field that is neither a summary's JSON nor a digest (bytes
    damaged in Redis) came back from the delete's script as a digest and was
    decoded after the delete: a non-UTF-8 one failed the call INTERNAL for a
    delete that stood. It is no digest, and the delete is answered."""
    client = redis.Redis.from_url(redis_url)
    store = session_store.SessionStore(client, 600)
    await store.create(tenant, "damaged")
    await client.hset(session_store.key(tenant, "damaged", "summaries"), "0-4", b"\xff\xfe not a digest")
    await store.delete(tenant, "damaged")
    assert not await client.exists(session_store.session_key(tenant, "damaged"))
    await client.aclose()


async def test_a_summary_of_turns_a_revert_undid_leaves_no_copy_once_its_span_is_summarized_again(
    redis_url, tenant
) -> None:
    """A revert leaves the undone turns' summaries in the session's hash
    (they hold at no version, and its delete takes them and their copies);
    the summary of the turns appended in their place replaces them there,
    and with it goes the copy of the one it replaces, which no session names
    now (DeleteSession would never find it)."""
    client = redis.Redis.from_url(redis_url)
    async with running(summary_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        undone = await wait_for_spans(client, tenant, session_id, 2)
        await stub.RevertSession(
            pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=2, any_version=True)
        )
        for i in range(2, 12):
            request = pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, any_version=True)
            request.messages.append(msg(role_of(i), f"Paulo moved box {i} to the Porto warehouse today."))
            await stub.AppendTurns(request)
        store = SummaryStore(client, 0)

        async def summarized_again():
            spans, _ = await store.spans(tenant, session_id)
            return all(spans[span].summary_id != undone[span].summary_id for span in undone)

        await until(summarized_again)
        texts = set((await shared_copies(client, tenant)).values())
        assert texts == {summary.text for summary in (await store.spans(tenant, session_id))[0].values()}
        assert not texts & {summary.text for summary in undone.values()}
    await client.aclose()


async def test_a_summary_named_by_digest_as_sessions_stored_before_is_read_and_written_whole(
    redis_url, tenant
) -> None:
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url)
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        summaries = await wait_for_spans(client, tenant, session_id, 2)
    # As the code before stored it: the hash names the content key's digest.
    index = session_store.key(tenant, session_id, "summaries")
    digest = summaries_lib.span_digest([msg(role_of(i), turn_text(i)) for i in range(SPAN)])
    assert await client.exists(f"mg:context:{tenant}:summary:{digest}")
    await client.hset(index, f"0-{SPAN}", digest)
    async with running(settings) as restarted:
        response = await assemble(restarted, tenant, session_id)
        assert check_summaries_in(response, summaries) == [(0, SPAN), (SPAN, 2 * SPAN)]
        # The next run of the summarizer (after an append) writes it whole.
        await restarted.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, any_version=True, messages=[msg(USER, "More.")]
            )
        )

        async def whole_again():
            return (await client.hget(index, f"0-{SPAN}")).startswith(b"{")

        await until(whole_again)
    await client.aclose()


class GatedModel:
    """Writes a summary of the span's texts once ``gate`` is set."""

    model = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def summarize(self, span) -> summaries_lib.ModelAnswer:
        self.entered.set()
        await self.gate.wait()
        return summaries_lib.ModelAnswer(
            "SUMMARY OF: " + " | ".join(turn.content for turn in span),
            summaries_lib.ModelSpend(self.model, 40, 10),
        )


@pytest.mark.parametrize("compact_after", [0, 2])
async def test_a_run_spanning_a_delete_and_a_new_session_of_the_id_writes_nothing_into_it(
    redis_url, tenant, compact_after
) -> None:
    """A run read the old session, then the model took a while: what it made
    of the old turns must not land in the new session, nor compact its turns
    (it reached the version the run read, so the version check passed)."""
    client = redis.Redis.from_url(redis_url)
    sessions = session_store.SessionStore(client, 600)
    model = GatedModel()
    policy = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=0, compact_after_turns=compact_after)
    summarizer = summaries_lib.Summarizer(sessions, SummaryStore(client, 600), policy, model)
    session_id = "reused"

    async def four_turns(tag: str) -> int:
        turns = [msg(role_of(i), f"{tag} turn {i}") for i in range(4)]
        return (await sessions.append(tenant, session_id, None, turns, {})).version

    await sessions.create(tenant, session_id)
    await four_turns("OLD")
    run = asyncio.ensure_future(summarizer.summarize_due(tenant, session_id))
    await asyncio.wait_for(model.entered.wait(), 10)
    await sessions.delete(tenant, session_id)
    summarizer.forget(tenant, session_id)
    await sessions.create(tenant, session_id)
    version = await four_turns("NEW")
    model.gate.set()
    await asyncio.wait_for(run, 10)
    assert await SummaryStore(client, 0).all_of(tenant, session_id) == []
    # Nor is its copy for other sessions left: the delete found no summary naming it.
    assert await shared_copies(client, tenant) == {}
    now = await sessions.read(tenant, session_id)
    assert [t.content for t in now.turns][0] == "NEW turn 0"
    assert await summarizer.summaries_for(tenant, session_id, version, now.create_time_ms, [(0, 4)]) == []
    await client.aclose()


async def test_a_session_expired_and_created_again_is_not_given_its_earlier_lifes_summaries(
    redis_url, tenant
) -> None:
    """Expiry publishes no deletion notice: the summaries a replica keeps in
    memory for the session's first life must not be served to a second life
    of the id that has reached the same version."""
    client = redis.Redis.from_url(redis_url)
    sessions = session_store.SessionStore(client, 600)
    policy = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=0, compact_after_turns=0)
    summarizer = summaries_lib.Summarizer(sessions, SummaryStore(client, 600), policy, None)
    session_id = "expired"

    async def four_turns(tag: str) -> tuple[int, int]:
        await sessions.create(tenant, session_id)
        turns = [msg(role_of(i), f"{tag} turn {i} names the {tag} harbour.") for i in range(4)]
        await sessions.append(tenant, session_id, None, turns, {})
        return await summarizer.summarize_due(tenant, session_id)

    version, created_ms = await four_turns("OLD")
    first_life = await summarizer.summaries_for(tenant, session_id, version, created_ms, [(0, 4)])
    assert [s.text for s in first_life] and all("OLD" in s.text for s in first_life)
    # Gone as a TTL takes it: every key at once, no notice to any replica.
    await client.delete(*session_store.session_keys(tenant, session_id))
    await asyncio.sleep(0.005)
    again_version, again_created_ms = await four_turns("NEW")
    assert again_version == version and again_created_ms != created_ms
    second_life = await summarizer.summaries_for(tenant, session_id, version, again_created_ms, [(0, 4)])
    assert [s.text for s in second_life] and all("NEW" in s.text for s in second_life)
    await client.aclose()


class RunawayModel:
    """Answers a span with ~400 KB: a server that ignores max_tokens."""

    model = "runaway"

    async def summarize(self, span) -> summaries_lib.ModelAnswer:
        return summaries_lib.ModelAnswer("x " * 200_000, summaries_lib.ModelSpend(self.model, 300, 200_000))


async def test_a_runaway_model_answer_is_not_what_stands_for_compacted_turns(redis_url, tenant) -> None:
    """Stored as the spans' summaries (~200,000 tokens each), compaction
    emptied turns 0-15 and no prompt could hold what stood for them: they
    were left out of every prompt for good."""
    client = redis.Redis.from_url(redis_url)
    sessions = session_store.SessionStore(client, 600)
    counters = list(token_counts.for_models(Settings().models).values())
    policy = summaries_lib.SummaryPolicy(span_turns=4, hot_window_turns=4, compact_after_turns=8)
    stored_summaries = SummaryStore(client, 600)
    summarizer = summaries_lib.Summarizer(sessions, stored_summaries, policy, RunawayModel(), counters)
    session_id = "runaway"
    await sessions.create(tenant, session_id)
    turns = [msg(role_of(i), turn_text(i)) for i in range(20)]
    await sessions.append(tenant, session_id, None, turns, {})
    version, created_ms = await summarizer.summarize_due(tenant, session_id)
    stored = await sessions.read(tenant, session_id)
    assert stored.compacted == 16
    standing = await summarizer.summaries_for(tenant, session_id, version, created_ms, [(0, 16)])
    assert [(s.first_turn, s.end_turn) for s in standing] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    for summary in standing:
        assert summary.method == "extractive"
        assert max(summary.token_counts.values()) <= summaries_lib.MAX_SUMMARY_MESSAGE_TOKENS
    await client.aclose()


async def test_a_stored_summary_with_a_field_this_code_does_not_know_is_served_and_summarizing_goes_on(
    redis_url, tenant
) -> None:
    """What a newer replica may write in a rolling upgrade: refused, it
    failed every assembly needing the session's summaries (INTERNAL) and
    every summarizer run of it (no summaries, no compaction)."""
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url)
    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        summaries = await wait_for_spans(client, tenant, session_id, 2)
    index = session_store.key(tenant, session_id, "summaries")
    newer = json.loads(await client.hget(index, f"0-{SPAN}"))
    await client.hset(index, f"0-{SPAN}", json.dumps({**newer, "quality": 0.9}))
    # A new process: nothing of the session's summaries in memory.
    async with running(settings) as restarted:
        response = await assemble(restarted, tenant, session_id)
        assert check_summaries_in(response, summaries) == [(0, SPAN), (SPAN, 2 * SPAN)]
        for i in range(12, 16):
            await restarted.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant,
                    session_id=session_id,
                    any_version=True,
                    messages=[msg(role_of(i), turn_text(i))],
                )
            )
        assert (2 * SPAN, 3 * SPAN) in await wait_for_spans(client, tenant, session_id, 3)
    await client.aclose()


async def test_a_fork_is_summarized_without_an_append(redis_url, tenant) -> None:
    """No run was started for a fork: its prompts left its old turns out
    with no summary in their place until something was appended to it."""
    client = redis.Redis.from_url(redis_url)
    async with running(summary_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        await wait_for_spans(client, tenant, session_id, 2)
        fork = await stub.ForkSession(
            pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=12, new_session_id="fork")
        )
        store = SummaryStore(client, 0)

        async def summarized() -> bool:
            return len((await store.spans(tenant, "fork"))[0]) == 2

        await until(summarized, timeout_s=20)
        spans, _ = await store.spans(tenant, "fork")
        response = await assemble(stub, tenant, fork.session.session_id)
        assert check_summaries_in(response, spans) == [(0, SPAN), (SPAN, 2 * SPAN)]
    await client.aclose()


class HungInference(inference_service_pb2_grpc.InferenceServiceServicer):
    """An inference service whose Generate never answers."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        await asyncio.sleep(3600)
        yield  # an async generator, as a streaming method is


async def test_a_hung_summary_model_holds_a_run_for_one_timeout_not_one_per_span(redis_url, tenant) -> None:
    """Spans were summarized one after another, each waiting the model's
    timeout, and compaction waited for them all: 120 s a span by default."""
    inference = HungInference()
    server = grpc.aio.server()
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = redis.Redis.from_url(redis_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            model = summaries_lib.ModelSummarizer(
                inference_service_pb2_grpc.InferenceServiceStub(channel), "hung", timeout_s=0.5
            )
            sessions = session_store.SessionStore(client, 600)
            policy = summaries_lib.SummaryPolicy(span_turns=4, hot_window_turns=4, compact_after_turns=8)
            summarizer = summaries_lib.Summarizer(sessions, SummaryStore(client, 600), policy, model)
            for session_id in ("first", "second"):
                await sessions.create(tenant, session_id)
                # Other turns each: none reuses the other's summaries.
                turns = [msg(role_of(i), f"In the {session_id} session: {turn_text(i)}") for i in range(24)]
                await sessions.append(tenant, session_id, None, turns, {})
                await summarizer.summarize_due(tenant, session_id)
                written = await SummaryStore(client, 0).all_of(tenant, session_id)
                assert len(written) == 5 and {s.method for s in written} == {"extractive"}
                assert (await sessions.read(tenant, session_id)).compacted == 20
            # One timeout for the first session's five spans; the second, run
            # while the model rests, asked it nothing.
            assert inference.calls == 1
    finally:
        await server.stop(0)
        await client.aclose()


async def test_after_a_restart_with_another_span_length_a_prompt_gets_no_two_summaries_of_a_turn(
    redis_url, tenant
) -> None:
    """Summaries of spans of 4 and of 6 turns overlapped in one prompt, and
    the manifest named only the later one for the turns both covered. The
    spans of 6 now start where those of 4 end, so none is written over
    turns already summarized (summaries.coverage chooses among overlapping
    ones, as sessions summarized before may hold: unit tests)."""
    client = redis.Redis.from_url(redis_url)
    async with running(summary_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 16)
        await wait_for_spans(client, tenant, session_id, 3)
    settings = summary_settings(redis_url)
    settings.context.summary_span_turns = 6
    async with running(settings) as restarted:
        await append_turns(restarted, tenant, session_id, 22, first=16)
        summaries = await wait_for_spans(client, tenant, session_id, 4)
        assert set(summaries) == {(0, 4), (4, 8), (8, 12), (12, 18)}
        for budget in (300, 400, 512, 2000):
            response = await assemble(restarted, tenant, session_id, budget=budget)
            included = check_summaries_in(response, summaries)
            covered = [turn for first, end in included for turn in range(first, end)]
            assert len(covered) == len(set(covered)), (budget, included)
    await client.aclose()


async def test_after_a_restart_with_another_span_length_no_summary_is_made_of_compacted_turns(
    redis_url, tenant
) -> None:
    """Compacted to turn 4 with spans of 4, then restarted with spans of 6:
    the span (0, 6) was summarized from turns 0-3 already emptied, then
    (6, 12) and compaction went on to 12 on their strength, while a prompt,
    which takes (0, 4) and (4, 8), could hold no summary of turns 8-11: they
    were compacted and left out of every prompt (manifest DROPPED)."""
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url)
    settings.context.compact_after_turns = 8

    def compacted_to(turns: int):
        async def holds() -> bool:
            return int(await client.hget(session_key(tenant, session_id), "compacted") or 0) == turns

        return holds

    async with running(settings) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        await wait_for_spans(client, tenant, session_id, 2)
        await until(compacted_to(4))
    settings.context.summary_span_turns = 6
    async with running(settings) as restarted:
        await append_turns(restarted, tenant, session_id, 18, first=12)
        summaries = await wait_for_spans(client, tenant, session_id, 3)
        # The new spans start where the summaries of the compacted turns end.
        assert set(summaries) == {(0, 4), (4, 8), (8, 14)}
        await until(compacted_to(14))
        for budget in (300, 2000):
            response = await assemble(restarted, tenant, session_id, budget=budget)
            included = check_summaries_in(response, summaries)
            covered = [turn for first, end in included for turn in range(first, end)]
            # Every compacted turn is told once, by the summary the manifest names.
            assert covered == list(range(14)), (budget, included)
    await client.aclose()


@pytest.mark.serial  # timing-sensitive: make test runs it alone
async def test_a_summary_under_way_when_the_service_stops_is_written_within_the_grace(
    redis_url, tenant, monkeypatch
) -> None:
    """A stop with no call in flight drained at once, and the cleanup then
    cancelled the runs under way: a span due was left unsummarized (its
    model's tokens spent, unbilled) until the session's next append, on
    whichever replica took it, and its prompts until then had nothing for
    the turns they left out. A rolling restart did that to every session
    being summarized."""
    asked = asyncio.Event()

    async def slow_model(self, turns):
        asked.set()
        await asyncio.sleep(1.0)  # a real model's generation, on a loaded CPU
        return summaries_lib.ModelAnswer(
            "Maria signed for the crates.", summaries_lib.ModelSpend("tiny-gpt", 9, 6)
        )

    monkeypatch.setattr(summaries_lib.ModelSummarizer, "summarize", slow_model)
    client = redis.Redis.from_url(redis_url)
    settings = summary_settings(redis_url, model="tiny-gpt")
    service = serving.Service("context", context_app.SERVICE_NAMES)
    port = await serving.start(service, "127.0.0.1:0", await context_app.setup(service, settings))
    try:
        async with router_channel(f"127.0.0.1:{port}", "context") as channel:
            stub = context_service_pb2_grpc.ContextServiceStub(channel)
            session_id = await new_session(stub, tenant)
            await append_turns(stub, tenant, session_id, 2 * SPAN)
        await asyncio.wait_for(asked.wait(), 10)
    finally:
        started = time.monotonic()
        await serving.stop(service, grace_s=10)
    # Held for the run, not for the whole grace.
    assert time.monotonic() - started < 5
    spans, _ = await SummaryStore(client, 0).spans(tenant, session_id)
    assert set(spans) == {(0, SPAN)}
    assert spans[0, SPAN].method == "model:tiny-gpt"
    await client.aclose()


async def test_a_summary_lives_as_long_as_its_session_whatever_ttl_its_writer_has(redis_url, tenant) -> None:
    """A replica configured with another TTL than the session's latest
    writer's (a rolling change of context.session_ttl_s) summarizes it. Its
    summary took that replica's TTL: of a session kept forever (written under
    TTL 0) and compacted behind its summaries, the whole summaries hash
    expired, and the compacted turns had nothing standing for them for good;
    of a session due to expire, it outlived it."""
    client = redis.Redis.from_url(redis_url)
    policy = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=2, compact_after_turns=2)
    turns = [msg(USER if i % 2 == 0 else ASSISTANT, turn_text(i)) for i in range(6)]
    for session_ttl_s, summarizer_ttl_s in ((0, 600), (60, 600)):
        session_id = f"kept-{session_ttl_s}"
        sessions = session_store.SessionStore(client, session_ttl_s)
        await sessions.create(tenant, session_id)
        await sessions.append(tenant, session_id, None, turns[:4], {})
        # Its own replica summarizes turns 0-1 and compacts them.
        own = summaries_lib.Summarizer(sessions, SummaryStore(client, session_ttl_s), policy, None)
        await own.summarize_due(tenant, session_id)
        assert (await sessions.read(tenant, session_id)).compacted == 2
        # Another replica's run summarizes the next span after an append,
        # and compacts nothing more: no write of the session's but the summary's.
        await sessions.append(tenant, session_id, None, turns[4:], {})
        other_sessions = session_store.SessionStore(client, summarizer_ttl_s)
        other_policy = dataclasses.replace(policy, compact_after_turns=0)
        other = summaries_lib.Summarizer(
            other_sessions, SummaryStore(client, summarizer_ttl_s), other_policy, None
        )
        await other.summarize_due(tenant, session_id)
        assert (await sessions.read(tenant, session_id)).compacted == 2
        spans, _ = await SummaryStore(client, 0).spans(tenant, session_id)
        assert sorted(spans) == [(0, 2), (2, 4)]
        session_left = await client.pttl(session_key(tenant, session_id))
        summaries_left = await client.pttl(session_store.key(tenant, session_id, "summaries"))
        if session_ttl_s == 0:
            assert (session_left, summaries_left) == (-1, -1)
        else:
            assert 0 < summaries_left <= session_left <= session_ttl_s * 1000


async def test_two_spans_of_the_same_turns_each_have_a_summary_of_their_own(redis_url, tenant) -> None:
    """A summary's id was its turns' digest alone: two spans of the same
    texts (a user who says the same things twice over) shared one, so the
    manifest named one id for the turns of both, and a turn's summary_id
    did not tell which of the prompt's summaries stood for it."""
    client = redis.Redis.from_url(redis_url)
    async with running(summary_settings(redis_url)) as stub:
        session_id = await new_session(stub, tenant)
        turns = [msg(role_of(i), turn_text(i % SPAN if i < 2 * SPAN else i)) for i in range(12)]
        await stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=turns))
        summaries = await wait_for_spans(client, tenant, session_id, 2)
        assert summaries[0, SPAN].text == summaries[SPAN, 2 * SPAN].text
        assert summaries[0, SPAN].summary_id != summaries[SPAN, 2 * SPAN].summary_id
        response = await assemble(stub, tenant, session_id)
        refs = [(ref.summary_id, ref.first_turn, ref.end_turn) for ref in response.inputs.summaries]
        assert [(first, end) for _, first, end in refs] == [(0, SPAN), (SPAN, 2 * SPAN)]
        for entry in response.manifest.entries:
            if entry.disposition == pb.DISPOSITION_SUMMARIZED:
                (covering,) = [ref for ref in refs if ref[1] <= entry.index < ref[2]]
                assert entry.summary_id == covering[0]
    await client.aclose()


async def test_a_rebuild_adds_the_summaries_its_assembly_had_not_those_written_since(
    redis_url, tenant
) -> None:
    """Summaries are written after the appends they cover, so an assembly
    right after an append has none that a rebuild at its version finds
    later: the rebuild gave another prompt (two summaries more, 12 turns at
    300 tokens), and the first could not be had again. The rebuild names
    the summaries its assembly had (rebuild_summaries)."""
    client = redis.Redis.from_url(redis_url)
    not_yet = summary_settings(redis_url)
    not_yet.context.summary_hot_window_turns = 64  # no span due: as before the summarizer ran
    async with running(not_yet) as stub:
        session_id = await new_session(stub, tenant)
        await append_turns(stub, tenant, session_id, 12)
        first = await assemble(stub, tenant, session_id)
    assert not first.inputs.summaries
    async with running(summary_settings(redis_url)) as restarted:
        await append_turns(restarted, tenant, session_id, 13, first=12)
        await wait_for_spans(client, tenant, session_id, 2)
        later = await assemble(restarted, tenant, session_id, at_version=12)
        assert [(r.first_turn, r.end_turn) for r in later.inputs.summaries] == [(0, 4), (4, 8)]
        for earlier in (first, later):
            named = pb.RebuildSummaries(summary_ids=[r.summary_id for r in earlier.inputs.summaries])
            rebuilt = await assemble(restarted, tenant, session_id, at_version=12, rebuild_summaries=named)
            assert rebuilt.messages == earlier.messages and rebuilt.assembly_id == earlier.assembly_id
    await client.aclose()
