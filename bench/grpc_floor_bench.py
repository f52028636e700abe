"""What one streamed message costs in grpcio alone: the floor under the mesh's
CPU per streamed token (issue 13).

    flock /tmp/bench.lock .venv/bin/python bench/grpc_floor_bench.py
    flock /tmp/bench.lock .venv/bin/python bench/grpc_floor_bench.py \\
        --variant baseline --variant throughput:grpc.optimization_target=throughput
    flock /tmp/bench.lock .venv/bin/python bench/grpc_floor_bench.py --messages 11 --interval-ms 90 \\
        --calls 2 --repeats 2 --spread --transport tcp --transport unix --rounds 3

No services, no Triton, no protobuf: bare grpc.aio on uvloop with the mesh's
own server and channel options (meshgate/serving.py) and its mutual TLS
(certificates from meshgate/local/certs.py). A *server* process streams
``--messages`` payloads of ``--bytes`` bytes per call, one every
``--interval-ms`` (a model's pace; 0: as fast as it can), in the role of
the inference service; a *relay* process serves a plain-text port (the
router's public port) and relays each call to the server over mutual TLS,
reading ahead and joining what arrived together as the mesh does
(meshgate/streaming.batches); the client is this process. Three paths, each
at concurrency 1 and ``--concurrency``: client -> server over mutual TLS
(direct), client -> relay -> server, and client -> outer relay -> relay ->
server (relayed twice: as many hops as a generation through the mesh,
client -> router -> inference service -> Triton, one of them over mutual
TLS as there). The direct path is over mutual TLS too, so relayed twice
less direct is two plain-text hops, where the mesh adds one plain and one
mutual-TLS hop to a call straight to Triton (plain). Reported: messages the client received per
second, the time to each call's first message (p50: what the hops alone
add to time to first token, with no service code), and each process's CPU
(user + system, from /proc) per message the client received.

``--transport unix`` puts every hop on unix socket files instead of
loopback TCP (the same mutual TLS, checked by the mesh identity as over
TCP); ``--transport tcp --transport unix --rounds N`` measures each
variant on both, alternating, N times.

A ``--variant NAME:KEY=VALUE,...`` starts the server and the relay again
with extra grpc options (their servers' and channels' alike, as if
serving.py set them) or environment variables (an upper-case key, such as
GRPC_EXPERIMENTS or GRPC_POLL_STRATEGY); the client keeps the defaults. All
variants run in one invocation, so that their ratios are comparable on a
shared machine.
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
import tempfile
import time

import grpc
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshgate import serving, streaming  # noqa: E402
from meshgate.config import MeshSettings  # noqa: E402
from meshgate.local import certs  # noqa: E402
from meshgate.local.stack import free_port  # noqa: E402
from meshgate.mesh_auth import Mesh  # noqa: E402

METHOD = "/floor.Floor/Stream"
# A request: how many messages, their size, and the pause between them (µs).
REQUEST = struct.Struct("<III")
# The mesh's roles: the server stands for the inference service, the relay
# for the router (its public port in plain text, its calls over mutual TLS).
SERVER_ROLE, RELAY_ROLE = "inference", "router"


def mesh_settings(certs_dir: pathlib.Path) -> MeshSettings:
    return MeshSettings(
        ca_file=str(certs.ca_path(certs_dir)),
        cert_file=str(certs_dir / "{service}.pem"),
        key_file=str(certs_dir / "{service}.key"),
    )


def bytes_handler(behaviour) -> grpc.GenericRpcHandler:
    """The one method, on raw bytes (no serializers)."""
    handler = grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.method_handlers_generic_handler("floor.Floor", {"Stream": handler})


async def serve_stream(request: bytes, context):
    count, size, pause_us = REQUEST.unpack(request)
    payload = b"x" * size
    for _ in range(count):
        if pause_us:
            await asyncio.sleep(pause_us / 1e6)
        yield payload


async def run_role(
    role: str, address: str, upstream: str, certs_dir: pathlib.Path, tls: bool, upstream_tls: bool = True
) -> None:
    if role == "server":
        server = grpc.aio.server(options=serving.SERVER_OPTIONS)
        server.add_generic_rpc_handlers([bytes_handler(serve_stream)])
        if tls:
            credentials = Mesh(mesh_settings(certs_dir), SERVER_ROLE).server_credentials()
            server.add_secure_port(address, credentials)
        else:
            server.add_insecure_port(address)
    else:
        secure = tls and upstream_tls
        security = Mesh(mesh_settings(certs_dir), RELAY_ROLE).to(SERVER_ROLE) if secure else None
        channel = serving.client_channel(upstream, security, traced=False)
        relayed = channel.unary_stream(METHOD)

        async def relay(request: bytes, context):
            call = relayed(request)
            try:
                async for batch in streaming.batches(call):
                    yield batch[0] if len(batch) == 1 else b"".join(batch)
            finally:
                if not call.done():
                    call.cancel()

        server = grpc.aio.server(options=serving.SERVER_OPTIONS)
        server.add_generic_rpc_handlers([bytes_handler(relay)])
        server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def cpu_seconds(pid: int | str) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(
    role: str, address: str, upstream: str, certs_dir: pathlib.Path, args, extra: dict, upstream_plain=False
) -> subprocess.Popen:
    env = dict(os.environ, **{k: v for k, v in extra.items() if k.isupper()})
    options = [f"{k}={v}" for k, v in extra.items() if not k.isupper()]
    command = [sys.executable, __file__, "--role", role, "--address", address, "--upstream", upstream]
    command += ["--certs", str(certs_dir), *(["--no-tls"] if args.no_tls else [])]
    command += ["--upstream-plain"] if upstream_plain else []
    command += [arg for option in options for arg in ("--option", option)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{role} did not start")
    return process


async def load(target: str, tls_security, concurrency: int, args) -> tuple[int, float, list[float]]:
    """Calls from ``concurrency`` workers; returns messages received, wall
    seconds and each call's seconds to its first message."""
    if tls_security is None:
        channel = grpc.aio.insecure_channel(target, options=serving.CHANNEL_OPTIONS)
    else:
        channel = serving.client_channel(target, tls_security, traced=False)
    request = REQUEST.pack(args.messages, args.bytes, int(args.interval_ms * 1000))
    stream = channel.unary_stream(METHOD)
    received = 0
    first_message_s: list[float] = []

    async def worker(calls: int, delay_s: float = 0.0) -> None:
        nonlocal received
        await asyncio.sleep(delay_s)
        for _ in range(calls):
            started = time.perf_counter()
            first = True
            async for _message in stream(request):
                if first:
                    first_message_s.append(time.perf_counter() - started)
                    first = False
                received += 1

    await worker(2)  # connect and warm
    received = 0
    first_message_s.clear()
    # Alone, four times the calls: enough CPU to read in /proc's 10 ms ticks.
    calls = args.calls * 4 if concurrency == 1 else args.calls
    # --spread: the workers start evenly over one pause, so their messages
    # reach each process one at a time (streams whose sends are not in step)
    # rather than together, as all starting at once makes them.
    stagger_s = args.interval_ms / 1000 / concurrency if args.spread else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker(calls, i * stagger_s) for i in range(concurrency)))
    wall = time.perf_counter() - started
    await channel.close()
    return received, wall, first_message_s


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in settings.split(",") if pair)


