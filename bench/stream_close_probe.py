"""What the streaming handlers' closing interceptor costs.

meshgate/telemetry.py runs every response-streaming handler as a coroutine
that writes each message (``context.write``) and closes the handler's
generator in the call's task. This probe serves one server-streaming method
(64 messages of 40 bytes, as a short streamed answer's deltas) on one
grpc.aio server under uvloop, behind the services' interceptor chain
(OpenTelemetry's, then meshgate's error interceptor) with and without the
closing interceptor in front, in alternating rounds, and prints the CPU
per stream (client and server in this one process) at concurrency 16. What
it ends, OpenTelemetry's "Failed to detach context" for streams cancelled
midway, is tests/unit/test_telemetry_stream_close.py's to show.

    flock /tmp/bench.lock .venv/bin/python bench/stream_close_probe.py [--rounds 12] [--streams 800]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc
import uvloop
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from meshgate import telemetry
from meshgate.errors import ErrorInterceptor

SERVICE = "meshgate.probe.v1.Probe"
METHOD = f"/{SERVICE}/Stream"
MESSAGES = 64


async def _deltas(request, context):
    for _ in range(MESSAGES):
        yield b"x" * 40
        await asyncio.sleep(0)


def _chain(closing: bool) -> list:
    chain = [*telemetry.server_interceptors(), ErrorInterceptor()]
    return chain if closing else chain[1:]


async def _serve(closing: bool):
    server = grpc.aio.server(interceptors=_chain(closing))
    handlers = {"Stream": grpc.unary_stream_rpc_method_handler(_deltas)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def cpu_per_stream(closing: bool, streams: int, concurrency: int) -> float:
    """CPU milliseconds per whole stream, client and server together."""
    server, port = await _serve(closing)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(METHOD)

            async def worker(count: int) -> None:
                for _ in range(count):
                    async for _ in call(b""):
                        pass

            await asyncio.gather(*(worker(4) for _ in range(concurrency)))  # warm
            started = time.process_time()
            await asyncio.gather(*(worker(streams // concurrency) for _ in range(concurrency)))
            return (time.process_time() - started) / streams * 1000
    finally:
        await server.stop(0)


async def main(rounds: int, streams: int, concurrency: int) -> None:
    trace.set_tracer_provider(TracerProvider())
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(rounds):
        for closing in (True, False) if round_ % 2 else (False, True):
            cpu[closing].append(await cpu_per_stream(closing, streams, concurrency))
    print(f"CPU per stream of {MESSAGES} messages, concurrency {concurrency}, {rounds} rounds of {streams}:")
    for closing, label in ((False, "generator iterated by gRPC"), (True, "closing interceptor")):
        values = cpu[closing]
        print(f"  {label}: median {statistics.median(values):.3f} ms ({min(values):.3f}-{max(values):.3f})")
    ratio = statistics.median(cpu[True]) / statistics.median(cpu[False])
    print(f"  closing / generator: {ratio:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--streams", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=16)
    arguments = parser.parse_args()
    uvloop.run(main(arguments.rounds, arguments.streams, arguments.concurrency))
