"""Tracing and logging set-up, shared by every service.

One call, :func:`setup`, at process start: an OpenTelemetry tracer provider
with the configured exporter, W3C trace-context propagation, and structlog
writing one JSON object per line with the current trace and span ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence

import grpc
import structlog
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from meshgate.config import TelemetrySettings

# Health probes and reflection would drown the traces that matter.
_UNTRACED_SERVICES = ("/grpc.health.", "/grpc.reflection.")


def _traced(handler_call_details: grpc.HandlerCallDetails) -> bool:
    # What filters.negate(any_of(service_prefix(...))) says, by the method's
    # prefix: the library's filters check every call's details against a
    # typing Protocol (isinstance on a Protocol), ~4% of a router's CPU per
    # exact cache hit in a profile.
    return not handler_call_details.method.startswith(_UNTRACED_SERVICES)


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line: for local runs and tests."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "kind": span.kind.name,
                        "trace_id": format(context.trace_id, "032x"),
                        "span_id": format(context.span_id, "016x"),
                        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                    },
                    default=str,
                )
            )
        with self._lock:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def _exporter(settings: TelemetrySettings) -> SpanExporter | None:
    if settings.exporter == "none":
        return None
    if settings.exporter == "jsonl":
        return JsonLinesSpanExporter(settings.jsonl_path)
    if settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    raise ValueError(f"unknown telemetry exporter {settings.exporter!r}")


def _add_trace_ids(_, __, event: dict) -> dict:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


# The longest a span attribute's value is kept. The gRPC instrumentation
# records the caller's user-agent whole, on every server span and before any
# key is checked: 15,000 characters of it (grpc takes ~16 KiB of metadata)
# made each span 30 times its size, in every trace back end. Ours are model
# names, addresses and reasons.
MAX_SPAN_ATTRIBUTE_CHARS = 256
# The longest an event's (or a link's) attribute value is kept: an
# exception's stack trace, kept whole up to this. A review's 2 MB model name
# came back in the stack trace of its refusal's exception event, twice: a
# 4 MB span, which the OTLP collector refused (4 MiB) with the batch of
# every other call's spans (MeshgateError now clips its own message; this
# bounds what other exceptions quote).
MAX_EVENT_ATTRIBUTE_CHARS = 32768


def tracer_provider(service_name: str) -> TracerProvider:
    return TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        span_limits=SpanLimits(
            max_span_attribute_length=MAX_SPAN_ATTRIBUTE_CHARS, max_attribute_length=MAX_EVENT_ATTRIBUTE_CHARS
        ),
    )


def setup(service_name: str, settings: TelemetrySettings) -> TracerProvider:
    provider = tracer_provider(service_name)
    exporter = _exporter(settings)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)

    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    # Libraries log through the standard library (grpc, redis, asyncio):
    # their lines go through the same processors, so every line is JSON.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service_name)
    return provider


def server_interceptors() -> list:
    return [_StreamsClosedInTheirCall(), aio_server_interceptor(filter_=_traced)]


class _StreamsClosedInTheirCall(grpc.aio.ServerInterceptor):
    """Runs each response-streaming handler as a coroutine that writes its
    messages (``context.write``) and closes the handler's generator itself,
    in the call's task, however the call ends.

    gRPC iterates a streaming handler's generator and, when the call is
    cancelled while a message is being sent, abandons it unclosed (grpc/grpc
    #42295); it is closed when collected, outside the call's task and its
    context. OpenTelemetry's server span, opened inside that generator,
    then failed to detach its context: an ERROR with a traceback in the
    service's log for each such call (280 for 200 streams cancelled in a
    scratch run), and the span ended whenever the collector came. First in
    the interceptor chain, so the generator it closes is the outermost one.
    The messages are the same on the wire, serialized by the method's own
    serializer."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _written(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _written(handler.stream_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


def _written(behavior):
    if not inspect.isasyncgenfunction(behavior):
        return behavior  # writes its messages itself already

    async def write_all(request, context) -> None:
        async with contextlib.aclosing(behavior(request, context)) as responses:
            try:
                async for response in responses:
                    await context.write(response)
            except asyncio.CancelledError:
                # Cancelled while a message was sent, outside the handler:
                # the server span is still open and current here.
                mark_server_span_ended_early(context)
                raise

    return write_all


