"""The router's OpenAI-compatible HTTP edge: ``POST /v1/chat/completions``
(server-sent events or one JSON body), ``GET /v1/models`` (and
``/v1/models/{id}``; HEAD too) and ``POST /v1/embeddings``, in the router
process, on its event loop.

It is a second front end over the same :class:`Pipeline` as the gRPC
servicer: the same Bearer keys and tenants, limits, cache and sessions. It
turns JSON into a ChatRequest, the pipeline's events into OpenAI's
``chat.completion(.chunk)`` objects, and every MeshgateError into an HTTP
status and OpenAI's error body through one table (:data:`HTTP_ERRORS`).

A raw ASGI app over uvicorn with httptools: chosen by
``bench/edge_bench.py``'s stack comparison (uvicorn+httptools had the
lowest first-byte latency and CPU per streamed request of uvicorn (h11 or
httptools), hypercorn and granian's embedded server; a framework such as
starlette would add routing we do not need). uvicorn's ``Server`` runs on
the router's running uvloop loop: no thread, no extra hop.

Extensions in the body (the openai SDK sends them with ``extra_body``):
``session_id`` continues a session, ``"new"`` starts one (the answer's
``meshgate`` object names the session and its version); ``cache_policy``
is ``use`` (the default), ``bypass`` or ``refresh``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http
import ipaddress
import json
import logging
import math
import socket
import struct
import sys
import threading
import time
import uuid

import grpc
import structlog
import uvicorn
from google.rpc import error_details_pb2
from opentelemetry import propagate, trace
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from meshgate import metrics, serving, telemetry
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings, RouterSettings, tcp_listen_address
from meshgate.embedding_input import check_text_count
from meshgate.errors import (
    MeshgateError,
    internal_error,
    invalid_argument,
    not_found,
)
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.sampling import check_stop_count
from services.router.admission import Hold, TenantCalls, WindowUse, tightest_windows
from services.router.auth import Authenticator, Tenant, same_tenant
from services.router.body_parser import BodyParser
from services.router.embeddings import Embeddings
from services.router.pipeline import Budget, Completion, Delivered, Delta, Failure, Pipeline, stopped
from services.router.validation import check_message_count

log = structlog.get_logger(__name__)
_tracer = trace.get_tracer("meshgate.http")

# --- errors ------------------------------------------------------------------

# (gRPC code, reason) -> (HTTP status, OpenAI error type); a reason of None
# stands for any reason of that code without its own row.
HTTP_ERRORS: dict[tuple[grpc.StatusCode, str | None], tuple[int, str]] = {
    (grpc.StatusCode.INVALID_ARGUMENT, None): (400, "invalid_request_error"),
    (grpc.StatusCode.INVALID_ARGUMENT, Reason.BODY_TOO_LARGE): (413, "invalid_request_error"),
    (grpc.StatusCode.INVALID_ARGUMENT, Reason.HEADERS_TOO_LARGE): (431, "invalid_request_error"),
    (grpc.StatusCode.INVALID_ARGUMENT, Reason.UNSUPPORTED_CONTENT_ENCODING): (415, "invalid_request_error"),
    (grpc.StatusCode.UNIMPLEMENTED, Reason.UNSUPPORTED_TRANSFER_CODING): (501, "invalid_request_error"),
    (grpc.StatusCode.FAILED_PRECONDITION, None): (400, "invalid_request_error"),
    (grpc.StatusCode.OUT_OF_RANGE, None): (400, "invalid_request_error"),
    (grpc.StatusCode.UNAUTHENTICATED, None): (401, "authentication_error"),
    (grpc.StatusCode.PERMISSION_DENIED, None): (403, "permission_error"),
    (grpc.StatusCode.NOT_FOUND, None): (404, "not_found_error"),
    # OpenAI answers an unknown model with 404 and this type.
    (grpc.StatusCode.NOT_FOUND, Reason.MODEL_NOT_FOUND): (404, "invalid_request_error"),
    (grpc.StatusCode.UNIMPLEMENTED, Reason.UNKNOWN_ENDPOINT): (404, "invalid_request_error"),
    (grpc.StatusCode.UNIMPLEMENTED, Reason.METHOD_NOT_SUPPORTED): (405, "invalid_request_error"),
    (grpc.StatusCode.ABORTED, None): (409, "conflict_error"),
    (grpc.StatusCode.ALREADY_EXISTS, None): (409, "conflict_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, None): (429, "rate_limit_error"),
    # A full session is no rate limit, with no window to wait out: a conflict
    # (background compaction may make room, unannounced).
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL): (409, "conflict_error"),
    (grpc.StatusCode.UNAVAILABLE, None): (503, "service_unavailable_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None): (504, "timeout_error"),
    # The client's own slowness, not the mesh's: its body did not come in time.
    (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.REQUEST_BODY_TIMEOUT): (408, "invalid_request_error"),
    (grpc.StatusCode.CANCELLED, None): (503, "service_unavailable_error"),
}
_DEFAULT_HTTP_ERROR = (500, "api_error")
# Answered with "Connection: close": uvicorn would keep the connection after
# the answer, skipping the body's rest as it comes, and each byte of it
# cancels uvicorn's keep-alive timer: a client that stalls mid-body would
# hold the connection for as long as it liked. A header block past its
# bound (431) has no end the parser could skip to. The other errors answered
# before the body is read in whole (401, 404, 405, 413, 429) keep their
# connection: their client may still be sending, and closing a socket with
# unread bytes resets the connection, which can lose the answer. The rest
# of their body must come within router.http_header_timeout_s of its first
# byte after the answer, else the connection is closed (_BoundedHeaders).
# A body of a coding not decoded has no end the parser knows either. (And a
# refusal before the body of a request that said "Expect: 100-continue":
# _Response.body_unsent.)
_CLOSES_CONNECTION = {
    Reason.REQUEST_BODY_TIMEOUT,
    Reason.HEADERS_TOO_LARGE,
    Reason.UNSUPPORTED_TRANSFER_CODING,
}

# The OpenAI SDKs resend a 408, 409, 429 or 5xx answer (twice by default,
# after a backoff) unless its "x-should-retry: false" says not to. These fail
# the same way however often they are resent (a stale expected_version, a
# session that exists, a request larger than the limit itself): each resend
# costs the caller its backoff and the router a refused call, for the same
# answer. Not SESSION_FULL: a session over its cap is compacted in the
# background, and a resend seconds later may find room; the tenant's
# sessions over context.max_bytes_per_tenant find room only once the tenant
# deletes, reverts or lets expire some of them.
_NOT_WORTH_RESENDING = {
    Reason.VERSION_CONFLICT,
    Reason.SESSION_EXISTS,
    Reason.REQUEST_EXCEEDS_LIMIT,
    Reason.SESSION_QUOTA_EXCEEDED,
}

# The request field a validation reason is about (OpenAI's error "param").
_PARAM_OF_REASON = {
    Reason.MODEL_NOT_FOUND: "model",
    Reason.MODEL_NOT_ALLOWED: "model",
    Reason.EMPTY_MESSAGES: "messages",
    Reason.TOO_MANY_MESSAGES: "messages",
    Reason.INVALID_ROLE: "messages",
    Reason.MESSAGE_TOO_LARGE: "messages",
    Reason.LAST_MESSAGE_NOT_USER: "messages",
    Reason.INVALID_MAX_TOKENS: "max_tokens",
    Reason.MAX_TOKENS_TOO_LARGE: "max_tokens",
    Reason.INVALID_TEMPERATURE: "temperature",
    Reason.INVALID_TOP_P: "top_p",
    Reason.INVALID_SEED: "seed",
    Reason.INVALID_STOP: "stop",
    Reason.INVALID_SESSION_ID: "session_id",
    Reason.SESSION_NOT_FOUND: "session_id",
    Reason.EMPTY_TEXTS: "input",
    Reason.TOO_MANY_TEXTS: "input",
    Reason.TEXT_TOO_LARGE: "input",
}


def _status_and_kind(error: MeshgateError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of ``error``: its reason's own
    row, else its code's."""
    return HTTP_ERRORS.get((error.code, error.reason)) or HTTP_ERRORS.get(
        (error.code, None), _DEFAULT_HTTP_ERROR
    )


