"""Ending background tasks from a stop step."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: asyncio.Task) -> None:
    """Cancels ``tasks`` and waits until each has ended; raises what one
    failed with, not their cancellation. A cancellation of the caller while
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
        if isinstance(outcome, Exception):
            raise outcome
