"""`meshgate chat` and `meshgate sessions` against router stand-ins: a stream
that ends without its completion (a real router never does:
tests/integration/test_cli_chat.py), a completion with rate limits, a
listing in pages."""

from __future__ import annotations

import contextlib
import io

import grpc
import pytest

from meshgate import cli
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc


@contextlib.asynccontextmanager
async def stand_in(router: router_service_pb2_grpc.RouterServiceServicer):
    """The address of a server answering as ``router``, stopped on the way out."""
    server = grpc.aio.server()
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


class CutShortRouter(router_service_pb2_grpc.RouterServiceServicer):
    """A delta, then ``last``: nothing, or a message with neither a delta
    nor a completion (as a router once sent: an empty serialized completion)."""

    def __init__(self, last: tuple[pb.ChatResponse, ...]) -> None:
        self.last = last

    async def Chat(self, request, context):
        yield pb.ChatResponse(delta=pb.TextDelta(text="The capital of"))
        for response in self.last:
            yield response


@pytest.mark.parametrize("last", [(), (pb.ChatResponse(),)], ids=["nothing", "an empty message"])
async def test_a_stream_without_its_completion_is_an_error_not_an_answer(last):
    out = io.StringIO()
    async with stand_in(CutShortRouter(last)) as router:
        with pytest.raises(cli.IncompleteAnswer):
            await cli.chat(router, "key", "What is the capital of France?", out=out)
    assert out.getvalue() == "The capital of"


class LimitedRouter(router_service_pb2_grpc.RouterServiceServicer):
    """An answer whose completion says the key's two per-minute windows."""

    async def Chat(self, request, context):
        yield pb.ChatResponse(delta=pb.TextDelta(text="Paris."))
        windows = [
            pb.RateLimit(
                kind=pb.RATE_LIMIT_KIND_REQUESTS_PER_MINUTE, limit=60, remaining=59, reset_ms=59_500
            ),
            pb.RateLimit(
                kind=pb.RATE_LIMIT_KIND_TOKENS_PER_MINUTE, limit=10_000, remaining=9_800, reset_ms=250
            ),
        ]
        yield pb.ChatResponse(completion=pb.ChatCompletion(rate_limits=windows, trace_id="t"))


async def test_chat_tells_the_rate_limits_the_answer_was_admitted_under():
    out = io.StringIO()
    async with stand_in(LimitedRouter()) as router:
        await cli.chat(router, "key", "What is the capital of France?", out=out)
    assert out.getvalue().endswith(
        "rate limits: 59/60 requests a minute left (more in 59.5 s),"
        " 9800/10000 tokens a minute left (more in 0.2 s)\n"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # Bytes that are not UTF-8 reach argv as lone surrogates.
        (["caf\udce9?"], "argument prompt: not valid UTF-8"),
        (["hi", "--session", "\udcff"], "argument --session: not valid UTF-8"),
        (["hi", "--max-tokens", "99999999999"], "argument --max-tokens: a whole number from 1 to 2147483647"),
        (["hi", "--max-tokens", "0"], "argument --max-tokens: a whole number from 1 to 2147483647"),
        (["hi", "--api-key", "clé"], "argument --api-key: an API key is printable ASCII"),
        (["hi", "--api-key", "key\n"], "argument --api-key: an API key is printable ASCII"),
    ],
)
def test_what_no_call_can_carry_is_a_usage_error_before_any_call(arguments, message, capsys):
    """Each failed as a traceback (UnicodeEncodeError, ValueError: Value
    out of range) or as INTERNAL: Invalid metadata."""
    # A port nothing listens on: refused in parsing, nothing is dialled.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chat", "--router", "127.0.0.1:1", *arguments])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "router", "message"),
    [
        # A review: grpc dialled 1.2.3.4:34463 (99999 modulo 65536) and 127.0.0.1:443.
        ("chat", "1.2.3.4:99999", "argument --router: port 99999 is not 1-65535"),
        ("chat", "localhost", "argument --router: 'localhost' names no port"),
        ("chat", "127.0.0.1:0", "argument --router: port 0 is not 1-65535"),
        ("sessions", "dns:///router:70000", "argument --router: port 70000 is not 1-65535"),
    ],
)
def test_a_router_address_grpc_would_dial_elsewhere_is_a_usage_error(command, router, message, capsys):
    # Parsing refuses it before anything is dialled.
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--router", router, *(["hi"] if command == "chat" else [])])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


class PagedRouter(router_service_pb2_grpc.RouterServiceServicer):
    """A listing of five sessions in pages of two, as the router pages it."""

    SESSIONS = [pb.SessionSummary(session_id=f"s{n}", version=n, turn_count=2 * n) for n in range(5, 0, -1)]

    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def ListSessions(self, request, context):
        self.tokens.append(request.page_token)
        start = int(request.page_token or 0)
        following = str(start + 2) if start + 2 < len(self.SESSIONS) else ""
        return pb.ListSessionsResponse(sessions=self.SESSIONS[start : start + 2], next_page_token=following)


async def test_sessions_list_follows_the_listings_pages_to_its_end():
    router = PagedRouter()
    out = io.StringIO()
    async with stand_in(router) as address:
        await cli.sessions(address, "key", "list", out=out)
    header, *rows = out.getvalue().splitlines()
    assert header.split()[:3] == ["session", "version", "turns"]
    assert [row.split()[:3] for row in rows] == [[f"s{n}", str(n), str(2 * n)] for n in range(5, 0, -1)]
    assert router.tokens == ["", "2", "4"]
