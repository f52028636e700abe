"""The supervisor's backoff when a child that ran healthy dies and then
cannot even be started again (tests/unit/test_supervisor.py has the rest)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from meshgate.local.supervisor import Backoff, Supervisor


class _Stack:
    """Just what the supervisor uses of a Stack: real `sleep` children, and
    a launch that fails while ``broken`` (as a port still taken, or a log
    folder removed, made Stack.launch raise)."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.broken = False

    def launch(self, name: str) -> None:
        if self.broken:
            raise FileNotFoundError("logs/redis.log")
        self.processes[name] = subprocess.Popen(["sleep", "60"], start_new_session=True)

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()


@pytest.fixture
def stack():
    stack = _Stack()
    yield stack
    stack.stop()


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_failed_relaunches_after_a_healthy_run_keep_backing_off(stack) -> None:
    """Measured from the healthy child's start, every failed try after it
    counted as the first of a new run: retried every 0.5 s for good."""
    supervisor = Supervisor(stack, Backoff(initial_s=0.5, factor=2.0, max_s=30.0, reset_after_s=60.0))
    stack.launch("redis")
    # Dies at once after its first start, and is restarted at t = 1.5 s.
    _kill(stack.processes["redis"])
    supervisor.check(now=1.0)
    supervisor.check(now=1.5)
    assert supervisor.restarts == {"redis": 1}

    # Runs healthy for minutes, dies, and now cannot be started again.
    _kill(stack.processes["redis"])
    stack.broken = True
    now = 200.0
    supervisor.check(now)
    delays = []
    for _ in range(5):
        due = supervisor._due["redis"]
        delays.append(due - now)
        now = due
        supervisor.check(now)
    # A first failure after a healthy run, then failures in a row.
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]

    # Once it can start again, it does, at its due time.
    stack.broken = False
    supervisor.check(supervisor._due["redis"])
    assert supervisor.restarts == {"redis": 2}
    assert stack.processes["redis"].poll() is None
