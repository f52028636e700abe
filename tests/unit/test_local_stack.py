"""How the local stack starts its children: their environment and their log
folder. `sleep` processes stand in for the children (a real stack is
tests/e2e's)."""

from __future__ import annotations

import concurrent.futures
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest

from meshgate.config import load_settings
from meshgate.local import ports as local_ports
from meshgate.local import stack as stack_module
from meshgate.local.stack import Ports, Stack

# Given in full, so that no free port is looked for (the unit tier opens no socket).
PORTS = Ports(1, 2, 3, 4, 5, 6, http=7, metrics={"router": 8, "context": 9, "cache": 10, "inference": 11})


class Launched:
    """subprocess.Popen as the stack calls it: records each call and starts
    `sleep` instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._popen = subprocess.Popen
        self.calls: list[tuple[list[str], dict]] = []
        self.processes: list[subprocess.Popen] = []
        monkeypatch.setattr(subprocess, "Popen", self)

    def __call__(self, command, **kwargs) -> subprocess.Popen:
        self.calls.append((command, kwargs))
        process = self._popen(["sleep", "60"], start_new_session=True)
        self.processes.append(process)
        return process

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def launched(monkeypatch):
    launched = Launched(monkeypatch)
    yield launched
    launched.kill()


def _stack(tmp_path, **kwargs) -> Stack:
    stack = Stack(tmp_path / "state", PORTS, redis_url="redis://127.0.0.1:1/0", **kwargs)
    stack.log_dir.mkdir(parents=True)
    return stack


OWNED = {
    "MESHGATE_INFERENCE__TRITON_URLS": '["127.0.0.1:9001"]',
    "MESHGATE_MESH__TLS": "false",
    "MESHGATE_DEV_API_KEY": "env-key",
    "MESHGATE_ROUTER__CONTEXT_ADDRESS": "127.0.0.1:9002",
    "MESHGATE_CACHE__LISTEN": "127.0.0.1:9003",
    "MESHGATE_ROUTER__DEV_TENANT": "false",
    # Every service of the stack is on its Redis: another would be unheard.
    "MESHGATE_ROUTER__CACHE_REDIS_URL": "redis://127.0.0.1:9004/0",
    # Whole tables may hold any of the above (a review's sent smollm2 elsewhere).
    "MESHGATE_MODELS__SMOLLM2": '{ deployments = [{ address = "10.9.9.9:50054" }] }',
    "MESHGATE_MODELS__TINY-GPT": '{ deployments = [{ address = "10.9.9.9:50054" }] }',
    "MESHGATE_ROUTER": '{ listen = "127.0.0.1:9005" }',
    "MESHGATE_MODELS": "{}",
}
# The services' own business: passed on whoever starts them.
TUNING = {
    "MESHGATE_CACHE__SEMANTIC_THRESHOLD": "0.85",
    "MESHGATE_ROUTER__MAX_MESSAGES": "64",
    "MESHGATE_MESH__TENANT_TOKEN_TTL_S": "60",
    "MESHGATE_MODELS__SMOLLM2__DEFAULT_MAX_TOKENS": "128",
}


def test_a_service_inherits_every_override_by_default(tmp_path, launched, monkeypatch) -> None:
    """The fault suite points the inference service at a second Triton this
    way, and the benchmarks tune the services so."""
    for name, value in {**OWNED, **TUNING}.items():
        monkeypatch.setenv(name, value)
    _stack(tmp_path).start_service("inference")
    (_, kwargs) = launched.calls[0]
    assert {name: kwargs["env"].get(name) for name in {**OWNED, **TUNING}} == {**OWNED, **TUNING}


def test_a_stack_that_owns_its_settings_passes_on_only_the_services_own(
    tmp_path, launched, monkeypatch
) -> None:
    for name, value in {**OWNED, **TUNING}.items():
        monkeypatch.setenv(name, value)
    # Not a setting: where SmolLM2's files are, which the settings file names after it.
    monkeypatch.setenv("MESHGATE_SMOLLM2_FILES", "/opt/smollm2")
    # A second replica's ports, without looking for free ones.
    monkeypatch.setattr(stack_module, "free_port", iter(range(20000, 20100)).__next__)
    stack = _stack(tmp_path, owns_settings=True, replicas=2)
    stack.start_service("inference")
    stack.start_service("router-2")
    for _, kwargs in launched.calls:
        env = kwargs["env"]
        assert not set(OWNED) & set(env)
        assert {name: env.get(name) for name in TUNING} == TUNING
        assert env["MESHGATE_CONFIG"] == str(stack.config_path)
        assert env["MESHGATE_SMOLLM2_FILES"] == "/opt/smollm2"
    # A second replica's own ports still come through the environment.
    (_, replica) = launched.calls[1]
    assert replica["env"]["MESHGATE_ROUTER__METRICS_LISTEN"] == stack.metrics_address("router-2")


@pytest.mark.parametrize("name", ["redis", "router"])
def test_a_child_comes_back_after_its_log_folder_was_removed(tmp_path, launched, name) -> None:
    """Someone cleared .meshgate/logs while the mesh ran: the restart must
    not fail for good on the missing folder."""
    stack = _stack(tmp_path)
    shutil.rmtree(stack.log_dir)
    stack.launch(name)
    assert stack.processes[name].poll() is None
    assert (stack.log_dir / f"{name}.log").is_file()


def test_the_stacks_settings_serve_the_built_in_models_at_its_inference_service(tmp_path) -> None:
    stack = _stack(tmp_path)
    stack._write_settings()
    settings = load_settings(stack.config_path, environ={})
    built_in = load_settings(environ={}).models
    assert sorted(settings.models) == ["smollm2", "tiny-gpt"]
    for alias, model in settings.models.items():
        assert [d.address for d in model.deployments] == [stack.addresses("inference")]
        assert (model.context_window_tokens, model.tokenizer, model.chat_template) == (
            built_in[alias].context_window_tokens,
            built_in[alias].tokenizer,
            built_in[alias].chat_template,
        )


def test_the_stacks_dev_tenant_is_on_beside_tenants_of_its_extra_settings(tmp_path) -> None:
    """The stack serves its key, which it prints, whatever tenants its extra
    settings add: unset, the dev tenant would be off beside them."""
    stack = _stack(tmp_path, extra_settings='\n[[router.tenants]]\nid = "acme"\n')
    stack._write_settings()
    router = load_settings(stack.config_path, environ={}).router
    assert [tenant.id for tenant in router.tenants] == ["acme"]
    assert router.dev_tenant is True


def test_a_users_settings_file_counts_under_the_stacks_own(tmp_path) -> None:
    """`make run` with MESHGATE_CONFIG: the file's tenants, limits and model
    settings were silently dropped (a review: every key of the user's
    refused API_KEY_INVALID); the stack's addresses still go over the file's."""
    base = tmp_path / "mine.toml"
    base.write_text(
        """
