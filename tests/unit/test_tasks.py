"""cancel_and_wait (meshgate/tasks.py), the stop steps' way to end a
background task: the task's cancellation is not the caller's, the caller's
is."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.tasks import cancel_and_wait


async def outlives_one_cancel(cancelled_once: asyncio.Event) -> None:
    """A task that takes its first cancel for a failure of what it awaited
    and goes on (as a loop whose call turned the cancel into an error it
    handles); the next one ends it."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        cancelled_once.set()
    await asyncio.sleep(30)


async def test_a_caller_cancelled_while_its_task_outlives_its_cancel_is_cancelled() -> None:
    cancelled_once = asyncio.Event()
    task = asyncio.create_task(outlives_one_cancel(cancelled_once))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_and_wait(task))
    await cancelled_once.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    # The caller's cancel reached the task, which it ended.
    assert task.cancelled()


async def test_the_tasks_own_cancellation_is_not_raised() -> None:
    task = asyncio.create_task(asyncio.sleep(30))
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_what_the_task_failed_with_is_raised() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait(task)
    # A caller leaving what the task did has no use for how it ended.
    await cancel_and_wait(task, raise_failures=False)


async def test_a_wait_for_cancelled_as_what_it_awaits_completes_is_cancelled() -> None:
    """python/cpython#86296 (Python 3.11): the caller's cancel, in the loop
    turn its awaited future completes, was dropped and the result returned.
    meshgate's import puts 3.12's wait_for in place (keep_cancellations)."""
    done = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(asyncio.wait_for(done, 10))
    await asyncio.sleep(0)
    done.set_result("answer")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_wait_for_still_times_out_and_cancels_what_it_awaited() -> None:
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(never, 0.01)
    assert never.cancelled()
    assert await asyncio.wait_for(asyncio.sleep(0, "answer"), 10) == "answer"
    assert await asyncio.wait_for(asyncio.sleep(0, "unbounded"), None) == "unbounded"
