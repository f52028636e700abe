"""A caller's text on a span is clipped: the gRPC instrumentation records
the user-agent a caller sends, whole, on every server span. A real grpc.aio
server on 127.0.0.1 with the services' interceptor chain and tracer provider."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshgate import telemetry
from meshgate.errors import ErrorInterceptor, not_found
from meshgate.reasons import Reason
from tests.grpc_probe import SERVICE, serving


async def test_a_callers_huge_user_agent_is_clipped_on_the_server_span(monkeypatch):
    """A bug hunt's finding: a 15,000-character user-agent (grpc takes about
    16 KiB of metadata) was kept whole on the router's server span of every
    call, before any key was checked: 15.6 KB spans where ~500 bytes is the
    rest, in every trace back end."""
    exporter = InMemorySpanExporter()
    provider = telemetry.tracer_provider("meshgate-test")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)

    async def echo(request: bytes, context) -> bytes:
        return request

    agent = "A" * 7_000  # under this bare server's 8 KiB; the router takes ~16
    handler = grpc.unary_unary_rpc_method_handler(echo)
    options = [("grpc.primary_user_agent", agent)]
    async with serving("Echo", handler, telemetry.server_interceptors(), options) as channel:
        assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
    (span,) = exporter.get_finished_spans()
    user_agent = span.attributes["rpc.user_agent"]
    assert user_agent.startswith("AAAA") and len(user_agent) == telemetry.MAX_SPAN_ATTRIBUTE_CHARS
    assert (span.attributes["rpc.method"], span.attributes["rpc.service"]) == ("Echo", SERVICE)


async def test_a_refusal_quoting_a_callers_huge_text_keeps_its_span_small(monkeypatch):
    """A review's finding: a refusal's message quoted a 2 MB model name
    whole ("unknown model '...'"), and the instrumentation's exception
    events carried it in their stack trace, twice: a 4 MB span, which an
    OTLP collector (4 MiB) refused with the batch of every other call's
    spans. The message is clipped as its status is, and events' values are
    bounded."""
    exporter = InMemorySpanExporter()
    provider = telemetry.tracer_provider("meshgate-test")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    huge = "ModelSecret" * 200_000

    async def refuse(request: bytes, context) -> bytes:
        raise not_found(Reason.MODEL_NOT_FOUND, f"unknown model {huge!r}")

    handler = grpc.unary_unary_rpc_method_handler(refuse)
    async with serving("Echo", handler, [*telemetry.server_interceptors(), ErrorInterceptor()]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    (span,) = exporter.get_finished_spans()
    size = len(span.to_json())
    assert size < 2 * telemetry.MAX_EVENT_ATTRIBUTE_CHARS * max(1, len(span.events)), size
    assert span.to_json().count("ModelSecret") < 200


def test_an_exception_event_longer_than_the_bound_is_clipped():
    provider = telemetry.tracer_provider("meshgate-test")
    with provider.get_tracer("test").start_as_current_span("s") as span:
        span.record_exception(ValueError("x" * 1_000_000))
    (event,) = span.events
    assert len(event.attributes["exception.message"]) == telemetry.MAX_EVENT_ATTRIBUTE_CHARS
