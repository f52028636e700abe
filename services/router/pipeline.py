"""One chat turn, free of any transport.

A front end (the gRPC servicer today, an HTTP edge later) hands
:meth:`Pipeline.run` a request, the caller's tenant and a :class:`Budget`,
and relays the events it yields: :class:`Delta` pieces of the answer, then
one :class:`Completion` or one :class:`Failure`. Nothing here knows gRPC:
deadlines are a plain budget, a caller hanging up is asyncio cancellation.

The stages, in order:

1. validate: the request becomes a :class:`Turn` (or a Failure, before any
   downstream work);
2. admit: :class:`Admission` may refuse the turn or reserve for it;
3. plan the cache: which lookups and stores the turn's cache policy allows;
4. look up, assemble, route and generate: first the exact lookup (one
   Redis GET, about a millisecond), so an exact hit starts no inference;
   after an exact miss, a stateless turn's semantic lookup runs alongside
   assembly and the start of generation, a session turn's alongside
   generation, so a miss waits only for the exact lookup; a semantic hit
   cancels the generation before any generated token went out; hits are
   replayed in pieces;
5. persist: store the answer and append the turn, concurrently;
6. settle: :class:`Admission` learns what the turn really used, whatever
   its end (completion, failure or cancellation).

The stages reach other services only through the interfaces below
(:class:`Contexts`, :class:`Cache`, :class:`Generator`, :class:`Admission`);
``services/router/downstream.py`` implements them over gRPC, unit tests
with fakes.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import enum
import math
import re
import time
import uuid
from typing import Any, Protocol

import grpc
import structlog
from opentelemetry import trace

from meshgate import metrics, telemetry
from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings, RouterSettings, route_of
from meshgate.errors import (
    MeshgateError,
    aborted,
    clip,
    deadline_exceeded,
    internal_error,
    invalid_argument,
    not_found,
    partly_delivered,
    unavailable,
)
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2 as router_pb
from meshgate.single_flight import SingleFlight
from meshgate.tasks import cancel_and_wait
from services.router.auth import Tenant
from services.router.coalescing import Coalescer, coalescing_key
from services.router.model_selection import Selection, Selector
from services.router.prompt_bound import in_assembly_order, prompt_bounds
from services.router.templates import Templates, invokes_template
from services.router.validation import check_expected_version, check_turn, resolve_model

log = structlog.get_logger(__name__)

_READS_CACHE = frozenset({router_pb.CACHE_POLICY_UNSPECIFIED, router_pb.CACHE_POLICY_USE})
# An assembly refused with these was refused on its request or session
# (checked before anything is written): it made no append hold.
_REFUSED_BEFORE_ANY_HOLD = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})


# --- values ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long the caller waits: a deadline on ``clock``, or none."""

    deadline: float | None = None
    # What the deadline is a reading of: the process's monotonic clock, or a
    # test's, which moves only when the test moves it (a deadline of real
    # time passes early on a loaded machine, and the test fails for that).
    # The Pipeline's coalescer must read the same one (Pipeline's ``clock``).
    clock: collections.abc.Callable[[], float] = dataclasses.field(
        default=time.monotonic, compare=False, repr=False
    )

    @classmethod
    def of(cls, seconds: float | None, clock: collections.abc.Callable[[], float] = time.monotonic) -> Budget:
        return cls(None if seconds is None else clock() + seconds, clock)

    def within(self, cap_s: float) -> float:
        """Seconds for one downstream step: ``cap_s``, never past the deadline."""
        if self.deadline is None:
            return cap_s
        return max(0.0, min(cap_s, self.deadline - self.clock()))

    def capped(self, cap_s: float) -> Budget:
        """This budget, ending ``cap_s`` from now at the latest."""
        return Budget(self.clock() + self.within(cap_s), self.clock)


class CacheStatus(enum.Enum):
    EXACT_HIT = "exact_hit"
    SEMANTIC_HIT = "semantic_hit"
    MISS = "miss"
    BYPASSED = "bypassed"

    @property
    def is_hit(self) -> bool:
        return self in (CacheStatus.EXACT_HIT, CacheStatus.SEMANTIC_HIT)


@dataclasses.dataclass
class Answer:
    """A whole answer: generated (filled as it streams) or from the cache."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    deployment: str = ""
    # A generation's counts behind the text it yielded so far, as the
    # inference service's deltas (and then its completion) carry them: the
    # prompt tokens the model read and the completion tokens it produced
    # for that text. What a turn cut off before its completion is billed
    # (admission.used_tokens); 0: not told (an inference service that
    # predates the counts, a model that reports none, no delta yet).
    prompt_tokens_read: int = dataclasses.field(default=0, compare=False)
    completion_tokens_so_far: int = dataclasses.field(default=0, compare=False)
    # For a generated answer, the store_fence read before its generation
    # began (CachePlan.store_fence of the turn that began it), which its
    # Store passes back; None when none was: it is then not stored. A turn
    # that joined an identical turn's generation under way (coalescing.py)
    # stores with this one, not its own: it read its own after the
    # generation began, maybe after an Invalidate that the answer predates.
    store_fence: str | None = None
    # Its Stores by entry, under way or done (Pipeline._store): the callers
    # sharing one generation adopt its answer's, so each entry is written once.
    stores: SingleFlight[tuple[bytes, ...], None] = dataclasses.field(
        default_factory=lambda: SingleFlight("answer store", cancel_when_abandoned=True, keep_finished=True),
        compare=False,
        repr=False,
    )

    def adopt(self, other: Answer) -> None:
        """Becomes ``other``, in place: the turn's outcome holds this object."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(other, field.name))


@dataclasses.dataclass(frozen=True)
class Hit:
    answer: Answer
    status: CacheStatus
    similarity: float
    # The cache entry that answered (ReportWrongHit names it).
    entry_id: str = ""


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """What the turn's cache policy allows, and under which scope."""

    reads: bool
    writes: bool
    # The scope of an entry: tenant, model alias and the full parameters
    # ("unset" max_tokens and the default are one entry).
    tenant_id: str
    model: str
    parameters: common_pb2.GenerationParameters
    # What answers under the alias (route_of): entries of an alias a reload
    # pointed at another model are not its answers any more.
    route: str = ""
    # The router's hot exact key of a prompt under this plan, computed once
    # per turn though the exact lookup, the semantic lookup and the store
    # all ask for it (hot_exact.py): id(prompt) -> (prompt, key). The prompt
    # is held, so its id is not reused while the plan lives. Not an init
    # field: a plan made by dataclasses.replace (another model) starts empty.
    hot_exact_keys: dict[int, tuple[Any, bytes]] = dataclasses.field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    # What the cache's exact lookup (or a turn's fence read, when it does
    # not read the cache) said about its scope's invalidations
    # (LookupResponse.store_fence), passed back with the Store of the answer
    # generated after it (the generation takes it: Answer.store_fence): an
    # Invalidate meanwhile keeps that answer out. A list of at most one, set
    # once the lookup answers (the plan is frozen); empty, the lookup failed
    # (or the turn reads and writes no cache) and the answer is not stored.
    store_fence: list[str] = dataclasses.field(default_factory=list, init=False, compare=False, repr=False)

    @property
    def exact_lookup_answered(self) -> bool:
        """Whether the turn's exact lookup (or fence read) was answered: a
        miss's answer carries the store_fence, a failure leaves none."""
        return bool(self.store_fence)


