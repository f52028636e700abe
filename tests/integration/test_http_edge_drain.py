"""The HTTP edge stopped with a stream under way: a real HttpServer on
loopback, a scripted turn behind it (no mesh)."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshgate.config import ModelSettings, RouterSettings
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.http_edge import HttpEdge, HttpServer
from services.router.pipeline import Delta
from tests.unit.test_router_http_edge import KEY, ScriptedPipeline

pytestmark = pytest.mark.integration


class EndlessPipeline(ScriptedPipeline):
    """A turn that streams a delta every 10 ms and never completes."""

    def __init__(self) -> None:
        super().__init__([])

    async def run(self, request, tenant, session_id, budget, create_session=False, carry_last_text=False):
        while True:
            yield Delta("word ")
            await asyncio.sleep(0.01)


async def test_a_stream_the_routers_grace_cuts_ends_with_an_error_event_after_the_whole_grace():
    """A bug hunt: the HTTP edge was stopped after the gRPC drain with a
    5 s grace of its own (10 s for gRPC), and a stream it cut ended as a
    silent short answer (an ordinary chunk, then EOF). Now it drains with
    the gRPC server, for the grace it is given, and a cut stream ends with
    an error event saying how much went out, without [DONE]."""
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), EndlessPipeline(), None
    )
    server = HttpServer(edge, "127.0.0.1:0", 5.0, 65536, graceful_s=30.0)
    await server.start()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode()
        )
        await writer.drain()
        assert b"word" in await asyncio.wait_for(reader.readuntil(b"word"), 5)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(server.stop(0.5), 5)
        stopped_after = loop.time() - began
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    # The whole grace it was given (not its own 30 s, nor nothing).
    assert 0.4 < stopped_after < 3
    events = [e for e in answer.decode(errors="replace").split("\r\n") if e.startswith("data: ")]
    error = json.loads(events[-1][len("data: ") :])["error"]
    assert error["code"] == "STREAM_ENDED_EARLY" and int(error["metadata"]["delivered_deltas"]) > 10
    assert "data: [DONE]" not in answer.decode(errors="replace")
