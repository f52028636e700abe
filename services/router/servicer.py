"""The router's gRPC front end: authenticates the caller, hands each turn to
the transport-free :class:`~services.router.pipeline.Pipeline`, and maps its
events to protobuf (deadline -> Budget, hang-up -> cancellation)."""

from __future__ import annotations

import contextlib

from meshgate.config import Settings
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.auth import Authenticator
from services.router.pipeline import Budget, CacheStatus, Completion, Delta, Failure, Pipeline

_CACHE_STATUS = {
    CacheStatus.EXACT_HIT: pb.CACHE_STATUS_EXACT_HIT,
    CacheStatus.SEMANTIC_HIT: pb.CACHE_STATUS_SEMANTIC_HIT,
    CacheStatus.MISS: pb.CACHE_STATUS_MISS,
    CacheStatus.BYPASSED: pb.CACHE_STATUS_BYPASSED,
}


def completion_proto(completion: Completion) -> pb.ChatCompletion:
    answer = completion.answer
    return pb.ChatCompletion(
        usage={"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens},
        cache_status=_CACHE_STATUS[completion.cache_status],
        cache_similarity=completion.similarity,
        deployment=answer.deployment,
        trace_id=completion.trace_id,
        session_id=completion.session_id,
        session_version=completion.session_version,
        finish_reason=answer.finish_reason,
    )


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    def __init__(self, settings: Settings, authenticator: Authenticator, pipeline: Pipeline) -> None:
        self._models = settings.models
        self._auth = authenticator
        self._pipeline = pipeline

    async def Chat(self, request: pb.ChatRequest, context):
        tenant = self._auth.authenticate(context.invocation_metadata())
        budget = Budget.of(context.time_remaining())
        # Closed on the way out, however the call ends: the turn settles at
        # once, not whenever the abandoned generator is collected.
        async with contextlib.aclosing(
            self._pipeline.run(request, tenant, request.session_id, budget)
        ) as events:
            async for event in events:
                match event:
                    case Delta(text=text):
                        yield pb.ChatResponse(delta=pb.TextDelta(text=text))
                    case Completion():
                        yield pb.ChatResponse(completion=completion_proto(event))
                    case Failure(error=error):
                        # The error interceptor ends the call with its status.
                        raise error

    async def ChatSession(self, request_iterator, context):
        tenant = self._auth.authenticate(context.invocation_metadata())
        session_id = ""
        async for request in request_iterator:
            session_id = request.session_id or session_id
            # A failed turn is reported in the stream, which stays open: ending
            # the call while the client is still sending pipelined turns lets
            # grpc's asyncio client replace our status with "Internal error
            # from Core" (grpc/grpc#36066), and the next turn may well succeed.
            turn = self._pipeline.run(
                request,
                tenant,
                session_id,
                Budget.of(context.time_remaining()),
                create_session=not session_id,
            )
            async with contextlib.aclosing(turn) as events:
                async for event in events:
                    match event:
                        case Delta(text=text):
                            yield pb.ChatSessionResponse(delta=pb.TextDelta(text=text))
                        case Completion():
                            session_id = event.session_id
                            yield pb.ChatSessionResponse(completion=completion_proto(event))
                        case Failure(error=error):
                            yield pb.ChatSessionResponse(failure=error.to_status_proto().SerializeToString())

    async def CreateSession(self, request, context) -> pb.CreateSessionResponse:
        tenant = self._auth.authenticate(context.invocation_metadata())
        budget = Budget.of(context.time_remaining())
        return pb.CreateSessionResponse(session_id=await self._pipeline.create_session(tenant, budget))

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
