"""How the HTTP edge reads a body's bytes: a real HttpServer on loopback,
a recording turn behind it (no mesh). A body the edge refuses never reaches
the pipeline; one it takes reaches it as the ChatRequest asserted."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging

import httpx
import pytest

from meshgate.config import ModelSettings, RouterSettings
from services.router.admission import TenantCalls
from services.router.auth import Authenticator
from services.router.http_edge import HttpEdge, HttpServer
from services.router.pipeline import Answer, CacheStatus, Completion
from tests.unit.test_router_http_edge import KEY, ScriptedPipeline

pytestmark = pytest.mark.integration

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class RecordingPipeline(ScriptedPipeline):
    """Answers every turn "ok"; keeps the requests it was given."""

    def __init__(self) -> None:
        super().__init__(
            [Completion(Answer(text="ok", finish_reason="stop"), CacheStatus.MISS, 0.0, "", 0, "")]
        )
        self.requests: list = []

    async def run(self, request, *args, **kwargs):
        self.requests.append(request)
        async for event in super().run(request, *args, **kwargs):
            yield event


@pytest.fixture(scope="module")
async def edge_server():
    """(the edge's port, the pipeline behind it)."""
    settings = RouterSettings(dev_api_key=KEY)
    pipeline = RecordingPipeline()
    app = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), pipeline, None)
    server = HttpServer(app, "127.0.0.1:0", 5.0, 65536, stalled_client_timeout_s=30.0)
    await server.start()
    try:
        yield server.port, pipeline
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def edge(edge_server):
    """(httpx client on the edge's /v1, the pipeline behind it)."""
    port, pipeline = edge_server
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}/v1",
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    ) as http:
        yield http, pipeline


async def posted(edge, body: bytes, content_type: str = "application/json") -> tuple[httpx.Response, list]:
    """The answer to POST /v1/chat/completions of ``body``, and the requests
    that reached the pipeline for it."""
    http, pipeline = edge
    pipeline.requests.clear()
    answer = await http.post("/chat/completions", content=body, headers={"content-type": content_type})
    return answer, list(pipeline.requests)


def refused(answer: httpx.Response, reached: list) -> dict:
    """The OpenAI error of a 400 that stopped the body at the edge."""
    assert answer.status_code == 400, answer.text
    assert reached == []
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


# --- RFC 8259 §8.1: JSON between systems is UTF-8 ----------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "named"),
    [
        ("utf-16-le", "UTF-16-LE"),
        ("utf-16-be", "UTF-16-BE"),
        ("utf-16", "UTF-16"),
        ("utf-32-le", "UTF-32-LE"),
        ("utf-32", "UTF-32"),
    ],
)
@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-16"])
async def test_a_body_in_utf_16_or_utf_32_is_refused_whatever_its_charset_says(
    edge, encoding, named, content_type
):
    """They were served: json.loads of bytes guesses the encoding."""
    answer, reached = await posted(edge, json.dumps(CHAT).encode(encoding), content_type)
    error = refused(answer, reached)
    assert error["code"] == "MALFORMED_REQUEST"
    assert f"the body is not UTF-8 (it reads as {named})" in error["message"]


async def test_an_encoded_surrogate_is_not_utf_8(edge):
    """CESU-8's bytes of half a UTF-16 pair were read as a lone surrogate
    (json.loads of bytes decodes with surrogatepass): UTF-8 has none."""
    body = json.dumps(CHAT)[:-1].encode() + b', "user": "\xed\xa0\x80"}'
    error = refused(*await posted(edge, body))
    assert error["code"] == "MALFORMED_REQUEST"
    assert error["message"].startswith("the body is not UTF-8: ")


async def test_a_utf_8_byte_order_mark_is_ignored(edge):
    answer, reached = await posted(edge, b"\xef\xbb\xbf" + json.dumps(CHAT).encode())
    assert answer.status_code == 200, answer.text
    assert [message.content for message in reached[0].messages] == ["hi"]


