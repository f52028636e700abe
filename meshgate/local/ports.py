"""Ports for the processes a local stack or a test run starts on 127.0.0.1:
chosen so that two runs, or one run's two stacks, do not collide, and so
that no outgoing connection takes one between its choice and its bind."""

from __future__ import annotations

import os
import pathlib
import random
import socket
import tempfile

try:
    import fcntl
except ImportError:  # not on POSIX: ports are claimed in this process only
    fcntl = None  # type: ignore[assignment]

# Where free_port looks first: below the kernel's ephemeral range. A port the
# kernel picks for bind(0) comes from that range, the same one it picks an
# outgoing connection's local end from: in a long test run (thousands of
# connections) one such port was taken between being chosen and the service
# binding it, and the service failed to start.
_FIRST_CHOSEN_PORT = 20000
_handed_out: set[int] = set()
# Across processes (a test run's two workers, two runs at once), each port
# handed out is claimed until this process ends: a lock of one byte at the
# port's offset of this file (a POSIX record lock, which goes with the
# process that holds it). Between a port's choice and the bind of the
# process it is for, another worker found it free too and handed it to its
# own Triton, which failed to start ("Address already in use", a clean-clone
# run).
_CLAIMS_PATH = pathlib.Path(tempfile.gettempdir()) / "meshgate-ports.lock"
_claims_fd: int | None = None


def _claim(port: int) -> bool:
    """Claims ``port`` for this process's life; False where another process
    holds it. True where claims cannot be kept (no fcntl, the file not
    writable): this process's own record still holds."""
    global _claims_fd
    if fcntl is None:
        return True
    if _claims_fd is None:
        try:
            _claims_fd = os.open(_CLAIMS_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            _claims_fd = -1
    if _claims_fd < 0:
        return True
    try:
        fcntl.lockf(_claims_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
    except OSError:
        return False
    return True


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; elsewhere only a starting point


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port nothing listens on right now, for runs that must not collide:
    outside the ephemeral range where one is free (see _FIRST_CHOSEN_PORT),
    never one this process handed out before (two stacks of one test run
    would otherwise share it before either binds), nor one another process
    claimed (_claim)."""
    low, _ = _ephemeral_ports()
    candidates = list(range(_FIRST_CHOSEN_PORT, low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        if port not in _handed_out and _bindable(port) and _claim(port):
            _handed_out.add(port)
            return port
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out and _claim(port):
            _handed_out.add(port)
            return port


# A Redis Cluster node also listens on its port + 10000 (the cluster bus).
_BUS_OFFSET = 10000


def free_cluster_ports(count: int) -> list[int]:
    """Ports for Redis Cluster nodes whose bus ports (port + 10000) are free
    too, both below the ephemeral range, as free_port's (a bus port inside it
    was as likely to be taken by an outgoing connection between its choice
    and the node's bind), and none (nor its bus port) handed out before."""
    low, _ = _ephemeral_ports()
    candidates = [
        port
        for port in range(_FIRST_CHOSEN_PORT, low - _BUS_OFFSET)
        if port not in _handed_out and port + _BUS_OFFSET not in _handed_out
    ]
    ports: list[int] = []
    for candidate in random.sample(candidates, min(len(candidates), 2000)):
        if len(ports) == count:
            break
        if (
            _bindable(candidate)
            and _bindable(candidate + _BUS_OFFSET)
            and _claim(candidate)
            and _claim(candidate + _BUS_OFFSET)
        ):
            ports.append(candidate)
    if len(ports) < count:
        raise OSError(
            f"no {count} free ports for a Redis Cluster (with their bus ports) between "
            f"{_FIRST_CHOSEN_PORT} and {low - _BUS_OFFSET}"
        )
    # Their bus ports too: free_port draws from the same range.
    _handed_out.update(ports, (port + _BUS_OFFSET for port in ports))
    return ports
