"""Health checks of several targets, each on a schedule of its own."""

from __future__ import annotations

import asyncio
import collections.abc
import typing

import structlog

from meshgate.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

# A target: hashable, and named in logs by its str().
T = typing.TypeVar("T", bound=collections.abc.Hashable)


async def watch_each(
    targets: collections.abc.Callable[[], collections.abc.Iterable[T]],
    check: collections.abc.Callable[[T], collections.abc.Awaitable[None]],
    interval_s: float,
) -> None:
    """Awaits ``check(target)`` for each of ``targets()``, each
    ``interval_s`` after its own last check ended, until cancelled.

    One round that gathered every target's check lasted as long as the
    slowest one's: a target stopped with its connection up (SIGSTOP, or a
    link holding its replies) made every round wait out its check's
    timeout, and the others' changes were noticed that much later each
    round. ``targets()`` is read again every ``interval_s``: one that
    appears gets a schedule of its own from then on; one that is gone has
    its schedule, and a check under way, cancelled."""
    schedules: dict[T, asyncio.Task] = {}
    try:
        while True:
            wanted = set(targets())
            gone = [schedules.pop(target) for target in list(schedules) if target not in wanted]
            if gone:
                await cancel_and_wait(*gone)
            for target in wanted - schedules.keys():
                schedules[target] = asyncio.create_task(_schedule(target, check, interval_s))
            await asyncio.sleep(interval_s)
    finally:
        await cancel_and_wait(*schedules.values())


async def _schedule(
    target: T, check: collections.abc.Callable[[T], collections.abc.Awaitable[None]], interval_s: float
) -> None:
    while True:
        try:
            await check(target)
        except Exception:
            # A schedule that died would freeze the target's health as it last was.
            log.exception("health check failed", target=str(target))
        await asyncio.sleep(interval_s)
