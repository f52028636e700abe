"""The HTTP edge's streamed chat completions over the ASGI interface, a fake
pipeline behind it: how its events become server-sent events. No sockets
(tests/integration/test_http_edge.py runs the real edge with the OpenAI SDK)."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest
import uvicorn
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from meshgate import metrics
from meshgate.config import ModelSettings, RouterSettings
from meshgate.errors import MeshgateError, busy_unavailable, retry_info, unavailable
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.reasons import Reason
from services.router import http_edge
from services.router.admission import TenantCalls, WindowUse
from services.router.auth import Authenticator
from services.router.deployments import OpenCalls
from services.router.http_edge import _TCP_INFO, HttpEdge, _BoundedHeaders, _StalledPeerCut, http_error
from services.router.pipeline import Answer, Budget, CacheStatus, Completion, Delta, Failure, Pipeline
from tests.unit.test_router_context_restart import busy
from tests.unit.test_router_context_restart import unavailable as unavailable_rpc
from tests.unit.test_router_embeddings import core as embeddings_core
from tests.unit.test_router_pipeline import (
    DELIVERED_BEFORE_THE_BUG,
    MODELS,
    BugAfterTwoPieces,
    FakeCache,
    FakeContexts,
    RecordingAdmission,
)
from tests.unit.test_router_pipeline import pipeline as real_pipeline

KEY = "edge-key"


class ScriptedPipeline:
    """Yields the given events for any turn; records how it was asked."""

    def __init__(self, events) -> None:
        self._events = events
        self.carry_last_text: bool | None = None
        self.whole: bool | None = None
        # Whether the edge read the turn to its end (closed at its
        # completion instead, the pipeline records the turn cancelled).
        self.read_to_the_end = False

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **rest
    ):
        self.carry_last_text = carry_last_text
        self.whole = rest.get("whole", False)
        for event in self._events:
            yield event
        self.read_to_the_end = True


class SavingPipeline(ScriptedPipeline):
    """Begins to store the turn (Pipeline.run's before_saving), then yields
    the given events."""

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **rest
    ):
        await rest["before_saving"](session_id)
        async for event in super().run(
            request, tenant, session_id, budget, create_session, carry_last_text, **rest
        ):
            yield event


async def streamed(events, stream: bool = True, pipeline_class=ScriptedPipeline) -> list[dict]:
    """The ASGI messages the edge sends for one chat completion, streamed
    unless ``stream`` is False."""
    settings = RouterSettings(dev_api_key=KEY)
    pipeline = pipeline_class(events)
    edge = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), pipeline, None)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    received = [{"type": "http.request", "body": body.encode(), "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if received:
            return received.pop(0)
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {KEY}".encode())],
    }
    await asyncio.wait_for(edge(scope, receive, send), 5)
    # A streamed answer's last piece may come on the completion (one write).
    assert pipeline.carry_last_text is stream
    # A non-streamed answer goes out whole or not at all.
    assert pipeline.whole is not stream
    completed = any(isinstance(event, Completion) for event in events)
    assert pipeline.read_to_the_end == completed
    return sent


def contents(body: bytes) -> list[str]:
    """The content of each chunk event in a body, in order (None for a
    chunk without: the finish or the usage)."""
    out = []
    for event in body.decode().split("\n\n"):
        if event.startswith("data: {"):
            payload = json.loads(event[len("data: ") :])
            if payload.get("object") == "chat.completion.chunk":
                choices = payload["choices"] or [{}]
                out.append(choices[0].get("delta", {}).get("content"))
    return out


def events_of(body: bytes) -> list[dict]:
    """Every JSON event in a body, in order."""
    return [
        json.loads(event[len("data: ") :])
        for event in body.decode().split("\n\n")
        if event.startswith("data: {")
    ]


async def test_the_last_chunk_goes_in_one_write_with_the_streams_end():
    answer = Answer(text="Hello", completion_tokens=2, finish_reason="length", deployment="d1")
    completion = Completion(answer, CacheStatus.MISS, 0.0, "", 0, "", text="lo")
    sent = await streamed([Delta("Hel"), completion])
    bodies = [message["body"] for message in sent if message["type"] == "http.response.body"]
    assert len(bodies) == 2
    assert contents(bodies[0]) == ["Hel"]
    assert contents(bodies[1])[0] == "lo"
    assert bodies[1].endswith(b"data: [DONE]\n\n") and b'"finish_reason":"length"' in bodies[1]


async def test_a_whole_answer_reads_the_turn_to_its_end():
    answer = Answer(text="Hello", completion_tokens=2, finish_reason="stop")
    completion = Completion(answer, CacheStatus.MISS, 0.0, "", 0, "")
    sent = await streamed([completion], stream=False)
    body = json.loads(b"".join(message.get("body", b"") for message in sent))
    assert body["choices"][0]["message"]["content"] == "Hello"


async def test_a_short_hit_on_the_completion_alone_is_one_write():
    answer = Answer(text="Paris.", completion_tokens=2, finish_reason="stop")
    sent = await streamed([Completion(answer, CacheStatus.EXACT_HIT, 1.0, "", 0, "", text="Paris.")])
    bodies = [message["body"] for message in sent if message["type"] == "http.response.body"]
    assert len(bodies) == 1 and contents(bodies[0])[0] == "Paris."
    assert bodies[0].endswith(b"data: [DONE]\n\n")


async def test_a_failure_midway_ends_the_stream_with_an_error_event_after_every_piece():
    failure = Failure(unavailable(Reason.REDIS_UNAVAILABLE, "the turn was not saved"))
    sent = await streamed([Delta("Hel"), Delta("lo"), failure])
    whole = b"".join(message.get("body", b"") for message in sent)
    assert contents(whole) == ["Hel", "lo"]
    assert whole.index(b'"content":"lo"') < whole.index(b'"error"')
    assert b"[DONE]" not in whole


class BuggyTurnPipeline(ScriptedPipeline):
    """The real pipeline, whose generation hits a bug after two pieces."""

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **rest
    ):
        self.carry_last_text = carry_last_text
        self.whole = rest.get("whole", False)
        turns = Pipeline(RouterSettings(), MODELS, FakeContexts(), FakeCache(), BugAfterTwoPieces())
        async for event in turns.run(
            request, tenant, session_id, Budget(), create_session, carry_last_text, **rest
        ):
            yield event


async def test_a_bug_in_a_streamed_turn_ends_its_stream_saying_how_much_went_out():
    sent = await streamed([], pipeline_class=BuggyTurnPipeline)
    whole = b"".join(message.get("body", b"") for message in sent)
    assert contents(whole) == ["Hel", "lo "]
    error = events_of(whole)[-1]["error"]
    assert error["code"] == Reason.INTERNAL
    assert error["metadata"] == DELIVERED_BEFORE_THE_BUG


async def test_a_bug_in_an_answer_sent_whole_is_a_500_that_names_none_delivered():
    sent = await streamed([], stream=False, pipeline_class=BuggyTurnPipeline)
    assert sent[0]["status"] == 500
    error = json.loads(b"".join(message.get("body", b"") for message in sent))["error"]
    assert (error["code"], error["metadata"]) == (Reason.INTERNAL, {})


class BrokenAfterOneDelta(ScriptedPipeline):
    """A delta, then a bug of the edge's own (injected here: the events
    the edge reads raise what no pipeline yields)."""

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **rest
    ):
        self.carry_last_text = carry_last_text
        self.whole = rest.get("whole", False)
        for event in self._events:
            yield event
        raise RuntimeError("bug")


async def test_a_bug_of_the_edges_own_after_a_piece_went_out_ends_its_stream_with_an_error_event():
    """It ended the stream with no error event: the 200 was out, so the
    request's handler sent nothing, a short answer that said nothing."""
    sent = await streamed([Delta("Hel", completion_tokens=1)], pipeline_class=BrokenAfterOneDelta)
    whole = b"".join(message.get("body", b"") for message in sent)
    assert contents(whole) == ["Hel"]
    error = events_of(whole)[-1]["error"]
    assert error["code"] == Reason.INTERNAL
    assert error["metadata"] == {"delivered_deltas": "1", "delivered_chars": "3", "delivered_tokens": "1"}
    assert b"[DONE]" not in whole


