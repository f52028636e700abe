"""Fixtures shared by every test: free ports and a real Redis."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from meshgate.local import redis_server
from meshgate.local.stack import free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis: REDIS_URL if set, else a redis-server started for the session."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    port = free_port()
    data_dir: pathlib.Path = tmp_path_factory.mktemp("redis")
    process = redis_server.launch(port, data_dir)
    try:
        redis_server.wait_ready(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
