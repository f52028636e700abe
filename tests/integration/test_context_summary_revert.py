"""A session reverted to below a summarized span, then given the very same
turns again: its summary of them (same digest) was made with versions the
revert undid, so it no longer holds (summaries.valid_at). The summarizer must
write it again with the new versions, so that assembly serves it, and
compaction must never empty turns that no served summary stands for."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from services.context import store as session_store
from services.context import summaries as summaries_lib
from services.context.summaries import SummaryStore
from tests.integration.test_context_service import ASSISTANT, USER, msg
from tests.integration.test_context_summaries import GatedModel

pytestmark = pytest.mark.integration

SPAN = 4


def turns(count: int) -> list:
    return [
        msg(USER if i % 2 == 0 else ASSISTANT, f"Turn {i}: Ana moved to Lisbon in {2000 + i}.")
        for i in range(count)
    ]


@pytest.mark.parametrize("compact_after", [0, 8])
async def test_turns_appended_again_after_a_revert_below_their_summary_are_summarized_for_the_new_versions(
    redis_url, tenant, compact_after
) -> None:
    client = redis.Redis.from_url(redis_url)
    sessions = session_store.SessionStore(client, 600)
    summary_store = SummaryStore(client, 600)

    def summarizer(compact_after_turns: int) -> summaries_lib.Summarizer:
        policy = summaries_lib.SummaryPolicy(
            span_turns=SPAN, hot_window_turns=4, compact_after_turns=compact_after_turns
        )
        return summaries_lib.Summarizer(sessions, summary_store, policy, None)

    session_id = f"reverted-{compact_after}"
    await sessions.create(tenant, session_id)
    await sessions.append(tenant, session_id, None, turns(12), {})
    # Spans 0-4 and 4-8 summarized at version 1; nothing compacted.
    await summarizer(0).summarize_due(tenant, session_id)
    assert [s.end_version for s in await summary_store.all_of(tenant, session_id)] == [1, 1]

    # Back to no turns (version 1 undone), then the same 12 turns again.
    await sessions.revert(tenant, session_id, 0, None)
    await sessions.append(tenant, session_id, None, turns(12), {})
    later = summarizer(compact_after)
    version, created_ms = await later.summarize_due(tenant, session_id)

    served = await later.summaries_for(tenant, session_id, version, created_ms, [(0, 12)])
    assert [(s.first_turn, s.end_turn) for s in served] == [(0, SPAN), (SPAN, 2 * SPAN)]
    assert all(s.end_version == version for s in served)
    stored = await sessions.read(tenant, session_id)
    if compact_after:
        assert stored.compacted == 2 * SPAN
    # Every compacted turn has a summary that assembly serves standing for it.
    assert all(any(s.first_turn <= i < s.end_turn for s in served) for i in range(stored.compacted))
    await client.aclose()


async def test_a_summary_made_before_a_revert_below_it_never_replaces_the_one_compaction_relied_on(
    redis_url, tenant
) -> None:
    """Two replicas: one's model call was still summarizing the turns a
    revert then undid when the other summarized the turns appended since
    and compacted them. The late write replaced the summary that stood for
    the compacted turns with one of the undone turns (valid at no version
    since), and as spans start past the compacted turns none was ever made
    again: the compacted turns had nothing standing for them, for good."""
    client = redis.Redis.from_url(redis_url)
    sessions = session_store.SessionStore(client, 600)
    summary_store = SummaryStore(client, 600)
    policy = summaries_lib.SummaryPolicy(span_turns=SPAN, hot_window_turns=4, compact_after_turns=8)
    model = GatedModel()
    slow = summaries_lib.Summarizer(sessions, summary_store, policy, model)
    prompt = summaries_lib.Summarizer(sessions, summary_store, policy, None)
    session_id = "reverted-under-a-model-call"
    await sessions.create(tenant, session_id)
    await sessions.append(tenant, session_id, None, turns(12), {})
    late = asyncio.ensure_future(slow.summarize_due(tenant, session_id))
    await asyncio.wait_for(model.entered.wait(), 10)

    await sessions.revert(tenant, session_id, 0, None)
    again = [msg(t.role, t.content.replace("Lisbon", "Porto")) for t in turns(12)]
    await sessions.append(tenant, session_id, None, again, {})
    version, created_ms = await prompt.summarize_due(tenant, session_id)
    assert (await sessions.read(tenant, session_id)).compacted == 2 * SPAN

    model.gate.set()
    await asyncio.wait_for(late, 10)
    # Nothing of the late run was compacted (its turns are gone) ...
    assert (await sessions.read(tenant, session_id)).compacted == 2 * SPAN
    # ... and the compacted turns still have the summaries of their own
    # texts, also once a later run has been (it starts past them).
    version, created_ms = await prompt.summarize_due(tenant, session_id)
    fresh = summaries_lib.Summarizer(sessions, summary_store, policy, None)
    served = await fresh.summaries_for(tenant, session_id, version, created_ms, [(0, 12)])
    assert [(s.first_turn, s.end_turn) for s in served] == [(0, SPAN), (SPAN, 2 * SPAN)]
    assert all("Porto" in s.text and "Lisbon" not in s.text for s in served)
    await client.aclose()