# --- a key twice in one object -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model":"other","model":"m","messages":[{"role":"user","content":"hi"}]}', "model"),
        # The same key spelt with an escape: a reader comparing raw bytes sees two.
        (b'{"model":"other","mod\\u0065l":"m","messages":[{"role":"user","content":"hi"}]}', "model"),
        (b'{"model":"m","messages":[{"role":"user","content":"checked","content":"hi"}]}', "content"),
        (b'{"model":"m","messages":[{"role":"system","role":"user","content":"hi"}]}', "role"),
        (
            b'{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":"1","a":"2"}}',
            "a",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a","text":"hi"}]}]}',
            "text",
        ),
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"\\ud800":1,"\\ud800":2}', "'\\ud800'"),
    ],
    ids=["model", "model escaped", "content", "role", "metadata", "text part", "no UTF-8 form"],
)
async def test_a_key_twice_in_one_object_is_refused_at_any_depth(edge, body, key):
    """The last value was served silently: a proxy or WAF reading the first
    ("other", "checked", "system") checked another request than the one served."""
    error = refused(*await posted(edge, body))
    assert error["code"] == "MALFORMED_REQUEST"
    assert error["message"] == f"the body has a key twice in one object: {key}"


async def test_an_embeddings_body_with_a_key_twice_is_refused(edge):
    http, _ = edge
    answer = await http.post(
        "/embeddings",
        content=b'{"model":"minilm","input":"a","input":"b"}',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"] == "the body has a key twice in one object: input"


async def test_the_same_key_in_different_objects_is_no_duplicate(edge):
    body = b'{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"hi"}]}'
    answer, reached = await posted(edge, body)
    assert answer.status_code == 200, answer.text
    assert [message.content for message in reached[0].messages] == ["a", "hi"]


# --- text the edge takes and does not use ------------------------------------------------------

HI = b'{"role":"user","content":"hi"}'


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            b'{"model":"m","messages":[{"role":"user","content":"hi","name":"\\ud800"}]}',
            "messages",
            "messages[0].name must be UTF-8 text",
        ),
        (
            b'{"model":"m","messages":[{"role":"system","content":"s","name":"a\\udfff"},' + HI + b"]}",
            "messages",
            "messages[0].name must be UTF-8 text",
        ),
        (b'{"model":"m","messages":[' + HI + b'],"user":"\\ud800"}', "user", "user must be UTF-8 text"),
        (
            b'{"model":"m","messages":[' + HI + b'],"safety_identifier":"\\udc00"}',
            "safety_identifier",
            "safety_identifier must be UTF-8 text",
        ),
        (
            b'{"model":"m","messages":[' + HI + b'],"prompt_cache_key":"k\\ud800"}',
            "prompt_cache_key",
            "prompt_cache_key must be UTF-8 text",
        ),
        (
            b'{"model":"m","messages":[' + HI + b'],"metadata":{"\\ud800":"v"}}',
            "metadata",
            "metadata must be an object of UTF-8 text keys and values",
        ),
        (
            b'{"model":"m","messages":[' + HI + b'],"metadata":{"k":"\\udc00"}}',
            "metadata",
            "metadata must be an object of UTF-8 text keys and values",
        ),
    ],
    ids=[
        "user's name",
        "system's name",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "metadata key",
        "metadata value",
    ],
)
async def test_a_lone_surrogate_in_a_field_not_used_is_refused_as_in_content(edge, body, param, message):
    """A hunt's leftover: content refused JSON's escape of half a UTF-16 pair
    (is_text), these fields took it."""
    error = refused(*await posted(edge, body))
    assert (error["code"], error["param"], error["message"]) == ("MALFORMED_REQUEST", param, message)


async def test_a_lone_surrogate_in_an_embeddings_user_is_refused(edge):
    http, _ = edge
    answer = await http.post(
        "/embeddings",
        content=b'{"model":"minilm","input":"a","user":"\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "user"


async def test_text_in_the_fields_not_used_is_served(edge):
    body = {
        **CHAT,
        "messages": [{"role": "user", "content": "hi", "name": "Zoë"}],
        "user": "u-1 ✓",
        "safety_identifier": None,
        "metadata": {"purpose": "test ✓"},
    }
    answer, reached = await posted(edge, json.dumps(body).encode())
    assert answer.status_code == 200, answer.text
    assert [message.content for message in reached[0].messages] == ["hi"]


# --- fields a role does not have ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "content": "hi", "tool_call_id": None}, "tool_call_id"),
        ({"role": "user", "content": "hi", "tool_calls": None}, "tool_calls"),
        ({"role": "user", "content": "hi", "function_call": None}, "function_call"),
        ({"role": "system", "content": "s", "tool_calls": []}, "tool_calls"),
        ({"role": "developer", "content": "s", "function_call": {}}, "function_call"),
        ({"role": "assistant", "content": "a", "tool_call_id": None}, "tool_call_id"),
        # With a value: the same answer as null.
        ({"role": "user", "content": "hi", "tool_call_id": "call_1"}, "tool_call_id"),
    ],
    ids=[
        "user tool_call_id",
        "user tool_calls",
        "user function_call",
        "system tool_calls empty",
        "developer function_call empty",
        "assistant tool_call_id",
        "user tool_call_id with a value",
    ],
)
async def test_a_tool_field_on_a_role_without_it_is_refused_even_null(edge, message, field):
    """OpenAI has tool_calls and function_call on an assistant's message
    alone and tool_call_id on a tool's: null of a field a role does not
    have is still a field it does not have (a user's refusal: null was
    refused so already). These were accepted null or empty on every role."""
    body = json.dumps({**CHAT, "messages": [message, {"role": "user", "content": "hi"}]}).encode()
    error = refused(*await posted(edge, body))
    assert (error["code"], error["param"], error["message"]) == (
        "UNSUPPORTED_PARAMETER",
        "messages",
        f"messages[0]: Unrecognized argument supplied: {field}",
    )