# Line breaks to str.splitlines that JSON may leave raw in a string.
SPLITLINES_BREAKS = "\x85\u2028\u2029"


@pytest.mark.parametrize("end", ["completion", "failure"])
async def test_an_answer_holding_unicode_line_separators_stays_one_line_per_event(end):
    """A client that splits the stream with str.splitlines' breaks (httpx's
    aiter_lines) reads each event as one data line, and the answer whole."""
    text = f"one{SPLITLINES_BREAKS}two"
    answer = Answer(text=text + text, completion_tokens=4, finish_reason="stop")
    last = (
        Completion(answer, CacheStatus.MISS, 0.0, "", 0, "", text=text)
        if end == "completion"
        else Failure(unavailable(Reason.REDIS_UNAVAILABLE, f"not saved{SPLITLINES_BREAKS}"))
    )
    sent = await streamed([Delta(text), last])
    whole = b"".join(message.get("body", b"") for message in sent).decode()
    lines = [line for line in whole.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    payloads = [json.loads(line[len("data: ") :]) for line in lines if line != "data: [DONE]"]
    pieces = [payload["choices"][0]["delta"].get("content") for payload in payloads if payload.get("choices")]
    if end == "completion":
        assert "".join(piece for piece in pieces if piece) == text + text
    else:
        assert pieces == [text]
        assert payloads[-1]["error"]["message"] == f"not saved{SPLITLINES_BREAKS}"


class EmbedStub:
    """An inference service's Embed: fails with ``failure`` when given one, else answers one zero vector."""

    def __init__(self, failure: grpc.aio.AioRpcError | None = None) -> None:
        self.failure = failure
        self.calls = 0

    async def Embed(self, request, timeout):
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return inference_pb.EmbedResponse(dimensions=1, vectors=bytes(4 * len(request.texts)))


class InferenceServices:
    def __init__(self, *stubs: EmbedStub) -> None:
        self.stubs = stubs

    def inference_services(self):
        return [(stub, OpenCalls()) for stub in self.stubs]


async def exchanged(edge: HttpEdge, method: str, path: str, body: bytes, headers: list) -> list[dict]:
    """The ASGI messages the edge sends for one request, straight through its callable."""
    received = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if received:
            return received.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    await asyncio.wait_for(edge(scope, receive, send), 5)
    return sent


async def posted(edge: HttpEdge, path: str, body: dict) -> tuple[int, dict]:
    """The status and JSON body of one POST of ``body`` to ``path`` with
    the development key, straight through the edge's ASGI callable."""
    key = [(b"authorization", f"Bearer {KEY}".encode())]
    sent = await exchanged(edge, "POST", path, json.dumps(body).encode(), key)
    return sent[0]["status"], json.loads(b"".join(message.get("body", b"") for message in sent))


async def embeddings(services: InferenceServices, **fields) -> tuple[int, dict]:
    """The status and body of one POST /v1/embeddings, with ``fields`` besides its model and input."""
    settings = RouterSettings(dev_api_key=KEY)
    core, _, _ = embeddings_core(services)
    edge = HttpEdge(settings, {}, Authenticator(settings), TenantCalls(0), ScriptedPipeline([]), core)
    return await posted(
        edge, "/v1/embeddings", {"model": settings.embedding_model, "input": "a cat", **fields}
    )


async def test_embeddings_go_to_the_next_inference_service_when_one_is_busy_or_away():
    busy_one, away, serving = EmbedStub(busy(service="inference")), EmbedStub(unavailable_rpc()), EmbedStub()
    status, body = await embeddings(InferenceServices(busy_one, away, serving))
    assert status == 200, body
    assert body["data"][0]["embedding"] == [0.0]
    assert (busy_one.calls, away.calls, serving.calls) == (1, 1, 1)


async def test_embedding_inputs_past_the_cap_are_refused_before_any_is_read():
    """A review's finding: each of 2 million inputs had its type checked on
    the event loop (0.15 s) before their count was. Past the cap, the count
    is the answer, whatever the inputs are; nothing reaches a service."""
    stub = EmbedStub()
    cap = 4  # test_router_embeddings.core's inference.max_embed_texts
    status, body = await embeddings(InferenceServices(stub), input=[5] * (cap + 1))
    assert status == 400, body
    assert body["error"]["code"] == "TOO_MANY_TEXTS"
    assert stub.calls == 0
    status, body = await embeddings(InferenceServices(stub), input=[5] * cap)
    assert (status, body["error"]["code"]) == (400, "MALFORMED_REQUEST")


@pytest.mark.parametrize("encoding", ["", 0, False, [], {}, "int8"])
async def test_an_encoding_format_neither_float_nor_base64_is_refused(encoding):
    """A bug hunt's finding: a falsy encoding_format ("", 0, false, [], {})
    was read as no format and served as float, where any other value of
    the wrong type or name is a 400 about its field."""
    status, body = await embeddings(InferenceServices(EmbedStub()), encoding_format=encoding)
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == ("MALFORMED_REQUEST", "encoding_format")


async def test_a_null_encoding_format_is_float():
    status, body = await embeddings(InferenceServices(EmbedStub()), encoding_format=None)
    assert status == 200, body
    assert body["data"][0]["embedding"] == [0.0]


def test_a_busy_replica_is_a_503_with_retry_after_and_a_limit_still_a_429():
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
    # A busy service behind the router, as the router passes it on (meshgate/errors.py busy_unavailable).
    busy = busy_unavailable(Reason.DOWNSTREAM_FAILED, "the inference service is busy; retry later")
    status, headers, body = http_error(busy)
    assert (status, json.loads(body)["error"]["type"]) == (503, "service_unavailable_error")
    assert (b"retry-after", b"1") in headers
    limited = MeshgateError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, "limited", details=[retry]
    )
    status, headers, body = http_error(limited)
    assert (status, json.loads(body)["error"]["type"]) == (429, "rate_limit_error")
    assert (b"retry-after", b"1") in headers


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0ms"), (250, "250ms"), (1000, "1s"), (1500, "1.5s"), (59_001, "59.001s"), (60_000, "1m0s")],
)
def test_a_reset_is_written_as_openai_writes_it(ms, text):
    assert http_edge._duration(ms) == text


