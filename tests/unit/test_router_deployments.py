"""The router's deployment table (each alias's strategy, circuits that put a
deployment last), and how a generation's responses become the answer."""

from __future__ import annotations

import grpc
import pytest

from meshgate.balancing import BreakerPolicy, BreakerState, Health
from meshgate.common.v1 import common_pb2
from meshgate.config import DeploymentSettings, ModelSettings, RouterSettings
from meshgate.errors import BUSY_RETRY_AFTER_S, MeshgateError, retry_info
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.reasons import Reason
from services.router.deployments import DeploymentTable
from services.router.downstream import Deployments
from services.router.pipeline import Answer, Budget
from tests.unit.test_balancing import Clock
from tests.unit.test_router_context_restart import busy, session_full


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

    def Generate(self, request, timeout=None, metadata=None):
        self.request = request
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
        deployments = Deployments(table, RouterSettings())
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
        deployments = Deployments(table, RouterSettings())
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


async def generated(table: DeploymentTable, answer: Answer) -> str:
    deployments = Deployments(table, RouterSettings())
    pieces = deployments.generate("m", [], common_pb2.GenerationParameters(), Budget(), answer, "")
    return "".join([piece async for piece in pieces])


async def test_a_busy_deployment_hands_the_generation_to_the_next_and_its_circuit_stays_closed():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    try:
        # As many turns as open a circuit on failures (BreakerPolicy.failures_to_open).
        for _ in range(3):
            a.stream_stub = busy_a = ScriptedGenerate([], ends_with=busy(service="inference"))
            b.stream_stub = ScriptedGenerate(hello_world())
            answer = Answer()
            assert await generated(table, answer) == "Hello world"
            assert busy_a.request is not None and answer.deployment == "b"
        # A busy replica is up: it is still tried first.
        assert [d.name for d in table.candidates("m")] == ["a", "b"]
    finally:
        await table.close()


async def test_a_busy_answer_to_a_half_open_probe_leaves_the_deployment_free_to_probe_again():
    table = DeploymentTable({"m": model("least_outstanding", "a", "b")})
    a, b = table.candidates("m")
    b.in_flight = 5  # a first
    clock = Clock()
    a.health = Health(BreakerPolicy(failures_to_open=1, open_for_s=10.0), clock)
    a.health.record_failure()
    clock.now += 10  # half-open: the next generation sent to a is its probe
    a.stream_stub = busy_a = ScriptedGenerate([], ends_with=busy(service="inference"))
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
