"""The HTTP edge stopped with a stream under way: a real HttpServer on
loopback, a scripted turn behind it (no mesh)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket

import pytest

from meshgate.config import ModelSettings, RouterSettings
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.http_edge import HttpEdge, HttpServer
from services.router.pipeline import Answer, CacheStatus, Completion, Delta
from tests.unit.test_router_http_edge import KEY, ScriptedPipeline

# Serial (make test runs it alone): bounds a drain at 2 s.
pytestmark = [pytest.mark.integration, pytest.mark.serial]


def _app_errors(caplog) -> list[str]:
    """Errors logged but uvicorn's own notice that its grace ran out."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "ERROR" and "timeout graceful shutdown exceeded" not in r.getMessage()
    ]


class EndlessPipeline(ScriptedPipeline):
    """A turn that streams a delta every 10 ms and never completes."""

    def __init__(self) -> None:
        super().__init__([])

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **_
    ):
        # Each piece one more token, as the inference service counts them.
        for tokens in itertools.count(1):
            yield Delta("word ", completion_tokens=tokens)
            await asyncio.sleep(0.01)


async def test_a_stream_the_routers_grace_cuts_ends_with_an_error_event_after_the_whole_grace(caplog):
    """A bug hunt: the HTTP edge was stopped after the gRPC drain with a
    5 s grace of its own (10 s for gRPC), and a stream it cut ended as a
    silent short answer (an ordinary chunk, then EOF). Now it drains with
    the gRPC server, for the grace it is given, and a cut stream ends with
    an error event saying how much went out, without [DONE]."""
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), EndlessPipeline(), None
    )
    server = HttpServer(edge, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0, graceful_s=30.0)
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
    # The tokens behind them too: the count of the last piece written.
    assert error["metadata"]["delivered_tokens"] == error["metadata"]["delivered_deltas"]
    assert "data: [DONE]" not in answer.decode(errors="replace")
    assert not _app_errors(caplog)


async def _serving():
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), EndlessPipeline(), None
    )
    server = HttpServer(edge, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0, graceful_s=30.0)
    await server.start()
    return server


def _chat_request(stream: bool) -> bytes:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    ).encode()


async def test_a_whole_answer_the_grace_cuts_is_a_503_in_openais_shape(caplog):
    """A review: uvicorn's plain-text 500 answered a non-streamed chat the
    router's grace cut."""
    server = await _serving()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(_chat_request(stream=False))
        await writer.drain()
        await asyncio.sleep(0.2)  # the turn under way, nothing sent yet
        await asyncio.wait_for(server.stop(0.3), 5)
        answer = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "application/json" in head
    assert f"content-length: {len(body)}" in head
    error = json.loads(body)["error"]
    assert (error["code"], error["type"]) == ("STREAM_ENDED_EARLY", "service_unavailable_error")
    assert not _app_errors(caplog)


async def test_a_client_gone_while_the_router_drains_is_a_disconnect_not_an_error(caplog):
    """A review: the error event written for the drain marked the response
    complete, so a client that left during it surfaced as an ASGI exception
    (an ERROR with a traceback) instead of a disconnect."""
    server = await _serving()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(_chat_request(stream=True))
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"word"), 5)
    stopping = asyncio.ensure_future(server.stop(3.0))
    await asyncio.sleep(0.1)
    writer.close()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(stopping, 10)
    # The stream ended with its client, not at the grace's end.
    assert loop.time() - began < 2
    assert not _app_errors(caplog)


class SavingPipeline(ScriptedPipeline):
    """A session turn whose whole answer is ready and which is being stored
    when the router stops: it never finishes storing."""

    def __init__(self) -> None:
        super().__init__([])

    async def run(self, request, tenant, session_id, budget, before_saving, **_):
        await before_saving("session-1")
        await asyncio.sleep(3600)
        yield Delta("never")


async def test_a_session_turn_cut_while_it_is_stored_tells_the_client_not_to_resend_it(caplog):
    """The OpenAI SDKs resend a 503 by default; a session turn cut while its
    turn was being stored may be stored, and resent it would be stored twice."""
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), SavingPipeline(), None
    )
    server = HttpServer(edge, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0, graceful_s=30.0)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(_chat_request(stream=False))
        await writer.drain()
        await asyncio.sleep(0.2)
        await asyncio.wait_for(server.stop(0.3), 5)
        answer = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "x-should-retry: false" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "STREAM_ENDED_EARLY" and error["metadata"]["turn_may_be_stored"] == "true"
    assert not _app_errors(caplog)


class PausingAnswer(ScriptedPipeline):
    """An answer whose one piece is larger than the socket's buffers take
    from a client that reads nothing: its finish then waits for the socket
    to drain."""

    def __init__(self) -> None:
        answer = Answer(text="x", completion_tokens=1, finish_reason="stop")
        super().__init__(
            [Delta("x" * (16 << 20)), Completion(answer, CacheStatus.MISS, 0.0, "", 0, "", text="end")]
        )


async def test_a_finish_the_grace_cuts_while_it_waits_on_a_paused_socket_is_never_sent_as_done(caplog):
    """A bug hunt (none found): the finish and [DONE] wait for the socket to
    drain before uvicorn writes them, so the grace's cancel landing there
    ends the stream with an error event and no [DONE], and the turn is
    closed unfinished (recorded cancelled): the client and the record agree.
    Once the finish is written, the turn is recorded completed with no
    wait between (the pipeline's close takes no await)."""
    settings = RouterSettings(dev_api_key=KEY)
    pipeline = PausingAnswer()
    edge = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), pipeline, None)
    server = HttpServer(edge, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0, graceful_s=30.0)
    await server.start()
    loop = asyncio.get_running_loop()
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.setblocking(False)
    try:
        await loop.sock_connect(connection, ("127.0.0.1", server.port))
        await loop.sock_sendall(connection, _chat_request(stream=True))
        await asyncio.sleep(0.5)  # the piece written, the finish waiting
        await asyncio.wait_for(server.stop(0.3), 5)
        answer = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(connection, 1 << 20), 5):
            answer += chunk
    finally:
        connection.close()
    tail = answer[-1000:].decode()
    assert "data: [DONE]" not in tail
    error = json.loads(tail.split("data: ")[-1].split("\n\n")[0])["error"]
    # The piece went out, the finish did not.
    assert error["code"] == "STREAM_ENDED_EARLY" and error["metadata"]["delivered_deltas"] == "1"
    assert not pipeline.read_to_the_end
    assert not _app_errors(caplog)
