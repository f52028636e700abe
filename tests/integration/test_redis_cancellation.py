"""A stop cancels background tasks that talk to Redis at any moment, and each
must end: redis-py sends its commands under asyncio.wait_for, which on Python
3.11 could drop the cancel (meshgate.tasks.keep_cancellations)."""

from __future__ import annotations

import asyncio
import random

from meshgate import redis_access
from meshgate.tasks import cancel_and_wait

STARTS = 200


async def test_a_change_listener_stopped_at_any_moment_of_its_start_ends(redis_url) -> None:
    # Each listener is stopped within its first 10 ms: while it connects,
    # sends SUBSCRIBE, or waits for the confirmation. Before the fix about
    # one in ten such stops never ended.
    shuffled = random.Random(86296)
    unended = []
    for start in range(STARTS):
        listener = redis_access.ChannelListener(redis_url, "cancellation", lambda _: None, lambda _: None)
        listener.start()
        for _ in range(shuffled.randint(0, 20)):
            await asyncio.sleep(0)
        await asyncio.sleep(shuffled.random() * 0.01)
        stopping = asyncio.ensure_future(listener.close())
        done, _ = await asyncio.wait([stopping], timeout=5)
        if not done:
            unended.append(start)
            await cancel_and_wait(stopping)
    assert unended == []
