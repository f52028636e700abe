"""Ending background tasks from a stop step, and a cancellation Python 3.11
loses."""

from __future__ import annotations

import asyncio
import sys


async def cancel_and_wait(*tasks: asyncio.Future, raise_failures: bool = True) -> None:
    """Cancels ``tasks`` and waits until each has ended; raises what one
    failed with (unless ``raise_failures`` is False: a caller that leaves
    what they were doing has no use for how they ended), not their
    cancellation. A cancellation of the caller while
    it waits (a stop cancelled, a test's async_test_timeout) is raised, and
    reaches the tasks too. `task.cancel()` then `with
    suppress(CancelledError): await task` swallowed that one with the
    task's: a task that outlived its own cancel held the caller until the
    caller's cancel ended it, and the caller went on as if never cancelled
    (a test passed after 300 s, its bound)."""
    for task in tasks:
        task.cancel()
    # gather raises its own cancellation whatever return_exceptions says,
    # and hands back the tasks'.
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if raise_failures and isinstance(outcome, Exception):
            raise outcome


async def _wait_for(aw, timeout: float | None):
    """``asyncio.wait_for`` as Python 3.12 has it: the awaitable runs in the
    caller's task under ``asyncio.timeout``, so a cancellation of the caller
    is delivered into it and raised, whatever else ends at that moment."""
    async with asyncio.timeout(timeout):
        return await aw


def keep_cancellations() -> None:
    """On Python 3.11, puts :func:`_wait_for` in place of ``asyncio.wait_for``.

    3.11's wait_for returns the awaited result when the caller is cancelled
    in the loop turn the awaited future completes, and the cancellation is
    gone (python/cpython#86296, fixed by 3.12's rewrite on
    ``asyncio.timeout``). redis-py sends every command under
    ``asyncio.wait_for(..., socket_timeout)``: a context replica's stop
    that cancelled its change listener as its SUBSCRIBE was being sent
    left the listener running for good, and the stop waiting on it (a CI
    run's test hung its 300 s; about one listener in ten so stopped within
    10 ms of its start in tests/integration/test_redis_cancellation.py).
    Call sites look ``asyncio.wait_for`` up when they run, so this takes
    effect for every library loaded before or after; it is installed when
    the meshgate package is imported (meshgate/__init__.py)."""
    if sys.version_info < (3, 12):
        asyncio.wait_for = _wait_for
        asyncio.tasks.wait_for = _wait_for
