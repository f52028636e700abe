"""The router's gRPC front end: takes the caller the gate authenticated
before the request was read (services/router/auth.py CallerGate), hands each turn to
the transport-free :class:`~services.router.pipeline.Pipeline`, and maps its
events to protobuf (deadline -> Budget, hang-up -> cancellation)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import math
import time

import grpc
import structlog
from google.protobuf import message_factory

from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import MeshgateError, clip, internal_error, invalid_argument
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.admission import SessionStreams, tightest_windows
from services.router.auth import current_caller, current_tenant
from services.router.downstream import own_request_id
from services.router.keys import check_tenant_id
from services.router.ledger import METRICS, Ledger
from services.router.pipeline import (
    Budget,
    CacheStatus,
    Completion,
    Delivered,
    Delta,
    Failure,
    Pipeline,
    stopped,
)

_CACHE_STATUS = {
    CacheStatus.EXACT_HIT: pb.CACHE_STATUS_EXACT_HIT,
    CacheStatus.SEMANTIC_HIT: pb.CACHE_STATUS_SEMANTIC_HIT,
    CacheStatus.MISS: pb.CACHE_STATUS_MISS,
    CacheStatus.BYPASSED: pb.CACHE_STATUS_BYPASSED,
}
_RATE_LIMIT_KIND = {
    "requests_per_minute": pb.RATE_LIMIT_KIND_REQUESTS_PER_MINUTE,
    "tokens_per_minute": pb.RATE_LIMIT_KIND_TOKENS_PER_MINUTE,
}

log = structlog.get_logger(__name__)


def completion_proto(completion: Completion, now_s: float | None = None) -> pb.ChatCompletion:
    """``now_s`` (time.monotonic(); default now): when the completion goes
    out, which its rate limits' resets count from."""
    answer = completion.answer
    return pb.ChatCompletion(
        text=completion.text,
        usage={"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens},
        cache_status=_CACHE_STATUS[completion.cache_status],
        cache_similarity=completion.similarity,
        deployment=answer.deployment,
        trace_id=completion.trace_id,
        session_id=completion.session_id,
        session_version=completion.session_version,
        finish_reason=answer.finish_reason,
        selected_model=completion.model,
        selection_reason=completion.selection.reason if completion.selection else "",
        selection_score=completion.selection.score if completion.selection else 0.0,
        cache_entry_id=completion.cache_entry_id,
        rate_limits=_rate_limits(completion.rate_windows, now_s) if completion.rate_windows else (),
    )


def _rate_limits(windows, now_s: float | None) -> list[pb.RateLimit]:
    now_s = time.monotonic() if now_s is None else now_s
    return [
        pb.RateLimit(
            kind=_RATE_LIMIT_KIND[window.limit],
            limit=window.value,
            remaining=window.remaining,
            reset_ms=window.frees_in_ms_at(now_s),
        )
        for window in tightest_windows(windows)
    ]


# Metadata a ChatSession stream may open with: the session it continues.
SESSION_METADATA_KEY = "meshgate-session-id"
# The initial metadata of a ChatSession stream the router admitted, sent at
# once. A stream refused at open (API key, SERVICE_BUSY, its tenant's
# streams) gets none: its status comes trailers-only, whose initial metadata
# is empty. So a client that awaits the initial metadata before its first
# write, and writes only where this is in it, never writes to a call the
# router has ended: such a write makes grpc.aio report a local INTERNAL
# ("Internal error from Core") in place of the router's status
# (grpc/grpc#36066). A marker, not the metadata's arrival alone: whether
# grpc.aio has the call done by the time a trailers-only response's empty
# initial metadata is returned is up to its event loop's ordering.
ADMITTED_METADATA = (("meshgate-admitted", "1"),)
# The headers a session Chat sends as it commits its call, before its turn is
# stored: a call that then fails bare (its router killed, the connection cut)
# may have stored the turn, though no ErrorInfo can say turn_may_be_stored;
# the client checks GetSession before sending it again.
SAVING_METADATA = (("meshgate-turn-saving", "1"),)
# A ChatSession turn refused with these named no session: the stream's stays
# what it was (a turn refused for anything else still moves it to the one it
# named, which the client chose).
_NO_SUCH_SESSION = frozenset({Reason.SESSION_NOT_FOUND, Reason.INVALID_SESSION_ID})


@dataclasses.dataclass(slots=True)
class _Call:
    """A Chat or ChatSession call as the stop sees it (_Turns)."""

    task: asyncio.Task
    # The router's stop asked this call to end (cut_after).
    cut: bool = False
    # A ChatSession is between handing gRPC a message and gRPC taking the
    # next: cancelled there, gRPC's own write would take the cancel and
    # close the handler unseen (a bare status). The cut waits for it.
    writing: bool = False
    # The turn is being stored, or is: a cut turn may be stored.
    saving: bool = False
    # The session a turn created, once it is known (before it is stored).
    session_id: str = ""
    # What of the current turn's answer went out (counted as each delta is
    # handed to gRPC: a write the cut lands in still completes in its core).
    sent: Delivered = dataclasses.field(default_factory=Delivered)

    def failure(self, session_id: str = "") -> MeshgateError:
        """The status a turn the stop cut ends with: how much went out, and
        whether it may be stored (then the client must not resend it)."""
        cut = self.sent.cut(stopped())
        if session_id or self.session_id:
            cut.metadata["session_id"] = session_id or self.session_id
        if self.saving:
            cut.metadata["turn_may_be_stored"] = "true"
        return cut

    def bug(self) -> MeshgateError:
        """The status a bug of the servicer's own ends the call with, logged
        here (the error interceptor would end it INTERNAL too, but knows
        nothing of the stream): how much of the turn's answer went out."""
        log.exception("router call failed")
        return self.sent.told(internal_error())

    async def saving_turn(self, session_id: str) -> None:
        """Pipeline.run's before_saving."""
        self.saving = True
        self.session_id = session_id


def _timeout_round_up_s(remaining_s: float) -> float:
    """How much later than its caller's a deadline of ``remaining_s`` may read
    here: gRPC core (Python's, C++'s clients) sends a timeout in three
    significant digits, rounded up, so a 4 s deadline reads 4.009 s here and
    a 60 s one 60.099 s (measured); other clients round finer."""
    if remaining_s < 1.0:
        return 0.001
    return 10.0 ** (math.floor(math.log10(remaining_s)) - 2)


def caller_budget(context, margin_s: float) -> Budget:
    """A call's budget: its caller's deadline as the call reads it, less
    ``margin_s`` (router.deadline_margin_s) and what gRPC's timeout header
    may have added to it (_timeout_round_up_s), at most a tenth of the time
    left (a short deadline keeps its call). Ended at the deadline itself,
    the router's status raced the caller's own timer and lost: smollm2 turns
    cut midway by a 4 s deadline on loopback got the bare local
    DEADLINE_EXCEEDED 19 times in 19, and so did GetSession, ListSessions
    and CreateSession with a 1 s deadline while the context service's
    answers were held back, 9 times in 9, though the router's call to it
    had been given the caller's time."""
    remaining = context.time_remaining()
    if remaining is None:
        return Budget()
    margin_s += _timeout_round_up_s(remaining)
    return Budget.of(remaining - min(margin_s, max(0.0, remaining) / 10))


class _Turns:
    """The Chat and ChatSession calls open on this router, so that a stop can
    end those still in a turn just before its grace runs out, each with a
    status that says how much of the answer went out (STREAM_ENDED_EARLY,
    delivered_*), where gRPC would cancel them with a bare UNAVAILABLE
    ("Cancelling all calls")."""

    def __init__(self) -> None:
        self._open: dict[asyncio.Task, _Call] = {}
        self._none_open = asyncio.Event()

    @contextlib.contextmanager
    def open(self):
        task = asyncio.current_task()
        call = self._open[task] = _Call(task)
        try:
            yield call
        finally:
            del self._open[task]
            if not self._open:
                self._none_open.set()

    @staticmethod
    def cut_here(call: _Call) -> bool:
        """Whether the cancellation being handled is :meth:`cut_after`'s
        (then taken back: the call ends with its own status instead)."""
        if not call.cut:
            return False
        call.task.uncancel()
        return True

    async def cut_after(self, seconds: float) -> None:
        """Ends the calls still open after ``seconds`` (none left: sooner):
        cancels each, but one in a gRPC write, which sees the cut when the
        write is done."""
        if self._open:
            self._none_open.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_open.wait(), max(0.0, seconds))
        for call in list(self._open.values()):
            call.cut = True
            if not call.writing:
                call.task.cancel()


