"""A response-streaming call its caller cancels mid-stream: its handler's
generator is closed in the call's own task, so OpenTelemetry's server span
detaches its context there, not in the garbage collector's. A real grpc.aio
server on 127.0.0.1 with the services' interceptor chain."""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshgate import telemetry
from meshgate.errors import ErrorInterceptor
from tests.grpc_probe import SERVICE, serving

METHOD = f"/{SERVICE}/Stream"


class _DetachFailures(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "detach" in record.getMessage():
            self.count += 1


@pytest.fixture
def spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter


def _serving(stream, interceptors):
    """A channel to a server answering METHOD with ``stream``."""
    return serving("Stream", grpc.unary_stream_rpc_method_handler(stream), interceptors)


async def _endless(request, context):
    for _ in range(100_000):
        yield b"x" * 4000
        await asyncio.sleep(0)


async def _cancel_streams_midway(interceptors, streams: int) -> None:
    async with _serving(_endless, interceptors) as channel:
        call_method = channel.unary_stream(METHOD)
        for n in range(streams):
            call = call_method(b"")
            received = 0
            async for _ in call:
                received += 1
                if received == 3 + n % 5:
                    call.cancel()
                    break
        # What gRPC abandoned is closed when collected.
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.1)


async def test_a_cancelled_streams_span_detaches_its_context_in_its_call(spans):
    failures = _DetachFailures()
    logger = logging.getLogger("opentelemetry.context")
    logger.addHandler(failures)
    try:
        chain = [*telemetry.server_interceptors(), ErrorInterceptor()]
        await _cancel_streams_midway(chain, 60)
        assert failures.count == 0
        # Every call still got its span, ended.
        assert len([s for s in spans.get_finished_spans() if s.name.endswith("Probe/Stream")]) == 60
        # Without the closing interceptor (OpenTelemetry's outermost), the
        # same streams log detach failures: the check above can fail.
        await _cancel_streams_midway(chain[1:], 60)
        assert failures.count > 0
    finally:
        logger.removeHandler(failures)


async def test_messages_and_the_status_are_the_same_through_the_closing_interceptor():
    async def stream(request, context):
        yield b"one"
        yield b"two"
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "after two")

    async with _serving(stream, telemetry.server_interceptors()) as channel:
        call = channel.unary_stream(METHOD)(b"")
        received = [message async for message in _until_status(call)]
        assert received == [b"one", b"two"]
        assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await call.details() == "after two"


async def _until_status(call):
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError:
        return


async def test_a_cancelled_or_timed_out_calls_server_span_says_so(spans):
    """OpenTelemetry's interceptor writes OK when a server span starts and
    changes it only on an abort: a cancelled call's span said OK while the
    RPC metrics counted it CANCELLED."""
    chain = [*telemetry.server_interceptors(), ErrorInterceptor()]
    async with _serving(_endless, chain) as channel:
        call = channel.unary_stream(METHOD)(b"")
        async for _ in call:
            call.cancel()
            break
        timed_out = channel.unary_stream(METHOD)(b"", timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in timed_out:
                pass
        for _ in range(50):
            if len(spans.get_finished_spans()) == 2:
                break
            await asyncio.sleep(0.05)
    cancelled, deadline = spans.get_finished_spans()
    assert cancelled.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert cancelled.status.status_code == trace.StatusCode.UNSET
    assert deadline.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert deadline.status.status_code == trace.StatusCode.ERROR


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


def test_a_cancel_this_close_to_the_deadline_is_the_deadline() -> None:
    """The caller's deadline starts before ours (when it sends the call), so
    its cancel at its deadline lands while we have a little left: counted
    CANCELLED on a loaded CI run, where the call had timed out."""
    with trace.get_tracer(__name__).start_as_current_span("call"):
        assert telemetry.mark_server_span_ended_early(_Context(0.05)) is grpc.StatusCode.DEADLINE_EXCEEDED
        assert telemetry.mark_server_span_ended_early(_Context(-1.0)) is grpc.StatusCode.DEADLINE_EXCEEDED
        assert telemetry.mark_server_span_ended_early(_Context(5.0)) is grpc.StatusCode.CANCELLED
        assert telemetry.mark_server_span_ended_early(_Context(None)) is grpc.StatusCode.CANCELLED
