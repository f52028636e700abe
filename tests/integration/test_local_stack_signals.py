"""The local stack's children end with the process that started them, even
when it is killed with SIGKILL and no handler of its runs: a real Redis and
a real router, started by a Stack in a process of their own that the test
kills. (Signals `meshgate up` handles: tests/unit/test_cli_up.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from meshgate.local.stack import free_port

pytestmark = pytest.mark.integration

# The process that plays `meshgate up`: starts Redis and the router as the
# stack does (so the router has a Redis to start against), prints their
# pids, then waits to be killed.
PARENT = textwrap.dedent(
    """
    import json, pathlib, sys, time
    from meshgate.local import certs
    from meshgate.local.stack import Ports, Stack

    ports = [int(port) for port in sys.argv[2:]]
    stack = Stack(pathlib.Path(sys.argv[1]), Ports(*ports[:6], http=ports[6], metrics={
        "router": ports[7], "context": ports[8], "cache": ports[9], "inference": ports[10]}), tracing=False)
    stack.log_dir.mkdir(parents=True)
    certs.ensure(stack.certs_dir)
    stack._write_settings()
    stack.launch("redis")
    stack.launch("router")
    print(json.dumps({name: process.pid for name, process in stack.processes.items()}), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    """Running, and not a zombie left for a reaper that may never come (the
    children are reparented when their parent dies)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_stacks_children_end_when_the_process_that_started_them_is_killed(tmp_path) -> None:
    ports = [str(free_port()) for _ in range(11)]
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "state"), *ports],
        stdout=subprocess.PIPE,
        text=True,
    )
    children: dict[str, int] = {}
    try:
        children = json.loads(parent.stdout.readline())
        assert sorted(children) == ["redis", "router"]
        assert all(_alive(pid) for pid in children.values())
        parent.kill()
        parent.wait()
        # SIGTERM, so each stops as it would in an ordered stop: the router
        # drains (nothing here), Redis flushes its append-only file.
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {name: _alive(pid) for name, pid in children.items()} == {"redis": False, "router": False}
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in children.values():
            # Each leads its own process group.
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