def addresses(transport: str, directory: pathlib.Path) -> tuple[str, str, str]:
    """The server's, the relay's and the outer relay's listening addresses:
    loopback TCP ports, or unix socket files in ``directory`` (a fresh one per
    measurement, so that no socket file is left from the previous one)."""
    if transport == "unix":
        return tuple(f"unix:{directory / name}.sock" for name in ("server", "relay", "outer"))
    return tuple(f"127.0.0.1:{free_port()}" for _ in range(3))


def measure(args, certs_dir: pathlib.Path, variant: str, extra: dict, transport: str) -> list[str]:
    sockets_dir = pathlib.Path(tempfile.mkdtemp(prefix="sockets-", dir=certs_dir))
    server_address, relay_address, outer_address = addresses(transport, sockets_dir)
    server = start("server", server_address, "", certs_dir, args, extra)
    relay = start("relay", relay_address, server_address, certs_dir, args, extra)
    # In front of the relay, on its plain-text port: the second hop.
    outer = start("relay", outer_address, relay_address, certs_dir, args, extra, upstream_plain=True)
    rows = []
    try:
        client_security = None if args.no_tls else Mesh(mesh_settings(certs_dir), RELAY_ROLE).to(SERVER_ROLE)
        paths = {
            "direct" + ("" if args.no_tls else " (mTLS)"): (server_address, client_security),
            "relayed": (relay_address, None),
            "relayed twice": (outer_address, None),
        }
        for concurrency in (1, args.concurrency):
            for path, (target, security) in paths.items():
                pids = {"server": server.pid, "relay": relay.pid, "client": "self"}
                repeats = []
                for _ in range(args.repeats):
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    received, wall, first_s = uvloop.run(load(target, security, concurrency, args))
                    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                    per_message = {n: used[n] / received * 1e6 for n in used}
                    repeats.append((received / wall, per_message, statistics.median(first_s) * 1000))
                rate = statistics.median(r[0] for r in repeats)
                per = {n: statistics.median(r[1][n] for r in repeats) for n in pids}
                first_ms = statistics.median(r[2] for r in repeats)
                # The inner relay's CPU; the outer one's is not read.
                relay_cell = "-" if path.startswith("direct") else f"{per['relay']:.1f}"
                rows.append(
                    f"| {variant} | {transport} | {path} | {concurrency} | {rate:.0f} | {first_ms:.2f} "
                    f"| {per['server']:.1f} | {relay_cell} | {per['client']:.1f} |"
                )
    finally:
        for process in (outer, relay, server):
            process.terminate()
            process.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=64, help="messages per call (a 64-token answer)")
    parser.add_argument("--bytes", type=int, default=150, help="bytes per message (a serialized delta)")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="pause between messages; 0: none")
    parser.add_argument("--calls", type=int, default=6, help="calls per worker (x4 at concurrency 1)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row; the median is shown")
    parser.add_argument("--no-tls", action="store_true", help="plain text everywhere")
    parser.add_argument(
        "--spread", action="store_true", help="workers start evenly over one --interval-ms, not at once"
    )
    parser.add_argument(
        "--variant", action="append", type=parse_variant, help="NAME:KEY=VALUE,... (repeatable)"
    )
    # The child processes' own arguments.
    parser.add_argument("--role", choices=("server", "relay"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--transport",
        action="append",
        choices=("tcp", "unix"),
        help="between the processes: loopback TCP (default) or unix sockets; both given: "
        "each variant on each, alternating, --rounds times",
    )
    parser.add_argument("--rounds", type=int, default=1, help="times every variant and transport is run")
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--upstream-plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        # A variant's grpc options, as if serving.py set them.
        for option in args.option:
            key, _, value = option.partition("=")
            value = int(value) if value.lstrip("-").isdigit() else value
            serving.SERVER_OPTIONS.append((key, value))
            serving.CHANNEL_OPTIONS.append((key, value))
        tls = not args.no_tls
        uvloop.run(run_role(args.role, args.address, args.upstream, args.certs, tls, not args.upstream_plain))
        return
    variants = args.variant or [("baseline", {})]
    transports = args.transport or ["tcp"]
    rows = [
        "| variant | transport | path | concurrency | messages/s | first message p50 (ms) "
        "| server CPU µs/message | relay | client |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as directory:
        certs_dir = pathlib.Path(directory)
        certs.ensure(certs_dir)
        for _ in range(args.rounds):
            for name, extra in variants:
                for transport in transports:
                    rows += measure(args, certs_dir, name, extra, transport)
    print(
        f"grpcio {grpc.__version__}, {args.messages} messages of {args.bytes} B per call, "
        f"one every {args.interval_ms:g} ms, {args.calls} calls per worker"
        f"{', workers spread over one pause' if args.spread else ''}, median of {args.repeats}; "
        f"{os.cpu_count()} CPU cores shared by all three processes\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
