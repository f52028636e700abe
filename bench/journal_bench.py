"""What a router's turn journal costs (services/router/turn_journal.py), on a
real redis-server of its own: the router's CPU for one snapshot write with N
turns held, when every turn's record moved since the last snapshot (each
packed again) and when none did (the packed records reused), and for
tracking and settling one turn that no snapshot names (every turn pays
that). The journal writes one snapshot per router.journal_interval_s (1 s)
while it holds turns, so a write's CPU is also its share of a core a second.

    .venv/bin/python bench/journal_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

from meshgate import redis_access
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.router.ledger import Ledger, UsageRecord
from services.router.turn_journal import ROUTER_LOST, TurnJournal

RECORD = UsageRecord("tenant-a", "key-a", "smollm2", "live", 412, 0, 0, "miss", 0, 0, ROUTER_LOST)


async def measure(url: str, sizes: list[int], writes: int) -> None:
    client = redis_access.connect(url)
    for _ in range(100):
        try:
            await client.ping()
            break
        except redis_access.CONNECTION_ERRORS:
            await asyncio.sleep(0.1)
    journal = TurnJournal(client, Ledger(client, 1000, 2), interval_s=1.0, stale_s=15.0)
    print("| turns held | CPU a snapshot, records unchanged (ms) | CPU a snapshot, every record moved (ms) |")
    print("|---|---|---|")
    moved = [0]

    def moving_record() -> UsageRecord:
        # A new record each snapshot: every turn moved since the last.
        return dataclasses.replace(RECORD, completion_tokens=moved[0])

    for size in sizes:
        # Each turn's record: one object while it does not move (as
        # TurnAdmission.track's memo returns), a new one when it does.
        fixed = [journal.track(lambda: RECORD) for _ in range(size)]
        await journal.write()
        started = time.process_time()
        for _ in range(writes):
            await journal.write()
        unchanged_ms = (time.process_time() - started) / writes * 1000
        for tracked in fixed:
            tracked.settled(None)
        moving = [journal.track(moving_record) for _ in range(size)]
        started = time.process_time()
        for _ in range(writes):
            moved[0] += 1
            await journal.write()
        moving_ms = (time.process_time() - started) / writes * 1000
        for tracked in moving:
            tracked.settled(None)
        print(f"| {size} | {unchanged_ms:.3f} | {moving_ms:.3f} |")
    await journal.write()  # none held: the journal removed
    turns = 100_000
    started = time.process_time()
    for _ in range(turns):
        journal.track(lambda: RECORD).settled(RECORD)
    per_turn_us = (time.process_time() - started) / turns * 1e6
    print(f"\ntracking and settling a turn no snapshot named: {per_turn_us:.2f} us of CPU")
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,16,256,4096", help="turns held, comma-separated")
    parser.add_argument("--writes", type=int, default=100, help="snapshot writes timed per size")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        process = redis_server.launch(port, Path(directory))
        try:
            sizes = [int(n) for n in options.sizes.split(",")]
            asyncio.run(measure(f"redis://127.0.0.1:{port}/0", sizes, options.writes))
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
