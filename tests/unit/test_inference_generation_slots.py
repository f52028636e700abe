"""The inference service's fair shares of a model's generation slots
(services/inference/generation_slots.py): freed slots go to the tenants
with generations waiting in turn, background work only when no tenant
waits and within its share, and a wait ends with its caller's deadline or
cancellation without losing a slot."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry, generate_latest
from tritonclient.grpc import service_pb2

from meshgate import metrics
from meshgate.common.v1 import common_pb2
from meshgate.config import InferenceSettings
from meshgate.errors import MeshgateError, from_rpc_error
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.reasons import Reason
from services.inference.backends import BackendPool
from services.inference.generation_slots import BACKGROUND, ModelSlots
from services.inference.servicer import InferenceServicer
from services.router.http_edge import http_error
from tests.unit.test_inference_embed import FakeContext


def slots(capacity: int | None, max_queued: int = 16) -> ModelSlots:
    model = ModelSlots("tiny_gpt", max_queued)
    model.set_capacity(capacity)
    return model


async def take(model: ModelSlots, tenant, timeout_s: float | None = None) -> None:
    if not model.try_take(tenant):
        await model.wait(tenant, timeout_s)


class Waiters:
    """Generations waiting for a slot, in the order they are granted."""

    def __init__(self, model: ModelSlots) -> None:
        self.model = model
        self.granted: list[str] = []
        self.tasks: list[asyncio.Task] = []

    async def add(self, tenant, label: str) -> asyncio.Task:
        async def wait() -> None:
            await take(self.model, tenant)
            self.granted.append(label)

        task = asyncio.create_task(wait())
        self.tasks.append(task)
        await asyncio.sleep(0)  # queued now, in this order
        return task

    async def settle(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)


def test_an_uncontended_generation_takes_a_slot_at_once_and_gives_it_back() -> None:
    model = slots(2)
    assert model.try_take("a") and model.try_take("b")
    assert model.active == 2
    assert not model.try_take("c")
    model.give_back("a")
    model.give_back("b")
    assert model.active == 0


def test_without_a_known_capacity_nothing_is_bounded_but_all_is_counted() -> None:
    model = slots(None)
    assert all(model.try_take("a") for _ in range(100))
    assert model.try_take(BACKGROUND)
    # The count, once known, sees the generations already running.
    model.set_capacity(100)
    assert model.active == 101 and model.background_active == 1
    assert not model.try_take("b")
    model.give_back("a")
    model.give_back(BACKGROUND)
    assert model.try_take("b")


async def test_freed_slots_go_to_the_waiting_tenants_in_turn_not_first_come() -> None:
    model = slots(2)
    assert model.try_take("a") and model.try_take("a")
    waiters = Waiters(model)
    for i in range(4):
        await waiters.add("a", f"a{i}")
    await waiters.add("b", "b0")
    await waiters.add("c", "c0")
    await waiters.add("b", "b1")
    # Each slot freed goes to the next tenant in turn: b's first request
    # waits for one of a's, not for a's whole queue.
    for _ in range(7):
        model.give_back("a")
        await waiters.settle()
    assert waiters.granted == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert model.active == 2


async def test_a_new_tenant_does_not_take_a_slot_ahead_of_those_waiting() -> None:
    model = slots(1)
    assert model.try_take("a")
    waiters = Waiters(model)
    await waiters.add("a", "a0")
    model.give_back("a")  # granted to a0, not left free for whoever comes next
    assert not model.try_take("b")
    await waiters.settle()
    assert waiters.granted == ["a0"]


async def test_background_work_waits_while_any_tenant_waits() -> None:
    model = slots(4)
    for _ in range(4):
        assert model.try_take("a")
    waiters = Waiters(model)
    await waiters.add(BACKGROUND, "summary")
    await waiters.add("a", "a0")
    await waiters.add("b", "b0")
    model.give_back("a")
    model.give_back("a")
    await waiters.settle()
    assert waiters.granted == ["a0", "b0"]
    model.give_back("a")
    await waiters.settle()
    assert waiters.granted == ["a0", "b0", "summary"]


async def test_background_work_holds_at_most_a_quarter_of_the_slots() -> None:
    model = slots(8)
    assert model.try_take(BACKGROUND) and model.try_take(BACKGROUND)
    # Six slots free, but background work is at its share (8 // 4 = 2).
    assert not model.try_take(BACKGROUND)
    waiters = Waiters(model)
    await waiters.add(BACKGROUND, "summary")
    assert model.try_take("a")  # a tenant is not held back by background work waiting
    await waiters.settle()
    assert waiters.granted == []
    model.give_back(BACKGROUND)
    await waiters.settle()
    assert waiters.granted == ["summary"]
    assert model.background_active == 2


async def test_background_work_waiting_past_a_models_capacity_of_tenant_grants_takes_the_next() -> None:
    # Without aging, a summary waited while any tenant did: its whole
    # summary_timeout_s under steady load.
    model = slots(4)
    for _ in range(4):
        assert model.try_take("a")
    waiters = Waiters(model)
    await waiters.add(BACKGROUND, "summary")
    for i in range(6):
        await waiters.add("a", f"a{i}")
        await waiters.add("b", f"b{i}")
    for _ in range(6):
        model.give_back("a")
        await waiters.settle()
    # Four tenant grants (the model's capacity) went by; the fifth slot is the summary's.
    assert waiters.granted == ["a0", "b0", "a1", "b1", "summary", "a2"]
    for task in waiters.tasks:
        task.cancel()
    await waiters.settle()


async def test_aged_background_work_still_holds_no_more_than_its_share() -> None:
    model = slots(4)
    assert model.try_take(BACKGROUND)  # its share of 4 slots: one
    for _ in range(3):
        assert model.try_take("a")
    waiters = Waiters(model)
    await waiters.add(BACKGROUND, "summary")
    for i in range(6):
        await waiters.add("a", f"a{i}")
    for _ in range(6):
        model.give_back("a")
        await waiters.settle()
    assert "summary" not in waiters.granted and model.background_active == 1
    # Its share freed, the aged summary takes the next slot, ahead of a's.
    model.give_back(BACKGROUND)
    await waiters.settle()
    assert waiters.granted[-1] == "summary"
    for task in waiters.tasks:
        task.cancel()
    await waiters.settle()


async def test_a_generation_naming_no_tenant_waits_as_background_work_whatever_its_flag() -> None:
    """It passed the mesh guard with no router's token: as a tenant, any
    mesh peer could queue ahead of background work and take a turn in
    every round."""
    settings = InferenceSettings(triton_urls=["127.0.0.1:1"])
    pool = BackendPool(settings.triton_urls, ["tiny_gpt", settings.embedding_triton_model])
    try:
        servicer = InferenceServicer(settings, pool)
        model = servicer.generation_slots["tiny_gpt"]
        model.set_capacity(4)
        assert model.try_take(BACKGROUND)  # background work at its share: one of four

        def generate(tenant_id: str) -> pb.GenerateRequest:
            return pb.GenerateRequest(
                model="tiny-gpt",
                messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Hello")],
                tenant_id=tenant_id,
            )

        async def refusal(request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(MeshgateError) as refused:
                async for _ in servicer.Generate(request, FakeContext(0.05)):
                    pass
            return refused.value.code, refused.value.reason

        # Waits behind background work's share until its deadline.
        assert await refusal(generate("")) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)
        # A tenant's is admitted (and finds no server ready here).
        assert await refusal(generate("acme")) == (grpc.StatusCode.UNAVAILABLE, Reason.NO_READY_BACKEND)
        assert model.active == 1 and model.queued == 0
    finally:
        await pool.close()


def test_a_model_of_few_slots_still_lets_background_work_run_one() -> None:
    model = slots(2)
    assert model.try_take(BACKGROUND)
    assert not model.try_take(BACKGROUND)


async def test_a_wait_ends_at_the_deadline_and_leaves_the_queue() -> None:
    model = slots(1)
    assert model.try_take("a")
    with pytest.raises(MeshgateError) as refused:
        await take(model, "b", timeout_s=0.02)
    assert refused.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert refused.value.reason == Reason.DEADLINE_EXCEEDED
    assert model.queued == 0
    model.give_back("a")
    assert model.active == 0 and model.try_take("c")


async def test_a_cancelled_wait_leaves_the_queue_and_the_next_is_granted() -> None:
    model = slots(1)
    assert model.try_take("a")
    waiters = Waiters(model)
    leaving = await waiters.add("b", "b0")
    await waiters.add("c", "c0")
    leaving.cancel()
    await waiters.settle()
    assert model.queued == 1
    model.give_back("a")
    await waiters.settle()
    assert waiters.granted == ["c0"]
    assert model.active == 1


async def test_a_caller_leaving_as_its_slot_is_granted_hands_the_slot_on() -> None:
    model = slots(1)
    assert model.try_take("a")
    waiters = Waiters(model)
    leaving = await waiters.add("b", "b0")
    await waiters.add("c", "c0")
    # The slot is granted to b0 and, before b0's task runs again, its caller leaves.
    model.give_back("a")
    leaving.cancel()
    await waiters.settle()
    assert leaving.cancelled()
    assert waiters.granted == ["c0"]
    assert model.active == 1


async def test_a_tenant_with_its_most_queued_is_refused_others_are_not() -> None:
    model = slots(1, max_queued=2)
    assert model.try_take("a")
    waiters = Waiters(model)
    await waiters.add("a", "a0")
    await waiters.add("a", "a1")
    with pytest.raises(MeshgateError) as refused:
        await take(model, "a")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == Reason.TOO_MANY_QUEUED_GENERATIONS
    assert refused.value.metadata["limit_value"] == "2"
    # The router passes it on to public callers: no internal model name.
    assert "model" not in refused.value.metadata and "tiny_gpt" not in refused.value.message
    assert any(isinstance(d, error_details_pb2.RetryInfo) for d in refused.value.details)
    await waiters.add("b", "b0")  # another tenant's queue is its own
    assert model.queued == 3
    for task in waiters.tasks:
        task.cancel()
    await waiters.settle()
    assert model.queued == 0


async def test_a_full_queue_reaches_a_public_caller_with_when_to_retry_and_no_internal_name() -> None:
    """Through the router (from_rpc_error, which keeps other refusals'
    RetryInfo behind) to the HTTP edge: a 429 with Retry-After."""
    model = slots(1, max_queued=1)
    assert model.try_take("a")
    waiting = asyncio.ensure_future(take(model, "a"))
    await asyncio.sleep(0)
    with pytest.raises(MeshgateError) as refused:
        await take(model, "a")
    waiting.cancel()
    status = refused.value.to_status_proto()
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    passed_on = from_rpc_error(
        grpc.aio.AioRpcError(refused.value.code, grpc.aio.Metadata(), trailing, status.message), "inference"
    )
    assert passed_on.reason == Reason.TOO_MANY_QUEUED_GENERATIONS
    code, headers, body = http_error(passed_on)
    assert code == 429 and (b"retry-after", b"1") in headers
    assert b"tiny_gpt" not in body


async def test_more_capacity_grants_those_waiting() -> None:
    model = slots(1)
    assert model.try_take("a")
    waiters = Waiters(model)
    await waiters.add("a", "a0")
    await waiters.add("b", "b0")
    model.set_capacity(3)
    await waiters.settle()
    assert sorted(waiters.granted) == ["a0", "b0"]
    assert model.active == 3


def _config(**parameters: str) -> service_pb2.ModelConfigResponse:
    response = service_pb2.ModelConfigResponse()
    for key, value in parameters.items():
        response.config.parameters[key].string_value = value
    return response


async def test_a_models_slots_are_what_its_config_says_summed_over_the_servers_it_goes_to() -> None:
    # Async: BackendPool opens grpc.aio channels, which need a running loop.
    pool = BackendPool(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], ["tiny_gpt"])
    try:
        first, second, third = pool.backends
        first._read_generation_slots("tiny_gpt", _config(max_active_sequences="16").config)
        second._read_generation_slots("tiny_gpt", _config(max_active_sequences="8").config)
        # vLLM's config says nothing: no count, and so no bound from it.
        third._read_generation_slots("tiny_gpt", _config().config)
        first.ready_models.add("tiny_gpt")
        assert pool.generation_slots("tiny_gpt") == 16
        second.ready_models.add("tiny_gpt")
        assert pool.generation_slots("tiny_gpt") == 24
        # A setting counts per server with the model ready.
        assert pool.generation_slots("tiny_gpt", per_server=4) == 8
        assert pool.generation_slots("smollm2") == 0
        # A server without a count makes the whole unknown: the sum of the
        # others under-admitted the fleet. A setting still applies.
        third.ready_models.add("tiny_gpt")
        assert pool.generation_slots("tiny_gpt") is None
        assert pool.generation_slots("tiny_gpt", per_server=4) == 12
    finally:
        await pool.close()


async def test_a_server_the_balancer_does_not_send_to_adds_no_slots() -> None:
    """Counted, a server whose breaker is open let its slots' worth of
    generations into the other's: fairness failed as a server did."""
    pool = BackendPool(["127.0.0.1:1", "127.0.0.1:2"], ["tiny_gpt"])
    try:
        failing, answering = pool.backends
        for backend in pool.backends:
            backend._read_generation_slots("tiny_gpt", _config(max_active_sequences="16").config)
            backend.ready_models.add("tiny_gpt")
        for _ in range(failing.health.policy.failures_to_open):
            failing.health.record_failure()
        assert pool.generation_slots("tiny_gpt") == 16
        answering.health.ejected_until = float("inf")
        # Neither admits: choose() falls back to both, and both count.
        assert pool.generation_slots("tiny_gpt") == 32
    finally:
        await pool.close()


