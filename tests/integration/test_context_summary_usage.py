"""What a session's summaries spend on a model, over a real Redis: counted
on the session with the summary, in the script that writes it (once per
summary, not at all for one made without a model or written into
another life of the session, but for one a revert refused), and
taken by the session's next append, in its script, to report for the
tenant's usage: once, a replay taking nothing more."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import store as session_store
from services.context import summaries as summaries_lib
from services.context.store import SummarySpend
from services.context.summaries import ModelAnswer, ModelSpend, SummaryStore
from tests.integration.test_context_service import msg
from tests.integration.test_context_summaries import GatedModel, role_of

pytestmark = pytest.mark.integration

PROMPT_TOKENS = 50
COMPLETION_TOKENS = 7


class CountingModel:
    """A model that answers every span with a short summary, billed as
    inference bills one."""

    model = "counting"

    def __init__(self, text: str = "") -> None:
        self.calls = 0
        self._text = text

    async def summarize(self, span) -> ModelAnswer:
        self.calls += 1
        return ModelAnswer(
            self._text or f"Summary {self.calls}.", ModelSpend(self.model, PROMPT_TOKENS, COMPLETION_TOKENS)
        )


@pytest.fixture
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def unbilled(client: redis.Redis, tenant: str, session_id: str) -> bytes | None:
    return await client.hget(session_store.session_key(tenant, session_id), "unbilled")


def summarizer_of(client: redis.Redis, model) -> summaries_lib.Summarizer:
    policy = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=0)
    sessions = session_store.SessionStore(client, 600)
    return summaries_lib.Summarizer(sessions, SummaryStore(client, 600), policy, model)


def turns(first: int, count: int, tag: str = "") -> list:
    return [
        msg(role_of(i), f"{tag}Turn {i} names the harbour at Lisbon.") for i in range(first, first + count)
    ]


async def test_a_models_summaries_are_counted_with_them_once_and_taken_by_the_next_append_once(
    client, tenant
) -> None:
    sessions = session_store.SessionStore(client, 600)
    model = CountingModel()
    summarizer = summarizer_of(client, model)
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 4), {})
    await summarizer.summarize_due(tenant, "s")
    assert model.calls == 2
    two = SummarySpend("counting", 2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS, 2)

    # Summarized again (nothing is due), or one of them written again by
    # another replica's run that made the same summary: nothing more.
    await summarizer.summarize_due(tenant, "s")
    assert model.calls == 2
    stored = SummaryStore(client, 600)
    (summary, *_) = await stored.all_of(tenant, "s")
    created_ms = (await sessions.read(tenant, "s")).create_time_ms
    digest = summaries_lib.span_digest(turns(0, 2))
    spent = ModelSpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS)
    assert summary.summary_id == digest[:32]
    assert await stored.put(tenant, "s", digest, summary, created_ms, spent)
    # Nor one whose write is refused (its session is another life of the id).
    assert not await stored.put(tenant, "s", digest, summary, created_ms + 1, spent)

    first = await sessions.append(tenant, "s", None, turns(4, 2), {}, turn_id="first")
    assert first.unbilled == (two,)
    assert await unbilled(client, tenant, "s") is None
    # Spent since: the next append's, not a replay's.
    await summarizer.summarize_due(tenant, "s")
    assert model.calls == 3
    one = SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    # The first append's reply was lost: its retry reports what it took, and
    # takes nothing more.
    replay = await sessions.append(tenant, "s", None, turns(4, 2), {}, turn_id="first")
    assert replay.replayed and replay.version == first.version and replay.unbilled == (two,)
    assert await unbilled(client, tenant, "s") is not None
    second = await sessions.append(tenant, "s", None, turns(6, 1), {}, turn_id="second")
    assert second.unbilled == (one,)
    # A later append came: the first's reply was seen (no retry comes this
    # late), and its retry reports nothing.
    late = await sessions.append(tenant, "s", None, turns(4, 2), {}, turn_id="first")
    assert late.replayed and late.unbilled == ()
    third = await sessions.append(tenant, "s", None, turns(7, 1), {}, turn_id="third")
    assert third.unbilled == ()
    again = await sessions.append(tenant, "s", None, turns(7, 1), {}, turn_id="third")
    assert again.replayed and again.unbilled == ()


async def test_a_refused_append_takes_nothing(client, tenant) -> None:
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 4), {})
    await summarizer_of(client, CountingModel()).summarize_due(tenant, "s")
    with pytest.raises(MeshgateError) as refused:
        await sessions.append(tenant, "s", 0, turns(4, 1), {}, turn_id="stale")
    assert refused.value.reason == Reason.VERSION_CONFLICT
    taken = await sessions.append(tenant, "s", None, turns(4, 1), {}, turn_id="next")
    assert taken.unbilled == (SummarySpend("counting", 2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS, 2),)


async def test_extractive_summaries_cost_nothing_but_a_models_answer_not_kept_does(client, tenant) -> None:
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "extractive")
    await sessions.append(tenant, "extractive", None, turns(0, 4), {})
    await summarizer_of(client, None).summarize_due(tenant, "extractive")
    assert len(await SummaryStore(client, 0).all_of(tenant, "extractive")) == 2
    assert (await sessions.append(tenant, "extractive", None, turns(4, 1), {})).unbilled == ()

    # An answer longer than its span is not kept (extractive instead), but
    # the model spent its tokens on the session all the same.
    await sessions.create(tenant, "runaway")
    # Other turns than the first session's: its summaries would be reused.
    await sessions.append(tenant, "runaway", None, turns(0, 2, tag="Runaway "), {})
    await summarizer_of(client, CountingModel("x " * 500)).summarize_due(tenant, "runaway")
    (summary,) = await SummaryStore(client, 0).all_of(tenant, "runaway")
    assert summary.method == "extractive"
    taken = await sessions.append(tenant, "runaway", None, turns(2, 1), {})
    assert taken.unbilled == (SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1),)


async def test_a_fork_leaves_the_sources_unbilled_usage_with_the_source(client, tenant) -> None:
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "source")
    version = (await sessions.append(tenant, "source", None, turns(0, 4), {})).version
    await summarizer_of(client, CountingModel()).summarize_due(tenant, "source")
    await sessions.fork(tenant, "source", version, "fork")
    assert (await sessions.append(tenant, "fork", None, turns(4, 1), {})).unbilled == ()
    assert len((await sessions.append(tenant, "source", None, turns(4, 1), {})).unbilled) == 1


async def test_a_models_summary_refused_for_a_revert_below_its_span_is_still_counted(client, tenant) -> None:
    """The model spent its tokens on the session before the revert undid the
    span's turns: the summary is not kept (summaries._PUT), its usage is."""
    sessions = session_store.SessionStore(client, 600)
    model = GatedModel()
    await sessions.create(tenant, "reverted")
    await sessions.append(tenant, "reverted", None, turns(0, 2), {})
    run = asyncio.ensure_future(summarizer_of(client, model).summarize_due(tenant, "reverted"))
    await asyncio.wait_for(model.entered.wait(), 10)
    await sessions.revert(tenant, "reverted", 0, None)
    model.gate.set()
    await asyncio.wait_for(run, 10)
    assert await SummaryStore(client, 0).all_of(tenant, "reverted") == []
    taken = await sessions.append(tenant, "reverted", None, turns(0, 1, tag="Again "), {})
    assert taken.unbilled == (SummarySpend(GatedModel.model, 40, 10, 1),)


async def test_a_take_and_an_append_each_take_what_the_other_did_not_once(client, tenant) -> None:
    sessions = session_store.SessionStore(client, 600)
    model = CountingModel()
    summarizer = summarizer_of(client, model)
    one = SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 2), {}, turn_id="first")
    await summarizer.summarize_due(tenant, "s")
    # No append came: the take has it, and again finds nothing.
    assert await sessions.take_unbilled(tenant, "s") == (one,)
    assert await sessions.take_unbilled(tenant, "s") == ()
    assert (await sessions.append(tenant, "s", None, turns(2, 2), {}, turn_id="second")).unbilled == ()
    await summarizer.summarize_due(tenant, "s")
    # An append came first: it has it, the take nothing; the append's
    # retry (its reply lost) still reports what it took, once.
    assert (await sessions.append(tenant, "s", None, turns(4, 1), {}, turn_id="third")).unbilled == (one,)
    assert await sessions.take_unbilled(tenant, "s") == ()
    assert (await sessions.append(tenant, "s", None, turns(4, 1), {}, turn_id="third")).unbilled == (one,)
    with pytest.raises(MeshgateError) as gone:
        await sessions.take_unbilled(tenant, "absent")
    assert gone.value.reason == Reason.SESSION_NOT_FOUND
