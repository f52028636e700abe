"""What the shape of a server-streaming handler costs in grpc.aio alone: the
router's Chat answered by a streaming handler (each message yielded, the
status sent after) or by a unary-response one (the last message returned, so
that gRPC sends it with the status in one batch; services/router/servicer.py
``chat_with_status``), at concurrency 1 and 16 (issue 13).

    flock /tmp/bench.lock .venv/bin/python bench/handler_shape_probe.py
    flock /tmp/bench.lock .venv/bin/python bench/handler_shape_probe.py --tail-us 0,300 --calls 1000

No mesh, no protobuf: a server process (uvloop, the mesh's server options)
answers one server-streaming call with one message of ``--bytes`` bytes, by
either handler shape; the client (this process, grpc.aio on uvloop, as
bench/mesh_bench.py's) calls both as the same server stream, alternating
which goes first in each of ``--rounds`` rounds. Each call first burns
``--tail-us`` of CPU, a router's work before its completion, and then, after
its last message is ready, the same again: the router's work between the
completion and the call's end (the turn's metrics and span, its settlement
and ledger record, the error interceptor's observation, the server span's
end). A streaming handler sends the message before that tail; a
unary-response one can send it only after. The server is started once per
``--interceptors`` set: none, meshgate's ErrorInterceptor, and that inside
OpenTelemetry's server interceptor with a tracer provider and no exporter
(the router's, tracing off). Reported: per shape, the medians over rounds of
each round's p50 and p99 call time (until the stream ends, as
mesh_bench.py's latency) and time to the message, and the server's and
client's CPU (user + system, from /proc) per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import struct
import subprocess
import sys
import time

import grpc
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshgate import serving, telemetry  # noqa: E402
from meshgate.errors import ErrorInterceptor  # noqa: E402
from meshgate.local.stack import free_port  # noqa: E402

# Under /meshgate., so that the ErrorInterceptor wraps them as it wraps ours.
SERVICE = "meshgate.probe.Probe"
SHAPES = {"stream": f"/{SERVICE}/Stream", "unary": f"/{SERVICE}/Unary"}
REQUEST = struct.Struct("<II")  # response bytes, tail µs
INTERCEPTOR_SETS = ("none", "errors", "errors+otel")


def burn(us: int) -> None:
    """CPU work, on the event loop as the router's own is."""
    until = time.perf_counter() + us / 1e6
    while time.perf_counter() < until:
        pass


async def stream_shape(request: bytes, context):
    size, tail_us = REQUEST.unpack(request)
    burn(tail_us)
    yield b"x" * size
    burn(tail_us)


async def unary_shape(request: bytes, context) -> bytes:
    size, tail_us = REQUEST.unpack(request)
    burn(tail_us)
    response = b"x" * size
    burn(tail_us)
    return response


def interceptors(name: str) -> list:
    if name == "none":
        return []
    if name == "errors":
        return [ErrorInterceptor()]
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    return [*telemetry.server_interceptors(), ErrorInterceptor()]


async def serve(port: int, interceptor_set: str) -> None:
    server = grpc.aio.server(interceptors=interceptors(interceptor_set), options=serving.SERVER_OPTIONS)
    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(stream_shape),
        "Unary": grpc.unary_unary_rpc_method_handler(unary_shape),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def calls(stream, request: bytes, concurrency: int, count: int) -> tuple[list, list, float]:
    """``count`` calls from ``concurrency`` workers: each call's seconds to
    its stream's end and to its message, and the wall seconds of all."""
    totals: list[float] = []
    to_message: list[float] = []
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            async for _message in stream(request):
                to_message.append(time.perf_counter() - started)
            totals.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return totals, to_message, time.perf_counter() - started


async def measure(port: int, server_pid: int, args, tail_us: int, concurrency: int) -> list[str]:
    request = REQUEST.pack(args.bytes, tail_us)
    rounds = {shape: [] for shape in SHAPES}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=serving.CHANNEL_OPTIONS) as channel:
        streams = {shape: channel.unary_stream(method) for shape, method in SHAPES.items()}
        for stream in streams.values():  # connected, and each path warmed
            await calls(stream, request, concurrency, 200)
        for number in range(args.rounds):
            order = list(SHAPES) if number % 2 == 0 else list(reversed(SHAPES))
            for shape in order:
                server_before, client_before = cpu_seconds(server_pid), time.process_time()
                totals, to_message, wall = await calls(streams[shape], request, concurrency, args.calls)
                server_ms = (cpu_seconds(server_pid) - server_before) / args.calls * 1000
                client_ms = (time.process_time() - client_before) / args.calls * 1000
                rounds[shape].append(
                    (
                        statistics.median(totals) * 1000,
                        percentile(totals, 0.99) * 1000,
                        statistics.median(to_message) * 1000,
                        args.calls / wall,
                        server_ms,
                        client_ms,
                    )
                )
    rows = []
    for shape, figures in rounds.items():
        medians = (statistics.median(column) for column in zip(*figures))
        p50, p99, message, rate, server_ms, client_ms = medians
        rows.append(
            f"| {shape} | {concurrency} | {tail_us} | {p50:.3f} | {p99:.3f} | {message:.3f} "
            f"| {rate:.0f} | {server_ms:.3f} | {client_ms:.3f} |"
        )
    # Per round, so that a minute's drift shows as such and not as a shape's.
    ratios = [unary[0] / stream[0] for unary, stream in zip(rounds["unary"], rounds["stream"])]
    rows.append(
        f"| unary / stream p50, by round | {concurrency} | {tail_us} | "
        f"{' '.join(f'{ratio:.2f}' for ratio in ratios)} | | | | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per shape per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bytes", type=int, default=400, help="the one message's size (an exact hit's ~)")
    parser.add_argument(
        "--tail-us",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0, 200],
        help="comma-separated µs of CPU each call burns before and after its message is ready",
    )
    parser.add_argument("--concurrency", type=lambda text: [int(v) for v in text.split(",")], default=[1, 16])
    parser.add_argument("--interceptors", type=lambda text: text.split(","), default=list(INTERCEPTOR_SETS))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server role, on this port
    parser.add_argument("--interceptor-set", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.interceptor_set))
        return
    print(
        "| shape | concurrency | tail (µs) | p50 (ms) | p99 (ms) | to message p50 (ms) | calls/s "
        "| server CPU a call (ms) | client CPU a call (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for interceptor_set in args.interceptors:
        print(f"| **interceptors: {interceptor_set}** | | | | | | | | |", flush=True)
        port = free_port()
        command = [sys.executable, __file__, "--serve", str(port), "--interceptor-set", interceptor_set]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("the server did not start")
            for tail_us in args.tail_us:
                for concurrency in args.concurrency:
                    rows = uvloop.run(measure(port, server.pid, args, tail_us, concurrency))
                    print("\n".join(rows), flush=True)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
