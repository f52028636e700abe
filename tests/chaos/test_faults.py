"""The fault suite: the whole mesh under a bounded load while Triton, Redis,
the cache and the context service are killed with SIGKILL in turn, and the
supervisor brings each back.

Per phase it tallies requests answered, failed (by status and reason),
silent short answers (a stream that ended OK without its completion, or with
less than its usage says: must be 0), acknowledged session turns missing from
the session afterwards (must be 0), and the time from the kill to the first
answer of each kind of request that started after it.

Run with `make chaos` (pytest -m chaos); it prints the table that
bench/reliability.md keeps.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import time

import grpc
import pytest

from meshgate import redis_access
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.local import triton
from meshgate.local.stack import Ports, Stack, build_model_weights, free_port
from meshgate.local.supervisor import Supervisor
from meshgate.router.v1 import router_service_pb2_grpc
from services.context.store import SessionStore
from tests import mesh_load
from tests.integration.conftest import end_triton, stop_stack
from tests.mesh import router_channel
from tests.mesh_load import Acknowledged

# Serial (make test runs it alone): kills Triton, Redis and services under load and bounds the recovery.
pytestmark = [pytest.mark.chaos, pytest.mark.serial]

KEY = "chaos-key"
AUTH = [("authorization", f"Bearer {KEY}")]
TENANT = "dev"
MODELS = ("tiny_gpt", "minilm")
# Half the workers keep a session each, half send stateless requests that
# repeat (so some are cache hits); one more streams long uncached answers,
# so that a Triton kill always finds a stream in the middle.
KINDS = ("stateless", "session") * 3 + ("long",)
MAX_TOKENS = {"session": 48, "stateless": 12, "long": 200}
# The target for being back after a kill; the assertion is looser,
# as other work shares this machine's two cores.
RECOVERY_TARGET_S = 15.0
RECOVERY_BOUND_S = 45.0
STEADY_S = 1.0
SETTLE_AFTER_RECOVERY_S = 1.0


@dataclasses.dataclass
class Phase:
    name: str
    killed_at: float | None = None
    ok: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failed_after_output: int = 0
    # A failure after output whose ErrorInfo did not say how much was delivered.
    uncounted: int = 0
    short_answers: list[str] = dataclasses.field(default_factory=list)
    # Kind of request ("session", "stateless") -> seconds from the kill to
    # the end of its first answer among those started after the kill.
    first_ok_after_kill: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def recovered_s(self) -> float | None:
        kinds = ("session", "stateless")
        if self.killed_at is None or any(k not in self.first_ok_after_kill for k in kinds):
            return None
        return max(self.first_ok_after_kill[k] for k in kinds)


class Load(mesh_load.Load):
    """The callers, tallied per phase: failures by status and reason, and
    how soon after a kill each kind of request is answered again."""

    def __init__(self, router: router_service_pb2_grpc.RouterServiceStub) -> None:
        super().__init__(router, AUTH, KINDS, MAX_TOKENS, Phase("steady"))

    def answered(self, phase: Phase, kind: str, began: float) -> None:
        if phase.killed_at is not None and began > phase.killed_at:
            phase.first_ok_after_kill.setdefault(kind, time.monotonic() - phase.killed_at)

    def failed(
        self, phase: Phase, error: grpc.aio.AioRpcError, text: str, began: float, saving: bool = False
    ) -> None:
        info = error_info(error)
        phase.failed[f"{error.code().name} {info.reason if info else '(no ErrorInfo)'}"] += 1
        if text:
            phase.failed_after_output += 1
            if info is None or info.metadata.get("delivered_chars") != str(len(text)):
                phase.uncounted += 1


@pytest.fixture(scope="module")
def spare_triton(tmp_path_factory):
    """A second Triton the inference service balances over; not supervised."""
    # This suite may run first on a clean clone: tiny_gpt's weights are built, not shipped.
    build_model_weights()
    port = free_port()
    state_dir = tmp_path_factory.mktemp("spare-triton")
    process = triton.launch(
        grpc_port=port, state_dir=state_dir, log_file=state_dir / "triton.log", models=MODELS
    )
    try:
        triton.wait_ready(f"127.0.0.1:{port}", MODELS, timeout=180, process=process)
        yield f"127.0.0.1:{port}", process
    finally:
        end_triton(process)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, spare_triton):
    ports = Ports(*(free_port() for _ in range(6)))
    urls = [f"127.0.0.1:{ports.triton}", spare_triton[0]]
    # The services read the environment over their settings file.
    saved = os.environ.get("MESHGATE_INFERENCE__TRITON_URLS")
    os.environ["MESHGATE_INFERENCE__TRITON_URLS"] = "[" + ", ".join(f'"{u}"' for u in urls) + "]"
    stack = Stack(
        tmp_path_factory.mktemp("chaos"),
        ports,
        redis_url=None,
        dev_api_key=KEY,
        tracing=False,
        log_level="warning",
        triton_models=MODELS,
    )
    try:
        stack.start()
        with Supervisor(stack) as supervisor:
            yield stack, supervisor
    finally:
        stop_stack(stack)
        if saved is None:
            os.environ.pop("MESHGATE_INFERENCE__TRITON_URLS", None)
        else:
            os.environ["MESHGATE_INFERENCE__TRITON_URLS"] = saved


async def run_phase(load: Load, name: str, kill) -> Phase:
    """Starts a phase, kills after a steady moment, and waits until both
    kinds of request are answered again (or the bound passes)."""
    phase = Phase(name)
    load.phases.append(phase)
    await asyncio.sleep(STEADY_S)
    kill()
    phase.killed_at = time.monotonic()
    while phase.recovered_s is None and time.monotonic() - phase.killed_at < RECOVERY_BOUND_S:
        await asyncio.sleep(0.1)
    await asyncio.sleep(SETTLE_AFTER_RECOVERY_S)
    return phase


async def in_rotation(stack: Stack, spare_url: str) -> None:
    """Until the inference service has both Tritons in rotation, as its
    GetBackendHealth says (its probes run every 2 s by default)."""
    request = inference_pb.GetBackendHealthRequest()
    async with router_channel(stack.address("inference"), "inference", stack.mesh_settings) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        async with asyncio.timeout(RECOVERY_BOUND_S):
            while True:
                backends = (await stub.GetBackendHealth(request, timeout=5)).backends
                if {b.address for b in backends if b.ready} >= {stack.address("triton"), spare_url}:
                    return
                await asyncio.sleep(0.1)


def sigkill(stack: Stack, name: str):
    return lambda: stack.processes[name].send_signal(signal.SIGKILL)


def table(phases: list[Phase], lost: int) -> str:
    lines = [
        "| phase | OK | failed (status reason: count) | failed after output (uncounted) "
        "| silent short answers | recovered after kill |",
        "|---|---|---|---|---|---|",
    ]
    for p in phases:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(p.failed.items())) or "0"
        recovered = (
            "-"
            if p.killed_at is None
            else (f"{p.recovered_s:.1f} s" if p.recovered_s is not None else "never")
        )
        lines.append(
            f"| {p.name} | {p.ok} | {failed} | {p.failed_after_output} ({p.uncounted}) "
            f"| {len(p.short_answers)} | {recovered} |"
        )
    lines.append(f"\nacknowledged session turns lost: {lost}")
    return "\n".join(lines)


async def lost_turns(stack: Stack, acknowledged: list[Acknowledged]) -> list[Acknowledged]:
    """Acknowledged turns whose question and answer are not side by side in
    their session, read through the context service's own store code."""
    client = redis_access.connect(stack.redis_url)
    store = SessionStore(client, ttl_s=0)
    try:
        turns_of: dict[str, list[str]] = {}
        for session_id in {a.session_id for a in acknowledged}:
            stored = await store.read(TENANT, session_id)
            turns_of[session_id] = [m.content for m in stored.turns]
    finally:
        await client.aclose()
    missing = []
    for a in acknowledged:
        turns = turns_of[a.session_id]
        pairs = set(zip(turns, turns[1:]))
        if (a.question, a.answer) not in pairs:
            missing.append(a)
    return missing


