"""The router's deployment table (each alias's strategy, circuits that put a
deployment last), and how a generation's responses become the answer."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from meshgate.balancing import BreakerPolicy, BreakerState, Health
from meshgate.common.v1 import common_pb2
from meshgate.config import ConfigError, DeploymentSettings, ModelSettings, RouterSettings, load_settings
from meshgate.errors import BUSY_RETRY_AFTER_S, MeshgateError, retry_info
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.mesh_auth import TenantTokens
from meshgate.reasons import Reason
from services.router.deployments import PROBES_TO_MARK_DOWN, DeploymentTable
from services.router.downstream import Deployments
from services.router.pipeline import Answer, Budget
from tests.unit.test_balancing import Clock
from tests.unit.test_router_context_restart import busy, rpc_error, session_full, unavailable


def model(strategy: str, *names: str) -> ModelSettings:
    return ModelSettings(
        routing_strategy=strategy,
        deployments=[
            DeploymentSettings(name=name, address=f"127.0.0.1:{5000 + i}") for i, name in enumerate(names)
        ],
    )


async def test_an_open_circuit_puts_a_deployment_last_until_its_probe_succeeds():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    try:
        a, b = table.candidates("m")
        a.in_flight, b.in_flight = 0, 5
        assert [d.name for d in table.candidates("m")] == ["a", "b"]
        for _ in range(3):
            a.health.record_failure()
        assert [d.name for d in table.candidates("m")] == ["b", "a"]
        assert table.candidates("unknown") == []
    finally:
        await table.close()


async def test_a_selections_embedding_goes_to_the_first_deployment_in_rotation_turning_no_strategy():
    table = DeploymentTable({"strong": model("least_outstanding", "a", "b"), "fast": model("weighted", "c")})
    a, b, c = [d for alias in ("strong", "fast") for d in table._by_alias[alias]]
    try:
        assert table.embedding_stub(("strong", "fast")) is a.stub
        # Asked for it, the rotation of ties did not turn: the next
        # generation's ranking alternates as if it had not been asked.
        firsts = []
        for _ in range(4):
            table.embedding_stub(("strong", "fast"))
            firsts.append(table.candidates("strong")[0].name)
        assert sorted(firsts) == ["a", "a", "b", "b"]
        a.health.mark_down()
        assert table.embedding_stub(("strong", "fast")) is b.stub
        b.health.mark_down()
        assert table.embedding_stub(("strong", "fast")) is c.stub
        c.health.mark_down()
        assert table.embedding_stub(("strong", "fast")) is a.stub  # none in rotation: the first
        assert table.embedding_stub(("unknown",)) is None
    finally:
        await table.close()


async def test_reconfiguring_keeps_what_a_strategy_learned_unless_it_changes():
    table = DeploymentTable({"m": model("kv_cost", "a", "b")})
    try:
        learned = table.strategy("m")
        table.reconfigure({"m": model("kv_cost", "a", "b")})
        assert table.strategy("m") is learned
        # Deployments configured as before keep their circuits too.
        first = table.candidates("m")
        table.reconfigure({"m": model("kv_cost", "a", "b")})
        assert {id(d) for d in table.candidates("m")} == {id(d) for d in first}
        table.reconfigure({"m": model("session_affinity", "a", "b")})
        assert table.strategy("m").name == "session_affinity"
    finally:
        await table.close()


def weighted(strategy: str, **weights: float) -> ModelSettings:
    return ModelSettings(
        routing_strategy=strategy,
        deployments=[
            DeploymentSettings(name=name, address=f"127.0.0.1:{5000 + i}", weight=weight)
            for i, (name, weight) in enumerate(weights.items())
        ],
    )


async def test_a_reweighted_deployment_keeps_its_open_circuit_and_its_streams_in_flight():
    """A reload that changed only a deployment's weight rebuilt it: its open
    circuit came back closed (traffic again to a deployment failing every
    call) and its streams under way no longer counted, so least_outstanding
    took it for idle and sent it every request until they ended."""
    table = DeploymentTable({"m": weighted("least_outstanding", a=1.0, b=1.0, c=1.0)})
    a, b, c = sorted(table.candidates("m"), key=lambda d: d.name)
    a.stream_stub = stuck = HangingGenerate()
    b.in_flight = c.in_flight = 5  # a first
    for _ in range(3):
        b.health.record_failure()
    turn = asyncio.create_task(generated(table, Answer()))
    try:
        await until(lambda: stuck.request is not None)
        b.in_flight = c.in_flight = 0
        table.reconfigure({"m": weighted("least_outstanding", a=1.5, b=2.0, c=1.0)})
        # a's stream counts: (1 + 1) / 1.5 against c's idle (0 + 1) / 1; b's circuit is open.
        assert [d.name for d in table.candidates("m")] == ["c", "a", "b"]
        reweighted_a, reweighted_b, _ = sorted(table.candidates("m"), key=lambda d: d.name)
        assert (reweighted_a.weight, reweighted_a.in_flight) == (1.5, 1)
        assert reweighted_b.health.state is BreakerState.OPEN
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        # The stream's end is counted on the deployment still routed to.
        assert reweighted_a.in_flight == 0
    finally:
        turn.cancel()
        await table.close()


class ScriptedGenerate:
    """An inference service's Generate call: the responses given, then its end."""

    def __init__(
        self,
        responses: list[inference_pb.GenerateResponse],
        ends_with: grpc.StatusCode | grpc.aio.AioRpcError | None = None,
    ) -> None:
        self._left = list(responses)
        self._ends_with = ends_with  # None: OK
        self._ended = False
        self.request: inference_pb.GenerateRequest | None = None
        self.timeout: float | None = None

    def Generate(self, request, timeout=None, metadata=None):
        self.request, self.timeout = request, timeout
        return self

    async def read(self):
        if self._left:
            return self._left.pop(0)
        self._ended = True
        if isinstance(self._ends_with, grpc.aio.AioRpcError):
            raise self._ends_with
        if self._ends_with is not None:
            raise grpc.aio.AioRpcError(self._ends_with, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")
        return grpc.aio.EOF

    def done(self) -> bool:
        return self._ended

    def cancel(self) -> bool:
        self._ended = True
        return True


def hello_world() -> list[inference_pb.GenerateResponse]:
    """Two deltas, then the completion with the last text (" world")."""
    return [
        inference_pb.GenerateResponse(delta=inference_pb.GenerateDelta(text="Hel")),
        inference_pb.GenerateResponse(delta=inference_pb.GenerateDelta(text="lo")),
        inference_pb.GenerateResponse(
            completion=inference_pb.GenerateCompletion(
                text=" world", finish_reason="length", usage={"prompt_tokens": 3, "completion_tokens": 4}
            )
        ),
    ]


@pytest.mark.parametrize("read_ahead", [True, False])
async def test_the_text_on_the_completion_follows_the_deltas_and_is_part_of_the_answer(read_ahead):
    table = DeploymentTable({"m": model("least_outstanding", "a")})
    (deployment,) = table.candidates("m")
    deployment.stream_stub = inference = ScriptedGenerate(hello_world())
    answer = Answer()
    try:
        deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
        pieces = [
            piece
            async for piece in deployments.generate(
                "m", [], common_pb2.GenerationParameters(), Budget(), answer, "", read_ahead
            )
        ]
    finally:
        await table.close()

    assert inference.request.completion_may_carry_text, "the router reads the completion's text"
    assert "".join(pieces) == answer.text == "Hello world"
    if not read_ahead:
        assert pieces == ["Hel", "lo", " world"]
    assert (answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == (3, 4, "length")


async def test_a_completion_from_a_deployment_that_then_failed_is_not_the_answers():
    """A first deployment's completion without text, then UNAVAILABLE before
    any piece: the next deployment answers, and the answer's finish reason,
    which marks its last piece (Generator), comes from that one only."""
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    a.stream_stub = ScriptedGenerate(
        [
            inference_pb.GenerateResponse(
                completion=inference_pb.GenerateCompletion(finish_reason="stop", usage={"prompt_tokens": 3})
            )
        ],
        ends_with=grpc.StatusCode.UNAVAILABLE,
    )
    b.stream_stub = ScriptedGenerate(hello_world())
    answer = Answer()
    try:
        deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
        seen = [
            (piece, answer.finish_reason)
            async for piece in deployments.generate(
                "m", [], common_pb2.GenerationParameters(), Budget(), answer, "", read_ahead=False
            )
        ]
    finally:
        await table.close()

    assert seen == [("Hel", ""), ("lo", ""), (" world", "length")]
    assert (answer.text, answer.deployment, answer.completion_tokens) == ("Hello world", "b", 4)


async def test_each_piece_leaves_the_counts_behind_it_on_the_answer_and_a_cut_says_them():
    """The counts the deltas carry (the prompt's on the first, the running
    completion count on each) are on the answer as each piece is yielded:
    what the turn is billed if its caller leaves there. A deadline passing
    midway (the inference call's own: its failure counts nothing) says
    the tokens behind the pieces that went out."""
    table = DeploymentTable({"m": model("least_outstanding", "a")})
    (deployment,) = table.candidates("m")
    deployment.stream_stub = ScriptedGenerate(
        [
            inference_pb.GenerateResponse(
                delta=inference_pb.GenerateDelta(text="Hel", completion_tokens=1, prompt_tokens=9)
            ),
            inference_pb.GenerateResponse(delta=inference_pb.GenerateDelta(text="lo", completion_tokens=3)),
        ],
        ends_with=grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    answer = Answer()
    seen = []
    try:
        deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
        pieces = deployments.generate(
            "m", [], common_pb2.GenerationParameters(), Budget(), answer, "", read_ahead=False
        )
        with pytest.raises(MeshgateError) as cut:
            async for piece in pieces:
                seen.append((piece, answer.prompt_tokens_read, answer.completion_tokens_so_far))
    finally:
        await table.close()

    assert seen == [("Hel", 9, 1), ("lo", 9, 3)]
    assert cut.value.metadata["delivered_deltas"] == "2"
    assert cut.value.metadata["delivered_tokens"] == "3"


async def test_the_completions_counts_are_the_answers_behind_its_text_too():
    table = DeploymentTable({"m": model("least_outstanding", "a")})
    (deployment,) = table.candidates("m")
    deployment.stream_stub = ScriptedGenerate(hello_world())
    answer = Answer()
    try:
        assert await generated(table, answer) == "Hello world"
    finally:
        await table.close()
    assert (answer.prompt_tokens_read, answer.completion_tokens_so_far) == (3, 4)


@pytest.mark.parametrize("delivered", [0, 2], ids=["before any delta", "after two deltas"])
async def test_an_inference_stream_ending_ok_without_its_completion_is_unavailable_not_an_answer(delivered):
    """An inference hop that closes its stream OK before the completion
    (a proxy between, a service stopping badly) has not answered: the turn
    fails UNAVAILABLE STREAM_ENDED_EARLY, saying what went out, never a
    short answer with no finish reason, and the deployment counts a failure
    (no test drove this guard: a review's mutant removing it passed)."""
    table = DeploymentTable({"m": model("least_outstanding", "a")})
    (deployment,) = table.candidates("m")
    deployment.stream_stub = ScriptedGenerate(hello_world()[:delivered])
    answer = Answer()
    seen = []
    try:
        with pytest.raises(MeshgateError) as cut:
            async for piece in Deployments(table, RouterSettings(), TenantTokens(None, 60.0)).generate(
                "m", [], common_pb2.GenerationParameters(), Budget(), answer, "", read_ahead=False
            ):
                seen.append(piece)
        failures = deployment.health._failures
    finally:
        await table.close()
    failure = cut.value
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.STREAM_ENDED_EARLY)
    assert failure.message == "the inference stream ended without a completion"
    assert seen == ["Hel", "lo"][:delivered] and answer.text == "" and answer.finish_reason == ""
    assert failure.metadata["deployment"] == "a"
    assert (failure.metadata["delivered_deltas"], failure.metadata["delivered_chars"]) == (
        str(delivered),
        "5" if delivered else "0",
    )
    assert failures == 1


async def generated(table: DeploymentTable, answer: Answer) -> str:
    deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
    pieces = deployments.generate("m", [], common_pb2.GenerationParameters(), Budget(), answer, "")
    return "".join([piece async for piece in pieces])


def tenants_queue_full(retry_s: float = 1.0) -> grpc.aio.AioRpcError:
    """An inference service's refusal of a generation for the tenant's full
    queue there (generation_slots.ModelSlots), asking for a retry after ``retry_s``."""
    return rpc_error(
        MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.TOO_MANY_QUEUED_GENERATIONS,
            "this tenant has its most generations (1) waiting for a slot of this model here",
            {"limit": "max_queued_generations_per_tenant", "scope": "tenant", "limit_value": "1"},
            details=[retry_info(retry_s)],
        )
    )


def inference_busy() -> grpc.aio.AioRpcError:
    return busy(service="inference")


# Refusals of a replica that is up but has no room (for anyone, or for this
# tenant): refused before any of the generation ran.
NO_ROOM = [inference_busy, tenants_queue_full]


@pytest.mark.parametrize("no_room", NO_ROOM)
async def test_a_deployment_without_room_hands_the_generation_to_the_next_and_its_circuit_stays_closed(
    no_room,
):
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    try:
        # As many turns as open a circuit on failures (BreakerPolicy.failures_to_open).
        for _ in range(3):
            a.stream_stub = busy_a = ScriptedGenerate([], ends_with=no_room())
            b.stream_stub = ScriptedGenerate(hello_world())
            answer = Answer()
            assert await generated(table, answer) == "Hello world"
            assert busy_a.request is not None and answer.deployment == "b"
        # A replica without room is up: it is still tried first.
        assert [d.name for d in table.candidates("m")] == ["a", "b"]
        assert a.health.state is BreakerState.CLOSED and a.health.success_rate() is None
    finally:
        await table.close()


@pytest.mark.parametrize("no_room", NO_ROOM)
async def test_a_prefix_is_not_believed_held_by_the_deployment_that_refused_it(no_room):
    """A deployment without room computed none of the prompt it refused:
    the next turn sharing its prefix goes where it was answered, not first
    to the refusing one on an overlap it was wrongly credited with."""
    table = DeploymentTable({"m": model("prefix_affinity", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first while neither is believed to hold the prompt
    prompt = [common_pb2.Message(role=common_pb2.ROLE_USER, content="a long shared prefix " * 20)]
    deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
    try:
        answered_by = []
        for _ in range(2):
            a.stream_stub = busy_a = ScriptedGenerate([], ends_with=no_room())
            b.stream_stub = ScriptedGenerate(hello_world())
            answer = Answer()
            pieces = deployments.generate(
                "m", prompt, common_pb2.GenerationParameters(), Budget(), answer, ""
            )
            assert "".join([piece async for piece in pieces]) == "Hello world"
            answered_by.append((busy_a.request is not None, answer.deployment))
    finally:
        await table.close()

    assert answered_by == [(True, "b"), (False, "b")]


@pytest.mark.parametrize("no_room", NO_ROOM)
async def test_a_refusal_for_want_of_room_to_a_half_open_probe_leaves_the_deployment_free_to_probe_again(
    no_room,
):
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    clock = Clock()
    a.health = Health(BreakerPolicy(failures_to_open=1, open_for_s=10.0), clock)
    a.health.record_failure()
    clock.now += 10  # half-open: the next generation sent to a is its probe
    a.stream_stub = busy_a = ScriptedGenerate([], ends_with=no_room())
    b.stream_stub = ScriptedGenerate(hello_world())
    try:
        assert await generated(table, Answer()) == "Hello world"
    finally:
        await table.close()
    assert busy_a.request is not None
    assert a.health.state is BreakerState.HALF_OPEN and a.health.admits


async def test_deployments_all_busy_are_the_routers_unavailable_with_its_own_retry_info():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    for deployment in table.candidates("m"):
        deployment.stream_stub = ScriptedGenerate([], ends_with=busy(service="inference"))
    try:
        with pytest.raises(MeshgateError) as raised:
            await generated(table, Answer())
    finally:
        await table.close()
    failure = raised.value
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.NO_DEPLOYMENT_AVAILABLE)
    assert failure.message == "no deployment of 'm' could serve: busy; retry later"
    assert failure.details == [retry_info(BUSY_RETRY_AFTER_S)]


@pytest.mark.parametrize(
    "refusals",
    [
        # The shortest wait is the caller's, wherever it came from.
        [tenants_queue_full(2.0), tenants_queue_full(0.5), tenants_queue_full(1.0)],
        # The others down or busy: the tenant's own load is what it can act on.
        [unavailable(), tenants_queue_full(0.5), inference_busy()],
    ],
)
async def test_the_tenants_queue_full_wherever_it_was_tried_is_the_callers_with_the_soonest_retry(refusals):
    table = DeploymentTable({"m": model("least_outstanding", "a", "b", "c")})
    # Tried in this order: a, b, c.
    for in_flight, (deployment, refusal) in enumerate(zip(table.candidates("m"), refusals, strict=True)):
        deployment.stream_stub = ScriptedGenerate([], ends_with=refusal)
        deployment.in_flight = in_flight
    try:
        with pytest.raises(MeshgateError) as raised:
            await generated(table, Answer())
    finally:
        await table.close()
    failure = raised.value
    assert (failure.code, failure.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.TOO_MANY_QUEUED_GENERATIONS,
    )
    assert failure.metadata["limit"] == "max_queued_generations_per_tenant"
    assert failure.details == [retry_info(0.5)]


async def test_a_full_queue_after_output_ends_the_stream_there():
    """Never another deployment once the caller has text: it would answer
    again from the start."""
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    a.stream_stub = ScriptedGenerate(hello_world()[:1], ends_with=tenants_queue_full())
    b.stream_stub = untried = ScriptedGenerate(hello_world())
    try:
        with pytest.raises(MeshgateError) as raised:
            await generated(table, Answer())
    finally:
        await table.close()
    assert raised.value.reason == Reason.TOO_MANY_QUEUED_GENERATIONS
    assert raised.value.metadata["delivered_deltas"] == "1"
    assert untried.request is None


async def test_another_resource_exhausted_from_a_deployment_is_its_answer_not_handed_on():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5
    a.stream_stub = ScriptedGenerate([], ends_with=session_full())
    b.stream_stub = untried = ScriptedGenerate(hello_world())
    try:
        with pytest.raises(MeshgateError) as raised:
            await generated(table, Answer())
    finally:
        await table.close()
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert untried.request is None


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
async def test_a_deployment_failing_inside_opens_its_circuit_though_no_turn_is_handed_on(code):
    """Its health check says SERVING, and every generation fails inside it
    (INTERNAL: its model broken in Triton; UNKNOWN: a handler that raised).
    Each such turn fails (it may have run the model: not handed on), but
    the deployment must leave rotation: counted as no failure, it kept its
    share of the turns for good."""
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first while it admits traffic
    try:
        for _ in range(a.health.policy.failures_to_open):
            a.stream_stub = ScriptedGenerate([], ends_with=code)
            b.stream_stub = untried = ScriptedGenerate(hello_world())
            with pytest.raises(MeshgateError) as raised:
                await generated(table, Answer())
            assert raised.value.code == code and untried.request is None
        assert a.health.state is BreakerState.OPEN
        assert [d.name for d in table.candidates("m")] == ["b", "a"]
    finally:
        await table.close()


class UnavailableWhenLetGo(ScriptedGenerate):
    """A Generate that fails UNAVAILABLE, before any output, once let go."""

    def __init__(self) -> None:
        super().__init__([], ends_with=grpc.StatusCode.UNAVAILABLE)
        self.let_go = asyncio.Event()

    async def read(self):
        await self.let_go.wait()
        return await super().read()


async def test_a_generation_falling_back_after_a_reload_goes_where_the_reload_routes():
    """A reload removes deployment b and adds c while a turn's first try (on
    a) is under way; a then fails before any text. The turn goes to c: it
    went to b, from the list ranked at its start, after the reload that
    removed it had been taken."""

    def routes(*names: str) -> dict[str, ModelSettings]:
        # a weighs more: tried first while all are idle.
        deployments = [
            DeploymentSettings(name=name, address=f"127.0.0.1:{5000 + i}", weight=2.0 if name == "a" else 1.0)
            for i, name in enumerate(names)
        ]
        return {"m": ModelSettings(routing_strategy="least_outstanding", deployments=deployments)}

    table = DeploymentTable(routes("a", "b"))
    a, b = table.candidates("m")
    a.stream_stub = failing = UnavailableWhenLetGo()
    b.stream_stub = removed = ScriptedGenerate(hello_world())
    answer = Answer()
    try:
        turn = asyncio.create_task(generated(table, answer))
        await until(lambda: failing.request is not None)
        table.reconfigure(routes("a", "c"))
        (c,) = [d for d in table.candidates("m") if d.name == "c"]
        c.stream_stub = ScriptedGenerate(hello_world())
        failing.let_go.set()
        assert await turn == "Hello world"
    finally:
        await table.close()
    assert answer.deployment == "c" and removed.request is None


# --- health checks of the deployments' inference services ----------------------------------


class HangingGenerate:
    """A Generate call to an inference service that stopped answering with
    its connection up: the responses given, then nothing, until cancelled
    (grpc then raises asyncio.CancelledError from the pending read)."""

    def __init__(self, responses: list[inference_pb.GenerateResponse] | None = None) -> None:
        self._left = list(responses or [])
        self._cancelled = asyncio.Event()
        self.request: inference_pb.GenerateRequest | None = None

    def Generate(self, request, timeout=None, metadata=None):
        self.request = request
        return self

    async def read(self):
        if self._left:
            return self._left.pop(0)
        await self._cancelled.wait()
        raise asyncio.CancelledError

    def done(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> bool:
        if self._cancelled.is_set():
            return False
        self._cancelled.set()
        return True


class LateUnavailable(ScriptedGenerate):
    """A Generate call that fails UNAVAILABLE ``after_s`` in, before any
    response (a Triton server dying under a request still waiting there)."""

    def __init__(self, after_s: float) -> None:
        super().__init__([], ends_with=grpc.StatusCode.UNAVAILABLE)
        self._after_s = after_s

    async def read(self):
        await asyncio.sleep(self._after_s)
        return await super().read()


def late_failures(limit_s: float, *fail_after_s: float) -> tuple[DeploymentTable, Deployments, list]:
    """Deployments "d0".. of alias "m", tried in that order, each of the
    first failing UNAVAILABLE so late, the last answering "Hello world";
    router.max_generation_s ``limit_s``. Returns their calls too."""
    names = [f"d{i}" for i in range(len(fail_after_s) + 1)]
    table = DeploymentTable({"m": model("least_outstanding", *names)})
    calls = [LateUnavailable(after_s) for after_s in fail_after_s] + [ScriptedGenerate(hello_world())]
    for order, (deployment, call) in enumerate(zip(table.candidates("m"), calls, strict=True)):
        deployment.in_flight = order  # in the order named
        deployment.stream_stub = call
    return (
        table,
        Deployments(table, RouterSettings(max_generation_s=limit_s), TenantTokens(None, 60.0)),
        calls,
    )


async def test_a_deployment_failing_late_leaves_the_next_what_is_left_of_the_generations_budget():
    """Without a caller's deadline (the HTTP edge, a gRPC caller that set
    none, a shared generation) each try got a fresh max_generation_s, so a
    turn whose deployments failed late lasted a multiple of it."""
    table, deployments, calls = late_failures(0.5, 0.2)
    answer = Answer()
    try:
        pieces = deployments.generate("m", [], common_pb2.GenerationParameters(), Budget(), answer)
        assert "".join([piece async for piece in pieces]) == "Hello world"
    finally:
        await table.close()
    assert calls[0].timeout == pytest.approx(0.5, abs=0.01)
    assert calls[1].timeout <= 0.5 - 0.2
    assert answer.deployment == "d1"


async def test_a_generation_whose_budget_is_spent_tries_no_other_deployment():
    # The first fails as the generation's time runs out: the next could only
    # fail on its deadline after starting the model's work, and is not asked.
    table, deployments, calls = late_failures(0.3, 0.295)
    answer = Answer()
    started = time.monotonic()
    try:
        pieces = deployments.generate("m", [], common_pb2.GenerationParameters(), Budget(), answer)
        with pytest.raises(MeshgateError) as failed:
            async for _ in pieces:
                pass
    finally:
        await table.close()
    assert time.monotonic() - started < 0.3 + 0.1
    assert (failed.value.code, failed.value.reason) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
    )
    assert failed.value.metadata["max_generation_s"] == "0.3"
    assert calls[1].request is None
    assert answer.text == ""


async def test_a_callers_shorter_deadline_bounds_the_generation():
    table, deployments, calls = late_failures(300.0, 0.1)
    try:
        pieces = deployments.generate("m", [], common_pb2.GenerationParameters(), Budget.of(0.4), Answer())
        assert "".join([piece async for piece in pieces]) == "Hello world"
    finally:
        await table.close()
    assert calls[0].timeout <= 0.4
    assert calls[1].timeout <= 0.4 - 0.1


class ScriptedHealth:
    """grpc.health.v1 Check answers: SERVING, NOT_SERVING, or no answer (a
    status code such as DEADLINE_EXCEEDED)."""

    def __init__(self, answer="SERVING") -> None:
        self.answer = answer
        self.checks = 0

    async def Check(self, request, timeout=None):
        self.checks += 1
        if isinstance(self.answer, grpc.StatusCode):
            raise grpc.aio.AioRpcError(self.answer, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.ServingStatus.Value(self.answer)
        )


def checked(table: DeploymentTable, deployment, answer) -> ScriptedHealth:
    """Makes ``deployment``'s inference service answer health checks so."""
    health = table._addresses[deployment.address].health = ScriptedHealth(answer)
    return health


async def check_all(table: DeploymentTable) -> None:
    """One health check of each routed inference service, as their
    schedules (DeploymentTable.watch) make in turn."""
    await asyncio.gather(*(table.probe(address) for address in table.routed_addresses()))


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0)


async def test_a_deployment_whose_checks_get_no_answer_leaves_rotation_and_its_waiting_call_moves_on():
    """Its inference service stopped with its connection up: a call sent
    there waited its whole deadline (300 s without a client deadline), and
    recorded nothing, so the circuit never opened and every other turn
    waited too. Its checks now end that call, as UNAVAILABLE before any
    text: the next deployment answers the turn."""
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    a.stream_stub = stuck = HangingGenerate()
    b.stream_stub = ScriptedGenerate(hello_world())
    checked(table, a, grpc.StatusCode.DEADLINE_EXCEEDED)
    checked(table, b, "SERVING")
    answer = Answer()
    try:
        turn = asyncio.create_task(generated(table, answer))
        await until(lambda: stuck.request is not None and len(a.calls) == 1)
        for _ in range(PROBES_TO_MARK_DOWN - 1):
            await check_all(table)
        # A check or two unanswered (a loaded service): nothing happens yet.
        assert a.health.admits and not turn.done()
        await check_all(table)
        assert await asyncio.wait_for(turn, 5) == "Hello world"
        assert answer.deployment == "b"
        assert a.health.state is BreakerState.OPEN and not a.health.admits
        b.in_flight = 5
        assert [d.name for d in table.candidates("m")] == ["b", "a"]
        assert len(a.calls) == 0
    finally:
        await table.close()


async def test_a_stream_on_a_deployment_gone_silent_ends_unavailable_not_as_a_short_answer():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5
    a.stream_stub = HangingGenerate(hello_world()[:2])  # "Hel", "lo", then silence
    b.stream_stub = untried = ScriptedGenerate(hello_world())
    checked(table, a, grpc.StatusCode.DEADLINE_EXCEEDED)
    deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
    pieces = []
    answer = Answer()
    try:

        async def consume():
            async for piece in deployments.generate(
                "m", [], common_pb2.GenerationParameters(), Budget(), answer, "", read_ahead=False
            ):
                pieces.append(piece)

        turn = asyncio.create_task(consume())
        await until(lambda: len(pieces) == 2)
        for _ in range(PROBES_TO_MARK_DOWN):
            await check_all(table)
        with pytest.raises(MeshgateError) as raised:
            await asyncio.wait_for(turn, 5)
    finally:
        await table.close()
    failure = raised.value
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert (failure.metadata["delivered_deltas"], failure.metadata["delivered_chars"]) == ("2", "5")
    assert untried.request is None, "output had gone out: no other deployment may start over"
    assert answer.text == ""


@pytest.mark.parametrize("check", ["NOT_SERVING", grpc.StatusCode.UNAVAILABLE])
async def test_a_deployment_saying_not_serving_leaves_rotation_but_its_calls_run_on(check):
    """NOT_SERVING (no Triton ready, or draining) is an answer: the service
    ends its own calls, and a draining one finishes them. So is UNAVAILABLE:
    a service draining on SIGTERM refuses new calls, its health checks
    included, while its streams run on (a bug hunt: they were cut ~4.5 s
    into its 10 s grace)."""
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5
    a.stream_stub = stuck = HangingGenerate()
    checked(table, a, check)
    try:
        turn = asyncio.create_task(generated(table, Answer()))
        await until(lambda: len(a.calls) == 1)
        for _ in range(2 * PROBES_TO_MARK_DOWN):
            await check_all(table)
        assert not a.health.admits
        assert not stuck.done() and not turn.done()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        assert stuck.done() and len(a.calls) == 0
    finally:
        await table.close()


async def test_a_deployment_answering_again_is_half_open_and_closes_on_its_first_answer():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    health = checked(table, a, grpc.StatusCode.UNAVAILABLE)
    checked(table, b, "SERVING")
    try:
        for _ in range(PROBES_TO_MARK_DOWN):
            await check_all(table)
        assert a.health.state is BreakerState.OPEN
        # Reconfigured while down: its deployments stay out, new ones included.
        table.reconfigure({"m": model("least_outstanding", "a", "b"), "n": model("weighted", "a")})
        (a_of_n,) = table.candidates("n")
        assert not a_of_n.health.admits
        health.answer = "SERVING"
        await check_all(table)
        assert a.health.state is BreakerState.HALF_OPEN and a.health.admits and a_of_n.health.admits
        b.in_flight = 5
        a.stream_stub = ScriptedGenerate(hello_world())
        answer = Answer()
        assert await generated(table, answer) == "Hello world" and answer.deployment == "a"
        assert a.health.state is BreakerState.CLOSED
    finally:
        await table.close()


async def test_a_callers_cancel_is_not_taken_for_the_checks_ending_the_call():
    """The probes and the caller may end the same call at once: the caller's
    cancel must go on, not become a retry on the next deployment."""
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5
    a.stream_stub = HangingGenerate()
    b.stream_stub = untried = ScriptedGenerate(hello_world())
    try:
        turn = asyncio.create_task(generated(table, Answer()))
        await until(lambda: len(a.calls) == 1)
        a.calls.end()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        assert untried.request is None
    finally:
        await table.close()


def test_a_negative_weight_is_refused_at_load(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('[models.m]\ndeployments = [{ name = "a", address = "h:1", model = "m", weight = -1 }]\n')
    with pytest.raises(ConfigError, match=r"models\.m\.deployments\[0\]\.weight must be zero or more"):
        load_settings(path, environ={})
    path.write_text('[models.m]\ndeployments = [{ name = "a", address = "h:1", model = "m", weight = 0 }]\n')
    assert load_settings(path, environ={}).models["m"].deployments[0].weight == 0.0


async def test_no_deployment_answering_tells_the_caller_nothing_of_their_addresses(tmp_path):
    """A deployment nobody listens at fails the call with gRPC's transport
    error, which names its address: the caller learns that no deployment
    could serve and the code, never where the mesh runs. (A unix socket
    nobody serves: the unit tier opens no IP socket.)"""
    address = f"unix:{tmp_path / 'nobody-listens.sock'}"
    table = DeploymentTable({"m": ModelSettings(deployments=[DeploymentSettings(name="a", address=address)])})
    try:
        with pytest.raises(MeshgateError) as raised:
            await generated(table, Answer())
    finally:
        await table.close()
    assert raised.value.reason == Reason.NO_DEPLOYMENT_AVAILABLE
    assert raised.value.message == "no deployment of 'm' could serve: inference call failed: UNAVAILABLE"


def half_open_deployment() -> tuple[DeploymentTable, object]:
    """A model of one deployment whose breaker a failure opened and whose
    open time has passed: the next generation sent to it is its probe."""
    table = DeploymentTable({"m": model("least_outstanding", "a")})
    (a,) = table.candidates("m")
    clock = Clock()
    a.health = Health(BreakerPolicy(failures_to_open=1, open_for_s=10.0), clock)
    a.health.record_failure()
    clock.now += 10
    return table, a


@pytest.mark.parametrize("delivered", [[], hello_world()[:1]], ids=["before any text", "after some text"])
async def test_a_half_open_probe_its_caller_cancels_frees_the_slot_at_once(delivered):
    """The caller went away (its deadline, a cancel, a cache hit overtaking
    the generation): that says nothing of the deployment's health, yet the
    probe's slot stayed taken for open_for_s (10 s), the deployment taking
    no trial meanwhile. Neither a success nor a failure: half-open still,
    free to probe again."""
    table, a = half_open_deployment()
    a.stream_stub = stuck = HangingGenerate(list(delivered))
    turn = asyncio.create_task(generated(table, Answer()))
    try:
        await until(lambda: stuck.request is not None)
        assert not a.health.admits  # the probe holds the slot while it runs
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
    finally:
        await table.close()
    assert a.health.state is BreakerState.HALF_OPEN and a.health.admits


@pytest.mark.parametrize(
    ("code", "delivered"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, []),  # the model refused the request
        (grpc.StatusCode.DEADLINE_EXCEEDED, hello_world()[:1]),  # the turn's time ran out
    ],
    ids=["refused", "deadline"],
)
async def test_a_half_open_probe_ended_by_no_fault_of_the_deployment_frees_the_slot_at_once(code, delivered):
    """A probe that ends in the request's own refusal or its time running
    out tells nothing of the deployment's health (only its own faults count
    as its failures: downstream._deployment_fault), yet held the half-open slot for open_for_s, no trial
    let in meanwhile. Half-open still, free to probe again."""
    table, a = half_open_deployment()
    a.stream_stub = ScriptedGenerate(list(delivered), ends_with=code)
    try:
        with pytest.raises(MeshgateError):
            await generated(table, Answer())
    finally:
        await table.close()
    assert a.health.state is BreakerState.HALF_OPEN and a.health.admits


async def test_a_half_open_probe_closed_after_its_first_text_frees_the_slot_at_once():
    """As a cancel: a cache hit overtaking a speculative generation closes
    the generation's stream where it gave text (GeneratorExit)."""
    table, a = half_open_deployment()
    a.stream_stub = HangingGenerate(hello_world()[:1])
    deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))
    pieces = deployments.generate("m", [], common_pb2.GenerationParameters(), Budget(), Answer(), "")
    try:
        assert await anext(pieces) == "Hel"
        assert not a.health.admits
        await pieces.aclose()
    finally:
        await table.close()
    assert a.health.state is BreakerState.HALF_OPEN and a.health.admits