[mesh]
tls = false
health_listen = "0.0.0.0:8086"
tenant_token_ttl_s = 60

[router]
listen = "0.0.0.0:9999"
cache_redis_url = "redis://prod-redis:6379/0"
max_messages = 64
[[router.tenants]]
id = "acme"
api_key_sha256 = ["%s"]
models = ["*"]
limits = { requests_per_minute = 2 }

[models.smollm2]
default_max_tokens = 99
"""
        % ("ab" * 32)
    )
    stack = _stack(tmp_path, base_settings=base)
    stack._write_settings()
    settings = load_settings(stack.config_path, environ={})
    assert [tenant.id for tenant in settings.router.tenants] == ["acme"]
    assert settings.router.tenants[0].limits.requests_per_minute == 2
    assert settings.router.dev_tenant is True and settings.router.max_messages == 64
    assert settings.router.listen == stack.address("router")
    assert settings.models["smollm2"].default_max_tokens == 99
    assert [d.address for d in settings.models["smollm2"].deployments] == [stack.addresses("inference")]
    # What the stack owns goes, said in its own text or not (a review: a mesh
    # without TLS, a health port, another Redis for the cache's invalidations).
    assert settings.mesh.tls is True and settings.mesh.health_listen == ""
    assert settings.router.cache_redis_url == ""
    assert settings.mesh.tenant_token_ttl_s == 60  # not the stack's: kept
    assert sorted(stack.settings_text()[1]) == [
        "mesh.health_listen",
        "mesh.tls",
        "router.cache_redis_url",
        "router.listen",
    ]
    assert stat.S_IMODE(stack.config_path.stat().st_mode) == 0o600


def test_a_users_own_model_alias_is_served_by_the_stacks_inference_service(tmp_path) -> None:
    """A model alias of the user's file that the stack does not write lost
    its deployments with what the stack owns, and was sent to the built-in
    default address, where nothing of the stack listens (the forty-seventh
    session's note). Its deployments keep their Triton model, name and
    weight, and run on the stack's inference service."""
    base = tmp_path / "mine.toml"
    base.write_text(
        """
[models.chat]
default_max_tokens = 40
deployments = [
    { name = "a", address = "10.0.0.1:50054", model = "smollm2", weight = 3.0 },
    { name = "b", address = "10.0.0.2:50054", model = "tiny-gpt" },
]

[models.bare]
max_output_tokens = 100

[models.picker]
selection = { fast = "tiny-gpt", strong = "chat" }
"""
    )
    stack = _stack(tmp_path, base_settings=base)
    stack._write_settings()
    models = load_settings(stack.config_path, environ={}).models
    here = stack.addresses("inference")
    assert [(d.name, d.address, d.model, d.weight) for d in models["chat"].deployments] == [
        ("a", here, "smollm2", 3.0),
        ("b", here, "tiny-gpt", 1.0),
    ]
    assert models["chat"].default_max_tokens == 40
    # None given: the built-in deployment (its model, tiny-gpt), here.
    assert [(d.address, d.model) for d in models["bare"].deployments] == [(here, "tiny-gpt")]
    assert models["picker"].selection is not None and models["picker"].selection.strong == "chat"
    assert "models.chat.deployments" in stack.settings_text()[1]


def test_a_users_deployments_that_are_no_tables_are_refused_as_written(tmp_path) -> None:
    base = tmp_path / "mine.toml"
    base.write_text('[models.chat]\ndeployments = "10.0.0.1:50054"\n')
    stack = _stack(tmp_path, base_settings=base)
    stack._write_settings()
    with pytest.raises(ValueError, match="deployments"):
        load_settings(stack.config_path, environ={})


def test_the_stacks_settings_file_is_its_owners_alone(tmp_path) -> None:
    """It holds the development API key (and a Redis URL's password); an
    older file readable by others is replaced, not rewritten in place."""
    stack = _stack(tmp_path)
    stack.config_path.write_text("# an older run's\n")
    stack.config_path.chmod(0o644)
    stack._write_settings()
    assert stat.S_IMODE(stack.config_path.stat().st_mode) == 0o600
    assert load_settings(stack.config_path, environ={}).router.dev_api_key == stack.dev_api_key


def test_free_ports_are_distinct_and_below_the_range_the_kernel_gives_outgoing_connections(
    monkeypatch,
) -> None:
    tried = []

    def bindable(port: int) -> bool:
        tried.append(port)
        return port % 3 != 0  # some are taken

    monkeypatch.setattr(local_ports, "_bindable", bindable)
    low, _ = local_ports._ephemeral_ports()
    ports = [local_ports.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(local_ports._FIRST_CHOSEN_PORT <= port < low and port % 3 for port in ports), ports
    assert set(tried) > set(ports)


def test_a_port_one_process_handed_out_is_never_handed_out_by_another(monkeypatch, tmp_path) -> None:
    # Two test workers each found one port free and gave it to their own
    # Triton; the second failed to start (a clean-clone run). A claim lasts
    # as long as the process that made it.
    claims = tmp_path / "ports.lock"
    monkeypatch.setattr(local_ports, "_CLAIMS_PATH", claims)
    monkeypatch.setattr(local_ports, "_claims_fd", None)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from meshgate.local import ports; ports._CLAIMS_PATH = sys.argv[1]; "
            "ports._bindable = lambda port: True; print(ports.free_port(), flush=True); sys.stdin.read()",
            str(claims),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    try:
        held = int(holder.stdout.readline())
        assert not local_ports._claim(held)
        # Offered it and the next, both free to bind, free_port passes it over.
        monkeypatch.setattr(local_ports, "_bindable", lambda port: True)
        monkeypatch.setattr(local_ports, "_FIRST_CHOSEN_PORT", held)
        monkeypatch.setattr(local_ports, "_ephemeral_ports", lambda: (held + 2, 60999))
        assert local_ports.free_port() == held + 1
    finally:
        holder.communicate("")
    assert local_ports._claim(held)  # its holder has ended


def test_a_redis_cluster_nodes_bus_ports_are_below_the_ephemeral_range_too(monkeypatch) -> None:
    # A bus port (the node's + 10000) inside the range an outgoing
    # connection's local end is drawn from could be taken before the node binds it.
    monkeypatch.setattr(local_ports, "_bindable", lambda port: port % 3 != 0)
    low, _ = local_ports._ephemeral_ports()
    handed = {local_ports.free_port() for _ in range(5)}
    nodes = local_ports.free_cluster_ports(6) + local_ports.free_cluster_ports(6)
    buses = {node + 10000 for node in nodes}
    assert len(set(nodes)) == 12 and not handed & (set(nodes) | buses)
    # free_port hands out none of them after.
    assert not {local_ports.free_port() for _ in range(200)} & (set(nodes) | buses)
    assert all(node >= local_ports._FIRST_CHOSEN_PORT and node + 10000 < low for node in nodes), nodes
    assert all(node % 3 and (node + 10000) % 3 for node in nodes), nodes


def test_a_service_that_dies_at_start_is_reported_with_the_end_of_its_log(tmp_path) -> None:
    stack = _stack(tmp_path)
    stack_module.certs.ensure(stack.certs_dir)  # its health checks go over the mesh's TLS
    (stack.log_dir / "context.log").write_text(
        "".join(f"line {n}\n" for n in range(30)) + "cannot start: port\n"
    )
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    dead.wait()
    stack.processes["context"] = dead
    with pytest.raises(RuntimeError) as failure:
        stack.wait_serving("context", timeout_s=5)
    message = str(failure.value)
    assert message.startswith("context exited with code 1")
    assert message.endswith("line 29\ncannot start: port")
    assert "line 10\n" not in message


class PastTheLock(Exception):
    """Raised by the first step of a start after its state directory's lock."""


def test_a_second_stack_on_a_state_directory_in_use_is_refused_before_it_writes_there(
    tmp_path, monkeypatch
) -> None:
    """Two `make run`s started together both passed the port check before
    either bound a port, then wrote their certificates into one folder: both
    failed, one with "mesh.key_file ... is not the key of mesh.cert_file". A
    stack now holds its state directory from its start to its stop."""
    monkeypatch.setattr(Stack, "_claim_ports", lambda stack: None)
    first_is_writing, first_may_go_on = threading.Event(), threading.Event()

    def ensure(directory):
        if not first_is_writing.is_set():
            first_is_writing.set()
            first_may_go_on.wait(10)
        raise PastTheLock

    monkeypatch.setattr(stack_module.certs, "ensure", ensure)
    first = _stack(tmp_path)
    second = Stack(first.state_dir, PORTS, redis_url=first.redis_url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first_start = pool.submit(first.start)
        assert first_is_writing.wait(10)
        try:
            with pytest.raises(
                RuntimeError, match=rf"{first.state_dir} is in use by another `meshgate up` \(pid \d+\)"
            ):
                second.start()
        finally:
            first_may_go_on.set()
        with pytest.raises(PastTheLock):
            first_start.result()
    with pytest.raises(PastTheLock):  # free again once the first's start failed and stopped it
        second.start()


def _stopped(process: subprocess.Popen) -> subprocess.Popen:
    """``process`` once the kernel shows it stopped (SIGSTOP: a hung child, a debugger's pause)."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while pathlib.Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "not stopped within 10 s"
        time.sleep(0.01)
    return process


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("name", ["redis", "triton"])
def test_a_stopped_child_is_continued_to_stop_in_order_not_killed_at_the_grace(tmp_path, name) -> None:
    """Ctrl-C on a `meshgate up` whose Redis was stopped (SIGSTOP) took
    26.7 s, not 4 s: the SIGTERM waited in the stopped process for the
    whole 20 s grace, and Redis was then killed without its shutdown. The
    supervisor sent SIGCONT after its SIGTERM; the stack's own stop did not."""
    stack = _stack(tmp_path)
    child = _stopped(subprocess.Popen(["sleep", "60"], start_new_session=True))
    stack.processes[name] = child
    try:
        stack.stop()
        # Ended by the SIGTERM, not by the SIGKILL that follows the grace.
        assert child.returncode == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize(
    "text",
    [
        '{"context": {"pid": Infinity, "identity": "x"}}',  # OverflowError
        "[" * 100_000 + "]" * 100_000,  # RecursionError
        "not json",
        '{"context": {"pid": "7"}}',
    ],
)
def test_a_children_record_that_cannot_be_read_names_no_child_to_end(tmp_path, text):
    """A review: a record of a "pid" of Infinity or nesting deeper than json
    reads failed the start with a traceback, not a port check."""
    stack = Stack(tmp_path / "state", PORTS, redis_url="redis://127.0.0.1:1/0")
    stack.children_path.parent.mkdir(parents=True, exist_ok=True)
    stack.children_path.write_text(text)
    assert stack._previous_children() == {}


class _Health:
    """The inference service's GetBackendHealth, answering ``models`` dead or not."""

    def __init__(self, dead: list[str], failing: bool = False) -> None:
        self.dead, self.failing = dead, failing

    def __call__(self, channel):  # as InferenceServiceStub(channel)
        return self

    def GetBackendHealth(self, request, timeout=None):  # noqa: N802 - the stub's name
        from meshgate.inference.v1 import inference_service_pb2 as pb

        if self.failing:
            raise grpc.RpcError()
        models = [
            pb.BackendModel(name=m, ready=m not in self.dead, stub_dead=m in self.dead) for m in ("a", "b")
        ]
        return pb.GetBackendHealthResponse(backends=[pb.Backend(address="t", models=models)])


class _Triton:
    """Triton's model control; a load waits for ``loaded`` (a real one takes seconds)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.loaded = threading.Event()

    def unload_model(self, model, client_timeout=None):
        self.calls.append(("unload", model))

    def load_model(self, model, client_timeout=None):
        self.loaded.wait(3)
        self.calls.append(("load", model))


def test_a_triton_model_whose_stub_died_is_unready_and_loaded_again(tmp_path, monkeypatch) -> None:
    """A review's finding: a tiny_gpt stub killed (the OOM killer's choice)
    left the model refused for good, Triton reading it ready, while
    `meshgate status` read every process up and nothing was restarted. The
    inference service's health names such a model (stub_dead): Triton is
    then not ready, and the model is unloaded and loaded again, at most
    once a STUB_RELOAD_INTERVAL_S. (Against a real `meshgate up`: healed
    within 11 s of the first refused request, /tmp/rev_supervisor.)"""
    stack = Stack(tmp_path / "state")
    monkeypatch.setattr(stack_module.triton, "ready", lambda client, models, timeout: True)
    monkeypatch.setattr(Stack, "_ready_channel", lambda self, name: object())
    triton_client = _Triton()
    monkeypatch.setattr(Stack, "_triton", lambda self: triton_client)
    health = _Health(dead=["b"])
    monkeypatch.setattr(stack_module.inference_service_pb2_grpc, "InferenceServiceStub", health)
    # Answered while the load still runs: the supervisor's stop waits for
    # its asks (a final read: a Ctrl-C waited out the load, all still "up").
    assert not stack.ready("triton")
    assert ("load", "b") not in triton_client.calls  # still loading
    assert not stack.ready("triton")  # within the interval: not loaded again
    triton_client.loaded.set()
    for _ in range(1000):
        if len(triton_client.calls) == 2:
            break
        time.sleep(0.01)
    assert triton_client.calls == [("unload", "b"), ("load", "b")]
    health.dead = []
    assert stack.ready("triton")
    # The inference service not answering says nothing of Triton's models.
    health.failing = True
    assert stack.ready("triton")
