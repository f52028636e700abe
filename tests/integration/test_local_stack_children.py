"""A process that started local-stack children (`meshgate up`, a test run)
and is killed outright, with SIGKILL, takes them with it: each is sent
SIGTERM and stops as on the stack's own stop, rather than running on,
unowned, on the ports the next start needs. Real redis-servers stand in for
the children, started each way the stack starts one: from the main thread,
by the supervisor's thread (a restart) and from a thread that has ended."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from meshgate.local import redis_server
from meshgate.local.stack import REPO_ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's"),
]

# The stack's process: starts the children, writes their ports, pids and
# logs as one JSON line to stderr (stdout has the supervisor's log lines),
# and waits to be killed.
STACK_PROCESS = """
import json, pathlib, sys, threading, time
from meshgate.local import redis_server
from meshgate.local.stack import Ports, Stack, free_port
from meshgate.local.supervisor import Backoff, Supervisor

state = pathlib.Path(sys.argv[1])
stack = Stack(state, Ports(redis=free_port()))
stack.launch("redis")
redis_server.wait_ready(stack.ports.redis)
killed = stack.processes["redis"]
supervisor = Supervisor(stack, Backoff(initial_s=0.01), poll_interval_s=0.05)
supervisor.start()
killed.kill()
deadline = time.monotonic() + 30
while stack.processes["redis"] is killed:
    assert time.monotonic() < deadline, "the supervisor did not restart Redis"
    time.sleep(0.05)
redis_server.wait_ready(stack.ports.redis)
supervisor.stop()  # its thread, which restarted Redis, has ended

def start_from_a_thread():
    process = redis_server.launch(port, state / "threaded", state / "threaded.log")
    redis_server.wait_ready(port)
    started.append(process)

port, started = free_port(), []
thread = threading.Thread(target=start_from_a_thread)
thread.start()
thread.join()
children = [
    (stack.ports.redis, stack.processes["redis"].pid, str(stack.log_dir / "redis.log")),
    (port, started[0].pid, str(state / "threaded.log")),
]
print(json.dumps(children), file=sys.stderr, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child nobody has reaped yet is a zombie, not running)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_children_of_a_killed_stack_process_stop(tmp_path) -> None:
    stack_process = subprocess.Popen(
        [sys.executable, "-c", STACK_PROCESS, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    children = []
    try:
        line = stack_process.stderr.readline()
        if not line.startswith("["):
            pytest.fail(f"the stack's process failed:\n{line}{stack_process.stderr.read()}")
        children = json.loads(line)
        time.sleep(0.5)
        for port, pid, log in children:
            # Still serving: the end of the thread that started it was no reason to stop.
            redis_server.wait_ready(port, timeout_s=5)
            assert _running(pid), pathlib.Path(log).read_text()
        stack_process.send_signal(signal.SIGKILL)
        stack_process.wait()
        deadline = time.monotonic() + 10
        while any(_running(pid) for _, pid, _ in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for _, pid, _ in children if _running(pid)] == []
        for _, _, log in children:
            # The stop it would have had from the stack, its append-only file written.
            assert "Received SIGTERM" in pathlib.Path(log).read_text()
    finally:
        if stack_process.poll() is None:
            stack_process.kill()
            stack_process.wait()
        for _, pid, _ in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