async def test_an_assistants_null_tool_fields_are_served(edge):
    """What openai-python's message.model_dump() sends back."""
    assistant = {"role": "assistant", "content": "a", "tool_calls": None, "function_call": None}
    messages = [assistant, {"role": "user", "content": "hi"}]
    answer, reached = await posted(edge, json.dumps({**CHAT, "messages": messages}).encode())
    assert answer.status_code == 200, answer.text
    assert [message.content for message in reached[0].messages] == ["a", "hi"]


async def test_an_assistants_empty_tool_calls_array_is_refused(edge):
    """OpenAI answers it 400 (an array of at least one call); it was served
    as no calls."""
    assistant = {"role": "assistant", "content": "a", "tool_calls": []}
    messages = [{"role": "user", "content": "hi"}, assistant, {"role": "user", "content": "hi"}]
    error = refused(*await posted(edge, json.dumps({**CHAT, "messages": messages}).encode()))
    assert (error["code"], error["param"], error["message"]) == (
        "MALFORMED_REQUEST",
        "messages",
        "Invalid 'messages[1].tool_calls': empty array. "
        "Expected an array with minimum length 1, but got an empty array instead.",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"function_call": {}}, "Missing required parameter: 'messages[1].function_call.name'."),
        (
            {"tool_calls": {}},
            "Invalid type for 'messages[1].tool_calls': expected an array, but got an object instead.",
        ),
    ],
    ids=["function_call empty object", "tool_calls object"],
)
async def test_an_assistants_tool_field_of_the_wrong_shape_is_refused(edge, fields, message):
    """OpenAI's schema has function_call an object with name and arguments,
    tool_calls an array of calls; both were served as no calls."""
    assistant = {"role": "assistant", "content": "a", **fields}
    messages = [{"role": "user", "content": "hi"}, assistant, {"role": "user", "content": "hi"}]
    error = refused(*await posted(edge, json.dumps({**CHAT, "messages": messages}).encode()))
    assert (error["code"], error["param"], error["message"]) == ("MALFORMED_REQUEST", "messages", message)


# --- codings and lengths the edge does not read (a review) ---------------------------------------


async def test_a_compressed_body_is_refused_415_not_read_as_text(edge):
    """A gzip body was refused 400 as "not UTF-8"; one marked br but plain
    was served, as a reader in front of the edge would not have read it."""
    http, pipeline = edge
    body = json.dumps(CHAT).encode()
    for coding, sent in (
        ("gzip", gzip.compress(body)),
        ("br", body),
        ("gzip, identity", gzip.compress(body)),
    ):
        pipeline.requests.clear()
        answer = await http.post(
            "/chat/completions",
            content=sent,
            headers={"content-type": "application/json", "content-encoding": coding},
        )
        assert answer.status_code == 415, answer.text
        assert answer.headers["accept-encoding"] == "identity"
        assert answer.json()["error"]["code"] == "UNSUPPORTED_CONTENT_ENCODING"
        assert pipeline.requests == []
    answer = await http.post(
        "/chat/completions",
        content=body,
        headers={"content-type": "application/json", "content-encoding": "identity"},
    )
    assert answer.status_code == 200