async def test_the_mesh_heals_under_load(mesh, spare_triton) -> None:
    stack, supervisor = mesh
    spare_url, spare = spare_triton
    async with grpc.aio.insecure_channel(stack.address("router")) as channel:
        load = Load(router_service_pb2_grpc.RouterServiceStub(channel))
        load.start()
        try:
            await asyncio.sleep(STEADY_S)
            one_of_two = await run_phase(load, "Triton (1 of 2)", sigkill(stack, "triton"))
            # Alone from here on: once the killed Triton is back in rotation,
            # the spare goes away gracefully, outside any phase.
            load.phases.append(Phase("(spare Triton stopping)"))
            await asyncio.to_thread(triton.wait_ready, stack.address("triton"), MODELS, 120)
            await in_rotation(stack, spare_url)
            await asyncio.to_thread(triton.terminate, spare)
            await asyncio.sleep(STEADY_S)
            await run_phase(load, "Triton (alone)", sigkill(stack, "triton"))
            await run_phase(load, "Redis", sigkill(stack, "redis"))
            await run_phase(load, "cache", sigkill(stack, "cache"))
            await run_phase(load, "context", sigkill(stack, "context"))
        finally:
            await load.stop()

    missing = await lost_turns(stack, load.acknowledged)
    phases = [p for p in load.phases if not p.name.startswith("(")]
    print("\n" + table(phases, len(missing)))
    print(f"acknowledged session turns checked: {len(load.acknowledged)}; restarts: {supervisor.restarts}")

    assert not missing, f"{len(missing)} acknowledged turns lost, e.g. {missing[0]}"
    for phase in load.phases:
        assert not phase.short_answers, f"{phase.name}: silent short answers {phase.short_answers[:3]}"
        assert phase.uncounted == 0, f"{phase.name}: failures after output without delivered counts"
        assert phase.ok > 0, f"{phase.name}: nothing answered"
    for phase in phases:
        if phase.killed_at is not None:
            assert phase.recovered_s is not None, f"{phase.name}: not answering {RECOVERY_BOUND_S:.0f} s on"
    # With another Triton, a request that had not started is never lost:
    # the only failures are streams the killed server was in the middle of.
    before_output = sum(one_of_two.failed.values()) - one_of_two.failed_after_output
    assert before_output == 0, f"requests lost with a second Triton: {dict(one_of_two.failed)}"
    # At least one restart per kill (more where a start failed and was retried),
    # and everything running at the end.
    kills = {"triton": 2, "redis": 1, "cache": 1, "context": 1}
    assert all(supervisor.restarts.get(name, 0) >= n for name, n in kills.items()), supervisor.restarts
    assert all(process.poll() is None for process in stack.processes.values())
    assert len(load.acknowledged) > 0
