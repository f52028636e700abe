"""The whole mesh on one machine: Redis, Triton and the four services, each its
own process, as `make run`, the end-to-end tests and the benchmarks start it.

The stack writes one settings file into its state directory and hands it to
every service, so each process is started exactly as an operator would start
it by hand.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import pathlib
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import typing
from collections.abc import Mapping

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import mesh_auth
from meshgate.config import DEFAULT_DEV_API_KEY, MeshSettings
from meshgate.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from meshgate.local import certs, children, redis_server, triton
from meshgate.local.ports import free_port

if typing.TYPE_CHECKING:
    import tritonclient.grpc

log = structlog.get_logger(__name__)

SERVICES = ("inference", "context", "cache", "router")

# In a stack's state directory: the lock its `meshgate up` holds, and the
# state of each child its supervisor keeps there (meshgate/local/supervisor.py).
LOCK_FILE = "stack.lock"
STATUS_FILE = "status.json"
# Each child the stack started last, by name: its pid and what tells that
# process from a later one given the same pid (_process_identity). The next
# start on the state directory reads it to end what a killed `up` left.
CHILDREN_FILE = "children.json"

# How long one readiness check waits for its answer (Stack.ready): a child
# that takes longer is not ready for work either.
READY_TIMEOUT_S = 1.0
# A Triton model whose stub died is loaded again at most this often
# (Stack._triton_models_answer), each unload and load given this long.
STUB_RELOAD_INTERVAL_S = 60.0
STUB_RELOAD_TIMEOUT_S = 60.0

# How long a start waits for a child to be ready: Stack.start for the whole
# mesh, and a supervisor for a child it restarted (Triton loading its models
# on a busy machine is the slowest).
START_TIMEOUT_S = 180.0

# How long a stop waits for a service or Redis to exit after SIGTERM before
# SIGKILL: a service drains its calls for up to 10 s (serving.stop). Triton
# has its own (triton.STOP_GRACE_S).
STOP_GRACE_S = 20.0

# How long a start waits for the children the last `up` of its state
# directory left holding its ports to exit once sent SIGTERM and SIGCONT
# (_end_leftovers): SIGTERM ends a service within its drain (10 s at most,
# well under a second idle) and Triton within its --exit-timeout-secs (10 s).
LEFTOVER_EXIT_S = 15.0


def replica_name(service: str, index: int) -> str:
    """The first replica of a service is named after it ("router"), as in a
    stack of one replica each; the others "router-2", "router-3", ..."""
    return service if index == 0 else f"{service}-{index + 1}"


# The local stack runs from a checkout: model_repository/ and the build
# scripts beside it (an image needs none of this: deploy/docker/).
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Ports:
    router: int = 50051
    context: int = 50052
    cache: int = 50053
    inference: int = 50054
    triton: int = 8001
    redis: int = 56379
    # The router's OpenAI-compatible HTTP edge. None: 8080 for the default
    # ports (`make run`), a free port for a stack given its own ports.
    http: int | None = None
    # Each service's Prometheus endpoint, by service. None: its gRPC port
    # + 10 for the default ports, free ports for a stack given its own ports.
    metrics: dict[str, int] | None = None
    # Triton's HTTP endpoint (generate/generate_stream), off unless a port is
    # given: the services speak gRPC; only the peer benchmark
    # (bench/peers_bench.py) needs it. Last: callers pass the others by position.
    triton_http: int | None = None


def _listened_on(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind: a connection in TIME_WAIT is no conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _claim_name(port: int) -> str:
    # In Linux's abstract socket namespace: no file to leave behind, one
    # namespace per network namespace as the ports themselves, and the
    # kernel drops the name with the process however it ends.
    return f"\0meshgate-port-{port}"


def _claim_port(port: int) -> socket.socket | None:
    """This process's claim on ``port`` among local stacks, or None if
    another process holds it. Listening, so that another can ask whose it
    is (_claimant)."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(_claim_name(port))
    except OSError:
        claim.close()
        return None
    claim.listen()
    return claim


def _claimant(port: int) -> int | None:
    """The pid of the process that holds ``port``'s claim: the kernel tells
    a connection whose listener it reached (SO_PEERCRED), of any user."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(_claim_name(port))
            credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:  # released meanwhile
            return None
    pid, _, _ = struct.unpack("3i", credentials)
    return pid


def _listener(port: int) -> int | None:
    """The pid of a process listening on TCP ``port``, where /proc shows it
    (any process of this user; every one to root)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in pathlib.Path(table).read_text().splitlines()[1:]:
                # sl local_address rem_address st ... inode: state 0A is LISTEN.
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{fields[9]}]")
    for fds in pathlib.Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in sockets for fd in fds.iterdir()):
                return int(fds.parent.name)
    return None


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, Ctrl-Z), by its state in /proc."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": the command may hold spaces and parentheses.
    return stat.rpartition(")")[2].split()[:1] == ["T"]


