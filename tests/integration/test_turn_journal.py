"""The routers' turn journals against a real Redis (services/router/turn_journal.py):
a journal its router stopped writing is claimed and its turns billed, each
turn once whichever of its settlement and a claim writes it first, on one
instance and with the ledger's calls split by slot (a Redis Cluster's).
A journal goes stale here by its heartbeat set back (no test waits for
the stale time: a loaded machine's pauses would claim what a test holds)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import uuid

import pytest

from meshgate import redis_access
from meshgate.local.stack import free_port
from services.router import ledger as ledger_module
from services.router.ledger import (
    CLAIMED_REST,
    CLAIMED_TURN_MARKER_TTL_S,
    SETTLED_TURN_MARKER_TTL_S,
    STREAM,
    Ledger,
    UsageRecord,
    turn_marker,
)
from services.router.script_calls import WRITTEN_MARK_TTL_S, run_scripts
from services.router.turn_journal import BEATS, ROUTER_LOST, TurnJournal, journal_key

pytestmark = pytest.mark.integration

# Never stale by time within a test.
STALE_S = 60.0


def lost(tenant: str, completion_tokens: int) -> UsageRecord:
    """A turn's record were it lost with its router now."""
    return UsageRecord(tenant, "k1", "tiny-gpt", "live", 10, completion_tokens, 0, "miss", 0, 5, ROUTER_LOST)


def final(tenant: str, tracked, completion_tokens: int) -> UsageRecord:
    """A turn's settlement's record, naming its turn id as admission's does."""
    return UsageRecord(
        tenant, "k1", "tiny-gpt", "live", 10, completion_tokens, 0, "miss", 0, 90, turn_id=tracked.turn_id
    )


async def settle(ledger: Ledger, tracked, usage: UsageRecord) -> bool:
    """Settles the turn as admission does: its record submitted, the journal
    told once the ledger wrote it; returns whether it was written."""
    told = asyncio.get_running_loop().create_future()
    on_written = tracked.settled(usage)
    ledger.submit(
        usage, on_written=lambda written: (on_written and on_written(written), told.set_result(written))
    )
    return await asyncio.wait_for(told, 10)


async def totals(ledger: Ledger, tenant: str) -> dict[str, int]:
    today = ledger.today()
    return (await ledger.usage(tenant, today - datetime.timedelta(days=1), today))[("k1", "tiny-gpt")]


async def logged(redis, tenant: str) -> list[tuple[str, str, int, int, int, int]]:
    """The tenant's log entries: cache status, failure, prompt and
    completion tokens, cost and latency."""
    return [
        (
            fields[b"cache_status"].decode(),
            fields[b"failure"].decode(),
            *(
                int(fields[name])
                for name in (b"prompt_tokens", b"completion_tokens", b"cost_nano_usd", b"latency_ms")
            ),
        )
        for _, fields in await redis.xrange(STREAM)
        if fields[b"tenant"] == tenant.encode()
    ]


def marks(ledger: Ledger, tenant: str, turn_id: str) -> list[str]:
    """A turn's marks: its totals' slot's, and on a Cluster the log's."""
    return [
        turn_marker(tenant, turn_id, in_log)
        for in_log in ((False, True) if ledger._split_by_slot else (False,))
    ]


async def gone_stale(redis, journal: TurnJournal) -> None:
    """The journal's heartbeat set back past any stale time: its router died."""
    await redis.zadd(BEATS, {journal.journal_id: 0})


@pytest.fixture
async def redis(redis_url):
    client = redis_access.connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=[False, True], ids=["one-instance", "cluster-slots"])
def ledger(redis, request) -> Ledger:
    return Ledger(redis, stream_max_len=10_000, retention_days=2, split_by_slot=request.param)


def journal(redis, ledger: Ledger) -> TurnJournal:
    return TurnJournal(redis, ledger, interval_s=0.1, stale_s=STALE_S)


