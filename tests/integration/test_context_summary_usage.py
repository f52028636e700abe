"""What a session's summaries spend on a model, over a real Redis: counted
in the session's usage record, in the script that writes the summary (once
per summary, not at all for one made without a model, but also for one a
revert refused or whose session was deleted meanwhile), the session listed
owing first; taken by a take alone (no append takes it), once, a take sent
again with its take id answering the same; and named by a claim of the
sessions owing (the store's owed set) until a take has taken it, also once
the session is deleted or expired."""

from __future__ import annotations

import asyncio
import json
import urllib.parse

import pytest
import redis.asyncio as redis

from meshgate.config import summary_usage_ttl_s
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
    return await client.hget(session_store.unbilled_key(tenant, session_id), "unbilled")


async def listed(client: redis.Redis, tenant: str, session_id: str) -> float | None:
    """The session's score in the owed set; None when it is not listed."""
    return await client.zscore(
        session_store.OWED_KEY, json.dumps([tenant, session_id], separators=(",", ":"))
    )


def mine(owed: list[session_store.Owed], tenant: str) -> list[session_store.Owed]:
    """A claim's sessions of ``tenant``: the owed set holds every test's."""
    return [session for session in owed if session.tenant_id == tenant]


def summarizer_of(client: redis.Redis, model) -> summaries_lib.Summarizer:
    policy = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=0)
    sessions = session_store.SessionStore(client, 600)
    return summaries_lib.Summarizer(sessions, SummaryStore(client, 600), policy, model)


def turns(first: int, count: int, tag: str = "") -> list:
    return [
        msg(role_of(i), f"{tag}Turn {i} names the harbour at Lisbon.") for i in range(first, first + count)
    ]


async def test_a_models_summaries_are_counted_with_them_once_and_taken_once(client, tenant) -> None:
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
    assert summary.summary_id == summaries_lib.summary_id(0, 2, digest)
    assert await stored.put(tenant, "s", digest, summary, created_ms, spent)
    # Nor one whose write is refused (its session is another life of the id).
    assert not await stored.put(tenant, "s", digest, summary, created_ms + 1, spent)

    # An append takes nothing: the usage waits for a take.
    first = await sessions.append(tenant, "s", None, turns(4, 2), {}, turn_id="first")
    assert not first.replayed
    assert await unbilled(client, tenant, "s") is not None
    assert await sessions.take_unbilled(tenant, "s", "a") == (two,)
    assert await unbilled(client, tenant, "s") is None
    # Spent since: the next take's.
    await summarizer.summarize_due(tenant, "s")
    assert model.calls == 3
    one = SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    # The take's reply was lost: sent again with its take id, it answers
    # what it took, and takes nothing more.
    assert await sessions.take_unbilled(tenant, "s", "a") == (two,)
    assert await unbilled(client, tenant, "s") is not None
    assert await sessions.take_unbilled(tenant, "s", "b") == (one,)
    assert await sessions.take_unbilled(tenant, "s", "b") == (one,)
    # Another take came between: the session keeps the latest take's answer
    # alone, and "a" is a take of what is left now (nothing).
    assert await sessions.take_unbilled(tenant, "s", "a") == ()
    assert await sessions.take_unbilled(tenant, "s", "b") == ()
    with pytest.raises(MeshgateError) as gone:
        await sessions.take_unbilled(tenant, "absent", "a")
    assert gone.value.reason == Reason.SESSION_NOT_FOUND


async def test_extractive_summaries_cost_nothing_but_a_models_answer_not_kept_does(client, tenant) -> None:
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "extractive")
    await sessions.append(tenant, "extractive", None, turns(0, 4), {})
    await summarizer_of(client, None).summarize_due(tenant, "extractive")
    assert len(await SummaryStore(client, 0).all_of(tenant, "extractive")) == 2
    assert await sessions.take_unbilled(tenant, "extractive") == ()
    assert await listed(client, tenant, "extractive") is None

    # An answer longer than its span is not kept (extractive instead), but
    # the model spent its tokens on the session all the same.
    await sessions.create(tenant, "runaway")
    # Other turns than the first session's: its summaries would be reused.
    await sessions.append(tenant, "runaway", None, turns(0, 2, tag="Runaway "), {})
    await summarizer_of(client, CountingModel("x " * 500)).summarize_due(tenant, "runaway")
    (summary,) = await SummaryStore(client, 0).all_of(tenant, "runaway")
    assert summary.method == "extractive"
    taken = await sessions.take_unbilled(tenant, "runaway")
    assert taken == (SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1),)


async def test_a_fork_leaves_the_sources_unbilled_usage_with_the_source(client, tenant) -> None:
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "source")
    version = (await sessions.append(tenant, "source", None, turns(0, 4), {})).version
    await summarizer_of(client, CountingModel()).summarize_due(tenant, "source")
    await sessions.fork(tenant, "source", version, "fork")
    assert await sessions.take_unbilled(tenant, "fork") == ()
    assert len(await sessions.take_unbilled(tenant, "source")) == 1


