"""How long one request body holds the router's event loop, with and without
the HTTP edge's off-loop parser (services/router/body_parser.py).

A real HttpServer and HttpEdge on loopback in this process, a turn that
answers "ok" at once behind them (no mesh: the body is what is measured).
For each body, a ticker task on the same loop sleeps 1 ms at a time and
records its longest gap while the body is posted and answered: the time
every other request and stream on that loop would have waited. Run once
with the bounds the edge ships ("off-loop") and once with every body parsed
on the loop ("inline", the edge before the parser), in one process.

Also prints the decoder's own time on the loop for bodies at the inline
bounds (the worst a body parsed inline can cost).

    .venv/bin/python bench/http_body_stall.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from meshgate.config import ModelSettings, RouterSettings
from meshgate.errors import MeshgateError
from services.router import body_parser
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.http_edge import HttpEdge, HttpServer, chat_call
from services.router.pipeline import Answer, CacheStatus, Completion

KEY = "bench-key"
MIB = 1024 * 1024


def chat(messages) -> bytes:
    return json.dumps({"model": "m", "messages": messages}).encode()


def filled(unit: bytes, size: int, head: bytes = b'{"model":"m","messages":[', tail: bytes = b"]}") -> bytes:
    """Valid JSON of ``size`` bytes or a few less: ``unit`` (a value and its
    comma) repeated between ``head`` and ``tail``."""
    count = (size - len(head) - len(tail)) // len(unit)
    return head + unit * (count - 1) + unit.rstrip(b",") + tail


BODIES = {
    "chat, 4 short messages": chat([{"role": "user", "content": "What is the capital of France?"}] * 4),
    "7.5 MiB of prose in one message": chat(
        [{"role": "user", "content": "hello, world, " * (7_500_000 // 14)}]
    ),
    "8 MiB of zeros as messages": filled(b"0,", 8 * MIB),
    "8 MiB of empty objects as messages": filled(b"{},", 8 * MIB),
    "8 MiB of empty arrays as messages": filled(b"[],", 8 * MIB),
    "8 MiB of stop strings": filled(
        b'"",', 8 * MIB, b'{"model":"m","messages":[{"role":"user","content":"x"}],"stop":[', b"]}"
    ),
}

# At the inline bounds: the most a body parsed on the loop can hold it.
AT_BOUNDS = {
    "128 KiB of zeros": filled(b"0,", body_parser.INLINE_MAX_BYTES),
    f"{body_parser.INLINE_MAX_CONTAINERS:,} empty arrays in 128 KiB of zeros": filled(
        b"0,", body_parser.INLINE_MAX_BYTES - 3 * body_parser.INLINE_MAX_CONTAINERS
    ).replace(b"0,", b"[],", body_parser.INLINE_MAX_CONTAINERS - 2),
    f"{body_parser.INLINE_MAX_CONTAINERS:,} empty objects in 128 KiB of strings": filled(
        b'"",', body_parser.INLINE_MAX_BYTES - 3 * body_parser.INLINE_MAX_CONTAINERS
    ).replace(b'"",', b"{},", body_parser.INLINE_MAX_CONTAINERS - 2),
}


class OkPipeline:
    async def run(self, request, tenant, session_id, budget, **rest):
        yield Completion(Answer(text="ok", finish_reason="stop"), CacheStatus.MISS, 0.0, "", 0, "")


async def longest_gap(work) -> tuple[float, object]:
    """(the ticker's longest gap in ms while ``work`` ran, its result)."""
    gaps = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.01)
    try:
        result = await work
    finally:
        done.set()
        await ticker
    return 1000 * max(gaps), result


async def measure(repeat: int) -> dict[str, dict[str, list[float]]]:
    settings = RouterSettings(dev_api_key=KEY)
    app = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), OkPipeline(), None
    )
    server = HttpServer(app, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0)
    await server.start()
    shipped = (body_parser.INLINE_MAX_BYTES, body_parser.INLINE_MAX_CONTAINERS)
    results: dict[str, dict[str, list[float]]] = {name: {"inline": [], "off-loop": []} for name in BODIES}
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}/v1",
            headers={"authorization": f"Bearer {KEY}"},
            timeout=60,
        ) as http:
            # The child's start (its imports) is paid once, before the timed posts.
            await app._bodies.decode(
                chat_call, BODIES["7.5 MiB of prose in one message"], settings.max_messages
            )
            for _ in range(repeat):
                for mode in ("inline", "off-loop"):
                    if mode == "inline":
                        body_parser.INLINE_MAX_BYTES = body_parser.INLINE_MAX_CONTAINERS = 1 << 62
                    else:
                        body_parser.INLINE_MAX_BYTES, body_parser.INLINE_MAX_CONTAINERS = shipped
                    for name, body in BODIES.items():
                        gap, answer = await longest_gap(http.post("/chat/completions", content=body))
                        results[name][mode].append(gap)
                        error = answer.json().get("error") or {}
                        results[name].setdefault(
                            "answer", [f"{answer.status_code} {error.get('code') or ''}".strip()]
                        )
    finally:
        body_parser.INLINE_MAX_BYTES, body_parser.INLINE_MAX_CONTAINERS = shipped
        await server.stop()
        await app.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(measure(args.repeat))
    print(f"longest loop gap while one body is posted and answered, median of {args.repeat} (ms)\n")
    print("| body | answer | inline | off-loop |")
    print("|---|---|---|---|")
    for name, row in results.items():
        inline, off = statistics.median(row["inline"]), statistics.median(row["off-loop"])
        print(f"| {name} | {row['answer'][0]} | {inline:.1f} | {off:.1f} |")
    print("\ndecoder time on the loop for bodies at the inline bounds (ms, median of 5)\n")
    for name, body in AT_BOUNDS.items():
        assert body_parser.parses_inline(body), name
        times, refused = [], None
        for _ in range(5):
            started = time.perf_counter()
            try:
                chat_call(body, RouterSettings().max_messages)
            except MeshgateError as error:
                refused = error.reason
            times.append(1000 * (time.perf_counter() - started))
        print(f"- {name} ({len(body):,} bytes, refused {refused}): {statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
