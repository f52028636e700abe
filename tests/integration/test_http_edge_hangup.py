"""A client gone while the HTTP edge waits on a turn's first token, nothing
written to it: a real HttpServer on loopback, a scripted turn behind it (no
mesh; tests/integration/test_http_edge.py shows a cancelled turn cancels its
generation in Triton)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from meshgate.config import ModelSettings, RouterSettings
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.http_edge import HttpEdge, HttpServer, _probe_when_idle
from services.router.pipeline import Delta
from tests.unit.test_router_http_edge import KEY, ScriptedPipeline

# Serial (make test runs it alone): a silent peer is cut at its stall timeout.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

# Linux's TCP_REPAIR (linux/tcp.h): a socket closed in repair mode sends
# nothing, no FIN nor RST, as a host that lost power or its network.
TCP_REPAIR = 19
STALL_TIMEOUT_S = 1.0


class SlowFirstToken(ScriptedPipeline):
    """A turn whose first token never comes (a long prompt's prefill, a
    queue at the model); notes when it began and when it was cancelled."""

    def __init__(self) -> None:
        super().__init__([])
        self.began = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def run(self, request, tenant, session_id, budget, **_):
        self.began.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield Delta("never")


async def _waiting_client(stream: bool) -> tuple[HttpServer, SlowFirstToken, socket.socket]:
    """A router whose turn waits on its first token, and a client whose chat
    request it is waiting on."""
    settings = RouterSettings(dev_api_key=KEY)
    pipeline = SlowFirstToken()
    edge = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), pipeline, None)
    server = HttpServer(edge, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=STALL_TIMEOUT_S)
    await server.start()
    loop = asyncio.get_running_loop()
    connection = socket.socket()
    connection.setblocking(False)
    await loop.sock_connect(connection, ("127.0.0.1", server.port))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    await loop.sock_sendall(
        connection,
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode(),
    )
    await asyncio.wait_for(pipeline.began.wait(), 5)
    return server, pipeline, connection


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_closes_while_the_first_token_is_awaited_cancels_the_turn_at_once(stream):
    """Its FIN is read while nothing is written to it: the turn is cancelled
    then, not when its first token would have been written."""
    server, pipeline, connection = await _waiting_client(stream)
    try:
        connection.close()
        await asyncio.wait_for(pipeline.cancelled.wait(), 1)
    finally:
        await server.stop(1.0)


async def test_a_client_that_vanishes_silently_while_the_first_token_is_awaited_is_dropped():
    """No FIN, no RST, nothing outstanding to go unacknowledged (which
    router.http_stalled_client_timeout_s judges): the edge's TCP keepalive
    probes the idle connection after that timeout, and the probe's answer
    (a RST from a host that lost the connection; none from one that is
    gone, after the probes) drops it, cancelling the turn. Without the
    keepalive it waited until its first token was written."""
    server, pipeline, connection = await _waiting_client(stream=True)
    try:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except OSError as error:  # needs CAP_NET_ADMIN
            pytest.skip(f"no TCP_REPAIR here: {error}")
        connection.close()  # in repair mode: nothing is sent
        loop = asyncio.get_running_loop()
        gone_at = loop.time()
        await asyncio.wait_for(pipeline.cancelled.wait(), STALL_TIMEOUT_S * 1.5 + 2)
        assert loop.time() - gone_at >= STALL_TIMEOUT_S * 0.9  # idle for the timeout first
    finally:
        await server.stop(1.0)


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keepalive timings")
@pytest.mark.parametrize(
    ("timeout_s", "idle_s", "interval_s"), [(30.0, 30, 8), (0.2, 1, 1), (86_400.0, 32767, 8192)]
)
def test_an_accepted_sockets_keepalive_takes_any_stalled_client_timeout(timeout_s, idle_s, interval_s):
    """Linux refuses a keepalive idle time or interval above 32,767 s
    (EINVAL): a router.http_stalled_client_timeout_s of a day raised in
    every HTTP connection's setup. It is probed from then instead."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        accepted, _ = server.accept()
        with accepted:
            _probe_when_idle(accepted, timeout_s)
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle_s
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval_s
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
