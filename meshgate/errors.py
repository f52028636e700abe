"""Error mapping: every failure leaves a service as a gRPC status carrying a
``google.rpc.Status`` with an ``ErrorInfo`` detail (AIP-193).

Handlers raise :class:`MeshgateError`; :class:`ErrorInterceptor` turns it, any
unexpected exception, and undecodable requests into rich statuses. Calls to
other services convert their failures back with :func:`from_rpc_error`, so a
reason survives every hop.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import math
import time
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from meshgate import telemetry
from meshgate.reasons import Reason

DOMAIN = "meshgate"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

log = structlog.get_logger(__name__)


# A status travels in trailers, which gRPC caps at 16 KiB: a message that
# echoed a caller's 1 MB model name turned a clear NOT_FOUND into a bare
# RESOURCE_EXHAUSTED. Percent-encoding can grow a character to 9 bytes.
_MAX_MESSAGE_CHARS = 512
_MAX_METADATA_VALUE_CHARS = 128


def clip(text: str, limit: int = _MAX_METADATA_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (its last one an ellipsis): a
    caller's string where it is shown (a status, a log line), which it could
    otherwise fill with megabytes."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MeshgateError(Exception):
    """A failure to report to the caller as ``code`` with an ErrorInfo ``reason``."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: dict[str, str] | None = None,
        domain: str = DOMAIN,
        details: collections.abc.Sequence[protobuf_message.Message] = (),
    ) -> None:
        # Clipped as its status would be (to_status_proto): a message quotes
        # a caller's text ("unknown model '...'"), and the exception's own
        # text goes into span events and log lines (a review: a 2 MB model
        # name, whole, in its refusal's exception events).
        message = clip(message, _MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata or {}
        self.domain = domain
        # More google.rpc details after the ErrorInfo (QuotaFailure, RetryInfo).
        self.details = list(details)

    def copy(self) -> MeshgateError:
        """The same failure as a new exception object: one failure shared by
        several callers is raised as a copy for each (a raise rewrites the
        exception's traceback, and each caller's is its own RPC's)."""
        return MeshgateError(
            self.code, self.reason, self.message, dict(self.metadata), self.domain, self.details
        )

    def __reduce__(self):
        # Pickled whole: Exception's own pickling would rebuild it from the
        # message alone (the HTTP edge's body parser sends refusals back
        # from its child process: services/router/body_parser.py).
        return MeshgateError, (self.code, self.reason, self.message, self.metadata, self.domain, self.details)

    def to_status_proto(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` with its ErrorInfo, for carrying in a message."""
        metadata = {key: clip(value) for key, value in self.metadata.items()}
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain, metadata=metadata)
        status = status_pb2.Status(code=self.code.value[0], message=clip(self.message, _MAX_MESSAGE_CHARS))
        status.details.add().Pack(info)
        for detail in self.details:
            status.details.add().Pack(detail)
        return status

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())

    def __repr__(self) -> str:
        return f"MeshgateError({self.code.name}, {self.reason!r}, {self.message!r})"


def invalid_argument(reason: str, message: str, **metadata: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def not_found(reason: str, message: str, **metadata: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.NOT_FOUND, reason, message, metadata)


def unavailable(reason: str, message: str, **metadata: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.UNAVAILABLE, reason, message, metadata)


def aborted(reason: str, message: str, **metadata: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.ABORTED, reason, message, metadata)


def deadline_exceeded(reason: str, message: str, **metadata: str) -> MeshgateError:
    return MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, reason, message, metadata)


def partly_delivered(
    failure: MeshgateError, deltas: int, chars: int, tokens: int | None = None
) -> MeshgateError:
    """Marks a failure that ended a stream after part of the answer went out:
    the caller learns how much it got (``delivered_deltas``,
    ``delivered_chars``, and ``delivered_tokens`` where known) and so that
    the text it holds is a fragment, not an answer."""
    failure.metadata["delivered_deltas"] = str(deltas)
    failure.metadata["delivered_chars"] = str(chars)
    if tokens is not None:
        failure.metadata["delivered_tokens"] = str(tokens)
    return failure


def internal_error() -> MeshgateError:
    """What a caller learns of a bug: that it happened, nothing of its insides."""
    return MeshgateError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")


def _detail(error: grpc.aio.AioRpcError | grpc.RpcError, kind: type[protobuf_message.Message]):
    """The detail of type ``kind`` a failed call's rich status carried, if any."""
    trailing = error.trailing_metadata() or ()
    for key, value in trailing:
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(kind.DESCRIPTOR):
                    found = kind()
                    detail.Unpack(found)
                    return found
    return None


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a failed call carried, if any."""
    return _detail(error, error_details_pb2.ErrorInfo)


# When a caller refused SERVICE_BUSY is told to retry (RetryInfo, as the
# router's limits tell theirs): a call holds its place for milliseconds to a
# generation's seconds, so a second is when room is likely, and it is the
# least an HTTP Retry-After says.
BUSY_RETRY_AFTER_S = 1


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """When to retry, as a RetryInfo detail (at least a millisecond)."""
    delay = duration_pb2.Duration()
    # Rounded first: 1.132 s * 1000 is 1132.0000000000002, not 1133 ms.
    delay.FromMilliseconds(max(1, math.ceil(round(seconds * 1000, 6))))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def retry_after_s(error: grpc.aio.AioRpcError) -> float | None:
    """The delay a failed call's RetryInfo asked for, if it carried one."""
    retry = _detail(error, error_details_pb2.RetryInfo)
    return None if retry is None else retry.retry_delay.ToTimedelta().total_seconds()


def busy_unavailable(reason: str, message: str, **metadata: str) -> MeshgateError:
    """Our own answer when the services behind us were busy (SERVICE_BUSY)
    for good: UNAVAILABLE, which callers retry, with our RetryInfo. Not the
    replica's refusal itself: its limit is the mesh's business."""
    return MeshgateError(
        grpc.StatusCode.UNAVAILABLE, reason, message, metadata, details=[retry_info(BUSY_RETRY_AFTER_S)]
    )


# Downstream refusals whose RetryInfo is the caller's: they refuse the
# caller's own request, before any of it ran, for its own tenant's load (a
# generation past the tenant's queue at the inference service), so when it
# may come back is when the caller may retry; the HTTP edge says it as
# Retry-After, as for the router's own limits.
_RETRY_PASSED_ON = frozenset({Reason.TOO_MANY_QUEUED_GENERATIONS})


def received_code(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The code of a failed call to another service, as we act on it and
    tell our caller: the one received, but CANCELLED, which is UNAVAILABLE.

    A cancel of our own (our caller gone, a stream we closed, a task we
    cancelled) is raised by grpc.aio as asyncio.CancelledError, never as
    an AioRpcError, so a CANCELLED here came from the other side: grpc-core
    ends so the calls a server had taken in but not yet handed to a handler
    when it stops, however long its grace (grpc/grpc#41785; seen in a stop
    storm of the context service: 1 Chat in ~14,000 ended CANCELLED). To
    our caller CANCELLED says that it cancelled; the call was cut by a
    service going away, which UNAVAILABLE says, and which a caller retries."""
    code = error.code()
    return grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.CANCELLED else code


# The mesh's own refusals of one of our services' calls by another
# (mesh_auth): its certificate's identity, its method, or the tenant token
# the router signed. Each says the mesh is misconfigured (the router's key
# renewed before the others saw its new certificate, docs/mesh-trust.md),
# never that our caller's credentials are bad: passed on as they came, a
# tenant with a valid API key got UNAUTHENTICATED TENANT_TOKEN_INVALID (a
# 401 on the HTTP edge, which clients take for a bad key and do not retry)
# with internal settings in its message, and no log line said why (a review).
_MESH_REFUSALS = frozenset(
    {
        Reason.PEER_NOT_ALLOWED,
        Reason.METHOD_NOT_ALLOWED,
        Reason.TENANT_TOKEN_MISSING,
        Reason.TENANT_TOKEN_INVALID,
        Reason.TENANT_MISMATCH,
    }
)
# One line per downstream service and reason every few seconds: a mesh
# refusal fails every call while it lasts.
_mesh_refusals_log = telemetry.ThrottledLog(log, interval_s=10.0)


def from_rpc_error(error: grpc.aio.AioRpcError, service: str) -> MeshgateError:
    """Re-raises a downstream failure with its code (received_code) and
    reason intact, but for a busy replica's (SERVICE_BUSY: see
    busy_unavailable) and the mesh's refusal of this service's own
    credentials (_MESH_REFUSALS), each DOWNSTREAM_FAILED, whose metadata
    ``code`` is the code received. Its other
    details, a RetryInfo included, stay behind (but for _RETRY_PASSED_ON):
    when to retry a downstream call is not when to retry ours (an append
    failing after the answer streamed must not invite a paid retry of the
    turn)."""
    info = error_info(error)
    if info is not None:
        if info.domain == DOMAIN and info.reason == Reason.SERVICE_BUSY:
            return busy_unavailable(
                Reason.DOWNSTREAM_FAILED,
                f"the {service} service is busy; retry later",
                service=service,
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.name,
            )
        if info.domain == DOMAIN and info.reason in _MESH_REFUSALS:
            code = error.code()
            _mesh_refusals_log.warning(
                "another service refused this one's mesh credentials: check the mesh's certificates",
                per=(service, info.reason),
                downstream=service,
                code=code.name,
                reason=info.reason,
                details=error.details(),
            )
            return MeshgateError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.DOWNSTREAM_FAILED,
                f"{service} call failed: the mesh refused it",
                {"service": service, "code": code.name},
            )
        metadata = dict(info.metadata)
        details = []
        if info.domain == DOMAIN and info.reason in _RETRY_PASSED_ON:
            delay_s = retry_after_s(error)
            if delay_s is not None:
                details.append(retry_info(delay_s))
        return MeshgateError(
            received_code(error), info.reason, error.details() or "", metadata, info.domain, details=details
        )
    # No ErrorInfo: a transport failure or a foreign server. Its details name
    # hosts and ports, which are for our logs, not for callers.
    code = error.code()
    # Not ``service=``: every line names the service that writes it so.
    log.warning("downstream call failed", downstream=service, code=code.name, details=error.details())
    return MeshgateError(
        received_code(error),
        Reason.DOWNSTREAM_FAILED,
        f"{service} call failed: {code.name}",
        {"service": service, "code": code.name},
    )


class _Undecodable:
    """Stands in for a request whose bytes were not a valid message."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: collections.abc.Callable[[bytes], Any] | None):
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except protobuf_message.DecodeError as error:
            # grpc would answer INTERNAL; the caller sent bad bytes, so say so.
            return _Undecodable(error)

    return deserialize


def _malformed(request: _Undecodable) -> MeshgateError:
    return invalid_argument(
        Reason.MALFORMED_REQUEST,
        f"the request is not a valid message (strings must be UTF-8): {request.error}",
    )


def _failure(error: BaseException, method: str) -> MeshgateError:
    if isinstance(error, MeshgateError):
        return error
    if _not_implemented(error):
        return _method_not_implemented(method, f"this service does not implement {method}")
    log.exception("unhandled error", method=method)
    return internal_error()


def _method_not_implemented(method: str, message: str) -> MeshgateError:
    return MeshgateError(
        grpc.StatusCode.UNIMPLEMENTED, Reason.METHOD_NOT_IMPLEMENTED, message, {"method": method}
    )


def _not_implemented(error: BaseException) -> bool:
    """Whether ``error`` is what a method of grpc's generated servicer base
    class raises when no servicer overrides it: its NotImplementedError,
    raised in a ``*_pb2_grpc.py`` module. Told by where it was raised, not
    by its type alone: a NotImplementedError of our own code is a bug (an
    INTERNAL, logged), not a method the service lacks."""
    if not isinstance(error, NotImplementedError) or error.__traceback__ is None:
        return False
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_code.co_filename.endswith("_pb2_grpc.py")


# Failures no other replica can answer differently: every replica of every
# service shares the one Redis. A channel's retry policy (serving.py
# _RETRY_POLICY, up to three attempts on UNAVAILABLE) only waited out the same
# outage again: a stalled Redis held a GetSession for three socket timeouts
# instead of one. gRPC reads a negative retry pushback as "do not retry"
# (gRFC A6), and a caller's own retry of the call stays its choice.
_NOT_RETRIED_REASONS = frozenset({Reason.REDIS_UNAVAILABLE, Reason.LIMITS_UNAVAILABLE})
_NO_RETRY = ("grpc-retry-pushback-ms", "-1")


async def _abort(failure: MeshgateError, context: grpc.aio.ServicerContext) -> None:
    status = failure.to_status()
    trailing = status.trailing_metadata
    if failure.domain == DOMAIN and failure.reason in _NOT_RETRIED_REASONS:
        trailing = (*trailing, _NO_RETRY)
    await context.abort(status.code, status.details, trailing)


async def _checked_iterator(requests: collections.abc.AsyncIterator[Any]):
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _malformed(request)
        yield request


# Reports a finished RPC: method, status code name, ErrorInfo reason ("" when
# OK) and its perf_counter start (meshgate.metrics.RpcObserver).
RpcObserver = collections.abc.Callable[[str, str, str, float], None]


def _ignore(method: str, code: str, reason: str, started: float) -> None:
    pass


# Checks a call from its method's full name and its metadata, before its
# request is read: raises the MeshgateError to refuse it with, or lets it in
# (ErrorInterceptor.gate).
CallGate = collections.abc.Callable[[str, collections.abc.Sequence], collections.abc.Awaitable[None]]


def _abort_code(context: grpc.aio.ServicerContext) -> str:
    """The code of an RPC the handler itself aborted (the mesh guard)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class _Reported:
    """One RPC's failure handling, the same for every handler shape: a
    MeshgateError or any unexpected exception aborts the call with its rich
    status (never a crash), a request that did not decode is refused as
    malformed, and ``observe`` hears how the call ended. An ``async with``
    costs once per call, not per streamed message."""

    __slots__ = ("_method", "_context", "_observe", "_started")

    def __init__(self, method: str, context: grpc.aio.ServicerContext, observe: RpcObserver) -> None:
        self._method = method
        self._context = context
        self._observe = observe
        self._started = time.perf_counter()

    async def __aenter__(self) -> _Reported:
        return self

    async def __aexit__(self, error_type, error, traceback) -> bool:
        code, reason = "OK", ""
        try:
            if error is None:
                return False
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                # GeneratorExit: a streaming handler closed before its end.
                # grpc abandons the handler's generator when a call is
                # cancelled while a message is being sent (not inside the
                # handler), and it is closed later, when collected: that is
                # a cancelled call, not an OK one (3 of 10 streams cancelled
                # mid-answer were counted OK). gRPC cancels the call's task
                # at its deadline too, which the caller sees as such.
                code = telemetry.mark_server_span_ended_early(self._context).name
            elif not isinstance(error, Exception):
                return False  # KeyboardInterrupt, SystemExit: not the call's
            elif isinstance(error, grpc.aio.AbortError):
                code = _abort_code(self._context)
            else:
                failure = _failure(error, self._method)
                code, reason = failure.code.name, failure.reason
                await _abort(failure, self._context)  # raises AbortError, in place of the error
            return False
        finally:
            self._observe(self._method, code, reason, self._started)


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise _malformed(request)
    return request


def _wrap_unary_unary(behavior, method, observe: RpcObserver):
    @functools.wraps(behavior)
    async def handler(request, context):
        async with _Reported(method, context, observe):
            return await behavior(_checked(request), context)

    return handler


def _wrap_unary_stream(behavior, method, observe: RpcObserver):
    @functools.wraps(behavior)
    async def handler(request, context):
        async with _Reported(method, context, observe):
            async for response in behavior(_checked(request), context):
                yield response

    return handler


def _wrap_stream_stream(behavior, method, observe: RpcObserver):
    @functools.wraps(behavior)
    async def handler(request_iterator, context):
        async with _Reported(method, context, observe):
            async for response in behavior(_checked_iterator(request_iterator), context):
                yield response

    return handler


def _wrap_stream_unary(behavior, method, observe: RpcObserver):
    @functools.wraps(behavior)
    async def handler(request_iterator, context):
        async with _Reported(method, context, observe):
            return await behavior(_checked_iterator(request_iterator), context)

    return handler


def _refusal(
    observe: RpcObserver, method: str, failure: MeshgateError, started: float
) -> grpc.RpcMethodHandler:
    """A handler that answers a call with ``failure`` alone, observed as
    ``method``."""

    async def refuse(requests, context) -> None:
        observe(method, failure.code.name, failure.reason, started)
        await _abort(failure, context)

    # Request-streaming whatever the method's shape: gRPC then reads no
    # request message for it (the caller's unary request is left unread).
    return grpc.stream_unary_rpc_method_handler(refuse)


# How the RPC metrics name a call of a method no service has: the name is
# the caller's to choose, and each would be a series of its own.
UNKNOWN_METHOD = "unknown"


class UnknownMethods(grpc.aio.ServerInterceptor):
    """Answers a method that no service of the server has (a name in no
    proto) UNIMPLEMENTED with ErrorInfo METHOD_NOT_IMPLEMENTED, as a method
    of a service's API that its servicer lacks is (_failure); gRPC's own
    answer was UNIMPLEMENTED "Method not found!" with no ErrorInfo.

    The first interceptor, answering only where every handler and every
    other interceptor found nothing: a generic handler serving every name
    would be seen by the others as a method like any, so the tracing
    interceptor would name a span after the caller's string, and the error
    interceptor and the mesh guard would keep a wrapped handler for each
    name a caller makes up. Observed under UNKNOWN_METHOD, for the same
    reason; the caller's method is named back to it alone (ErrorInfo
    metadata ``method``)."""

    def __init__(self, observe: RpcObserver = _ignore) -> None:
        self._observe = observe

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is not None:
            return handler
        method = handler_call_details.method
        failure = _method_not_implemented(method, f"this service has no method {method}")
        return _refusal(self._observe, UNKNOWN_METHOD, failure, time.perf_counter())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns every failure of a handler into a rich status, checks the calls
    of our own services before their requests are read where a service asks
    (:meth:`gate`), and bounds those in flight (:meth:`bound`).

    Handlers are wrapped once per method and memoized, so the hot path pays
    one dictionary lookup, not a new closure per call.
    """

    def __init__(self, observe: RpcObserver = _ignore) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        # Told of every finished RPC, with the status this interceptor gave it.
        self._observe = observe
        # Calls of our own services in flight, and the most at once (0: no bound).
        self._in_flight = 0
        self._max_calls = 0
        self._busy: MeshgateError | None = None
        # Services of ours never counted nor refused, and their methods met so far.
        self._uncounted_services: tuple[str, ...] = ()
        self._uncounted: set[str] = set()
        self._gate: CallGate | None = None

    def gate(self, check: CallGate) -> None:
        """Checks every call of our own services with ``check`` (the router's
        API keys) before its request is read, and before the bound counts it:
        a refused call is answered with check's status and takes no place,
        and its caller's message (up to serving.MAX_MESSAGE_BYTES) is never
        read. ``check`` runs in the call's task, before its handler: a
        contextvar it sets is the handler's to read."""
        self._gate = check

    def bound(self, service: str, max_calls: int, uncounted_services: tuple[str, ...] = ()) -> None:
        """Refuses a call of our own services that arrives while ``max_calls``
        are in flight (0: no bound; ``<service>.max_concurrent_rpcs``) with
        RESOURCE_EXHAUSTED / SERVICE_BUSY, before its request is read (and
        after :meth:`gate`, so a call it refuses is never counted): each
        call may carry a message of up to serving.MAX_MESSAGE_BYTES. gRPC's
        own ``maximum_concurrent_rpcs`` refuses alike, but with no ErrorInfo.
        Health checks and reflection are never refused, nor the calls of
        ``uncounted_services`` (full names, such as the router's
        AdminService: the operator's way in must stay open while callers
        hold the bound).

        Safe to call again with calls in flight (a reload): a counted call
        is always counted out, so the count never goes below zero. Calls
        admitted while there was no bound are never counted, so for as long
        as they run (a long-lived stream: as long as it stays open) the
        replica may hold that many more than a bound set since."""
        self._max_calls = max_calls
        self._uncounted_services = tuple(f"/{name}/" for name in uncounted_services)
        self._uncounted = {method for method in self._wrapped if method.startswith(self._uncounted_services)}
        self._busy = MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.SERVICE_BUSY,
            f"this {service} replica is handling its most calls at once ({max_calls}); retry later",
            {
                "limit": "max_concurrent_rpcs",
                "scope": "replica",
                "limit_value": str(max_calls),
                "service": service,
            },
            details=[retry_info(BUSY_RETRY_AFTER_S)],
        )

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrap(handler, method)
            if wrapped is handler:
                # Not ours (health, reflection): never bound, nor memoized
                # (they may return per-call handlers).
                return handler
            self._wrapped[method] = wrapped
            if method.startswith(self._uncounted_services):
                self._uncounted.add(method)
        if self._gate is not None:
            started = time.perf_counter()
            try:
                await self._gate(method, handler_call_details.invocation_metadata)
            except asyncio.CancelledError:
                # The caller hung up while the gate awaited (its key's
                # lookup): observed as a cancelled handler is (_Reported).
                self._observe(method, "CANCELLED", "", started)
                raise
            except Exception as error:
                return _refusal(self._observe, method, _failure(error, method), started)
        # Counted after the gate: a call it refuses never holds a place.
        if self._max_calls and method not in self._uncounted:
            if self._in_flight >= self._max_calls:
                return _refusal(self._observe, method, self._busy, time.perf_counter())
            self._in_flight += 1
            # gRPC runs the whole call, interceptors included, in one task of
            # its own, done however the call ends (an answer, a failure, the
            # caller cancelling): counted out then, as gRPC's own limit does.
            asyncio.current_task().add_done_callback(self._call_done)
        return wrapped

    def _call_done(self, task: asyncio.Task) -> None:
        self._in_flight -= 1

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if not method.startswith("/meshgate."):
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_unary(handler.unary_unary, method, self._observe), deserializer, serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_unary_stream(handler.unary_stream, method, self._observe), deserializer, serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream_stream(handler.stream_stream, method, self._observe), deserializer, serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            _wrap_stream_unary(handler.stream_unary, method, self._observe), deserializer, serializer
        )