def test_rate_limit_headers_name_each_kinds_window_with_the_least_left():
    windows = (
        WindowUse("requests_per_minute", "tenant", 100, 10, 30_000),
        WindowUse("tokens_per_minute", "tenant", 10_000, 9_990, 1_500),
        WindowUse("requests_per_minute", "model", 20, 19, 59_000),
        WindowUse("requests_per_minute", "key", 5, 9, 100),  # over: a lowered limit, never below 0
    )
    assert dict(http_edge.rate_limit_headers(windows)) == {
        b"x-ratelimit-limit-requests": b"5",
        b"x-ratelimit-remaining-requests": b"0",
        b"x-ratelimit-reset-requests": b"100ms",
        b"x-ratelimit-limit-tokens": b"10000",
        b"x-ratelimit-remaining-tokens": b"10",
        b"x-ratelimit-reset-tokens": b"1.5s",
    }
    assert http_edge.rate_limit_headers(windows[1:2])[0] == (b"x-ratelimit-limit-tokens", b"10000")
    assert http_edge.rate_limit_headers(()) == []
    # Said by Redis at admission: a response starting 30 s later (a whole
    # answer, after its generation) says the wait from then (a final read).
    said = (WindowUse("requests_per_minute", "tenant", 100, 10, 60_000, said_at_s=1_000.0),)
    assert dict(http_edge.rate_limit_headers(said, now_s=1_030.0))[b"x-ratelimit-reset-requests"] == b"30s"
    assert dict(http_edge.rate_limit_headers(said, now_s=1_090.0))[b"x-ratelimit-reset-requests"] == b"0ms"