def http_error(
    error: MeshgateError, turn_may_be_stored: bool = False
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and OpenAI-style body for ``error``, with Retry-After
    when the error said when to retry (RetryInfo: the limits' 429s, a busy
    replica's 503). ``turn_may_be_stored``: the error ends a session turn
    that had begun to be stored (Pipeline.run's before_saving), which a
    resend would store again."""
    status, kind = _status_and_kind(error)
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        # RFC 6750 §3: a 401 names the scheme the caller should use.
        headers.append((b"www-authenticate", b"Bearer"))
    if error.reason in _CLOSES_CONNECTION:
        headers.append((b"connection", b"close"))
    if error.reason == Reason.UNSUPPORTED_CONTENT_ENCODING:
        # RFC 9110 §12.5.3: what the server takes.
        headers.append((b"accept-encoding", b"identity"))
    if error.reason in _NOT_WORTH_RESENDING or turn_may_be_stored:
        headers.append((b"x-should-retry", b"false"))
    if status == 405 and "allow" in error.metadata:
        # RFC 9110 §15.5.6: a 405 lists the methods the resource takes.
        headers.append((b"allow", error.metadata["allow"].encode()))
    for detail in error.details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            delay_ms = detail.retry_delay.ToMilliseconds()
            headers.append((b"retry-after", str(max(1, math.ceil(delay_ms / 1000))).encode()))
            word = _RATE_WINDOWS.get(error.metadata.get("limit", ""))
            if word is not None and error.metadata.get("limit_value", "").isdigit():
                # A per-minute window refused the turn: what it holds for a
                # smaller one, and when this one fits (the other window is
                # not known here).
                value = int(error.metadata["limit_value"])
                remaining = int(error.metadata.get("limit_remaining", "0"))
                headers += _rate_limit_triple(word, value, remaining, delay_ms)
    return status, headers, _json(error_body(error, kind))


# OpenAI's names for the per-minute windows in its x-ratelimit-* headers.
_RATE_WINDOWS = {"requests_per_minute": b"requests", "tokens_per_minute": b"tokens"}


def rate_limit_headers(
    windows: tuple[WindowUse, ...], now_s: float | None = None
) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for a
    turn admitted with ``windows`` (admission.Reservation.windows): of the
    windows of each limit among its scopes (tenant, API key, model), the
    one with the least left after this turn (admission.tightest_windows;
    its tokens as reserved: the prompt's estimate and max_tokens); reset,
    when that window's oldest entry leaves it, so that its remaining next
    grows (a one-minute sliding window, not a bucket that refills), counted
    from ``now_s`` (monotonic; default now: a response starts after its
    turn's admission, a whole answer after its generation). None for a
    limit that no scope sets, or for a turn admitted without Redis (failing
    open)."""
    now_s = time.monotonic() if now_s is None else now_s
    headers = []
    for window in tightest_windows(windows):
        reset_ms = window.frees_in_ms_at(now_s)
        headers += _rate_limit_triple(_RATE_WINDOWS[window.limit], window.value, window.remaining, reset_ms)
    return headers


def _rate_limit_triple(word: bytes, value: int, remaining: int, reset_ms: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-" + word, str(value).encode()),
        (b"x-ratelimit-remaining-" + word, str(remaining).encode()),
        (b"x-ratelimit-reset-" + word, _duration(reset_ms).encode()),
    ]


def _duration(ms: int) -> str:
    """A wait as OpenAI's reset headers write it (Go's duration text):
    "250ms", "1.5s", "59s", "1m0s"."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def error_body(error: MeshgateError, kind: str | None = None) -> dict:
    """OpenAI's error object for ``error``; ``kind`` (OpenAI's type) as
    http_error looks it up unless given. The message and metadata are
    clipped as the gRPC status clips them (MeshgateError.to_status_proto):
    they may echo the caller's input (a 1 MB model name), which an error
    body must not send back whole."""
    if kind is None:
        kind = _status_and_kind(error)[1]
    status = error.to_status_proto()
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    metadata = {key: info.metadata[key] for key in error.metadata}
    body = {
        "message": status.message,
        "type": kind,
        # The ErrorInfo reason, spelled as every other front end spells it.
        "code": error.reason,
        "param": metadata.get("param") or _PARAM_OF_REASON.get(error.reason),
    }
    # Always an object ({} when the error has none), as docs/http-api.md says:
    # a client reads it without checking that it is there.
    body["metadata"] = {key: value for key, value in metadata.items() if key != "param"}
    return {"error": body}


def _bad_request(message: str, param: str, reason: Reason = Reason.MALFORMED_REQUEST) -> MeshgateError:
    return invalid_argument(reason, message, param=param)


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# What JSON may leave raw in a string (json.dumps does) but str.splitlines
# ends a line at: a client that splits an event stream with it (httpx's
# aiter_lines, older httpx-sse) would read an answer holding one as a broken
# data line and a line that is no field. Escaped, each is the same
# character to every JSON reader. (The SSE spec ends lines at CR and LF
# alone, which JSON always escapes.)
_SPLITLINES_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event_json(value) -> bytes:
    """``value`` as the JSON of a server-sent event's data line: on one line
    for every line splitter (:data:`_SPLITLINES_ESCAPES`)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        text = text.translate(_SPLITLINES_ESCAPES)
    return text.encode()


def _error_event(error: MeshgateError) -> bytes:
    """The server-sent event that ends a stream failing midway (the openai
    SDK raises it), without [DONE]: never a silent short answer."""
    return b"data: " + _event_json(error_body(error)) + b"\n\n"


# --- requests ----------------------------------------------------------------

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
# Fields whose use would change the answer in ways the mesh does not do:
# refused, never silently ignored. Each is accepted absent, null or empty,
# and at the values listed, which ask for what the mesh does anyway (no
# tool or function calls; text alone): SDKs and proxies send them, as they
# send penalties and logit_bias at their neutral values (accepted below).
# A tool_choice of "auto", "required" or a named tool asks for tools to be
# offered, which they cannot be: refused.
_UNSUPPORTED: dict[str, tuple] = {
    "tools": (),
    "functions": (),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    # OpenAI refuses it without tools, which are never offered here.
    "parallel_tool_calls": (),
}
# OpenAI's request fields that ask nothing of the answer (who asks, what to
# tag or keep it with, a processing tier, a prompt-cache routing hint):
# accepted and not used, as SDKs and proxies send them.
_INFORMATIONAL = ("user", "safety_identifier", "metadata", "store", "service_tier", "prompt_cache_key")
# Those OpenAI types as strings; metadata is an object of strings, store a
# boolean.
_INFORMATIONAL_TEXT = ("user", "safety_identifier", "service_tier", "prompt_cache_key")
# Every field a chat completion's body may have: OpenAI's that are mapped,
# refused at some values or informational, and meshgate's extensions. Any
# other is refused as OpenAI refuses a field it does not know ("Unrecognized
# request argument supplied"): a provider's top_k, or reasoning_effort to a
# model without reasoning, was meant to change the answer, and dropped it
# would change nothing, silently.
_CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "session_id",
        "cache_policy",
        *_UNSUPPORTED,
        *_INFORMATIONAL,
    }
)
# The same for an embeddings body.
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
# An assistant's fields of tool use (its calls). A tool's answer, with its
# tool_call_id, is a message of role "tool", refused by its role.
_TOOL_FIELDS = ("tool_calls", "function_call")
# Every field a message may have, by role. A participant's ``name`` is
# accepted and not used (SDKs send it; the bundled chat templates have no
# place for it). Only an assistant's message has the rest, as in OpenAI's
# API: its tool fields are accepted null (``message.model_dump()`` in
# openai-python sends them so); of another shape than OpenAI's schema
# (:func:`_check_tool_use_shape`) they are a malformed request, in OpenAI's
# words; well formed, they are refused by name (tool calls are not
# supported); its
# ``refusal`` is what it said when its content is empty; an answer sent
# back as the client got it has ``annotations`` (OpenAI's ``[]``, or
# citations of the text it holds) and ``audio`` (null from
# ``model_dump()``): the first accepted and not used, the second accepted
# null, refused naming it otherwise (an earlier audio answer, which the
# mesh does not have). Any other, and these on another role's message,
# is refused as at the top level, as OpenAI refuses them, even null (a field
# the role does not have, whatever its value): a field misspelt
# (``contnet``) would otherwise leave an empty turn, and a user's
# ``refusal`` was served as what the user said, silently.
_ANY_ROLE_FIELDS = frozenset({"role", "content", "name"})
_MESSAGE_FIELDS = {
    common_pb2.ROLE_SYSTEM: _ANY_ROLE_FIELDS,
    common_pb2.ROLE_USER: _ANY_ROLE_FIELDS,
    common_pb2.ROLE_ASSISTANT: _ANY_ROLE_FIELDS | {*_TOOL_FIELDS, "refusal", "annotations", "audio"},
}
# A session_id asking for a new session.
NEW_SESSION = "new"
# The cache_policy extension's values.
CACHE_POLICIES = {
    "use": pb.CACHE_POLICY_USE,
    "bypass": pb.CACHE_POLICY_BYPASS,
    "refresh": pb.CACHE_POLICY_REFRESH,
}


