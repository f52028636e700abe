"""The pipeline's stages over gRPC: the context and cache services and the
inference deployments, called as the caller's tenant (a router-signed token
per call), within the turn's budget.

Each failure of another service becomes a MeshgateError with its reason
intact (``from_rpc_error``), but for a call the caller's own time ran out
in, which is DEADLINE_EXCEEDED (``failure_within``); nothing of gRPC leaves
this module.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import grpc
import structlog

from meshgate import balancing, metrics, streaming, telemetry
from meshgate.cache.v1 import cache_service_pb2 as cache_pb
from meshgate.common.v1 import common_pb2
from meshgate.config import RedisSettings, RouterSettings, cacheable_prompt
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.errors import (
    BUSY_RETRY_AFTER_S,
    DOMAIN,
    MeshgateError,
    busy_unavailable,
    clip,
    error_info,
    from_rpc_error,
    partly_delivered,
    received_code,
    retry_after_s,
    retry_info,
    unavailable,
)
from meshgate.inference.v1 import inference_service_pb2 as inference_pb
from meshgate.mesh_auth import TenantTokens
from meshgate.reasons import Reason
from meshgate.serving import is_retryable
from services.router.auth import Tenant
from services.router.deployments import PREFIX_BLOCK_CHARS, Deployment, DeploymentTable, left_rotation
from services.router.hot_exact import HotExactHits
from services.router.pipeline import (
    Answer,
    Appended,
    Assembly,
    Budget,
    CachePlan,
    CacheStatus,
    Hit,
    SummarySpend,
    Turn,
)
from services.router.summary_usage import OwedSummaries

log = structlog.get_logger(__name__)

_HIT_STATUS = {
    cache_pb.LOOKUP_STATUS_EXACT_HIT: CacheStatus.EXACT_HIT,
    cache_pb.LOOKUP_STATUS_SEMANTIC_HIT: CacheStatus.SEMANTIC_HIT,
}
# Attempts to save a turn while the context service is unavailable, and the
# pause before the first retry (it grows linearly).
_APPEND_ATTEMPTS = 3
_APPEND_RETRY_DELAY_S = 0.2
# How long a session turn waits for a restarting context service to listen
# again before failing UNAVAILABLE. A restart takes about a second; the
# router's channel then reconnects within its backoff (at most ~1.2 s:
# serving.RECONNECT_OPTIONS), and until it has, every call on it fails at
# once, gRPC's own retries included (they are spent within ~0.15 s).
_CONTEXT_RESTART_GRACE_S = 3.0
# The session calls (ContextService.session_call) are sent again after an
# UNAVAILABLE only where serving.is_retryable says a retry is safe: that can
# come after the service applied the call (its connection broke before the
# reply). A ForkSession or CreateSession always carries a request_id here
# (own_request_id), so its resend is answered with what the first made; a
# second RevertSession one
# more version, or ABORTED (VERSION_CONFLICT) for a strict revert the first
# made; a second DeleteSession or UnpinFromSession NOT_FOUND for what the
# first did. Those are sent again only when refused unread (SERVICE_BUSY),
# else fail UNAVAILABLE: their outcome unknown to the router as to its
# caller, who can read the session to learn it.
_CONTEXT_SERVICE = context_pb.DESCRIPTOR.services_by_name["ContextService"].full_name
_GENERATE = "/meshgate.inference.v1.InferenceService/Generate"
# The least a turn's answer takes in its session: an assistant message with
# no text. The router reserves that, not a bound derived from max_tokens
# (AssembleContextRequest.append_reservation): a token's text has no useful
# byte bound, so any such bound would refuse turns whose answer would have
# fit. So a turn whose question fits but whose answer then passes the byte
# cap is still refused by its append, after generation.
_EMPTY_ANSWER_BYTES = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT).ByteSize()
# Less of a generation's or an embeddings request's budget than this is not
# worth another inference service's try: the quickest work there (an Embed
# of one short text) takes about 10 ms (bench/README: a cache miss's
# embedding through inference, +9 to +10 ms), so such a try could only fail
# on its deadline, after sending the model work nobody waits for.
_LEAST_TRY_S = 0.01


def own_request_id(request_id: str) -> str:
    """The request id (AIP-155) a CreateSession or ForkSession goes to the
    context service with: its caller's, else one drawn for this call, so
    that the router's own resend after an UNAVAILABLE (the reply lost,
    the session made) is answered with the session the first send made,
    which that answer lists and counts, not a second one or an UNAVAILABLE
    that leaves the first unknown to its caller, unlisted and uncounted
    until it expires. A caller's resend is another request."""
    return request_id or str(uuid.uuid4())