def _process_identity(pid: int) -> str | None:
    """What tells process ``pid`` from any other that has had or will have
    that pid: the boot it runs in and its start time since that boot (clock
    ticks, /proc/PID/stat's 22nd field). None if it is gone (or there is no
    /proc)."""
    try:
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ...": fields from the state (the 3rd) on.
    return f"{boot}:{stat.rpartition(')')[2].split()[22 - 3]}"


def _command_line(pid: int) -> str | None:
    """Process ``pid``'s command line (its first 200 characters), or None
    where /proc does not show it."""
    try:
        arguments = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return " ".join(arguments).strip()[:200]


def _describe_process(pid: int | None) -> str:
    """A process as an error names it: its pid and command line, and that
    it is stopped, where it is. A child stopped when its `meshgate up` was
    killed outright holds the SIGTERM the kernel sent it until it is
    continued, and its ports for good: waiting, as the refusal advises for
    a Triton still stopping, never freed them."""
    if pid is None:
        return "a process this user cannot see"
    command = _command_line(pid)
    if command is None:
        return f"pid {pid}"
    described = f"pid {pid} ({command})"
    if _stopped(pid):
        described += f", stopped: it takes no SIGTERM until continued (kill -CONT {pid}, or kill -KILL {pid})"
    return described


def _end_leftovers(holders: set[int], previous_children: Mapping[int, str]) -> bool:
    """Stops each of ``holders`` that is one of ``previous_children`` (pid
    -> _process_identity) as the stack's own stop would (SIGTERM, then
    SIGCONT: children.terminate), and waits up to LEFTOVER_EXIT_S
    for them to exit; True if there was any. A child of a `meshgate up`
    killed outright got SIGTERM from the kernel (PR_SET_PDEATHSIG), but one
    stopped then (SIGSTOP, a debugger) takes it only once continued, and
    held its ports for good; one still stopping (Triton, up to 10 s) is
    waited for alike, and a second SIGTERM changes nothing for it. The
    SIGTERM is for a child whose owner lives on: a stop that failed
    released the state directory (Stack.stop's finally) with children
    still running, which no kernel signal will end; only continued, each
    was waited for LEFTOVER_EXIT_S and then refused with "try again then",
    as often as it was tried. A process that only has a recorded pid, started at
    another time, is left alone: each is held by a pidfd before its
    identity is checked, so the pid cannot pass to another process between
    the check and the signal."""
    pidfds = []
    try:
        for pid in holders & previous_children.keys():
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # gone meanwhile
                continue
            if _process_identity(pid) != previous_children[pid]:  # the pid is another's now
                os.close(pidfd)
                continue
            pidfds.append(pidfd)
            # A start that waits says what for: up to LEFTOVER_EXIT_S of
            # silence read as a hung start.
            log.warning(
                "waiting for a process the last `meshgate up` on this state folder left on its ports to end",
                pid=pid,
                command=_command_line(pid),
                stopped=_stopped(pid),
                wait_up_to_s=LEFTOVER_EXIT_S,
            )
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            # Its group too, as children.terminate continues it (Triton's
            # Python-backend stubs, stopped with it): only where it leads its
            # own group, which its pidfd shows is still it. SIGCONT alone.
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGCONT)
        # A pidfd reads as ready once its process has exited (poll, not
        # select: select fails on a descriptor past 1023).
        deadline = time.monotonic() + LEFTOVER_EXIT_S
        poller = select.poll()
        for pidfd in pidfds:
            poller.register(pidfd, select.POLLIN)
        waiting = len(pidfds)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for pidfd, _ in poller.poll(left * 1000):
                poller.unregister(pidfd)
                waiting -= 1
        return bool(pidfds)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def holder(state_dir: pathlib.Path) -> int | None:
    """The pid of the process whose stack holds ``state_dir`` (its lock, as
    the kernel lists it in /proc/locks), or None: none runs there. Read
    only: taking the lock to see, even for a moment, could refuse a
    `meshgate up` starting then."""
    try:
        lock = os.stat(state_dir / LOCK_FILE)
        locks = pathlib.Path("/proc/locks").read_text()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5431769 0 EOF": the pid, then
    # the file as device major:minor:inode.
    file = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    for line in locks.splitlines():
        fields = line.split()
        if "FLOCK" in fields and file in fields:
            return int(fields[fields.index(file) - 1])
    return None


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Settings the stack writes and relies on itself: where each process listens
# and what it dials (the stack waits on those ports and prints them), the
# mesh's TLS and certificates (it dials its services with them), Redis (its
# own, or REDIS_URL, the router's cache notices' too) and the dev tenant and its API key (--api-key, which it
# prints); the mesh's tunables (mesh.tenant_token_ttl_s) are not its own. An
# environment override of one has the services disagree with the stack: MESHGATE_MESH__TLS=false
# had them listen in plain text while the stack dialled them with mutual TLS
# and waited 180 s for nothing. Other overrides (a cache threshold, a limit)
# are the services' own business and pass on.
# A whole table given in one variable (MESHGATE_ROUTER='{ listen = ... }',
# MESHGATE_MODELS__SMOLLM2='{ deployments = [...] }') may hold any of them:
# a review's alias table sent the stack's smollm2 to 10.9.9.9, so such a
# table of a section or model that holds one is the stack's too.
_STACK_OWNED = re.compile(
    r"MESHGATE_(DEV_API_KEY|MESH__(TLS|CA_FILE|CERT_FILE|KEY_FILE|ROUTER_CERT_FILE)|REDIS__.+"
    r"|ROUTER__DEV_API_KEY|ROUTER__DEV_TENANT|ROUTER__CACHE_REDIS_URL"
    r"|[^_]+__(.+_)?(LISTEN|ADDRESS|TRITON_URLS)|MODELS__.+__DEPLOYMENTS.*"
    r"|MESH|REDIS|ROUTER|CONTEXT|CACHE|INFERENCE|MODELS|MODELS__[^_]+(_[^_]+)*)",
    re.IGNORECASE,
)