def is_text(value) -> bool:
    """Whether ``value`` is a string a protobuf string field takes: JSON's
    ``\\ud800`` escape reads as a lone surrogate, a str that has no UTF-8
    form (building the request would fail on it)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(value, message: str, param: str) -> str:
    """``value`` if it is a string with a UTF-8 form (:func:`is_text`), else a
    400 saying ``message`` about ``param``."""
    if not is_text(value):
        raise _bad_request(message, param)
    return value


def _check_informational(body: dict) -> None:
    """The informational fields (:data:`_INFORMATIONAL`) are not used, yet
    must be what OpenAI takes (strings; metadata an object of strings; store
    a boolean), each text with a UTF-8 form as every text the edge reads
    (:func:`is_text`): a lone surrogate (JSON's ``\\ud800`` escape) was
    accepted in them, which whatever encodes them later (a log line, a span
    attribute) fails on; and ``service_tier: 5`` or ``store: "yes"``, which
    OpenAI refuses, were served."""
    for name in _INFORMATIONAL_TEXT:
        if body.get(name) is not None:
            _text(body[name], f"{name} must be UTF-8 text", name)
    if body.get("store") is not None and not isinstance(body["store"], bool):
        raise _bad_request("store must be a boolean", "store")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(is_text(key) and is_text(value) for key, value in metadata.items())
    ):
        raise _bad_request("metadata must be an object of UTF-8 text keys and values", "metadata")


def _integer(body: dict, name: str, upper: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_request(f"{name} must be an integer", name)
    if not -upper <= value <= upper:
        raise _bad_request(f"{name} is out of range (its magnitude is at most {upper})", name)
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_request(f"{name} must be a number", name)
    try:
        return float(value)
    except OverflowError:  # an integer past a double's range
        raise _bad_request(f"{name} is out of range", name) from None


def _text_of(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(content, f"messages[{index}].content must be UTF-8 text", "messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if isinstance(text, str):
                text = _text(text, f"messages[{index}].content must be UTF-8 text", "messages")
            else:
                raise _bad_request(
                    f"messages[{index}].content: only text parts are supported",
                    "messages",
                    Reason.UNSUPPORTED_PARAMETER,
                )
            parts.append(text)
        return "".join(parts)
    raise _bad_request(f"messages[{index}].content must be a string or text parts", "messages")


def _json_type(value) -> str:
    """``value``'s JSON type as OpenAI's errors name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for kind, named in ((int, "an integer"), (float, "a decimal"), (str, "a string"), (list, "an array")):
        if isinstance(value, kind):
            return named
    return "an object"


def _expect(value, kind: type, expected: str, where: str) -> None:
    """A 400 in OpenAI's words unless ``value`` (at ``where``) is a ``kind``."""
    if not isinstance(value, kind):
        raise _bad_request(
            f"Invalid type for '{where}': expected {expected}, but got {_json_type(value)} instead.",
            "messages",
        )


def _check_function(function, where: str) -> None:
    """A function call as OpenAI's schema has it: an object whose ``name``
    and ``arguments`` are strings."""
    _expect(function, dict, "an object", where)
    for field in ("name", "arguments"):
        if field not in function:
            raise _bad_request(f"Missing required parameter: '{where}.{field}'.", "messages")
        _expect(function[field], str, "a string", f"{where}.{field}")


def _check_tool_use_shape(message: dict, index: int) -> None:
    """A 400 MALFORMED_REQUEST for an assistant's tool field of another shape
    than OpenAI's schema, in OpenAI's words: ``tool_calls`` an array of at
    least one ``{id, type: "function", function: {name, arguments}}``, the
    legacy ``function_call`` one ``{name, arguments}``. Null is no calls. A
    wrong shape (``"function_call": {}``, ``"tool_calls": {}``) is a broken
    client that OpenAI refuses as such, not a call the mesh does not
    support: it was served as no calls."""
    where = f"messages[{index}].tool_calls"
    calls = message.get("tool_calls")
    if calls is not None:
        _expect(calls, list, "an array", where)
        if not calls:
            raise _bad_request(
                f"Invalid '{where}': empty array. "
                "Expected an array with minimum length 1, but got an empty array instead.",
                "messages",
            )
        for number, call in enumerate(calls):
            at = f"{where}[{number}]"
            _expect(call, dict, "an object", at)
            for field in ("id", "type", "function"):
                if field not in call:
                    raise _bad_request(f"Missing required parameter: '{at}.{field}'.", "messages")
            _expect(call["id"], str, "a string", f"{at}.id")
            if call["type"] != "function":
                raise _bad_request(
                    f"Invalid value for '{at}.type': supported values are: 'function'.", "messages"
                )
            _check_function(call["function"], f"{at}.function")
    if message.get("function_call") is not None:
        _check_function(message["function_call"], f"messages[{index}].function_call")


def _messages(raw, max_messages: int) -> list[common_pb2.Message]:
    if not isinstance(raw, list):
        raise _bad_request("messages must be an array", "messages")
    # Counted before any is looked into: the pipeline counts them too, but
    # only once all are converted, on the event loop every stream shares.
    check_message_count(len(raw), max_messages)
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad_request(f"messages[{index}] must be an object", "messages")
        role = message.get("role")
        # Looked up only as a string: an array or object is unhashable.
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise _bad_request(
                f"messages[{index}].role must be system, developer, user or assistant",
                "messages",
                Reason.INVALID_ROLE,
            )
        for name in message:
            if name not in _MESSAGE_FIELDS[role]:
                shown = name if is_text(name) else ascii(name)
                raise _bad_request(
                    f"messages[{index}]: Unrecognized argument supplied: {shown}",
                    "messages",
                    Reason.UNSUPPORTED_PARAMETER,
                )
        _check_tool_use_shape(message, index)
        for name in _TOOL_FIELDS:
            if message.get(name) is not None:
                # Dropped, the call would leave an empty assistant turn and
                # change the answer with nothing said; role "tool" and
                # top-level tools are refused alike.
                raise _bad_request(
                    f"messages[{index}].{name}: tool calls are not supported",
                    "messages",
                    Reason.UNSUPPORTED_PARAMETER,
                )
        if message.get("audio") is not None:
            raise _bad_request(
                f"messages[{index}].audio: audio answers are not supported",
                "messages",
                Reason.UNSUPPORTED_PARAMETER,
            )
        if message.get("name") is not None:
            _text(message["name"], f"messages[{index}].name must be UTF-8 text", "messages")
        content = _text_of(message.get("content"), index)
        refused = message.get("refusal")
        if refused is not None:
            if not isinstance(refused, str):
                raise _bad_request(f"messages[{index}].refusal must be a string", "messages")
            refused = _text(refused, f"messages[{index}].refusal must be UTF-8 text", "messages")
        messages.append(common_pb2.Message(role=role, content=content or refused or ""))
    return messages


def max_tokens_field(body: dict) -> str:
    """The field that sets the answer's length: max_completion_tokens (OpenAI's
    current name) over max_tokens when both are sent."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def _parameters(body: dict) -> common_pb2.GenerationParameters:
    parameters = common_pb2.GenerationParameters()
    # Both are checked, though only one is used: a bad value is a bad
    # request whichever field wins (as OpenAI answers it).
    lengths = {name: _integer(body, name, _INT32_MAX) for name in ("max_tokens", "max_completion_tokens")}
    max_tokens = lengths[max_tokens_field(body)]
    if max_tokens is not None:
        parameters.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            setattr(parameters, name, value)
    seed = _integer(body, "seed", _INT64_MAX)
    if seed is not None:
        parameters.seed = seed
    stop = body.get("stop")
    if is_text(stop):
        parameters.stop.append(stop)
    elif isinstance(stop, list):
        # Counted before each is looked into, as the messages are.
        check_stop_count(len(stop))
        if not all(is_text(item) for item in stop):
            raise _bad_request("stop must be a string or an array of strings", "stop")
        parameters.stop.extend(stop)
    elif stop is not None:
        raise _bad_request("stop must be a string or an array of strings", "stop")
    return parameters


def _refuse_unknown(body: dict, known: frozenset[str]) -> None:
    """A 400 naming the first field of ``body`` not in ``known``, in OpenAI's words."""
    for name in body:
        if name not in known:
            # A key JSON escaped as half a UTF-16 pair has no UTF-8 form to echo.
            shown = name if is_text(name) else ascii(name)
            raise _bad_request(
                f"Unrecognized request argument supplied: {shown}", shown, Reason.UNSUPPORTED_PARAMETER
            )


def _refuse_unsupported(body: dict) -> None:
    _refuse_unknown(body, _CHAT_FIELDS)
    for name, accepted in _UNSUPPORTED.items():
        value = body.get(name)
        if value in (None, [], {}) or value in accepted:
            continue
        message = f"{name} is not supported"
        if accepted:
            values = " or ".join(_json(other).decode() for other in accepted)
            message = f"{name} is supported only as {values}"
        raise _bad_request(message, name, Reason.UNSUPPORTED_PARAMETER)
    # OpenAI's n is an integer or null (1); true == 1 in Python, not in JSON.
    n = body.get("n")
    if isinstance(n, bool) or n not in (None, 1):
        raise _bad_request("n must be 1", "n", Reason.UNSUPPORTED_PARAMETER)
    if body.get("logprobs"):
        raise _bad_request("logprobs are not supported", "logprobs", Reason.UNSUPPORTED_PARAMETER)
    if body.get("top_logprobs") is not None:
        # OpenAI refuses it without logprobs, which are refused above.
        raise _bad_request("top_logprobs is not supported", "top_logprobs", Reason.UNSUPPORTED_PARAMETER)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _bad_request(
            "only the text response_format is supported", "response_format", Reason.UNSUPPORTED_PARAMETER
        )
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad_request(f"{name} is not supported", name, Reason.UNSUPPORTED_PARAMETER)
    if body.get("logit_bias") not in (None, {}):
        raise _bad_request("logit_bias is not supported", "logit_bias", Reason.UNSUPPORTED_PARAMETER)
    _check_informational(body)


# OpenAI's stream options, both booleans. include_obfuscation asks for (or, set
# false as OpenAI suggests to save bandwidth, against) random padding on each
# chunk that hides its length: meshgate adds none, so either value is served as
# false, its default here.
_STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})


