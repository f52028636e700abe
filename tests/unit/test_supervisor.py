"""The supervisor's restart policy, and its bookkeeping over real child processes."""

from __future__ import annotations

import signal
import subprocess

import pytest

from meshgate.local.supervisor import Backoff, RestartPolicy, Supervisor, describe_exit


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, factor=2.0, max_s=5.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_failures_in_a_row_back_off_and_a_healthy_run_starts_over() -> None:
    policy = RestartPolicy(Backoff(initial_s=1.0, factor=2.0, max_s=60.0, reset_after_s=30.0), started_at=0.0)
    # Dies at once, three times in a row.
    assert policy.next_delay(exited_at=1.0) == 1.0
    policy.started(2.0)
    assert policy.next_delay(exited_at=3.0) == 2.0
    policy.started(5.0)
    assert policy.next_delay(exited_at=6.0) == 4.0
    assert policy.attempt == 3
    # Then runs healthy for longer than reset_after_s: the next failure is a first one.
    policy.started(10.0)
    assert policy.next_delay(exited_at=40.0) == 1.0
    assert policy.attempt == 1


def test_exit_codes_and_signals_are_told_apart() -> None:
    assert describe_exit(3) == {"exit_code": 3}
    assert describe_exit(-signal.SIGKILL) == {"signal": "SIGKILL"}


class _Stack:
    """Just what the supervisor uses of a Stack, over real processes."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.launched: list[str] = []

    def launch(self, name: str) -> None:
        self.launched.append(name)
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


def test_a_killed_child_is_restarted_after_its_delay(stack) -> None:
    stack.launch("cache")
    stack.launch("router")
    supervisor = Supervisor(stack, Backoff(initial_s=1.0, factor=2.0))
    first = stack.processes["cache"]
    _kill(first)

    supervisor.check(now=10.0)  # notices the exit, schedules the restart
    assert stack.launched == ["cache", "router"]
    supervisor.check(now=10.5)  # delay not over yet
    assert stack.launched == ["cache", "router"]
    supervisor.check(now=11.0)
    assert stack.launched == ["cache", "router", "cache"]
    assert stack.processes["cache"] is not first and stack.processes["cache"].poll() is None
    assert supervisor.restarts == {"cache": 1}

    # Killed again right away: the second delay is twice the first.
    _kill(stack.processes["cache"])
    supervisor.check(now=11.5)
    supervisor.check(now=12.5)
    assert stack.launched.count("cache") == 2
    supervisor.check(now=13.5)
    assert stack.launched.count("cache") == 3


def test_nothing_is_restarted_once_stopped(stack) -> None:
    stack.launch("triton")
    supervisor = Supervisor(stack, Backoff(initial_s=0.1))
    _kill(stack.processes["triton"])
    supervisor.check(now=1.0)
    supervisor.stop()
    supervisor.check(now=100.0)
    assert stack.launched == ["triton"]