def not_taken(error: grpc.aio.AioRpcError, service: str) -> bool:
    """Whether ``service`` (the one called) never took the call, so another
    replica, a later attempt or a degraded turn may do instead: UNAVAILABLE
    (or a CANCELLED it sent as it stopped: errors.received_code), or a
    replica of that service at its max_concurrent_rpcs (RESOURCE_EXHAUSTED
    / SERVICE_BUSY, refused before its request was read). A SERVICE_BUSY
    that names another service (one behind it, passed on) means the called
    service took the call. Any other
    RESOURCE_EXHAUSTED (SESSION_FULL, a limit) is the service's answer to
    this request: not retried (but for a deployment's refusal for the
    tenant's full queue there: Deployments.generate). Not in the channels'
    retryableStatusCodes for that reason."""
    code = received_code(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and _busy(error, service)


# What an append that failed so may have done all the same: its reply was
# lost (the context service or the connection went away, our timer or the
# caller's deadline fired first, Redis timed out under the script) or the
# service failed in a way it does not say the turn was left out. Any other
# code is the context service's answer that it did not append the turn
# (VERSION_CONFLICT, SESSION_NOT_FOUND, SESSION_FULL, ...), or a busy
# replica's refusal of a request it never read.
_APPEND_OUTCOME_UNKNOWN = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _may_have_appended(error: grpc.aio.AioRpcError) -> bool:
    """Whether the AppendTurns that failed with ``error`` may have stored
    its turn (its turn id makes a resend of ours safe, not a caller's resend
    of the turn, which is a new append)."""
    return received_code(error) in _APPEND_OUTCOME_UNKNOWN


def limit_metadata(budget: Budget, limit_s: float) -> dict[str, str]:
    """The metadata of a refusal for time spent that names
    router.max_generation_s (``limit_s``): where that limit, from now, ends
    before the caller's deadline (``budget``), else none. A caller's own
    deadline of 0.5 s was reported with max_generation_s 300, and the
    caller could not tell which limit it had met (a review)."""
    if budget.deadline is not None and budget.deadline - budget.clock() <= limit_s:
        return {}
    return {"max_generation_s": f"{limit_s:g}"}


def time_for_a_try(budget: Budget, limit_s: float, spent: str, metadata: dict[str, str]) -> float:
    """The timeout of one more inference service's try within ``budget``,
    which every try of one generation or embeddings request shares (at most
    ``limit_s``, router.max_generation_s); one failing late leaves the next
    what is left, not a fresh limit. Where under _LEAST_TRY_S is left, fails
    DEADLINE_EXCEEDED saying ``spent``, with ``metadata`` (limit_metadata)."""
    timeout_s = budget.within(limit_s)
    if timeout_s < _LEAST_TRY_S:
        raise MeshgateError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED, spent, {**metadata})
    return timeout_s


def failure_within(
    error: grpc.aio.AioRpcError, service: str, budget: Budget, spent: str = "", **metadata: str
) -> MeshgateError:
    """A call's failure as from_rpc_error says it, but for a call our own
    timer ended because ``budget`` (the caller's deadline, or a generation's
    or an embeddings request's max_generation_s within it) ran out during
    it: the caller's time spent, as when too little is left for a try
    (time_for_a_try), so DEADLINE_EXCEEDED with the reason DEADLINE_EXCEEDED,
    ``spent`` as its message and metadata ``service`` (the call it ran out
    in) and ``metadata``. Said before as DOWNSTREAM_FAILED: one condition,
    two reasons for a caller to key on. A call that ran past its own cap
    (router.downstream_timeout_s) with the budget left stays the service's
    failure (DOWNSTREAM_FAILED), and a status the service gave keeps its
    reason, but for the service's own DEADLINE_EXCEEDED: the deadline we
    gave it passing there first (it answers so before our timer fires, a
    race a test lost once) is the same time spent."""
    info = error_info(error)
    if (
        error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        and (info is None or (info.domain == DOMAIN and info.reason == Reason.DEADLINE_EXCEEDED))
        # What time_for_a_try leaves no try: a timer may fire a hair early.
        and budget.within(math.inf) < _LEAST_TRY_S
    ):
        return MeshgateError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.DEADLINE_EXCEEDED,
            spent or f"the caller's deadline passed before the {service} service answered",
            {"service": service, **metadata},
        )
    return from_rpc_error(error, service)


def _busy(error: grpc.aio.AioRpcError, service: str) -> bool:
    info = error_info(error)
    return (
        info is not None
        and info.domain == DOMAIN
        and info.reason == Reason.SERVICE_BUSY
        and info.metadata.get("service") == service
    )


def _tenants_queue_full(error: grpc.aio.AioRpcError) -> bool:
    """Whether a deployment's inference service refused a generation because
    the tenant already has its most waiting there for the model's slots
    (TOO_MANY_QUEUED_GENERATIONS, generation_slots.py): refused before any
    of it ran, for that replica's queue only, so another deployment (another
    inference service, other Triton servers) may have room for it."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    info = error_info(error)
    return info is not None and info.domain == DOMAIN and info.reason == Reason.TOO_MANY_QUEUED_GENERATIONS


def _model_not_served(error: grpc.aio.AioRpcError) -> bool:
    """Whether a service refused a call because it does not serve the model
    (NOT_FOUND MODEL_NOT_FOUND): a deployment's inference service the model
    the deployment names (services/inference/servicer.py), or the context
    service the alias (its settings lack it: ContextService.assemble). The
    mesh's misconfiguration, never the caller's, who named an alias the
    router serves. Refused as the call's first step, before any of it ran."""
    if error.code() != grpc.StatusCode.NOT_FOUND:
        return False
    info = error_info(error)
    return info is not None and info.domain == DOMAIN and info.reason == Reason.MODEL_NOT_FOUND


def _deployment_fault(error: grpc.aio.AioRpcError) -> bool:
    """Whether a deployment's failed Generate counts against its circuit and
    outlier ejection (meshgate/balancing.Health): its inference service gone
    (UNAVAILABLE), or failing inside (INTERNAL: its model failing in
    Triton, MODEL_ERROR; UNKNOWN: a handler that raised), as the inference
    service counts its Triton servers' (services/inference/servicer.py
    _server_fault). Counted as UNAVAILABLE alone, a deployment whose health
    check answered SERVING and whose every generation failed INTERNAL (its
    model's weights broken) kept its share of the turns for good: half of a
    two-deployment alias's (22 of 40 in a bug hunt), its circuit never
    opened and no outcome of it recorded for ejection. Only UNAVAILABLE,
    and refusals made before anything ran, go to the next deployment
    before any output (Deployments.generate): an INTERNAL may have run the
    model. A deployment whose inference service does not serve its model
    (_model_not_served) can take none of the alias's turns: counted, and
    (nothing ran) passed by. The
    caller's own refusals (INVALID_ARGUMENT), its deadline and a full queue
    say nothing of the deployment."""
    return _model_not_served(error) or received_code(error) in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    )