class ChatCall:
    """One ``/v1/chat/completions`` body, checked for shape (the pipeline
    checks the values, as for a gRPC turn)."""

    def __init__(self, body, max_messages: int) -> None:
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object", "")
        _refuse_unsupported(body)
        model = _text(body.get("model"), "model must be a string", "model")
        # null stands for the default, as OpenAI's own optional fields.
        session_id = body.get("session_id")
        if session_id is None:
            session_id = ""
        session_id = _text(session_id, "session_id must be a string", "session_id")
        cache_policy = body.get("cache_policy")
        if cache_policy is None:
            cache_policy = "use"
        # Looked up only as a string: an array or object is unhashable.
        if not isinstance(cache_policy, str) or cache_policy not in CACHE_POLICIES:
            raise _bad_request(
                "cache_policy must be use, bypass or refresh", "cache_policy", Reason.INVALID_CACHE_POLICY
            )
        self.create_session = session_id == NEW_SESSION
        self.session_id = "" if self.create_session else session_id
        self.request = pb.ChatRequest(
            model=model,
            session_id=self.session_id,
            messages=_messages(body.get("messages"), max_messages),
            parameters=_parameters(body),
            cache_policy=CACHE_POLICIES[cache_policy],
        )
        # The field the answer's length came in, for a refusal of its value.
        self.max_tokens_field = max_tokens_field(body)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            # Not truthiness: "false" would stream, "true" would not.
            raise _bad_request("stream must be a boolean", "stream")
        self.stream = stream is True
        options = body.get("stream_options")
        if options is not None and not self.stream:
            # As OpenAI: the options would be silently ignored otherwise.
            raise _bad_request("stream_options is only allowed when stream is true", "stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise _bad_request("stream_options must be an object", "stream_options")
        for name in options:
            if name not in _STREAM_OPTIONS:
                # Refused as any unknown field: a misspelt include_usage
                # streamed with no usage and no error.
                shown = name if is_text(name) else ascii(name)
                raise _bad_request(
                    f"stream_options: Unrecognized argument supplied: {shown}",
                    "stream_options",
                    Reason.UNSUPPORTED_PARAMETER,
                )
            if options[name] is not None and not isinstance(options[name], bool):
                # Not truthiness: "yes" or 1 would silently send no usage.
                raise _bad_request(f"stream_options.{name} must be a boolean", "stream_options")
        include_usage = options.get("include_usage")
        self.include_usage = self.stream and include_usage is True


def chat_call(body: bytes, max_messages: int) -> ChatCall:
    """A chat body parsed and checked (a BodyParser decoder)."""
    return ChatCall(_parse_json(body), max_messages)


class EmbeddingsBody:
    """One ``/v1/embeddings`` body, checked for shape; the model and the
    texts' sizes are checked by the embeddings core."""

    def __init__(self, body, max_texts: int) -> None:
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object", "")
        _refuse_unknown(body, _EMBEDDING_FIELDS)
        _check_informational(body)
        self.model = _text(body.get("model"), "model must be a string", "model")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, list):
            # Before each is looked into.
            check_text_count(len(texts), max_texts)
        if not isinstance(texts, list) or not all(is_text(text) for text in texts):
            raise _bad_request("input must be a string or an array of strings (token arrays: no)", "input")
        self.texts: list[str] = texts
        encoding = body.get("encoding_format")
        if encoding is None:  # null stands for the default, as OpenAI's own optional fields
            encoding = "float"
        # Not truthiness: "", 0, false, [] or {} is no format, and was served as float.
        if encoding not in ("float", "base64"):
            raise _bad_request("encoding_format must be float or base64", "encoding_format")
        self.encoding: str = encoding
        if body.get("dimensions") is not None:
            raise _bad_request("dimensions is not supported", "dimensions", Reason.UNSUPPORTED_PARAMETER)


def embeddings_body(body: bytes, max_texts: int) -> EmbeddingsBody:
    """An embeddings body parsed and checked (a BodyParser decoder)."""
    return EmbeddingsBody(_parse_json(body), max_texts)


# --- responses ---------------------------------------------------------------


def _usage(completion: Completion) -> dict:
    answer = completion.answer
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def _extension(completion: Completion) -> dict:
    """What meshgate adds to OpenAI's objects, under one key."""
    return {
        "session_id": completion.session_id,
        "session_version": completion.session_version,
        "cache_status": completion.cache_status.value,
        "cache_similarity": completion.similarity,
        "deployment": completion.answer.deployment,
        "trace_id": completion.trace_id,
        "selected_model": completion.model,
        "selection_reason": completion.selection.reason if completion.selection else "",
        "selection_score": completion.selection.score if completion.selection else 0.0,
    }