def stack_owned_overrides(environ: Mapping[str, str]) -> list[str]:
    """The variables of ``environ`` that would override a setting the stack
    owns (_STACK_OWNED; REDIS_URL it never passes on)."""
    return sorted(name for name in environ if _STACK_OWNED.fullmatch(name))


def _over_base(base: pathlib.Path, settings: str, inference_address: str) -> tuple[str, list[str]]:
    """The document of ``base`` with ``settings`` over it, table by table, as
    TOML; and the keys of ``base`` whose values ``settings`` replaced.
    ``inference_address``: where the stack's inference service listens."""
    # Imported here: only a run given a settings file of its own needs it.
    import tomli_w

    document = tomllib.loads(base.read_text(encoding="utf-8"))
    models = document.get("models")
    given = {
        alias: table["deployments"]
        for alias, table in (models.items() if isinstance(models, dict) else ())
        if isinstance(table, dict) and "deployments" in table
    }
    # What the stack owns goes, whether or not its own text says it: a mesh
    # without TLS, a health port, another Redis for the cache's
    # invalidations would each break the stack (a review).
    replaced = _drop_owned(document, ())
    replaced += [key for key in _overlay(document, tomllib.loads(settings), "") if key not in replaced]
    _run_here(document.get("models"), given, inference_address)
    header = f"# Written by meshgate.local.stack for this local run, over {base}.\n"
    return header + tomli_w.dumps(document), replaced


def _run_here(models: object, given: dict[str, object], inference_address: str) -> None:
    """Points each model alias of the user's file that the stack's own text
    does not deploy at the stack's inference service: its deployments went
    with what the stack owns, and without any it would be served from the
    built-in default address, where nothing of this stack listens. Each
    deployment the file gave keeps its name, model and weight; an alias that
    gave none gets the built-in one, here; deployments that are no list of
    tables stay as written, for loading them to refuse. A selection alias's
    deployments go unused, and it is left as it is."""
    if not isinstance(models, dict):
        return
    for alias, table in models.items():
        if not isinstance(table, dict) or "deployments" in table or "selection" in table:
            continue
        deployments = given.get(alias, [{"name": "local"}])
        if isinstance(deployments, list) and all(isinstance(one, dict) for one in deployments):
            table["deployments"] = [{**one, "address": inference_address} for one in deployments]
        else:
            table["deployments"] = deployments  # as written: loading it says what is wrong


