"""What the tenant sweep's search for unlisted sessions costs Redis
(services/context/tenant_sweep.py): the sweep of main's code (SCAN TYPE
zset, tenants' sets alone) against this tree's (one SCAN of both the sets
and sessions' metas, then each meta's creation time and a listing script
a tenant), a pass each over the same keys of a Redis of its own, and the
SCAN alone the ways it could be done. Counts: ticks, round trips
(commands sent alone, pipelines), keys SCAN returned, Redis's own time
(INFO commandstats) as a ratio to the old pass's.

  .venv/bin/python bench/tenant_sweep_bench.py [--sessions 20000] [--tenants 20] [--against-ref main]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import redis.asyncio as redis
import structlog
from redis.asyncio.client import Pipeline

from meshgate.common.v1 import common_pb2
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.context import store as session_store
from services.context import tenant_sweep

SCAN_COUNT = tenant_sweep.SCAN_COUNT


class RoundTrips:
    """Counts what a client sends: each command alone, each pipeline."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        command, execute = redis.Redis.execute_command, Pipeline.execute
        counts = self.counts

        async def counted_command(client, *args, **options):
            counts[str(args[0]).lower()] += 1
            return await command(client, *args, **options)

        async def counted_pipeline(pipe, raise_on_error=True):
            counts["pipeline"] += 1
            return await execute(pipe, raise_on_error)

        redis.Redis.execute_command = counted_command
        Pipeline.execute = counted_pipeline


def sweep_module_of(ref: str):
    """tenant_sweep.py as ``ref`` holds it, imported beside this tree's."""
    source = subprocess.run(
        ["git", "show", f"{ref}:services/context/tenant_sweep.py"], capture_output=True, check=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader(f"tenant_sweep_{ref}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{ref}:tenant_sweep.py", "exec"), module.__dict__)
    return module


async def filled(client: redis.Redis, sessions: int, tenants: int) -> session_store.SessionStore:
    """``sessions`` over ``tenants``, created as a create does (listed);
    every third holds two turns (its turns, versions and ids keys beside
    its meta)."""
    store = session_store.SessionStore(client, 3600, max_bytes_per_tenant=1 << 40)
    message = common_pb2.Message(role=common_pb2.ROLE_USER, content="hello there")

    async def one(n: int) -> None:
        tenant, session_id = f"tenant{n % tenants}", f"s{n}"
        await store.create(tenant, session_id)
        if n % 3 == 0:
            await store.append(tenant, session_id, 0, [message, message], {})

    for start in range(0, sessions, 50):
        await asyncio.gather(*(one(n) for n in range(start, min(start + 50, sessions))))
    return store


async def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Per command: (calls, usec) since the last CONFIG RESETSTAT."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (s["calls"], s["usec"]) for name, s in stats.items()}


async def a_pass(client, sweep, trips: RoundTrips) -> dict:
    await client.config_resetstat()
    trips.counts.clear()
    ticks = 0
    while True:
        ticks += 1
        if await sweep.tick():
            break
    # Before the bench's own INFO.
    by_kind = dict(trips.counts)
    stats = await commandstats(client)
    stats.pop("config", None)
    stats.pop("info", None)
    return {
        "ticks": ticks,
        "round_trips": sum(by_kind.values()),
        "by_kind": by_kind,
        "redis_usec": sum(usec for _, usec in stats.values()),
        "redis_calls": {name: calls for name, (calls, _) in stats.items()},
    }


async def scan_walk(client: redis.Redis, scans: list[tuple[str, str | None]]) -> dict:
    """A whole walk of the keyspace, each of ``scans`` (MATCH, TYPE) on a
    cursor of its own."""
    await client.config_resetstat()
    calls = returned = 0
    for match, type_ in scans:
        cursor = None
        while cursor != 0:
            cursor, keys = await client.scan(cursor or 0, match, SCAN_COUNT, type_)
            calls += 1
            returned += len(keys)
    stats = await commandstats(client)
    return {"scans": calls, "keys_returned": returned, "redis_usec": stats["scan"][1]}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--unlisted", type=float, default=0.1, help="share of sessions whose listing is lost")
    parser.add_argument("--against-ref", default="main")
    args = parser.parse_args()
    # The sweep's line per tick that lists sessions: not this report's.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    old = sweep_module_of(args.against_ref)
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        process = redis_server.launch(port, pathlib.Path(data))
        try:
            redis_server.wait_ready(port)
            client = redis.Redis(port=port)
            store = await filled(client, args.sessions, args.tenants)
            keys = await client.dbsize()
            print(f"{args.sessions} sessions of {args.tenants} tenants: {keys} keys")
            walks = {
                "old: MATCH mg:context:* TYPE zset": [("mg:context:*", "zset")],
                "new: MATCH mg:context:*[aey], no TYPE": [(tenant_sweep._SCANNED, None)],
                "no glob: MATCH mg:context:*, no TYPE": [("mg:context:*", None)],
                "two SCANs: TYPE zset + TYPE hash *:meta": [
                    ("mg:context:*", "zset"),
                    ("mg:context:*}:meta", "hash"),
                ],
            }
            base = None
            for name, scans in walks.items():
                walk = await scan_walk(client, scans)
                base = base or walk["redis_usec"]
                print(
                    f"  SCAN walk, {name}: {walk['scans']} SCANs, {walk['keys_returned']} keys returned,"
                    f" Redis time x{walk['redis_usec'] / base:.2f} of the old"
                )
            trips = RoundTrips()
            old_pass = await a_pass(client, old.TenantSweep(client, store.listing, store.holdings), trips)
            new_pass = await a_pass(
                client, tenant_sweep.TenantSweep(client, store.listing, store.holdings), trips
            )
            # Unlisted as a lost listing call leaves them: the sweep's repair pass.
            lost = int(args.sessions * args.unlisted)
            for n in range(lost):
                member = session_store.listed_member(
                    f"s{n}",
                    int(
                        await client.hget(
                            session_store.session_key(f"tenant{n % args.tenants}", f"s{n}"), "create_time_ms"
                        )
                    ),
                )
                for part in ("newest", "due"):
                    await client.zrem(session_store.listing_key(f"tenant{n % args.tenants}", part), member)
            repair = await a_pass(
                client, tenant_sweep.TenantSweep(client, store.listing, store.holdings), trips
            )
            listed = sum(
                [
                    await client.zcard(session_store.listing_key(f"tenant{t}", "newest"))
                    for t in range(args.tenants)
                ]
            )
            for name, result in (
                ("old pass", old_pass),
                ("new pass", new_pass),
                (f"new pass, {lost} unlisted", repair),
            ):
                ratio = result["redis_usec"] / old_pass["redis_usec"]
                print(
                    f"  {name}: {result['ticks']} ticks, {result['round_trips']} round trips"
                    f" {result['by_kind']}, Redis calls {result['redis_calls']},"
                    f" Redis time x{ratio:.2f} of the old pass"
                )
            print(f"  listed after the repair pass: {listed} of {args.sessions}")
            await client.aclose()
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