def test_a_per_minute_refusal_says_none_is_left_until_its_retry():
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=12, nanos=500_000_000))
    metadata = {"limit": "tokens_per_minute", "scope": "tenant", "limit_value": "800"}
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    refused = MeshgateError(exhausted, Reason.RATE_LIMITED, "x", metadata, details=[retry])
    _, headers, _ = http_error(refused)
    assert [h for h in headers if h[0].startswith(b"x-ratelimit")] == [
        (b"x-ratelimit-limit-tokens", b"800"),
        (b"x-ratelimit-remaining-tokens", b"0"),
        (b"x-ratelimit-reset-tokens", b"12.5s"),
    ]
    # What the window still holds for a smaller turn, where admission said it.
    roomy_metadata = dict(metadata, limit_remaining="273")
    roomy = MeshgateError(exhausted, Reason.RATE_LIMITED, "x", roomy_metadata, details=[retry])
    assert (b"x-ratelimit-remaining-tokens", b"273") in http_error(roomy)[1]
    # The reset is the RetryInfo's milliseconds (a float's ceil made 1,132 ms 1.133 s).
    for ms in (1132, 1136, 1257, 59_999):
        odd = MeshgateError(exhausted, Reason.RATE_LIMITED, "x", metadata, details=[retry_info(ms / 1000)])
        assert (b"x-ratelimit-reset-tokens", http_edge._duration(ms).encode()) in http_error(odd)[1]
    # A budget's or a stream cap's refusal is no per-minute window.
    per_day = dict(metadata, limit="tokens_per_day")
    budget = MeshgateError(exhausted, Reason.RATE_LIMITED, "x", per_day, details=[retry])
    assert not [h for h in http_error(budget)[1] if h[0].startswith(b"x-ratelimit")]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (MeshgateError(grpc.StatusCode.ABORTED, Reason.VERSION_CONFLICT, "stale"), 409),
        (MeshgateError(grpc.StatusCode.ALREADY_EXISTS, Reason.SESSION_EXISTS, "exists"), 409),
        (MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.REQUEST_EXCEEDS_LIMIT, "too big"), 429),
        (MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_QUOTA_EXCEEDED, "full"), 429),
    ],
)
def test_an_answer_a_resend_would_get_again_tells_the_openai_sdks_not_to_resend_it(error, status):
    answered, headers, _ = http_error(error)
    assert answered == status
    assert (b"x-should-retry", b"false") in headers


@pytest.mark.parametrize("stream", [False, True])
async def test_a_turn_that_failed_once_it_began_to_be_stored_tells_the_openai_sdks_not_to_resend_it(stream):
    """Its append may have landed (timed out after the context service's
    Redis took it): a resend would store the turn twice. (Streamed, an
    empty answer: its status has not gone out.)"""
    timed_out = MeshgateError(
        grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DOWNSTREAM_FAILED, "context timed out"
    )
    stored_maybe = (await streamed([Failure(timed_out)], stream, SavingPipeline))[0]
    assert stored_maybe["status"] == 504
    assert (b"x-should-retry", b"false") in stored_maybe["headers"]
    # Failed before it was being stored, the turn is the SDKs' to resend.
    not_stored = (await streamed([Failure(timed_out)], stream))[0]
    assert not_stored["status"] == 504
    assert b"x-should-retry" not in dict(not_stored["headers"])


def test_a_rate_limit_a_busy_service_or_a_full_session_leaves_the_sdks_to_retry():
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
    for error in (
        MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, "limited", details=[retry]),
        busy_unavailable(Reason.DOWNSTREAM_FAILED, "busy"),
        # Compaction may make room in the seconds the SDK waits.
        MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL, "full"),
    ):
        _, headers, _ = http_error(error)
        assert not [name for name, _ in headers if name == b"x-should-retry"]


