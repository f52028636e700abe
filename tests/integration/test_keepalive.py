"""Our channels' keepalive pings never get a connection closed as a ping flood.

A grpc-core server answers pings it judges too frequent with GOAWAY
ENHANCE_YOUR_CALM "too_many_pings" and closes the connection, failing the
calls on it (meshgate/serving.py says when it judges so). These run real grpc
servers with the ping policy of each of our peers, our own servers' and
tritonserver's defaults, against channels with our options, over 127.0.0.1.
Every ping interval is divided by SCALE so that minutes of traffic take
seconds (grpc-core's two hours for a ping on an idle connection stay two
hours). A connection the server closed shows as a failed call, or as calls
arriving from a second client port.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from meshgate import serving
from tests.mesh import CALL_TIMEOUT_S

# Behind `make test-keepalive`: ~45 s of scaled ping intervals, outside the
# suite's 15-minute bound.
pytestmark = [pytest.mark.integration, pytest.mark.keepalive]

SCALE = 20
_INTERVALS = ("grpc.keepalive_time_ms", serving.MIN_RECV_PING_INTERVAL_ARG)

# tritonserver's gRPC keepalive defaults (its --grpc-keepalive-* and
# --grpc-http2-* flags): grpc-core's server policy, spelled out.
TRITON_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 7_200_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    (serving.MIN_RECV_PING_INTERVAL_ARG, serving.TRITON_MIN_RECV_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
]

# A reply big enough that the client's BDP probe pings too.
REPLY_BYTES = 100_000


def scaled(options: list[tuple[str, object]], scale: int = SCALE) -> list[tuple[str, object]]:
    return [(key, value // scale if key in _INTERVALS else value) for key, value in options]


@contextlib.asynccontextmanager
async def serving_on(options: list[tuple[str, object]]):
    """A server whose one method sleeps the milliseconds it is asked to, saying
    nothing meanwhile, then replies; yields its address and the peer of every call."""
    peers: list[str] = []

    async def reply(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.append(context.peer())
        await asyncio.sleep(int(request) / 1000)
        return b"x" * REPLY_BYTES

    async def echo(requests, context: grpc.aio.ServicerContext):
        peers.append(context.peer())
        async for request in requests:
            yield request

    server = grpc.aio.server(options=options)
    handlers = {
        "Reply": grpc.unary_unary_rpc_method_handler(reply),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Keepalive", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", peers
    finally:
        await server.stop(None)


async def bursts_with_idle_gaps(
    server_options, client_options, idle_s: float = 3.0, silent_s: float = 2.0, cycles: int = 2
) -> tuple[list[str], list[str]]:
    """What our channels do: bursts of calls, idle gaps, calls the server is
    silent on for a while (a long prefill). Returns the calls that failed and
    the client address of every call the server took."""
    failures = []
    async with (
        serving_on(server_options) as (address, peers),
        grpc.aio.insecure_channel(address, options=client_options) as channel,
    ):
        call = channel.unary_unary("/t.Keepalive/Reply")

        async def one(silent_ms: int) -> None:
            try:
                await call(str(silent_ms).encode(), timeout=60)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")

        for _ in range(cycles):
            for _ in range(5):
                await one(0)
            await asyncio.sleep(idle_s)
            await one(int(silent_s * 1000))
    return failures, peers


async def test_triton_channels_ping_as_rarely_as_triton_allows() -> None:
    # Idle gaps of 3 scaled mesh keepalives (60 s), silences of 2 (40 s): the
    # mesh keepalive got this connection closed within them.
    failures, peers = await bursts_with_idle_gaps(
        scaled(TRITON_SERVER_OPTIONS), scaled(serving.TRITON_CHANNEL_OPTIONS)
    )
    assert failures == []
    assert len(set(peers)) == 1, peers


async def test_an_idle_open_stream_to_triton_outlives_several_keepalives() -> None:
    # The inference service keeps ModelStreamInfer calls open and idle
    # between requests (services/inference/backends.py, TritonStreams): an
    # open call, so the channel pings every keepalive (5 minutes, scaled to
    # 5 s), which Triton's default policy allows while a call is open. (By
    # hand: pinging 4 times as often, with grpc.http2.max_pings_without_data
    # 0, this stream was closed with GOAWAY too_many_pings; so it was at this
    # test's scale, 60, whose 17.5 s of idle time took 52 s at SCALE.)
    scale = 60
    async with (
        serving_on(scaled(TRITON_SERVER_OPTIONS, scale)) as (address, peers),
        grpc.aio.insecure_channel(address, options=scaled(serving.TRITON_CHANNEL_OPTIONS, scale)) as channel,
    ):
        keepalive_s = serving.TRITON_MIN_RECV_PING_INTERVAL_MS / scale / 1000
        # Open through the idle time on purpose, and bounded past it.
        stream = channel.stream_stream("/t.Keepalive/Echo")(timeout=3.5 * keepalive_s + CALL_TIMEOUT_S)
        await stream.write(b"first")
        assert await stream.read() == b"first"
        await asyncio.sleep(3.5 * keepalive_s)
        await stream.write(b"after the idle time")
        assert await stream.read() == b"after the idle time"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        assert len(set(peers)) == 1, peers


async def test_mesh_channels_ping_as_rarely_as_our_servers_allow() -> None:
    # Plain (a mesh with TLS off, or a client of the router's public port),
    # and with what mesh channels over TLS add; side by side, to save time.
    results = await asyncio.gather(
        bursts_with_idle_gaps(scaled(serving.SERVER_OPTIONS), scaled(serving.CHANNEL_OPTIONS)),
        bursts_with_idle_gaps(
            scaled(serving.SERVER_OPTIONS), scaled([*serving.CHANNEL_OPTIONS, *serving._MESH_PEER_OPTIONS])
        ),
    )
    for failures, peers in results:
        assert failures == []
        assert len(set(peers)) == 1, peers


async def test_our_servers_still_close_a_connection_that_pings_too_often() -> None:
    # Unscaled: a caller of the router's public port pinging every second
    # while idle (our servers accept one per KEEPALIVE_TIME_MS // 2 = 10 s).
    flooding = [
        ("grpc.keepalive_time_ms", 1_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    failures, peers = await bursts_with_idle_gaps(
        serving.SERVER_OPTIONS, flooding, idle_s=6.0, silent_s=0.0, cycles=1
    )
    # The connection was closed: the call after the gap failed, or the
    # channel made a new connection for it.
    assert failures or len(set(peers)) == 2, (failures, peers)
