"""A unary method served as unary or as request-streaming: the server's CPU a call.

    flock /tmp/bench.lock .venv/bin/python bench/stream_unary_probe.py [--calls 4000]

MeshGuard serves a unary method request-streaming (the same call on the
wire) where the mesh is restricted (mutual TLS), so that a peer not allowed
is refused before its request is read. This probe measures what that costs
in grpc.aio alone: two servers (forked, one each way) answer the same
trivial handler, a client calls each at concurrency 8 in alternating
rounds, and each server's CPU (from /proc) is divided by its calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import time

import grpc
import uvloop
from grpc_health.v1 import health_pb2

ROUNDS = 6
CONCURRENCY = 8
WAYS = ("unary", "request-streaming")


async def answer(request, context):
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def answer_streamed(requests, context):
    await anext(requests, None)  # MeshGuard reads the one request so
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, way: str) -> None:
        self._way = way

    def service(self, handler_call_details):
        parse, write = (
            health_pb2.HealthCheckRequest.FromString,
            health_pb2.HealthCheckResponse.SerializeToString,
        )
        if self._way == "unary":
            return grpc.unary_unary_rpc_method_handler(answer, parse, write)
        return grpc.stream_unary_rpc_method_handler(answer_streamed, parse, write)


def serve(way: str, port: int) -> None:
    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_Handler(way),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(run())


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(ports: dict[str, int], pids: dict[str, int], calls: int) -> dict[str, list[float]]:
    channels = {way: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for way, port in ports.items()}
    stubs = {
        way: channel.unary_unary(
            "/probe.Probe/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        for way, channel in channels.items()
    }
    for stub in stubs.values():
        await stub(health_pb2.HealthCheckRequest(), wait_for_ready=True)
        for _ in range(300):  # warm
            await stub(health_pb2.HealthCheckRequest())

    async def worker(stub) -> None:
        for _ in range(calls // CONCURRENCY):
            await stub(health_pb2.HealthCheckRequest())

    micros = {way: [] for way in ports}
    for round_number in range(ROUNDS):
        for way in WAYS if round_number % 2 == 0 else reversed(WAYS):
            before = cpu_seconds(pids[way])
            await asyncio.gather(*(worker(stubs[way]) for _ in range(CONCURRENCY)))
            micros[way].append((cpu_seconds(pids[way]) - before) / calls * 1e6)
    for channel in channels.values():
        await channel.close()
    return micros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls a round to each server")
    args = parser.parse_args()
    ports = {way: port for way, port in zip(WAYS, (50997, 50998))}
    pids = {}
    for way, port in ports.items():
        pid = os.fork()
        if pid == 0:
            serve(way, port)
            os._exit(0)
        pids[way] = pid
    try:
        time.sleep(0.5)
        micros = uvloop.run(measure(ports, pids, args.calls))
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
    print(f"server CPU a call (µs), {ROUNDS} rounds of {args.calls} calls at concurrency {CONCURRENCY}:")
    for way in WAYS:
        print(f"  {way:>17}: " + " ".join(f"{value:.0f}" for value in micros[way]))
    higher = sum(s > u for s, u in zip(micros["request-streaming"], micros["unary"]))
    print(f"request-streaming higher in {higher} of {ROUNDS} rounds")


if __name__ == "__main__":
    main()
