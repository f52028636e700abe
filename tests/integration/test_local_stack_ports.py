"""A stack refuses ports another holds before it starts anything, and names
the holder: another `meshgate up` by its claim on the port (two stacks on
their own state directories with one set of ports both passed a check that
nothing listened, then one's children failed to bind and crash-looped), any
other process by its listening socket."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from meshgate.local import stack as stack_module
from meshgate.local.stack import REPO_ROOT, Ports, Stack, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="abstract sockets and /proc are Linux's"),
]


class PastTheClaims(Exception):
    """Raised by the first step of a start after its ports were claimed."""


def _ports() -> Ports:
    return Ports(
        *(free_port() for _ in range(6)),
        http=free_port(),
        metrics={name: free_port() for name in stack_module.SERVICES},
    )


@pytest.fixture(autouse=True)
def stops_past_the_claims(monkeypatch):
    def ensure(directory):
        raise PastTheClaims

    monkeypatch.setattr(stack_module.certs, "ensure", ensure)


def _holding(code: str, *arguments: str) -> subprocess.Popen:
    """A process that runs ``code``, which says "holding" once it holds."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *arguments], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "holding\n"
    return process


# Another stack, on its own state directory, stopped half-way through its start.
OTHER_STACK = """
import json, pathlib, sys, time
from meshgate.local import stack
def ensure(directory):
    print("holding", flush=True)
    time.sleep(60)
stack.certs.ensure = ensure
stack.Stack(pathlib.Path(sys.argv[1]), stack.Ports(**json.loads(sys.argv[2])), "redis://127.0.0.1:1/0").start()
"""


def test_ports_another_stack_is_starting_on_are_refused_naming_that_stacks_process(tmp_path) -> None:
    ports = _ports()
    other = _holding(OTHER_STACK, str(tmp_path / "other"), json.dumps(dataclasses.asdict(ports)))
    try:
        stack = Stack(tmp_path / "state", ports, redis_url="redis://127.0.0.1:1/0")
        with pytest.raises(RuntimeError) as refused:
            stack.start()
        # The first of its ports it claims: the lowest.
        port, name = min(stack.listen_ports().items())
        assert str(refused.value).startswith(
            f"port {port} ({name}) is claimed by another `meshgate up`: pid {other.pid} ("
        )
    finally:
        other.kill()
        other.wait()
    # Its claims went with it, and the refused start left none behind.
    with pytest.raises(PastTheClaims):
        stack.start()


def test_a_port_another_process_listens_on_is_refused_naming_that_process(tmp_path) -> None:
    ports = _ports()
    listener = _holding(
        "import socket, sys, time\n"
        "listener = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "print('holding', flush=True)\n"
        "time.sleep(60)",
        str(ports.triton),
    )
    try:
        stack = Stack(tmp_path / "state", ports, redis_url="redis://127.0.0.1:1/0")
        with pytest.raises(RuntimeError) as refused:
            stack.start()
        assert f"triton 127.0.0.1:{ports.triton} (held by pid {listener.pid} (" in str(refused.value)
    finally:
        listener.kill()
        listener.wait()


def test_a_stopped_process_holding_a_port_is_named_stopped(tmp_path) -> None:
    """A stack's child that was stopped (SIGSTOP) when its `meshgate up` was
    killed outright never takes the SIGTERM the kernel sent it, and holds
    its ports for good: the refusal says so, not only to try again later."""
    ports = _ports()
    listener = _holding(
        "import socket, sys, time\n"
        "listener = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "print('holding', flush=True)\n"
        "time.sleep(60)",
        str(ports.context),
    )
    try:
        listener.send_signal(signal.SIGSTOP)
        os.waitpid(listener.pid, os.WUNTRACED)  # returns once it is stopped
        stack = Stack(tmp_path / "state", ports, redis_url="redis://127.0.0.1:1/0")
        with pytest.raises(RuntimeError) as refused:
            stack.start()
        said = str(refused.value)
        assert f"stopped: it cannot end until it is continued (kill -CONT {listener.pid})" in said
    finally:
        listener.kill()
        listener.wait()