def mark_server_span_ended_early(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Tells the current server span how a call gRPC ended before its
    handler gave a status ended, and returns that code: DEADLINE_EXCEEDED
    where the deadline passed (gRPC cancels the call's task then),
    CANCELLED otherwise (the caller left). OpenTelemetry's interceptor
    writes OK when the span starts and changes it only on an abort: a
    cancelled call's span said OK while the RPC metrics counted it
    CANCELLED (a review). A deadline is the server's error, as the
    conventions for gRPC server spans say; a caller's cancel is not. Called
    where the cancel is met with the span still open: in the handler (the
    error interceptor, inside OpenTelemetry's) or at a message's send
    (:func:`_written`, outside the handler)."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
    return code


# How close to its deadline a cancelled call counts as ended by it. The
# caller's deadline starts when it sends the call, ours when its headers
# arrive: its clock runs out first, by the call's transit and whatever held
# our side meanwhile, and its cancel lands while we still have that much left
# (a loaded CI run observed a 0.3 s deadline as CANCELLED). A caller that
# cancels itself this close to its deadline is counted as timed out.
_DEADLINE_SLACK_S = 0.1


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - a context that cannot tell: not a deadline
        return False
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


def client_interceptors() -> list:
    return aio_client_interceptors()


# OpenTelemetry's GenAI semantic conventions (gen_ai.*): what tracing
# back ends (Jaeger, Tempo, Langfuse, Phoenix) show for a model call.
GENAI_PROVIDER = "meshgate"
_tracer = trace.get_tracer("meshgate")


def genai_request_attributes(operation: str, model: str, parameters) -> dict[str, object]:
    """The request side of a GenAI span; ``parameters`` is a
    GenerationParameters (only what the caller set is recorded)."""
    attributes: dict[str, object] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": GENAI_PROVIDER,
        "gen_ai.request.model": model,
    }
    if parameters.HasField("max_tokens"):
        attributes["gen_ai.request.max_tokens"] = parameters.max_tokens
    if parameters.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = parameters.temperature
    if parameters.HasField("top_p"):
        attributes["gen_ai.request.top_p"] = parameters.top_p
    if parameters.HasField("seed"):
        attributes["gen_ai.request.seed"] = parameters.seed
    if parameters.stop:
        # How many, not which: the sequences are the caller's text, which no
        # span carries (the conventions' gen_ai.request.stop_sequences would
        # send it to every trace back end; prompts and answers stay out too).
        attributes["meshgate.request.stop_sequence_count"] = len(parameters.stop)
    return attributes


def genai_usage_attributes(
    input_tokens: int, output_tokens: int, finish_reason: str, response_model: str = ""
) -> dict[str, object]:
    attributes: dict[str, object] = {
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
    }
    if finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [finish_reason]
    if response_model:
        attributes["gen_ai.response.model"] = response_model
    return attributes


def start_genai_span(operation: str, model: str, parameters) -> trace.Span:
    """A client span named as the conventions ask ("chat smollm2"), child of
    the current span. Not made current: a turn's events are yielded across
    tasks' resumptions, where a context attached at the start could not be
    detached; the caller ends it."""
    return _tracer.start_span(
        f"{operation} {model}",
        kind=trace.SpanKind.CLIENT,
        attributes=genai_request_attributes(operation, model, parameters),
    )


def embedding_span(model: str):
    """The span of an embedding computed in this process (the cache's own
    minilm), named as the GenAI conventions name a model call ("embeddings
    minilm"): where a trace showed the client span of an Embed call before.
    A context manager, made current."""
    return _tracer.start_as_current_span(
        f"embeddings {model}",
        kind=trace.SpanKind.INTERNAL,
        attributes={
            "gen_ai.operation.name": "embeddings",
            "gen_ai.provider.name": GENAI_PROVIDER,
            "gen_ai.request.model": model,
        },
    )


def start_grpc_client_span(
    method: str, peer: str, inject: bool = True
) -> tuple[trace.Span, tuple[tuple[str, str], ...]]:
    """The client span of one streaming call made on a channel without the
    gRPC client interceptor, which wraps every message of a stream in two
    more async generators: here the span costs once per call, nothing per
    message. Named as the interceptor names it. Returns the span (not made
    current; end it with :func:`end_grpc_client_span`) and the call's
    metadata: the span's W3C trace context, so the server's spans join the
    trace; none without ``inject`` (a request on a call opened earlier,
    which has no metadata of its own)."""
    service, _, name = method.lstrip("/").rpartition("/")
    span = _tracer.start_span(
        method,
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "server.address": peer},
    )
    if not inject:
        return span, ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, tuple(carrier.items())


def end_grpc_client_span(span: trace.Span, error: BaseException | None) -> None:
    """Ends a span of :func:`start_grpc_client_span` with how the call ended.
    A call its own caller left (a cancel, a deadline, a cache hit overtaking
    a speculative generation: CancelledError in the caller's task, or the
    caller's generator closed) is CANCELLED and not an error: a review found
    two ERROR spans in every semantic hit's trace and every cancelled turn's,
    while the metrics and the HTTP edge call them no failure. A cancel that
    is a failure (a watchdog's, the probes') reaches here as the
    MeshgateError its call site made of it."""
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
    left = isinstance(error, asyncio.CancelledError | GeneratorExit)
    if code is None:
        code = grpc.StatusCode.CANCELLED if left else grpc.StatusCode.OK if error is None else None
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
    if error is not None and not left:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
    span.end()


def current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


class ThrottledLog:
    """A warning that a failure repeats for every request while it lasts
    (thousands of identical lines a second under load, drowning the log
    pipeline): per ``per`` key, the first is logged, then at most one line
    per ``interval_s``, whose ``suppressed`` says how many went unlogged
    since the key's last line. Those of a burst's end are counted in the
    key's next line, whenever it comes: a timer to flush them would be a
    task per key for a count."""

    def __init__(self, logger, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def warning(self, event: str, per: Hashable = None, **fields) -> None:
        suppressed = self.admit(per)
        if suppressed is not None:
            self._log.warning(event, suppressed=suppressed, **fields)

    def admit(self, per: Hashable = None) -> int | None:
        """Whether a line for ``per`` goes out now: how many went unlogged
        since its last (0 for none), or None to leave this one out (counted)."""
        now = self._clock()
        logged_at = self._logged_at.get(per)
        if logged_at is not None and now - logged_at < self._interval_s:
            self._suppressed[per] = self._suppressed.get(per, 0) + 1
            return None
        self._logged_at[per] = now
        return self._suppressed.pop(per, 0)