class _Chunks:
    """``chat.completion.chunk`` events of one stream. A delta is spliced
    into a prefix built once per stream: one json.dumps of the text per
    piece, not of the whole object."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool = False) -> None:
        self._head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._include_usage = include_usage
        self._delta_prefix = _event_json(self._head)[:-1] + b',"choices":[{"index":0,"delta":{'
        # With include_usage, OpenAI's chunks before the last carry "usage": null.
        self._delta_end = b'},"logprobs":null,"finish_reason":null}]' + (
            b',"usage":null}\n\n' if include_usage else b"}\n\n"
        )
        self._role_sent = False

    def delta(self, text: str) -> bytes:
        role = b""
        if not self._role_sent:
            role, self._role_sent = b'"role":"assistant",', True
        return b"data: " + self._delta_prefix + role + b'"content":' + _event_json(text) + self._delta_end

    def finish(self, completion: Completion, text: str = "") -> bytes:
        """The stream's end: the answer's last ``text`` (if any), its finish,
        its usage if asked for, and [DONE]. The role goes with the first
        chunk, whichever that is: an answer in one piece (a short cache
        hit) has it on that piece, an empty answer on an empty one."""
        events = []
        if text or not self._role_sent:
            events.append(self.delta(text))
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(completion)}
        finish = dict(
            self._head,
            choices=[choice],
            meshgate=_extension(completion),
        )
        if self._include_usage:
            finish["usage"] = None
        events.append(b"data: " + _event_json(finish) + b"\n\n")
        if self._include_usage:
            usage = dict(self._head, choices=[], usage=_usage(completion))
            events.append(b"data: " + _event_json(usage) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return b"".join(events)


def _finish_reason(completion: Completion) -> str:
    return completion.answer.finish_reason or "stop"


# --- the ASGI app ------------------------------------------------------------

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies (nginx) must pass events through as they come.
    (b"x-accel-buffering", b"no"),
]
_JSON_HEADERS = [(b"content-type", b"application/json")]
# GET /v1/models/{id}: the id is the rest of the path.
_MODEL_PATH = "/v1/models/"
# The methods a route takes. A GET route takes HEAD too, answered as GET,
# headers and Content-Length included: uvicorn sends no body for a HEAD
# (RFC 9110 §9.3.2; _send_whole).
_POST = ("POST",)
_GET = ("GET", "HEAD")
# The method label of an HTTP request in meshgate_rpc_requests: its route,
# never its path or HTTP method, which are the caller's to choose (each new
# value would be a series kept for the process's life).
_MODEL_ROUTE = _MODEL_PATH + "{id}"
_UNKNOWN_ROUTE = "other"


class _Disconnected(Exception):
    """The client hung up before the response was complete."""


class HttpEdge:
    """The ASGI app. Each request runs in one task, cancelled when its client
    disconnects: the pipeline then cancels the generation, as for a gRPC
    caller that hangs up."""

    def __init__(
        self,
        settings: RouterSettings,
        models: dict[str, ModelSettings],
        authenticator: Authenticator,
        calls: TenantCalls,
        pipeline: Pipeline,
        embeddings: Embeddings | None,
    ) -> None:
        self._auth = authenticator
        self._calls = calls
        self._pipeline = pipeline
        self._embeddings_core = embeddings
        # OpenAI's "created" of a model: when this router began serving it.
        self._started = int(time.time())
        # Set as the router stops (drain): a stream its grace cuts ends
        # with an error event.
        self._draining = False
        # Each request, by outcome, beside the gRPC port's calls.
        self._requests = metrics.rpc()
        # Bodies costly to parse are parsed off the event loop.
        self._bodies = BodyParser()
        self.reconfigure(settings, models)
        self._routes = {
            "/v1/chat/completions": (_POST, self._chat),
            "/v1/models": (_GET, self._models_list),
            "/v1/embeddings": (_POST, self._embeddings),
        }

    def reconfigure(self, settings: RouterSettings, models: dict[str, ModelSettings]) -> None:
        self._settings = settings
        self._models = models

    def drain(self) -> None:
        """The router is stopping: streams cut when its grace ends say so."""
        self._draining = True

    async def close(self) -> None:
        """Ends the body parser's child process, if one was started."""
        await self._bodies.close()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        # One server span a request, opened before its key or body is read
        # and continuing the caller's trace, as the gRPC port's interceptor
        # gives every call: a review found a 401, a malformed body, a
        # refused parameter or a model list left no span at all (the chat
        # and embeddings spans began once the body had been judged).
        with _tracer.start_as_current_span(
            scope["method"],
            context=_caller_context(scope),
            kind=trace.SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            response = _Response(send, uuid.uuid4().hex, scope.get("http_version", "1.1"))
            response.body_unsent = _expects_continue(scope["headers"])
            await self._answer(scope, receive, response, span)

    async def _answer(self, scope, receive, response: _Response, span: trace.Span) -> None:
        started, route_label = time.perf_counter(), _UNKNOWN_ROUTE
        try:
            route = self._routes.get(scope["path"])
            if route is not None:
                route_label = scope["path"]
            elif scope["path"].startswith(_MODEL_PATH):
                route = (_GET, functools.partial(self._model, scope["path"][len(_MODEL_PATH) :]))
                route_label = _MODEL_ROUTE
            if route is None:
                raise MeshgateError(
                    grpc.StatusCode.UNIMPLEMENTED, Reason.UNKNOWN_ENDPOINT, f"no endpoint {scope['path']}"
                )
            methods, handler = route
            if scope["method"] not in methods:
                raise MeshgateError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    Reason.METHOD_NOT_SUPPORTED,
                    f"{scope['path']} takes {' or '.join(methods)}",
                    {"allow": ", ".join(methods)},
                )
            # The key first, from the headers: a caller without a valid one
            # makes the router read none of its body, and a tenant's request
            # counts against its call cap (router.max_concurrent_rpcs_per_tenant,
            # with its gRPC calls) until its response is complete or this
            # request's task ends, however it ends, whichever comes first
            # (the admin credential is no tenant's and is refused here).
            tenant = await self._tenant(scope)
            response.hold = self._calls.open(tenant.id, asyncio.current_task())
            _check_body_framing(scope["headers"], self._settings.http_max_body_bytes)
            response.body_unsent = False  # asked for now (uvicorn sends the 100)
            body = await _read_body(
                receive, self._settings.http_max_body_bytes, self._settings.http_body_timeout_s
            )
            # The body may come up to http_body_timeout_s after the headers:
            # the key is resolved again now (from the key cache, as a gRPC
            # call's once its request is in), so one revoked or expired
            # meanwhile is refused, not served.
            same_tenant(tenant, await self._tenant(scope))
            await _until_disconnect(handler(tenant, body, response), receive, response)
        except _Disconnected:
            response.failed_with(grpc.StatusCode.CANCELLED)
            return
        except asyncio.CancelledError:
            if not self._draining or response.started or response.gone:
                response.failed_with(grpc.StatusCode.CANCELLED)
                raise
            # Cut by the router's grace before its answer began (a whole
            # answer, or a stream before its first piece): a 503 in OpenAI's
            # shape, not uvicorn's plain-text 500; then ended as answered.
            cut = Delivered().cut(stopped())
            if response.saving:
                # A session turn cut while it was being stored may be stored.
                cut.metadata["turn_may_be_stored"] = "true"
            response.failed(cut)
            with contextlib.suppress(Exception):
                await _send_error(response.send, cut, response.saving)
        except MeshgateError as error:
            # A failure once the turn began to be stored (its append timed
            # out, say, after the context service's Redis took it) may leave
            # it stored: the OpenAI SDKs resend a 5xx unless told not to, and
            # a resent turn would be stored twice. (gRPC's Chat commits its
            # call there for the same reason: no channel resends it.)
            response.failed(error)
            if not response.started:
                await _send_error(response.send, error, response.saving, close=response.body_unsent)
        except Exception:  # noqa: BLE001 - a bug fails its request with a 500, nothing of its insides
            log.exception("http request failed", route=route_label, request_id=response.request_id)
            response.failed(internal_error())
            if not response.started:
                await _send_error(response.send, internal_error(), response.saving)
        finally:
            self._requests.observe(
                "router", route_label, response.code.name, response.reason, time.perf_counter() - started
            )
            _describe(span, scope["method"], route_label, response)

    # --- handlers --------------------------------------------------------------

    async def _tenant(self, scope) -> Tenant:
        # The gRPC metadata shape the authenticator reads (ASGI names are lower case).
        metadata = [
            ("authorization", value.decode("latin-1"))
            for name, value in scope["headers"]
            if name == b"authorization"
        ]
        return await self._auth.authenticate(metadata)

    async def _chat(self, tenant: Tenant, body: bytes, response: _Response) -> None:
        call = await self._bodies.decode(chat_call, body, self._settings.max_messages, tenant.id)
        if call.stream and response.http_version == "1.0":
            # uvicorn frames a body of no known length in chunks, which RFC
            # 9112 §6.1 forbids to an HTTP/1.0 client: its events came with
            # hex chunk sizes among them (a review).
            raise _bad_request(
                "stream needs HTTP/1.1 (its events are sent in chunks); send stream: false",
                "stream",
                Reason.UNSUPPORTED_PARAMETER,
            )
        completion_id = f"chatcmpl-{response.request_id}"
        try:

            async def saving(session_id: str) -> None:
                response.saving = True

            events = self._pipeline.run(
                call.request,
                tenant,
                call.session_id,
                Budget(),
                create_session=call.create_session,
                # Streamed, the last chunk goes in one write with the end.
                carry_last_text=call.stream,
                before_saving=saving,
                whole=not call.stream,
                on_admitted=response.admitted,
            )
            async with contextlib.aclosing(events):
                if call.stream:
                    await self._stream(call, events, response, completion_id)
                else:
                    await self._whole(call, events, response.send, completion_id)
        except MeshgateError as error:
            if call.max_tokens_field != "max_tokens" and _PARAM_OF_REASON.get(error.reason) == "max_tokens":
                # The pipeline judges the value as max_tokens; the caller sent the other name.
                error = error.copy()
                error.metadata["param"] = call.max_tokens_field
                raise error from None
            raise

    async def _stream(self, call: ChatCall, events, response: _Response, completion_id: str) -> None:
        send = response.send
        chunks = _Chunks(completion_id, int(time.time()), call.request.model, call.include_usage)
        # The status waits for the first event: a turn refused before any
        # output (validation, limits, no deployment) gets its HTTP status.
        first = await anext(events)
        if isinstance(first, Failure):
            raise first.error
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        sent = Delivered()
        try:
            await self._stream_events(chunks, first, events, response, sent)
        except asyncio.CancelledError:
            if not self._draining or response.gone:
                raise
            # The router's grace ran out (HttpServer.stop): the stream ends
            # with an error event, as a failure midway does, never as a
            # silent short answer. The request then ends as answered: raised
            # on, the cancellation would be logged as an error of the app.
            cut = sent.cut(stopped())
            response.failed(cut)
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": _error_event(cut)})
        except Exception:  # noqa: BLE001 - a bug of the edge's own, after the 200 went out
            # Left to the request's handler, it would end the stream with no
            # error event (the status is out): a short answer saying nothing.
            log.exception("http stream failed", request_id=response.request_id)
            failure = sent.told(internal_error())
            response.failed(failure)
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": _error_event(failure)})

    async def _stream_events(
        self, chunks: _Chunks, event, events, response: _Response, sent: Delivered
    ) -> None:
        send = response.send
        while True:
            match event:
                case Delta(text=text):
                    await send({"type": "http.response.body", "body": chunks.delta(text), "more_body": True})
                    sent.add(event)
                case Completion():
                    # The answer's last chunk, if it came on the completion,
                    # in the same write as the stream's end.
                    body = chunks.finish(event, event.text)
                    await send({"type": "http.response.body", "body": body})
                    await _to_the_end(events)
                    return
                case Failure(error=error):
                    # Mid-stream: the status has gone out, so the failure is an
                    # error event (the openai SDK raises it) and the stream
                    # ends without [DONE]: never a silent short answer.
                    # The same type as the error would have had as a status.
                    response.failed(error)
                    await send({"type": "http.response.body", "body": _error_event(error)})
                    return
            event = await anext(events)

    async def _whole(self, call: ChatCall, events, send, completion_id: str) -> None:
        async for event in events:  # whole: no deltas (Pipeline.run)
            match event:
                case Completion():
                    body = {
                        "id": completion_id,
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": call.request.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": event.answer.text},
                                "logprobs": None,
                                "finish_reason": _finish_reason(event),
                            }
                        ],
                        "usage": _usage(event),
                        "meshgate": _extension(event),
                    }
                    await _send_json(send, 200, body)
                    await _to_the_end(events)
                    return
                case Failure(error=error):
                    raise error

    def _model_ids(self, tenant: Tenant) -> list[str]:
        """The models ``tenant`` may use: its chat models, then the embedding model."""
        aliases = sorted(alias for alias in self._models if tenant.may_use(alias))
        embedding = self._settings.embedding_model
        if embedding and tenant.may_use(embedding) and embedding not in aliases:
            aliases.append(embedding)
        return aliases

    def _model_entry(self, alias: str) -> dict:
        entry = {"id": alias, "object": "model", "created": self._started, "owned_by": "meshgate"}
        model = self._models.get(alias)
        if model is not None:
            entry["context_window"] = model.context_window_tokens
            entry["max_output_tokens"] = model.most_output_tokens
        return entry

    async def _models_list(self, tenant: Tenant, body: bytes, response: _Response) -> None:
        data = [self._model_entry(alias) for alias in self._model_ids(tenant)]
        await _send_json(response.send, 200, {"object": "list", "data": data})

    async def _model(self, model_id: str, tenant: Tenant, body: bytes, response: _Response) -> None:
        """``GET /v1/models/{id}``: one entry of the tenant's list; a model it
        may not use is as unknown as one that does not exist (as OpenAI)."""
        if model_id not in self._model_ids(tenant):
            raise not_found(Reason.MODEL_NOT_FOUND, f"the model {model_id!r} does not exist", model=model_id)
        await _send_json(response.send, 200, self._model_entry(model_id))

    async def _embeddings(self, tenant: Tenant, raw: bytes, response: _Response) -> None:
        core = self._embeddings_core
        # Without a core every body is answered 404 below, after its shape.
        max_texts = core.max_texts if core is not None else sys.maxsize
        body = await self._bodies.decode(embeddings_body, raw, max_texts, tenant.id)
        model, texts, encoding = body.model, body.texts, body.encoding
        if core is None:
            raise not_found(Reason.MODEL_NOT_FOUND, "no embedding model is served here", model=model)
        core.check_model(model, tenant)
        embedded = await core.embed(tenant, model, texts, on_admitted=response.admitted)
        dimensions = embedded.dimensions
        row_bytes = 4 * dimensions
        data = []
        for index in range(len(texts)):
            row = embedded.vectors[index * row_bytes : (index + 1) * row_bytes]
            if encoding == "base64":
                # OpenAI's base64 is these very bytes: little-endian float32.
                embedding = base64.b64encode(row).decode()
            else:
                embedding = memoryview(row).cast("f").tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = {"prompt_tokens": embedded.input_tokens, "total_tokens": embedded.input_tokens}
        await _send_json(response.send, 200, {"object": "list", "data": data, "model": model, "usage": usage})


