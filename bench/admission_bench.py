"""What admission control costs, and that it holds across replicas.

1. CPU per turn that the router's admit and settle stages add in its
   process (services.router.admission.TurnAdmission, as the router wires
   it: limits, their batched settlements and the usage ledger's record),
   in one run against a real Redis started here: no stages at all
   (pipeline.Unlimited), the ledger alone (a tenant without limits), and
   the ledger with 15 limits (tenant, key and model: requests and tokens
   per minute, concurrent streams, a daily token and cost budget). The
   three alternate, round after round, and the median of the rounds is
   reported with every round's figure. Redis's own CPU is not counted: it
   is another process, as in production.
2. Overshoot: 4 router-like processes, each with its own Redis connection,
   hammer one requests-per-minute and one tokens-per-minute limit; the
   admitted amount is compared with the limit.

Usage: .venv/bin/python bench/admission_bench.py [--turns 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
import types
import uuid

import uvloop

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import LimitSettings, PriceSettings, RouterSettings
from meshgate.errors import MeshgateError
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.router.admission import Admission, Scope, TurnAdmission
from services.router.auth import Tenant
from services.router.ledger import Ledger
from services.router.pipeline import Answer, CacheStatus, Outcome, Unlimited

_LIMITS = LimitSettings(
    requests_per_minute=10**9,
    tokens_per_minute=10**12,
    concurrent_streams=10**6,
    tokens_per_day=10**12,
    cost_usd_per_day=10**6,
)
_PRICE = PriceSettings(prompt_usd_per_million=0.15, completion_usd_per_million=0.6)


def _turn(tenant: Tenant):
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="x" * 40)]
    return types.SimpleNamespace(tenant=tenant, model_alias="tiny-gpt", messages=messages, max_tokens=64)


async def _cpu_per_turn(url: str, turns: int, rounds: int) -> list[tuple[float, float, float]]:
    """Milliseconds of router CPU per turn, per round: no stages, ledger only,
    ledger and 15 limits. The three alternate within each round, so load
    from other processes falls on all three alike."""
    client = redis_access.connect(url)
    run = uuid.uuid4().hex[:8]
    settings = RouterSettings(model_limits={"tiny-gpt": _LIMITS}, prices={"tiny-gpt": _PRICE})
    ledger = Ledger(client, settings.usage_stream_max_len, settings.usage_retention_days)
    stages = TurnAdmission(Admission(client, max_generation_s=300), settings, ledger)
    ledger_only = TurnAdmission(Admission(client, max_generation_s=300), RouterSettings(), ledger)
    limited = _turn(Tenant(f"t{run}", frozenset({"*"}), f"k{run}", _LIMITS, _LIMITS))
    free = _turn(Tenant(f"free{run}", frozenset({"*"}), f"f{run}"))
    outcome = Outcome(Answer("an answer", 40, 30, "stop", "live"), CacheStatus.MISS, 0.2)

    async def loop(admission, turn) -> float:
        cpu = time.process_time()
        for _ in range(turns):
            grant = await admission.admit(turn)
            await admission.settle(grant, turn, outcome)
        if hasattr(admission, "drain"):
            # The batched settlements and the ledger's records, counted too.
            await admission.drain()
        return (time.process_time() - cpu) / turns * 1000

    await loop(stages, limited)  # warm: scripts loaded, connections open
    results = []
    for _ in range(rounds):
        none = await loop(Unlimited(), free)
        ledger_alone = await loop(ledger_only, free)
        with_limits = await loop(stages, limited)
        results.append((none, ledger_alone, with_limits))
    await client.aclose()
    return results


def _replica(url: str, rpm_id: str, tpm_id: str, attempts: int, results) -> None:
    async def hammer() -> tuple[int, int]:
        client = redis_access.connect(url)
        admission = Admission(client, max_generation_s=300)
        rpm = Scope("tenant", rpm_id, LimitSettings(requests_per_minute=1000))
        tpm = Scope("model", tpm_id, LimitSettings(tokens_per_minute=20_000))
        requests = tokens = 0
        for _ in range(attempts):
            for scope, cost in ((rpm, 1), (tpm, 13)):
                try:
                    await admission.admit([scope], cost - 1, 1)
                except MeshgateError:
                    continue
                if scope is rpm:
                    requests += 1
                else:
                    tokens += cost
        await client.aclose()
        return requests, tokens

    results.put(asyncio.run(hammer()))


def _overshoot(url: str, attempts: int) -> tuple[int, int]:
    rpm_id, tpm_id = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    results = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_replica, args=(url, rpm_id, tpm_id, attempts, results))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    totals = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=2000, help="per stage setup and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attempts", type=int, default=1000, help="per replica and limit")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        import pathlib

        process = redis_server.launch(port, pathlib.Path(data_dir))
        try:
            redis_server.wait_ready(port)
            url = f"redis://127.0.0.1:{port}/0"
            # The router runs on uvloop (meshgate/serving.py): measure on the same loop.
            rounds = uvloop.run(_cpu_per_turn(url, args.turns, args.rounds))
            none, ledger_alone, with_limits = (statistics.median(mode) for mode in zip(*rounds, strict=True))
            print(
                f"router CPU per turn, admit+settle stages (median of {args.rounds} rounds):"
                f" none {none:.3f} ms, ledger only {ledger_alone:.3f} ms,"
                f" ledger + 15 limits {with_limits:.3f} ms"
            )
            print(
                f"  added: ledger {ledger_alone - none:.3f} ms, ledger + limits {with_limits - none:.3f} ms,"
                f" limits alone {with_limits - ledger_alone:.3f} ms ({args.turns} turns each)"
            )
            added = ", ".join(f"{limits - base:.3f}" for base, _, limits in rounds)
            print(f"  ledger + limits added, every round: {added} ms")
            started = time.perf_counter()
            requests, tokens = _overshoot(url, args.attempts)
            elapsed = time.perf_counter() - started
            print(f"4 replicas, {4 * args.attempts} attempts per limit in {elapsed:.1f} s:")
            print(f"  requests_per_minute 1000: admitted {requests} ({(requests / 1000 - 1) * 100:+.2f}%)")
            print(f"  tokens_per_minute 20000: admitted {tokens} ({(tokens / 20000 - 1) * 100:+.2f}%)")
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
