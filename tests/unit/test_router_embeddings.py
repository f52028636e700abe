"""The embeddings core (services/router/embeddings.py): what an embedding
request reserves, settles and records, however it ends."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from meshgate.config import (
    DeploymentSettings,
    InferenceSettings,
    ModelSettings,
    PriceSettings,
    RouterSettings,
)
from meshgate.errors import MeshgateError
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from services.router.admission import Reservation, TurnAdmission
from services.router.auth import Tenant
from services.router.deployments import PROBES_TO_MARK_DOWN, DeploymentTable, OpenCalls
from services.router.embeddings import Embeddings
from tests.unit.test_router_context_restart import unavailable as unavailable_rpc
from tests.unit.test_router_deployments import check_all, checked, until


class Admission:
    """Admission's admit and settle_soon, recorded."""

    def __init__(self) -> None:
        self.admitted: list[tuple[int, int]] = []
        self.settled: list[tuple[int, int]] = []

    async def admit(self, scopes, prompt_tokens, max_tokens, price=None) -> Reservation:
        self.admitted.append((prompt_tokens, max_tokens))
        return Reservation("lease", prompt_tokens + max_tokens, 0, (), price=price)

    def settle_soon(self, reservation, tokens, nano_usd) -> None:
        self.settled.append((tokens, nano_usd))


class Ledger:
    def __init__(self) -> None:
        self.records = []

    def submit(self, record) -> None:
        self.records.append(record)


class Inference:
    """One inference service's Embed: answers, fails with ``failure``, or
    holds until cancelled (``hold``)."""

    def __init__(self, failure: grpc.aio.AioRpcError | None = None, hold: bool = False) -> None:
        self.failure = failure
        self.hold = hold
        self.requests: list[inference_pb.EmbedRequest] = []
        self.timeouts: list[float] = []

    def Embed(self, request, timeout):
        self.requests.append(request)
        self.timeouts.append(timeout)
        # A task, as a gRPC call is: awaited for the answer, cancellable.
        return asyncio.ensure_future(self._answer(request))

    async def _answer(self, request):
        if self.hold:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return inference_pb.EmbedResponse(dimensions=1, vectors=bytes(4 * len(request.texts)), input_tokens=9)

    def inference_services(self):
        return [(self, OpenCalls())]


