"""Signals to a real service process: SIGHUP is the reload signal, never a
kill. A service with nothing to reload (here the inference service, no
Triton behind it: it reports NOT_SERVING, which is enough) keeps serving
through one, then drains on SIGTERM and exits 0; so does one that gets it
while its start waits on a slow Redis. A router refuses a bad edit of its
file once, though the file watch and a SIGHUP both read it; an edit made
while a service starts is applied once it serves."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import serving
from meshgate.local import children
from meshgate.local.stack import free_port
from tests.tcp_proxy import TcpProxy

# Serial (make test runs it alone): bounds how soon a signal ends a service (failed once on a loaded machine).
pytestmark = [pytest.mark.integration, pytest.mark.serial]


def health_status(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


def launched(arguments: list[str], log: pathlib.Path, **options) -> subprocess.Popen:
    """``python arguments...`` started as the local stack starts a service
    (meshgate/local/children.py: ended with this process, should the test
    run be killed), its output in ``log``."""
    with log.open("wb") as out:
        return children.start([sys.executable, *arguments], stdout=out, stderr=subprocess.STDOUT, **options)


def service_environment() -> dict[str, str]:
    """This process's, without settings that would override the test's file."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_") and k != "REDIS_URL"}


def started(service: str, config: pathlib.Path, address: str, log: pathlib.Path) -> subprocess.Popen:
    """The service as a process on ``config``, once its health answers at ``address``."""
    process = launched(["-m", f"services.{service}", "--config", str(config)], log, env=service_environment())
    deadline = time.monotonic() + 60
    while health_status(address) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{service} did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return process


def ended(process: subprocess.Popen) -> None:
    """A test's process killed if it still runs (its test failed midway)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def inference_config(tmp_path, address: str):
    """A settings file for an inference service at ``address`` (a service
    with no reload hooks) whose Triton is never reached."""
    config = tmp_path / "meshgate.toml"
    config.write_text(
        f'[mesh]\ntls = false\n[telemetry]\nmetrics = false\n[inference]\nlisten = "{address}"\n'
        f'triton_urls = ["127.0.0.1:{free_port()}"]\n'
    )
    return config


def test_sighup_to_a_service_without_reload_hooks_neither_kills_it_nor_skips_its_drain(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    config = inference_config(tmp_path, address)
    log = tmp_path / "inference.log"
    process = started("inference", config, address, log)
    try:
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, log.read_text()
        assert health_status(address) is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        assert "nothing to reload" in log.read_text() and "draining" in log.read_text()
    finally:
        ended(process)


def test_sighup_to_a_service_the_local_stack_just_started_is_not_a_kill(tmp_path):
    """Before serving.main installs its handler (a second or more of
    imports), SIGHUP's default action killed the service. The stack's
    launcher starts it with SIGHUP ignored; once serving, its own handler
    takes one as a reload."""
    address = f"127.0.0.1:{free_port()}"
    config = inference_config(tmp_path, address)
    log = tmp_path / "inference.log"
    command = ["-m", "services.inference", "--config", str(config)]
    process = launched(command, log, env=service_environment(), ignore_hangup=True)
    try:
        process.send_signal(signal.SIGHUP)
        serves_reloads_and_stops(process, address, log)
    finally:
        ended(process)


def serves_reloads_and_stops(process, address: str, log) -> None:
    """Waits for the service to serve, then checks that a SIGHUP is a reload
    (nothing to reload: the log says so) and a SIGTERM a clean stop."""
    deadline = time.monotonic() + 60
    while health_status(address) is None:
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    process.send_signal(signal.SIGHUP)
    while "nothing to reload" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()


def hangup_disposition(pid: int) -> str:
    """What process ``pid`` does with SIGHUP now, from /proc: "ignored",
    "caught" (a handler), or "default" (its default action: exit)."""
    status = dict(
        line.split(":\t", 1)
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    hangup = 1 << (signal.SIGHUP - 1)
    if int(status["SigIgn"], 16) & hangup:
        return "ignored"
    return "caught" if int(status["SigCgt"], 16) & hangup else "default"


def test_sighup_to_a_service_started_by_hand_while_it_imports_is_not_a_kill(tmp_path):
    """Started otherwise than by the stack (``meshgate-inference``, ``python
    -m services.inference``), a service ran its imports, a second or more,
    with SIGHUP's default action, which killed it (exit -1 at 0, 50 and
    300 ms after its start). Its __main__ ignores the signal first thing:
    one sent after that and before serving.main's handler is in place (its
    disposition from /proc says which) is not a kill; once serving, a SIGHUP
    is a reload as ever."""
    address = f"127.0.0.1:{free_port()}"
    config = inference_config(tmp_path, address)
    log = tmp_path / "inference.log"
    process = launched(["-m", "services.inference", "--config", str(config)], log, env=service_environment())
    try:
        deadline = time.monotonic() + 30
        while (disposition := hangup_disposition(process.pid)) == "default":
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.002)
        assert disposition == "ignored", "SIGHUP was not ignored before serving.main caught it"
        process.send_signal(signal.SIGHUP)
        serves_reloads_and_stops(process, address, log)
    finally:
        ended(process)


async def test_sighup_while_a_service_waits_on_a_slow_redis_to_start_is_not_a_kill(tmp_path, redis_url):
    """The context service's start waits for its Redis to answer a PING; a
    SIGHUP then (a fleet-wide "HUP to reload") came before the service's
    handler was installed, and its default action killed the process. It
    is noted instead, and handled as a reload once the service serves."""
    redis = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    redis_port = await redis.start()
    redis.hold()
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "meshgate.toml"
    config.write_text(
        f'[mesh]\ntls = false\n[telemetry]\nmetrics = false\n[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
        f'[context]\nlisten = "{address}"\n'
    )
    log = tmp_path / "context.log"
    process = launched(["-m", "services.context", "--config", str(config)], log, env=service_environment())
    try:
        async with asyncio.timeout(60):
            while not redis.accepted:  # its start is waiting on Redis's answer
                assert process.poll() is None, log.read_text()
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
        redis.release()
        async with asyncio.timeout(60):
            while await asyncio.to_thread(health_status, address) is None:
                assert process.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
            # The SIGHUP, handled once serving: the file read again (its
            # model aliases are the context service's to reload).
            while "configuration reloaded" not in log.read_text():
                await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()
        assert log.read_text().count("configuration reloaded") == 1, log.read_text()
    finally:
        ended(process)
        await redis.close()


# A service whose start never ends (argv: listen address, settings file).
_ENDLESS_START = """
import asyncio
import sys
from meshgate import serving