class HeldPipeline:
    """A turn that answers nothing until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **_
    ):
        await self.release.wait()
        answer = Answer(text="ok", completion_tokens=1, finish_reason="stop")
        yield Completion(answer, CacheStatus.MISS, 0.0, "", 0, "", text="ok")


def chat_request(
    key: str, body_reads: list[int], content: str = "hi", stream: bool = False, pause_s: float | None = None
):
    """(scope, receive) of one POST /v1/chat/completions with ``key``, asking
    ``content``; each read of its body is counted in ``body_reads``; the
    client stays connected. With ``pause_s``, the body comes in two halves,
    the second ``pause_s`` after the first."""
    message = {"role": "user", "content": content}
    body = json.dumps({"model": "m", "messages": [message], "stream": stream}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    parts = [{"type": "http.request", "body": body, "more_body": False}]
    if pause_s is not None:
        half = len(body) // 2
        parts = [{"type": "http.request", "body": body[:half], "more_body": True}] + parts
        parts[1]["body"] = body[half:]

    async def receive():
        if parts:
            body_reads.append(1)
            if pause_s is not None and len(parts) == 1:
                await asyncio.sleep(pause_s)
            return parts.pop(0)
        await asyncio.Event().wait()

    return scope, receive


def status_and_reason(sent: list[dict]) -> tuple[int, str]:
    """An error response's HTTP status and its reason (OpenAI's "code")."""
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent)
    return start["status"], json.loads(body)["error"]["code"]


async def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read():
    settings = RouterSettings(dev_api_key=KEY)
    edge = HttpEdge(
        settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), HeldPipeline(), None
    )
    body_reads: list[int] = []
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope, receive = chat_request("wrong-key", body_reads)
    await asyncio.wait_for(edge(scope, receive, send), 5)
    assert status_and_reason(sent)[0] == 401 and body_reads == []


async def test_a_tenants_http_requests_count_against_its_call_cap_until_they_end():
    settings = RouterSettings(dev_api_key=KEY)
    calls, pipeline = TenantCalls(1), HeldPipeline()
    edge = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), calls, pipeline, None)
    body_reads: list[int] = []
    held_sent: list[dict] = []

    async def held_send(message):
        held_sent.append(message)

    held = asyncio.create_task(edge(*chat_request(KEY, body_reads), held_send))
    await asyncio.sleep(0.05)
    assert calls.held("dev") == 1 and not held_sent
    refused_sent: list[dict] = []

    async def refused_send(message):
        refused_sent.append(message)

    await asyncio.wait_for(edge(*chat_request(KEY, body_reads), refused_send), 5)
    assert status_and_reason(refused_sent) == (429, "TOO_MANY_CALLS_IN_FLIGHT")
    assert (b"retry-after", b"1") in refused_sent[0]["headers"]
    # The refused request's body was never read: only the held one's was.
    assert body_reads == [1]
    pipeline.release.set()
    await asyncio.wait_for(held, 5)
    await asyncio.sleep(0)
    assert calls.held("dev") == 0


def edge_with(calls: TenantCalls, pipeline, **settings) -> HttpEdge:
    router = RouterSettings(dev_api_key=KEY, **settings)
    return HttpEdge(router, {"m": ModelSettings()}, Authenticator(router), calls, pipeline, None)


def recording(sent: list[dict]):
    """An ASGI send that records each message in ``sent``."""

    async def send(message):
        sent.append(message)

    return send


async def test_a_body_that_stalls_is_answered_408_and_frees_its_place_and_one_in_time_is_served():
    calls, pipeline = TenantCalls(1), HeldPipeline()
    pipeline.release.set()
    edge = edge_with(calls, pipeline, http_body_timeout_s=0.3)
    in_time: list[dict] = []
    # Its second half comes after a pause well inside the timeout.
    await asyncio.wait_for(edge(*chat_request(KEY, [], pause_s=0.05), recording(in_time)), 5)
    assert in_time[0]["status"] == 200
    stalled: list[dict] = []
    started = asyncio.get_running_loop().time()
    # Its second half would come in an hour: the timeout answers first.
    await asyncio.wait_for(edge(*chat_request(KEY, [], pause_s=3600), recording(stalled)), 5)
    assert 0.3 <= asyncio.get_running_loop().time() - started < 2
    assert status_and_reason(stalled) == (408, "REQUEST_BODY_TIMEOUT")
    error = json.loads(b"".join(message.get("body", b"") for message in stalled))["error"]
    assert error["metadata"] == {"timeout_s": "0.3"} and error["type"] == "invalid_request_error"
    # The rest of the body may still come: the connection goes with the answer.
    assert (b"connection", b"close") in stalled[0]["headers"]
    assert calls.held("dev") == 0


class SettlingPipeline:
    """Answers "ok" (a question "wait": once ``answer`` is set), then keeps
    the turn settling until ``settle`` is set, as the real pipeline does its
    bookkeeping after the completion."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.settle = asyncio.Event()

    async def run(
        self, request, tenant, session_id, budget, create_session=False, carry_last_text=False, **_
    ):
        if request.messages[-1].content == "wait":
            await self.answer.wait()
        answer = Answer(text="ok", completion_tokens=1, finish_reason="stop")
        yield Completion(answer, CacheStatus.MISS, 0.0, "", 0, "", text="ok")
        await self.settle.wait()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_requests_place_is_given_back_once_when_its_response_is_complete(stream):
    """At a cap of 1, the next request of the connection (which uvicorn
    starts once this response is complete) gets the place while this
    request's task still settles its turn; that task's end then gives back
    nothing more."""
    calls, pipeline = TenantCalls(1), SettlingPipeline()
    edge = edge_with(calls, pipeline)
    answered: list[dict] = []
    settling = asyncio.create_task(edge(*chat_request(KEY, [], "now", stream), recording(answered)))
    for _ in range(100):
        if answered and answered[-1]["type"] == "http.response.body" and not answered[-1].get("more_body"):
            break
        await asyncio.sleep(0.01)
    assert answered[0]["status"] == 200
    assert not settling.done() and calls.held("dev") == 0
    waiting_sent: list[dict] = []
    waiting = asyncio.create_task(edge(*chat_request(KEY, [], "wait", stream), recording(waiting_sent)))
    await asyncio.sleep(0.05)
    assert not waiting_sent and calls.held("dev") == 1
    pipeline.settle.set()
    await asyncio.wait_for(settling, 5)
    await asyncio.sleep(0)
    assert calls.held("dev") == 1  # still the waiting request's
    pipeline.answer.set()
    await asyncio.wait_for(waiting, 5)
    assert waiting_sent[0]["status"] == 200
    await asyncio.sleep(0)
    assert calls.held("dev") == 0


