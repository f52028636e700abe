"""What Prometheus metrics cost per streamed request, measured in one run.

    .venv/bin/python bench/metrics_bench.py [--requests 120] [--rounds 2]

Starts the mesh (Redis, Triton with tiny_gpt and minilm, the four services)
on free ports with ``telemetry.metrics`` on, then off, ``--rounds`` times
alternating, and streams the same generated answers through the router
(cache bypassed, so every request generates and every token passes the
per-token metrics). While metrics are on, every endpoint is scraped once a
second, ten times as often as a usual Prometheus, so the scrape's cost is
in the figure too. CPU is the four service processes' own, from /proc.
Tracing is off in both, to measure the metrics alone.

Prints a markdown table: CPU per request and per streamed token, on and off,
and the difference as a share. The machine is shared and noisy: compare
the two columns of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import threading
import urllib.request

import grpc
import uvloop
from mesh_bench import API_KEY, CpuMeter, run_load, through_router

from meshgate.local.stack import SERVICES, Ports, Stack, free_port
from meshgate.router.v1 import router_service_pb2_grpc

MAX_TOKENS = 32
CONCURRENCY = 4


def scrape_every_second(stack: Stack, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for name in SERVICES:
            with urllib.request.urlopen(f"http://{stack.metrics_address(name)}/metrics", timeout=5) as answer:
                answer.read()


async def measure(stack: Stack, requests: int) -> tuple[float, int]:
    """Service CPU (ms) and completion tokens over ``requests`` streamed answers."""
    meter = CpuMeter({name: stack.processes[name].pid for name in SERVICES})
    async with grpc.aio.insecure_channel(stack.address("router")) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        async def one(prompt: str):
            return await through_router(stub, prompt, MAX_TOKENS)

        await run_load(one, CONCURRENCY, 20)  # warm-up: connections, templates, Triton
        meter.start()
        samples, _ = await run_load(one, CONCURRENCY, requests)
        # Per "request" of 1: the whole measurement's CPU, in ms.
        total_ms = meter.stop(1)
    return total_ms, sum(sample.tokens for sample in samples)


def one_round(metrics_on: bool, requests: int, state: pathlib.Path) -> tuple[float, int]:
    os.environ["MESHGATE_TELEMETRY__METRICS"] = "true" if metrics_on else "false"
    stack = Stack(
        state / ("on" if metrics_on else "off"),
        Ports(*(free_port() for _ in range(6))),
        dev_api_key=API_KEY,
        tracing=False,
        log_level="warning",
        triton_models=("tiny_gpt", "minilm"),
    )
    stack.start()
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_every_second, args=(stack, stop), daemon=True)
    try:
        if metrics_on:
            scraper.start()
        return uvloop.run(measure(stack, requests))
    finally:
        stop.set()
        if metrics_on:
            scraper.join()
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="meshgate-metrics-bench-") as state:
        for round_ in range(args.rounds):
            for metrics_on in (True, False) if round_ % 2 == 0 else (False, True):
                results[metrics_on].append(
                    one_round(metrics_on, args.requests, pathlib.Path(state) / str(round_))
                )

    def per(metrics_on: bool) -> tuple[float, float]:
        rounds = results[metrics_on]
        per_request = statistics.median(ms / args.requests for ms, _ in rounds)
        per_token_us = statistics.median(ms * 1000 / tokens for ms, tokens in rounds)
        return per_request, per_token_us

    on_request, on_token = per(True)
    off_request, off_token = per(False)
    print(
        f"{args.requests} streamed answers (tiny-gpt, max_tokens {MAX_TOKENS}, concurrency {CONCURRENCY}, "
        f"cache bypassed) per round, {args.rounds} rounds each, median of rounds; "
        "CPU of the four service processes"
    )
    print()
    print("| metrics | CPU per request (ms) | CPU per streamed token (us) |")
    print("|---|---|---|")
    print(f"| off | {off_request:.2f} | {off_token:.0f} |")
    print(f"| on, scraped every 1 s | {on_request:.2f} | {on_token:.0f} |")
    print(
        f"| difference | {on_request - off_request:+.2f} ({(on_request / off_request - 1):+.1%}) "
        f"| {on_token - off_token:+.0f} |"
    )


if __name__ == "__main__":
    main()