class RouterServicer(router_service_pb2_grpc.RouterServiceServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline, ledger: Ledger) -> None:
        self._models = settings.models
        self._retention_days = settings.router.usage_retention_days
        self._deadline_margin_s = settings.router.deadline_margin_s
        self._pipeline = pipeline
        self._ledger = ledger
        self.session_streams = SessionStreams(settings.router.max_session_streams_per_tenant)
        # Set once the router starts to stop (drain): ChatSession streams
        # end between turns instead of holding the grace open, idle.
        self._stopping: asyncio.Future | None = None
        self._turns = _Turns()

    async def drain(self, grace_s: float) -> None:
        """serving.stop's drain (services/router/app.py): an idle ChatSession
        stream ends at once and one in a turn after that turn, each with
        SERVICE_STOPPING and where its session stands, so the client opens
        it again elsewhere and goes on from there. Left to the grace, every
        stream held the router for all of it and then ended with gRPC's bare
        UNAVAILABLE, a turn stored or not: a client resending it stored it
        twice."""
        stopping = self._stopping_future()
        if not stopping.done():  # a second stop
            stopping.set_result(None)
        # A turn still running near the grace's end (a long generation) is
        # ended here, saying how much went out, before gRPC cancels it bare.
        await self._turns.cut_after(grace_s - min(1.0, grace_s / 4))

    def _budget(self, context) -> Budget:
        """The budget of a turn (Chat, each ChatSession turn), or of a unary
        call that calls another service: caller_budget."""
        return caller_budget(context, self._deadline_margin_s)

    def _stopping_future(self) -> asyncio.Future:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    async def _next_turn(self, requests, session_id: str, version: int | None):
        """The stream's next request, None at its end; SERVICE_STOPPING once
        the router stops, whether it was idle or a request had just come
        (not begun: the client sends it again, elsewhere)."""
        stopping = self._stopping_future()
        if not stopping.done():
            reading = asyncio.ensure_future(anext(requests, None))
            try:
                await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not reading.done():
                    reading.cancel()
            if not stopping.done():
                return reading.result()
            if reading.done() and not reading.cancelled():
                reading.exception()  # retrieved: the stream ends for the stop, not for it
        metadata = {"session_id": session_id} if session_id else {}
        if version is not None:
            metadata["session_version"] = str(version)
        raise MeshgateError(
            grpc.StatusCode.UNAVAILABLE,
            Reason.SERVICE_STOPPING,
            "the router is stopping; open the session's stream again (another replica answers)",
            metadata,
        )

    def reconfigure(self, settings: Settings) -> None:
        self._models = settings.models
        self._retention_days = settings.router.usage_retention_days
        self._deadline_margin_s = settings.router.deadline_margin_s
        self.session_streams.reconfigure(settings.router.max_session_streams_per_tenant)

    async def Chat(self, request: pb.ChatRequest, context, call: _Call | None = None):
        # The key was checked before the request was read, which its caller
        # may send long after (a call opened before its key was revoked):
        # resolved again now that it is in, as a ChatSession's next turn is.
        tenant = await current_tenant()
        budget = self._budget(context)
        sent = False

        async def commit(session_id: str) -> None:
            """Chat is in the mesh's retry policy (serving.RETRYABLE_METHODS):
            a client's channel resends a call that got nothing back, to
            another router. A session turn about to be appended must not be
            resent: it would be stored (and charged) twice. Its headers go
            out now, which commits the call; a one-piece answer held for the
            completion has written nothing yet."""
            if call is not None:
                await call.saving_turn(session_id)
            if not sent:
                try:
                    await context.send_initial_metadata(SAVING_METADATA)
                except grpc.aio.InternalError as error:  # its caller went away (chat_with_status)
                    raise asyncio.CancelledError() from error

        turn = self._pipeline.run(
            request,
            tenant,
            request.session_id,
            budget,
            carry_last_text=request.completion_may_carry_text,
            before_saving=commit,
        )
        # Closed on the way out, however the call ends: the turn settles at
        # once, not whenever the abandoned generator is collected.
        async with contextlib.aclosing(turn) as events:
            async for event in events:
                match event:
                    case Delta(text=text):
                        # Written before this generator resumes: by
                        # chat_with_status, or by gRPC for a yielding handler.
                        sent = True
                        if call is not None:
                            call.sent.add(event)
                        yield pb.ChatResponse(delta=pb.TextDelta(text=text))
                    case Completion():
                        yield pb.ChatResponse(completion=completion_proto(event))
                    case Failure(error=error):
                        # The error interceptor ends the call with its status.
                        raise error

    async def chat_with_status(self, request: pb.ChatRequest, context) -> bytes:
        """Chat as gRPC runs it (:func:`add_to_server`): each of Chat's
        messages is written as it comes, except the last, the completion,
        which is returned, so that gRPC sends it with the call's status in
        one batch. Yielded, it would go in a batch of its own and the status
        in another: one more completion-queue round trip, with its thread
        wake-ups, per call (router CPU a one-message exact hit: per-round
        ratio new / old, medians 0.86-0.91 over two A/B runs; bench/README.md,
        "the completion and the status in one batch"). The client sees the
        same server stream.
        Serialized here: a unary handler's context has no response serializer,
        so what it writes, and what this returns, goes out as given."""
        completion = None
        with self._turns.open() as call:
            try:
                async with contextlib.aclosing(self.Chat(request, context, call)) as responses:
                    async for response in responses:
                        if response.HasField("completion"):  # the last message: nothing follows it
                            completion = response.SerializeToString()
                            continue
                        try:
                            await context.write(response.SerializeToString())
                        except grpc.aio.InternalError as error:
                            # The write's batch failed in gRPC's core, which
                            # has ended the call: its caller went away (closed
                            # its connection, or cancelled) while the write was
                            # under way, before gRPC told this handler. Ended
                            # as when gRPC tells first: the error interceptor
                            # records CANCELLED, aborts nothing, logs nothing.
                            # (A delta over the send limit fails alike: its
                            # caller gets core's RESOURCE_EXHAUSTED. A yielding
                            # handler's writes are gRPC's own, which drops a
                            # failed write of a call its caller closed.)
                            raise asyncio.CancelledError() from error
            except asyncio.CancelledError:
                if not self._turns.cut_here(call):
                    raise
                # The router's stop, near its grace's end (drain); the
                # answer is whole once its completion is here (the turn was
                # settling).
                if completion is None:
                    raise call.failure() from None
            except MeshgateError:
                raise  # the turn's Failure, which says how much went out
            except Exception:  # noqa: BLE001 - a bug fails its call, saying what of it went out
                raise call.bug() from None
        if completion is None:
            # The pipeline ends every turn with a completion or a failure:
            # this is a bug, never an answer to pass off as OK.
            log.error("Chat ended without a completion", model=clip(request.model))
            raise call.sent.told(internal_error())
        return completion

    async def ChatSession(self, request_iterator, context):
        tenant = current_caller()
        # Counted in until the call's task ends, however it ends: an idle
        # stream is charged nothing else, so this bounds the idle streams one
        # key holds, within its tenant's call cap (which the gate counted it
        # against: services/router/auth.py CallerGate).
        self.session_streams.open(tenant.id, asyncio.current_task())
        # A stream opened for an existing session names it up front, so the
        # session is warmed while the caller's first message is still coming;
        # turns that name no session continue it.
        metadata = context.invocation_metadata() or ()
        session_id = next((value for key, value in metadata if key == SESSION_METADATA_KEY), "")
        if session_id:
            self._pipeline.warm_session(tenant, session_id)
        # Admitted: the client learns it now, not with the first answer, so
        # it can wait for this before writing a turn (ADMITTED_METADATA).
        await context.send_initial_metadata(ADMITTED_METADATA)
        with self._turns.open() as call:
            requests = aiter(request_iterator)
            version = None  # the session's, after a turn of this stream
            while (request := await self._next_turn(requests, session_id, version)) is not None:
                # The turn's session: the one it names, else the stream's. It
                # becomes the stream's unless the turn is refused because it
                # is no session (below): a session not found, or an id that is
                # none, made the stream's, failed every later turn naming none.
                turn_session = request.session_id or session_id
                # The key was checked when the stream opened, and a stream may
                # stay open for hours: each turn resolves it again (a stored
                # key's record from the key cache, no Redis call while it is
                # under 0.5 s old), so a key revoked or expired since, or gone
                # from a reloaded configuration, is refused as a new call with it
                # is, and a reload's limits and models apply from the next turn.
                # That turn fails in the stream, then the call ends with the same
                # status: no later turn could be served. (A client pipelining
                # turns may read that status as grpc's local INTERNAL,
                # grpc/grpc#36066 below: the failure carries the reason either
                # way.) Where Redis cannot tell (UNAVAILABLE) the turn fails
                # closed and the stream goes on, as after any failed turn.
                try:
                    tenant = await current_tenant()
                except MeshgateError as error:
                    yield pb.ChatSessionResponse(failure=error.to_status_proto().SerializeToString())
                    if error.code == grpc.StatusCode.UNAUTHENTICATED:
                        raise
                    continue
                # A failed turn is reported in the stream, which stays open: ending
                # the call while the client is still sending pipelined turns lets
                # grpc's asyncio client replace our status with "Internal error
                # from Core" (grpc/grpc#36066), and the next turn may well succeed.
                call.saving, call.session_id = False, ""
                turn = self._pipeline.run(
                    request,
                    tenant,
                    turn_session,
                    self._budget(context),
                    create_session=not turn_session,
                    carry_last_text=request.completion_may_carry_text,
                    before_saving=call.saving_turn,
                )
                call.sent = Delivered()
                done = False  # its completion or failure went out
                try:
                    async with contextlib.aclosing(turn) as events:
                        async for event in events:
                            match event:
                                case Delta(text=text):
                                    message = pb.ChatSessionResponse(delta=pb.TextDelta(text=text))
                                    call.sent.add(event)
                                case Completion():
                                    session_id, version = event.session_id, event.session_version
                                    message = pb.ChatSessionResponse(completion=completion_proto(event))
                                    done = True
                                case Failure(error=error, session_id=created):
                                    # A first turn that created its session and
                                    # failed as it was being stored (one that
                                    # failed before names none: the pipeline
                                    # deleted it), one whose append's outcome is
                                    # unknown, or one naming another session
                                    # refused for anything but that session's
                                    # being none (a limit, the model): the next
                                    # turns go on with its session, the client's
                                    # choice, past the version known here (which
                                    # the stop must not give).
                                    if created or error.metadata.get("turn_may_be_stored"):
                                        session_id, version = created or turn_session, None
                                    elif turn_session != session_id and error.reason not in _NO_SUCH_SESSION:
                                        session_id, version = turn_session, None
                                    failure = error.to_status_proto().SerializeToString()
                                    message = pb.ChatSessionResponse(failure=failure)
                                    done = True
                            # gRPC writes it while this waits (_Call.writing).
                            call.writing = True
                            yield message
                            call.writing = False
                            if call.cut and not done:
                                raise call.failure(turn_session)
                            # Cut once its completion or failure went out, the
                            # turn is whole: it is read to its end all the same
                            # (closed at its completion, the pipeline would settle
                            # it as cancelled), then the stop's status comes next.
                except asyncio.CancelledError:
                    if not self._turns.cut_here(call):
                        raise
                    # The router's stop, near its grace's end (drain).
                    if not done:
                        raise call.failure(turn_session) from None
                except MeshgateError:
                    raise  # the stop's cut, or the key's refusal
                except Exception:  # noqa: BLE001 - a bug fails its call, saying what of its turn went out
                    raise call.bug() from None

    async def CreateSession(self, request, context) -> pb.CreateSessionResponse:
        tenant = await current_tenant()
        budget = self._budget(context)
        session_id = await self._pipeline.create_session(tenant, budget, request.request_id)
        return pb.CreateSessionResponse(session_id=session_id)

    # A session's management: each the context service's method of its name,
    # the tenant the caller's key's (another's session is NOT_FOUND there, as
    # a missing one), the request checked there, not here.

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.GetSessionResponse:
        found = await self._on_session(
            "GetSession", context_pb.GetSessionRequest(session_id=request.session_id), context
        )
        session = found.session
        return pb.GetSessionResponse(
            session=pb.Session(
                session_id=session.session_id,
                version=session.version,
                messages=session.messages,
                create_time_ms=session.create_time_ms,
                update_time_ms=session.update_time_ms,
                compacted_turns=session.compacted_turns,
                pinned_turns=session.pinned_turns,
                pinned_facts=session.pinned_facts,
            )
        )

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        await self._on_session(
            "DeleteSession", context_pb.DeleteSessionRequest(session_id=request.session_id), context
        )
        return pb.DeleteSessionResponse()

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        listed = await self._on_session(
            "ListSessions",
            context_pb.ListSessionsRequest(page_size=request.page_size, page_token=request.page_token),
            context,
        )
        return pb.ListSessionsResponse(
            sessions=[
                pb.SessionSummary(
                    session_id=session.session_id,
                    version=session.version,
                    create_time_ms=session.create_time_ms,
                    update_time_ms=session.update_time_ms,
                    turn_count=session.turn_count,
                )
                for session in listed.sessions
            ],
            next_page_token=listed.next_page_token,
        )

    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.ForkSessionResponse:
        forked = await self._on_session(
            "ForkSession",
            context_pb.ForkSessionRequest(
                session_id=request.session_id,
                version=request.version,
                request_id=own_request_id(request.request_id),
            ),
            context,
        )
        return pb.ForkSessionResponse(session_id=forked.session.session_id, version=forked.session.version)

    async def RevertSession(self, request: pb.RevertSessionRequest, context) -> pb.RevertSessionResponse:
        strict = request.HasField("expected_version")
        reverted = await self._on_session(
            "RevertSession",
            context_pb.RevertSessionRequest(
                session_id=request.session_id,
                version=request.version,
                expected_version=request.expected_version,
                any_version=not strict,
            ),
            context,
        )
        return pb.RevertSessionResponse(version=reverted.version)

    async def PinToSession(self, request: pb.PinToSessionRequest, context) -> pb.PinToSessionResponse:
        pin = _pin(request, context_pb.PinToSessionRequest())
        if request.HasField("expected_version"):
            pin.expected_version = request.expected_version
        pinned = await self._on_session("PinToSession", pin, context)
        return pb.PinToSessionResponse(pin_count=pinned.pin_count)

    async def UnpinFromSession(
        self, request: pb.UnpinFromSessionRequest, context
    ) -> pb.UnpinFromSessionResponse:
        unpinned = await self._on_session(
            "UnpinFromSession", _pin(request, context_pb.UnpinFromSessionRequest()), context
        )
        return pb.UnpinFromSessionResponse(pin_count=unpinned.pin_count)

    async def _on_session(self, method: str, request, context):
        """The context service's answer to ``request``, for the caller's
        tenant as CreateSession's: its key resolved again now that the
        request is in, within the call's deadline."""
        tenant = await current_tenant()
        return await self._pipeline.session_call(method, request, tenant, self._budget(context))

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        tenant = await current_tenant()
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    alias=alias,
                    context_window_tokens=model.context_window_tokens,
                    max_output_tokens=model.most_output_tokens,
                )
                for alias, model in sorted(self._models.items())
                if tenant.may_use(alias)
            ]
        )

    async def ReportWrongHit(self, request: pb.ReportWrongHitRequest, context) -> pb.ReportWrongHitResponse:
        tenant = await current_tenant()
        if tenant is None:  # the admin credential has no hits of its own
            raise invalid_argument(Reason.TENANT_REQUIRED, "report a hit with its tenant's key")
        if not request.cache_entry_id:
            raise invalid_argument(
                Reason.INVALID_ENTRY_ID, "cache_entry_id must be a hit's ChatCompletion.cache_entry_id"
            )
        removed = await self._pipeline.report_wrong_hit(
            request.request,
            tenant,
            request.cache_entry_id,
            self._budget(context),
            request.selected_model,
        )
        return pb.ReportWrongHitResponse(entry_removed=removed)

    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.GetUsageResponse:
        caller = await current_tenant()
        if caller is None:  # the admin credential: any tenant, named
            if not request.tenant_id:
                raise invalid_argument(Reason.TENANT_REQUIRED, "the admin credential must name a tenant_id")
            tenant_id = check_tenant_id(request.tenant_id)
        elif request.tenant_id and request.tenant_id != caller.id:
            raise MeshgateError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.ADMIN_REQUIRED,
                "a tenant's key reads its own tenant's usage only",
            )
        else:
            tenant_id = caller.id
        days = request.days or 1
        if not 1 <= days <= self._retention_days:
            raise invalid_argument(
                Reason.INVALID_USAGE_PERIOD,
                f"days must be within [1, {self._retention_days}] (the ledger's retention)",
                days=str(request.days),
            )
        last_day = self._ledger.today()
        first_day = last_day - datetime.timedelta(days=days - 1)
        totals = await self._ledger.usage(tenant_id, first_day, last_day)
        return pb.GetUsageResponse(
            tenant_id=tenant_id,
            first_day=first_day.isoformat(),
            last_day=last_day.isoformat(),
            rows=[
                pb.UsageRow(
                    key_id=key_id,
                    model=model,
                    latency_ms_total=row["latency_ms"],
                    **{metric: row[metric] for metric in METRICS if metric != "latency_ms"},
                )
                for (key_id, model), row in sorted(totals.items())
            ],
        )