async def gone_while_the_last_part_waits(edge, stream: bool = True) -> None:
    """Serves one chat request whose client goes while the response's last
    part waits to be written: uvicorn's send waits for the socket to drain,
    then drops the message if the client went meanwhile."""
    gone = asyncio.Event()
    scope, body_receive = chat_request(KEY, [], stream=stream)
    body_read = False

    async def receive():
        nonlocal body_read
        if not body_read:
            body_read = True
            return await body_receive()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body"):
            gone.set()  # the client goes while this last part waits to be written
            await asyncio.sleep(0.05)

    await asyncio.wait_for(edge(scope, receive, send), 5)


async def test_a_client_gone_while_the_last_part_waits_to_be_written_has_its_turn_cancelled():
    """The client's disconnect must then cancel the turn, not find the
    response complete (it would be recorded completed, answered to nobody)."""
    answer = Answer(text="ok", completion_tokens=1, finish_reason="stop")
    pipeline = ScriptedPipeline([Delta("o"), Completion(answer, CacheStatus.MISS, 0.0, "", 0, "", text="k")])
    await gone_while_the_last_part_waits(edge_with(TenantCalls(1), pipeline))
    assert not pipeline.read_to_the_end


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_gone_while_the_last_part_waits_is_settled_cancelled_by_the_real_pipeline(stream):
    """The rule above, through the real Pipeline (the test above scripts
    it): a change counting a turn whole once its Completion was handed to
    the front end (reverted) had such turns recorded completed, and the
    scripted test could not see it (a review)."""
    admission = RecordingAdmission()
    turns, _ = real_pipeline(admission=admission)
    await gone_while_the_last_part_waits(edge_with(TenantCalls(1), turns), stream)
    [(_, outcome)] = admission.settled
    assert outcome.cancelled and outcome.failure is None


def test_uvicorns_httptools_protocol_still_has_what_the_header_bounds_extend():
    """_BoundedHeaders overrides these and calls uvicorn's own: an uvicorn
    without one of them would leave the headers unbounded, or break every
    request (pyproject.toml pins the range where they hold)."""
    callbacks = (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
    )
    missing = [name for name in callbacks if name not in vars(HttpToolsProtocol)]
    assert missing == [], f"uvicorn's HttpToolsProtocol no longer defines {missing}"


class _Transport(asyncio.Transport):
    """What a connection's protocol writes, and whether it closed it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def write(self, data) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def bounded_connection(app, header_timeout_s: float, max_header_bytes: int = 4096):
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    config.load()
    protocol = _BoundedHeaders(
        config=config,
        server_state=ServerState(),
        app_state={},
        _loop=asyncio.get_running_loop(),
        header_timeout_s=header_timeout_s,
        max_header_bytes=max_header_bytes,
        stalled_client_timeout_s=30.0,
    )
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport


def answering_when(released: asyncio.Event):
    async def app(scope, receive, send):
        await released.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    return app


async def test_a_pipelined_requests_header_time_counts_from_the_end_of_the_answer_before_it():
    """uvicorn stops reading while an earlier request is answered, so the
    next one's headers may wait on that answer: the connection is not
    closed under it, and the header timeout counts again once it is free."""
    timeout_s = 0.2
    released = asyncio.Event()
    protocol, transport = bounded_connection(answering_when(released), header_timeout_s=timeout_s)
    protocol.data_received(b"GET /first HTTP/1.1\r\nhost: edge\r\n\r\nGET /second HTTP/1.1\r\nho")
    # Past the timeout, and close to the deadline's second firing.
    await asyncio.sleep(timeout_s * 1.75)
    assert not transport.closed
    released.set()
    for _ in range(20):
        await asyncio.sleep(0.01)
        if b"/first" in transport.written:
            break
    assert b"/first" in transport.written and not transport.closed
    # Free for half a timeout: still open, a full timeout later closed.
    await asyncio.sleep(timeout_s / 2)
    assert not transport.closed
    await asyncio.sleep(timeout_s)
    assert transport.closed


async def test_chunk_framing_read_apart_from_its_data_is_not_counted_as_header_bytes():
    """A client that writes each chunk's size line, data and CRLF apart
    (Nagle off) gives the parser reads that pass nothing on: the bytes of
    such reads are framing, never a held header value, once data follows."""
    received = bytearray()

    async def app(scope, receive, send):
        while True:
            message = await receive()
            received.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol, transport = bounded_connection(app, header_timeout_s=5, max_header_bytes=1024)
    protocol.data_received(b"POST /upload HTTP/1.1\r\nhost: edge\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"c" * 64
    for _ in range(256):  # 16 KiB of body in 1.5 KiB of framing, over the bound
        for piece in (b"40", b"\r\n", chunk, b"\r\n"):
            protocol.data_received(piece)
            await asyncio.sleep(0)
    protocol.data_received(b"0\r\n\r\n")
    for _ in range(20):
        await asyncio.sleep(0.01)
        if transport.written:
            break
    assert not transport.closed and transport.written.startswith(b"HTTP/1.1 200 ")
    assert bytes(received) == chunk * 256
    protocol.connection_lost(None)


async def test_a_pipelined_header_block_over_the_bound_closes_without_a_431_inside_an_answer():
    # The parser holds a value until it ends: its bytes count from the next read.
    oversized = [b"GET /second HTTP/1.1\r\nx: ", b"v" * 2048]
    released = asyncio.Event()
    app = answering_when(released)
    protocol, transport = bounded_connection(app, header_timeout_s=5, max_header_bytes=1024)
    protocol.data_received(b"GET /first HTTP/1.1\r\nhost: edge\r\n\r\n" + oversized[0])
    protocol.data_received(oversized[1])
    assert transport.closed and transport.written == b""
    # Alone on its connection, the same block is answered 431.
    alone, alone_transport = bounded_connection(app, header_timeout_s=5, max_header_bytes=1024)
    for data in oversized:
        alone.data_received(data)
    assert alone_transport.closed and alone_transport.written.startswith(b"HTTP/1.1 431 ")
    released.set()
    for connection in (protocol, alone):
        connection.connection_lost(None)
    await asyncio.sleep(0.05)  # the first request's task sees its client gone


@pytest.mark.parametrize(
    "request_bytes",
    [
        "GET /v1/models/東 HTTP/1.1\r\nhost: edge\r\n\r\n".encode(),  # a URL's UTF-8 sent raw
        b"GET /v1/models HTTP/1.1\r\nhost\x01: edge\r\n\r\n",  # a byte no header name may hold
    ],
    ids=["non-ASCII URL", "control byte in a header name"],
)
async def test_a_request_httptools_cannot_read_is_a_400_in_openais_shape(request_bytes):
    """uvicorn answers these with a plain-text 400 of its own: a client
    reading OpenAI's error object found none, and no x-request-id."""
    protocol, transport = bounded_connection(answering_when(asyncio.Event()), header_timeout_s=5)
    protocol.data_received(request_bytes)
    assert transport.closed
    head, _, body = transport.written.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"content-type"] == b"application/json" and headers[b"connection"] == b"close"
    assert len(headers[b"x-request-id"]) == 32
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "MALFORMED_REQUEST")
    protocol.connection_lost(None)


