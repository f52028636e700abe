"""The inference service's fair shares of a model's generation slots
(services/inference/generation_slots.py): freed slots go to the tenants
with generations waiting in turn, background work only when no tenant
waits and within its share, and a wait ends with its caller's deadline or
cancellation without losing a slot."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from tritonclient.grpc import service_pb2

from meshgate import metrics
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.inference.backends import BackendPool
from services.inference.generation_slots import BACKGROUND, ModelSlots


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
    assert refused.value.metadata["model"] == "tiny_gpt"
    await waiters.add("b", "b0")  # another tenant's queue is its own
    assert model.queued == 3
    for task in waiters.tasks:
        task.cancel()
    await waiters.settle()
    assert model.queued == 0


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


async def test_a_models_slots_are_what_its_config_says_summed_over_the_servers_with_it_ready() -> None:
    # Async: BackendPool opens grpc.aio channels, which need a running loop.
    pool = BackendPool(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], ["tiny_gpt"])
    first, second, third = pool.backends
    first._read_generation_slots("tiny_gpt", _config(max_active_sequences="16").config)
    second._read_generation_slots("tiny_gpt", _config(max_active_sequences="8").config)
    # vLLM's config says nothing: no count, and so no bound from it.
    third._read_generation_slots("tiny_gpt", _config().config)
    first.ready_models.add("tiny_gpt")
    third.ready_models.add("tiny_gpt")
    assert pool.generation_slots("tiny_gpt") == 16
    second.ready_models.add("tiny_gpt")
    assert pool.generation_slots("tiny_gpt") == 24
    # A setting counts per server with the model ready.
    assert pool.generation_slots("tiny_gpt", per_server=4) == 12
    assert pool.generation_slots("smollm2") == 0


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
