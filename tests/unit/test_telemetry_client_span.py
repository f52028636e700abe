"""The client span the inference service makes per Triton stream, without
the gRPC client interceptor: named and tagged as the interceptor would,
its trace context sent along (unless the call was opened earlier), its
end saying how the call ended."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshgate import telemetry

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture
def finished_spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # A provider of its own: the global one can be set once per process.
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("test"))
    return exporter.get_finished_spans


def test_the_span_is_named_as_the_interceptor_names_it_and_its_context_goes_along(finished_spans):
    span, metadata = telemetry.start_grpc_client_span(METHOD, "127.0.0.1:8001")
    telemetry.end_grpc_client_span(span, None)

    (ended,) = finished_spans()
    assert ended.name == METHOD and ended.kind == trace.SpanKind.CLIENT
    assert ended.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert ended.attributes["rpc.method"] == "ModelStreamInfer"
    assert ended.attributes["rpc.grpc.status_code"] == 0
    assert ended.status.status_code == trace.StatusCode.UNSET
    sent = dict(metadata)
    assert sent["traceparent"].split("-")[1:3] == [
        format(ended.context.trace_id, "032x"),
        format(ended.context.span_id, "016x"),
    ]


def test_a_failed_call_marks_the_span_and_a_caller_leaving_does_not(finished_spans):
    no_metadata = grpc.aio.Metadata()
    failed, _ = telemetry.start_grpc_client_span(METHOD, "127.0.0.1:8001")
    telemetry.end_grpc_client_span(
        failed, grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, no_metadata, no_metadata, "gone")
    )
    left, _ = telemetry.start_grpc_client_span(METHOD, "127.0.0.1:8001")
    telemetry.end_grpc_client_span(left, GeneratorExit())
    # The caller's task cancelled: its own cancel, a deadline, or a cache hit
    # overtaking the router's speculative generation.
    cancelled, _ = telemetry.start_grpc_client_span(METHOD, "127.0.0.1:8001")
    telemetry.end_grpc_client_span(cancelled, asyncio.CancelledError())

    failed_span, left_span, cancelled_span = finished_spans()
    assert failed_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed_span.status.status_code == trace.StatusCode.ERROR
    for span in (left_span, cancelled_span):
        assert span.status.status_code == trace.StatusCode.UNSET
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


def test_a_request_on_a_call_opened_earlier_gets_its_span_but_builds_no_context_to_send(finished_spans):
    span, metadata = telemetry.start_grpc_client_span(METHOD, "127.0.0.1:8001", inject=False)
    telemetry.end_grpc_client_span(span, None)

    (ended,) = finished_spans()
    assert ended.name == METHOD and ended.kind == trace.SpanKind.CLIENT
    assert metadata == ()