@pytest.mark.parametrize("meanwhile", ["reverted", "deleted"])
async def test_a_models_summary_not_kept_is_still_counted(client, tenant, meanwhile) -> None:
    """The model spent its tokens on the tenant's session before a revert
    undid the span's turns, or before the session was deleted: the summary
    is not kept (summaries._PUT), its usage is (a deleted session's too:
    its usage record outlives it)."""
    sessions = session_store.SessionStore(client, 600)
    model = GatedModel()
    await sessions.create(tenant, meanwhile)
    await sessions.append(tenant, meanwhile, None, turns(0, 2), {})
    run = asyncio.ensure_future(summarizer_of(client, model).summarize_due(tenant, meanwhile))
    await asyncio.wait_for(model.entered.wait(), 10)
    if meanwhile == "reverted":
        await sessions.revert(tenant, meanwhile, 0, None)
    else:
        await sessions.delete(tenant, meanwhile)
    model.gate.set()
    await asyncio.wait_for(run, 10)
    assert await SummaryStore(client, 0).all_of(tenant, meanwhile) == []
    if meanwhile == "deleted":
        assert mine(await sessions.owed.claim(0, 1000), tenant) == [session_store.Owed(tenant, meanwhile, "")]
    assert await sessions.take_unbilled(tenant, meanwhile) == (SummarySpend(GatedModel.model, 40, 10, 1),)


async def test_a_claim_names_a_session_owing_with_its_latest_key_until_a_take_takes_it(
    client, tenant
) -> None:
    sessions = session_store.SessionStore(client, 600)
    owed = sessions.owed
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 2), {}, key_id="a" * 16)
    await sessions.append(tenant, "s", None, turns(2, 2), {}, key_id="b" * 16)
    # Nothing owed yet: not listed.
    assert await listed(client, tenant, "s") is None
    await summarizer_of(client, CountingModel()).summarize_due(tenant, "s")
    assert await listed(client, tenant, "s") is not None

    # Not owing for a minute yet: not named.
    assert mine(await owed.claim(60_000, 1000), tenant) == []
    claimed = mine(await owed.claim(0, 1000), tenant)
    assert claimed == [session_store.Owed(tenant, "s", "b" * 16)]
    # Claimed for as long as it had to owe: no other claim of that names it.
    assert mine(await owed.claim(60_000, 1000), tenant) == []
    # Not taken yet (the claimer stopped, say): a later claim names it again.
    assert mine(await owed.claim(0, 1000), tenant) == claimed
    assert len(await sessions.take_unbilled(tenant, "s", "t")) == 1
    # Taken: the next claim finds it owing nothing, and drops it.
    assert mine(await owed.claim(0, 1000), tenant) == []
    assert await listed(client, tenant, "s") is None


async def test_a_claim_keeps_a_session_a_summary_marked_while_it_looked(client, tenant) -> None:
    """A summary's writer marks the session, then adds to its unbilled: a
    claim that read no unbilled in between must not drop the session."""
    sessions = session_store.SessionStore(client, 600)
    owed = sessions.owed
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 2), {})
    await owed.mark(tenant, "s")  # a writer's mark, its write still to come
    drop = owed._drop

    async def writer_lands_first(keys, args):
        # The writer marks again and writes after the claim read the session.
        await SummaryStore(client, 600).put(
            tenant,
            "s",
            "d",
            summaries_lib.Summary("x", 0, 2, 1, 1, "model:counting", "Lisbon."),
            (await sessions.read(tenant, "s")).create_time_ms,
            ModelSpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS),
        )
        return await drop(keys=keys, args=args)

    owed._drop = writer_lands_first
    assert mine(await owed.claim(0, 1000), tenant) == []
    assert await listed(client, tenant, "s") is not None
    owed._drop = drop
    assert mine(await owed.claim(0, 1000), tenant) == [session_store.Owed(tenant, "s", "")]


async def test_an_append_lists_a_session_holding_usage_nothing_listed(client, tenant) -> None:
    """Usage a replica of a version before the owed set counted (it marked
    nothing): the session's next append lists it, keeping the score of one
    listed already."""
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "s")
    await client.hset(session_store.session_key(tenant, "s"), "unbilled", '{"counting": [50, 7, 1]}')
    await sessions.append(tenant, "s", None, turns(0, 1), {})
    first_ms = await listed(client, tenant, "s")
    assert first_ms is not None
    await asyncio.sleep(0.01)
    await sessions.append(tenant, "s", None, turns(1, 1), {})
    assert await listed(client, tenant, "s") == first_ms
    assert mine(await sessions.owed.claim(0, 1000), tenant) == [session_store.Owed(tenant, "s", "")]


