"""The turn journal's logic without Redis (services/router/turn_journal.py;
its scripts against a real Redis: tests/integration/test_turn_journal.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from redis import exceptions as redis_errors

from meshgate.config import TURN_JOURNAL_TTL_S, ConfigError, RouterSettings, settings_from_document
from services.router import ledger
from services.router.admission import Reservation, TurnAdmission
from services.router.ledger import Ledger, UsageRecord, pack, unpack
from services.router.pipeline import Pipeline
from services.router.turn_journal import ROUTER_LOST, TurnJournal
from tests.clocks import Clock
from tests.unit.test_router_pipeline import FakeCache, FakeContexts, FakeGenerator
from tests.unit.test_router_turn_billing import MODELS, PRICES, SettledAdmission, events_of

RECORD = UsageRecord("t", "k", "tiny-gpt", "live", 10, 7, 0, "miss", 0, 5, ROUTER_LOST)


class _Scripts:
    """A Redis client whose scripts count their calls."""

    def __init__(self) -> None:
        self.calls: list[list] = []

    def register_script(self, _body: str):
        async def call(keys, args):
            self.calls.append(args)
            return 1

        return call


def _journal(redis=None, clock=None) -> TurnJournal:
    return TurnJournal(
        redis or _Scripts(), ledger=None, interval_s=1.0, stale_s=15.0, clock=clock or (lambda: 0.0)
    )


def test_a_record_packs_and_unpacks_whole():
    record = UsageRecord("t\x1fenant", "k1", "tiny-gpt", "live", 10, 7, 0, "miss", 90, 5, ROUTER_LOST)
    record = dataclasses.replace(record, day="2026-12-06", turn_id="00ff")
    # The separator inside a value is dropped, not a value shifted.
    assert unpack(pack(record)) == dataclasses.replace(record, tenant="tenant")
    with pytest.raises(ValueError, match="values"):
        unpack("a\x1fb")


def test_settled_turns_marks_outlive_every_snapshot_a_claim_may_read():
    # A claim of a snapshot written just before a turn settled must find
    # the settlement's mark, however late within the journal's life it runs.
    assert ledger.SETTLED_TURN_MARKER_TTL_S > TURN_JOURNAL_TTL_S + 60
    assert ledger.CLAIMED_TURN_MARKER_TTL_S >= ledger.SETTLED_TURN_MARKER_TTL_S


async def test_turns_cost_no_redis_call_a_snapshot_one_call():
    redis = _Scripts()
    journal = _journal(redis)
    for _ in range(1_000):
        journal.track(lambda: RECORD).settled(RECORD)
    assert redis.calls == []
    # Nothing served, nothing ever written: no call.
    await journal.write()
    assert redis.calls == []
    held = [journal.track(lambda: RECORD) for _ in range(300)]
    journal.track(lambda: None)  # delivered nothing: not in the snapshot
    await journal.write()
    [snapshot] = redis.calls
    assert len(snapshot) == 2 + 2 * 300
    # The ids the snapshot named the turns by are what they settle with.
    assert [tracked.turn_id for tracked in held] == snapshot[2::2]
    # Written at once (their ledger calls done): the journal is removed by
    # one write, then no more.
    for tracked in held:
        tracked.settled(RECORD)(True)
    await journal.write()
    await journal.write()
    assert len(redis.calls) == 2 and redis.calls[1] == [journal.journal_id, TURN_JOURNAL_TTL_S]


async def test_a_named_turn_stays_as_settled_until_its_record_is_written():
    """Its settlement's record held (a Redis shard failing over), the turn
    left the journal at once: a router killed then lost it."""
    redis = _Scripts()
    journal = _journal(redis)
    unnamed = journal.track(lambda: RECORD)
    assert unnamed.settled(RECORD) is None  # no snapshot named it: gone at once
    named = journal.track(lambda: RECORD)
    await journal.write()
    final = dataclasses.replace(RECORD, completion_tokens=40, failure="", turn_id=named.turn_id)
    written = named.settled(final)
    await journal.write()
    assert redis.calls[-1][2:] == [named.turn_id, pack(final)]
    written(False)  # given up while the router runs: lost, as counted
    await journal.write()
    assert redis.calls[-1] == [journal.journal_id, TURN_JOURNAL_TTL_S]


async def test_records_given_up_as_the_router_stops_stay_in_its_journal_for_a_claim():
    redis = _Scripts()
    journal = _journal(redis)
    named = journal.track(lambda: RECORD)
    await journal.write()
    written = named.settled(dataclasses.replace(RECORD, turn_id=named.turn_id))
    journal.stop_settling()
    written(False)
    await asyncio.wait_for(journal.close(), 5)
    assert redis.calls[-1][2] == named.turn_id


async def test_one_turns_failing_record_leaves_the_others_in_the_snapshot():
    redis = _Scripts()
    journal = _journal(redis)

    def broken():
        raise RuntimeError("a bug")

    journal.track(broken)
    kept = journal.track(lambda: RECORD)
    await journal.write()
    assert redis.calls[-1][2:] == [kept.turn_id, pack(dataclasses.replace(RECORD, turn_id=kept.turn_id))]


async def test_an_unchanged_record_is_not_packed_again(monkeypatch):
    packed = []
    monkeypatch.setattr("services.router.turn_journal.pack", lambda usage: packed.append(usage) or "x")
    journal = _journal()
    tracked = journal.track(lambda: RECORD)
    for _ in range(3):
        await journal.write()
    # Once, named by its turn id.
    assert packed == [dataclasses.replace(RECORD, turn_id=tracked.turn_id)]


async def test_a_failed_write_is_removed_at_close_as_one_that_ran():
    class _Failing(_Scripts):
        def register_script(self, _body: str):
            call = super().register_script(_body)

            async def failing(keys, args):
                await call(keys, args)
                if len(self.calls) == 1:
                    raise ConnectionError("the reply was lost")
                return 1

            return failing

    redis = _Failing()
    journal = _journal(redis)
    tracked = journal.track(lambda: RECORD)
    with pytest.raises(ConnectionError):
        await journal.write()  # may have run: Redis may hold the turn
    tracked.settled(RECORD)(True)
    await asyncio.wait_for(journal.close(), 5)
    assert redis.calls[-1] == [journal.journal_id, TURN_JOURNAL_TTL_S]


async def test_an_idle_router_does_not_count_redis_reachable_without_calling_it():
    """An idle router's write calls nothing: counted as reaching Redis, it
    started the claim's count during an outage (a review's finding)."""
    journal = _journal()
    assert await journal.write() is False
    journal._interval_s = 0.001
    wrote = asyncio.Event()
    write = journal.write

    async def counted_write() -> bool:
        called = await write()
        wrote.set()
        return called

    journal.write = counted_write
    writing = asyncio.create_task(journal._write_every())
    await asyncio.wait_for(wrote.wait(), 5)
    await asyncio.sleep(0)  # the loop's step after the write
    writing.cancel()
    assert not journal.may_claim() and journal._reachable_since is None


async def test_a_turn_no_snapshot_holds_keeps_no_id():
    """Named though in no snapshot (waiting for its first piece), its record
    set a mark and its settlement was held in the journal for nothing."""
    journal = _journal()
    waiting = journal.track(lambda: None)
    await journal.write()
    assert waiting.turn_id == ""
    assert waiting.settled(RECORD) is None and not journal._live


def test_a_router_claims_only_once_it_reached_redis_for_the_stale_time():
    """After an outage every live router's heartbeat is as old as it was: a
    router claiming as soon as Redis answered again took live routers'
    journals (3 of 6 tries, a review's reproduction), their turns billed as
    lost and their ends not billed."""
    clock = Clock()
    journal = _journal(clock=clock)
    assert not journal.may_claim()
    journal.reached(True)
    clock.now += 14.9
    assert not journal.may_claim()
    clock.now += 0.2
    assert journal.may_claim()
    journal.reached(False)  # an outage
    journal.reached(True)
    assert not journal.may_claim()
    clock.now += 15.1
    assert journal.may_claim()


@pytest.mark.parametrize(
    ("interval_s", "stale_s", "refused"),
    [
        (1.0, 15.0, None),
        (0, 1.0, None),
        (1.0, 1.5, "twice"),
        (1e-9, 1.0, "at least 0.05"),
        (1.0, 7200.0, "at most 200"),
        (1.0, 250.0, "at most 200"),
    ],
)
def test_journal_timings_that_would_claim_live_routers_or_never_claim_are_refused(
    interval_s, stale_s, refused
):
    document = {"router": {"journal_interval_s": interval_s, "journal_stale_s": stale_s}}
    if refused is None:
        settings_from_document(document)
    else:
        with pytest.raises(ConfigError, match=refused):
            settings_from_document(document)


class _HoldingLedger:
    """A ledger whose calls Redis refuses (held: ``holding``), recording
    what each submit would tell once written."""

    def __init__(self, holding: bool) -> None:
        self.holding = holding
        self.records: list[UsageRecord] = []
        self.told: list = []

    def submit(self, usage, logged: bool = True, on_written=None) -> None:
        self.records.append(usage)
        self.told.append(on_written)


@pytest.mark.parametrize("holding", [True, False], ids=["ledger-holding", "ledger-writing"])
async def test_a_turn_ending_while_the_ledger_holds_records_stays_in_the_journal_until_written(holding):
    """A turn ended within an interval of its first piece (no snapshot named
    it) left the journal at once: with the ledger holding what Redis
    refused (a shard failing over), a router killed then lost it. While the
    ledger holds records, such a turn is named at its settlement and kept
    until its record is written; otherwise it leaves at once, unmarked."""
    redis = _Scripts()
    journal = _journal(redis)
    settings = RouterSettings(prices=PRICES)
    ledger = _HoldingLedger(holding)
    stages = TurnAdmission(SettledAdmission(), settings, ledger, journal)

    async def admit(turn):
        return Reservation("lease", 0, 0, (), day="2026-12-06", price=PRICES["m"])

    stages.admit = admit
    turns = Pipeline(settings, MODELS, FakeContexts(), FakeCache(), FakeGenerator(("a ", "b ")), stages)
    await events_of(turns)
    [record] = ledger.records
    if not holding:
        assert record.turn_id == "" and ledger.told == [None] and not journal._live
        return
    assert record.turn_id and list(journal._live)
    await journal.write()
    assert redis.calls[-1][2:] == [record.turn_id, pack(record)]
    ledger.told[0](True)
    assert not journal._live


class _HangingScript:
    """A ledger's Redis: its script refuses the first call (out of memory:
    not run, held), then each call waits for ``answer``."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.calls = 0

    def register_script(self, _body: str):
        async def call(keys, args):
            self.calls += 1
            if self.calls == 1:
                raise redis_errors.OutOfMemoryError("OOM command not allowed")
            await self.answer.wait()
            return 1

        return call


