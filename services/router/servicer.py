"""The router's request path.

One turn: authenticate -> validate -> (stateless: cache lookup on the request
as sent) -> assemble the prompt (context service) -> (session: cache lookup on
the assembled prompt) -> on a miss, stream from an inference deployment
straight to the caller -> store the answer and append the turn, concurrently
-> the completion event.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import structlog

from meshgate import telemetry
from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings, Settings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import MeshgateError, from_rpc_error, internal_error, partly_delivered, unavailable
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.mesh_auth import TenantTokens
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.auth import Authenticator, Tenant
from services.router.deployments import DeploymentTable
from services.router.validation import check_turn, resolve_model

log = structlog.get_logger(__name__)

_CACHE_STATUS = {
    cache_pb.LOOKUP_STATUS_EXACT_HIT: pb.CACHE_STATUS_EXACT_HIT,
    cache_pb.LOOKUP_STATUS_SEMANTIC_HIT: pb.CACHE_STATUS_SEMANTIC_HIT,
}
# Failures that say the context service is down, not that the request is bad.
_CONTEXT_OUTAGE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_READS_CACHE = frozenset({pb.CACHE_POLICY_UNSPECIFIED, pb.CACHE_POLICY_USE})
# Attempts to save a turn while the context service is unavailable, and the
# pause before the first retry (it grows linearly).
_APPEND_ATTEMPTS = 3
_APPEND_RETRY_DELAY_S = 0.2


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        deployments: DeploymentTable,
        context_stub,
        cache_stub,
        tenant_tokens: TenantTokens,
    ) -> None:
        self._settings = settings
        self._models = settings.models
        self._auth = authenticator
        self._deployments = deployments
        self._context = context_stub
        self._cache = cache_stub
        # Context and cache act only for the tenant these tokens assert.
        self._tenant_tokens = tenant_tokens
        self._timeout_s = settings.router.downstream_timeout_s

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext):
        tenant = self._auth.authenticate(context.invocation_metadata())
        async for response in self._turn(tenant, request, request.session_id, pb.ChatResponse, context):
            yield response

    async def ChatSession(self, request_iterator, context: grpc.aio.ServicerContext):
        tenant = self._auth.authenticate(context.invocation_metadata())
        session_id = ""
        async for turn in request_iterator:
            session_id = turn.session_id or session_id
            # A failed turn is reported in the stream, which stays open: ending
            # the call while the client is still sending pipelined turns lets
            # grpc's asyncio client replace our status with "Internal error
            # from Core" (grpc/grpc#36066), and the next turn may well succeed.
            try:
                async for response in self._turn(
                    tenant, turn, session_id, pb.ChatSessionResponse, context, create_session=not session_id
                ):
                    if response.HasField("completion"):
                        session_id = response.completion.session_id
                    yield response
            except MeshgateError as error:
                yield pb.ChatSessionResponse(failure=error.to_status_proto().SerializeToString())
            except Exception:  # noqa: BLE001 - a bug fails its turn, not the conversation
                log.exception("turn failed", method="ChatSession")
                yield pb.ChatSessionResponse(failure=internal_error().to_status_proto().SerializeToString())

    async def CreateSession(self, request, context) -> pb.CreateSessionResponse:
        tenant = self._auth.authenticate(context.invocation_metadata())
        return pb.CreateSessionResponse(session_id=await self._create_session(tenant, context))

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        tenant = self._auth.authenticate(context.invocation_metadata())
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    alias=alias,
                    context_window_tokens=model.context_window_tokens,
                    max_output_tokens=model.max_output_tokens,
                )
                for alias, model in sorted(self._models.items())
                if tenant.may_use(alias)
            ]
        )

    async def _turn(
        self, tenant: Tenant, turn, session_id: str, response_type, context, create_session: bool = False
    ):
        started = time.perf_counter()
        model = resolve_model(turn.model, tenant, self._models)
        max_tokens = check_turn(turn, model, self._settings.router)
        # Only after validation: a refused first turn leaves no empty session behind.
        if create_session:
            session_id = await self._create_session(tenant, context)
        strict = turn.HasField("expected_session_version")
        parameters = common_pb2.GenerationParameters()
        parameters.CopyFrom(turn.parameters)
        # "Unset" and "the default" are the same request: one cache entry for both.
        parameters.max_tokens = max_tokens
        scope = cache_pb.CacheScope(tenant_id=tenant.id, model=turn.model, parameters=parameters)
        reads_cache = turn.cache_policy in _READS_CACHE
        writes_cache = turn.cache_policy != pb.CACHE_POLICY_BYPASS

        lookup = None
        session_version = 0
        prompt = turn.messages
        # A stateless request is its own prompt: look it up before assembling,
        # so a hit costs no context call.
        if reads_cache and not session_id:
            lookup = await self._lookup(scope, turn.messages, context)
        if lookup is None:
            assembled = await self._assemble(tenant, session_id, turn, model, max_tokens, context)
            if assembled is not None:
                prompt, session_version = assembled.messages, assembled.session_version
            if strict and session_id and session_version != turn.expected_session_version:
                raise _version_conflict(session_id, session_version)
            if reads_cache and session_id:
                lookup = await self._lookup(scope, prompt, context)
        cache_key_messages = prompt if session_id else turn.messages

        delivered_deltas = 0
        if lookup is not None:
            answer = lookup.answer
            cache_status = _CACHE_STATUS[lookup.status]
            similarity = lookup.similarity
            yield response_type(delta=pb.TextDelta(text=answer.text))
            delivered_deltas = 1
        else:
            cache_status = pb.CACHE_STATUS_MISS if writes_cache else pb.CACHE_STATUS_BYPASSED
            similarity = 0.0
            answer = cache_pb.CachedAnswer()
            async for text in self._generate(turn.model, prompt, parameters, answer, context):
                yield response_type(delta=pb.TextDelta(text=text))
                delivered_deltas += 1

        # Store and append concurrently: the completion waits for both, so
        # a follow-up request already finds the turn and the cache entry.
        saving = []
        if writes_cache and lookup is None and answer.text:
            saving.append(self._store(scope, cache_key_messages, answer, context))
        if session_id:
            saving.append(self._append(tenant, session_id, session_version, turn, answer, strict, context))
        try:
            saved = await asyncio.gather(*saving)
        except MeshgateError as failure:
            # The answer went out but the turn was not saved: the stream ends
            # non-OK, saying how much of it the caller holds.
            partly_delivered(failure, delivered_deltas, len(answer.text), answer.usage.completion_tokens)
            raise
        if session_id:
            session_version = saved[-1]
        log.info(
            "turn",
            tenant=tenant.id,
            model=turn.model,
            cache=pb.CacheStatus.Name(cache_status),
            completion_tokens=answer.usage.completion_tokens,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        yield response_type(
            completion=pb.ChatCompletion(
                usage=answer.usage,
                cache_status=cache_status,
                cache_similarity=similarity,
                deployment=answer.deployment,
                trace_id=telemetry.current_trace_id(),
                session_id=session_id,
                session_version=session_version,
                finish_reason=answer.finish_reason,
            )
        )

    async def _generate(self, alias: str, prompt, parameters, answer: cache_pb.CachedAnswer, context):
        """Streams deltas from the first deployment that takes the request;
        fills ``answer`` as it goes."""
        last_error: grpc.aio.AioRpcError | None = None
        for deployment in self._deployments.candidates(alias):
            call = deployment.stub.Generate(
                inference_pb.GenerateRequest(model=deployment.model, messages=prompt, parameters=parameters),
                timeout=self._generation_timeout(context),
            )
            pieces: list[str] = []
            completed = False
            try:
                async for response in call:
                    if response.HasField("delta"):
                        pieces.append(response.delta.text)
                        yield response.delta.text
                    else:
                        completion = response.completion
                        answer.usage.CopyFrom(completion.usage)
                        answer.finish_reason = completion.finish_reason
                        completed = True
            except grpc.aio.AioRpcError as error:
                # Another deployment may take it, but only before the caller saw output.
                if error.code() == grpc.StatusCode.UNAVAILABLE and not pieces:
                    log.warning(
                        "deployment unavailable, trying the next",
                        deployment=deployment.name,
                        details=error.details(),
                    )
                    deployment.record_failure()
                    last_error = error
                    continue
                failure = from_rpc_error(error, "inference")
                if pieces:
                    # Our own count of what reached our caller (every piece
                    # was yielded before the next read failed); the tokens
                    # behind it are the inference service's count.
                    tokens = failure.metadata.get("delivered_tokens")
                    partly_delivered(
                        failure, len(pieces), sum(map(len, pieces)), int(tokens) if tokens else None
                    )
                raise failure from error
            finally:
                # Reached on caller cancellation too: the inference call, and
                # through it the Triton request, must not outlive the caller.
                call.cancel()
            if not completed:
                raise partly_delivered(
                    MeshgateError(
                        grpc.StatusCode.UNAVAILABLE,
                        Reason.STREAM_ENDED_EARLY,
                        "the inference stream ended without a completion",
                        {"deployment": deployment.name},
                    ),
                    len(pieces),
                    sum(map(len, pieces)),
                )
            deployment.record_success()
            answer.text = "".join(pieces)
            answer.deployment = deployment.name
            return
        detail = last_error.details() if last_error else "no deployment configured"
        raise unavailable(Reason.NO_DEPLOYMENT_AVAILABLE, f"no deployment of {alias!r} could serve: {detail}")

    def _timeout(self, context) -> float:
        """The downstream budget, never past the caller's own deadline."""
        remaining = context.time_remaining()
        return self._timeout_s if remaining is None else max(0.0, min(self._timeout_s, remaining))

    def _generation_timeout(self, context) -> float:
        remaining = context.time_remaining()
        limit = self._settings.router.max_generation_s
        return limit if remaining is None else max(0.0, min(limit, remaining))

    async def _lookup(self, scope, messages, context) -> cache_pb.LookupResponse | None:
        """A hit, or None. The cache is an optimization: when it fails, the
        request is generated instead of failing."""
        try:
            response = await self._cache.Lookup(
                cache_pb.LookupRequest(scope=scope, messages=messages, semantic=True),
                timeout=self._timeout(context),
                metadata=self._tenant_tokens.metadata(scope.tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cache lookup failed", code=error.code().name, details=error.details())
            return None
        return response if response.status in _CACHE_STATUS else None

    async def _assemble(
        self, tenant: Tenant, session_id: str, turn, model: ModelSettings, max_tokens: int, context
    ) -> context_pb.AssembleContextResponse | None:
        """The prompt from the context service; None when a stateless request
        should go out as sent because the context service cannot be reached.

        A stateless request needs the context service only to fit the prompt
        to the window, so its outage degrades that request (the model's own
        window check still refuses a prompt that is too long) instead of
        failing it. A session request cannot be answered without its history.
        """
        try:
            return await self._context.AssembleContext(
                context_pb.AssembleContextRequest(
                    tenant_id=tenant.id,
                    session_id=session_id,
                    new_messages=turn.messages,
                    model=turn.model,
                    max_prompt_tokens=model.context_window_tokens - max_tokens,
                ),
                timeout=self._timeout(context),
                metadata=self._tenant_tokens.metadata(tenant.id, "context"),
            )
        except grpc.aio.AioRpcError as error:
            if not session_id and error.code() in _CONTEXT_OUTAGE:
                log.warning("context service unreachable; sending the prompt as is", code=error.code().name)
                return None
            raise from_rpc_error(error, "context") from error

    async def _store(self, scope, messages, answer, context) -> None:
        try:
            await self._cache.Store(
                cache_pb.StoreRequest(scope=scope, messages=messages, answer=answer),
                timeout=self._timeout(context),
                metadata=self._tenant_tokens.metadata(scope.tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cache store failed", code=error.code().name, details=error.details())

    async def _append(self, tenant, session_id, expected_version, turn, answer, strict, context) -> int:
        """Appends the turn's messages and the answer as one adjacent block.

        Strict turns append only at the version they were answered from
        (ABORTED otherwise). Other turns append after whatever the session
        holds by then, so concurrent turns on one session all land. One turn
        id for every attempt: a retry after a lost reply is answered, not
        applied twice.
        """
        request = context_pb.AppendTurnsRequest(
            tenant_id=tenant.id,
            session_id=session_id,
            expected_version=expected_version,
            any_version=not strict,
            turn_id=uuid.uuid4().hex,
            messages=[
                *turn.messages,
                common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=answer.text),
            ],
        )
        for attempt in range(_APPEND_ATTEMPTS):
            try:
                response = await self._context.AppendTurns(
                    request,
                    timeout=self._timeout(context),
                    metadata=self._tenant_tokens.metadata(tenant.id, "context"),
                )
                return response.version
            except grpc.aio.AioRpcError as error:
                # UNAVAILABLE: the context service or its Redis is restarting;
                # the turn id makes the retry safe.
                if error.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < _APPEND_ATTEMPTS:
                    await asyncio.sleep(_APPEND_RETRY_DELAY_S * (attempt + 1))
                    continue
                # The answer was streamed but is not saved: the turn must not
                # look acknowledged, so the stream ends with this error.
                raise from_rpc_error(error, "context") from error
        raise AssertionError("unreachable")

    async def _create_session(self, tenant: Tenant, context) -> str:
        try:
            response = await self._context.CreateSession(
                context_pb.CreateSessionRequest(tenant_id=tenant.id),
                timeout=self._timeout(context),
                metadata=self._tenant_tokens.metadata(tenant.id, "context"),
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "context") from error
        return response.session.session_id


def _version_conflict(session_id: str, current_version: int) -> MeshgateError:
    return MeshgateError(
        grpc.StatusCode.ABORTED,
        Reason.VERSION_CONFLICT,
        "the session is not at the expected version",
        {"session_id": session_id, "current_version": str(current_version)},
    )