class LateFailure:
    """An inference service that fails UNAVAILABLE ``after_s`` into a call
    (a replica going away while it embeds), unless the call's own timeout
    comes first: DEADLINE_EXCEEDED then, as gRPC ends such a call."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.timeouts: list[float] = []

    async def Embed(self, request, timeout):
        self.timeouts.append(timeout)
        if timeout < self.after_s:
            await asyncio.sleep(timeout)
            passed = grpc.StatusCode.DEADLINE_EXCEEDED
            raise grpc.aio.AioRpcError(passed, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded")
        await asyncio.sleep(self.after_s)
        raise unavailable_rpc()


class Replicas:
    """Inference services tried in this order."""

    def __init__(self, *stubs) -> None:
        self.stubs = stubs

    def inference_services(self):
        return [(stub, OpenCalls()) for stub in self.stubs]


def core(inference, max_generation_s: float = 300.0) -> tuple[Embeddings, Admission, Ledger]:
    """The embeddings core over ``inference`` (any object with inference_services()),
    its admission and ledger recorded."""
    settings = RouterSettings(
        prices={"minilm": PriceSettings(prompt_usd_per_million=1000.0)}, max_generation_s=max_generation_s
    )
    admission, ledger = Admission(), Ledger()
    limits = InferenceSettings(max_embed_texts=4, max_embed_text_bytes=1 << 20, embedding_max_tokens=256)
    embeddings = Embeddings(settings, limits, inference, TurnAdmission(admission, settings, ledger))
    return embeddings, admission, ledger


TENANT = Tenant("acme", frozenset({"*"}), "key1")


async def test_a_request_reserves_a_bound_of_its_tokens_and_settles_to_what_the_model_read():
    inference = Inference()
    embeddings, admission, ledger = core(inference)
    embedded = await embeddings.embed(TENANT, "minilm", ["a cat", "naïve"])
    assert embedded.input_tokens == 9
    assert inference.requests[0].count_tokens
    # Each text's UTF-8 bytes (no token is shorter) and its two special tokens.
    assert admission.admitted == [(5 + 2 + 6 + 2, 0)]
    # 9 tokens at $1,000 a million: 9,000,000 billionths of a dollar.
    assert admission.settled == [(9, 9_000_000)]
    (record,) = ledger.records
    assert (record.tenant, record.key_id, record.model) == ("acme", "key1", "minilm")
    assert (record.prompt_tokens, record.completion_tokens, record.cost_nano_usd, record.failure) == (
        9,
        0,
        9_000_000,
        "",
    )


async def test_the_model_gets_a_generations_budget_not_a_unary_calls():
    """A request at the documented most of texts and tokens runs for
    seconds on CPU: downstream_timeout_s (10 s) refused it 504."""
    inference = Inference()
    embeddings, _, _ = core(inference)
    await embeddings.embed(TENANT, "minilm", ["a cat"])
    settings = RouterSettings()
    assert settings.max_generation_s > settings.downstream_timeout_s
    (timeout_s,) = inference.timeouts
    assert settings.downstream_timeout_s < timeout_s <= settings.max_generation_s


async def test_a_failed_request_is_refunded_and_recorded_with_its_reason():
    embeddings, admission, ledger = core(Inference(unavailable_rpc()))
    with pytest.raises(MeshgateError) as failed:
        await embeddings.embed(TENANT, "minilm", ["a cat"])
    assert admission.settled == [(0, 0)]
    assert ledger.records[0].failure == failed.value.reason
    assert ledger.records[0].prompt_tokens == 0


async def test_an_abandoned_request_is_billed_its_reservation_and_recorded_as_cancelled():
    # Its texts were sent: the model may have read them. Billed nothing, a
    # caller could have every embedding computed and hang up before the answer.
    inference = Inference(hold=True)
    embeddings, admission, ledger = core(inference)
    task = asyncio.create_task(embeddings.embed(TENANT, "minilm", ["a cat"]))
    while not inference.requests:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # "a cat" and its two special tokens, at $1,000 a million.
    assert admission.settled == [(7, 7_000_000)]
    (record,) = ledger.records
    assert (record.failure, record.prompt_tokens, record.cost_nano_usd) == ("cancelled", 7, 7_000_000)


async def test_another_model_is_not_found_before_any_admission():
    embeddings, admission, _ = core(Inference())
    with pytest.raises(MeshgateError) as refused:
        await embeddings.embed(TENANT, "tiny-gpt", ["a cat"])
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert admission.admitted == []


async def test_a_long_text_reserves_no_more_than_the_model_reads():
    # A 200 KB document: the model reads its first 256 tokens.
    embeddings, admission, _ = core(Inference())
    await embeddings.embed(TENANT, "minilm", ["x" * 200_000, "a cat"])
    assert admission.admitted == [(256 + 5 + 2, 0)]


@pytest.mark.parametrize(
    ("texts", "reason"),
    [([], "EMPTY_TEXTS"), (["a"] * 5, "TOO_MANY_TEXTS"), (["x" * ((1 << 20) + 1)], "TEXT_TOO_LARGE")],
)
async def test_texts_the_inference_service_would_refuse_are_refused_before_admission(texts, reason):
    inference = Inference()
    embeddings, admission, ledger = core(inference)
    with pytest.raises(MeshgateError) as refused:
        await embeddings.embed(TENANT, "minilm", texts)
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert (admission.admitted, ledger.records, inference.requests) == ([], [], [])


async def test_a_replica_failing_late_leaves_the_next_what_is_left_of_the_requests_budget():
    """max_generation_s bounds the whole request: each replica that failed
    UNAVAILABLE late handed the next a fresh one, so two failing 0.3 s into
    a 0.5 s budget made a request of 0.6 s, answered by a third replica."""
    first, second, third = LateFailure(0.3), LateFailure(0.3), Inference()
    embeddings, admission, ledger = core(Replicas(first, second, third), max_generation_s=0.5)
    started = time.monotonic()
    with pytest.raises(MeshgateError) as failed:
        await embeddings.embed(TENANT, "minilm", ["a cat"])
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.5 + 0.1
    assert second.timeouts[0] <= 0.5 - 0.3
    assert third.requests == []
    assert admission.settled == [(0, 0)]


async def test_no_replica_is_tried_with_too_little_of_the_requests_budget_left():
    # The first fails as the budget runs out: the next cannot answer in the
    # few milliseconds left, and is not asked (nor made to do the work).
    first, second = LateFailure(0.295), Inference()
    embeddings, _, ledger = core(Replicas(first, second), max_generation_s=0.3)
    with pytest.raises(MeshgateError) as failed:
        await embeddings.embed(TENANT, "minilm", ["a cat"])
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failed.value.reason == "DEADLINE_EXCEEDED"
    assert failed.value.metadata["max_generation_s"] == "0.3"
    assert second.requests == []
    assert ledger.records[0].failure == "DEADLINE_EXCEEDED"


def silent_then_answering():
    """Two inference services, the first configured one silent (its health
    check times out, its Embed never answers), the second answering: the
    table, the silent one's deployment, and the two services."""
    table = DeploymentTable(
        {
            "first": ModelSettings(deployments=[DeploymentSettings(name="a", address="127.0.0.1:5000")]),
            "second": ModelSettings(deployments=[DeploymentSettings(name="b", address="127.0.0.1:5001")]),
        }
    )
    (a,), (b,) = table.candidates("first"), table.candidates("second")
    a.stub, b.stub = silent, answering = Inference(hold=True), Inference()
    checked(table, a, grpc.StatusCode.DEADLINE_EXCEEDED)
    checked(table, b, "SERVING")
    return table, a, silent, answering


