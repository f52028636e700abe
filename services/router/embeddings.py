"""Embeddings through the router, transport-free: the tenant's model check,
its limits and budgets, the inference services' Embed, and what was used.
The HTTP edge's ``POST /v1/embeddings`` adapts it (http_edge.py).

An embedding request passes the same limits as a chat turn on the embedding
model (the tenant's, its key's, the model's: requests, tokens and cost a
minute and a day) and lands in the usage ledger, so that a tenant held to
ten requests a minute cannot embed without bound and its bill counts what
it embedded. Admission reserves a bound of the input tokens (every text's
UTF-8 bytes, no WordPiece or byte-level BPE token being shorter, plus its
special tokens, at most the tokens the model reads of a text); the request
settles to the tokens the model read, which the inference service counts
(EmbedRequest.count_tokens); one whose caller hangs up first, to its
reservation; a failed one, to nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import grpc

from meshgate.config import InferenceSettings, RouterSettings
from meshgate.embedding_input import check_texts
from meshgate.errors import MeshgateError, from_rpc_error, not_found, received_code, unavailable
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.reasons import Reason
from services.router.admission import TurnAdmission
from services.router.deployments import left_rotation
from services.router.downstream import failure_within, not_taken, time_for_a_try
from services.router.pipeline import Budget
from services.router.validation import check_model_allowed

# Reserved for each text beside its bytes: BERT's [CLS] and [SEP]; a model
# adding more is settled to its real count, above the reservation.
SPECIAL_TOKENS_PER_TEXT = 2


@dataclasses.dataclass
class Embedded:
    dimensions: int
    # len(texts) * dimensions little-endian float32 values, row-major.
    vectors: bytes
    input_tokens: int


class Embeddings:
    def __init__(
        self,
        settings: RouterSettings,
        inference: InferenceSettings,
        deployments,
        admission: TurnAdmission,
    ) -> None:
        # deployments: its inference_services() are those to ask, with their open calls.
        self._deployments = deployments
        self._admission = admission
        # The start's, as a generation's (downstream.Deployments) and the
        # admission's lease are: a restart-only setting (app.py).
        self._limit_s = settings.max_generation_s
        self.reconfigure(settings, inference)

    def reconfigure(self, settings: RouterSettings, inference: InferenceSettings) -> None:
        """``inference``: the inference services' limits on texts and the
        tokens the model reads of each, as this router's configuration
        names them (the same file in a local stack; keep them alike in
        services deployed apart: the inference service checks its own)."""
        self._settings = settings
        self._inference = inference

    def check_model(self, model: str, tenant) -> None:
        """Raises MeshgateError unless ``model`` is the embedding model and
        ``tenant`` may use it."""
        check_model_allowed(model, tenant)
        if not model or model != self._settings.embedding_model:
            raise not_found(Reason.MODEL_NOT_FOUND, f"unknown embedding model {model!r}", model=model)

    @property
    def max_texts(self) -> int:
        """The most texts one call may carry (inference.max_embed_texts)."""
        return self._inference.max_embed_texts

    async def embed(
        self, tenant, model: str, texts: list[str], on_admitted: Callable[[Any], None] | None = None
    ) -> Embedded:
        """``texts``' vectors from the embedding ``model``; raises
        MeshgateError (an unknown or forbidden model, a limit's refusal, or
        the inference services'). ``on_admitted(grant)`` is called once the
        request is admitted, as Pipeline.run's."""
        # One budget for the whole request, whichever inference services it
        # takes: one failing late (UNAVAILABLE after minutes) leaves the next
        # what is left, not a fresh max_generation_s, so no request lasts a
        # multiple of it.
        budget = Budget.of(self._limit_s)
        self.check_model(model, tenant)
        # Before admission: a request the inference service would refuse
        # must not take a request from the tenant's limits (nor be billed).
        check_texts(texts, self._inference.max_embed_texts, self._inference.max_embed_text_bytes)
        # The model reads at most embedding_max_tokens of a text: a long
        # document reserved its whole length (a 200 KB text was refused
        # REQUEST_EXCEEDS_LIMIT under 100,000 tokens a minute, for 256 read).
        cap = self._inference.embedding_max_tokens
        bound = sum(min(len(text.encode()) + SPECIAL_TOKENS_PER_TEXT, cap) for text in texts)
        grant = await self._admission.admit_embedding(tenant, model, bound)
        started = time.monotonic()
        failure: str = Reason.INTERNAL
        input_tokens = 0
        try:
            if on_admitted is not None:
                on_admitted(grant)
            answer = await self._embed(texts, budget)
            input_tokens, failure = answer.input_tokens, ""
        except MeshgateError as error:
            failure = error.reason
            raise
        except asyncio.CancelledError:
            # A hang-up is no error reason: the ledger says "cancelled". Its
            # texts were sent, and the model may have read them already (a
            # Triton call in progress runs to its end): billed the bound it
            # reserved, as a chat turn hung up on before its count is billed
            # its prompt's (admission.used_tokens). Free, a client could
            # have every embedding computed and hang up just before the answer.
            failure = "cancelled"
            input_tokens = bound
            raise
        finally:
            # Whatever the end, settled once: a failed request read nothing
            # it is billed for.
            self._admission.settle_embedding(
                grant, tenant, model, input_tokens, time.monotonic() - started, failure
            )
        return Embedded(answer.dimensions, answer.vectors, input_tokens)

    async def _embed(self, texts: list[str], budget: Budget) -> inference_pb.EmbedResponse:
        """Embed on the first inference service that takes it (as a
        generation fails over: another only where one did not take the call,
        downstream.not_taken), each try within what is left of ``budget``."""
        request = inference_pb.EmbedRequest(texts=texts, count_tokens=True)
        limit_s = self._limit_s
        # The budget is the limit's alone (embed: no caller's deadline here).
        limit = {"max_generation_s": f"{limit_s:g}"}
        last_error: grpc.aio.AioRpcError | None = None
        spent = (
            f"the request's {limit_s:g} s (router.max_generation_s) passed before an inference"
            " service answered"
        )
        for stub, calls in self._deployments.inference_services():
            # Model work, budgeted as a generation is: a request at the
            # documented most (inference.max_embed_texts texts of
            # embedding_max_tokens each) took over 10 s on 2 CPU cores,
            # past downstream_timeout_s, and was refused 504 however
            # long its caller would wait. A caller who hangs up cancels it.
            timeout_s = time_for_a_try(budget, limit_s, spent, limit)
            call = stub.Embed(request, timeout=timeout_s)
            # Open where the service's health checks can end it, as a
            # generation's call (deployments.OpenCalls). Sent to a service
            # that then stopped answering (its host stopped, the process
            # wedged), it waited until the keepalive dropped the connection
            # (20 to 30 s) though the next service would have answered; sent
            # there as the last one left, 65 s in a TLS handshake, then
            # failed all the same.
            calls.add(call)
            try:
                try:
                    return await call
                except asyncio.CancelledError as cancelled:
                    if not calls.ended_by_probes(call):
                        raise
                    raise left_rotation() from cancelled
            except grpc.aio.AioRpcError as error:
                if not not_taken(error, "inference"):
                    raise failure_within(error, "inference", budget, spent, **limit) from error
                last_error = error
            finally:
                calls.discard(call)
        if last_error is not None:
            failure = from_rpc_error(last_error, "inference")
            if received_code(last_error) == grpc.StatusCode.UNAVAILABLE:
                # As a turn whose every deployment failed says it
                # (downstream.Deployments): the reason names the condition,
                # the message the last refusal's own words (a transport
                # failure's host and port are for our logs only).
                failure = unavailable(
                    Reason.NO_DEPLOYMENT_AVAILABLE, f"no inference service could embed: {failure.message}"
                )
            raise failure from last_error
        raise MeshgateError(
            grpc.StatusCode.UNAVAILABLE, Reason.NO_DEPLOYMENT_AVAILABLE, "no inference service is configured"
        )
