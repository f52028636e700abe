"""How the local stack starts each of its children (Redis, Triton, a service).

Each leads its own session, so that a Ctrl-C meant for the stack's process
does not reach it before the stack stops the mesh in order. That also puts
it out of reach of anything that ends the stack's process abruptly: a
`meshgate up` killed with SIGKILL (by the OOM killer, a CI job's timeout, a
closed IDE) left Redis, Triton and the four services running, unowned, on
the ports the next `make run` then refused as taken. So each child also
asks the kernel for SIGTERM when the thread that started it ends
(PR_SET_PDEATHSIG): it then stops as it would on the stack's own stop,
Redis and the services drained, Triton with its model stubs, though not in
the stack's order.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

# From <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1

# Looked up before any fork: the child runs as little as it can between
# fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _stops_with(parent_pid: int):
    def in_child() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
        if os.getppid() != parent_pid:
            # The stack died between the fork and the prctl: no signal will come.
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def start(command: list[str], **options) -> subprocess.Popen:
    """subprocess.Popen(command, **options) for a child of the stack: in a
    session of its own, and sent SIGTERM if the thread that called this ends
    (elsewhere than on Linux, only the session). A caller's thread must then
    live until the child is stopped: the main thread, or one that parks
    rather than ends (meshgate/local/supervisor.py)."""
    preexec = _stops_with(os.getpid()) if _prctl is not None else None
    return subprocess.Popen(command, start_new_session=True, preexec_fn=preexec, **options)
