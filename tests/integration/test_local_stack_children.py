"""The local stack's children do not outlive it: a `meshgate up` (or a test
run) killed with SIGKILL has no chance to stop them in order, and each had
been left running, unowned, on the ports the next start then refused."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

# Real processes, as the stack launches them; Triton loads the one small
# model, and the inference service serves (NOT_SERVING) until Triton is ready.
PARENT = """
import pathlib, sys, time
from meshgate.local import certs
from meshgate.local.stack import Ports, Stack, free_port

stack = Stack(pathlib.Path(sys.argv[1]), Ports(*(free_port() for _ in range(6))), tracing=False,
              triton_models=("tiny_gpt",))
stack.log_dir.mkdir(parents=True)
certs.ensure(stack.certs_dir)
stack._write_settings()
for name in ("redis", "triton", "inference"):
    stack.launch(name)
print(" ".join(str(process.pid) for process in stack.processes.values()), flush=True)
time.sleep(600)
"""

# A drained service and Triton stop within seconds; this leaves room on a busy machine.
STOPPED_WITHIN_S = 30.0


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet does not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_the_children_stop_when_the_stack_is_killed(tmp_path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "state")], stdout=subprocess.PIPE, text=True
    )
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert len(pids) == 3, f"the parent did not launch its children (exit code {parent.poll()})"
        # Started, not necessarily ready: the parent can die at any time.
        time.sleep(3)
        assert all(running(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + STOPPED_WITHIN_S
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in pids if running(pid)]
        assert not left, f"still running {STOPPED_WITHIN_S:.0f} s after the stack was killed: {left}"
    finally:
        parent.kill()
        parent.wait()
        for pid in pids:
            # Each leads its own process group: Triton's stubs go with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