def _routes(models: dict[str, ModelSettings]) -> dict[str, str]:
    """Every alias's route, made once per configuration, not per turn."""
    return {alias: route_of(model, models) for alias, model in models.items()}


@dataclasses.dataclass(frozen=True)
class Turn:
    """A validated turn: everything the later stages need, nothing of the transport."""

    tenant: Tenant
    model_alias: str
    model: ModelSettings
    messages: collections.abc.Sequence[common_pb2.Message]
    # With max_tokens resolved to the model's default when unset.
    parameters: common_pb2.GenerationParameters
    session_id: str
    # A turn that starts a session (a ChatSession's first without one, an
    # HTTP session_id "new"): it is created once the turn is admitted, so a
    # refused turn leaves no empty session behind, and deleted if the turn
    # ends before it begins to be stored, so a failed one leaves none either
    # (its client's resend would create another each time).
    create_session: bool
    # Strict turns answer only from, and append only at, this version.
    expected_version: int | None
    cache: CachePlan
    budget: Budget
    # How model_alias was chosen, when the requested alias selects among
    # models (model_selection.py); None when it was the requested one.
    selection: Selection | None = None
    # A session turn's append's turn id (one for every attempt: a retry
    # after a lost reply is answered, not applied twice), and the hold its
    # assembly makes for that append (AppendReservation.hold_id).
    turn_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def max_tokens(self) -> int:
        return self.parameters.max_tokens


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str
    # The answer's last piece: nothing but the Completion or a Failure (the
    # save failed, the inference call ended non-OK after its completion, a
    # shared generation's reader ran out of time) comes after it, so it may go
    # with the completion (Pipeline.run's carry_last_text); False when not
    # known to be the last.
    last: bool = False
    # A generated piece's Answer.completion_tokens_so_far: the completion
    # tokens behind it and the pieces before it (0: not counted); a replayed
    # hit's, its entry's count shared out by characters (replayed_tokens).
    completion_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Completion:
    answer: Answer
    cache_status: CacheStatus
    similarity: float
    session_id: str
    session_version: int
    trace_id: str
    # The alias that answered, and how it was chosen (None: as requested).
    model: str = ""
    selection: Selection | None = None
    # The answer's last piece, for a front end that asked for it here
    # (Pipeline.run's carry_last_text): the deltas before hold the rest.
    text: str = ""
    # For a hit, the entry that answered.
    cache_entry_id: str = ""
    # The rate windows it was admitted under (admission.Reservation.windows,
    # as a session turn's top-up left them), for its front end to tell.
    rate_windows: tuple = ()


@dataclasses.dataclass(frozen=True)
class Failure:
    """The turn failed; ``error`` says how (delivered_* metadata when part
    of the answer went out; ``session_id`` metadata when the turn created a
    session, which ``session_id`` names too)."""

    error: MeshgateError
    session_id: str = ""


Event = Delta | Completion | Failure


@dataclasses.dataclass(slots=True)
class Delivered:
    """What of a turn's answer a front end has written to its caller, for
    the status of a stream the front end itself ends midway (the router's
    stop, :func:`stopped`): a failure the pipeline yields says it already
    (partly_delivered)."""

    deltas: int = 0
    chars: int = 0
    # The completion tokens behind the pieces written: the last one's
    # Delta.completion_tokens; 0 with pieces written, not counted (an
    # inference service that sends no counts, a hit whose entry has none).
    tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.deltas += 1
        self.chars += len(delta.text)
        self.tokens = delta.completion_tokens

    def cut(self, failure: MeshgateError) -> MeshgateError:
        """``failure`` saying how much went out: ``delivered_tokens`` too
        where counted (none written is none counted)."""
        counted = self.tokens or not self.deltas
        return partly_delivered(failure, self.deltas, self.chars, self.tokens if counted else None)

    def told(self, failure: MeshgateError) -> MeshgateError:
        """``failure`` as it ends a stream after what went out: a copy saying
        how much, where pieces went out and it does not say so itself (a
        bug's INTERNAL knows nothing of the stream it ends); else as it is."""
        if not self.deltas or "delivered_deltas" in failure.metadata:
            return failure
        return self.cut(failure.copy())


def stopped() -> MeshgateError:
    """What a turn the router's stop cuts, when its grace ends, fails with
    (the front ends add delivered_*: partly_delivered)."""
    return unavailable(Reason.STREAM_ENDED_EARLY, "the router stopped before the answer was complete")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a turn used, for settling its admission."""

    answer: Answer
    cache_status: CacheStatus | None
    elapsed_s: float
    # The reason it failed; None when it completed.
    failure: str | None = None
    cancelled: bool = False
    # UTF-8 bytes of the answer's pieces the turn received (generated or
    # replayed); a turn that ended early with none is billed no completion
    # tokens, one with some at most this many (every token is a byte or more).
    delivered_bytes: int = 0
    # The completion tokens behind the pieces the turn received: the last
    # one's count (Delta.completion_tokens), else the failure that ended the
    # stream's (delivered_tokens), where either counted them.
    delivered_tokens: int | None = None
    # The messages the model was sent, where a session's were assembled
    # (None: the turn's own): what a turn that ends early pays as its prompt
    # when the model's count of it (prompt_tokens_read) is not known.
    prompt: list[common_pb2.Message] | None = None
    # The prompt tokens the model said it read (Answer.prompt_tokens_read),
    # once a delta of its generation reached the turn; 0: not told.
    prompt_tokens_read: int = 0
    # The prompt's tokens as its assembly counted them (_TurnFacts), the
    # same count, known before the model's first delta; 0: not assembled
    # (a stateless prompt that surely fits goes out unassembled).
    prompt_tokens_assembled: int = 0
    # The turn's hold in the router's turn journal (Admission.track), or
    # None: its id there, where a snapshot named it (or its settlement,
    # while the ledger held records), goes on its ledger
    # record, so that it is billed once, by its settlement or by a claim of
    # the journal; its settlement releases the hold.
    tracked: Any = None


@dataclasses.dataclass(frozen=True)
class Assembly:
    """A prompt the context service fitted to the model's window."""

    messages: list[common_pb2.Message]
    # The session version it was built from (0 for a stateless turn's).
    version: int
    # Its tokens as the context service counted them (its manifest's: the
    # model's tokenizer and chat template, the count the model reads); 0:
    # not told.
    prompt_tokens: int = 0