class HangingStub:
    """An inference service that stopped answering with its connection up,
    for any number of calls: each Generate a HangingGenerate of its own."""

    def __init__(self) -> None:
        self.calls: list[HangingGenerate] = []

    def Generate(self, request, timeout=None, metadata=None):
        call = HangingGenerate()
        self.calls.append(call.Generate(request))
        return call


class Answering:
    """An inference service answering any number of calls hello_world()."""

    def Generate(self, request, timeout=None, metadata=None):
        return ScriptedGenerate(hello_world()).Generate(request, timeout, metadata)


async def test_calls_the_checks_ended_count_against_no_breaker_nor_ejection():
    """A review's finding: each call the health checks ended (its deployment
    silent) was recorded a failure, so once its checks answered again the
    deployment, half-open as docs/routing.md says, was ejected as an
    outlier (twelve failures among its last outcomes) for 30 s, doubling
    per repeat, and every turn went elsewhere. Those calls record no
    outcome now: the deployment takes the next turn."""
    table = DeploymentTable(
        {
            "m": ModelSettings(
                routing_strategy="weighted",
                deployments=[
                    DeploymentSettings(name="a", address="127.0.0.1:5000", weight=1000.0),
                    # Drained: only while "a" admits nothing, so that the last
                    # turn goes to "a" for certain (at weight 1 it went to "b" one
                    # time in ~1,000: a clean-clone run).
                    DeploymentSettings(name="b", address="127.0.0.1:5001", weight=0.0),
                ],
            )
        }
    )
    a, b = table.candidates("m")
    health = checked(table, a, "SERVING")
    checked(table, b, "SERVING")
    try:
        # Enough outcomes for a success rate (BreakerPolicy.min_requests).
        for _ in range(a.health.policy.min_requests):
            a.stream_stub = ScriptedGenerate(hello_world())
            answer = Answer()
            assert await generated(table, answer) == "Hello world" and answer.deployment == "a"
        a.stream_stub = silent = HangingStub()
        health.answer = grpc.StatusCode.DEADLINE_EXCEEDED
        answers = [Answer() for _ in range(12)]

        async def answered_by(answer: Answer) -> str:
            await generated(table, answer)
            return answer.deployment

        b.stream_stub = Answering()

        turns = [asyncio.create_task(answered_by(answer)) for answer in answers]
        await until(lambda: len(a.calls) == 12)
        for _ in range(PROBES_TO_MARK_DOWN):
            await check_all(table)
        assert await asyncio.wait_for(asyncio.gather(*turns), 5) == ["b"] * 12
        assert len(silent.calls) == 12
        health.answer = "SERVING"
        await check_all(table)
        assert a.health.admits and a.health.success_rate() == 1.0
        a.stream_stub = ScriptedGenerate(hello_world())
        answer = Answer()
        assert await generated(table, answer) == "Hello world" and answer.deployment == "a"
        assert not a.health.ejected and a.health.state is BreakerState.CLOSED
    finally:
        await table.close()