async def exchange(port: int, request: bytes, then: bytes = b"") -> bytes:
    """What a raw HTTP/1.1 client reads back for ``request`` (then ``then``
    sent once the first answer came), until the server closes or 2 s pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        got = b""
        async with asyncio.timeout(5):
            while b"\r\n\r\n" not in got:
                got += await reader.read(65536)
        if then:
            writer.write(then)
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while chunk := await reader.read(65536):
                    got += chunk
        return got
    finally:
        writer.close()


def head(path: str, port: int, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: 127.0.0.1:{port}", f"authorization: Bearer {KEY}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_transfer_coding_other_than_chunked_is_refused_501_and_the_connection_closed(edge_server):
    """ "gzip, chunked" was de-chunked and served, the gzip ignored."""
    port, pipeline = edge_server
    pipeline.requests.clear()
    body = json.dumps(CHAT).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    got = await exchange(
        port,
        head(
            "/v1/chat/completions", port, "content-type: application/json", "transfer-encoding: gzip, chunked"
        )
        + chunked,
    )
    assert got.startswith(b"HTTP/1.1 501 "), got[:200]
    assert b"connection: close" in got.lower() and b"UNSUPPORTED_TRANSFER_CODING" in got
    assert pipeline.requests == []


async def test_a_declared_length_over_the_limit_is_refused_before_a_100_continue(edge_server):
    """curl sends "Expect: 100-continue" with a large body: it was told to
    continue, sent 20 MB, then got 413. Now the 413 comes first, no 100, and
    the connection closes (the body will not come)."""
    port, pipeline = edge_server
    pipeline.requests.clear()
    got = await exchange(
        port,
        head(
            "/v1/chat/completions",
            port,
            "content-type: application/json",
            f"content-length: {20 * 1024 * 1024}",
            "expect: 100-continue",
        ),
    )
    assert got.startswith(b"HTTP/1.1 413 "), got[:200]
    assert b"100 Continue" not in got
    assert b"connection: close" in got.lower() and b"BODY_TOO_LARGE" in got
    assert pipeline.requests == []


async def test_uvicorns_warning_for_each_unparsable_request_is_logged_once_a_minute(edge_server, caplog):
    """A review's finding: each request uvicorn's parser refuses (a made-up
    method, before any key is checked) wrote "Invalid HTTP request
    received." to the router's log: 100 lines for 100 requests."""
    port, _ = edge_server
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        for i in range(5):
            got = await exchange(port, f"CARDMETHOD{i} /v1/models HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            assert got.startswith(b"HTTP/1.1 400 "), got[:100]
    warned = [
        r for r in caplog.records if r.name == "uvicorn.error" and "Invalid HTTP request" in r.getMessage()
    ]
    assert len(warned) <= 1, [r.getMessage() for r in warned]


async def test_a_stream_asked_over_http_1_0_is_refused_not_sent_in_chunks(edge_server):
    """A review's finding: uvicorn frames a body of no known length in
    chunks, which RFC 9112 §6.1 forbids to an HTTP/1.0 client: its events
    came with hex chunk sizes among them. A whole answer is sent as before."""
    port, pipeline = edge_server
    pipeline.requests.clear()

    def request(stream: bool) -> bytes:
        body = json.dumps({**CHAT, "stream": stream}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.0\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    streamed = await exchange(port, request(stream=True))
    assert streamed.startswith(b"HTTP/1.1 400 "), streamed[:200]
    assert b"transfer-encoding: chunked" not in streamed.lower()
    assert b"UNSUPPORTED_PARAMETER" in streamed and b'"param":"stream"' in streamed
    assert pipeline.requests == []
    whole = await exchange(port, request(stream=False))
    assert whole.startswith(b"HTTP/1.1 200 ") and b"content-length:" in whole.lower(), whole[:300]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (("content-encoding: gzip", "content-length: 66"), b"415"),
        (("content-length: 66",), b"401"),
    ],
    ids=["compressed", "a wrong key"],
)
async def test_a_refusal_before_the_body_of_a_request_expecting_a_100_closes_the_connection(
    edge_server, headers, status
):
    """A final read's finding: a 415 (and a 401, as before) sent before the
    body of a request that said "Expect: 100-continue" kept the connection:
    the body never comes (no 100 went out), and the connection's next
    request was read as it (a GET got 400)."""
    port, _ = edge_server
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        "expect: 100-continue",
        *headers,
    ]
    if status != b"401":
        lines.append(f"authorization: Bearer {KEY}")
    got = await exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    assert got.startswith(b"HTTP/1.1 " + status + b" "), got[:200]
    assert b"connection: close" in got.lower() and b"100 Continue" not in got
