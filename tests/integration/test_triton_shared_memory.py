"""A killed tritonserver's shared memory: its Python backend's regions in
/dev/shm outlive a SIGKILL (1 MiB or more a model, in RAM, a set more at
every restart of the local stack's Triton); terminate() removes them."""

from __future__ import annotations

import os
import signal

import pytest

from meshgate.local import triton
from meshgate.local.stack import build_model_weights, free_port

pytestmark = pytest.mark.integration


def test_a_killed_tritons_shared_memory_is_removed(tmp_path) -> None:
    build_model_weights()
    port = free_port()
    log_file = tmp_path / "triton.log"
    process = triton.launch(grpc_port=port, state_dir=tmp_path, log_file=log_file, models=("tiny_gpt",))
    try:
        triton.wait_ready(f"127.0.0.1:{port}", ("tiny_gpt",), timeout=120, process=process)
        regions = list(triton.SHARED_MEMORY_DIR.glob(f"{process.shm_prefix}*"))
        assert regions, "the Python backend names its regions with the launch's prefix"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        assert all(region.exists() for region in regions), "a SIGKILL leaves them"
    finally:
        triton.terminate(process)
    assert not list(triton.SHARED_MEMORY_DIR.glob(f"{process.shm_prefix}*"))