async def test_a_lost_routers_turns_are_billed_once_whichever_writes_first(redis, ledger):
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    settled_early = served.track(lambda: lost(tenant, 3))
    claimed = served.track(lambda: lost(tenant, 7))
    stalled = served.track(lambda: lost(tenant, 11))
    # A turn that delivered nothing yet is not in the journal.
    served.track(lambda: None)
    await served.write()
    assert await redis.hlen(journal_key(served.journal_id)) == 3

    # One turn settles after the snapshot that holds it, as its router dies
    # before writing the next: its settlement's record names its turn id.
    assert settled_early.turn_id
    assert await settle(ledger, settled_early, final(tenant, settled_early, 40))

    assert served.journal_id not in await claimer.claim()  # not stale
    await gone_stale(redis, served)
    assert (await claimer.claim())[served.journal_id] == 3
    row = await totals(ledger, tenant)
    # The settled turn once (its settlement's 40 tokens), the two others as
    # the snapshot had them, failed.
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (3, 2, 40 + 7 + 11)
    # Each turn's marks (one a slot written: two on a Cluster), kept as long
    # as a claim of them, or a stalled router's settlement, may come.
    for tracked, ttl_s in ((settled_early, SETTLED_TURN_MARKER_TTL_S), (claimed, CLAIMED_TURN_MARKER_TTL_S)):
        slots = (False, True) if ledger._split_by_slot else (False,)
        for in_log in slots:
            left_s = await redis.ttl(turn_marker(tenant, tracked.turn_id, in_log))
            assert ttl_s - 60 < left_s <= ttl_s, (in_log, left_s)
        if not ledger._split_by_slot:
            assert not await redis.exists(turn_marker(tenant, tracked.turn_id, in_log=True))
    assert not await redis.exists(journal_key(served.journal_id))
    assert await redis.zscore(BEATS, served.journal_id) is None

    # The router was only stalled: it comes back and settles the turns the
    # claim billed. Each bills what it used beyond the claim's snapshot (no
    # request again), and nothing is claimed again.
    for tracked, completion_tokens in ((claimed, 30), (stalled, 50)):
        assert await settle(ledger, tracked, final(tenant, tracked, completion_tokens))
    assert served.journal_id not in await claimer.claim()
    row = await totals(ledger, tenant)
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (3, 2, 40 + 30 + 50)


async def test_a_router_never_claims_its_own_journal(redis, ledger):
    """A router stalled past the stale time, alone (a laptop asleep with a
    stream open), whose claim timer came due before its write timer: it
    billed its own turn lost, and the turn's end not at all."""
    tenant = uuid.uuid4().hex[:12]
    served = journal(redis, ledger)
    tracked = served.track(lambda: lost(tenant, 5))
    await served.write()
    await gone_stale(redis, served)
    assert served.journal_id not in await served.claim()
    assert await settle(ledger, tracked, final(tenant, tracked, 40))
    row = await totals(ledger, tenant)
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (1, 0, 40)


async def test_a_turn_whose_record_the_ledger_holds_stays_in_the_journal_for_a_claim(redis, redis_url):
    """The turn left the journal when its settlement was submitted: with its
    record held (Redis refusing the ledger's call: a shard failing over,
    here a ledger on a port nothing listens on), a router killed then lost
    it, in neither the journal nor the ledger."""
    tenant = uuid.uuid4().hex[:12]
    refused = redis_access.connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    try:
        held = Ledger(refused, stream_max_len=10_000, retention_days=2)
        served = journal(redis, held)
        tracked = served.track(lambda: lost(tenant, 5))
        await served.write()
        told = []
        usage = final(tenant, tracked, 40)
        on_written = tracked.settled(usage)
        held.submit(usage, on_written=lambda written: (on_written(written), told.append(written)))
        await asyncio.sleep(0.3)  # the call refused, held to be sent again
        assert told == []
        await served.write()
        # The router is killed here: another claims its journal.
        await gone_stale(redis, served)
        writer = Ledger(redis, stream_max_len=10_000, retention_days=2)
        assert (await journal(redis, writer).claim())[served.journal_id] == 1
        row = await totals(writer, tenant)
        # Billed as it ended (its settlement's record), not as lost.
        assert (row["requests"], row["failures"], row["completion_tokens"]) == (1, 0, 40)
        await held.drain()
        assert told == [False]
    finally:
        await refused.aclose()