# When to retry a session turn the context service refused for an alias it
# does not know: a settings file's watch applies a change within 1-2 s.
UNKNOWN_ALIAS_RETRY_AFTER_S = 2.0


def _context_outage(error: grpc.aio.AioRpcError) -> bool:
    """A failure that says the context service is down or busy, not that the request is bad."""
    return not_taken(error, "context") or error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


class ContextService:
    def __init__(
        self,
        stub,
        tenant_tokens: TenantTokens,
        settings: RouterSettings,
        channel=None,
        redis_timeout_s: float = RedisSettings.timeout_s,
    ) -> None:
        self._stub = stub
        # The mesh's redis.timeout_s: a REDIS_UNAVAILABLE that took this long
        # to come is a Redis that stopped answering (_may_send_again).
        self._redis_timeout_s = redis_timeout_s
        # The stub's channel: a session call that found it unconnected waits
        # for it (_after_restart). None: no waiting (unit tests).
        self._channel = channel
        # The context service acts only for the tenant these tokens assert.
        self._tokens = tenant_tokens
        self._timeout_s = settings.downstream_timeout_s
        # The longest a session turn may take from its assembly until its
        # append lands, without a deadline of its caller's: the lookups and
        # the prompt's reservation (one call), its generation
        # (max_generation_s), then its append's tries: how long its
        # assembly holds room for that append (AppendReservation.hold_for_ms).
        appending_s = (_APPEND_ATTEMPTS + 1) * settings.downstream_timeout_s
        self._hold_limit_s = settings.max_generation_s + appending_s

    def _call_options(self, tenant_id: str, budget: Budget) -> dict:
        return {
            "timeout": budget.within(self._timeout_s),
            "metadata": self._tokens.metadata(tenant_id, "context"),
        }

    async def _after_restart(self, error: grpc.aio.AioRpcError, budget: Budget) -> bool:
        """Whether a session call that failed with ``error`` may be sent once
        more: it failed UNAVAILABLE and the channel is (again) ready within
        the grace: a context service restarting, not one that stays away.
        Session calls only: a stateless turn does without the service."""
        if self._channel is None or received_code(error) != grpc.StatusCode.UNAVAILABLE:
            return False
        try:
            await asyncio.wait_for(self._channel.channel_ready(), budget.within(_CONTEXT_RESTART_GRACE_S))
        except TimeoutError:
            return False
        log.info("context call failed UNAVAILABLE; its channel is ready, sending it again")
        return True

    async def _may_send_again(
        self,
        error: grpc.aio.AioRpcError,
        budget: Budget,
        pause_s: float = 0.0,
        took_s: float = 0.0,
        *,
        unavailable_too: bool = True,
    ) -> bool:
        """Whether a session call that failed with ``error`` after ``took_s``
        may be sent once more, having waited for it: UNAVAILABLE (where
        ``unavailable_too``: the call may have been applied), ``pause_s``
        and then a channel ready again (_after_restart), but for a Redis that
        stopped answering; a busy replica (SERVICE_BUSY, the request not
        read), the delay its RetryInfo asked for, when the turn's budget
        leaves that much (else the next attempt could only fail on its
        deadline)."""
        if self._redis_stalled(error, took_s):
            return False
        if received_code(error) == grpc.StatusCode.UNAVAILABLE:
            if not unavailable_too:
                return False
            await asyncio.sleep(budget.within(pause_s))
            return await self._after_restart(error, budget)
        if not not_taken(error, "context"):
            return False
        delay_s = retry_after_s(error) or BUSY_RETRY_AFTER_S
        if budget.within(delay_s) < delay_s:
            return False
        await asyncio.sleep(delay_s)
        return True

    def _redis_stalled(self, error: grpc.aio.AioRpcError, took_s: float) -> bool:
        """Whether ``error`` is the context service's Redis not answering
        (REDIS_UNAVAILABLE after the whole Redis timeout), not restarting (a
        refused connection fails at once): another attempt would wait as
        long again on the same Redis. Sent again, a session append held its
        turn three Redis timeouts and the pauses between (9.6 s at 3 s, by
        the arithmetic) before the same answer."""
        info = error_info(error) if error.code() == grpc.StatusCode.UNAVAILABLE else None
        stalled = info is not None and info.domain == DOMAIN and info.reason == Reason.REDIS_UNAVAILABLE
        return stalled and took_s >= self._redis_timeout_s

    async def _call(
        self, method, request, tenant_id: str, budget: Budget, *, session: bool, unavailable_too: bool = True
    ):
        """One unary call; one for a session is sent again once if the
        service did not take it (_may_send_again)."""
        started = time.monotonic()
        try:
            return await method(request, **self._call_options(tenant_id, budget))
        except grpc.aio.AioRpcError as error:
            took_s = time.monotonic() - started
            if not session or not await self._may_send_again(
                error, budget, took_s=took_s, unavailable_too=unavailable_too
            ):
                raise
        return await method(request, **self._call_options(tenant_id, budget))

    async def session_call(
        self, method: str, request, tenant: Tenant, budget: Budget, *, unavailable_too: bool | None = None
    ):
        """``method``, a ContextService method, with ``request`` acting for
        ``tenant`` (its tenant_id set here, so a caller names no other):
        sent again once if the service did not take it (_call), after an
        UNAVAILABLE only where ``unavailable_too`` (by default, where a
        retry is safe: serving.is_retryable); a failure is the service's,
        its reason intact (failure_within)."""
        if unavailable_too is None:
            unavailable_too = is_retryable(_CONTEXT_SERVICE, method, request)
        request.tenant_id = tenant.id
        try:
            return await self._call(
                getattr(self._stub, method),
                request,
                tenant.id,
                budget,
                session=True,
                unavailable_too=unavailable_too,
            )
        except grpc.aio.AioRpcError as error:
            raise failure_within(error, "context", budget) from error

    async def create_session(self, tenant: Tenant, budget: Budget, request_id: str = "") -> str:
        """A new session of ``tenant``'s, under the caller's ``request_id``
        (AIP-155), else one drawn here: the router's own resend after an
        UNAVAILABLE (CreateSession is retryable) is then answered with the
        session the first send made, not a second one, which no caller knew
        of, held against the tenant's bounds until it expired."""
        request = context_pb.CreateSessionRequest(request_id=own_request_id(request_id))
        response = await self.session_call("CreateSession", request, tenant, budget)
        return response.session.session_id

    async def delete_session(self, tenant: Tenant, session_id: str) -> None:
        """Within the router's own timeout, not a turn's budget: the turn
        that created the session may have ended for want of time."""
        request = context_pb.DeleteSessionRequest(session_id=session_id)
        # Sent again after an UNAVAILABLE too: a SESSION_NOT_FOUND for a
        # delete the first send did is only logged (Pipeline).
        await self.session_call("DeleteSession", request, tenant, Budget(), unavailable_too=True)

    async def assemble(self, turn: Turn) -> Assembly | None:
        """A stateless turn needs the context service only to fit the prompt
        to the window, so its outage degrades that turn (the model's own
        window check still refuses a prompt that is too long) instead of
        failing it. A session turn cannot be answered without its history,
        nor generated for when its append (the messages and the answer,
        :meth:`append`) could not fit the session: the assembly says so.
        """
        request = context_pb.AssembleContextRequest(
            tenant_id=turn.tenant.id,
            session_id=turn.session_id,
            new_messages=turn.messages,
            model=turn.model_alias,
            max_prompt_tokens=turn.model.context_window_tokens - turn.max_tokens,
        )
        if turn.session_id:
            request.append_reservation.turn_count = len(turn.messages) + 1
            request.append_reservation.size_bytes = (
                sum(m.ByteSize() for m in turn.messages) + _EMPTY_ANSWER_BYTES
            )
            if turn.expected_version is not None:
                # A strict turn's append requires this version (its
                # after_version, once the pipeline has checked it): checked
                # first, as the append checks it, so a stale turn on a full
                # session is told VERSION_CONFLICT, not SESSION_FULL.
                request.append_reservation.expected_version = turn.expected_version
            # The room is held for this turn's append (its turn id) while the
            # turn may still make it, so that turns sent beside it on the
            # session are checked against it too; a router that dies
            # mid-turn holds it no longer than that.
            request.append_reservation.hold_id = turn.turn_id
            hold_for_s = turn.budget.within(self._hold_limit_s)
            request.append_reservation.hold_for_ms = max(1, math.ceil(hold_for_s * 1000))
        try:
            response = await self._call(
                self._stub.AssembleContext,
                request,
                turn.tenant.id,
                turn.budget,
                session=bool(turn.session_id),
            )
        except grpc.aio.AioRpcError as error:
            unknown_alias = _model_not_served(error)
            if unknown_alias:
                # The alias is this router's (validated), so the context
                # service's settings lack it: a reload that added it not read
                # there yet (the file watch takes 1-2 s), refused there, or
                # another file. Not the caller's fault, and a retry is safe
                # (nothing was stored): a review saw NOT_FOUND (HTTP 404,
                # which no client retries) for a model ListModels listed.
                log.error(
                    "the context service does not know this model alias: reload its settings "
                    "(or read its log for a refused reload)",
                    model=turn.model_alias,
                    details=error.details(),
                )
            if not turn.session_id and (unknown_alias or _context_outage(error)):
                log.warning(
                    "context service unreachable, busy or without the alias; sending the prompt as is",
                    code=error.code().name,
                )
                return None
            if unknown_alias:
                raise MeshgateError(
                    grpc.StatusCode.UNAVAILABLE,
                    Reason.DOWNSTREAM_FAILED,
                    f"the context service does not serve model {turn.model_alias!r} yet; retry",
                    {"service": "context", "code": grpc.StatusCode.NOT_FOUND.name},
                    details=[retry_info(UNKNOWN_ALIAS_RETRY_AFTER_S)],
                ) from error
            raise failure_within(error, "context", turn.budget) from error
        return Assembly(list(response.messages), response.session_version, response.manifest.prompt_tokens)

    async def prefetch(self, tenant: Tenant, session_id: str) -> None:
        """Only a warm-up: a failure here (an unknown session, the service
        away) is the first turn's to report, so it is logged and dropped."""
        try:
            await self._stub.PrefetchSession(
                context_pb.PrefetchSessionRequest(tenant_id=tenant.id, session_id=session_id),
                timeout=self._timeout_s,
                metadata=self._tokens.metadata(tenant.id, "context"),
            )
        except grpc.aio.AioRpcError as error:
            log.debug("session warm-up failed", session_id=clip(session_id), code=error.code().name)

    async def append(self, turn: Turn, session_id: str, after_version: int, answer: Answer) -> Appended:
        """Appends the turn's messages and the answer as one adjacent block.

        Strict turns append only at the version they were answered from
        (ABORTED otherwise). Other turns append after whatever the session
        holds by then, so concurrent turns on one session all land. One turn
        id for every attempt: a retry after a lost reply is answered, not
        applied twice.
        """
        request = context_pb.AppendTurnsRequest(
            tenant_id=turn.tenant.id,
            session_id=session_id,
            expected_version=after_version,
            any_version=turn.expected_version is None,
            # Also the hold its assembly made, which the append releases.
            turn_id=turn.turn_id,
            key_id=turn.tenant.own_key_id,
            messages=[
                *turn.messages,
                common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=answer.text),
            ],
        )
        for attempt in range(_APPEND_ATTEMPTS):
            started = time.monotonic()
            try:
                response = await self._stub.AppendTurns(
                    request, **self._call_options(turn.tenant.id, turn.budget)
                )
                # Only a context service before TakeSummaryUsage took the
                # session's summaries' usage: still billed here, during a
                # rolling upgrade (a retry's reply carries what the first
                # attempt took, if it did).
                return Appended(response.version, _spends(response.summary_usage))
            except grpc.aio.AioRpcError as error:
                # UNAVAILABLE: the context service or its Redis is restarting
                # (the pause is for Redis: the channel is ready at once);
                # SERVICE_BUSY: its replica did not read the request. The
                # turn id makes the retry safe.
                pause_s = _APPEND_RETRY_DELAY_S * (attempt + 1)
                took_s = time.monotonic() - started
                if attempt + 1 < _APPEND_ATTEMPTS and await self._may_send_again(
                    error, turn.budget, pause_s, took_s
                ):
                    continue
                failure = failure_within(error, "context", turn.budget)
                if _may_have_appended(error):
                    # Its caller is told the turn failed, yet the session may
                    # hold it: a resend would store it twice, and the version
                    # its caller knows may be behind.
                    failure.metadata["session_id"] = session_id
                    failure.metadata["turn_may_be_stored"] = "true"
                raise failure from error
        raise AssertionError("unreachable")

    async def release_hold(self, turn: Turn, session_id: str) -> None:
        """Gives back the room the turn's assembly held for its append, for
        a turn that ended without one. Within the router's own timeout, not
        the turn's budget (it may have ended for want of time); sent again
        after an UNAVAILABLE (a second release finds nothing)."""
        request = context_pb.ReleaseAppendHoldRequest(session_id=session_id, hold_id=turn.turn_id)
        await self.session_call("ReleaseAppendHold", request, turn.tenant, Budget())

    async def claim_owed_summary_usage(self, owed_for_s: float, most: int) -> list[OwedSummaries]:
        """Sessions of any tenant whose summaries' usage waits for a take,
        owing for at least ``owed_for_s`` and claimed for as long
        (summary_usage.py). For no tenant: no tenant token."""
        request = context_pb.ClaimOwedSummaryUsageRequest(
            owed_for_ms=round(owed_for_s * 1000), max_sessions=most
        )
        try:
            response = await self._stub.ClaimOwedSummaryUsage(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A context service older than the RPC (an upgrade under
                # way): not logged per claim here; the sweeper says it once.
                raise MeshgateError(
                    error.code(),
                    Reason.DOWNSTREAM_FAILED,
                    "the context service has no ClaimOwedSummaryUsage",
                    {"service": "context", "code": error.code().name},
                ) from error
            raise from_rpc_error(error, "context") from error
        return [OwedSummaries(s.tenant_id, s.session_id, s.key_id) for s in response.sessions]

    async def take_summary_usage(
        self, tenant_id: str, session_id: str, take_id: str
    ) -> tuple[str, tuple[SummarySpend, ...]]:
        """What the session's summaries spent that no take took, taken and
        held until acknowledged, for the caller to bill (summary_usage.py),
        or the take the session holds already: the id of the take answered
        and what it took. Sent once: the caller sends it again when its
        reply is lost."""
        request = context_pb.TakeSummaryUsageRequest(
            tenant_id=tenant_id, session_id=session_id, take_id=take_id, hold_until_acknowledged=True
        )
        try:
            response = await self._stub.TakeSummaryUsage(
                request, timeout=self._timeout_s, metadata=self._tokens.metadata(tenant_id, "context")
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "context") from error
        # No take id: a context service older than the hold answered this one.
        return response.take_id or take_id, _spends(response.summary_usage)

    async def acknowledge_summary_usage(self, tenant_id: str, session_id: str, take_id: str) -> None:
        """Ends the hold of a take the caller billed (summary_usage.py)."""
        request = context_pb.AcknowledgeSummaryUsageRequest(
            tenant_id=tenant_id, session_id=session_id, take_id=take_id
        )
        try:
            await self._stub.AcknowledgeSummaryUsage(
                request, timeout=self._timeout_s, metadata=self._tokens.metadata(tenant_id, "context")
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A context service older than the hold (an upgrade under
                # way) took the take for good: nothing is held.
                return
            raise from_rpc_error(error, "context") from error


def _spends(usage) -> tuple[SummarySpend, ...]:
    """context.v1.SummaryUsage entries as the pipeline bills them."""
    return tuple(SummarySpend(u.model, u.prompt_tokens, u.completion_tokens, u.summaries) for u in usage)


class CacheService:
    """The cache is an optimization: when it fails, the turn is generated
    (lookup) or simply not cached (store), never failed. Repeats of a
    recent hit of the very same prompt are answered from ``hot`` without a
    hop (hot_exact.py)."""

    def __init__(
        self, stub, tenant_tokens: TenantTokens, settings: RouterSettings, hot: HotExactHits | None = None
    ) -> None:
        self._stub = stub
        self._tokens = tenant_tokens
        self._timeout_s = settings.downstream_timeout_s
        self._hot = hot

    @staticmethod
    def _scope(plan: CachePlan) -> cache_pb.CacheScope:
        return cache_pb.CacheScope(
            tenant_id=plan.tenant_id, model=plan.model, parameters=plan.parameters, route=plan.route
        )

    async def lookup(self, plan: CachePlan, messages, budget: Budget, semantic: bool) -> Hit | None:
        if not cacheable_prompt(messages):
            # The cache refuses it: a miss, without the call or its warning.
            return None
        if semantic and not plan.exact_lookup_answered:
            # The turn's exact lookup failed: the cache's Redis (or every
            # replica) is failing, and a semantic lookup, which reads the
            # same Redis first, would fail the same way, with the turn's
            # generated text held until it did. A bug hunt: with Redis
            # stopped, a stateless turn's first token came after two
            # redis.timeout_s (6.0 s), one per lookup, not one.
            return None
        hot = self._hot
        if hot is not None:
            hot_key = hot.key(plan, messages)
            hit = hot.get(hot_key)
            if hit is not None:
                return hit
            ticket = hot.ticket()
        try:
            response = await self._stub.Lookup(
                cache_pb.LookupRequest(
                    scope=self._scope(plan),
                    messages=messages,
                    semantic=semantic,
                    # The pipeline follows every exact miss with a semantic lookup.
                    semantic_follows=not semantic,
                ),
                timeout=budget.within(self._timeout_s),
                metadata=self._tokens.metadata(plan.tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cache lookup failed", code=error.code().name, details=error.details())
            return None
        status = _HIT_STATUS.get(response.status)
        if status is None:
            if not semantic:
                # The exact lookup answers before the generation starts; the
                # semantic one may read after an Invalidate the generation
                # began before.
                plan.store_fence[:] = [response.store_fence]
            return None
        cached = response.answer
        answer = Answer(
            text=cached.text,
            prompt_tokens=cached.usage.prompt_tokens,
            completion_tokens=cached.usage.completion_tokens,
            finish_reason=cached.finish_reason,
            deployment=cached.deployment,
        )
        hit = Hit(answer, status, response.similarity, response.entry_id)
        if hot is not None:
            # A semantic hit too: the cache's verdict on this very prompt
            # stands while its entry and its partition's strictness do, and
            # both changes are announced, as is a Store of the prompt itself
            # (filed under asked_entry_id too; hot_exact.py).
            hot.put(
                hot_key,
                ticket,
                hit,
                response.entry_id,
                plan.tenant_id,
                plan.model,
                response.heartbeat_id,
                asked_entry_id=response.asked_entry_id,
                expires_in_s=response.expires_in_ms / 1000,
            )
        return hit

    async def read_fence(self, plan: CachePlan, messages, budget: Budget) -> None:
        """For a turn that stores without looking up: the scope's
        store_fence alone (LookupRequest.fence_only), read before it
        generates, as an exact lookup's miss would give it. Unread when the
        cache fails: the answer is then not stored (:meth:`store`)."""
        if not cacheable_prompt(messages):
            return
        try:
            response = await self._stub.Lookup(
                # The messages only for a cache that predates fence_only.
                cache_pb.LookupRequest(scope=self._scope(plan), messages=messages, fence_only=True),
                timeout=budget.within(self._timeout_s),
                metadata=self._tokens.metadata(plan.tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cache fence read failed", code=error.code().name, details=error.details())
            return
        plan.store_fence[:] = [response.store_fence]

    async def store(self, plan: CachePlan, messages, answer: Answer, budget: Budget) -> None:
        if not cacheable_prompt(messages):
            return  # the cache refuses it (lookup)
        if self._hot is not None:
            self._hot.forget(self._hot.key(plan, messages))
        if answer.store_fence is None:
            # No lookup or fence read answered before the answer's
            # generation began (the cache failed then, or the turn that
            # began it used no cache): an Invalidate since then would not
            # stop this Store, which would keep an answer from before it.
            # The answer is not cached, which is all the cache's outage
            # costs the turn.
            log.info("answer not cached: no store_fence was read before it was generated")
            return
        cached = cache_pb.CachedAnswer(
            text=answer.text,
            usage=common_pb2.Usage(
                prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens
            ),
            finish_reason=answer.finish_reason,
            deployment=answer.deployment,
        )
        try:
            await self._stub.Store(
                cache_pb.StoreRequest(
                    scope=self._scope(plan),
                    messages=messages,
                    answer=cached,
                    store_fence=answer.store_fence,
                ),
                timeout=budget.within(self._timeout_s),
                metadata=self._tokens.metadata(plan.tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            if info is not None and info.domain == DOMAIN and info.reason == Reason.CACHE_QUOTA_EXCEEDED:
                # Every turn's Store of a tenant at its bound is refused until
                # its windows pass (a day or two): what an operator needs is
                # whose, not a warning a turn; how many, the counter.
                metrics.router().cache_quota_refusals.labels(plan.model).inc()
                log.info("answer not cached: the tenant's cache quota is full", tenant_id=plan.tenant_id)
                return
            log.warning("cache store failed", code=error.code().name, details=error.details())

    async def invalidate(self, tenant_id: str, model: str, budget: Budget) -> int:
        """Removes the tenant's entries (of ``model``, or all); how many.
        Every router's copies go with the cache's notice."""
        try:
            response = await self._stub.Invalidate(
                cache_pb.InvalidateRequest(tenant_id=tenant_id, model=model),
                timeout=budget.within(self._timeout_s),
                metadata=self._tokens.metadata(tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            raise failure_within(error, "cache", budget) from error
        # This router's copies go at once (a copy put by a lookup that ran
        # beside the call included), the others' with the cache's notice.
        if self._hot is not None:
            self._hot.forget_scope(tenant_id, model)
        return response.entries_removed

    async def report_wrong(self, plan: CachePlan, messages, entry_id: str, budget: Budget) -> bool:
        # This router's copy goes at once; the others' with the cache's notice.
        if self._hot is not None:
            self._hot.forget(self._hot.key(plan, messages))
        try:
            response = await self._stub.ReportWrongHit(
                cache_pb.ReportWrongHitRequest(scope=self._scope(plan), messages=messages, entry_id=entry_id),
                timeout=budget.within(self._timeout_s),
                metadata=self._tokens.metadata(plan.tenant_id, "cache"),
            )
        except grpc.aio.AioRpcError as error:
            raise failure_within(error, "cache", budget) from error
        return response.entry_removed


class Deployments:
    """Routes a generation to a model's deployments, in the table's order."""

    def __init__(self, table: DeploymentTable, settings: RouterSettings, tenant_tokens: TenantTokens) -> None:
        self._table = table
        self._limit_s = settings.max_generation_s
        # The inference service shares a model's generation slots fairly
        # among the tenants these tokens assert.
        self._tokens = tenant_tokens

    async def generate(
        self,
        alias: str,
        prompt,
        parameters,
        budget: Budget,
        answer: Answer,
        session_id: str = "",
        read_ahead: bool = True,
        tenant_id: str = "",
    ):
        # One budget for the whole generation, whichever deployments it
        # takes, from its start: without a caller's deadline (the HTTP edge,
        # a gRPC caller that set none, a shared generation) each try got a
        # fresh max_generation_s, so a deployment failing late before any
        # output (a Triton server dying under a waiting request; the health
        # checks end only the calls of a service that answers nothing) made
        # the turn last a multiple of it, past its admission lease too.
        limit = limit_metadata(budget, self._limit_s)
        budget = budget.capped(self._limit_s)
        last_error: grpc.aio.AioRpcError | None = None
        # The deployments' refusals for the tenant's full queue there.
        queue_full: list[grpc.aio.AioRpcError] = []
        strategy = self._table.strategy(alias)
        route = _route_request(strategy, prompt, session_id, tenant_id)
        tenant_token = self._tokens.metadata(tenant_id, "inference") if tenant_id else ()
        spent = (
            f"the generation's time (router.max_generation_s, {self._limit_s:g} s, or the caller's"
            " shorter deadline) passed before {}"
        )
        ranked = self._table.candidates(alias, route)
        tried: list[Deployment] = []
        while (deployment := self._table.next_to_try(alias, route, ranked, tried)) is not None:
            tried.append(deployment)
            timeout_s = time_for_a_try(budget, self._limit_s, spent.format("a deployment answered"), limit)
            # Over the untraced channel, with one client span per call (not
            # two more async generators per streamed message); its trace
            # context goes along, so the inference service's spans join.
            span, metadata = telemetry.start_grpc_client_span(_GENERATE, deployment.address)
            call = deployment.stream_stub.Generate(
                inference_pb.GenerateRequest(
                    model=deployment.model,
                    messages=prompt,
                    parameters=parameters,
                    # The last text on the completion: one message fewer per answer.
                    completion_may_carry_text=True,
                    tenant_id=tenant_id,
                ),
                timeout=timeout_s,
                metadata=metadata + tenant_token,
            )
            call_error: BaseException | None = None
            pieces: list[str] = []
            completed = False
            # The deployment's health checks ended the call (OpenCalls): the
            # checks hold it out and put it back at the first one answered,
            # so the call records no outcome (docs/routing.md): counted a
            # failure, it had the deployment ejected as an outlier for 30 s
            # (doubling per repeat) after its checks answered again.
            checks_ended = False
            prefill = strategy.prefill_left(deployment, route) if strategy is not None else 0
            # Open where the deployment's health checks can end it (OpenCalls).
            calls = deployment.calls
            calls.add(call)
            probing = deployment.health.begin()
            take_back_route = strategy.routed(deployment, route) if strategy is not None else None
            deployment.in_flight += 1
            deployment.active_tokens += route.prompt_units
            deployment.queued_prefill_tokens += prefill
            started = time.monotonic()
            try:
                try:
                    # Deltas that arrived together go on as one piece (a
                    # delta may carry several tokens): one trip through the
                    # pipeline and one message to the caller instead of one each.
                    async for batch in streaming.batches(call, read_ahead):
                        texts = []
                        for response in batch:
                            if response.HasField("delta"):
                                delta = response.delta
                                texts.append(delta.text)
                                # The counts behind the text so far: the
                                # prompt's on one delta, the completion's a
                                # running count (0 from a service before them).
                                if delta.prompt_tokens:
                                    answer.prompt_tokens_read = delta.prompt_tokens
                                answer.completion_tokens_so_far = delta.completion_tokens
                            else:
                                completion = response.completion
                                if completion.text:
                                    texts.append(completion.text)
                                answer.prompt_tokens = completion.usage.prompt_tokens
                                answer.completion_tokens = completion.usage.completion_tokens
                                # Behind the completion's text too (a
                                # shared generation's readers copy these).
                                answer.prompt_tokens_read = completion.usage.prompt_tokens
                                answer.completion_tokens_so_far = completion.usage.completion_tokens
                                answer.finish_reason = completion.finish_reason
                                completed = True
                        if not texts:
                            continue
                        if not pieces:
                            # Output fixes the deployment (no other is tried
                            # after it): the turn's latency metrics name it.
                            answer.deployment = deployment.name
                            deployment.ttft.add(time.monotonic() - started)
                            deployment.queued_prefill_tokens -= prefill
                        text = texts[0] if len(texts) == 1 else "".join(texts)
                        pieces.append(text)
                        yield text
                except asyncio.CancelledError as cancelled:
                    if not calls.ended_by_probes(call):
                        raise
                    # Not our caller's cancel: the deployment's health checks
                    # got no answer and ended its calls. UNAVAILABLE, as if it
                    # had died: the next deployment before any text, a
                    # stream ended UNAVAILABLE after some (never a short
                    # answer). After the completion the whole answer is
                    # here: the checks only cut short the wait for the end.
                    if not completed:
                        checks_ended = True
                        raise left_rotation() from cancelled
            except grpc.aio.AioRpcError as error:
                call_error = error
                # Another deployment may take it, but only before the caller
                # saw output. The tenant's full queue at one inference service
                # is refused before any work began, as a busy replica's call.
                # So is a refusal for a model the deployment's inference
                # service does not serve: a misconfiguration, refused before
                # anything ran, that no retry there would mend.
                queue_full_here = _tenants_queue_full(error)
                misconfigured = _model_not_served(error)
                if (queue_full_here or misconfigured or not_taken(error, "inference")) and not pieces:
                    if misconfigured:
                        log.error(
                            "deployment's inference service does not serve its model; trying the next",
                            deployment=deployment.name,
                            address=deployment.address,
                            model=deployment.model,
                            details=error.details(),
                        )
                    else:
                        log.warning(
                            "deployment unavailable or busy, trying the next",
                            deployment=deployment.name,
                            details=error.details(),
                        )
                    # A busy replica (or one full for this tenant) is up: its
                    # circuit must not open for it, nor a half-open probe it
                    # refused hold the slot.
                    if _deployment_fault(error) and not checks_ended:
                        deployment.health.record_failure()
                    elif probing:
                        deployment.health.release_probe(probing)
                    if queue_full_here:
                        queue_full.append(error)
                    else:
                        last_error = error
                    # A completion without text may have come before the
                    # failure: what it filled is not the answer's (a finish
                    # reason says the next piece is the last, Generator).
                    answer.prompt_tokens = answer.completion_tokens = 0
                    answer.prompt_tokens_read = answer.completion_tokens_so_far = 0
                    answer.finish_reason = ""
                    continue
                if _deployment_fault(error) and not checks_ended:
                    deployment.health.record_failure()
                elif probing:
                    # The request's own refusal, its time running out: no
                    # outcome of the deployment's (_deployment_fault), whose
                    # half-open slot would otherwise stay taken for
                    # open_for_s, no trial let in.
                    deployment.health.release_probe(probing)
                # Cut midway, it did answer: the answer was not complete.
                spent_on = "the answer was complete" if pieces else "a deployment answered"
                failure = failure_within(error, "inference", budget, spent.format(spent_on), **limit)
                if pieces:
                    # Our own count of what reached our caller (every piece
                    # was yielded before the next read failed), and of the
                    # tokens behind it, which the last delta carried; else
                    # the inference service's failure's, where it counted
                    # them (none when this call's deadline passed).
                    tokens = failure.metadata.get("delivered_tokens")
                    partly_delivered(
                        failure,
                        len(pieces),
                        sum(map(len, pieces)),
                        answer.completion_tokens_so_far or (int(tokens) if tokens else None),
                    )
                raise failure from error
            except BaseException as error:  # cancelled, closed: the span says so, then on it goes
                call_error = error
                if probing and isinstance(error, asyncio.CancelledError | GeneratorExit):
                    # Its caller left (a deadline, a cancel, a cache hit
                    # overtaking the generation): neither a success nor a
                    # failure of the deployment, whose half-open slot would
                    # otherwise stay taken for open_for_s, no trial let in.
                    deployment.health.release_probe(probing)
                raise
            finally:
                telemetry.end_grpc_client_span(span, call_error)
                # Reached on cancellation too (the caller's, or a cache hit
                # overtaking a speculative generation): the inference call,
                # and through it the Triton request, must not outlive it. A
                # call that ended needs none (a cancel costs a trip into core).
                if not call.done():
                    call.cancel()
                calls.discard(call)
                deployment.in_flight -= 1
                deployment.active_tokens -= route.prompt_units
                if not pieces:
                    deployment.queued_prefill_tokens -= prefill
                    if take_back_route is not None and not completed:
                        # It computed none of the prompt (refused unread, or
                        # failed or left by its caller before an answer,
                        # handed on or not: the bundled models cache nothing
                        # of a request cancelled in its prefill): not
                        # believed to hold it, as the inference service
                        # takes back its own (docs/routing.md).
                        take_back_route()
            if not completed:
                deployment.health.record_failure()
                raise partly_delivered(
                    MeshgateError(
                        grpc.StatusCode.UNAVAILABLE,
                        Reason.STREAM_ENDED_EARLY,
                        "the inference stream ended without a completion",
                        {"deployment": deployment.name},
                    ),
                    len(pieces),
                    sum(map(len, pieces)),
                    answer.completion_tokens_so_far or None,
                )
            deployment.health.record_success()
            answer.text = "".join(pieces)
            answer.deployment = deployment.name
            return
        if queue_full:
            # The tenant's own load, where any others were down or busy: the
            # refusal is the caller's to act on, with the soonest a
            # deployment may have room as its RetryInfo (from_rpc_error
            # passes that on).
            raise from_rpc_error(min(queue_full, key=_retry_wait_s), "inference")
        no_deployment = f"no deployment of {alias!r} could serve"
        if last_error is not None and last_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise busy_unavailable(Reason.NO_DEPLOYMENT_AVAILABLE, f"{no_deployment}: busy; retry later")
        # The last refusal's own message where it carries one (a replica's
        # NO_READY_BACKEND); a transport failure's names the deployment's
        # host and port, for our logs only (from_rpc_error), and so does a
        # misconfigured one's its internal model name (logged above).
        if last_error is None:
            detail = "no deployment configured"
        elif _model_not_served(last_error):
            detail = "a deployment of it is misconfigured (its inference service does not serve its model)"
        else:
            detail = from_rpc_error(last_error, "inference").message
        raise unavailable(Reason.NO_DEPLOYMENT_AVAILABLE, f"{no_deployment}: {detail}")


def _retry_wait_s(refusal: grpc.aio.AioRpcError) -> float:
    """The wait a refusal's RetryInfo asks for; one without ranks last."""
    wait_s = retry_after_s(refusal)
    return math.inf if wait_s is None else wait_s


def _route_request(
    strategy: balancing.Strategy | None, prompt, session_id: str, tenant_id: str
) -> balancing.RouteRequest:
    """What the alias's strategy reads: the session, and for a prefix
    strategy the prompt's characters as a chain of blocks under the
    tenant's salt, as the models salt their prefix caches (its length is
    the decode load it adds, in the same units)."""
    if strategy is None or not strategy.uses_prefix:
        return balancing.RouteRequest(affinity_key=session_id)
    text = "".join(f"{message.role}\0{message.content}\0" for message in prompt)
    return balancing.RouteRequest(
        affinity_key=session_id,
        prefix_blocks=balancing.prefix_blocks(text, PREFIX_BLOCK_CHARS, tenant_id),
        prompt_units=len(text),
    )