def _drop_owned(document: dict, path: tuple[str, ...]) -> list[str]:
    """Removes from ``document`` each setting the stack owns, as
    stack_owned_overrides names their variables (_STACK_OWNED: addresses,
    mesh TLS, Redis, the development key and tenant, deployments); the
    dotted keys removed."""
    dropped = []
    for key in list(document):
        value, where = document[key], (*path, key)
        if isinstance(value, dict):
            dropped += _drop_owned(value, where)
        elif len(where) > 1 and _STACK_OWNED.fullmatch("MESHGATE_" + "__".join(where).upper()):
            del document[key]
            dropped.append(".".join(where))
    return dropped


def _overlay(under: dict, over: dict, prefix: str) -> list[str]:
    """Puts ``over``'s values into ``under``, tables merged key by key (an
    array, of tables too, is one value); the dotted keys it replaced."""
    replaced = []
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(under.get(key), dict):
            replaced += _overlay(under[key], value, f"{prefix}{key}.")
            continue
        if key in under and under[key] != value:
            replaced.append(prefix + key)
        under[key] = value
    return replaced


def _reconnect_options() -> list[tuple[str, int]]:
    # Imported here: `meshgate status` imports this module, and needs none
    # of the services' serving code (a tenth of a second).
    from meshgate.serving import RECONNECT_OPTIONS

    return RECONNECT_OPTIONS