async def test_the_ledger_holds_records_while_a_call_is_held_or_a_write_goes_unanswered(monkeypatch):
    """Ledger.holding, which keeps an ending turn in the journal: true while
    a refused call is held (also during its retry round), and while a write
    has gone unanswered for _SLOW_WRITE_S, before any call failed (a Redis
    that hangs: 21 of 40 turns settled before its first timeout, a review's
    reproduction)."""
    redis = _HangingScript()
    ledger_ = Ledger(redis, 1000, 2)
    told: list[bool] = []
    ledger_.submit(RECORD, on_written=told.append)
    await asyncio.wait_for(_until(lambda: len(ledger_._backlog) == 1), 5)  # refused, held
    assert ledger_.holding and told == []
    await asyncio.wait_for(_until(lambda: redis.calls == 2), 5)  # the retry round's call, waiting
    assert ledger_.holding
    redis.answer.set()
    await asyncio.wait_for(_until(lambda: told == [True]), 5)
    assert not ledger_.holding
    # A write that hangs, nothing failed yet: holding once it is old enough.
    redis.answer.clear()
    ledger_.submit(RECORD, on_written=told.append)
    await asyncio.wait_for(_until(lambda: redis.calls == 3), 5)
    monkeypatch.setattr(ledger, "_SLOW_WRITE_S", 3600.0)
    assert not ledger_.holding
    monkeypatch.setattr(ledger, "_SLOW_WRITE_S", 0.0)
    assert ledger_.holding
    redis.answer.set()
    await asyncio.wait_for(_until(lambda: told == [True, True]), 5)
    assert not ledger_.holding


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