@dataclasses.dataclass
class _TurnFacts:
    """What a turn settled on its way, from the moment it is known, for its
    end however it comes: its cache status (a hit is billed as one even when
    its turn ends before its Completion: the caller hanging up mid-replay,
    its session's append failing), the session it created, and whether it
    began to be stored in its session (a turn that then fails names the
    session it created, so the caller can go on with it; one that ends
    before has that session deleted: nothing is in it)."""

    status: CacheStatus | None = None
    created_session_id: str = ""
    saving: bool = False
    # The session whose assembly may hold room for this turn's append
    # (AppendReservation.hold_id): given back if the turn fails or is
    # cancelled, whether or not its append was sent.
    holding_session_id: str = ""
    # The session's assembled prompt, once it is.
    prompt: list[common_pb2.Message] | None = None
    # The assembled prompt's tokens as the context service counted them
    # (Assembly.prompt_tokens), once the model may read it; 0: not known.
    prompt_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class SummarySpend:
    """What the context service's summaries of a session spent on one model
    (context.v1.SummaryUsage): the session's tenant's usage, though no turn
    of it asked for them."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    summaries: int


@dataclasses.dataclass(frozen=True)
class Appended:
    """What a turn's append to its session did."""

    version: int
    # The session's summaries' spend, taken by the append of a context
    # service older than TakeSummaryUsage (during a rolling upgrade; a
    # current one's sweep takes it: summary_usage.py): the router bills it to
    # the tenant (Admission.summaries_spent), or no one will.
    summary_spend: tuple[SummarySpend, ...] = ()


# --- stage interfaces --------------------------------------------------------


class Contexts(Protocol):
    """Sessions and prompt assembly (the context service)."""

    async def create_session(self, tenant: Tenant, budget: Budget, request_id: str = "") -> str: ...

    async def delete_session(self, tenant: Tenant, session_id: str) -> None: ...

    async def session_call(self, method: str, request, tenant: Tenant, budget: Budget):
        """The context service's ``method`` with ``request`` (its request
        message), acting for ``tenant``: its response, or its refusal."""

    async def assemble(self, turn: Turn) -> Assembly | None:
        """The prompt, the session version it was built from and its count;
        None when a stateless turn should go out as sent (context service
        unreachable)."""

    async def append(self, turn: Turn, session_id: str, after_version: int, answer: Answer) -> Appended:
        """Appends the turn and its answer; returns the new version, and
        what the session's summaries spent that the append took to bill."""

    async def prefetch(self, tenant: Tenant, session_id: str) -> None:
        """Asks that the session be readied for its next assembly; never fails."""

    async def release_hold(self, turn: Turn, session_id: str) -> None:
        """Gives back the room the turn's assembly held for its append, the
        turn having ended without one."""


class Cache(Protocol):
    async def lookup(self, plan: CachePlan, messages, budget: Budget, semantic: bool) -> Hit | None:
        """A hit or None; never fails a turn (the cache is an optimization).
        Exact matches only unless ``semantic``."""

    async def store(self, plan: CachePlan, messages, answer: Answer, budget: Budget) -> None: ...

    async def report_wrong(self, plan: CachePlan, messages, entry_id: str, budget: Budget) -> bool:
        """Reports the entry as a wrong answer to ``messages``; whether it
        was there to remove. Raises the cache's refusal."""


class Generator(Protocol):
    def generate(
        self,
        alias: str,
        prompt,
        parameters: common_pb2.GenerationParameters,
        budget: Budget,
        answer: Answer,
        session_id: str = "",
        read_ahead: bool = True,
        tenant_id: str = "",
    ) -> collections.abc.AsyncIterator[str]:
        """Streams the answer's pieces from the first deployment that takes
        it, filling ``answer``; fails with delivered_* metadata mid-stream.
        ``read_ahead``: pieces that arrive while the consumer is busy come
        joined (for a consumer that is not itself reading ahead).
        ``tenant_id``: whom the model's generation slots are shared with.
        ``answer.finish_reason`` is set only when no piece follows: the
        pipeline reads it after each piece, to mark the last one."""


class Admission(Protocol):
    """Limits and accounting: the admit and settle stages.

    ``admit`` refuses a turn by raising a MeshgateError (RESOURCE_EXHAUSTED)
    or returns a grant, opaque to the pipeline, that ``settle`` receives
    exactly once with what the turn really used, however it ended.
    """

    async def admit(self, turn: Turn) -> Any: ...

    def waits(self, turn: Turn) -> bool:
        """Whether ``admit`` makes a round trip for ``turn`` (some limit
        applies): the pipeline then runs the exact cache lookup beside it."""

    async def settle(self, grant: Any, turn: Turn, outcome: Outcome) -> None: ...

    def refused(self, turn: Turn, outcome: Outcome) -> None:
        """A turn ``admit`` refused (it reserved nothing, so nothing is
        settled), for the usage ledger: recorded as a turn refused once its
        session's history is known (reserve_prompt) is by ``settle``, as a
        failure that used nothing, for the two are one event to the tenant."""

    def summaries_spent(self, tenant: Tenant, spends: tuple[SummarySpend, ...]) -> None:
        """What the summaries of a session of ``tenant`` (the key of its
        latest turn, or of the turn whose append took it) spent, taken by a
        sweep (summary_usage.py) or reported by an older context service's
        append: the tenant's usage and budgets, charged after the fact (the
        turn that took it is not refused for it)."""

    # Optional (an admission that reserves no tokens, Unlimited or a test's
    # fake, leaves it out):
    #
    # async def reserve_prompt(self, grant: Any, turn: Turn, prompt) -> None:
    #     """Grows the grant to cover ``prompt``, the messages the model will
    #     be sent, when they may cost more than admission reserved for the
    #     turn's own (a session's assembled history), or refuses the turn
    #     as admit would (raising); called before anything is generated."""
    #
    # def track(self, grant: Any, turn: Turn, outcome_of) -> Tracked | None:
    #     """Holds the turn while it is served, for a router killed before
    #     it settles (services/router/turn_journal.py):
    #     ``outcome_of(failure, tracked=...)`` is its Outcome were it to end
    #     now so. Returns the hold (None: none), for the turn's Outcome
    #     (``tracked``), which its settlement releases."""


class Unlimited:
    """Admits every turn and records nothing."""

    async def admit(self, turn: Turn) -> None:
        return None

    def waits(self, turn: Turn) -> bool:
        return False

    async def settle(self, grant: None, turn: Turn, outcome: Outcome) -> None:
        return None

    def refused(self, turn: Turn, outcome: Outcome) -> None:
        return None

    def summaries_spent(self, tenant: Tenant, spends: tuple[SummarySpend, ...]) -> None:
        return None


# --- replay of cache hits ----------------------------------------------------

# A word and the space after it: pieces end on word boundaries.
_WORDS = re.compile(r"\S+\s*|\s+")


def replay_pieces(text: str, piece_chars: int) -> list[str]:
    """``text`` in pieces of whole words of about ``piece_chars`` characters
    (a few tokens' worth), so a hit streams like a generated answer.
    Leading whitespace goes with the first word: a piece of nothing but
    whitespace would be a message that shows nothing."""
    pieces: list[str] = []
    current = ""
    for word in _WORDS.findall(text):
        if current and not current.isspace() and len(current) + len(word) > piece_chars:
            pieces.append(current)
            current = ""
        current += word
    if current:
        pieces.append(current)
    return pieces