class _Response:
    """Whether the response has started and whether it is complete; once
    complete, it gives back the request's place under its tenant's call cap
    (``hold``).

    The connection's next request can start before this request's task
    ends: uvicorn starts a pipelined one as this response's last body
    message is sent, and a client may send its next one as soon as it has
    the answer. Held until the task's end, the place would make that next
    request a 429 at a cap of 1. A chat still reads its turn to the end
    after its last chunk (_to_the_end) to settle it, but that is the
    pipeline's short bookkeeping, not the caller's request: the caller has
    its whole answer."""

    def __init__(self, send, request_id: str, http_version: str = "1.1") -> None:
        self._send = send
        # Sent as x-request-id on every answer, and the completion's id.
        self.request_id = request_id
        # The request's ("1.0", "1.1"): a stream is sent in chunks, which an
        # HTTP/1.0 client does not read.
        self.http_version = http_version
        # The request said "Expect: 100-continue" and its body was not asked
        # for yet: a refusal now (a 401, 404, 413, 415...) sends no 100, so
        # the body never comes, and the parser would read the connection's
        # next request as it (a review: a 415 then a GET got 400): it closes
        # the connection (_send_error).
        self.body_unsent = False
        self.started = False
        self.complete = False
        # The client went away before the response was complete (its
        # request's task is then cancelled: _until_disconnect).
        self.gone = False
        # A session turn is being stored (Pipeline.run's before_saving).
        self.saving = False
        self.hold = Hold(None)
        # How the request ended, as meshgate_rpc_requests counts a gRPC
        # call: its first failure's code and ErrorInfo reason, even one sent
        # as a stream's error event after its 200.
        self.code = grpc.StatusCode.OK
        self.reason = ""
        # The HTTP status sent, once sent (its request span's).
        self.status: int | None = None
        # An admitted turn's grant, whose rate windows its x-ratelimit-*
        # headers say (rate_limit_headers) as the response starts: after a
        # session turn's top-up, which grows them.
        self.grant = None

    def admitted(self, grant) -> None:
        """Pipeline.run's on_admitted."""
        self.grant = grant

    def failed(self, error: MeshgateError) -> None:
        self.failed_with(error.code, error.reason)

    def failed_with(self, code: grpc.StatusCode, reason: str = "") -> None:
        if self.code == grpc.StatusCode.OK:
            self.code, self.reason = code, reason

    async def send(self, message) -> None:
        self.started = True
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [*message.get("headers", ()), (b"x-request-id", self.request_id.encode())]
            # An error's own (a window that refused a prompt's growth) over admission's.
            named = {name for name, _ in headers}
            admitted = rate_limit_headers(getattr(self.grant, "windows", ()))
            headers += [(name, value) for name, value in admitted if name not in named]
            message = dict(message, headers=headers)
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            # Complete once the last part is written, not as it is handed
            # over: a client gone while that part waited for the socket to
            # drain never gets it (uvicorn drops it), and its disconnect,
            # seen first by _until_disconnect's watcher, must then cancel
            # the turn rather than find it complete and let it be recorded
            # completed. Released in the same step as uvicorn's send, which
            # has only scheduled the next request's task: that task finds
            # the place free.
            self.complete = True
            self.hold.release()


async def _to_the_end(events) -> None:
    """Reads a turn's events past its completion, as the gRPC servicer does:
    the pipeline then ends the turn as completed. Closed at its completion
    instead, it would take the close for a caller gone and record the turn
    cancelled (services/router/pipeline.py)."""
    async for _ in events:
        pass


def _describe(span: trace.Span, method: str, route: str, response: _Response) -> None:
    """A request's server span, as OpenTelemetry's HTTP conventions name
    and describe one: its route (the template, never a model's id from the
    path), its status, and an error for a 5xx or for a stream that failed
    after its 200 (its error event: the status alone says OK)."""
    span.set_attribute("http.request.method", method)
    if route != _UNKNOWN_ROUTE:  # no route: the span is named by its method alone
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    if response.status is not None:
        span.set_attribute("http.response.status_code", response.status)
    if response.code != grpc.StatusCode.OK:
        span.set_attribute("error.type", response.reason or response.code.name)
        # A 4xx is the caller's error, not the server's; a client that left is neither.
        server_side = response.status is None or response.status >= 500 or response.status == 200
        if server_side and response.code != grpc.StatusCode.CANCELLED:
            span.set_status(trace.Status(trace.StatusCode.ERROR, response.reason or response.code.name))


def _caller_context(scope):
    """The caller's W3C trace context (traceparent, tracestate headers), so
    that the request's spans join its trace, as the gRPC port's do."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    return propagate.extract(headers)


async def _until_disconnect(work, receive, response: _Response) -> None:
    """Runs ``work`` and cancels it when the client disconnects before its
    response is complete. (uvicorn reports a disconnect also once the
    response is complete; the work may then still be settling the turn.)"""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not response.complete:
                    response.gone = True
                    task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await task
    except asyncio.CancelledError:
        if response.gone:
            raise _Disconnected from None
        raise
    finally:
        watcher.cancel()


def _check_body_framing(headers: list[tuple[bytes, bytes]], limit: int) -> None:
    """Refuses, before any of it is read, a body the edge would read as
    another than the one sent, or need not read at all (a review):

    - a Content-Encoding other than identity: a gzip body was refused 400 as
      "not UTF-8", and one marked br but plain was served, as a reader in
      front of the edge would not have read it (415);
    - a Transfer-Encoding coding other than chunked: "gzip, chunked" was
      de-chunked and served, the gzip ignored (RFC 9112 §6.1: 501);
    - a Content-Length over the limit: a client that sent "Expect:
      100-continue" (curl does, for a large body) was told to continue, and
      refused 413 once it had sent all of it (RFC 9110 §10.1.1). Refused
      before anything is received, so no 100 Continue goes out."""
    lengths = []
    for name, value in headers:
        if name == b"content-encoding":
            codings = [coding.strip().lower() for coding in value.split(b",")]
            if any(coding not in (b"", b"identity") for coding in codings):
                raise invalid_argument(
                    Reason.UNSUPPORTED_CONTENT_ENCODING,
                    "the body must not be compressed: no Content-Encoding but identity is taken",
                )
        elif name == b"transfer-encoding":
            codings = [coding.strip().lower() for coding in value.split(b",")]
            if any(coding not in (b"", b"chunked") for coding in codings):
                raise MeshgateError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    Reason.UNSUPPORTED_TRANSFER_CODING,
                    "no Transfer-Encoding but chunked is taken",
                )
        elif name == b"content-length":
            lengths.append(value.strip())
    if len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) > limit:
        raise invalid_argument(
            Reason.BODY_TOO_LARGE,
            f"the body is larger than {limit} bytes",
            limit=str(limit),
            content_length=lengths[0].decode(),
        )


def _expects_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"expect" and value.strip().lower() == b"100-continue" for name, value in headers)


async def _read_body(receive, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes, within ``timeout_s``: a
    client that stalls mid-body would otherwise hold its tenant's place
    until it hung up."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise invalid_argument(
                        Reason.BODY_TOO_LARGE, f"the body is larger than {limit} bytes", limit=str(limit)
                    )
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
    except TimeoutError:
        raise MeshgateError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.REQUEST_BODY_TIMEOUT,
            f"the body did not arrive within {timeout_s:g} s ({size} bytes came)",
            {"timeout_s": f"{timeout_s:g}"},
        ) from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different, else a 400 naming the
    first key sent twice. RFC 8259 §4 leaves a repeated key's meaning to
    each reader: json takes the last value, others the first or refuse,
    so a proxy or WAF in front could check one value while another is
    served (``{"model": "allowed", "model": "other"}``)."""
    unique = dict(pairs)
    if len(unique) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                shown = key if is_text(key) else ascii(key)
                raise _bad_request(f"the body has a key twice in one object: {shown}", "")
            seen.add(key)
    return unique


