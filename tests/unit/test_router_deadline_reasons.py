"""The caller's own time running out during a call to another service is
DEADLINE_EXCEEDED with the reason DEADLINE_EXCEEDED, as when it runs out
before a try: a context or cache call cut by the caller's deadline, a
generation's try cut by its budget (the caller's deadline or
router.max_generation_s). A call that ran past its own cap
(router.downstream_timeout_s) with the caller's time left is still that
service's failure, DOWNSTREAM_FAILED, and a service's own status keeps its
reason. (Through a real router: tests/integration/test_router_deadline_reasons.py.)"""

from __future__ import annotations

import asyncio
import types

import grpc
import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import RouterSettings
from meshgate.errors import MeshgateError
from meshgate.mesh_auth import TenantTokens
from meshgate.reasons import Reason
from services.router import downstream
from services.router.auth import Tenant
from services.router.deployments import DeploymentTable
from services.router.pipeline import Answer, Budget
from tests.unit.test_router_context_restart import rpc_error
from tests.unit.test_router_deployments import ScriptedGenerate, hello_world, model

TENANT = Tenant("t1", frozenset({"*"}))


def deadline_exceeded() -> grpc.aio.AioRpcError:
    """What gRPC raises when a call's own timeout passes: no ErrorInfo."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded"
    )


async def times_out(request, timeout=None, metadata=None):
    """A unary call to a service that never answers: it ends on its timeout."""
    await asyncio.sleep(timeout)
    raise deadline_exceeded()


def context_service(downstream_timeout_s: float) -> downstream.ContextService:
    stub = types.SimpleNamespace(CreateSession=times_out, AssembleContext=times_out, AppendTurns=times_out)
    settings = RouterSettings(downstream_timeout_s=downstream_timeout_s)
    return downstream.ContextService(stub, TenantTokens(None, 60), settings)


async def test_a_callers_deadline_spent_during_a_context_call_is_deadline_exceeded():
    context = context_service(downstream_timeout_s=10.0)
    with pytest.raises(MeshgateError) as raised:
        await context.create_session(TENANT, Budget.of(0.05))
    failure = raised.value
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)
    assert failure.metadata == {"service": "context"}


@pytest.mark.parametrize("budget_s", [10.0, None], ids=["caller's time left", "no deadline"])
async def test_a_context_call_past_its_own_cap_stays_downstream_failed(budget_s):
    context = context_service(downstream_timeout_s=0.05)
    with pytest.raises(MeshgateError) as raised:
        await context.create_session(TENANT, Budget.of(budget_s))
    failure = raised.value
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DOWNSTREAM_FAILED)
    assert failure.metadata == {"service": "context", "code": "DEADLINE_EXCEEDED"}


async def test_a_services_own_deadline_status_keeps_its_reason_when_the_callers_time_is_spent():
    own = MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.REDIS_UNAVAILABLE, "redis timed out")
    failure = downstream.failure_within(rpc_error(own), "context", Budget.of(0.0))
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.REDIS_UNAVAILABLE)


def test_a_services_deadline_status_racing_our_timer_is_the_callers_time_spent():
    """The inference service noticed the deadline the router gave it before
    the router's own timer did, and answered DEADLINE_EXCEEDED with its
    reason: the same time spent, said as the router's timer says it (once
    the 504 over HTTP carried the service's empty metadata)."""
    own = MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, "the deadline passed")
    failure = downstream.failure_within(
        rpc_error(own), "inference", Budget.of(0.0), "spent", max_generation_s="1.5"
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)
    assert failure.metadata == {"service": "inference", "max_generation_s": "1.5"}
    assert failure.message == "spent"


class TimesOutAfter(ScriptedGenerate):
    """A Generate call that sends ``responses``, then nothing until its
    timeout passes, which ends it as gRPC does."""

    async def read(self):
        if self._left:
            return self._left.pop(0)
        await asyncio.sleep(self.timeout)
        self._ended = True
        raise deadline_exceeded()


async def generate(call, limit_s: float, budget: Budget) -> tuple[list[str], MeshgateError]:
    table = DeploymentTable({"m": model("least_outstanding", "d0")})
    (deployment,) = table.candidates("m")
    deployment.stream_stub = call
    deployments = downstream.Deployments(
        table, RouterSettings(max_generation_s=limit_s), TenantTokens(None, 60)
    )
    pieces = []
    try:
        with pytest.raises(MeshgateError) as raised:
            async for piece in deployments.generate(
                "m", [], common_pb2.GenerationParameters(), budget, Answer()
            ):
                pieces.append(piece)
    finally:
        await table.close()
    return pieces, raised.value


@pytest.mark.parametrize(
    ("limit_s", "budget_s"), [(0.1, None), (10.0, 0.1)], ids=["max_generation_s", "caller's deadline"]
)
async def test_a_generations_budget_spent_during_its_try_is_deadline_exceeded(limit_s, budget_s):
    """max_generation_s is named where it, not the caller's deadline, ran
    out: a caller's own 0.5 s was reported with max_generation_s 300, and
    the caller could not tell which it had met (a review)."""
    # "Hel" and "lo" reached the caller (as one piece) before the time ran out.
    pieces, failure = await generate(TimesOutAfter(hello_world()[:2]), limit_s, Budget.of(budget_s))
    assert pieces == ["Hello"]
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)
    limit = {"max_generation_s": f"{limit_s:g}"} if budget_s is None else {}
    assert failure.metadata == {
        "service": "inference",
        **limit,
        "delivered_deltas": "1",
        "delivered_chars": "5",
    }
    # It answered, and was cut midway: not "before a deployment answered".
    assert failure.message.endswith("passed before the answer was complete"), failure.message
    _, before_any = await generate(TimesOutAfter([]), limit_s, Budget.of(budget_s))
    assert before_any.message.endswith("passed before a deployment answered"), before_any.message


async def test_a_deadline_status_with_the_generations_time_left_stays_downstream_failed():
    """Not our timer's: a foreign hop between (a proxy) said so, early."""
    call = ScriptedGenerate([], ends_with=grpc.StatusCode.DEADLINE_EXCEEDED)
    _, failure = await generate(call, 10.0, Budget())
    assert (failure.code, failure.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DOWNSTREAM_FAILED)