async def test_a_pipelined_request_httptools_cannot_read_closes_without_a_400_inside_an_answer():
    released = asyncio.Event()
    protocol, transport = bounded_connection(answering_when(released), header_timeout_s=5)
    protocol.data_received(b"GET /first HTTP/1.1\r\nhost: edge\r\n\r\n" + "GET /東 HTTP/1.1\r\n\r\n".encode())
    assert transport.closed and transport.written == b""
    released.set()
    protocol.connection_lost(None)
    await asyncio.sleep(0.05)  # the first request's task sees its client gone


class _TcpInfoSocket:
    """A socket whose TCP_INFO tells what a test sets: bytes acknowledged,
    segments unacknowledged and bytes not yet sent."""

    def __init__(self, unacked: int, acked: int, notsent: int) -> None:
        self.unacked, self.acked, self.notsent = unacked, acked, notsent

    def getsockopt(self, level, name, size):
        return _TCP_INFO.pack(self.unacked, self.acked, self.notsent)


class _AbortableTransport(_Transport):
    def __init__(self, sock) -> None:
        super().__init__()
        self.sock = sock
        self.aborted_at: float | None = None

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else super().get_extra_info(name, default)

    def abort(self) -> None:
        self.aborted_at = asyncio.get_running_loop().time()


STALL_S = 0.2


@pytest.mark.skipif(sys.platform != "linux", reason="read from Linux's TCP_INFO")
@pytest.mark.parametrize(
    "unacked, notsent", [(3, 0), (0, 4096), (2, 4096)], ids=["unacknowledged", "window shut", "both"]
)
async def test_a_peer_that_acknowledges_nothing_outstanding_is_aborted_after_the_timeout(unacked, notsent):
    transport = _AbortableTransport(_TcpInfoSocket(unacked, acked=1000, notsent=notsent))
    loop = asyncio.get_running_loop()
    started = loop.time()
    cut = _StalledPeerCut(transport, STALL_S, loop)
    try:
        while transport.aborted_at is None and loop.time() - started < 2:
            await asyncio.sleep(0.01)
    finally:
        cut.stop()
    assert transport.aborted_at is not None
    assert STALL_S <= transport.aborted_at - started < STALL_S * 1.5 + 0.1


@pytest.mark.skipif(sys.platform != "linux", reason="read from Linux's TCP_INFO")
@pytest.mark.parametrize("case", ["acknowledging slowly", "nothing outstanding"])
async def test_a_peer_that_acknowledges_or_has_nothing_to_acknowledge_is_kept(case):
    sock = _TcpInfoSocket(unacked=3, acked=1000, notsent=4096)
    if case == "nothing outstanding":  # a whole answer being generated: nothing written
        sock.unacked = sock.notsent = 0
    transport = _AbortableTransport(sock)
    loop = asyncio.get_running_loop()
    cut = _StalledPeerCut(transport, STALL_S, loop)
    try:
        for _ in range(10):  # five timeouts long
            await asyncio.sleep(STALL_S / 2)
            if case == "acknowledging slowly":
                sock.acked += 1
    finally:
        cut.stop()
    assert transport.aborted_at is None