# Every object checked as it is read, at any depth (about 1 µs more for a
# chat body of four messages, some 3 µs without the check).
_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _parse_json(body: bytes):
    """``body`` as JSON, which must be UTF-8 (RFC 8259 §8.1: JSON exchanged
    between systems is). ``json.loads`` of bytes takes UTF-16 and UTF-32 as
    well, and UTF-8 holding encoded surrogates (CESU-8): a reader in front
    of the edge (a proxy, a WAF) that reads UTF-8 alone would see another
    body than the one served. A UTF-8 byte order mark is dropped, as the RFC
    lets a reader do: editors and Windows PowerShell 5.1 write it into the
    files that curl sends, and it changes no value. A Content-Type charset
    is not read: application/json defines none (RFC 8259 §11), and no
    other than UTF-8 would be taken."""
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        raise _bad_request(
            f"the body is not UTF-8 (it reads as {encoding.upper()}): JSON sent between systems"
            " must be UTF-8 (RFC 8259 §8.1)",
            "",
        )
    try:
        # utf-8-sig drops the byte order mark; neither takes an encoded surrogate.
        text = body.decode(encoding)
    except UnicodeDecodeError as error:
        raise _bad_request(f"the body is not UTF-8: {error}", "") from None
    too_deep = _bad_request(f"the body nests JSON deeper than {_MAX_JSON_DEPTH} levels", "")
    may_nest_deep = body.count(b"[") + body.count(b"{") > _MAX_JSON_DEPTH
    try:
        value = _decoded_from_a_new_stack(text) if may_nest_deep else _JSON.decode(text)
    except RecursionError:
        raise too_deep from None
    # ValueError: JSONDecodeError, and an integer of more digits than
    # Python converts (sys.get_int_max_str_digits()).
    except ValueError as error:
        raise _bad_request(f"the body is not valid JSON: {error}", "") from None
    if may_nest_deep and _nests_deeper(value, _MAX_JSON_DEPTH):
        raise too_deep
    return value


def _decoded_from_a_new_stack(text: str):
    """``_JSON.decode(text)`` at the bottom of a thread of its own, the
    caller waiting: json's decoder stops at Python's recursion limit, which
    counts the frames under it, so the same deep body met it at another
    depth under the router's loop than in the body parser's child, and a
    key sent twice or a syntax error beyond that depth was one answer there
    and another here (a final read). From a new thread's stack both read the
    same. Only for a body of more than _MAX_JSON_DEPTH containers (about
    0.1 ms a thread)."""
    outcome: list = []

    def decode() -> None:
        try:
            outcome.append((True, _JSON.decode(text)))
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=decode, name="meshgate-json-decode")
    thread.start()
    thread.join()
    decoded, value = outcome[0]
    if not decoded:
        raise value
    return value


# JSON nested deeper than this is refused, alike on the loop and in the body
# parser's child: json's decoder stops at Python's recursion limit, which
# counts the frames already on the stack, more under the router's loop than
# in the child (a review: 982 levels were a 400 inline and a 200 in the
# child). A chat body nests 5 deep, a tool's JSON Schema seldom 20.
_MAX_JSON_DEPTH = 128


