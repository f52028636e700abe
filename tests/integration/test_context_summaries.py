"""Summaries of older spans through the real context service and Redis:
written in the background after appends, extractively or by a real model
through the inference service, added to prompts that leave their turns out,
named in the manifest, kept across a restart and dropped by a revert."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from meshgate.context.v1 import context_service_pb2 as pb
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


async def append_turns(stub, tenant: str, session_id: str, count: int) -> None:
    for i in range(count):
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
        spans = await store.spans(tenant, session_id)
        if len(spans) >= count:
            return {span: await store.get(tenant, digest) for span, digest in spans.items()}
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
        await append_turns(stub, tenant, session_id, 12)
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
