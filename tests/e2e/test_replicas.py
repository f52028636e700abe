"""Two replicas of every service, each its own process, behind the balanced
channels of meshgate/serving.py; one replica of each service is killed with
SIGKILL in turn under load, and restarted.

What must hold: no request fails before its first delta (a replica killed
while a call was on it, or picked for it before the channel saw it go, is
retried on the other: gRPC's retry policy and transparent retry); a stream
the killed replica was in the middle of may fail, but with its delivered
counts, never as a silent short answer; every acknowledged session turn is
in its session afterwards, read through either context replica; a
restarted replica is back in rotation (it serves calls again); and any
replica serves any request: a session begun through one router continues
through the other, a cache entry stored through one cache replica is hit
through the other.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import signal
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshgate import serving
from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import error_info
from meshgate.local.stack import Ports, Stack, free_port, replica_name
from meshgate.local.supervisor import Supervisor
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from tests import mesh_load
from tests.integration.conftest import stop_stack
from tests.mesh import bounded_channel, router_channel
from tests.mesh_load import REQUEST_TIMEOUT_S

# Serial (make test runs it alone): kills a replica of each service under load.
pytestmark = [pytest.mark.e2e, pytest.mark.serial]

KEY = "replicas-key"
AUTH = [("authorization", f"Bearer {KEY}")]
TENANT = "dev"
MODELS = ("tiny_gpt", "minilm")
REPLICAS = 2
# Session turns (uncached), stateless questions that repeat (so the cache
# answers some), and one long uncached stream, so that a kill of a router or
# an inference replica finds a stream in the middle.
KINDS = ("session", "session", "stateless", "stateless", "long")
MAX_TOKENS = {"session": 24, "stateless": 12, "long": 120}
STEADY_S = 1.0
# How long a killed replica may take to be restarted, serve again and be
# picked again by the channels (generous: two shared cores).
BACK_IN_ROTATION_BOUND_S = 45.0
# Which replica of each service is killed, in this order: a first replica
# (on the service's own port) and a second one, so neither is special.
VICTIMS = ("inference-2", "context", "cache-2", "router")


@dataclasses.dataclass
class Phase:
    name: str
    # The replica killed in this phase ("" for none).
    victim: str = ""
    ok: int = 0
    # "STATUS REASON" -> count, for requests that failed before any delta
    # (must stay empty) and after some (the killed replica's own streams).
    failed_before_output: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failed_after_output: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # A failure after output that does not say what was delivered (its
    # router, alive, must put the counts in its ErrorInfo).
    uncounted: int = 0
    short_answers: list[str] = dataclasses.field(default_factory=list)
    back_in_rotation_s: float | None = None


class Load(mesh_load.Load):
    """The callers, through one round_robin channel over both routers;
    failures are tallied apart before and after the first delta."""

    def __init__(self, router: router_service_pb2_grpc.RouterServiceStub) -> None:
        super().__init__(router, AUTH, KINDS, MAX_TOKENS, Phase("steady"))
        # When (monotonic) a router replica was killed.
        self.router_kills: list[float] = []

    def failed(
        self, phase: Phase, error: grpc.aio.AioRpcError, text: str, began: float, saving: bool = False
    ) -> None:
        info = error_info(error)
        key = f"{error.code().name} {info.reason if info else '(no ErrorInfo)'}: {error.details()[:120]}"
        router_killed = (
            info is None
            and error.code() == grpc.StatusCode.UNAVAILABLE
            and any(killed_at > began for killed_at in self.router_kills)
        )
        if not text and saving and router_killed:
            # A session turn its router committed (SAVING_METADATA: no
            # channel may resend it, it may be stored) and was killed
            # before its one-piece answer went out: the client was told
            # it may be stored, and the lost-turns check below reads
            # sessions for what was acknowledged (once a flake of CI).
            phase.failed_after_output[key] += 1
            return
        if not text:
            phase.failed_before_output[key] += 1
            return
        phase.failed_after_output[key] += 1
        if router_killed:
            # A router was killed while this stream ran (it may have begun
            # in the phase before, a long stream on a busy machine): nobody
            # is left to count what was delivered, and the caller holds it
            # (a transport failure, never an OK end).
            return
        if info is None or info.metadata.get("delivered_chars") != str(len(text)):
            phase.uncounted += 1


def served_calls(stack: Stack, name: str) -> int:
    """Calls replica ``name`` has finished since it started, health checks
    left out, from its Prometheus endpoint."""
    url = f"http://127.0.0.1:{stack.replica_metrics_ports[name]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "meshgate_rpc_requests"
            for sample in family.samples
            if sample.name == "meshgate_rpc_requests_total" and "Health" not in sample.labels["method"]
        )
    )


async def back_in_rotation(stack: Stack, name: str, killed: object, since: float) -> float:
    """Seconds from the kill until the restarted replica has served a call."""
    while time.monotonic() - since < BACK_IN_ROTATION_BOUND_S:
        process = stack.processes.get(name)
        if process is not None and process is not killed and process.poll() is None:
            try:
                if await asyncio.to_thread(served_calls, stack, name) > 0:
                    return time.monotonic() - since
            except OSError:
                pass  # not listening yet
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} not serving calls again {BACK_IN_ROTATION_BOUND_S:.0f} s after its kill")


def table(phases: list[Phase], lost: int) -> str:
    lines = [
        "| phase | OK | failed before output | failed after output (uncounted) "
        "| silent short answers | back in rotation |",
        "|---|---|---|---|---|---|",
    ]
    for p in phases:
        before = ", ".join(f"{k}: {v}" for k, v in sorted(p.failed_before_output.items())) or "0"
        after = ", ".join(f"{k}: {v}" for k, v in sorted(p.failed_after_output.items())) or "0"
        back = "-" if p.back_in_rotation_s is None else f"{p.back_in_rotation_s:.1f} s"
        lines.append(
            f"| {p.name} | {p.ok} | {before} | {after} ({p.uncounted}) | {len(p.short_answers)} | {back} |"
        )
    lines.append(f"\nacknowledged session turns lost: {lost}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    stack = Stack(
        tmp_path_factory.mktemp("replicas"),
        Ports(*(free_port() for _ in range(6))),
        dev_api_key=KEY,
        tracing=False,
        log_level="warning",
        triton_models=MODELS,
        replicas=REPLICAS,
    )
    try:
        stack.start()
        with Supervisor(stack) as supervisor:
            yield stack, supervisor
    finally:
        stop_stack(stack)


def user(text: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=text)


async def chat(router, request: pb.ChatRequest) -> tuple[str, pb.ChatCompletion]:
    text, completion = "", None
    async for response in router.Chat(request, metadata=AUTH, timeout=REQUEST_TIMEOUT_S):
        if response.HasField("delta"):
            text += response.delta.text
        else:
            completion = response.completion
    assert completion is not None
    return text, completion


async def session_messages(stack: Stack, context_replica: str, session_id: str) -> list[str]:
    async with router_channel(stack.address(context_replica), "context", stack.mesh_settings) as channel:
        stub = context_service_pb2_grpc.ContextServiceStub(channel)
        answer = await stub.GetSession(
            context_pb.GetSessionRequest(tenant_id=TENANT, session_id=session_id), timeout=REQUEST_TIMEOUT_S
        )
    return [m.content for m in answer.session.messages]


async def test_every_service_has_two_replicas_and_survives_losing_one(mesh) -> None:
    stack, supervisor = mesh
    async with serving.client_channel(stack.addresses("router")) as channel:
        load = Load(router_service_pb2_grpc.RouterServiceStub(channel))
        load.start()
        try:
            await asyncio.sleep(STEADY_S)
            for victim in VICTIMS:
                phase = Phase(f"kill {victim}", victim)
                load.phases.append(phase)
                await asyncio.sleep(STEADY_S)
                killed = stack.processes[victim]
                if victim.startswith("router"):
                    load.router_kills.append(time.monotonic())
                killed.send_signal(signal.SIGKILL)
                phase.back_in_rotation_s = await back_in_rotation(stack, victim, killed, time.monotonic())
        finally:
            await load.stop()

    # Every acknowledged turn, read through one context replica or the other.
    turns_of: dict[str, list[str]] = {}
    for i, session_id in enumerate(sorted({a.session_id for a in load.acknowledged})):
        turns_of[session_id] = await session_messages(
            stack, replica_name("context", i % REPLICAS), session_id
        )
    # A turn is its question and answer, appended together.
    pairs_of = {sid: set(zip(messages[::2], messages[1::2])) for sid, messages in turns_of.items()}
    lost = [a for a in load.acknowledged if (a.question, a.answer) not in pairs_of[a.session_id]]
    print("\n" + table(load.phases, len(lost)))
    print(f"acknowledged session turns checked: {len(load.acknowledged)}; restarts: {supervisor.restarts}")

    assert len(load.acknowledged) > 0
    assert not lost, f"{len(lost)} acknowledged turns lost, e.g. {lost[0]}"
    for phase in load.phases:
        assert not phase.failed_before_output, (
            f"{phase.name}: failed before output {dict(phase.failed_before_output)}"
        )
        assert not phase.short_answers, f"{phase.name}: silent short answers {phase.short_answers[:3]}"
        assert phase.uncounted == 0, f"{phase.name}: failures after output without delivered counts"
        assert phase.ok > 0, f"{phase.name}: nothing answered"
    assert all(supervisor.restarts.get(victim, 0) >= 1 for victim in VICTIMS), supervisor.restarts
    # Both replicas of every service took part, the restarted ones included.
    for name in stack.replica_ports:
        assert stack.processes[name].poll() is None, f"{name} is not running"
        assert served_calls(stack, name) > 0, f"{name} served nothing"


async def test_any_replica_serves_any_request(mesh) -> None:
    stack, _ = mesh
    first, second = (stack.address(replica_name("router", i)) for i in range(REPLICAS))
    # A session begun through one router continues through the other.
    async with bounded_channel(first) as a, bounded_channel(second) as b:
        router_a = router_service_pb2_grpc.RouterServiceStub(a)
        router_b = router_service_pb2_grpc.RouterServiceStub(b)
        session_id = (
            await router_a.CreateSession(pb.CreateSessionRequest(), metadata=AUTH, timeout=30)
        ).session_id
        request = pb.ChatRequest(model="tiny-gpt", session_id=session_id, cache_policy=pb.CACHE_POLICY_BYPASS)
        request.parameters.max_tokens = 8
        request.messages.append(user("My name is Ada. Through router A."))
        answer_a, completion_a = await chat(router_a, request)
        del request.messages[:]
        request.messages.append(user("What is my name? Through router B."))
        answer_b, completion_b = await chat(router_b, request)
    assert (completion_a.session_version, completion_b.session_version) == (1, 2)
    expected = ["My name is Ada. Through router A.", answer_a, "What is my name? Through router B.", answer_b]
    for index in range(REPLICAS):
        assert await session_messages(stack, replica_name("context", index), session_id) == expected

    # A cache entry stored through one cache replica is hit through the other.
    scope = cache_pb.CacheScope(
        tenant_id=TENANT, model="tiny-gpt", parameters=common_pb2.GenerationParameters(max_tokens=8)
    )
    question = [user(f"which replica stored this? {time.time_ns()}")]
    stored = cache_pb.CachedAnswer(
        text="the first", usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=2), finish_reason="stop"
    )
    async with router_channel(stack.address("cache"), "cache", stack.mesh_settings) as one:
        await cache_service_pb2_grpc.CacheServiceStub(one).Store(
            cache_pb.StoreRequest(scope=scope, messages=question, answer=stored), timeout=30
        )
    async with router_channel(stack.address("cache-2"), "cache", stack.mesh_settings) as two:
        hit = await cache_service_pb2_grpc.CacheServiceStub(two).Lookup(
            cache_pb.LookupRequest(scope=scope, messages=question, semantic=True), timeout=30
        )
    assert hit.status == cache_pb.LOOKUP_STATUS_EXACT_HIT
    assert hit.answer.text == "the first"
