"""A stack refuses ports another holds before it starts anything, and names
the holder: another `meshgate up` by its claim on the port (two stacks on
their own state directories with one set of ports both passed a check that
nothing listened, then one's children failed to bind and crash-looped), any
other process by its listening socket."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import structlog

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


def _listening_on(port: str) -> subprocess.Popen:
    """A process that listens on ``port`` of 127.0.0.1 (a minute at most)."""
    return _holding(
        "import socket, sys, time\n"
        "listener = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "print('holding', flush=True)\n"
        "time.sleep(60)",
        port,
    )


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
    listener = _listening_on(str(ports.triton))
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
    listener = _listening_on(str(ports.context))
    try:
        listener.send_signal(signal.SIGSTOP)
        os.waitpid(listener.pid, os.WUNTRACED)  # returns once it is stopped
        stack = Stack(tmp_path / "state", ports, redis_url="redis://127.0.0.1:1/0")
        with pytest.raises(RuntimeError) as refused:
            stack.start()
        said = str(refused.value)
        assert f"stopped: it takes no SIGTERM until continued (kill -CONT {listener.pid}" in said
        # Waiting frees no port a stopped process holds: no "try again then" (a review).
        assert "try again" not in said
        # Not one the previous `up` on this state directory started: left stopped.
        assert stack_module._stopped(listener.pid)
    finally:
        listener.kill()
        listener.wait()


# A `meshgate up` whose Redis has started, held there (before Triton's
# start). With a third argument, "stop failed": the state directory and the
# ports released as Stack.stop's finally releases them after a failed stop,
# its Redis left running, the process alive.
STACK_WITH_ITS_REDIS = """
import json, pathlib, sys, time
from meshgate.local import redis_server, stack
stack.certs.ensure = lambda directory: None
ports = stack.Ports(**json.loads(sys.argv[2]))
def build_model_weights():
    redis_server.wait_ready(ports.redis)
    if sys.argv[3:] == ["stop failed"]:
        up._state_lock.close()
        for claim in up._port_claims:
            claim.close()
    print("holding", flush=True)
    time.sleep(60)
stack.build_model_weights = build_model_weights
up = stack.Stack(pathlib.Path(sys.argv[1]), ports)
up.start()
"""


def _stop_and_orphan(tmp_path, ports: Ports) -> tuple[int, int]:
    """Starts a stack's Redis from another process, stops the Redis
    (SIGSTOP) and kills that process outright: the Redis is left stopped,
    the kernel's SIGTERM (PR_SET_PDEATHSIG) waiting in it, holding its port.
    Returns the Redis's pid and a pidfd of it (the test's hold on that very
    process, whatever pid reuse may come)."""
    previous = _holding(STACK_WITH_ITS_REDIS, str(tmp_path / "state"), json.dumps(dataclasses.asdict(ports)))
    try:
        redis = stack_module._listener(ports.redis)
        assert redis is not None
        redis_pidfd = os.pidfd_open(redis)
        os.kill(redis, signal.SIGSTOP)
        while not stack_module._stopped(redis):
            time.sleep(0.01)
    finally:
        previous.kill()
        previous.wait()
    return redis, redis_pidfd


def _exited(pidfd: int) -> bool:
    # A pidfd reads as ready once its process has exited.
    return bool(select.select([pidfd], [], [], 0)[0])


def test_a_stopped_child_of_the_previous_up_on_the_same_state_directory_is_continued_and_the_start_goes_on(
    tmp_path,
) -> None:
    ports = _ports()
    redis, redis_pidfd = _stop_and_orphan(tmp_path, ports)
    try:
        assert not _exited(redis_pidfd)
        # Past the ports: the stopped Redis was continued, took its
        # SIGTERM and exited, freeing its port.
        with structlog.testing.capture_logs() as logs, pytest.raises(PastTheClaims):
            Stack(tmp_path / "state", ports).start()
        assert _exited(redis_pidfd)
        # What the start waited for (up to 15 s) is said: it was silent.
        (said,) = [line for line in logs if "left on its ports" in line["event"]]
        assert said["pid"] == redis and "redis-server" in said["command"] and said["stopped"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(redis_pidfd, signal.SIGKILL)
        os.close(redis_pidfd)


def test_a_running_child_left_by_a_failed_stop_whose_process_lives_on_is_stopped_and_the_start_goes_on(
    tmp_path,
) -> None:
    """A stop that failed releases the state directory (Stack.stop's
    finally) with children still running, and no kernel SIGTERM comes to
    them while its process lives on. The next start only continued such a
    Redis: it waited 15.1 s, and was refused "try again then" as often as
    it was tried. Now it is sent SIGTERM, as the stop would have."""
    ports = _ports()
    previous = _holding(
        STACK_WITH_ITS_REDIS, str(tmp_path / "state"), json.dumps(dataclasses.asdict(ports)), "stop failed"
    )
    redis = stack_module._listener(ports.redis)
    assert redis is not None
    redis_pidfd = os.pidfd_open(redis)
    try:
        with pytest.raises(PastTheClaims):
            Stack(tmp_path / "state", ports).start()
        assert _exited(redis_pidfd)
        # Stopped in order: Redis's own shutdown, not a kill.
        assert "ready to exit, bye bye" in (tmp_path / "state" / "logs" / "redis.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(redis_pidfd, signal.SIGKILL)
        os.close(redis_pidfd)
        previous.kill()
        previous.wait()


def test_a_recorded_pid_now_of_another_process_is_not_signalled(tmp_path) -> None:
    """The previous `up`'s record names the pid, but a process started at
    another time holds it now (a pid reused): it is refused, not continued."""
    ports = _ports()
    redis, redis_pidfd = _stop_and_orphan(tmp_path, ports)
    try:
        record_path = tmp_path / "state" / stack_module.CHILDREN_FILE
        record = json.loads(record_path.read_text())
        for child in record.values():
            child["identity"] = "another boot:0"
        record_path.write_text(json.dumps(record))
        with pytest.raises(RuntimeError, match=f"port\\(s\\) in use: redis 127.0.0.1:{ports.redis}"):
            Stack(tmp_path / "state", ports).start()
        assert not _exited(redis_pidfd)
        assert stack_module._stopped(redis)
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(redis_pidfd, signal.SIGKILL)
        os.close(redis_pidfd)
