"""A service that cannot start says why in one JSON log line (the process's
logging is JSON) and exits START_FAILED; tests/integration/
test_service_start_failures.py runs the services themselves."""

from __future__ import annotations

import errno
import socket

import pytest
import structlog

from meshgate import serving
from meshgate.config import ConfigError
from meshgate.errors import unavailable
from meshgate.reasons import Reason


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("context.session_ttl_s must be zero or more and finite, got -1"),
        OSError("router: cannot listen on 127.0.0.1:50051"),
        unavailable(Reason.REDIS_UNAVAILABLE, "cannot reach Redis at redis://h:1/0: Error 111"),
    ],
)
def test_a_start_refused_for_a_stated_reason_logs_that_reason_alone(error: Exception) -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(SystemExit) as exited:
        serving._refuse_start(error)
    assert exited.value.code == serving.START_FAILED != 0
    assert logs == [
        {
            "event": "cannot start",
            "error": str(error),
            "error_type": type(error).__name__,
            "log_level": "critical",
        }
    ]


def test_a_start_ended_by_a_bug_keeps_its_traceback_in_the_log_line() -> None:
    bug = KeyError("no such thing")
    with structlog.testing.capture_logs() as logs, pytest.raises(SystemExit) as exited:
        serving._refuse_start(bug)
    assert exited.value.code == serving.START_FAILED
    assert logs == [{"event": "cannot start", "exc_info": bug, "log_level": "critical"}]


def test_an_address_family_the_kernel_lacks_is_left_to_grpc(monkeypatch) -> None:
    """ "[::]" on a kernel with IPv6 disabled resolves to an IPv6 address only,
    which no socket can be made for; grpc then listens on IPv4, so the
    pre-bind must not refuse the start (it refused with a bare Errno 97)."""
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda *args, **kwargs: [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::", 50051, 0, 0))],
    )

    def no_ipv6(*args, **kwargs):
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(socket, "socket", no_ipv6)
    serving._refuse_unbindable_address("router", "[::]:50051")


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(errno.EADDRINUSE, "[Errno 98] error while attempting to bind"), "Address already in use"),
        # getaddrinfo's errors carry negative numbers: os.strerror says "Unknown error -2".
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "Name or service not known"),
    ],
)
def test_a_port_refused_names_the_address_and_why_in_words(error: OSError, said: str) -> None:
    refusal = serving.listen_refusal("context (metrics)", "nosuch.invalid:9123", error)
    assert str(refusal) == f"context (metrics): cannot listen on nosuch.invalid:9123: {said}"
