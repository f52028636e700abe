"""The single-flight helper (meshgate/single_flight.py): who shares a run of
the work, who may end it, and what each caller gets when it fails. Its
users' own tests (tests/unit/test_router_key_store.py,
tests/unit/test_inference_shared_embeddings.py) cover what they build on it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.single_flight import SingleFlight
from tests.unit.test_streaming import until


class GatedWork:
    """Work that waits for ``gate``, then returns ``value`` or raises ``failure``;
    counts how often it was started, and how often cancelled."""

    def __init__(self, value: object = "value", failure: BaseException | None = None) -> None:
        self.value = value
        self.failure = failure
        self.gate = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.finished = 0

    async def run(self) -> object:
        self.started += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.failure is not None:
            raise self.failure
        return self.value


async def settle() -> None:
    """Enough loop turns for a caller's task to join and the work's task to reach its gate."""
    for _ in range(4):
        await asyncio.sleep(0)


def boom() -> MeshgateError:
    return MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE, "down", {"k": "v"})


@pytest.mark.parametrize("cancel_when_abandoned", [True, False])
async def test_callers_asking_at_once_share_one_run_and_its_value(cancel_when_abandoned):
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=cancel_when_abandoned)
    work = GatedWork()
    callers = [asyncio.create_task(flights.join("k", work.run)) for _ in range(5)]
    await settle()
    work.gate.set()
    assert await asyncio.gather(*callers) == ["value"] * 5
    assert work.started == 1
    assert flights.flight("k") is None


@pytest.mark.parametrize("cancel_when_abandoned", [True, False])
async def test_a_caller_that_leaves_ends_neither_the_work_nor_the_others_wait(cancel_when_abandoned):
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=cancel_when_abandoned)
    work = GatedWork()
    leaving = asyncio.create_task(flights.join("k", work.run))
    staying = asyncio.create_task(flights.join("k", work.run))
    await settle()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    work.gate.set()
    assert await staying == "value"
    assert (work.started, work.cancelled) == (1, 0)


async def test_work_abandoned_by_its_last_caller_is_cancelled_when_asked_and_the_next_starts_afresh():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=True)
    work = GatedWork()
    callers = [asyncio.create_task(flights.join("k", work.run)) for _ in range(2)]
    await settle()
    task = flights.flight("k").task
    for caller in callers:
        caller.cancel()
    await asyncio.sleep(0)  # the callers' turns: they leave, and the run is told to stop
    # Out of flight at once, while the run is still ending: the next caller
    # never joins the cancelled run.
    assert not task.done()
    assert flights.flight("k") is None
    await asyncio.gather(*callers, return_exceptions=True)
    await until(lambda: work.cancelled == 1)
    work.gate.set()
    assert await flights.join("k", work.run) == "value"
    assert work.started == 2


@pytest.mark.parametrize("failure", [None, boom()])
async def test_a_finished_run_answers_later_callers_when_kept_and_a_cancelled_one_does_not(failure):
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=True, keep_finished=True)
    work = GatedWork(failure=failure)
    work.gate.set()
    for _ in range(2):
        caller = asyncio.create_task(flights.join("k", work.run))
        if failure is None:
            assert await caller == "value"
        else:
            with pytest.raises(MeshgateError) as raised:
                await caller
            assert raised.value is not failure and raised.value.reason == failure.reason
    assert work.started == 1
    # Abandoned, the run is cancelled: the next caller starts afresh.
    abandoned = GatedWork()
    caller = asyncio.create_task(flights.join("a", abandoned.run))
    await settle()
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    await until(lambda: abandoned.cancelled == 1)
    abandoned.gate.set()
    assert await flights.join("a", abandoned.run) == "value"
    assert abandoned.started == 2


async def test_work_abandoned_by_its_last_caller_runs_to_its_end_when_not_asked_to_cancel():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=False)
    work = GatedWork()
    caller = asyncio.create_task(flights.join("k", work.run))
    await settle()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # Still in flight: a caller coming now joins it.
    joiner = asyncio.create_task(flights.join("k", work.run))
    await settle()
    work.gate.set()
    assert await joiner == "value"
    assert (work.started, work.cancelled, work.finished) == (1, 0, 1)


async def test_work_nobody_waits_for_any_more_finishes_and_its_failure_is_retrieved():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=False)
    work = GatedWork(failure=boom())
    caller = asyncio.create_task(flights.join("k", work.run))
    await settle()
    task = flights.flight("k").task
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    work.gate.set()
    await asyncio.wait([task])
    await settle()
    assert work.finished == 1 and flights.flight("k") is None
    # Retrieved by the helper: asyncio would otherwise log "Task exception was never retrieved".
    assert task._log_traceback is False


@pytest.mark.parametrize("cancel_when_abandoned", [True, False])
async def test_work_started_with_nobody_waiting_runs_and_cancel_all_ends_every_run(cancel_when_abandoned):
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=cancel_when_abandoned)
    ahead, forgotten = GatedWork(), GatedWork()
    flights.start(("ahead",), ahead.run())
    flights.start(("old",), forgotten.run())
    flights.forget("old")
    await settle()
    # No waiter ever left the work started ahead, so it runs on.
    assert flights.flight("ahead") is not None and ahead.cancelled == 0
    await asyncio.wait_for(flights.cancel_all(), 5)
    assert (ahead.cancelled, forgotten.cancelled) == (1, 1)
    assert flights.flight("ahead") is None and flights._running == set()


async def test_each_caller_gets_its_own_copy_of_a_failure_and_the_next_caller_starts_afresh():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=True)
    failure = boom()
    work = GatedWork(failure=failure)
    callers = [asyncio.create_task(flights.join("k", work.run)) for _ in range(3)]
    await settle()
    work.gate.set()
    errors = await asyncio.gather(*callers, return_exceptions=True)
    for error in errors:
        assert isinstance(error, MeshgateError)
        assert error.to_status_proto() == failure.to_status_proto()
        assert error.__cause__ is failure
    assert len({id(error) for error in errors} | {id(failure)}) == 4
    work.failure = None
    assert await flights.join("k", work.run) == "value"
    assert work.started == 2


async def test_a_bug_is_logged_once_and_each_caller_gets_its_own_internal_error():
    flights: SingleFlight[str, object] = SingleFlight("test work", cancel_when_abandoned=True)
    work = GatedWork(failure=IndexError("list index out of range"))
    with structlog.testing.capture_logs() as logs:
        callers = [asyncio.create_task(flights.join("k", work.run)) for _ in range(3)]
        await settle()
        work.gate.set()
        errors = await asyncio.gather(*callers, return_exceptions=True)
        await settle()
    for error in errors:
        assert isinstance(error, MeshgateError)
        assert (error.code, error.reason, error.message) == (
            grpc.StatusCode.INTERNAL,
            Reason.INTERNAL,
            "internal error",
        )
    assert len({id(error) for error in errors}) == 3
    failures = [entry for entry in logs if entry["event"] == "shared work failed"]
    assert len(failures) == 1 and failures[0]["work"] == "test work"
    assert isinstance(failures[0]["exc_info"], IndexError)


async def test_a_run_that_ended_is_never_joined_even_in_the_turn_it_ends():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=False)
    work = GatedWork(failure=boom())
    run = flights.start(("k",), work.run())
    await settle()
    work.gate.set()
    await asyncio.sleep(0)  # the run's turn: it fails; what runs when a task ends has not yet
    assert run.task.done()
    # A caller now starts afresh instead of sharing the failure.
    assert flights.flight("k") is None
    work.failure = None
    assert await flights.join("k", work.run) == "value"
    assert work.started == 2


async def test_forgotten_work_answers_only_those_who_asked_before_and_knows_it_was_forgotten():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=False)
    currency: list[bool] = []

    async def read(value: str, gate: asyncio.Event) -> str:
        await gate.wait()
        currency.append(flights.is_current("k"))
        return value

    old_gate, new_gate = asyncio.Event(), asyncio.Event()
    before = asyncio.create_task(flights.join("k", lambda: read("old", old_gate)))
    await settle()
    flights.forget("k")
    after = asyncio.create_task(flights.join("k", lambda: read("new", new_gate)))
    await settle()
    old_gate.set()
    assert await before == "old"
    # The forgotten run ending does not drop the run that replaced it.
    assert flights.flight("k") is not None
    new_gate.set()
    assert await after == "new"
    assert currency == [False, True]


async def test_one_run_answers_several_keys_and_a_caller_of_several_runs_waits_for_all():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=True)
    first, second = GatedWork("one"), GatedWork("two")
    both = flights.start(("a", "b"), first.run())
    other = flights.start(("c",), second.run())
    assert flights.flight("a") is both and flights.flight("b") is both
    waiting = asyncio.create_task(flights.wait([both, other]))
    await settle()
    first.gate.set()
    await settle()
    assert not waiting.done()
    second.gate.set()
    assert await waiting == ["one", "two"]
    assert all(flights.flight(key) is None for key in "abc")


async def test_a_caller_of_several_runs_that_leaves_cancels_each_nobody_else_waits_for():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=True)
    shared, own = GatedWork(), GatedWork()
    shared_run = flights.start(("shared",), shared.run())
    own_run = flights.start(("own",), own.run())
    leaving = asyncio.create_task(flights.wait([shared_run, own_run]))
    staying = asyncio.create_task(flights.wait([shared_run]))
    await settle()
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    await settle()
    assert (own.cancelled, shared.cancelled) == (1, 0)
    shared.gate.set()
    assert await staying == ["value"]


async def test_the_first_failure_in_order_is_raised_after_every_run_ended():
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=True)
    slow, failing = GatedWork(), GatedWork(failure=boom())
    slow_run = flights.start(("slow",), slow.run())
    failing_run = flights.start(("failing",), failing.run())
    waiting = asyncio.create_task(flights.wait([slow_run, failing_run]))
    await settle()
    failing.gate.set()
    await settle()
    # Answered once every run it waits for has ended, not at the first failure.
    assert not waiting.done() and slow.cancelled == 0
    slow.gate.set()
    with pytest.raises(MeshgateError) as failed:
        await waiting
    assert failed.value.reason == Reason.REDIS_UNAVAILABLE


# Callers join one key and some leave (the oldest still waiting) before the
# work ends; the model says how many runs start and which are cancelled.
_STEPS = st.lists(st.sampled_from(["join", "leave"]), min_size=1, max_size=12)
_OUTCOMES = st.sampled_from(["value", "failure", "bug"])


@settings(max_examples=200, deadline=None)
@given(steps=_STEPS, outcome=_OUTCOMES, cancel_when_abandoned=st.booleans())
def test_any_order_of_joins_and_leaves_runs_the_work_as_the_rules_say(steps, outcome, cancel_when_abandoned):
    asyncio.run(_joins_and_leaves(steps, outcome, cancel_when_abandoned))


async def _joins_and_leaves(steps: list[str], outcome: str, cancel_when_abandoned: bool) -> None:
    failure = {"value": None, "failure": boom(), "bug": KeyError("bug")}[outcome]
    flights: SingleFlight[str, object] = SingleFlight("test", cancel_when_abandoned=cancel_when_abandoned)
    work = GatedWork(failure=failure)
    waiting: list[asyncio.Task] = []
    expected_runs = expected_cancelled = 0
    run_under_way = False
    for step in steps:
        if step == "join":
            if not run_under_way:
                expected_runs += 1
                run_under_way = True
            waiting.append(asyncio.create_task(flights.join("k", work.run)))
        elif waiting:
            leaving = waiting.pop(0)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            if not waiting and cancel_when_abandoned:
                expected_cancelled += 1
                run_under_way = False
        await settle()
    stayed = list(waiting)
    with structlog.testing.capture_logs():
        work.gate.set()
        results = await asyncio.gather(*stayed, return_exceptions=True)
        await settle()
    assert (work.started, work.cancelled) == (expected_runs, expected_cancelled)
    assert work.finished == expected_runs - expected_cancelled
    if outcome == "value":
        assert results == ["value"] * len(stayed)
    else:
        reason = Reason.REDIS_UNAVAILABLE if outcome == "failure" else Reason.INTERNAL
        assert all(isinstance(error, MeshgateError) and error.reason == reason for error in results)
        assert len({id(error) for error in results}) == len(results)
    assert flights.flight("k") is None