def replayed_tokens(completion_tokens: int, chars: int, total_chars: int) -> int:
    """The completion tokens behind the first ``chars`` characters of a
    stored answer of ``total_chars`` characters and ``completion_tokens``
    tokens, for what a replay cut midway says it delivered: the answer's
    count shared out by characters, rounded up, and the count itself once
    every character went out. An estimate: the router holds no tokenizer
    (bench/replay_token_estimate.py measures it against the model's). 0
    where the entry counted none."""
    if chars >= total_chars:
        return completion_tokens
    return -(-completion_tokens * chars // total_chars)


# --- the pipeline --------------------------------------------------------------


class Pipeline:
    def __init__(
        self,
        settings: RouterSettings,
        models: dict[str, ModelSettings],
        contexts: Contexts,
        cache: Cache,
        generator: Generator,
        admission: Admission | None = None,
        selector: Selector | None = None,
        clock: collections.abc.Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: what the turns' Budgets' deadlines are readings of
        (Budget.clock), for the shared generations' deadlines."""
        self._settings = settings
        self._models = models
        self._contexts = contexts
        self._cache = cache
        self._generator = generator
        self._admission = admission or Unlimited()
        # Admission's reserve_prompt (Admission), where it has one.
        self._reserve_prompt = getattr(self._admission, "reserve_prompt", None)
        # Optional too: the router's turn journal (admission.TurnAdmission.track).
        self._track = getattr(self._admission, "track", None)
        # Without a way to embed, selection decides on cheap features alone.
        self._selector = selector or Selector(_no_embedding)
        self._templates = Templates(settings.templates, settings.max_message_bytes)
        self._prompt_bounds = prompt_bounds(models)
        self._routes = _routes(models)
        self._coalescer = Coalescer(clock)
        # Session calls no turn waits for (warm-ups, deletions of sessions
        # that failed turns created), held so they are not collected mid-way.
        self._background: set[asyncio.Task] = set()

    def reconfigure(self, settings: RouterSettings, models: dict[str, ModelSettings]) -> None:
        """Reloaded settings, from the next turn on; a turn under way keeps
        the model it was validated with."""
        self._settings = settings
        self._models = models
        self._templates = Templates(settings.templates, settings.max_message_bytes)
        self._prompt_bounds = prompt_bounds(models)
        self._routes = _routes(models)

    async def create_session(self, tenant: Tenant, budget: Budget, request_id: str = "") -> str:
        return await self._contexts.create_session(tenant, budget, request_id)

    async def session_call(self, method: str, request, tenant: Tenant, budget: Budget):
        """A session's management (read, delete, fork, revert, pins), asked
        of the context service as is: it checks the request, and the
        tenant it acts for is the caller's."""
        return await self._contexts.session_call(method, request, tenant, budget)

    def warm_session(self, tenant: Tenant, session_id: str) -> None:
        """A ChatSession stream opened for an existing session: the context
        service reads it into memory meanwhile, so the first turn's assembly
        finds it there. In the background: the stream waits for nothing."""
        self._in_background(self._contexts.prefetch(tenant, session_id))

    def _in_background(self, call: collections.abc.Coroutine) -> None:
        task = asyncio.create_task(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete_unused_session(self, tenant: Tenant, session_id: str) -> None:
        """Deletes the session a turn created and ended without storing
        anything in: only this router knows its id (no answer named it), so
        nothing else can be using it. A failure is logged; the empty session
        then expires unused (context.session_ttl_s)."""
        try:
            await self._contexts.delete_session(tenant, session_id)
        except MeshgateError as error:  # the context service away, say
            log.warning(
                "the session a failed turn created was not deleted",
                tenant=tenant.id,
                session_id=session_id,
                reason=error.reason,
            )
        except Exception:  # noqa: BLE001 - a bug: the turn has ended, and nothing waits for this
            log.exception("deleting the session a failed turn created failed", tenant=tenant.id)

    async def _release_hold(self, turn: Turn, session_id: str) -> None:
        """Room a turn that ended before its append held in its session
        comes back now rather than when its hold expires. A failure is
        logged: the hold then expires on its own."""
        try:
            await self._contexts.release_hold(turn, session_id)
        except MeshgateError as error:  # the context service away, say
            log.warning("an append hold was not released", session_id=clip(session_id), reason=error.reason)
        except Exception:  # noqa: BLE001 - a bug: the turn has ended, and nothing waits for this
            log.exception("releasing an append hold failed", tenant=turn.tenant.id)

    async def _create_turns_session(self, turn: Turn) -> str:
        """The session ``turn`` creates (Turn.create_session). A caller that
        goes away while the context service creates it (a ChatSession
        cancelled just after its first message) leaves it created all the
        same, and no answer named it: it is deleted once it is, as the
        session of a turn that ends later unstored is (run). Cancelled with
        its caller, the call's reply was lost with the id, and the session
        stayed, empty and listed, until context.session_ttl_s (9 of 60
        streams cancelled 0-40 ms after their first turn, on the real mesh)."""
        creating = asyncio.ensure_future(self._contexts.create_session(turn.tenant, turn.budget))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            self._in_background(self._delete_once_created(turn.tenant, creating))
            raise

    async def _delete_once_created(self, tenant: Tenant, creating: asyncio.Future) -> None:
        try:
            session_id = await creating
        except Exception:  # noqa: BLE001 - no session was made (the turn's caller has gone: nobody to tell)
            return
        await self._delete_unused_session(tenant, session_id)

    def validate(
        self, request, tenant: Tenant, session_id: str, budget: Budget, create_session: bool
    ) -> Turn:
        """The validate stage: ``request`` is any message with a chat turn's
        fields (ChatRequest, ChatSessionRequest). A template invocation
        becomes the plain request it stands for first."""
        if invokes_template(request):
            request = self._templates.expand(request, tenant.id)
        model = resolve_model(request.model, tenant, self._models)
        max_tokens = check_turn(request, model, self._settings)
        parameters = common_pb2.GenerationParameters()
        parameters.CopyFrom(request.parameters)
        parameters.max_tokens = max_tokens
        return Turn(
            tenant=tenant,
            model_alias=request.model,
            model=model,
            messages=list(request.messages),
            parameters=parameters,
            session_id=session_id,
            create_session=create_session,
            expected_version=check_expected_version(request, session_id, create_session),
            cache=CachePlan(
                reads=request.cache_policy in _READS_CACHE,
                writes=request.cache_policy != router_pb.CACHE_POLICY_BYPASS,
                tenant_id=tenant.id,
                model=request.model,
                parameters=parameters,
                route=self._routes[request.model],
            ),
            budget=budget,
        )

    async def run(
        self,
        request,
        tenant: Tenant,
        session_id: str,
        budget: Budget,
        create_session: bool = False,
        carry_last_text: bool = False,
        before_saving: collections.abc.Callable[[str], collections.abc.Awaitable[None]] | None = None,
        whole: bool = False,
        on_admitted: collections.abc.Callable[[Any], None] | None = None,
    ) -> collections.abc.AsyncIterator[Event]:
        """The turn's events: deltas, then a Completion or a Failure.
        ``carry_last_text``: the answer's last piece, when known (Delta.last),
        comes on the Completion (``text``) instead of as a delta, for a front
        end that sends the two as one message or write; before a Failure it
        still comes as a delta (the failure counts it delivered).
        ``whole``: for a front end that sends the answer whole or not at all
        (a non-streamed HTTP answer): no deltas, the Completion's answer holds
        the text, and a Failure's caller got none of it, so it says no
        delivered_* and the turn is billed as one that ended before its first
        piece (admission.used_tokens): the pieces its front end held are not
        the caller's.
        ``before_saving(session_id)`` is awaited before a session turn is
        appended (the session created for it, if it was): from then on the
        turn may be stored, so a front end whose transport may
        resend a call that sent nothing yet (gRPC's retry policy) commits
        it there; a turn held whole for the completion has sent nothing.
        ``on_admitted(grant)`` is called once admission has admitted the
        turn, with its grant (the router's: an admission.Reservation), before
        any event: a front end that tells its caller the limits reads it."""
        started = time.perf_counter()
        turn = early = None
        try:
            turn = await self._select(self.validate(request, tenant, session_id, budget, create_session))
            early = self._exact_lookup_beside_admission(turn)
            try:
                grant = await self._admission.admit(turn)
            except BaseException:
                if early is not None:
                    early.cancel()  # a refused turn reads nothing
                raise
        except MeshgateError as error:
            if turn is not None:
                # Refused by admission (validation and selection set no turn).
                _count_refusal(error)
                self._admission.refused(
                    turn, Outcome(Answer(), None, time.perf_counter() - started, error.reason)
                )
            yield Failure(error)
            return
        except Exception:  # noqa: BLE001 - as below: a bug fails this turn only
            log.exception("turn refused by a bug", model=clip(request.model))
            yield Failure(internal_error())
            return
        answer, facts, failure, cancelled = Answer(), _TurnFacts(), None, False
        delivered_bytes, delivered_tokens = 0, None
        # The deltas yielded, and the completion tokens behind them as the
        # last counted them (Delta.completion_tokens; 0: not counted): what
        # a failure after them says went out where it cannot say itself.
        sent = Delivered()

        def outcome_so_far(failure: str | None, cancelled: bool = False, tracked: Any = None) -> Outcome:
            """The turn's outcome were it to end now so: its settlement's,
            and its journal's snapshots' (as lost with its router)."""
            return Outcome(
                answer,
                facts.status,
                time.perf_counter() - started,
                failure,
                cancelled,
                delivered_bytes,
                # The count behind exactly the pieces that went out, which a
                # failure's may not be (a caller cut off by its own deadline
                # or hanging up has none; a shared generation's is the
                # generation's).
                sent.tokens or delivered_tokens,
                facts.prompt,
                answer.prompt_tokens_read,
                facts.prompt_tokens,
                tracked,
            )

        span = telemetry.start_genai_span("chat", turn.model_alias, turn.parameters)
        in_flight = metrics.router().streams_in_flight.labels(turn.model_alias)
        in_flight.inc()
        held: Delta | None = None  # the last piece, kept for the completion
        # Released by its settlement (_settle), however the turn ends.
        tracked = self._track(grant, turn, outcome_so_far) if self._track is not None else None
        try:
            # Every nested stream is closed explicitly (aclosing): an
            # abandoned async generator's cleanup, such as cancelling its
            # inference call, would otherwise wait for the garbage collector.
            if on_admitted is not None:
                on_admitted(grant)
            admitted = self._admitted(turn, grant, answer, facts, started, early, before_saving)
            async with contextlib.aclosing(admitted) as events:
                async for event in events:
                    if whole:
                        if isinstance(event, Completion):
                            delivered_bytes = len(event.answer.text.encode())
                        elif isinstance(event, Delta):
                            continue  # goes out on the completion, or never
                    elif isinstance(event, Delta):
                        if held is not None:
                            # Never while generators keep their contract
                            # (Generator); if one does not, no text is lost
                            # nor reordered for it.
                            delivered_bytes += len(held.text.encode())
                            sent.add(held)
                            yield held
                            held = None
                        if carry_last_text and event.last:
                            # Counted as delivered only as it goes out: a
                            # caller gone while the turn saves (the cache's
                            # Store, the session's append) never had it.
                            held = event
                            continue
                        delivered_bytes += len(event.text.encode())
                        sent.add(event)
                    elif isinstance(event, Completion) and held is not None:
                        delivered_bytes += len(held.text.encode())
                        event = dataclasses.replace(event, text=held.text)
                        held = None
                    yield event
        except MeshgateError as error:
            failure = error.reason
            if whole:
                error = _undelivered(error)
            counted = error.metadata.get("delivered_tokens")
            delivered_tokens = int(counted) if counted else None
            if held is not None:
                delivered_bytes += len(held.text.encode())
                sent.add(held)
                yield held
            yield _failure(sent.told(error), facts)
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away: its task was cancelled, or its front end
            # closed this stream unfinished.
            cancelled = True
            raise
        except Exception:  # noqa: BLE001 - a bug fails its turn, with nothing of its insides
            log.exception("turn failed", model=turn.model_alias)
            failure = Reason.INTERNAL
            if held is not None:
                delivered_bytes += len(held.text.encode())
                sent.add(held)
                yield held
            yield _failure(sent.told(internal_error()), facts)
        finally:
            if early is not None and not early.done():
                early.cancel()
            in_flight.dec()
            outcome = outcome_so_far(failure, cancelled, tracked)
            _record_turn(turn, outcome, span)
            if facts.created_session_id and not facts.saving:
                # Not awaited: the turn's failure or cancellation goes on at once.
                self._in_background(self._delete_unused_session(turn.tenant, facts.created_session_id))
            elif facts.holding_session_id and (failure is not None or cancelled):
                # Whatever the append did: one that landed deleted its hold
                # already (a release then finds nothing), and one refused
                # before its script ran (SESSION_QUOTA_EXCEEDED, its tries
                # UNAVAILABLE, its caller gone mid-append) or never sent
                # left it; an append still to come does not count holds.
                self._in_background(self._release_hold(turn, facts.holding_session_id))
            await self._settle(grant, turn, outcome)

    def _exact_lookup_beside_admission(self, turn: Turn) -> asyncio.Future | None:
        """A stateless turn's exact lookup (or fence read), started while
        admission makes its round trip: a read, which decides nothing before
        admission has (no hit goes out, and no generation starts, until the
        turn is admitted). Only then: a task where admission answers at once
        would cost a loop hop per turn for nothing."""
        if turn.session_id or turn.create_session or not (turn.cache.reads or turn.cache.writes):
            return None
        if not self._admission.waits(turn):
            return None
        return asyncio.ensure_future(self._exact_hit(turn.cache, turn.messages, turn.budget))

    async def _select(self, turn: Turn) -> Turn:
        """For an alias that selects among models: the turn, sent to the one
        chosen (its window, deployments, cache entries, limits and prices).
        max_tokens stays as validated against the selecting alias, whose
        max_output_tokens the configuration keeps within both choices'."""
        rules = turn.model.selection
        if rules is None:
            return turn
        strong_bound = self._prompt_bounds.get(rules.strong)
        selection = await self._selector.select(
            rules,
            turn.tenant.tier,
            turn.messages,
            turn.max_tokens,
            self._settings.prices.get(rules.strong),
            turn.budget.within(rules.embedding_timeout_s),
            # What the strong model's chat template adds, as admission reserves it.
            strong_bound.template_bytes(len(turn.messages)) if strong_bound is not None else 0,
        )
        metrics.router().model_selections.labels(turn.model_alias, selection.model, selection.reason).inc()
        return self._as_selected(turn, selection.model, selection)

    def _as_selected(self, turn: Turn, alias: str, selection: Selection | None) -> Turn:
        """``turn`` sent to ``alias``, one its selecting alias chose."""
        model = self._models.get(alias)
        if model is None:  # settings reloaded since validation, without it
            raise not_found(Reason.MODEL_NOT_FOUND, f"unknown model {alias!r}", model=alias)
        return dataclasses.replace(
            turn,
            model_alias=alias,
            model=model,
            cache=dataclasses.replace(turn.cache, model=alias, route=self._routes[alias]),
            selection=selection,
        )

    async def _settle(self, grant, turn: Turn, outcome: Outcome) -> None:
        try:
            await self._admission.settle(grant, turn, outcome)
        except Exception:  # noqa: BLE001 - the caller has its answer; settling is ours to fix
            log.exception("settling a turn failed", tenant=turn.tenant.id)
            if outcome.tracked is not None:
                outcome.tracked.settled(None)  # not held in the journal for ever

    async def _admitted(
        self,
        turn: Turn,
        grant: Any,
        answer: Answer,
        facts: _TurnFacts,
        turn_started: float,
        early_lookup: asyncio.Future | None = None,
        before_saving: collections.abc.Callable[[str], collections.abc.Awaitable[None]] | None = None,
    ) -> collections.abc.AsyncIterator[Event]:
        started = time.perf_counter()
        turn_metrics = metrics.router()
        session_id = turn.session_id
        if turn.create_session:
            session_id = facts.created_session_id = await self._create_turns_session(turn)
        plan = turn.cache
        stateless = not session_id
        version = 0
        prompt = turn.messages
        delivered = 0
        hit: Hit | None = None

        # Look up, assemble, route and generate. The exact lookup comes first
        # (one GET, no embedding): an exact hit then costs no inference at
        # all. After an exact miss, the generation starts at once alongside
        # the semantic lookup, which decides whether its output goes out.
        if stateless:
            if early_lookup is not None:
                hit = await early_lookup
            else:
                hit = await self._exact_hit(plan, turn.messages, turn.budget)
            if hit is None:
                lookup = self._semantic_lookup(plan, turn.messages, turn.budget)
                generation = self._generate_stateless(turn, answer, facts)
        else:
            turn = _with_session(turn, session_id)
            facts.holding_session_id = session_id
            try:
                assembled = await self._contexts.assemble(turn)
            except MeshgateError as error:
                if error.reason == Reason.SESSION_FULL or error.code in _REFUSED_BEFORE_ANY_HOLD:
                    # Refused: the hold is the assembly's last step, so none
                    # was made (nor, for a session id the context service
                    # refused as invalid or unknown, is there one to release:
                    # a review saw a 1 MB id sent back to it and logged whole).
                    facts.holding_session_id = ""
                raise
            if assembled is not None:
                prompt, version = assembled.messages, assembled.version
            # The assembly refuses a strict turn at another version itself
            # (its append_reservation's expected_version); a context service
            # that predates that field ignores it, and this check stands in.
            if turn.expected_version is not None and version != turn.expected_version:
                raise version_conflict(session_id, version)
            if self._reserve_prompt is not None:
                # Admission reserved the new messages' bound, but the model
                # reads (and inference bills) the history too, only known
                # now: reserved before any hit or generation, as admission
                # reserves a stateless turn's before its lookup answers. A
                # stateless turn needs none: its assembly sends its messages
                # as they are (or their system ones first), which is what
                # admission reserved (context assembly.render).
                try:
                    await self._reserve_prompt(grant, turn, prompt)
                except MeshgateError as error:
                    _count_refusal(error)
                    raise
            # What a turn ending early pays as its prompt from now on (the
            # model may read it): not before it is reserved, so a caller
            # hanging up while it is being reserved is not billed past it.
            facts.prompt = prompt
            if assembled is not None:
                facts.prompt_tokens = assembled.prompt_tokens
            hit = await self._exact_hit(plan, prompt, turn.budget)
            if hit is None:
                lookup = self._semantic_lookup(plan, prompt, turn.budget)
                generation = self._generate(turn, prompt, answer)

        if hit is None:
            async with _Race(lookup, generation, self._settings.speculative_generation) as race:
                hit = await race.hit()
                if hit is None:
                    # Known now: a miss that fails or is cancelled while it
                    # generates is still a miss in its turn's metrics and
                    # span (they read "none", while the cache counted a miss).
                    facts.status = CacheStatus.MISS if plan.writes else CacheStatus.BYPASSED
                    inter_token = previous_at = None
                    async for text in race.generated():
                        # Timed as the delta leaves; the deployment is known
                        # from the first piece on (see Deployments.generate).
                        now = time.perf_counter()
                        if inter_token is None:
                            turn_metrics.time_to_first_token.labels(
                                turn.model_alias, answer.deployment
                            ).observe(now - turn_started)
                            inter_token = turn_metrics.inter_token.labels(turn.model_alias, answer.deployment)
                        else:
                            inter_token.observe(now - previous_at)
                        previous_at = now
                        # The generator fills the answer's finish reason
                        # before it yields the last piece, when that piece
                        # came with the completion (Deployments.generate).
                        yield Delta(
                            text,
                            last=bool(answer.finish_reason),
                            completion_tokens=answer.completion_tokens_so_far,
                        )
                        delivered += 1
        if hit is not None:
            answer.adopt(hit.answer)
            facts.status = hit.status
            turn_metrics.time_to_first_token.labels(turn.model_alias, CACHE_DEPLOYMENT).observe(
                time.perf_counter() - turn_started
            )
            pause_s = self._settings.replay_pause_s
            # Unpaced, every piece is already waiting when the previous one
            # goes out: larger pieces are fewer messages (most of a hit's
            # CPU), as a generation's deltas that arrive together go as one.
            piece_chars = self._settings.replay_piece_chars if pause_s else self._settings.replay_burst_chars
            pieces = replay_pieces(hit.answer.text, piece_chars)
            replayed_chars = 0
            for index, piece in enumerate(pieces, 1):
                if turn.budget.within(math.inf) <= 0:
                    # Replayed on past the budget, a paced or long hit ran
                    # into the caller's own timer, which ended it bare (no
                    # ErrorInfo, nothing said of what went out), as a
                    # generation cut there is not; run() adds delivered_*.
                    raise _replay_out_of_time()
                replayed_chars += len(piece)
                yield Delta(
                    piece,
                    last=index == len(pieces),
                    completion_tokens=replayed_tokens(
                        hit.answer.completion_tokens, replayed_chars, len(hit.answer.text)
                    ),
                )
                delivered += 1
                if pause_s and index < len(pieces):  # none after the last: the completion follows
                    await asyncio.sleep(turn.budget.within(pause_s))

        if hit is not None:
            cache_status, similarity, entry_id = hit.status, hit.similarity, hit.entry_id
        else:
            cache_status, similarity, entry_id = facts.status, 0.0, ""

        # Persist: store and append concurrently; the completion waits for
        # both, so a follow-up request already finds the turn and the entry.
        saving = []
        if not stateless:
            facts.saving = True
            if before_saving is not None:
                # First: a caller gone here (it raises) leaves no call made.
                await before_saving(session_id)
        if plan.writes and hit is None and answer.text:
            # A session turn's entry is keyed on the whole prompt it answered.
            saving.append(self._store(plan, turn.messages if stateless else prompt, answer, turn.budget))
        if not stateless:
            saving.append(self._contexts.append(turn, session_id, version, answer))
        try:
            saved = await asyncio.gather(*saving)
        except MeshgateError as failure:
            # The answer went out but the turn was not saved: the stream ends
            # non-OK, saying how much of it the caller holds.
            raise partly_delivered(failure, delivered, len(answer.text), answer.completion_tokens) from None
        if not stateless:
            appended = saved[-1]
            version = appended.version
            if appended.summary_spend:
                self._admission.summaries_spent(turn.tenant, appended.summary_spend)
        log.info(
            "turn",
            tenant=turn.tenant.id,
            model=turn.model_alias,
            cache=cache_status.value,
            completion_tokens=answer.completion_tokens,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        yield Completion(
            answer,
            cache_status,
            similarity,
            session_id,
            version,
            telemetry.current_trace_id(),
            turn.model_alias,
            turn.selection,
            cache_entry_id=entry_id,
            rate_windows=getattr(grant, "windows", ()),
        )

    async def report_wrong_hit(
        self, request, tenant: Tenant, entry_id: str, budget: Budget, selected_model: str = ""
    ) -> bool:
        """Reports the cache entry ``entry_id`` as a wrong answer to
        ``request``, a stateless turn as it was sent: validated as run()
        does, under the model the hit's completion named (``selected_model``)
        or else selected again, so the report names the scope and messages
        its lookup matched."""
        if request.session_id:
            raise invalid_argument(
                Reason.UNSUPPORTED_PARAMETER,
                "a session turn's hit cannot be reported: it was matched on the session's history",
                param="session_id",
            )
        turn = self.validate(request, tenant, "", budget, False)
        rules = turn.model.selection
        if not selected_model:
            turn = await self._select(turn)
        elif rules is None and selected_model == turn.model_alias:
            pass  # an alias that selects nothing answers as itself (ChatCompletion.selected_model)
        elif rules is None or selected_model not in (rules.fast, rules.strong):
            raise invalid_argument(
                Reason.INVALID_SELECTED_MODEL,
                f"{request.model!r} does not answer as {selected_model!r}: pass the hit's "
                "ChatCompletion.selected_model",
                param="selected_model",
            )
        else:
            turn = self._as_selected(turn, selected_model, None)
        return await self._cache.report_wrong(turn.cache, turn.messages, entry_id, budget)

    async def _store(self, plan: CachePlan, messages, answer: Answer, budget: Budget) -> None:
        """Stores ``answer`` under ``messages`` once, however many callers
        share its generation (coalescing.py): each would write the same
        entry again, a Redis write, a notice to every router's hot tier and
        a charge to the tenant's quota each. They share its Stores
        (Answer.stores), one per entry: the plan's scope is in the
        coalescing key, but not the messages an entry is keyed on (a
        stateless turn's as sent, which one assembled prompt may come from
        in more than one order). Each waits for its entry's, so its
        completion still finds the entry stored. The Store is no caller's, as the generation is not: a
        caller going away leaves it to the others, the last one cancels it,
        and a caller arriving after that stores afresh; one arriving after
        it ended finds it done (SingleFlight's keep_finished). So it runs
        under no caller's deadline either, only the cache call's own bound
        (router.downstream_timeout_s): begun by a caller with little time
        left, it would be cut short for the callers still waiting for it,
        and none of them would store the entry (they find that Store done).
        Each caller waits for it within its own deadline (``budget``), no
        longer: its completion is not held past it by a slow cache (the
        entry is all it waits for), and one that stops waiting leaves the
        Store to the others as a caller going away does (the last one
        cancels it: what a caller alone got before, its Store cut at its
        deadline)."""
        entry = tuple(message.SerializeToString(deterministic=True) for message in messages)
        try:
            async with asyncio.timeout(None if budget.deadline is None else budget.within(math.inf)):
                await answer.stores.join(entry, lambda: self._cache.store(plan, messages, answer, Budget()))
        except TimeoutError:
            log.info("answer store not awaited past the caller's deadline", model=plan.model)

    async def _exact_hit(self, plan: CachePlan, messages, budget: Budget) -> Hit | None:
        """The exact lookup, before the turn generates. A turn that stores
        without reading (CACHE_POLICY_REFRESH) reads the store_fence alone
        there: its Store must carry one as well (CachePlan.store_fence)."""
        if not plan.reads:
            if plan.writes:
                await self._cache.read_fence(plan, messages, budget)
            return None
        return await self._cache.lookup(plan, messages, budget, semantic=False)

    def _semantic_lookup(self, plan: CachePlan, messages, budget: Budget):
        """The lookup to race the generation against (None: nothing to look up)."""
        return self._cache.lookup(plan, messages, budget, semantic=True) if plan.reads else None

    def _generate_stateless(
        self, turn: Turn, answer: Answer, facts: _TurnFacts
    ) -> collections.abc.AsyncIterator[str]:
        if self._fits_as_sent(turn):
            # AssembleContext would return the messages as sent: its hop
            # would only delay the first token (prompt_bound.py).
            return self._generate(turn, turn.messages, answer)
        return self._assemble_and_generate(turn, answer, facts)

    def _fits_as_sent(self, turn: Turn) -> bool:
        bound = self._prompt_bounds.get(turn.model_alias)
        if bound is None or not in_assembly_order(turn.messages):
            return False
        return bound.fits(turn.messages, turn.model.context_window_tokens - turn.max_tokens)

    async def _assemble_and_generate(
        self, turn: Turn, answer: Answer, facts: _TurnFacts
    ) -> collections.abc.AsyncIterator[str]:
        assembled = await self._contexts.assemble(turn)
        prompt = turn.messages
        if assembled is not None:
            # The messages as sent (or their system ones first): the same
            # bytes admission reserved, and now their count.
            prompt, facts.prompt_tokens = assembled.messages, assembled.prompt_tokens
        generation = self._generate(turn, prompt, answer)
        async with contextlib.aclosing(generation) as pieces:
            async for text in pieces:
                yield text

    def _generate(self, turn: Turn, prompt, answer: Answer) -> collections.abc.AsyncIterator[str]:
        """The generate stage: identical deterministic turns under way share
        one generation (see coalescing.py), scoped like the cache's entries.
        Every caller's answer carries the whole generation's usage and is
        billed for it, as if it had generated alone: what a caller pays
        does not depend on who else happened to ask at the same time. A
        caller that leaves it early (cancelled, its deadline passed) or
        that a shared failure ends is billed as an unshared turn cut off
        there is (TurnAdmission.settle): the generation's counts behind the
        pieces that caller received, which coalescing.py copies to each
        caller's Answer with its pieces."""
        key = None
        if self._settings.coalesce_generations:
            key = coalescing_key(
                turn.cache.tenant_id, turn.model_alias, prompt, turn.parameters, turn.cache.route
            )

        def start(filling: Answer, deadline: float | None) -> collections.abc.AsyncIterator[str]:
            budget = dataclasses.replace(turn.budget, deadline=deadline)
            # Read before this generation begins (the turn's exact lookup or
            # fence read is done before it asks for one): what every turn
            # sharing it stores with.
            filling.store_fence = turn.cache.store_fence[0] if turn.cache.store_fence else None
            # A shared generation is read by the coalescer's own task, which
            # joins what piles up for each caller: a read-ahead below it
            # would be one more task wake-up per token.
            return self._generator.generate(
                turn.model_alias,
                prompt,
                turn.parameters,
                budget,
                filling,
                session_id=turn.session_id,
                read_ahead=key is None,
                # A shared generation is one tenant's: its key is scoped by tenant.
                tenant_id=turn.tenant.id,
            )

        return self._coalescer.generate(key, start, answer, Answer, turn.budget.deadline)


# The deployment label of what a cache hit served.
CACHE_DEPLOYMENT = "cache"


async def _no_embedding(text: str, aliases: tuple[str, ...], timeout_s: float) -> None:
    return None


def _count_refusal(error: MeshgateError) -> None:
    """A limit's refusal at admission: its ErrorInfo names the limit and the
    kind of scope (bounded label values, never the tenant)."""
    limit = error.metadata.get("limit")
    if limit is not None:
        metrics.router().limit_refusals.labels(limit, error.metadata.get("scope", ""), error.reason).inc()


def _record_turn(turn: Turn, outcome: Outcome, span) -> None:
    """The turn's metrics and the end of its GenAI span."""
    answer = outcome.answer
    hit = outcome.cache_status is not None and outcome.cache_status.is_hit
    deployment = CACHE_DEPLOYMENT if hit else answer.deployment
    if outcome.cancelled:
        result = "cancelled"
    elif outcome.failure is not None:
        result = "failed"
    else:
        result = "completed"
    turn_metrics = metrics.router()
    cache = outcome.cache_status.value if outcome.cache_status is not None else "none"
    turn_metrics.turns.labels(turn.model_alias, cache, result).inc()
    if answer.prompt_tokens or answer.completion_tokens:
        turn_metrics.prompt_tokens.labels(turn.model_alias, deployment).inc(answer.prompt_tokens)
        turn_metrics.completion_tokens.labels(turn.model_alias, deployment).inc(answer.completion_tokens)
    span.set_attributes(
        telemetry.genai_usage_attributes(
            answer.prompt_tokens, answer.completion_tokens, answer.finish_reason, answer.deployment
        )
    )
    span.set_attribute("meshgate.cache_status", cache)
    if outcome.failure is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.failure))
        span.set_attribute("error.type", outcome.failure)
    span.end()


def _failure(error: MeshgateError, facts: _TurnFacts) -> Failure:
    """The turn's Failure, naming the session it created, if the turn began
    to be stored in it (in the error's metadata too, for a caller that reads
    only the status); one it did not begin to be stored in is deleted."""
    created = facts.created_session_id if facts.saving else ""
    if created and "session_id" not in error.metadata:
        error = error.copy()
        error.metadata["session_id"] = created
    return Failure(error, created)


def _undelivered(error: MeshgateError) -> MeshgateError:
    """``error`` as it ends a turn none of whose answer went out (Pipeline.run's
    ``whole``): without what partly_delivered said went out."""
    error = error.copy()
    for name in ("delivered_deltas", "delivered_chars", "delivered_tokens"):
        error.metadata.pop(name, None)
    return error


def _replay_out_of_time() -> MeshgateError:
    """What a hit's replay the turn's budget ends midway fails with: the
    caller's time spent, as a generation cut by it says (downstream
    failure_within), before the caller's own timer ends the call bare."""
    return deadline_exceeded(
        Reason.DEADLINE_EXCEEDED, "the caller's deadline passed while the cached answer was replayed"
    )


def _with_session(turn: Turn, session_id: str) -> Turn:
    return turn if turn.session_id == session_id else dataclasses.replace(turn, session_id=session_id)


def version_conflict(session_id: str, current_version: int) -> MeshgateError:
    return aborted(
        Reason.VERSION_CONFLICT,
        "the session is not at the expected version",
        session_id=session_id,
        current_version=str(current_version),
    )


class _Race:
    """A cache lookup against the start of a generation.

    The generation's first piece is fetched in the background while the
    lookup runs; nothing generated goes out before the lookup has answered
    (a caller never sees generated text and then a hit). On a hit the
    generation is cancelled, and with it its inference call; its failure,
    if it failed meanwhile, no longer matters.
    """

    def __init__(self, lookup, generation: collections.abc.AsyncIterator[str], speculative: bool) -> None:
        self._lookup = lookup
        self._generation = generation
        self._speculative = speculative
        self._first: asyncio.Task | None = None
        self._looked_up = False

    def _start(self) -> None:
        if self._first is None:
            self._first = asyncio.ensure_future(anext(self._generation, None))

    async def __aenter__(self) -> _Race:
        if self._speculative and self._lookup is not None:
            self._start()
        return self

    async def hit(self) -> Hit | None:
        if self._lookup is None:
            return None
        self._looked_up = True
        hit = await self._lookup
        if hit is not None:
            await self._stop_generation()
        return hit

    async def generated(self) -> collections.abc.AsyncIterator[str]:
        if self._first is None:
            # Nothing to fetch ahead of (no lookup, or it answered first):
            # the pieces are read here, without a task and its hop before
            # the first token.
            async for text in self._generation:
                yield text
            return
        first = await self._first
        if first is None:
            return
        yield first
        async for text in self._generation:
            yield text

    async def _stop_generation(self) -> None:
        if self._first is not None:
            # Its failure no longer matters (the class says); a cancel of the
            # turn while it ends is the turn's.
            await cancel_and_wait(self._first, raise_failures=False)
        await self._generation.aclose()

    async def __aexit__(self, *exc_info) -> None:
        # Ends the generation however the turn ended (a failure, the caller
        # cancelling): its inference call must not outlive the turn.
        if self._lookup is not None and not self._looked_up:
            self._lookup.close()  # never started: nothing to wait for
        await self._stop_generation()
