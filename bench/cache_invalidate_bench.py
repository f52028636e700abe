"""What an Invalidate's walk of its vectors hashes costs (services/cache/store.py,
``CacheStore.invalidate``): each hash is deleted one HSCAN step of a script at
a time so that what its live rows were charged is given back to the tenant's
count (cache.max_bytes_per_tenant); with no quota kept there is nothing to give
back, and the hash is unlinked whole. The bench fills a Redis of its own with
one sub-partition of N semantic entries (384-dimension vectors, short
questions and answers) through the Store script, then times one Invalidate of
the tenant each way, the two ways alternated round by round: wall time and
Redis's CPU (INFO cpu, the server's and its lazy-free thread's), as medians
and as the ratio of the unwalked to the walked.

  flock /tmp/bench.lock .venv/bin/python bench/cache_invalidate_bench.py [--entries 10000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import tempfile
import time

import numpy as np
import redis.asyncio as redis

from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.common.v1 import common_pb2
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.cache import keys
from services.cache.store import CacheStore

TTL_MS = 3_600_000
DIMENSIONS = 384


async def fill(store: CacheStore, tenant: str, entries: int) -> None:
    scope = pb.CacheScope(tenant_id=tenant, model="m", parameters=common_pb2.GenerationParameters())
    partition = keys.partition(scope)
    answer = pb.CachedAnswer(text="An answer of a sentence or two.").SerializeToString()
    vectors = np.random.default_rng(0).standard_normal((entries, DIMENSIONS)).astype(np.float32)
    now_ms = time.time_ns() // 1_000_000
    in_flight = asyncio.Semaphore(64)

    async def put(number: int) -> None:
        async with in_flight:
            await store.put_semantic(
                partition, "context", f"{number:064x}", answer, vectors[number].tobytes(),
                f"Question number {number}?", now_ms, TTL_MS,
            )  # fmt: skip

    await asyncio.gather(*(put(number) for number in range(entries)))


async def redis_cpu_s(client: redis.Redis) -> float:
    info = await client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


async def run(url: str, entries: int, rounds: int) -> None:
    client = redis.Redis.from_url(url)
    store = CacheStore(client, entries)
    measured: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for round_ in range(rounds):
        for walked in (True, False) if round_ % 2 == 0 else (False, True):
            tenant = f"bench-{round_}-{int(walked)}"
            await fill(store, tenant, entries)
            cpu_before = await redis_cpu_s(client)
            started = time.perf_counter()
            removed = await store.invalidate(tenant, "", TTL_MS, read_row_charges=walked)
            wall_s = time.perf_counter() - started
            cpu_s = await redis_cpu_s(client) - cpu_before
            left = [key async for key in client.scan_iter(match=keys.tenant_prefix(tenant, "") + "*")]
            if removed.entries != entries or left:
                raise SystemExit(f"the Invalidate left {len(left)} keys, removed {removed.entries} entries")
            measured[walked].append((wall_s, cpu_s))
            print(f"round {round_}, walked={walked}: {wall_s * 1000:.1f} ms, Redis CPU {cpu_s * 1000:.1f} ms")
    medians = {
        walked: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        for walked, runs in measured.items()
    }
    for walked, (wall_s, cpu_s) in medians.items():
        print(f"walked={walked}: median {wall_s * 1000:.1f} ms, Redis CPU {cpu_s * 1000:.1f} ms")
    faster = sum(u[0] < w[0] for u, w in zip(measured[False], measured[True], strict=True))
    print(
        f"unwalked / walked: wall {medians[False][0] / medians[True][0]:.2f}, "
        f"Redis CPU {medians[False][1] / medians[True][1]:.2f}; "
        f"unwalked faster in {faster} of {rounds} rounds"
    )
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        process = redis_server.launch(port, pathlib.Path(data))
        try:
            redis_server.wait_ready(port)
            asyncio.run(run(f"redis://127.0.0.1:{port}/0", args.entries, args.rounds))
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