async def setup(service, settings):
    print("setting up", flush=True)
    await asyncio.sleep(3600)

serving.main("cache", [], lambda settings: sys.argv[1], setup, ["--config", sys.argv[2]])
"""


def test_sigterm_during_the_start_of_a_service_running_as_pid_1_ends_it(tmp_path):
    """As a container's entry point (PID 1), a service ignored a SIGTERM
    that came before it served (PID 1 ignores a signal it has no handler
    for): a pod deleted while its service waited on its Redis was killed
    only when its grace period had passed. Run as PID 1 of a PID namespace
    of its own (unshare), as in a container."""
    config = tmp_path / "meshgate.toml"
    config.write_text("[mesh]\ntls = false\n[telemetry]\nmetrics = false\n")
    log = tmp_path / "service.log"
    command = [sys.executable, "-c", _ENDLESS_START, f"unix:{tmp_path / 'service.sock'}", str(config)]
    with log.open("ab") as output:
        namespace = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", *command], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "setting up" not in log.read_text():
            if namespace.poll() is not None:
                pytest.skip(f"no PID namespace here (unshare: {log.read_text().strip()[:200]})")
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        (service,) = pathlib.Path(f"/proc/{namespace.pid}/task/{namespace.pid}/children").read_text().split()
        assert "NSpid:\t" + service + "\t1\n" in pathlib.Path(f"/proc/{service}/status").read_text()
        os.kill(int(service), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pathlib.Path(f"/proc/{service}").exists():
            assert time.monotonic() < deadline, f"PID 1 ignored SIGTERM during its start:\n{log.read_text()}"
            time.sleep(0.05)
        assert "SIGTERM during the start" in log.read_text()
    finally:
        namespace.kill()
        namespace.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_a_stop_signal_during_the_start_ends_it_with_one_line_and_its_exit_status(tmp_path, signum):
    """SIGINT stops a serving service as SIGTERM does, but during the start
    it was left to Python: asyncio cancelled the setup and the process died
    of KeyboardInterrupt (exit -2), two tracebacks of plain text in its log."""
    config = tmp_path / "meshgate.toml"
    config.write_text("[mesh]\ntls = false\n[telemetry]\nmetrics = false\n")
    log = tmp_path / "service.log"
    service = launched(
        ["-c", _ENDLESS_START, f"unix:{tmp_path / 'service.sock'}", str(config)],
        log,
        env=service_environment(),
    )
    try:
        deadline = time.monotonic() + 30
        while "setting up" not in log.read_text():
            assert service.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        service.send_signal(signum)
        assert service.wait(10) == 128 + signum, log.read_text()
        said = log.read_text()
        assert f"{signum.name} during the start: exiting without serving" in said
        assert "Traceback" not in said
    finally:
        ended(service)


# A service whose cleanup fails as it stops (argv: listen address, settings file).
_FAILING_CLEANUP = """
import sys
from meshgate import serving

