"""meshgate/metrics.py: the off switch, and the error interceptor's reports."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from meshgate import metrics
from meshgate.errors import ErrorInterceptor, invalid_argument
from meshgate.reasons import Reason


@pytest.fixture
def disabled():
    metrics.configure(False)
    yield
    metrics.configure(True)


def test_metrics_off_count_nothing_and_register_nothing(disabled):
    before = set(metrics.REGISTRY._names_to_collectors)  # noqa: SLF001 - what the endpoint would serve
    router = metrics.router()
    router.time_to_first_token.labels("m", "d").observe(0.1)
    router.turns.labels("m", "miss", "completed").inc()
    metrics.cache().resident_rows.set_function(lambda: 1)
    assert set(metrics.REGISTRY._names_to_collectors) == before  # noqa: SLF001
    assert router.turns is metrics.context().assembly  # the one shared no-op


def test_switching_metrics_off_and_on_again_registers_nothing_twice():
    """The full suite once registered the router's metrics a second time
    (DuplicateTimeseries) after a test had switched metrics off and on."""
    first = metrics.router()
    metrics.configure(False)
    metrics.configure(True)
    assert metrics.router() is first


class _Context:
    def __init__(self, time_remaining: float | None = None) -> None:
        self.aborted_with = None
        self.remaining = time_remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code, details, trailing_metadata):
        self.aborted_with = code
        raise grpc.aio.AbortError()


async def test_the_interceptor_reports_each_rpc_with_its_code_and_reason():
    seen = []
    interceptor = ErrorInterceptor(lambda method, code, reason, started: seen.append((method, code, reason)))

    async def ok(request, context):
        return "fine"

    async def refused(request, context):
        raise invalid_argument(Reason.EMPTY_MESSAGES, "messages must not be empty")

    for behavior in (ok, refused):
        handler = interceptor._wrap(  # noqa: SLF001 - the wrapper every served method gets
            grpc.unary_unary_rpc_method_handler(behavior), "/meshgate.x.v1.S/M"
        )
        context = _Context()
        try:
            await handler.unary_unary(b"", context)
        except grpc.aio.AbortError:
            assert context.aborted_with == grpc.StatusCode.INVALID_ARGUMENT
    assert seen == [
        ("/meshgate.x.v1.S/M", "OK", ""),
        ("/meshgate.x.v1.S/M", "INVALID_ARGUMENT", "EMPTY_MESSAGES"),
    ]


async def test_a_stream_closed_before_its_end_is_reported_cancelled_not_ok():
    """grpc abandons a streaming handler cancelled while a message was being
    sent; its generator is closed (GeneratorExit) when collected."""
    seen = []
    interceptor = ErrorInterceptor(lambda method, code, reason, started: seen.append(code))

    async def tokens(request, context):
        for _ in range(3):
            yield "token"

    handler = interceptor._wrap(  # noqa: SLF001 - the wrapper every served method gets
        grpc.unary_stream_rpc_method_handler(tokens), "/meshgate.x.v1.S/Stream"
    )
    stream = handler.unary_stream(b"", _Context())
    assert await anext(stream) == "token"
    await stream.aclose()
    whole = handler.unary_stream(b"", _Context())
    assert [token async for token in whole] == ["token"] * 3
    assert seen == ["CANCELLED", "OK"]


async def test_a_call_its_deadline_ended_is_reported_deadline_exceeded_not_cancelled():
    """gRPC cancels a call's task at its deadline as at a hang-up: both were
    counted CANCELLED, where the caller saw DEADLINE_EXCEEDED."""
    seen = []
    interceptor = ErrorInterceptor(lambda method, code, reason, started: seen.append(code))

    async def tokens(request, context):
        yield "token"
        await asyncio.sleep(3600)
        yield "never"

    handler = interceptor._wrap(  # noqa: SLF001 - the wrapper every served method gets
        grpc.unary_stream_rpc_method_handler(tokens), "/meshgate.x.v1.S/Stream"
    )
    for remaining in (0.0, 5.0, None):
        stream = handler.unary_stream(b"", _Context(remaining))
        reading = asyncio.ensure_future(anext(stream))
        assert await reading == "token"
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    assert seen == ["DEADLINE_EXCEEDED", "CANCELLED", "CANCELLED"]