async def test_a_router_that_writes_during_a_claim_keeps_its_journal(redis, ledger):
    """A stalled router whose journal is being claimed, come back before the
    claim ends: the claim bills the turns it read, and leaves the journal
    the router wrote again (its turns still served, settled by it)."""
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    tracked = served.track(lambda: lost(tenant, 5))
    await served.write()
    await gone_stale(redis, served)
    record_claim = ledger.record_claim

    async def router_back_meanwhile(records):
        await served.write()
        await record_claim(records)

    ledger.record_claim = router_back_meanwhile
    assert (await claimer.claim())[served.journal_id] == 1
    ledger.record_claim = record_claim
    assert await redis.hlen(journal_key(served.journal_id)) == 1
    # Its turn ends: billed by the claim already, and out of the journal.
    assert await settle(ledger, tracked, final(tenant, tracked, 60))
    await served.write()
    assert not await redis.exists(journal_key(served.journal_id))
    assert await redis.zscore(BEATS, served.journal_id) is None
    row = await totals(ledger, tenant)
    # Claimed at 5 completion tokens, ended at 60: billed 60, once.
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (1, 1, 60)


async def test_a_claimer_that_dies_midway_leaves_the_journal_to_the_next(redis, ledger):
    tenant = uuid.uuid4().hex[:12]
    served = journal(redis, ledger)
    served.track(lambda: lost(tenant, 5))
    served.track(lambda: lost(tenant, 6))
    await served.write()
    await gone_stale(redis, served)
    record_claim = ledger.record_claim

    async def killed_after_writing(records):
        await record_claim(records[:1])
        raise ConnectionError("the claimer died")

    ledger.record_claim = killed_after_writing
    with pytest.raises(ConnectionError):
        await journal(redis, ledger).claim()
    ledger.record_claim = record_claim
    # Leased to the dead claimer for the stale time, then claimed again.
    assert served.journal_id not in await journal(redis, ledger).claim()
    await gone_stale(redis, served)
    assert (await journal(redis, ledger).claim())[served.journal_id] == 2
    row = await totals(ledger, tenant)
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (2, 2, 11)
    assert not await redis.exists(journal_key(served.journal_id))


async def test_a_stopping_router_removes_its_journal(redis, ledger):
    tenant = uuid.uuid4().hex[:12]
    served = journal(redis, ledger)
    tracked = served.track(lambda: lost(tenant, 5))
    await served.write()
    assert await redis.zscore(BEATS, served.journal_id) is not None
    assert await settle(ledger, tracked, final(tenant, tracked, 40))
    await served.close()
    assert not await redis.exists(journal_key(served.journal_id))
    assert await redis.zscore(BEATS, served.journal_id) is None