def _nests_deeper(value, limit: int) -> bool:
    """Whether ``value`` holds containers more than ``limit`` deep, walked a
    level at a time without recursion, a comprehension a level: 0.2-0.3 s
    for 2.8 million empty arrays or objects, in the body parser's child (a
    loop over a stack of (container, depth) pairs took 1.5 s, one of C
    iterators 0.4 s); 1.6-2.4 ms for the costliest bodies parsed on the loop
    (bench/http_body_stall.py's bodies at the inline bounds)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        level = [
            inner
            for item in level
            for inner in (item.values() if type(item) is dict else item)
            if type(inner) in _CONTAINERS
        ]
        if not level:
            return False
    return True


_CONTAINERS = (dict, list)


async def _send_json(send, status: int, body) -> None:
    await _send_whole(send, status, _JSON_HEADERS, _json(body))


async def _send_error(
    send, error: MeshgateError, turn_may_be_stored: bool = False, close: bool = False
) -> None:
    """``close``: with Connection: close (_Response.body_unsent)."""
    status, headers, body = http_error(error, turn_may_be_stored)
    if close and (b"connection", b"close") not in headers:
        headers.append((b"connection", b"close"))
    await _send_whole(send, status, headers, body)


async def _send_whole(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """An answer whose body is known whole: with its Content-Length, which
    uvicorn sends also for a HEAD, whose body it drops (RFC 9110 §9.3.2: a
    HEAD answer carries the fields the GET's would). Without it, uvicorn
    frames a GET's body as chunked and gives a HEAD's no length at all."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the server ----------------------------------------------------------------


# struct tcp_info (linux/tcp.h, Linux 4.6 on): tcpi_unacked (segments sent,
# not acknowledged) at byte 24, tcpi_bytes_acked at 120, tcpi_notsent_bytes
# (written, not yet sent: the peer's window is shut) at 144.
_TCP_INFO = struct.Struct("=24xI92xQ16xI")
# How often a connection's acknowledgements are looked at, per stall timeout.
_STALL_CHECKS_PER_TIMEOUT = 4


def _acknowledgements(sock) -> tuple[int, bool] | None:
    """The bytes the peer of TCP socket ``sock`` has acknowledged so far,
    and whether any written are still unacknowledged or unsent; None where
    the kernel does not tell (not Linux, or before 4.6) or there is no
    socket (a transport over something else)."""
    if sys.platform != "linux" or sock is None:
        return None
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    if len(info) < _TCP_INFO.size:
        return None
    unacked_segments, bytes_acked, notsent_bytes = _TCP_INFO.unpack(info)
    return bytes_acked, bool(unacked_segments or notsent_bytes)


# Linux's largest TCP_KEEPIDLE and TCP_KEEPINTVL (about 9 h): a larger one
# is refused (EINVAL), and every connection's setup then failed.
_MAX_KEEPALIVE_S = 32767


def _probe_when_idle(sock, timeout_s: float) -> None:
    """TCP keepalive on ``sock``: after ``timeout_s`` with nothing sent or
    received, the kernel probes the peer every quarter of it, and a peer
    that answers none of two probes (or answers with a RST: a host that lost
    the connection) ends the connection, between ``timeout_s`` and 1.5
    times it after its last sign of life. uvicorn then reports the
    disconnect, as :class:`_StalledPeerCut` makes it for a peer that leaves
    bytes unacknowledged: this covers the peer with nothing outstanding, a
    client gone while its turn waits on its first token or generates a
    whole answer, which nothing else notices until its answer is written.
    The kernel's timings are whole seconds, at most _MAX_KEEPALIVE_S (a
    longer timeout is probed from then). No socket (a transport over
    something else): nothing."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if not hasattr(socket, "TCP_KEEPIDLE"):  # not Linux (macOS): the system's timings
        return
    idle_s = min(_MAX_KEEPALIVE_S, max(1, round(timeout_s)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(idle_s / 4)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)


class _StalledPeerCut:
    """Aborts a connection whose peer acknowledges none of its bytes for
    ``timeout_s`` while some are unacknowledged or unsent
    (router.http_stalled_client_timeout_s): a client gone without a FIN or
    RST, or one that stopped reading. uvicorn then reports the disconnect
    and the request's task is cancelled, its generation with it, as for a
    client that hangs up. Neither uvicorn nor asyncio notices either case:
    the kernel takes the writes (MiBs of them) long before a write blocks,
    and a vanished peer's connection lives on in resends for some 15
    minutes (Linux's tcp_retries2). Not TCP_USER_TIMEOUT: since Linux 5.11
    it also counts the time a peer's window stays too small for the next
    queued segment, and on Linux 6.18 it cut a client reading steadily at
    10 KB/s (tests/integration/test_http_edge.py's slow reader)."""

    def __init__(self, transport, timeout_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._socket = transport.get_extra_info("socket")
        self._timeout_s = timeout_s
        self._loop = loop
        self._acked = -1
        self._progress_at = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._check()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        try:
            state = _acknowledgements(self._socket)
        except OSError:  # closed under us: connection_lost stops this
            return
        if state is None:
            return
        acked, outstanding = state
        now = self._loop.time()
        if acked != self._acked or not outstanding:
            self._acked, self._progress_at = acked, now
        elif now - self._progress_at >= self._timeout_s:
            log.info(
                "http client stalled: connection dropped",
                peer=str(self._transport.get_extra_info("peername")),
                stalled_s=round(now - self._progress_at, 3),
            )
            self._transport.abort()
            return
        self._timer = self._loop.call_later(self._timeout_s / _STALL_CHECKS_PER_TIMEOUT, self._check)


class _BoundedHeaders(HttpToolsProtocol):
    """uvicorn's httptools protocol, with what it lacks: each request's
    header block must arrive within ``header_timeout_s`` and its URL and
    header fields (a chunked body's trailers too) take at most
    ``max_header_bytes`` (the bytes Node's max-http-header-size counts),
    else the connection is closed, over the size with a 431
    ``HEADERS_TOO_LARGE`` if the headers were. The API key is read only from
    complete headers, so without these anyone who reaches the port could
    hold connections open with nothing or half a request sent, or make the
    parser hold any number of bytes.

    Built on httptools' parser callbacks (``on_message_begin``, ``on_url``,
    ``on_header``, ``on_headers_complete``, ``on_body``,
    ``on_message_complete``) and asyncio's Protocol methods, each calling
    uvicorn's own; tests/unit/test_router_http_edge.py fails if uvicorn's
    class stops defining them. uvicorn's keep-alive timeout still governs
    an idle connection between requests: the deadline starts with the
    connection and with each request's first byte, not after a response.
    It also bounds bytes nobody else does, each of which cancels uvicorn's
    keep-alive timer: blank lines between requests (the parser skips them
    without beginning one) and the rest of a body after an early answer
    (a 401: uvicorn reads and drops it). A pipelined request's deadline
    is counted again from when the answers before it end (uvicorn stops
    reading while they are under way). A client that stops acknowledging
    the answers is dropped too (:class:`_StalledPeerCut`)."""

    def __init__(
        self, *args, header_timeout_s: float, max_header_bytes: int, stalled_client_timeout_s: float, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self._timeout_s = header_timeout_s
        self._stalled_client_timeout_s = stalled_client_timeout_s
        self._stall_cut: _StalledPeerCut | None = None
        self._max_bytes = max_header_bytes
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False
        self._in_message = False
        # The current request's URL and complete fields, in bytes.
        self._block_bytes = 0
        # Bytes of a field httptools still holds: it passes a header (or a
        # trailer) on only when the next begins, so one value sent without
        # end is counted here.
        self._held_bytes = 0
        self._counted_this_read = False
        self._too_large = False
        self._headers_too_large = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_deadline()
        self._stall_cut = _StalledPeerCut(transport, self._stalled_client_timeout_s, self.loop)
        _probe_when_idle(transport.get_extra_info("socket"), self._stalled_client_timeout_s)

    def connection_lost(self, exc) -> None:
        self._stop_deadline()
        if self._stall_cut is not None:
            self._stall_cut.stop()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._counted_this_read = False
        super().data_received(data)
        if self._in_message and not self._counted_this_read:
            # Nothing was passed on from this read: all of it extends a
            # field (or is a chunk's few bytes of framing).
            self._held_bytes += len(data)
            self._check_size()
        # Answered after the parser is through the read: uvicorn has then
        # answered (400) and closed anything else wrong in it.
        if self._too_large and not self.transport.is_closing():
            self._refuse()
        elif not self._in_headers and not self._answering():
            # Bytes no request's headers or app wait for (see the class).
            self._start_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = self._in_message = True
        self._block_bytes = self._held_bytes = 0
        self._counted_this_read = True
        self._start_deadline()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        # A chunked body's trailers come here too, after the headers: uvicorn
        # adds them to the request's headers, and keeps reading them after
        # an early answer (a 401 ends no connection).
        self._count(len(name) + len(value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._stop_deadline()
        # A block over the bound never reaches the app, nor does its body.
        if not self._too_large:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        # Passed on, not held; the framing read before it (a chunk's size
        # line) is held no longer either.
        self._counted_this_read = True
        self._held_bytes = 0
        if not self._too_large:
            super().on_body(body)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_headers and self._deadline is not None:
            # A pipelined request's headers, held up until now: their time
            # counts from here.
            self._stop_deadline()
            self._start_deadline()

    def on_message_complete(self) -> None:
        self._in_message = False
        if not self._too_large:
            super().on_message_complete()

    def _count(self, size: int) -> None:
        self._block_bytes += size
        self._held_bytes = 0
        self._counted_this_read = True
        self._check_size()

    def _check_size(self) -> None:
        if not self._too_large and self._block_bytes + self._held_bytes > self._max_bytes:
            self._too_large = True
            # Trailers are not answered: the request's answer may have gone out.
            self._headers_too_large = self._in_headers

    def _start_deadline(self) -> None:
        # Kept if running: a connection's first block is due from its opening.
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._timeout_s, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._answering():
            # A pipelined request's headers may be held up by the answers
            # before it (uvicorn stops reading while requests queue):
            # on_response_complete starts its time again.
            self._start_deadline()
            return
        self.transport.close()

    def _answering(self) -> bool:
        """Whether an earlier request of this connection is still being answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self) -> None:
        self._stop_deadline()
        if not self._headers_too_large:
            self.transport.close()
            return
        self._answer_and_close(
            invalid_argument(
                Reason.HEADERS_TOO_LARGE,
                f"the request's URL and headers are larger than {self._max_bytes} bytes",
                limit=str(self._max_bytes),
            )
        )

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to bytes httptools cannot parse, or to a request
        # line whose URL is not ASCII (a UTF-8 character sent raw, not
        # percent-encoded), is plain text: in OpenAI's shape instead, as
        # every other answer of the edge.
        self._answer_and_close(
            invalid_argument(
                Reason.MALFORMED_REQUEST,
                "the request is not valid HTTP/1.1 (its framing or header bytes, or a URL that is not ASCII:"
                " percent-encode other characters)",
            )
        )

    def _answer_and_close(self, error: MeshgateError) -> None:
        """Writes ``error``'s answer, from outside the app, and closes the connection."""
        # An answer written now would land inside an earlier request's.
        if self._answering():
            self.transport.close()
            return
        status, headers, body = http_error(error)
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
        # Every answer carries an x-request-id, this one written outside _Response.
        headers.append((b"x-request-id", uuid.uuid4().hex.encode()))
        if (b"connection", b"close") not in headers:
            headers.append((b"connection", b"close"))
        head += [name + b": " + value for name, value in [*self.server_state.default_headers, *headers]]
        head.append(b"content-length: " + str(len(body)).encode())
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


def _listening_socket(listen: str) -> socket.socket:
    """A socket listening on ``listen`` (host:port, an IPv6 host in brackets
    as gRPC's listen takes it): IPv6 for an IPv6 host, and for ``[::]``
    IPv4 too where the system can (as gRPC's ``[::]`` does)."""
    host, port = tcp_listen_address(listen)
    if ":" not in host:
        return socket.create_server((host, port), backlog=1024)
    # An IPv4-mapped host ([::ffff:127.0.0.1]) binds only on a socket that
    # takes IPv4 too: an IPv6-only one refused it (EINVAL) though gRPC's
    # listen and the metrics endpoint bound it (a review).
    mapped = ipaddress.IPv6Address(host).ipv4_mapped is not None
    dualstack = (host == "::" or mapped) and socket.has_dualstack_ipv6()
    return socket.create_server((host, port), family=socket.AF_INET6, backlog=1024, dualstack_ipv6=dualstack)


# uvicorn's own warnings (its logger, uvicorn.error) a client's bytes cause
# one a request, before any key is checked: "Invalid HTTP request received."
# for each request its parser refuses (a review: 100 lines for 100 requests
# of a made-up method), "Exceeded concurrency limit." and the like. At most
# one line per message this often, saying how many went unlogged since.
PARSER_WARNING_INTERVAL_S = 60.0


class _ThrottledWarnings(logging.Filter):
    """uvicorn.error's warnings, throttled per message (telemetry.ThrottledLog's rule)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._throttle = telemetry.ThrottledLog(logging.getLogger("uvicorn.error"), interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        suppressed = self._throttle.admit(str(record.msg))
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more since the last, not logged)"
        return suppressed is not None


def _throttle_uvicorns_warnings() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ThrottledWarnings) for f in logger.filters):
        logger.addFilter(_ThrottledWarnings(PARSER_WARNING_INTERVAL_S))


class HttpServer:
    """uvicorn serving an app on the running loop, from a socket bound here
    (a taken port fails setup with OSError, not uvicorn's sys.exit), with
    each request's headers bounded in time and size and stalled clients
    dropped (:class:`_BoundedHeaders`)."""

    def __init__(
        self,
        app,
        listen: str,
        header_timeout_s: float,
        max_header_bytes: int,
        stalled_client_timeout_s: float,
        graceful_s: float = 5.0,
    ) -> None:
        self._app = app
        _throttle_uvicorns_warnings()
        try:
            self._socket = _listening_socket(listen)
        except OSError as error:
            raise serving.listen_refusal("router (HTTP)", listen, error) from None
        self.port = self._socket.getsockname()[1]
        self._stopped = False
        config = uvicorn.Config(
            app,
            http=functools.partial(
                _BoundedHeaders,
                header_timeout_s=header_timeout_s,
                max_header_bytes=max_header_bytes,
                stalled_client_timeout_s=stalled_client_timeout_s,
            ),
            lifespan="off",
            # The router logs as structlog JSON; uvicorn's own loggers stay quiet.
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=graceful_s,
        )
        config.load()
        self._server = uvicorn.Server(config)
        # What Server.serve() sets up; serve() itself would also take over
        # SIGINT/SIGTERM, which belong to the router (serving.py).
        self._server.lifespan = config.lifespan_class(config)
        self._ticks: asyncio.Task | None = None

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])
        # The tick loop refreshes the Date header and notices should_exit.
        self._ticks = asyncio.ensure_future(self._server.main_loop())

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops accepting, lets responses under way finish (for at most
        ``grace_s``, else the graceful period it was made with), then
        closes; the app is told first (``drain``), so that a stream cut then
        ends with an error event. Again: nothing more."""
        if self._stopped:
            return
        self._stopped = True
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = grace_s
        if (drain := getattr(self._app, "drain", None)) is not None:
            drain()
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
            await self._server.shutdown(sockets=[self._socket])
        self._socket.close()