# --- the requests' metrics ------------------------------------------------------------------------


def http_requests() -> dict[tuple[str, str, str], float]:
    """The router's HTTP requests counted so far in meshgate_rpc_requests,
    by method (the route), code and reason (gRPC methods hold a '/' inside)."""
    counted: dict[tuple[str, str, str], float] = {}
    for family in metrics.rpc().requests.collect():
        for sample in family.samples:
            labels = sample.labels
            route = labels["method"] == "other" or labels["method"].startswith("/v1/")
            if sample.name.endswith("_total") and labels["service"] == "router" and route:
                key = (labels["method"], labels["code"], labels["reason"])
                counted[key] = counted.get(key, 0) + sample.value
    return counted


async def test_http_requests_are_counted_by_route_and_outcome_never_by_what_the_caller_named():
    """A bug hunt's finding: the HTTP edge counted no request in
    meshgate_rpc_requests (a real router's /metrics showed nothing for
    1,500 refused HTTP requests), so its refusals before admission (a bad
    key, an unknown route or model) and its failures after the 200 were in
    no metric, while the gRPC port's are. Counted by route: paths and HTTP
    methods are the caller's to choose, and each new label value would be a
    series kept for the process's life."""
    settings = RouterSettings(dev_api_key=KEY)
    failure = MeshgateError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL, "the session is full")
    edge = HttpEdge(
        settings,
        {"m": ModelSettings()},
        Authenticator(settings),
        TenantCalls(0),
        ScriptedPipeline([Delta("Hel"), Failure(failure)]),
        None,
    )

    async def ask(method: str, path: str, key: str = KEY, body: bytes = b"") -> int:
        return await asked(edge, method, path, body, [(b"authorization", f"Bearer {key}".encode())])

    before = http_requests()
    streamed_chat = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    for index in range(20):
        assert await ask("GET", f"/v1/unknown-{index}") == 404
        assert await ask("GET", f"/v1/models/no-such-model-{index}") == 404
        assert await ask(f"VERB{index}", "/v1/models") == 405
        assert await ask("POST", "/v1/chat/completions", key=f"wrong-{index}") == 401
    assert await ask("POST", "/v1/chat/completions", body=streamed_chat.encode()) == 200
    after = http_requests()
    counted = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert counted == {
        ("other", "UNIMPLEMENTED", Reason.UNKNOWN_ENDPOINT): 20,
        ("/v1/models/{id}", "NOT_FOUND", Reason.MODEL_NOT_FOUND): 20,
        ("/v1/models", "UNIMPLEMENTED", Reason.METHOD_NOT_SUPPORTED): 20,
        ("/v1/chat/completions", "UNAUTHENTICATED", Reason.API_KEY_INVALID): 20,
        # A failure sent as the stream's error event, after its 200.
        ("/v1/chat/completions", "RESOURCE_EXHAUSTED", Reason.SESSION_FULL): 1,
    }


async def asked(edge: HttpEdge, method: str, path: str, body: bytes, headers: list) -> int:
    """The status of one request straight through the edge's ASGI callable."""
    sent = await exchanged(edge, method, path, body, headers)
    return next(message for message in sent if message["type"] == "http.response.start")["status"]


async def test_every_http_request_has_a_server_span_in_the_callers_trace(monkeypatch):
    """A review's finding: a 401, a malformed body, a refused parameter, a
    model list left no span (the chat span began once the body had been
    judged), where the gRPC port gives every call one. Each request below
    gets one SERVER span, in the caller's trace, named by its route (the
    template, not the model's id), with its status; only a 5xx or a failure
    after a 200 is an error of the server's."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(http_edge, "_tracer", provider.get_tracer("test"))
    settings = RouterSettings(dev_api_key=KEY)
    failing = ScriptedPipeline([Delta(text="Hel"), Failure(unavailable(Reason.DOWNSTREAM_FAILED, "gone"))])
    edge = HttpEdge(settings, {"m": ModelSettings()}, Authenticator(settings), TenantCalls(0), failing, None)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    caller = (b"traceparent", f"00-{trace_id}-b7ad6b7169203331-01".encode())
    key = (b"authorization", f"Bearer {KEY}".encode())
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    completions = "/v1/chat/completions"
    cases = [
        ("GET", "/v1/models", b"", [caller], 401, "GET /v1/models", False),
        ("POST", completions, b"{not json", [caller, key], 400, f"POST {completions}", False),
        ("GET", "/v1/models", b"", [caller, key], 200, "GET /v1/models", False),
        ("GET", "/v1/models/m", b"", [caller, key], 200, "GET /v1/models/{id}", False),
        ("GET", "/nowhere", b"", [caller, key], 404, "GET", False),
        ("POST", completions, chat.encode(), [caller, key], 200, f"POST {completions}", True),
    ]
    for method, path, body, headers, status, name, error in cases:
        exporter.clear()
        assert await asked(edge, method, path, body, headers) == status
        (span,) = exporter.get_finished_spans()
        assert span.kind == trace.SpanKind.SERVER
        assert format(span.context.trace_id, "032x") == trace_id
        assert (span.name, span.attributes["http.response.status_code"]) == (name, status)
        assert (span.status.status_code == trace.StatusCode.ERROR) is error, (name, status)
