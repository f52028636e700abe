"""`meshgate chat` against a router stand-in whose stream ends without its
completion (a real router never does: tests/integration/test_cli_chat.py)."""

from __future__ import annotations

import io

import grpc
import pytest

from meshgate import cli
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc


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
    server = grpc.aio.server()
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(CutShortRouter(last), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        out = io.StringIO()
        with pytest.raises(cli.IncompleteAnswer):
            await cli.chat(f"127.0.0.1:{port}", "key", "What is the capital of France?", out=out)
        assert out.getvalue() == "The capital of"
    finally:
        await server.stop(None)
