"""Large messages still flow both ways under the mesh's fixed HTTP/2 windows.

serving.FLOW_CONTROL_OPTIONS turns grpc-core's BDP probes off (a PING per
read burst, on every small streamed message) and pins a 1 MiB window
instead. The largest messages the services exchange are an embedding batch
and an assembled context, up to serving.MAX_MESSAGE_BYTES: under these
options they must arrive whole, on several streams of one connection at
once, with no stall (the deadline would fail the test). It is not a test of
the window's size: grpc announces what a message being read needs whatever
the window (a review's scratch run passed with a 1 KiB window too).
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from meshgate import serving

_METHOD = "/meshgate.test.Echo/Chat"


def _echo_handler() -> grpc.GenericRpcHandler:
    async def chat(requests, context):
        async for payload in requests:
            yield payload

    return grpc.method_handlers_generic_handler(
        "meshgate.test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(chat)}
    )


@pytest.mark.parametrize("size", [3 * 1024 * 1024 + 17, serving.MAX_MESSAGE_BYTES - 1024])
async def test_messages_of_many_windows_go_both_ways_on_concurrent_streams(size: int) -> None:
    assert ("grpc.http2.bdp_probe", 0) in serving.SERVER_OPTIONS
    assert ("grpc.http2.bdp_probe", 0) in serving.CHANNEL_OPTIONS
    server = grpc.aio.server(options=serving.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=serving.CHANNEL_OPTIONS) as channel:
            chat = channel.stream_stream(_METHOD)

            async def round_trips(seed: int) -> None:
                payloads = [os.urandom(64) * (size // 64) + bytes([seed, n]) for n in range(2)]
                call = chat(iter(payloads), timeout=60)
                received = [message async for message in call]
                assert received == payloads
                assert await call.code() == grpc.StatusCode.OK

            # Several streams at once share the connection's window too.
            await asyncio.gather(*(round_trips(seed) for seed in range(3)))
    finally:
        await server.stop(None)