async def test_a_claimed_turns_settlement_bills_its_rest_once(redis, ledger):
    """A router stalled past the stale time (SIGSTOP, a VM paused) has its
    journal claimed, each turn billed as the snapshot had it; resumed, its
    turns go on and settle. Their settlements found the claim's mark set
    and wrote nothing: a 256-token answer stayed billed 1 completion token
    (tests/integration/test_router_lost_turns.py). Each now bills the rest
    of what it used, once: no request again, a CLAIMED_REST entry in the
    log; never less than the claim billed (its snapshot's prompt here
    above the settlement's)."""
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    snapshot = dataclasses.replace(lost(tenant, 1), prompt_tokens=12, cost_nano_usd=16, latency_ms=40)
    tracked = served.track(lambda: snapshot)
    await served.write()
    await gone_stale(redis, served)
    assert (await claimer.claim())[served.journal_id] == 1
    # The claim's marks keep what it billed (its AMOUNTS), for the rest.
    for mark in marks(ledger, tenant, tracked.turn_id):
        assert await redis.get(mark) == b"12:1:0:16:40"

    usage = dataclasses.replace(final(tenant, tracked, 256), cost_nano_usd=778, latency_ms=900)
    settlement = ledger._calls([(usage, True)], ledger_module._call_marker, WRITTEN_MARK_TTL_S)
    assert await run_scripts(ledger._script, settlement) == [1] * len(settlement)
    billed = {
        "requests": 1,
        "failures": 1,
        "prompt_tokens": 12,
        "completion_tokens": 256,
        "cost_nano_usd": 778,
        "latency_ms": 900,
    }
    row = await totals(ledger, tenant)
    assert {metric: row[metric] for metric in billed} == billed
    assert await logged(redis, tenant) == [
        ("miss", ROUTER_LOST, 12, 1, 16, 40),
        (CLAIMED_REST, "", 0, 255, 762, 860),
    ]
    # Its marks say it was billed whole now, kept as a settlement's.
    for mark in marks(ledger, tenant, tracked.turn_id):
        assert await redis.get(mark) == b"1"
        assert SETTLED_TURN_MARKER_TTL_S - 60 < await redis.ttl(mark) <= SETTLED_TURN_MARKER_TTL_S

    # Sent again (its reply lost: the same call), or in another call, or
    # claimed again (the journal rewritten with the turn, its router then
    # killed): nothing more.
    assert await run_scripts(ledger._script, settlement) == [0] * len(settlement)
    again = ledger._calls([(usage, True)], ledger_module._call_marker, WRITTEN_MARK_TTL_S)
    assert await run_scripts(ledger._script, again) == [1] * len(again)
    await ledger.record_claim([dataclasses.replace(snapshot, turn_id=tracked.turn_id)])
    assert await totals(ledger, tenant) == row
    assert len(await logged(redis, tenant)) == 2


async def test_a_turn_claimed_again_further_on_bills_what_it_went_on_to_use(redis, ledger):
    """Its router stalled, came back, served the turn on, and stalled again:
    the second claim bills what the turn used beyond the first's, a claimer
    of the same snapshot after it nothing, and the settlement the rest."""
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    progress = [lost(tenant, 5)]
    tracked = served.track(lambda: progress[0])
    for completion_tokens in (5, 20):
        progress[0] = lost(tenant, completion_tokens)
        await served.write()
        await gone_stale(redis, served)
        assert (await claimer.claim())[served.journal_id] == 1
    await ledger.record_claim([dataclasses.replace(progress[0], turn_id=tracked.turn_id)])
    for mark in marks(ledger, tenant, tracked.turn_id):
        assert await redis.get(mark) == b"10:20:0:0:5"
    assert await settle(ledger, tracked, final(tenant, tracked, 40))
    row = await totals(ledger, tenant)
    assert (row["requests"], row["failures"], row["completion_tokens"], row["latency_ms"]) == (1, 1, 40, 90)
    assert await logged(redis, tenant) == [
        ("miss", ROUTER_LOST, 10, 5, 0, 5),
        (CLAIMED_REST, ROUTER_LOST, 0, 15, 0, 0),
        (CLAIMED_REST, "", 0, 20, 0, 85),
    ]


async def test_a_claim_that_finds_only_time_passed_writes_nothing_and_the_settlement_logs_the_end(
    redis, ledger
):
    """A turn claimed, then claimed again at a later snapshot with the same
    tokens and only a longer latency (latency always grows): the second
    claim writes nothing. Its settlement, with nothing more to bill either,
    still logs how the turn ended (the claim's entry says router_lost), with
    no tokens and the rest of its latency."""
    tenant = uuid.uuid4().hex[:12]
    served, claimer = journal(redis, ledger), journal(redis, ledger)
    progress = [lost(tenant, 7)]
    tracked = served.track(lambda: progress[0])
    for latency_ms in (5, 50):
        progress[0] = dataclasses.replace(lost(tenant, 7), latency_ms=latency_ms)
        await served.write()
        await gone_stale(redis, served)
        assert (await claimer.claim())[served.journal_id] == 1
    assert await logged(redis, tenant) == [("miss", ROUTER_LOST, 10, 7, 0, 5)]
    row = await totals(ledger, tenant)
    assert await settle(ledger, tracked, final(tenant, tracked, 7))
    assert await logged(redis, tenant) == [
        ("miss", ROUTER_LOST, 10, 7, 0, 5),
        (CLAIMED_REST, "", 0, 0, 0, 85),
    ]
    assert await totals(ledger, tenant) == {**row, "latency_ms": row["latency_ms"] + 85}
    for mark in marks(ledger, tenant, tracked.turn_id):
        assert await redis.get(mark) == b"1"