async def test_a_claim_names_owing_sessions_in_place_of_those_found_owing_nothing(redis_url, tenant) -> None:
    """Each session a take has taken is found owing nothing at the claim
    after: those must not fill a claim's page and hide the owing ones."""
    # A database of its own: no other test's sessions in its owed set.
    client = redis.Redis.from_url(urllib.parse.urlsplit(redis_url)._replace(path="/15").geturl())
    try:
        await client.flushdb()
        sessions = session_store.SessionStore(client, 600)
        # Listed in this order, a millisecond apart: the claim reads the taken first.
        for session_id in ("taken-1", "taken-2", "owing"):
            await sessions.create(tenant, session_id)
            await sessions.owed.mark(tenant, session_id)
            await asyncio.sleep(0.002)
            await client.hset(session_store.session_key(tenant, session_id), "unbilled", '{"m": [5, 1, 1]}')
        for session_id in ("taken-1", "taken-2"):
            assert len(await sessions.take_unbilled(tenant, session_id)) == 1
        assert await sessions.owed.claim(0, 1) == [session_store.Owed(tenant, "owing", "")]
        for session_id in ("taken-1", "taken-2"):
            assert await listed(client, tenant, session_id) is None
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.mark.parametrize("gone", ["deleted", "expired"])
async def test_a_sessions_usage_outlives_its_deletion_or_expiry_until_taken(client, tenant, gone) -> None:
    """The session is gone before any sweep: its usage record is none of
    its keys, so a claim still names it, under the key of its latest turn,
    and a take takes it, once."""
    sessions = session_store.SessionStore(client, 1 if gone == "expired" else 600)
    policy = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=0)
    summarizer = summaries_lib.Summarizer(sessions, SummaryStore(client, 1), policy, CountingModel())
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 2), {}, key_id="k" * 16)
    await summarizer.summarize_due(tenant, "s")
    if gone == "deleted":
        await sessions.delete(tenant, "s")
    else:
        await asyncio.sleep(2.1)
    assert not await client.exists(*session_store.session_keys(tenant, "s"))
    # Bounded all the same: it expires on its own after the session could have.
    ttl_s = await client.ttl(session_store.unbilled_key(tenant, "s"))
    assert 0 < ttl_s <= summary_usage_ttl_s(1)

    assert mine(await sessions.owed.claim(0, 1000), tenant) == [session_store.Owed(tenant, "s", "k" * 16)]
    one = SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    assert await sessions.take_unbilled(tenant, "s", "t") == (one,)
    # The reply was lost: sent again, it answers the same, and takes nothing more.
    assert await sessions.take_unbilled(tenant, "s", "t") == (one,)
    assert await sessions.take_unbilled(tenant, "s", "u") == ()
    assert mine(await sessions.owed.claim(0, 1000), tenant) == []
    assert await listed(client, tenant, "s") is None


async def test_a_take_takes_usage_an_older_version_kept_in_meta_with_the_records(client, tenant) -> None:
    """During an upgrade, a replica of a version that kept the usage in
    meta writes it there: a take takes both, as one answer."""
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 2), {})
    await summarizer_of(client, CountingModel()).summarize_due(tenant, "s")
    older = '{"counting": [1, 2, 1], "older": [3, 4, 1]}'
    await client.hset(session_store.session_key(tenant, "s"), "unbilled", older)
    taken = await sessions.take_unbilled(tenant, "s", "t")
    assert taken == (
        SummarySpend("counting", PROMPT_TOKENS + 1, COMPLETION_TOKENS + 2, 2),
        SummarySpend("older", 3, 4, 1),
    )
    assert await sessions.take_unbilled(tenant, "s", "t") == taken
    assert await sessions.take_unbilled(tenant, "s") == ()


async def test_a_held_take_is_answered_to_every_held_take_until_acknowledged(client, tenant) -> None:
    """A router's take holds what it took (TakeSummaryUsage's
    hold_until_acknowledged): its taker may die before billing it, so every
    held take answers it, under its own take id, taking nothing more, and
    the session stays owing, until the take is acknowledged. A take that is
    not held (a router before the hold) neither sees nor ends it."""
    sessions = session_store.SessionStore(client, 600)
    await sessions.create(tenant, "s")
    await sessions.append(tenant, "s", None, turns(0, 2), {}, key_id="k" * 16)
    await summarizer_of(client, CountingModel()).summarize_due(tenant, "s")
    one = SummarySpend("counting", PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    assert await sessions.take_held(tenant, "s", "first") == ("first", (one,))
    # Its taker died: a later claim names the session, and another router's take gets the same take.
    owed = session_store.Owed(tenant, "s", "k" * 16)
    assert mine(await sessions.owed.claim(0, 1000), tenant) == [owed]
    assert await sessions.take_held(tenant, "s", "second") == ("first", (one,))
    assert await sessions.take_unbilled(tenant, "s", "older") == ()
    # Acknowledging another take changes nothing.
    await sessions.acknowledge_take(tenant, "s", "second")
    assert await sessions.take_held(tenant, "s", "third") == ("first", (one,))
    await sessions.acknowledge_take(tenant, "s", "first")
    # A retry of the acknowledged take (its reply lost) answers it again; a new take takes anew.
    assert await sessions.take_held(tenant, "s", "first") == ("first", (one,))
    assert await sessions.take_held(tenant, "s", "fourth") == ("fourth", ())
    assert mine(await sessions.owed.claim(0, 1000), tenant) == []
    assert await listed(client, tenant, "s") is None