def _pin(request: pb.PinToSessionRequest | pb.UnpinFromSessionRequest, into):
    """``into``, the context service's pin request, naming ``request``'s
    session and pin (none where it names none: the context refuses that)."""
    into.session_id = request.session_id
    kind = request.WhichOneof("pin")
    if kind is not None:
        setattr(into, kind, getattr(request, kind))
    return into


# Each method's handler kind, by whether its requests and its responses stream.
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _method_handler(servicer: RouterServicer, method) -> grpc.RpcMethodHandler:
    """``method`` (a MethodDescriptor) served by the servicer's method of its
    name, as the generated registration serves it."""
    make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
    return make(
        getattr(servicer, method.name),
        request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
        response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
    )


def add_to_server(servicer: RouterServicer, server: grpc.aio.Server) -> None:
    """Registers every method of the RouterService (from its descriptor) as
    the generated code does, but with Chat answered by
    :meth:`RouterServicer.chat_with_status`: a unary-response handler that
    writes the deltas itself, the same server stream on the wire."""
    service = pb.DESCRIPTOR.services_by_name["RouterService"]
    handlers = {
        method.name: _method_handler(servicer, method) for method in service.methods if method.name != "Chat"
    }
    handlers["Chat"] = grpc.unary_unary_rpc_method_handler(
        servicer.chat_with_status, request_deserializer=pb.ChatRequest.FromString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
