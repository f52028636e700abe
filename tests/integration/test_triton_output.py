"""What tritonserver prints outside its --log-file (a line at every stop,
its Python stubs' tracebacks) lands in the log file launch() was given, after
what was there: `meshgate up`'s terminal showed "Signal (15) received." under
the stack's own lines at every Ctrl-C."""

from __future__ import annotations

import pytest

from meshgate.local import triton
from meshgate.local.stack import build_model_weights, free_port

pytestmark = pytest.mark.integration


def test_tritons_own_output_goes_to_its_log_file(tmp_path, capfd) -> None:
    build_model_weights()
    port = free_port()
    log_file = tmp_path / "triton.log"
    log_file.write_text("a line from an earlier run\n")
    process = triton.launch(grpc_port=port, state_dir=tmp_path, log_file=log_file, models=("tiny_gpt",))
    try:
        triton.wait_ready(f"127.0.0.1:{port}", ("tiny_gpt",), timeout=120, process=process)
    finally:
        triton.terminate(process)
        process.wait(60)
    log = log_file.read_text()
    assert log.startswith("a line from an earlier run\n"), "appended, never truncated"
    assert "successfully loaded 'tiny_gpt'" in log, "Triton's own log lines"
    assert "Signal (15) received." in log, "what it prints to stdout at a stop"
    printed = capfd.readouterr()
    assert "Signal (15)" not in printed.out + printed.err


def test_a_triton_that_dies_at_start_is_reported_with_its_log_and_cause(tmp_path, monkeypatch) -> None:
    """The final read's finding (2026-12-06): once Triton's own output went to
    its log file, `meshgate up` printed only "tritonserver exited with code 1
    before it was ready", with neither the cause nor where to read it. A
    stand-in server prints its cause on stderr, as Triton's startup errors
    and a model.py's traceback do, and exits."""
    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\necho "error: creating server: failed to load all models" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setattr(triton, "tritonserver_binary", lambda: fake)
    log = tmp_path / "logs" / "triton.log"
    log.parent.mkdir()
    process = triton.launch(
        grpc_port=free_port(), state_dir=tmp_path / "state", log_file=log, models=("tiny_gpt",)
    )
    process.wait(30)
    with pytest.raises(RuntimeError) as failure:
        triton.wait_ready("127.0.0.1:1", ("tiny_gpt",), timeout=5, process=process)
    message = str(failure.value)
    assert message.startswith("tritonserver exited with code 1 before it was ready")
    assert str(log) in message
    assert message.endswith("error: creating server: failed to load all models")