async def test_a_fleet_of_unknown_slots_is_counted_unbounded() -> None:
    settings = InferenceSettings(triton_urls=["127.0.0.1:1", "127.0.0.1:2"])
    pool = BackendPool(settings.triton_urls, ["tiny_gpt", settings.embedding_triton_model])
    try:
        servicer = InferenceServicer(settings, pool)
        counted, uncounted = pool.backends
        counted._read_generation_slots("tiny_gpt", _config(max_active_sequences="16").config)
        counted.ready_models.add("tiny_gpt")
        servicer.count_generation_slots()
        assert servicer.generation_slots["tiny_gpt"].capacity == 16
        uncounted.ready_models.add("tiny_gpt")
        servicer.count_generation_slots()
        assert servicer.generation_slots["tiny_gpt"].capacity is None
    finally:
        await pool.close()


async def test_the_slots_are_exported_for_an_operator() -> None:
    """Full slots with generations queued is where another tenant waits:
    the gauges say so per model at scrape time."""
    slots = ModelSlots("tiny_gpt", max_queued_per_tenant=4)
    slots.set_capacity(1)
    assert slots.try_take("a")
    waiting = asyncio.ensure_future(slots.wait("b", None))
    await asyncio.sleep(0)
    registry = CollectorRegistry()
    registry.register(metrics.BackendCollector(None, {"tiny_gpt": slots}))
    text = generate_latest(registry).decode()
    assert 'meshgate_inference_generation_slots{model="tiny_gpt"} 1.0' in text
    assert 'meshgate_inference_generation_slots_in_use{model="tiny_gpt"} 1.0' in text
    assert 'meshgate_inference_generations_queued{model="tiny_gpt"} 1.0' in text
    slots.give_back("a")
    await waiting
    text = generate_latest(registry).decode()
    assert 'meshgate_inference_generations_queued{model="tiny_gpt"} 0.0' in text