async def setup(service, settings):
    async def cleanup():
        raise RuntimeError("the store would not close")
    return cleanup

serving.main("cache", [], lambda settings: sys.argv[1], setup, ["--config", sys.argv[2]])
"""


def test_a_stop_whose_cleanup_fails_runs_to_its_end_and_exits_stop_failed(tmp_path):
    """Before, the cleanup's exception ended the stop there (the metrics
    endpoint's shutdown and the "stopped" line skipped) and the process
    with a plain-text traceback."""
    address = f"unix:{tmp_path / 'service.sock'}"
    config = tmp_path / "meshgate.toml"
    config.write_text("[mesh]\ntls = false\n[telemetry]\nmetrics = false\n")
    log = tmp_path / "service.log"
    process = launched(["-c", _FAILING_CLEANUP, address, str(config)], log)
    try:
        deadline = time.monotonic() + 60
        while '"serving"' not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == serving.STOP_FAILED != 0, log.read_text()
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert [line["event"] for line in lines[-3:]] == [
            "stop step failed",
            "stopped",
            "stopped with failures",
        ]
        assert lines[-3]["step"] == "cleanup" and "the store would not close" in lines[-3]["exception"]
    finally:
        ended(process)


def test_one_bad_edit_is_refused_once_though_the_file_watch_and_sighup_both_read_it(tmp_path):
    """The operator's edit, then the SIGHUP docs/limits-and-usage.md says reloads: both
    read the same file, and two identical refusal lines said it twice."""
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "meshgate.toml"
    settings = (
        # No HTTP edge, and no Redis notices listener to fill the log while Redis is away.
        f'[mesh]\ntls = false\n[telemetry]\nmetrics = false\n[router]\nlisten = "{address}"\n'
        'http_listen = ""\nhot_exact_entries = 0\n'
    )
    config.write_text(settings)
    log = tmp_path / "router.log"
    process = started("router", config, address, log)
    refused = "configuration refused; keeping the one in use"
    try:
        config.write_text(settings + "[cache]\nttl_s = -5\n")
        deadline = time.monotonic() + 30
        while refused not in log.read_text():  # the file watch, 1-2 s after the edit
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGHUP)
        while "unchanged since it was refused" not in log.read_text() and log.read_text().count(refused) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert log.read_text().count(refused) == 1, log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
    finally:
        ended(process)


# A service with a reload hook whose setup waits for a file to appear (argv:
# listen address, settings file, the file it waits for).
_SLOW_SETUP = """
import asyncio, os, sys
from meshgate import serving

async def setup(service, settings):
    print("setting up", flush=True)
    while not os.path.exists(sys.argv[3]):
        await asyncio.sleep(0.05)
    service.reload_hooks.append(lambda new: print("ttl_s", new.cache.ttl_s, flush=True))
    return serving._nothing

serving.main("cache", [], lambda settings: sys.argv[1], setup, ["--config", sys.argv[2]])
"""


def test_an_edit_of_the_settings_during_the_start_is_applied_once_the_service_serves(tmp_path):
    """The file watch took the file as it found it once serving: an edit
    made while the start was under way (a Redis, a Triton slow to answer)
    went unapplied until the next edit."""
    address = f"unix:{tmp_path / 'service.sock'}"
    config = tmp_path / "meshgate.toml"
    settings = "[mesh]\ntls = false\n[telemetry]\nmetrics = false\n"
    config.write_text(settings + "[cache]\nttl_s = 60\n")
    go = tmp_path / "go"
    log = tmp_path / "service.log"
    process = launched(["-c", _SLOW_SETUP, address, str(config), str(go)], log)
    try:
        deadline = time.monotonic() + 60
        while "setting up" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        config.write_text(settings + "[cache]\nttl_s = 90\n")
        go.touch()
        while '"serving"' not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # The watch looks once a second (serving.CONFIG_POLL_S).
        deadline = time.monotonic() + 5 * serving.CONFIG_POLL_S
        while "ttl_s 90" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        assert log.read_text().count("configuration reloaded") == 1, log.read_text()
    finally:
        ended(process)