@pytest.mark.parametrize("settlement_first", [True, False], ids=["settlement-first", "claim-first"])
async def test_a_settlement_and_a_claim_racing_over_two_slots_bill_the_turn_once_in_each(
    redis, settlement_first
):
    """On a Redis Cluster a record's log entry and its totals are separate
    calls, each with its own mark: a settlement's and a claim's calls of one
    turn may interleave. The log and the totals each bill the turn once, in
    full (the settlement's numbers), whichever call of each came first."""
    ledger = Ledger(redis, stream_max_len=10_000, retention_days=2, split_by_slot=True)
    tenant = uuid.uuid4().hex[:12]
    tracked = journal(redis, ledger).track(lambda: lost(tenant, 5))
    tracked.name()
    settlement = ledger._calls(
        [(final(tenant, tracked, 40), True)], ledger_module._call_marker, WRITTEN_MARK_TTL_S
    )
    claim = ledger._calls(
        [(dataclasses.replace(lost(tenant, 5), turn_id=tracked.turn_id), True)],
        ledger_module._call_marker,
        WRITTEN_MARK_TTL_S,
        CLAIMED_TURN_MARKER_TTL_S,
        claim=True,
    )
    # [the log's call, the totals' call]: one of the first's lands, then
    # both of the other's, then the first's other.
    first, second = (settlement, claim) if settlement_first else (claim, settlement)
    for calls in ([first[0]], second, [first[1]]):
        assert await run_scripts(ledger._script, calls) == [1] * len(calls)
    row = await totals(ledger, tenant)
    # Counted failed where the claim's totals came first: how they found it.
    failures = 1 if settlement_first else 0
    assert (row["requests"], row["failures"], row["completion_tokens"]) == (1, failures, 40)
    entries = await logged(redis, tenant)
    assert sum(completion_tokens for _, _, _, completion_tokens, _, _ in entries) == 40
    if settlement_first:
        assert entries == [("miss", "", 10, 40, 0, 90)]
    else:
        assert entries == [("miss", ROUTER_LOST, 10, 5, 0, 5), (CLAIMED_REST, "", 0, 35, 0, 85)]


async def test_a_journal_key_of_another_type_holds_up_no_other_journals_claim(redis, ledger):
    """One stale journal whose key holds another type (an operator's or
    another program's write) failed the claim script after the journals
    before it were marked and before any reply: no lost router's turns were
    billed while it stood, and theirs expired unbilled (a review)."""
    tenant = uuid.uuid4().hex[:12]
    broken, served, claimer = journal(redis, ledger), journal(redis, ledger), journal(redis, ledger)
    broken.track(lambda: lost(uuid.uuid4().hex[:12], 3))
    served.track(lambda: lost(tenant, 7))
    await broken.write()
    await served.write()
    await redis.delete(journal_key(broken.journal_id))
    await redis.set(journal_key(broken.journal_id), "not a hash")
    # The broken one first, as ZRANGEBYSCORE reads them.
    await redis.zadd(BEATS, {broken.journal_id: 0, served.journal_id: 1})
    try:
        claimed = await claimer.claim()
        assert claimed == {served.journal_id: 1}
        row = await totals(ledger, tenant)
        assert (row["requests"], row["failures"], row["completion_tokens"]) == (1, 1, 7)
        assert not await redis.exists(journal_key(served.journal_id))
        # Left as it is, its heartbeat moved: no claim's place until stale again.
        assert await redis.get(journal_key(broken.journal_id)) == b"not a hash"
        assert await redis.zscore(BEATS, broken.journal_id) > 0
    finally:
        await redis.delete(journal_key(broken.journal_id))
        await redis.zrem(BEATS, broken.journal_id)
