"""The ContextService RPCs: validation, token counting, and the glue between
the session store and the assembly policy."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid

import structlog

from meshgate import redis_access
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.errors import MeshgateError, invalid_argument, not_found
from meshgate.reasons import Reason
from services.context import assembly
from services.context import summaries as summaries_lib
from services.context.hot_cache import HotCache
from services.context.store import SessionStore, StoredSession, session_key
from services.context.token_counts import PromptCounter

log = structlog.get_logger(__name__)

# Bounds checked before any token counting, so a request cannot make the
# service tokenize without limit.
MAX_CONTENT_BYTES = 1024 * 1024
MAX_MESSAGES_PER_CALL = 1024
# A turn id is a key in the session's hash of applied appends.
MAX_TURN_ID_BYTES = 128

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ROLES = frozenset((common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT))


def _check_tenant(tenant_id: str) -> None:
    if not tenant_id:
        raise invalid_argument(Reason.TENANT_REQUIRED, "tenant_id is required")


def _check_session_id(session_id: str) -> None:
    if not _SESSION_ID.fullmatch(session_id):
        raise invalid_argument(
            Reason.INVALID_SESSION_ID, "session_id must be 1 to 128 characters of [A-Za-z0-9_-]"
        )


def _check_version(version: int, field: str) -> None:
    if version < 0:
        raise invalid_argument(Reason.INVALID_VERSION, f"{field} must not be negative", field=field)


def _check_messages(messages: list[common_pb2.Message], field: str) -> None:
    if len(messages) > MAX_MESSAGES_PER_CALL:
        raise invalid_argument(
            Reason.TOO_MANY_MESSAGES,
            f"{field} has {len(messages)} messages, more than {MAX_MESSAGES_PER_CALL}",
            limit=str(MAX_MESSAGES_PER_CALL),
        )
    for index, message in enumerate(messages):
        if message.role not in _ROLES:
            raise invalid_argument(
                Reason.INVALID_ROLE, f"{field}[{index}] has no valid role", index=str(index)
            )
        # A character is at least one UTF-8 byte: long text fails without encoding.
        content = message.content
        if len(content) > MAX_CONTENT_BYTES or len(content.encode()) > MAX_CONTENT_BYTES:
            raise invalid_argument(
                Reason.MESSAGE_TOO_LARGE,
                f"{field}[{index}] is larger than {MAX_CONTENT_BYTES} bytes",
                index=str(index),
                limit=str(MAX_CONTENT_BYTES),
            )


class ContextServicer(context_service_pb2_grpc.ContextServiceServicer):
    def __init__(
        self,
        store: SessionStore,
        models: dict[str, ModelSettings],
        counters: dict[str, PromptCounter],
        hot: HotCache | None = None,
        summarizer: summaries_lib.Summarizer | None = None,
    ) -> None:
        self._store = store
        # Never live without a change listener, so always safe to consult.
        self._hot = hot if hot is not None else HotCache(0)
        # Prefetches in flight, held so they are not collected mid-way.
        self._prefetches: set[asyncio.Task] = set()
        # Without one (unit tests), nothing is summarized.
        self._summarizer = summarizer
        self._models = models
        self._counters = counters
        # Every turn is counted for every configured tokenizer and template
        # when appended, so assembly for any model finds its counts stored.
        self._distinct_counters = list({c.id: c for c in counters.values()}.values())

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.CreateSessionResponse:
        _check_tenant(request.tenant_id)
        session_id = request.session_id or uuid.uuid4().hex
        _check_session_id(session_id)
        now = await self._store.create(request.tenant_id, session_id)
        session = pb.Session(
            session_id=session_id,
            tenant_id=request.tenant_id,
            version=0,
            create_time_ms=now,
            update_time_ms=now,
        )
        return pb.CreateSessionResponse(session=session)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.GetSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        stored = await self._read(request.tenant_id, request.session_id)
        session = pb.Session(
            session_id=request.session_id,
            tenant_id=request.tenant_id,
            version=stored.version,
            messages=stored.turns,
            create_time_ms=stored.create_time_ms,
            update_time_ms=stored.update_time_ms,
        )
        return pb.GetSessionResponse(session=session)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        await self._store.delete(request.tenant_id, request.session_id)
        if self._summarizer is not None:
            await self._summarizer.forget(request.tenant_id, request.session_id)
        return pb.DeleteSessionResponse()

    async def AppendTurns(self, request: pb.AppendTurnsRequest, context) -> pb.AppendTurnsResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        if request.expected_version < 0:
            raise invalid_argument(Reason.INVALID_VERSION, "expected_version must not be negative")
        if len(request.turn_id.encode()) > MAX_TURN_ID_BYTES:
            raise invalid_argument(
                Reason.INVALID_TURN_ID, f"turn_id is longer than {MAX_TURN_ID_BYTES} bytes"
            )
        if not request.messages:
            raise invalid_argument(Reason.EMPTY_MESSAGES, "messages must not be empty")
        turns = list(request.messages)
        _check_messages(turns, "messages")
        token_counts = {c.id: await c.count(turns) for c in self._distinct_counters}
        ticket = self._hot.ticket()
        version, replayed = await self._store.append(
            request.tenant_id,
            request.session_id,
            None if request.any_version else request.expected_version,
            turns,
            token_counts,
            turn_id=request.turn_id,
        )
        log.debug("turns appended", session_id=request.session_id, version=version, replayed=replayed)
        if not replayed:
            self._warm(request.tenant_id, request.session_id, version, turns, token_counts, ticket)
            if self._summarizer is not None:
                self._summarizer.schedule(request.tenant_id, request.session_id)
        return pb.AppendTurnsResponse(version=version, replayed=replayed)

    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.ForkSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        new_session_id = request.new_session_id or uuid.uuid4().hex
        _check_session_id(new_session_id)
        _check_version(request.version, "version")
        now = await self._store.fork(request.tenant_id, request.session_id, request.version, new_session_id)
        session = pb.Session(
            session_id=new_session_id,
            tenant_id=request.tenant_id,
            version=request.version,
            create_time_ms=now,
            update_time_ms=now,
        )
        return pb.ForkSessionResponse(session=session)

    async def RevertSession(self, request: pb.RevertSessionRequest, context) -> pb.RevertSessionResponse:
        _check_tenant(request.tenant_id)
        _check_session_id(request.session_id)
        _check_version(request.version, "version")
        _check_version(request.expected_version, "expected_version")
        version = await self._store.revert(
            request.tenant_id,
            request.session_id,
            request.version,
            None if request.any_version else request.expected_version,
        )
        return pb.RevertSessionResponse(version=version)

    async def AssembleContext(
        self, request: pb.AssembleContextRequest, context
    ) -> pb.AssembleContextResponse:
        _check_tenant(request.tenant_id)
        if request.session_id:
            _check_session_id(request.session_id)
        model = self._models.get(request.model)
        if model is None:
            raise not_found(Reason.MODEL_NOT_FOUND, f"no model {request.model!r}", model=request.model)
        if request.max_prompt_tokens <= 0:
            raise invalid_argument(Reason.INVALID_TOKEN_BUDGET, "max_prompt_tokens must be positive")
        new_messages = list(request.new_messages)
        if not new_messages and not request.session_id:
            raise invalid_argument(Reason.EMPTY_MESSAGES, "nothing to assemble: no session, no messages")
        _check_messages(new_messages, "new_messages")

        counter = self._counters[request.model]
        new_counts = await counter.count(new_messages)
        new = [assembly.Candidate(m, n) for m, n in zip(new_messages, new_counts, strict=True)]
        session: list[assembly.Candidate] = []
        version = 0
        at_version = request.at_version if request.HasField("at_version") else None
        if at_version is not None:
            _check_version(at_version, "at_version")
        if request.session_id:
            stored = await self._read(request.tenant_id, request.session_id, at_version)
            counts = await self._complete_counts(request, stored, counter)
            session = [assembly.Candidate(m, n) for m, n in zip(stored.turns, counts, strict=True)]
            version = stored.version

        budget = min(request.max_prompt_tokens, model.context_window_tokens)
        response = assembly.assemble(session, new, budget, counter.template_tokens)
        if self._summarizer is not None and request.session_id:
            await self._add_summaries(request, response, version, budget, counter)
        response.manifest.tokenizer = counter.spec
        response.session_version = version
        inputs = response.inputs
        inputs.tenant_id = request.tenant_id
        inputs.session_id = request.session_id
        inputs.session_version = version
        inputs.model = request.model
        inputs.max_prompt_tokens = request.max_prompt_tokens
        inputs.tokenizer = counter.spec
        digest = hashlib.sha256()
        for message in new_messages:
            serialized = message.SerializeToString(deterministic=True)
            digest.update(len(serialized).to_bytes(8, "little") + serialized)
        inputs.new_messages_sha256 = digest.hexdigest()
        response.assembly_id = hashlib.sha256(inputs.SerializeToString(deterministic=True)).hexdigest()
        return response

    async def _add_summaries(
        self,
        request: pb.AssembleContextRequest,
        response: pb.AssembleContextResponse,
        version: int,
        budget: int,
        counter: PromptCounter,
    ) -> None:
        """Summaries of the spans the assembly left out, while budget remains."""
        excluded = summaries_lib.excluded_ranges(response)
        try:
            found = await self._summarizer.summaries_for(
                request.tenant_id, request.session_id, version, excluded
            )
        except redis_access.CONNECTION_ERRORS as error:
            # The prompt stands without them; the turns it holds were read.
            log.warning("summaries unavailable", error=str(error))
            return
        if found:
            tokens = await counter.count([summary.message() for summary in found])
            summaries_lib.add_summaries(
                response, found, tokens, budget, counter.template_tokens.default_system
            )

    async def _read(self, tenant_id: str, session_id: str, at_version: int | None = None) -> StoredSession:
        """The session from the hot cache when it holds the current version,
        else from Redis (then cached)."""
        key = session_key(tenant_id, session_id)
        if at_version is None:
            cached = self._hot.get(key)
            if cached is not None:
                return cached
        ticket = self._hot.ticket()
        stored = await self._store.read(tenant_id, session_id, at_version)
        # Only the current version is cached: a past one would shadow it.
        if at_version is None:
            self._hot.put(key, stored, ticket)
        return stored

    def _warm(
        self,
        tenant_id: str,
        session_id: str,
        version: int,
        turns: list[common_pb2.Message],
        token_counts: dict[str, list[int]],
        ticket: int,
    ) -> None:
        """Readies the session for its next assembly: extends the cached
        entry with what was just appended when it holds the version before,
        else reads the session in the background (never on the request path)."""
        key = session_key(tenant_id, session_id)
        cached = self._hot.get(key)
        if cached is not None and cached.version == version - 1:
            extended = StoredSession(
                version=version,
                create_time_ms=cached.create_time_ms,
                # The append's time in Redis, near enough (it only bounds the entry's life).
                update_time_ms=int(time.time() * 1000),
                turns=cached.turns + turns,
                token_counts={
                    tokenizer: cached.token_counts.get(tokenizer, []) + counts
                    for tokenizer, counts in token_counts.items()
                    # Counts stay a prefix: extend only those covering every turn.
                    if len(cached.token_counts.get(tokenizer, [])) == len(cached.turns)
                },
            )
            if self._hot.put(key, extended, ticket):
                return
        self.prefetch(tenant_id, session_id)

    def prefetch(self, tenant_id: str, session_id: str) -> None:
        """Reads the session into the hot cache in the background."""

        async def read() -> None:
            try:
                await self._read(tenant_id, session_id)
            except MeshgateError as error:
                # Gone or unreachable: the next assembly reads it and reports that.
                log.debug("prefetch failed", session_id=session_id, reason=error.reason)

        task = asyncio.create_task(read())
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _complete_counts(
        self,
        request: pb.AssembleContextRequest,
        stored: StoredSession,
        counter: PromptCounter,
    ) -> list[int]:
        """Stored counts, plus those of turns stored before this tokenizer and
        template were configured: counted here, then stored so that happens once."""
        counts = stored.token_counts.get(counter.id, [])
        if len(counts) == len(stored.turns):
            return counts
        missing = stored.turns[len(counts) :]
        counts = counts + await counter.count(missing)
        # The same version's entry in the hot cache, if that is where it came from.
        stored.token_counts[counter.id] = counts
        await self._store.fill_token_counts(
            request.tenant_id, request.session_id, stored.version, counter.id, counts
        )
        return counts
