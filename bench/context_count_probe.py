"""How long an old session's one-time byte count holds Redis (docs/capacity.md).

A session stored before `context.max_session_bytes` has no ``bytes`` in its
meta; its first append under the cap counts its stored turns inside that
append's Lua script (services/context/store.py), which blocks the Redis node
meanwhile. This fills a session in a Redis of its own, removes its count,
and times that first capped append and the next one:

    .venv/bin/python bench/context_count_probe.py 4096 16384     # 64 MiB
    .venv/bin/python bench/context_count_probe.py 1024 1048576   # 1 GiB
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

import redis.asyncio as redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.local import redis_server  # noqa: E402
from meshgate.local.stack import free_port  # noqa: E402
from services.context import store as session_store  # noqa: E402

BATCH = 64  # turns an append


async def probe(url: str, turns: int, turn_bytes: int) -> str:
    client = redis.Redis.from_url(url)
    try:
        sessions = session_store.SessionStore(client, ttl_s=0)
        await sessions.create("t", "s")
        turn = common_pb2.Message(role=common_pb2.ROLE_USER, content="x" * turn_bytes)
        for _ in range(turns // BATCH):
            await sessions.append("t", "s", None, [turn] * BATCH, {})
        # As a session stored before the count.
        await client.hdel(session_store.key("t", "s", "meta"), "bytes")
        capped = session_store.SessionStore(client, ttl_s=0, max_session_bytes=1 << 40)
        small = common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")
        started = time.perf_counter()
        await capped.append("t", "s", None, [small], {})
        counting = time.perf_counter() - started
        started = time.perf_counter()
        await capped.append("t", "s", None, [small], {})
        counted = time.perf_counter() - started
        total = int(await client.hget(session_store.key("t", "s", "meta"), "bytes"))
    finally:
        await client.aclose()
    return (
        f"{turns} turns x {turn_bytes} B = {total / 2**20:.0f} MiB: "
        f"first capped append {counting * 1000:.0f} ms, the next {counted * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("turns", type=int, help=f"turns stored (a multiple of {BATCH})")
    parser.add_argument("turn_bytes", type=int, help="characters of each turn")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = redis_server.launch(port, pathlib.Path(directory))
        try:
            redis_server.wait_ready(port)
            print(asyncio.run(probe(f"redis://127.0.0.1:{port}/0", args.turns, args.turn_bytes)))
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
