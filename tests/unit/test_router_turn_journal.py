"""The turn journal's logic without Redis (services/router/turn_journal.py;
its scripts against a real Redis: tests/integration/test_turn_journal.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from meshgate.config import ConfigError, settings_from_document
from services.router import ledger
from services.router.ledger import UsageRecord, pack, unpack
from services.router.turn_journal import JOURNAL_TTL_S, ROUTER_LOST, TurnJournal


class _Scripts:
    """A Redis client whose scripts count their calls."""

    def __init__(self) -> None:
        self.calls: list[list] = []

    def register_script(self, _body: str):
        async def call(keys, args):
            self.calls.append(args)
            return 1

        return call


def test_a_record_packs_and_unpacks_whole():
    record = UsageRecord(
        "t\x1fenant", "k1", "tiny-gpt", "live", 10, 7, 0, "miss", 90, 5, ROUTER_LOST, "2026-12-06"
    )
    record = dataclasses.replace(record, turn_id="00ff")
    # The separator inside a value is dropped, not a value shifted.
    assert unpack(pack(record)) == dataclasses.replace(record, tenant="tenant")
    with pytest.raises(ValueError, match="values"):
        unpack("a\x1fb")


def test_settled_turns_marks_outlive_every_snapshot_a_claim_may_read():
    # A claim of a snapshot written just before a turn settled must find
    # the settlement's mark, however late within the journal's life it runs.
    assert ledger.SETTLED_TURN_MARKER_TTL_S > JOURNAL_TTL_S + 60
    assert ledger.CLAIMED_TURN_MARKER_TTL_S >= ledger.SETTLED_TURN_MARKER_TTL_S


async def test_turns_cost_no_redis_call_a_snapshot_one_per_interval():
    redis = _Scripts()
    journal = TurnJournal(redis, ledger=None, interval_s=1.0, stale_s=15.0)
    record = UsageRecord("t", "k", "tiny-gpt", "live", 10, 7, 0, "miss", 0, 5, ROUTER_LOST)
    for _ in range(1_000):
        journal.track(lambda: record).end()
    assert redis.calls == []
    # Nothing served, nothing ever written: no call.
    await journal.write()
    assert redis.calls == []
    held = [journal.track(lambda: record) for _ in range(300)]
    journal.track(lambda: None)  # delivered nothing: not in the snapshot
    await journal.write()
    [snapshot] = redis.calls
    assert len(snapshot) == 2 + 2 * 300
    # The ids the snapshot named the turns by are what they settle with.
    assert [tracked.end() for tracked in held] == snapshot[2::2]
    # The last turns gone: one write removes the journal, then none.
    await journal.write()
    await journal.write()
    assert len(redis.calls) == 2 and redis.calls[1] == [journal.journal_id, JOURNAL_TTL_S]


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
    journal = TurnJournal(redis, ledger=None, interval_s=1.0, stale_s=15.0)
    record = UsageRecord("t", "k", "tiny-gpt", "live", 10, 7, 0, "miss", 0, 5, ROUTER_LOST)
    tracked = journal.track(lambda: record)
    with pytest.raises(ConnectionError):
        await journal.write()  # may have run: Redis may hold the turn
    tracked.end()
    await asyncio.wait_for(journal.close(), 5)
    assert redis.calls[-1] == [journal.journal_id, JOURNAL_TTL_S]


@pytest.mark.parametrize(
    ("interval_s", "stale_s", "loads"), [(1.0, 15.0, True), (1.0, 1.5, False), (0, 1.0, True)]
)
def test_a_journal_claimed_within_two_writes_is_refused(interval_s, stale_s, loads):
    document = {"router": {"journal_interval_s": interval_s, "journal_stale_s": stale_s}}
    if loads:
        settings_from_document(document)
    else:
        with pytest.raises(ConfigError, match="journal_stale_s"):
            settings_from_document(document)