@pytest.mark.parametrize("ends", ["fails inside", "its caller leaves"])
async def test_a_prefix_is_not_believed_held_by_a_deployment_that_gave_no_output(ends):
    """A review's finding: the router took back its belief that a deployment
    holds a prompt only where the turn went on to the next deployment; a
    turn that failed there before any output (INTERNAL, its deadline) or
    whose caller left kept it, and the next turn sharing the prefix went
    there as if its cache held it (docs/routing.md: taken back where it
    fails or its caller leaves before the model answers)."""
    table = DeploymentTable({"m": model("prefix_affinity", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first while neither is believed to hold the prompt
    prompt = [common_pb2.Message(role=common_pb2.ROLE_USER, content="a long shared prefix " * 20)]
    deployments = Deployments(table, RouterSettings(), TenantTokens(None, 60.0))

    async def turn(answer: Answer) -> str:
        pieces = deployments.generate("m", prompt, common_pb2.GenerationParameters(), Budget(), answer, "")
        return "".join([piece async for piece in pieces])

    try:
        if ends == "fails inside":
            a.stream_stub = tried = ScriptedGenerate([], ends_with=grpc.StatusCode.INTERNAL)
            with pytest.raises(MeshgateError):
                await turn(Answer())
        else:
            a.stream_stub = tried = HangingGenerate()
            left = asyncio.create_task(turn(Answer()))
            await until(lambda: len(a.calls) == 1)
            left.cancel()
            with pytest.raises(asyncio.CancelledError):
                await left
        assert tried.request is not None
        # Now b is the less loaded: a only if it were believed to hold the prompt.
        a.in_flight, b.in_flight = 5, 0
        a.stream_stub = ScriptedGenerate(hello_world())
        b.stream_stub = ScriptedGenerate(hello_world())
        answer = Answer()
        assert await turn(answer) == "Hello world"
        assert answer.deployment == "b"
    finally:
        await table.close()
