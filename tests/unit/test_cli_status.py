"""`meshgate status`: what it says of a stack's children, and its exit code,
from the lock and the status file a running `meshgate up` keeps in its
state directory (the real Stack's lock and Supervisor's file, `sleep`
processes for the children)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from meshgate import cli
from meshgate.local.stack import Stack
from meshgate.local.supervisor import Backoff, Supervisor
from tests.inline_executor import InlineExecutor


@pytest.fixture
def stack(tmp_path, monkeypatch):
    stack = Stack(tmp_path / "state")
    stack.state_dir.mkdir()
    # Every child is ready but Triton (the unit tier opens no IP socket).
    monkeypatch.setattr(Stack, "ready", lambda stack, name: name != "triton")
    yield stack
    for process in stack.processes.values():
        process.kill()
        process.wait()
    stack.stop()


def status(stack: Stack) -> int:
    return cli.main(["status", "--state-dir", str(stack.state_dir)])


def test_no_stack_on_the_state_directory_is_exit_code_3(stack, capsys) -> None:
    assert status(stack) == cli.STATUS_NOT_RUNNING
    assert capsys.readouterr().out == f"no `meshgate up` runs on {stack.state_dir}\n"


def test_a_stack_whose_children_are_not_all_up_says_which_and_is_exit_code_1(stack, capsys) -> None:
    stack._hold_state_dir()
    # A status file of an earlier run: its supervisor's pid is not the holder's.
    stack.status_path.write_text('{"pid": 1, "children": {}}')
    assert status(stack) == cli.STATUS_NOT_UP
    assert capsys.readouterr().out == f"meshgate up (pid {os.getpid()}) on {stack.state_dir}: starting\n"

    for name in ("redis", "triton", "router"):
        stack.processes[name] = subprocess.Popen(["sleep", "60"], start_new_session=True)
    supervisor = Supervisor(stack, Backoff(initial_s=30.0), poll_interval_s=3600, asker=InlineExecutor())
    supervisor.start()
    try:
        supervisor.check(now=1.0)
        stack.processes["router"].kill()
        stack.processes["router"].wait()
        supervisor.check(now=2.0)
        capsys.readouterr()  # its log line
        assert status(stack) == cli.STATUS_NOT_UP
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"meshgate up (pid {os.getpid()}) on {stack.state_dir}: 1 of 3 up"
        redis, triton, router = out[1:]
        assert redis.split()[:2] == ["redis", "up"] and f"pid {stack.processes['redis'].pid}" in redis
        assert triton.split()[:2] == ["triton", "starting"]
        assert router.split()[:2] == ["router", "down"]
        assert "restarts 0  last exit: signal SIGKILL  restart at " in router
        # Where it said why it exited: a child that crash-loops showed
        # "last exit: exit code 1" and nothing an operator could act on.
        assert router.endswith(f"  log: {stack.log_path('router')}")
    finally:
        supervisor.stop()


def test_a_stack_whose_children_are_all_up_is_exit_code_0(stack, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Stack, "ready", lambda stack, name: True)
    stack._hold_state_dir()
    stack.processes["redis"] = subprocess.Popen(["sleep", "60"], start_new_session=True)
    supervisor = Supervisor(stack, poll_interval_s=3600, asker=InlineExecutor())
    supervisor.start()
    try:
        supervisor.check(now=1.0)
        assert status(stack) == cli.STATUS_UP
        assert capsys.readouterr().out.splitlines()[0].endswith(": 1 of 1 up")
    finally:
        supervisor.stop()


def test_a_child_the_supervisor_stopped_says_why(stack, capsys, monkeypatch) -> None:
    stack._hold_state_dir()
    stack.processes["redis"] = subprocess.Popen(["sleep", "60"], start_new_session=True)
    supervisor = Supervisor(stack, poll_interval_s=3600, asker=InlineExecutor(), unready_grace_s=5.0)
    supervisor.start()
    try:
        supervisor.check(now=1.0)
        monkeypatch.setattr(Stack, "ready", lambda stack, name: False)
        supervisor.check(now=2.0)
        supervisor.check(now=8.0)
        stack.processes["redis"].wait(5)
        supervisor.check(now=8.5)
        capsys.readouterr()  # its log lines
        assert status(stack) == cli.STATUS_NOT_UP
        redis = capsys.readouterr().out.splitlines()[1]
        assert redis.split()[:2] == ["redis", "down"]
        assert (
            "last exit: signal SIGTERM  stopped by the supervisor: unready for 6.0 s, longer than 5 s"
            in redis
        )
    finally:
        supervisor.stop()


def test_a_stopping_stack_and_a_child_exited_unseen_are_not_up(stack, capsys, monkeypatch) -> None:
    """A review's finding: `meshgate status` read "6 of 6 up", exit code 0,
    through 13 s of a stop (services draining, then exited), and "up" for
    a router killed while the supervisor was stopped (Ctrl-Z): it believed
    the file. A child whose process is gone or a zombie is down, and once
    supervision ends every child is stopping."""
    monkeypatch.setattr(Stack, "ready", lambda stack, name: True)
    stack._hold_state_dir()
    for name in ("redis", "router"):
        stack.processes[name] = subprocess.Popen(["sleep", "60"], start_new_session=True)
    supervisor = Supervisor(stack, poll_interval_s=3600, asker=InlineExecutor())
    supervisor.start()
    stopped = False
    try:
        supervisor.check(now=1.0)
        assert status(stack) == cli.STATUS_UP
        capsys.readouterr()
        # Killed, not reaped: a zombie until the supervisor looks again.
        stack.processes["router"].kill()
        for _ in range(100):
            if not cli._running(stack.processes["router"].pid):
                break
            time.sleep(0.01)
        assert status(stack) == cli.STATUS_NOT_UP
        out = capsys.readouterr().out.splitlines()
        assert out[0].endswith(": 1 of 2 up")
        assert out[2].split()[:2] == ["router", "down"]
        assert "exited since its supervisor last looked" in out[2]
        supervisor.stop()
        stopped = True
        assert status(stack) == cli.STATUS_NOT_UP
        out = capsys.readouterr().out.splitlines()
        assert out[0].endswith(": 0 of 2 up")
        assert out[1].split()[:2] == ["redis", "stopping"]
    finally:
        if not stopped:
            supervisor.stop()
