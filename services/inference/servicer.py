"""The inference service's request path: Generate, Embed, ListModels, GetBackendHealth."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import time
import uuid

import grpc
import numpy as np
import structlog
from opentelemetry import trace
from tritonclient.grpc import service_pb2

from meshgate import balancing, streaming, telemetry, tokenization
from meshgate.config import InferenceSettings
from meshgate.embedding_input import EmbeddingTruncator
from meshgate.errors import MeshgateError, from_rpc_error, invalid_argument, not_found, partly_delivered
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.reasons import Reason
from services.inference import triton_protocol, validation
from services.inference.backends import BackendPool, TritonBackend, ended_by_this_service, triton_status
from services.inference.generation_slots import BACKGROUND, ModelSlots
from services.inference.shared_embeddings import EMBED_BATCH, SharedEmbeddings

log = structlog.get_logger(__name__)

DEFAULT_MAX_TOKENS = 64
_MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# A held delta goes out this long before the caller's deadline: then the
# handler is cancelled and what is still held never goes out. Enough for an
# event-loop turn on a busy process and the write to the caller.
_HOLD_DEADLINE_MARGIN_S = 0.010
# A change of the embedding model's revision is logged at most once per
# change (from one revision to another) and this many seconds.
_REVISION_WARNING_INTERVAL_S = 60.0
# A server that refuses generations (UNAVAILABLE before an answer: Triton
# draining on SIGTERM, a model unloading) is logged at most once per this
# many seconds, each line counting the refusals it stands for: every call
# it refused logged one, three for each request its router retried
# (serving's retry policy), for as long as it refused.
_UNAVAILABLE_WARNING_INTERVAL_S = 10.0


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        settings: InferenceSettings,
        pool: BackendPool,
        *,
        clock: collections.abc.Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._truncator = EmbeddingTruncator(
            tokenization.load(settings.embedding_tokenizer), settings.embedding_max_tokens
        )
        # The revision Triton's embedding model answered with last, for the
        # log of a change (which remembered vectors are answered is the
        # memo's: shared_embeddings.py).
        self._embedding_revision: str | None = None
        # The revision each server's embedding model answered with last: where
        # a request's texts go to be embedded again by one revision.
        self._revision_served: dict[str, str] = {}
        self._revision_changes = telemetry.ThrottledLog(log, _REVISION_WARNING_INTERVAL_S)
        # Per server (see _UNAVAILABLE_WARNING_INTERVAL_S).
        self._unavailable_servers = telemetry.ThrottledLog(log, _UNAVAILABLE_WARNING_INTERVAL_S, clock)
        self._embeddings: SharedEmbeddings[tuple[str, bytes]] = SharedEmbeddings(
            self._embed_texts,
            settings.embedding_memo_entries,
            settings.embedding_triton_model,
            batch_size=EMBED_BATCH,
            timeout_s=settings.embed_timeout_s,
            revision_of=lambda embedded: embedded[0],
            clock=clock,
        )
        # One strategy per served model, so each keeps its own prefix index.
        self._strategies = {
            name: balancing.build(
                served.routing_strategy,
                settings.prefix_block_tokens,
                settings.prefix_ttl_s,
                settings.prefix_index_blocks,
            )
            for name, served in settings.models.items()
        }
        # Each generation model's slots, shared fairly among tenants
        # (generation_slots.py); served models naming one Triton model share them.
        self.generation_slots: dict[str, ModelSlots] = {}
        self._slots_per_server: dict[str, int] = {}
        for served in settings.models.values():
            if served.triton_model not in self.generation_slots:
                self.generation_slots[served.triton_model] = ModelSlots(
                    served.triton_model, settings.queued_generations_cap()
                )
                self._slots_per_server[served.triton_model] = served.generation_slots
        # Generate calls under way in this process: the stream interval
        # holds deltas only while there are enough (_stream_hold_s).
        self._generations = 0
        self._stream_interval_s = settings.stream_interval_ms / 1000

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        served = self._settings.models.get(request.model)
        if served is None:
            raise not_found(Reason.MODEL_NOT_FOUND, f"model {request.model!r} is not served here")
        validation.check_messages(request.messages, served)
        validation.check_contents(request.messages, self._settings)
        max_tokens = validation.check_generation(request.parameters, served, DEFAULT_MAX_TOKENS)
        prompt = triton_protocol.render_chat(request.messages, served)
        validation.check_prompt(prompt, self._settings)
        sampling = triton_protocol.sampling_parameters(request.parameters, max_tokens)
        # The RPC's own span is the generation's: GenAI conventions on it.
        span = trace.get_current_span()
        span.set_attributes(telemetry.genai_request_attributes("chat", request.model, request.parameters))
        span.set_attribute("gen_ai.request.max_tokens", max_tokens)

        # A tenant's generation waits in its own queue. One naming no tenant
        # is background work whatever its flag: it passed the mesh guard
        # with no router's token (mesh_auth.OptionalTenant), so a tenant's
        # place would be any mesh peer's for the asking.
        tenant = request.tenant_id if request.tenant_id and not request.background else BACKGROUND
        slots = self.generation_slots[served.triton_model]
        if not slots.try_take(tenant):
            await slots.wait(tenant, context.time_remaining())
        self._generations += 1
        try:
            strategy = self._strategies[request.model]
            route = await self._route_request(served, strategy, prompt, request.tenant_id)
            tried: set[str] = set()
            # Servers whose dead idle stream this request already replaced.
            revived: set[str] = set()
            while True:
                backend = self._pool.choose(served.triton_model, frozenset(tried), strategy, route)
                tried.add(backend.address)
                # The caller's deadline bounds the stream interval's holds. It
                # bounds the Triton request too, though a pooled stream has no
                # timeout of its own: at the deadline grpc cancels this handler,
                # which cancels the stream, and so the request inside Triton.
                stream = _TritonStream(
                    backend,
                    served.triton_model,
                    prompt,
                    sampling,
                    context.time_remaining(),
                    route.prompt_units,
                    strategy.prefill_left(backend, route),
                    # Only a prefix strategy reads what the model reused.
                    strategy.uses_prefix,
                    self._stream_hold_s if self._stream_interval_s > 0 else None,
                    request.completion_may_carry_text,
                    self._settings.stream_stall_s,
                    # The tenant's blocks only, never another's (the mesh
                    # guard checked the router's word for it).
                    cache_salt=request.tenant_id,
                )
                probing = backend.health.begin()
                # Called, it takes the route back (the server refused the
                # request unread); reported, it is what the report is judged by.
                routing = strategy.routed(backend, route)
                try:
                    async for response in stream:
                        if response.HasField("completion"):
                            backend.health.record_success()
                            if stream.cached_tokens is not None:
                                # What the model says it held corrects what we believed.
                                strategy.reported(backend, routing, stream.cached_tokens)
                        yield response
                    return
                except (grpc.aio.AioRpcError, MeshgateError) as error:
                    if (
                        stream.reused
                        and not stream.heard
                        and backend.address not in revived
                        and _ends_a_stream_dead_while_idle(error)
                    ):
                        # An idle stream that died unnoticed (Triton restarted,
                        # the connection dropped, the server ended the call):
                        # the server may be fine, and no request failed there. Its
                        # other idle streams likely died with it; a new one decides.
                        backend.streams.drop()
                        # Once a server: a stream that fails so again is the server's doing.
                        revived.add(backend.address)
                        tried.discard(backend.address)
                        routing()
                        if probing:
                            # No outcome of the server's: the next stream is the probe.
                            backend.health.release_probe(probing)
                        log.info("idle triton stream gone, opening another", backend=backend.address)
                        continue
                    if not stream.heard:
                        # Failed before the model answered: believed held,
                        # its prompt would draw the conversation's next turn
                        # there to a model that may have cached none of it.
                        routing()
                    if isinstance(error, MeshgateError):
                        if error.reason == Reason.STREAM_ENDED_EARLY:
                            backend.health.record_failure()
                        elif probing:
                            # The model refused the request (its own fault),
                            # or another answer of the model's: not the
                            # server's, whose half-open slot would otherwise
                            # stay taken for open_for_s, no trial let in.
                            backend.health.release_probe(probing)
                        _with_progress(error, stream)
                        raise
                    if _server_fault(error):
                        backend.health.record_failure()
                    elif probing:
                        backend.health.release_probe(probing)
                    backend.note_refusal(served.triton_model, error.code(), error.details() or "")
                    # Retry elsewhere only if nothing reached the caller yet (AIP-194).
                    if error.code() == grpc.StatusCode.UNAVAILABLE and not stream.started:
                        # Refused (its model unloaded, its stub dead) or lost
                        # before an answer: not believed to hold the prompt.
                        routing()
                        self._unavailable_servers.warning(
                            "triton unavailable, trying another",
                            per=backend.address,
                            backend=backend.address,
                            error=error.details(),
                        )
                        continue
                    failure = triton_failure(error, served.triton_model, Reason.INVALID_GENERATION_REQUEST)
                    raise _with_progress(failure, stream) from error
                except (asyncio.CancelledError, GeneratorExit):
                    # Its caller left (a deadline, a cancel): neither a
                    # success nor a failure of the server, whose half-open
                    # slot would otherwise stay taken for open_for_s, no
                    # trial let in (balancing.Health.release_probe).
                    if probing:
                        backend.health.release_probe(probing)
                    if not stream.heard:
                        # Left during its prefill: the bundled models cache
                        # nothing of a request cancelled then. Believed held,
                        # its prompt made its resend's report (the earlier
                        # turn's blocks reused) read as an eviction of every
                        # block routed there before (a review, 2026-12-06).
                        routing()
                    raise
        finally:
            self._generations -= 1
            slots.give_back(tenant)

    def count_generation_slots(self) -> None:
        """Each model's slots, from the servers the balancer would send it
        to (after each server's probe): a server that comes or goes, or whose
        breaker opens or closes, changes them; None where one of them has
        no known count. While no server has a model ready its count stays
        as it was: its calls fail at once (NO_READY_BACKEND) and hold no
        slot for long."""
        for model, slots in self.generation_slots.items():
            capacity = self._pool.generation_slots(model, self._slots_per_server[model])
            if capacity != 0 and capacity != slots.capacity:
                log.info("generation slots", model=model, slots=capacity)
                slots.set_capacity(capacity)

    def _stream_hold_s(self) -> float:
        """How long a stream's next deltas may be held (streaming.batches):
        only under load, where fewer messages per token pay."""
        if self._generations >= self._settings.stream_interval_min_streams:
            return self._stream_interval_s
        return 0.0

    async def _route_request(
        self, served, strategy: balancing.Strategy, prompt: str, tenant_id: str
    ) -> balancing.RouteRequest:
        """What the strategy reads; a prefix strategy reads the prompt as the
        model will, token blocks hashed as a chain under the tenant's salt,
        as the model's cache salts them. Tokenizing is Rust, off
        the event loop (a 2,000-token prompt: bench/README.md). With one
        Triton server there is nothing to choose: no tokenizing."""
        if not strategy.uses_prefix or len(self._pool.backends) < 2:
            return balancing.RouteRequest(model=served.triton_model)
        tokenizer = tokenization.load(served.tokenizer)
        ids = (await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens=False)).ids
        return balancing.RouteRequest(
            model=served.triton_model,
            prefix_blocks=balancing.prefix_blocks(ids, self._settings.prefix_block_tokens, tenant_id),
            prompt_units=len(ids),
        )

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        validation.check_embed_texts(request.texts, self._settings)
        # The Triton call may be shared, so it carries no caller's deadline:
        # each caller's own ends its own wait (a memo hit never waits).
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _embed_deadline_passed()
        try:
            async with asyncio.timeout(remaining):
                # Texts in flight or embedded lately are not sent again (shared_embeddings.py).
                embedded = await self._embeddings.vectors(request.texts)
                input_tokens = await self._input_tokens(request) if request.count_tokens else 0
        except TimeoutError:
            raise _embed_deadline_passed() from None
        revisions = {revision for revision, _ in embedded}
        if len(revisions) > 1:
            # Servers of two revisions answered parts of it (a rolling
            # upgrade of Triton's model) and embedding the fewer again did
            # not make them one's (shared_embeddings.EMBED_AGAIN_ROUNDS): one
            # response names one revision, and vectors of two are not comparable.
            raise MeshgateError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.EMBEDDER_CHANGED,
                f"the embedding model answered with revisions {sorted(revisions)} at once; try again",
                {"revisions": ",".join(sorted(revisions))},
            )
        vectors = [vector for _, vector in embedded]
        # float32: dimensions are a vector's bytes over 4.
        return pb.EmbedResponse(
            dimensions=len(vectors[0]) // 4,
            vectors=b"".join(vectors),
            input_tokens=input_tokens,
            model=self._settings.embedding_triton_model,
            model_revision=revisions.pop(),
        )

    async def _input_tokens(self, request: pb.EmbedRequest) -> int:
        texts = list(request.texts)
        if any(self._truncator.needs_tokenizing(text) for text in texts):
            # Long texts are CPU work in Rust: off the event loop, as their cut is.
            return await asyncio.to_thread(self._truncator.count_tokens, texts)
        return self._truncator.count_tokens(texts)

    async def _embed_texts(self, texts: list[str], revision: str = "") -> list[tuple[str, bytes]]:
        """Each text's revision and vector from Triton, for SharedEmbeddings (at most
        EMBED_BATCH texts: one ModelInfer): possibly for several callers, so
        no one caller's deadline bounds it; SharedEmbeddings' own limit
        (inference.embed_timeout_s) does, or the last caller's leaving.
        ``revision``: on the servers that last answered it, while one of
        them can take it (else on any: its answer may be of another)."""
        if any(self._truncator.needs_tokenizing(text) for text in texts):
            # Tokenizing is CPU work in Rust: off the event loop, so streams go on.
            texts = await asyncio.to_thread(self._truncator.truncate, texts)
        model = self._settings.embedding_triton_model
        tried: set[str] = set()
        while True:
            backend = self._choose_embedding_server(model, frozenset(tried), revision)
            tried.add(backend.address)
            # The breaker Generate feeds, fed the same way: a server that
            # fails embeddings leaves rotation as one failing generations does.
            probing = backend.health.begin()
            backend.in_flight += 1
            try:
                call = backend.stub.ModelInfer(triton_protocol.embed_request(model, texts))
                response = await backend.calls.answer(call, model)
                backend.health.record_success()
                break
            except grpc.aio.AioRpcError as error:
                if _server_fault(error):
                    backend.health.record_failure()
                elif probing:
                    # No outcome of the server's (as for Generate): its
                    # half-open slot would stay taken for open_for_s, no
                    # trial of any model let in.
                    backend.health.release_probe(probing)
                stub_died = backend.note_refusal(model, error.code(), error.details() or "")
                # A unary call that failed sent nothing back: another server
                # may answer (AIP-194), as for Generate before its first token.
                # Triton answers a model whose stub died INTERNAL, and one it
                # unloaded (the probes take it out of rotation rounds later)
                # NOT_FOUND, but the request never ran there and another
                # server's model may be alive.
                if (
                    error.code() == grpc.StatusCode.UNAVAILABLE
                    or stub_died
                    or triton_protocol.model_not_here(error.details() or "")
                ):
                    log.warning("triton unavailable, embedding on another", backend=backend.address)
                    continue
                raise triton_failure(error, model, Reason.INVALID_EMBEDDING_REQUEST) from error
            except asyncio.CancelledError:
                # As a generation's (Generate): its last caller left.
                if probing:
                    backend.health.release_probe(probing)
                raise
            finally:
                backend.in_flight -= 1
        shape, raw, answered = triton_protocol.embedding_outputs(response)
        if len(shape) != 2 or shape[0] != len(texts) or shape[1] <= 0 or len(raw) != np.prod(shape) * 4:
            raise MeshgateError(
                grpc.StatusCode.INTERNAL, Reason.BAD_EMBEDDING, f"embedding model returned shape {shape}"
            )
        self._revision_served[backend.address] = answered
        if answered != self._embedding_revision:
            if self._embedding_revision is not None:
                # Once per change of revisions and interval: servers of two
                # revisions side by side change it at every other answer.
                self._revision_changes.warning(
                    "embedding model revision changed",
                    per=(self._embedding_revision, answered),
                    model=model,
                    revision=answered,
                    previous=self._embedding_revision,
                )
            self._embedding_revision = answered
        size = int(shape[1]) * 4
        return [(answered, raw[i * size : (i + 1) * size]) for i in range(len(texts))]

    def _choose_embedding_server(self, model: str, tried: frozenset[str], revision: str) -> TritonBackend:
        """The balancer's choice among the servers not ``tried``: of those
        that last answered ``revision`` (or none yet: they may serve any)
        while one is ready, else of all."""
        if revision:
            others = frozenset(address for address, last in self._revision_served.items() if last != revision)
            with contextlib.suppress(MeshgateError):  # NO_READY_BACKEND among them: any server
                return self._pool.choose(model, tried | others)
        return self._pool.choose(model, tried)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        ready = set().union(*(b.ready_models for b in self._pool.backends))
        return pb.ListModelsResponse(
            models=[
                pb.ServedModel(
                    name=name,
                    triton_model=served.triton_model,
                    context_window_tokens=served.context_window_tokens,
                    ready=served.triton_model in ready,
                )
                for name, served in self._settings.models.items()
            ]
        )

    async def GetBackendHealth(self, request, context) -> pb.GetBackendHealthResponse:
        return pb.GetBackendHealthResponse(
            backends=[
                pb.Backend(
                    address=b.address,
                    live=b.live,
                    ready=b.ready,
                    in_flight=b.in_flight,
                    models=[
                        pb.BackendModel(
                            name=model,
                            ready=model in b.ready_models,
                            not_ready_reason=b.not_ready_reason(model),
                            stub_dead=model in b.stub_dead,
                        )
                        for model in b.models
                    ],
                )
                for b in self._pool.backends
            ]
        )


def _embed_deadline_passed() -> MeshgateError:
    message = "the deadline passed before the embedding"
    return MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, message)


def _ends_a_stream_dead_while_idle(error: grpc.aio.AioRpcError | MeshgateError) -> bool:
    """Whether ``error``, on a stream taken from the pool before anything came
    back, is how a stream that died idle ends: UNAVAILABLE (the connection
    went), a clean end before the final response (Triton closed it), or
    CANCELLED, which only the server sends: grpc raises a cancel of ours
    (the caller leaving, the probes) as asyncio.CancelledError, which goes
    on untouched."""
    if isinstance(error, MeshgateError):
        return error.reason == Reason.STREAM_ENDED_EARLY
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _with_progress(failure: MeshgateError, stream: _TritonStream) -> MeshgateError:
    """A failure after output (Triton died midway) says how much went out."""
    if not stream.started:
        return failure
    return partly_delivered(failure, stream.delivered_deltas, stream.delivered_chars, stream.delivered_tokens)


class _TritonStream:
    """One streamed generation on one backend, as GenerateResponse messages,
    on a ModelStreamInfer call of the backend's TritonStreams.

    Leaving the iteration early (the caller cancelled, or failed) cancels the
    Triton call, which cancels the request inside Triton: the call carries
    no other. Only a call whose request ended with its final response goes
    back to the pool.
    """

    def __init__(
        self,
        backend: TritonBackend,
        model: str,
        prompt: str,
        sampling: str,
        timeout: float | None,
        prompt_tokens: int = 0,
        prefill_tokens: int = 0,
        wants_cached_tokens: bool = False,
        hold_s: collections.abc.Callable[[], float] | None = None,
        completion_carries_text: bool = False,
        stall_s: float | None = None,
        cache_salt: str = "",
    ) -> None:
        self._backend = backend
        self._model = model
        # The caller reads GenerateCompletion.text: the text that arrives
        # with the final response goes on the completion, not in a delta of
        # its own (one message fewer per answer, here and at the caller).
        self._completion_carries_text = completion_carries_text
        # The caller's deadline, which a hold must not outlast.
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        # The backend's load while this runs (balancing.KvCost): its prompt
        # held as KV, and until its first token, the prefill it queues.
        self._prompt_tokens = prompt_tokens
        self._prefill_tokens = prefill_tokens
        # Prompt tokens the model served from its prefix cache, if it says.
        self.cached_tokens: int | None = None
        self._request = triton_protocol.generate_request(
            model,
            uuid.uuid4().hex,
            prompt,
            sampling,
            backend.batched.get(model, False),
            wants_cached_tokens and backend.reports_cached_tokens.get(model, False),
            cache_salt if backend.takes_cache_salt.get(model, False) else "",
        )
        self._hold_s = hold_s
        # The longest wait for Triton's next response once it sent one
        # (inference.stream_stall_s); None: unbounded.
        self._stall_s = stall_s
        self.started = False
        # Whether the stream was idle in the pool: if it died there unnoticed,
        # the servicer tries a new one on the same server (Generate).
        self.reused = False
        # Whether Triton sent anything for this request (an error response
        # too): a stream that died idle fails before it does.
        self.heard = False
        # What reached the caller, for the error that ends a stream midway.
        self.delivered_deltas = self.delivered_chars = self.delivered_tokens = 0

    def _hold(self) -> float:
        """How long what arrived may be held (streaming.batches' hold_s):
        never before a delta reached the caller. batches holds from its
        second hand-over on, but Triton's first response may carry no text
        (part of a multi-byte character, a held-back stop-string prefix),
        and the first text must not wait for company (time to first token).
        Nor past the caller's deadline, less _HOLD_DEADLINE_MARGIN_S."""
        if not self.started:
            return 0.0
        hold = self._hold_s()
        if self._deadline is not None and hold > 0:
            hold = max(0.0, min(hold, self._deadline - time.monotonic() - _HOLD_DEADLINE_MARGIN_S))
        return hold

    async def __aiter__(self):
        backend = self._backend
        # The client span is the request's, as before; its W3C context no
        # longer rides the call's metadata (the call carries many requests:
        # TritonStreams), so only Triton's own tracing loses the link.
        span, _ = telemetry.start_grpc_client_span(_MODEL_STREAM_INFER, backend.address, inject=False)
        call, self.reused = backend.streams.take()
        # Triton's responses are read ahead while the last delta is still
        # being written to the caller: under load several are waiting by
        # then, and go out as one delta (one write here, one read and one
        # write at the router) instead of one each; with the stream
        # interval, they are held a little for company (not the final one,
        # nor one the model already held: triton_protocol.needs_no_hold).
        # Reading stops after the request's last response (``ends``): the
        # stream may carry the next request.
        arrivals = streaming.batches(
            call,
            hold_s=self._hold if self._hold_s is not None else None,
            urgent=triton_protocol.needs_no_hold,
            ends=triton_protocol.ends_stream,
        )
        backend.in_flight += 1
        backend.calls.add(call, self._model)
        backend.active_tokens += self._prompt_tokens
        backend.queued_prefill_tokens += self._prefill_tokens
        prefill_queued = True
        started = time.monotonic()
        prompt_tokens = completion_tokens = 0
        # Whether a delta carried the prompt's count (once: it never changes).
        prompt_count_sent = False
        finish_reason = ""
        final_seen = False
        last_text = ""
        text_output = triton_protocol.text_decoder()
        # Whether the call went back to the pool, its request answered:
        # kept for the next request or closed there (TritonStreams.retire).
        handed_back = False
        failure: BaseException | None = None
        own_id = self._request.id
        # A model that stops answering while it and its server read ready
        # (its Python-backend stub killed or wedged) sends nothing more, and
        # nothing else ends the wait: from Triton's first response on, a
        # watchdog cancels the call once this has waited stall_s for the next
        # one. A wait that the caller's slow reading causes (the yield below)
        # is not Triton's, and one timer a stream, moved on only when it
        # fires, costs no timer per token.
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None
        watchdog: asyncio.TimerHandle | None = None
        stalled = False

        def watch() -> None:
            nonlocal watchdog, stalled
            waited = 0.0 if waiting_since is None else loop.time() - waiting_since
            if waited < self._stall_s:
                watchdog = loop.call_later(self._stall_s - waited, watch)
            elif call.cancel():
                stalled = True

        try:
            await _write(call, self._request)
            async for batch in arrivals:
                waiting_since = None
                if watchdog is None and self._stall_s is not None:
                    watchdog = loop.call_later(self._stall_s, watch)
                texts = []
                model_error = ""
                if not self.heard:
                    backend.calls.answered(call)
                    self.heard = True
                for message in batch:
                    answering = message.infer_response.id
                    if answering != own_id and answering:
                        # Triton names the request each response answers
                        # (errors too). A stream that carries requests one
                        # after another must never pass one request's output
                        # to the next: a response for another request means
                        # the stream is not what we think, so it ends here,
                        # never back in the pool, and the server counts a
                        # failure (Generate).
                        raise _ended_early(
                            "Triton answered another request on this request's stream", backend
                        )
                    if message.error_message:
                        # The text before it still goes out (below), then the error.
                        model_error = message.error_message
                        break
                    event = triton_protocol.read_generate_response(message.infer_response, text_output)
                    if event.input_tokens is not None:
                        prompt_tokens = event.input_tokens
                    if event.output_tokens is not None:
                        completion_tokens += event.output_tokens
                    if event.cached_tokens is not None:
                        self.cached_tokens = event.cached_tokens
                    if event.text:
                        texts.append(event.text)
                    finish_reason = event.finish_reason or finish_reason
                    if event.final:
                        final_seen = True
                        break
                if texts:
                    if prefill_queued:
                        backend.ttft.add(time.monotonic() - started)
                        backend.queued_prefill_tokens -= self._prefill_tokens
                        prefill_queued = False
                    text = texts[0] if len(texts) == 1 else "".join(texts)
                    self.started = True
                    if final_seen and self._completion_carries_text:
                        last_text = text
                        break
                    self.delivered_deltas += 1
                    self.delivered_chars += len(text)
                    self.delivered_tokens = completion_tokens
                    # The counts behind the text so far ride on it (a few
                    # bytes a delta, no message of their own): a caller cut
                    # off before the completion is billed what the model read
                    # and produced up to its last delta, not a bound.
                    delta = pb.GenerateDelta(text=text, completion_tokens=completion_tokens)
                    if prompt_tokens and not prompt_count_sent:
                        delta.prompt_tokens = prompt_tokens
                        prompt_count_sent = True
                    yield pb.GenerateResponse(delta=delta)
                if model_error:
                    # As the status Triton would have ended the call with:
                    # Generate and triton_failure take it from there.
                    code = triton_protocol.stream_error_code(model_error, self._model)
                    raise triton_status(code, model_error)
                if final_seen:
                    break
                waiting_since = loop.time()
            if watchdog is not None:
                # The stream may carry the next request from here on.
                watchdog.cancel()
            if not final_seen:
                raise _ended_early("Triton closed the stream before the final response", backend)
            self.started = True
            # The request is over and nothing is left reading the stream
            # (batches' ``ends``): it may carry the next one at once. Idle, it
            # is no open call (the probes must not end it under its next
            # request's owner); one not kept is closed by the pool, and the
            # caller's status waits for nothing of Triton's from here on.
            await arrivals.aclose()
            if not backend.streams.give_back(call):
                backend.streams.retire(call)
            handed_back = True
            backend.calls.discard(call)
            if finish_reason in _CUT_SHORT:
                # The answer so far went out; it ends non-OK, as a stream cut
                # midway does, so that nothing (the cache, a caller) takes it
                # for a whole answer.
                raise _ended_early(f"the model ended the answer before its end ({finish_reason})", backend)
            finish_reason = finish_reason or "stop"
            trace.get_current_span().set_attributes(
                telemetry.genai_usage_attributes(prompt_tokens, completion_tokens, finish_reason, self._model)
            )
            yield pb.GenerateResponse(
                completion=pb.GenerateCompletion(
                    usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                    finish_reason=finish_reason,
                    backend=backend.address,
                    text=last_text,
                )
            )
        except asyncio.CancelledError as cancelled:
            failure = cancelled
            task = asyncio.current_task()
            if stalled and not (task is not None and task.cancelling()):
                # The watchdog's cancel, not the caller's.
                failure = _ended_early(
                    f"Triton sent nothing more for this request in {self._stall_s:g} s", backend
                )
                raise failure from cancelled
            ended = None if handed_back else backend.calls.ended_here(call)
            if ended is None:
                # Also when the probes ended the call but the caller's own
                # task is cancelling too: that cancel must not be swallowed.
                raise
            # Not the caller's cancel: the probes took the server out of
            # rotation, or the model's stub died (backends.OpenCalls).
            # Triton had the request: this stream did not die idle unnoticed,
            # so Generate does not try another on the same server.
            self.heard = True
            failure = ended
            raise failure from cancelled
        except BaseException as error:
            failure = error
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            backend.in_flight -= 1
            backend.active_tokens -= self._prompt_tokens
            if prefill_queued:
                backend.queued_prefill_tokens -= self._prefill_tokens
            if not handed_back:
                # A pooled stream may be carrying another request by now.
                backend.calls.discard(call)
                await arrivals.aclose()
                if not call.done():
                    # Cancels the request inside Triton.
                    call.cancel()
            telemetry.end_grpc_client_span(span, failure)


async def _write(call, request: service_pb2.ModelStreamInferRequest) -> None:
    """Sends ``request`` on ``call``. A write that fails (the call ended since
    it was found open: InvalidStateError; its connection died under it:
    grpc's INTERNAL "Internal error from Core", seen when Triton was killed)
    sent no request: it fails as a server that died, UNAVAILABLE before any
    response, which is retried (Generate)."""
    try:
        await call.write(request)
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as failed:
        raise triton_status(
            grpc.StatusCode.UNAVAILABLE, "the Triton stream failed before the request went out"
        ) from failed


def _server_fault(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed Triton call counts against its server's breaker and
    outlier ejection (meshgate/balancing.Health): a server gone
    (UNAVAILABLE), and a model failing inside it (INTERNAL, which fails its
    share of the traffic as long as it lasts). Not a Python backend's stub
    that died (its refusal, triton_protocol.stub_died, and each call its
    death ended, backends.ended_by_this_service): that is one model's, which
    TritonBackend.stub_died takes out of rotation on that server; counted
    here, the calls it ended (three are enough) opened the breaker and took
    the server's every other model out too. Nor the calls the probes ended
    as the server left rotation (backends.LEFT_ROTATION): the probes hold it
    out, and put it back at their first answer; counted (the router counts
    none of those its own checks end), four such calls opened the breaker
    for 10 s from then, so a server stopped (SIGSTOP) and continued 1 s
    later read ready but was sent nothing for 9.2 s. Nor a model the server
    does not have loaded (unloaded: triton_protocol.model_unknown, UNAVAILABLE on a
    stream, so the request goes to another server): the probes take that
    model out of rotation there; counted, three generations refused in the
    rounds before they do opened the breaker, and an unload of the
    generation model took the server's embedding model out of rotation
    for its open time.
    A request that fails so on every server (a prompt that breaks the
    model) opens every breaker at worst, and balancing.order then still
    tries them, ejected ones last, so no caller is refused for it; the
    outlier ejection never takes out more than its fraction of the servers.
    The caller's mistakes, cancellations and deadlines say nothing of the
    server."""
    details = error.details() or ""
    if (
        triton_protocol.stub_died(details)
        or ended_by_this_service(details)
        or triton_protocol.model_unknown(details)
    ):
        return False
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


# Final responses whose finish_reason says the answer is not whole: vLLM's
# "abort" (the engine dropped the request: preempted past its limit, its
# engine shutting down) and "error" (it failed while generating). Its "stop"
# and "length" are whole answers; the bundled models send those only.
_CUT_SHORT = frozenset({"abort", "error"})


def _ended_early(message: str, backend) -> MeshgateError:
    """A Triton stream that ended before its final response, as the caller
    sees it (UNAVAILABLE / STREAM_ENDED_EARLY); which server it was goes to
    this service's log only: the router passes ErrorInfo metadata on to its
    public callers, who have no business with the mesh's addresses."""
    log.warning("triton stream ended early", backend=backend.address, error=message)
    return MeshgateError(grpc.StatusCode.UNAVAILABLE, Reason.STREAM_ENDED_EARLY, message)


def triton_failure(error: grpc.aio.AioRpcError, model: str, invalid_reason: str) -> MeshgateError:
    """A failed Triton call as the caller should see it.

    On a stream the code is triton_protocol.stream_error_code's reading of
    the model's error_message. A model's refusal (INVALID_ARGUMENT) is the
    caller's to fix, so its message goes along; cancellation and deadlines
    keep their codes; an internal failure of a model is INTERNAL, with the
    model's message (ours name no hosts or paths). Transport failures carry
    no model message: they go through from_rpc_error, which keeps addresses
    out.
    """
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid_argument(invalid_reason, details, model=model)
    if code == grpc.StatusCode.CANCELLED:
        return MeshgateError(code, Reason.TRITON_CANCELLED, "the request was cancelled", {"model": model})
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return MeshgateError(code, Reason.DEADLINE_EXCEEDED, "the deadline passed before Triton answered")
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and details:
        return MeshgateError(
            grpc.StatusCode.INTERNAL, Reason.MODEL_ERROR, f"Triton: {details}", {"model": model}
        )
    return from_rpc_error(error, "triton")