class Stack:
    def __init__(
        self,
        state_dir: pathlib.Path,
        ports: Ports | None = None,
        redis_url: str | None = None,
        dev_api_key: str = DEFAULT_DEV_API_KEY,
        extra_settings: str = "",
        base_settings: pathlib.Path | None = None,
        tracing: bool = True,
        log_level: str = "info",
        triton_models: tuple[str, ...] = triton.DEFAULT_MODELS,
        replicas: int = 1,
        owns_settings: bool = False,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.ports = ports or Ports()
        if self.ports.http is None:
            self.ports.http = 8080 if ports is None else free_port()
        if self.ports.metrics is None:
            self.ports.metrics = {
                name: getattr(self.ports, name) + 10 if ports is None else free_port() for name in SERVICES
            }
        # Each service runs as this many processes, each on its own port (the
        # first on the port of ``ports``); the others reach all of a
        # service's replicas through one address list, balanced round robin
        # by their channels (meshgate/serving.py).
        self.replica_ports = {
            replica_name(service, index): getattr(self.ports, service) if index == 0 else free_port()
            for service in SERVICES
            for index in range(replicas)
        }
        self.replica_metrics_ports = {
            name: self.ports.metrics[name] if name in SERVICES else free_port() for name in self.replica_ports
        }
        self.replica_http_ports = {
            name: self.ports.http if name == "router" else free_port()
            for name in self.replica_ports
            if self.service_of(name) == "router"
        }
        self.external_redis_url = redis_url
        self.dev_api_key = dev_api_key
        self.extra_settings = extra_settings
        # A user's settings file (MESHGATE_CONFIG), which the stack's own
        # settings go over: its tenants, limits, prices and models count.
        self.base_settings = base_settings
        self.tracing = tracing
        self.log_level = log_level
        # What Triton loads: a run that needs only tiny_gpt (tests, the
        # fault suite) starts and restarts Triton without smollm2's load.
        self.triton_models = triton_models
        self.log_dir = self.state_dir / "logs"
        self.traces_path = self.state_dir / "traces.jsonl"
        self.config_path = self.state_dir / "meshgate.toml"
        self.status_path = self.state_dir / STATUS_FILE
        self.children_path = self.state_dir / CHILDREN_FILE
        # What children_path says of this stack's children (_started).
        self._children_record: dict[str, dict[str, object]] = {}
        # The mesh's CA and each service's certificate: made on the first
        # start, reused by later ones.
        self.certs_dir = self.state_dir / "certs"
        self.processes: dict[str, subprocess.Popen] = {}
        # Whether the services are kept from reading the environment's
        # overrides of the settings the stack owns (stack_owned_overrides()):
        # `meshgate up`, whose settings file and printed addresses and key
        # must be what its services run with. The fault suite and the
        # benchmarks point a service elsewhere through exactly those.
        self.owns_settings = owns_settings
        # True while stop() runs: a caller's signal handler leaves an ordered
        # stop alone rather than break it off (meshgate/cli.py), whether the
        # caller or a failed start() began it.
        self.stopping = False
        # The lock on state_dir this stack holds from start() to stop().
        self._state_lock: typing.IO[str] | None = None
        # Its claims on its ports, held as long (_claim_ports).
        self._port_claims: list[socket.socket] = []
        # One channel per child that ready() asks, kept from one check to
        # the next (see ready()); closed by stop().
        self._ready_channels: dict[str, grpc.Channel] = {}
        self._triton_client: tritonclient.grpc.InferenceServerClient | None = None
        # When (time.monotonic()) each Triton model was last loaded again for
        # its dead stub (_triton_models_answer).
        self._stub_reloads: dict[str, float] = {}

    @property
    def redis_url(self) -> str:
        return self.external_redis_url or f"redis://127.0.0.1:{self.ports.redis}/0"

    @staticmethod
    def service_of(name: str) -> str:
        """The service a replica ("cache-2") or a child ("redis") is of."""
        return name.split("-")[0]

    def replicas_of(self, service: str) -> list[str]:
        return [name for name in self.replica_ports if self.service_of(name) == service]

    def address(self, name: str) -> str:
        """Where a child listens: a service's first replica by the service's
        name, another by its replica name ("router-2"), or "triton", "redis",
        "http"."""
        port = self.replica_ports.get(name) or getattr(self.ports, name)
        return f"127.0.0.1:{port}"

    def ready(self, name: str) -> bool:
        """Whether a child is ready for work: Redis answers PING, Triton and
        each of its models say they are ready, a service's health check
        (the whole server's, "") answers SERVING. A port that accepts
        connections is not enough: a service listens before it serves (the
        inference service until it reaches a ready Triton) and while it
        drains, Triton while it stops. Each child's channel is kept (a
        supervisor asks every child several times a second): a call on it
        costs no connection, nor a TLS handshake; it reconnects to a
        restarted child within a second (RECONNECT_OPTIONS)."""
        if name == "redis":
            return redis_server.answers_ping(self.ports.redis, READY_TIMEOUT_S)
        if name == "triton":
            models_ready = triton.ready(self._triton(), self.triton_models, READY_TIMEOUT_S)
            return models_ready and self._triton_models_answer()
        channel = self._ready_channel(name)
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=READY_TIMEOUT_S
            )
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def _ready_channel(self, name: str) -> grpc.Channel:
        channel = self._ready_channels.get(name)
        if channel is None:
            channel = self._ready_channels[name] = self.channel(name, _reconnect_options())
        return channel

    def _triton_models_answer(self) -> bool:
        """False while the inference service reads a Triton model's
        Python-backend stub dead (BackendModel.stub_dead), and each such
        model is loaded again (unloaded, then loaded: a load alone does
        nothing while its files are unchanged), at most once every
        STUB_RELOAD_INTERVAL_S. Triton reads such a model ready and refuses
        its every request, and never starts the stub again itself: a stub
        killed (the OOM killer's choice) left the model refused for good
        while `meshgate status` read every process up (a review). Unready,
        Triton is restarted after the grace if the reload does not help.
        The inference service not answering says nothing of Triton's models."""
        try:
            health = inference_service_pb2_grpc.InferenceServiceStub(
                self._ready_channel("inference")
            ).GetBackendHealth(inference_service_pb2.GetBackendHealthRequest(), timeout=READY_TIMEOUT_S)
        except grpc.RpcError:
            return True
        dead = sorted({m.name for b in health.backends for m in b.models if m.stub_dead})
        now = time.monotonic()
        for model in dead:
            if now - self._stub_reloads.get(model, -math.inf) < STUB_RELOAD_INTERVAL_S:
                continue
            self._stub_reloads[model] = now
            log.warning("a Triton model's stub process died: loading the model again", model=model)
            # Apart from the ask: a load takes seconds, and the supervisor's
            # stop waits for its asks (a final read: a Ctrl-C during one held
            # the stop, every child still written up, for the whole load).
            threading.Thread(
                target=self._reload_model, args=(model,), name="meshgate-reload", daemon=True
            ).start()
        return not dead

    def _reload_model(self, model: str) -> None:
        try:
            self._triton().unload_model(model, client_timeout=STUB_RELOAD_TIMEOUT_S)
            self._triton().load_model(model, client_timeout=STUB_RELOAD_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - tritonclient's own exception; unready all the same
            log.warning("loading the model again failed", model=model, error=str(error))

    def ready_depends_on(self, name: str) -> tuple[str, ...]:
        """The children whose readiness a child's own answer depends on
        (ready()): an inference replica answers NOT_SERVING while no Triton
        is ready. The other services answer SERVING whatever Redis or the
        services they call do."""
        return ("triton",) if self.service_of(name) == "inference" else ()

    def stop_grace_s(self, name: str) -> float:
        """How long stop() waits for a child to exit after SIGTERM before SIGKILL."""
        return triton.STOP_GRACE_S if name == "triton" else STOP_GRACE_S

    def _triton(self) -> tritonclient.grpc.InferenceServerClient:
        import tritonclient.grpc

        if self._triton_client is None:
            self._triton_client = tritonclient.grpc.InferenceServerClient(
                self.address("triton"), channel_args=_reconnect_options()
            )
        return self._triton_client

    def addresses(self, service: str) -> str:
        """Every replica of ``service``, as an address setting takes them
        (one address, or a comma-separated list)."""
        return ",".join(self.address(name) for name in self.replicas_of(service))

    def metrics_address(self, name: str) -> str:
        """Where service ``name`` serves its Prometheus metrics (a replica
        by its replica name, as :meth:`address`)."""
        return f"127.0.0.1:{self.replica_metrics_ports.get(name) or self.ports.metrics[name]}"

    @property
    def mesh_settings(self) -> MeshSettings:
        return MeshSettings(
            ca_file=str(certs.ca_path(self.certs_dir)),
            cert_file=str(self.certs_dir / "{service}.pem"),
            key_file=str(self.certs_dir / "{service}.key"),
        )

    def channel(self, name: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
        """A blocking channel to one of the stack's services (or replicas),
        as the router reaches it (with the router's certificate) or a client
        the router; ``options``: more channel options."""
        service = self.service_of(name)
        options = options or []
        if service == "router":
            return grpc.insecure_channel(self.address(name), options)
        security = mesh_auth.Mesh(self.mesh_settings, "router").to(service)
        return grpc.secure_channel(
            self.address(name), security.credentials, [*security.channel_options, *options]
        )

    def _write_settings(self) -> None:
        settings, _ = self.settings_text()
        certs.replace_file(self.config_path, settings.encode(), 0o600)

    def settings_text(self) -> tuple[str, list[str]]:
        """The settings file the services read, and the keys of
        ``base_settings`` that the stack's own replace (dotted: "router.listen").
        Raises OSError or ValueError for a base file it cannot read (not
        UTF-8, not TOML)."""
        p = self.ports
        mesh = self.mesh_settings
        # Readable by its owner alone: it holds the development API key, and
        # the Redis URL with any password REDIS_URL gave it.
        settings = f"""# Written by meshgate.local.stack for this local run.
[telemetry]
exporter = "{"jsonl" if self.tracing else "none"}"
jsonl_path = {_toml_string(str(self.traces_path))}
log_level = "{self.log_level}"

[redis]
url = {_toml_string(self.redis_url)}

[mesh]
ca_file = {_toml_string(mesh.ca_file)}
cert_file = {_toml_string(mesh.cert_file)}
key_file = {_toml_string(mesh.key_file)}

# Each model keeps its built-in settings (meshgate/config.py) but for where it runs.
[models.smollm2]
deployments = [{{ name = "local", address = "{self.addresses("inference")}", model = "smollm2" }}]

[models.tiny-gpt]
deployments = [{{ name = "local", address = "{self.addresses("inference")}", model = "tiny-gpt" }}]

[router]
listen = "127.0.0.1:{p.router}"
metrics_listen = "{self.metrics_address("router")}"
http_listen = "127.0.0.1:{p.http}"
context_address = "{self.addresses("context")}"
cache_address = "{self.addresses("cache")}"
# The stack's own tenant, whose key it prints: on even beside tenants of extra settings.
dev_tenant = true
dev_api_key = {_toml_string(self.dev_api_key)}

[context]
listen = "127.0.0.1:{p.context}"
metrics_listen = "{self.metrics_address("context")}"
inference_address = "{self.addresses("inference")}"

[cache]
listen = "127.0.0.1:{p.cache}"
metrics_listen = "{self.metrics_address("cache")}"
inference_address = "{self.addresses("inference")}"

[inference]
listen = "127.0.0.1:{p.inference}"
metrics_listen = "{self.metrics_address("inference")}"
triton_urls = ["127.0.0.1:{p.triton}"]
{self.extra_settings}"""
        if self.base_settings is None:
            return settings, []
        return _over_base(self.base_settings, settings, self.addresses("inference"))

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        try:
            self._claim_ports()
            self.log_dir.mkdir(exist_ok=True)
            certs.ensure(self.certs_dir)
            self._write_settings()
            if self.external_redis_url is None:
                self.launch("redis")
            build_model_weights()
            self.launch("triton")
            if self.external_redis_url is None:
                redis_server.wait_ready(self.ports.redis)
            for name in self.replica_ports:
                self.start_service(name)
            triton.wait_ready(
                self.address("triton"),
                self.triton_models,
                timeout=timeout_s,
                process=self.processes["triton"],
            )
            for name in self.replica_ports:
                self.wait_serving(name, timeout_s)
        except BaseException:
            self.stop()
            raise

    def launch(self, name: str) -> None:
        """Starts one child, "redis", "triton" or a service, without waiting
        for it: how start() brings each up and how a supervisor restarts one
        (Redis on the same port and append-only file, so no data is lost)."""
        # Again on each launch: a restart must not fail for good because
        # someone cleared the logs while the mesh ran.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if name == "redis":
            self._started(
                "redis",
                redis_server.launch(
                    self.ports.redis,
                    self.state_dir / "redis",
                    self.log_path("redis"),
                ),
            )
        elif name == "triton":
            self._started(
                "triton",
                triton.launch(
                    grpc_port=self.ports.triton,
                    http_port=self.ports.triton_http,
                    state_dir=self.state_dir / "triton",
                    log_file=self.log_path("triton"),
                    models=self.triton_models,
                ),
            )
        else:
            self.start_service(name)

    def _started(self, name: str, process: subprocess.Popen) -> None:
        """Takes a child just started as ``name`` and records it in
        children_path, for the next start on this state directory if this
        process is killed, or its stop fails (_end_leftovers)."""
        self.processes[name] = process
        self._children_record[name] = {"pid": process.pid, "identity": _process_identity(process.pid)}
        # A full disk or a removed state folder must not fail a start or a
        # restart: without the record, a leftover is refused, as any holder.
        with contextlib.suppress(OSError):
            record = json.dumps(self._children_record, indent=1).encode()
            certs.replace_file(self.children_path, record, 0o644)

    def _previous_children(self) -> dict[int, str]:
        """The children the last stack on this state directory recorded
        (children_path), as pid -> identity. Read once this stack holds the
        directory: that stack's process has ended, however."""
        try:
            record = json.loads(self.children_path.read_text()).values()
            return {int(child["pid"]): str(child["identity"]) for child in record if child["identity"]}
        except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
            # Whatever is wrong with the file (a "pid" of Infinity, nesting
            # deeper than json reads: a review), there is nothing of ours to
            # end, and the ports are checked as for any other holder.
            return {}

    def _hold_state_dir(self) -> None:
        """Takes the state directory for this stack, or fails at once if
        another holds it: two `meshgate up`s started together (both past the
        port check before either bound a port) wrote their certificates,
        settings and logs into one directory, and both failed, one with
        "mesh.key_file is not the key of mesh.cert_file". The kernel ends
        the lock with the process, even one killed with SIGKILL."""
        lock = open(self.state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise RuntimeError(
                f"{self.state_dir} is in use by another `meshgate up` (pid {holder}); "
                "stop it first (Ctrl-C in its terminal), or give this one its own --state-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._state_lock = lock

    def listen_ports(self) -> dict[int, str]:
        """Every port the stack's children listen on, each with what listens there."""
        listens = {self.ports.triton: "triton"}
        if self.ports.triton_http is not None:
            listens[self.ports.triton_http] = "triton http"
        if self.external_redis_url is None:
            listens[self.ports.redis] = "redis"
        for name, port in self.replica_ports.items():
            listens[port] = name
            listens[self.replica_metrics_ports[name]] = f"{name} metrics"
        for name, port in self.replica_http_ports.items():
            listens[port] = f"{name} http"
        return listens

    def _claim_ports(self) -> None:
        """Claims every port the stack listens on, or fails before starting
        anything. Two `meshgate up`s on their own state directories with one
        set of ports both passed a check that nothing listened, then one's
        children failed to bind and crash-looped while its health checks
        passed against the other's (its services wrote to the other's
        Redis). A claim is taken at once or not at all, and held until
        stop(); in port order, so of two stacks wanting the same ports the
        first to claim the lowest they share wins them all, and the other
        fails at once. Then the ports are checked for other listeners: a
        killed stack's Triton still stopping, a system Redis. Those that
        are children of the last stack on this state directory (killed, or
        its stop failed: this one holds the directory) are stopped and
        waited for (_end_leftovers) before the ports are checked again."""
        for port, name in sorted(self.listen_ports().items()):
            claim = _claim_port(port)
            if claim is None:
                raise RuntimeError(
                    f"port {port} ({name}) is claimed by another `meshgate up`: "
                    f"{_describe_process(_claimant(port))}; stop it first (Ctrl-C in its terminal)"
                )
            self._port_claims.append(claim)
        holders = self._port_holders()
        leftovers = {pid for pid in holders.values() if pid is not None}
        if _end_leftovers(leftovers, self._previous_children()):
            holders = self._port_holders()
        taken = [
            f"{self.listen_ports()[port]} 127.0.0.1:{port} (held by {_describe_process(pid)})"
            for port, pid in holders.items()
        ]
        if taken:
            # Waiting frees a port a killed stack's Triton still holds, never
            # one a stopped process holds: the hint is not given for that.
            waiting_helps = not any(pid is not None and _stopped(pid) for pid in holders.values())
            raise RuntimeError(
                f"port(s) in use: {', '.join(taken)}."
                + (
                    " One `meshgate up` that was killed leaves its Triton up to ~10 s to exit "
                    "(--exit-timeout-secs): try again then."
                    if waiting_helps
                    else ""
                )
            )

    def _port_holders(self) -> dict[int, int | None]:
        """The ports the stack listens on that another process listens on,
        each with its pid (_listener: None where this user cannot see it)."""
        return {port: _listener(port) for port in self.listen_ports() if _listened_on(port)}

    def start_service(self, name: str) -> None:
        """Starts a service's replica ("router", "router-2", ...)."""
        service = self.service_of(name)
        env = dict(os.environ)
        if self.owns_settings:
            for variable in stack_owned_overrides(env):
                del env[variable]
        env.update(MESHGATE_CONFIG=str(self.config_path), PYTHONUNBUFFERED="1")
        env.pop("REDIS_URL", None)  # the settings file is the one source of truth here
        command = [sys.executable, "-m", f"services.{service}"]
        if name != service:
            # Another replica: the same settings file, its own ports.
            command += ["--listen", self.address(name)]
            section = f"MESHGATE_{service.upper()}__"
            env[section + "METRICS_LISTEN"] = f"127.0.0.1:{self.replica_metrics_ports[name]}"
            if service == "router":
                env[section + "HTTP_LISTEN"] = f"127.0.0.1:{self.replica_http_ports[name]}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child
        process = children.start(
            command,
            # serving.main installs its own handler; until then a reload
            # asked for must not kill it.
            ignore_hangup=True,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._started(name, process)

    def log_path(self, name: str) -> pathlib.Path:
        """Where a child's output goes ("redis", "triton", a service's replica)."""
        return self.log_dir / f"{name}.log"

    def wait_serving(self, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                log = self.log_path(name)
                # Its last lines in the error itself: in CI the log
                # directory is gone by the time anyone reads the failure.
                raise RuntimeError(
                    f"{name} exited with code {process.returncode}; see {log}; it ended:\n"
                    + children.last_lines(log, 20)
                )
            if self.ready(name):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not SERVING within {timeout_s:.0f}s")
            time.sleep(0.1)

    def stop_service(self, name: str, timeout_s: float = STOP_GRACE_S) -> int | None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        children.terminate(process)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(5)

    def stop(self) -> None:
        self.stopping = True
        try:
            # Front door first so in-flight streams drain through the services
            # behind it, then the stores and Triton last. A service's replicas
            # stop side by side: one after another, their stops (~0.5 s each
            # idle, up to 20 s draining) would add up.
            for service in ("router", "cache", "context", "inference"):
                names = self.replicas_of(service)
                with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
                    # list(): a replica's failure to stop raises here.
                    list(pool.map(self.stop_service, names))
            if "triton" in self.processes:
                triton.terminate(self.processes.pop("triton"))
            self.stop_service("redis")
        finally:
            self.stopping = False
            for channel in self._ready_channels.values():
                channel.close()
            self._ready_channels.clear()
            if self._triton_client is not None:
                self._triton_client.close()
                self._triton_client = None
            for claim in self._port_claims:
                claim.close()
            self._port_claims.clear()
            if self._state_lock is not None:
                # Closing it releases the lock.
                self._state_lock.close()
                self._state_lock = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@functools.cache
def build_model_weights() -> None:
    """Generated model files, not shipped: tiny_gpt's weights and smollm2's
    tokenizer.json (from its GGUF). Each script skips what already exists;
    once they ran, a later call does not start them again (two interpreters,
    ~0.25 s: the test suite starts some twenty Tritons and stacks)."""
    for script in ("tiny_gpt/build_weights.py", "smollm2/build_tokenizer.py"):
        path = REPO_ROOT / "model_repository" / script
        subprocess.run([sys.executable, str(path)], check=True, stdout=subprocess.DEVNULL)
