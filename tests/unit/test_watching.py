"""Checks each on a schedule of its own (meshgate/watching.py)."""

from __future__ import annotations

import asyncio

from meshgate.tasks import cancel_and_wait
from meshgate.watching import watch_each

INTERVAL_S = 0.01


async def test_a_silent_target_holds_no_other_and_the_targets_are_read_again():
    """One target whose check never ends holds none of the others' checks; a
    target that appears is checked from then on, one that is gone no more,
    its check under way cancelled; a check that fails is tried again."""
    targets = {"silent", "steady"}
    checked: dict[str, int] = {}
    hung, ended = asyncio.Event(), asyncio.Event()

    async def check(target: str) -> None:
        checked[target] = checked.get(target, 0) + 1
        if target == "silent":
            hung.set()
            try:
                await asyncio.Event().wait()
            finally:
                ended.set()
        if target == "failing":
            raise RuntimeError("a bug in a check")

    watcher = asyncio.create_task(watch_each(lambda: targets, check, INTERVAL_S))
    try:
        async with asyncio.timeout(5):
            while checked.get("steady", 0) < 5:
                await asyncio.sleep(INTERVAL_S)
            assert hung.is_set() and checked["silent"] == 1
            targets = {"steady", "failing"}
            while checked.get("failing", 0) < 3:
                await asyncio.sleep(INTERVAL_S)
            assert ended.is_set()
            steady = checked["steady"]
            targets = set()
            await asyncio.sleep(5 * INTERVAL_S)
            after = dict(checked)
            await asyncio.sleep(5 * INTERVAL_S)
            assert checked == after and after["steady"] > steady
    finally:
        await cancel_and_wait(watcher)