async def test_an_inference_service_out_of_rotation_is_asked_last():
    """The inference services were asked in the configuration's order: one
    that stopped answering (its host stopped, the process wedged) held every
    embeddings request for its whole max_generation_s, long after its health
    checks had taken it out of rotation."""
    table, _, silent, answering = silent_then_answering()
    embeddings, _, _ = core(table)
    try:
        for _ in range(PROBES_TO_MARK_DOWN):
            await check_all(table)
        answer = await asyncio.wait_for(embeddings.embed(TENANT, "minilm", ["a cat"]), 5)
    finally:
        await table.close()
    assert answer.input_tokens == 9
    assert (len(silent.requests), len(answering.requests)) == (0, 1)


async def test_an_embed_on_an_inference_service_gone_silent_is_ended_and_moves_on():
    """An Embed sent to an inference service that then stopped answering
    (its host stopped, the process wedged) waited until the keepalive
    dropped the connection (20 to 30 s), though the next service would have
    answered: its health checks took the service out of rotation but,
    unlike a generation's, never ended the call. They end it now, and the
    next service answers."""
    table, a, silent, answering = silent_then_answering()
    embeddings, admission, _ = core(table)
    try:
        request = asyncio.create_task(embeddings.embed(TENANT, "minilm", ["a cat"]))
        await until(lambda: silent.requests)
        for _ in range(PROBES_TO_MARK_DOWN):
            await check_all(table)
        answer = await asyncio.wait_for(request, 5)
    finally:
        await table.close()
    assert answer.input_tokens == 9
    assert (len(silent.requests), len(answering.requests)) == (1, 1)
    assert len(a.calls) == 0
    # Billed once, what the service that answered read.
    assert admission.settled == [(9, 9_000_000)]


async def test_a_reload_leaves_a_requests_budget_at_the_starts_max_generation_s():
    """router.max_generation_s needs a restart (the reload logs so): a
    generation and the admission's lease keep the start's. Embeddings took
    the reloaded one, so one reload had a request's budget and its
    admission's lease disagree."""
    inference = Inference()
    embeddings, _, _ = core(inference, max_generation_s=300.0)
    embeddings.reconfigure(RouterSettings(max_generation_s=1.0), InferenceSettings())
    await embeddings.embed(TENANT, "minilm", ["a cat"])
    (timeout_s,) = inference.timeouts
    assert 1.0 < timeout_s <= 300.0


async def test_every_inference_service_unavailable_is_said_as_a_turns_is():
    """A turn whose every deployment failed ends NO_DEPLOYMENT_AVAILABLE; an
    embeddings request over the same down services ended DOWNSTREAM_FAILED."""
    embeddings, _, _ = core(Replicas(Inference(unavailable_rpc()), Inference(unavailable_rpc())))
    with pytest.raises(MeshgateError) as failed:
        await embeddings.embed(TENANT, "minilm", ["a cat"])
    assert (failed.value.code, failed.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "NO_DEPLOYMENT_AVAILABLE",
    )
    assert failed.value.message.startswith("no inference service could embed")
