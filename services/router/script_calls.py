"""The router's Lua script calls: admission's, one per hash slot, all at
once (:func:`run_scripts`), and the writes of what turns used, whose
calls Redis certainly did not run are held and written again
(:class:`Backlog`).

What a turn used is written after its answer, off its path: its settlement
(admission's reservation replaced by its use) and its ledger record. Both
scripts add (INCRBY, HINCRBY, XADD). So a failed call of a script that adds
can be written again only where it certainly did not run (:func:`never_ran`):
Redis refused it before running it (out of memory, a read-only replica, a
master down, a dataset loading, a cluster failover under way) or no
connection was made (refused: a Redis restarting). Such calls are what a
Redis restart or failover fails, and they were lost: a settlement's
reservation stood (an overcharge; a turn admitted without Redis was charged
nothing), a ledger record was missing from GetUsage. A call that may have
run (a timeout, a connection lost after it was sent) cannot be written
again without the risk of counting it twice: it is given up (logged and
counted); but for a script whose second run does nothing more
(``idempotent``), which is run again however it failed, until Redis answers:
admission's release of a refused turn, and the scripts that set a mark in
the same script as their writes (kept WRITTEN_MARK_TTL_S) and write nothing
where it is set: admission's settlements of turns' ends and the ledger's
records (a mark per call each). Of the writes of what turns
used, only a give-back under a lease a turn's end settles later
(admission's _SETTLE) is still given up so. A run's caller may ask to be
told once each of its calls is written or given up (Backlog.run's
``done``): the router's turn journal keeps a turn until its ledger record
is written.

Redis does not roll a script back where a command in it fails (a key
holding another type: WRONGTYPE): what it wrote before stays written, the
rest is not. A script that writes many tenants' records or turns in one
call (the ledger's, admission's settlements) checks first the type of every
key each would write, and writes none of one whose key holds another type,
the others as usual: it replies which it skipped (:func:`skipped_in`), and
they are given up, each logged and counted by its owner (Backlog's
``on_skipped``), never sent again (the key holds what it holds until an
operator looks). Its call's mark says whether a run of it began
(``MARK_BEGUN``) or ended (``MARK_WRITTEN``): a call sent again after a run
stopped midway on an error nobody foresaw finds its mark begun and replies
STOPPED_BEFORE, and is given up, not counted written (it was: "written
before", and every record after the failed one lost).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import socket
import time
from collections.abc import Callable

import structlog
from redis import exceptions as redis_errors

from meshgate import metrics

log = structlog.get_logger(__name__)

# Error replies with which Redis refuses a command before running any of it.
# Inside a script a write refused for memory or a read-only replica is
# refused at the script's first write (Redis checks only until one was
# made), so nothing of it was written either. Not ResponseError at large: a
# script failing midway (a wrong type) keeps the writes made before.
_REFUSALS = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.BusyLoadingError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
)


# How redis-py words a connect that failed (utils.format_error_message, and
# its connect timeout): no connection, so nothing was sent. The socket error
# is not always in the chain: a pooled connection found closed (a Redis
# restarted) is connected anew inside the handler of that finding, and the
# refusal's context is then the finding, not the OSError.
_CONNECT_FAILED = re.compile(r"^(?:Error (?:\S+ )?connecting to |Timeout connecting to server)")
# Failures of redis-py before any command went out: no pooled connection
# free in time (the single node's pool, a cluster node's), a cluster whose
# nodes could not be reached or whose slots no node serves, and a command
# redirected (MOVED, ASK, TRYAGAIN: each not run) until its tries ran out.
_NOT_SENT = re.compile(
    r"^(?:No connection available\.|Redis Cluster cannot be connected"
    r"|All slots are not covered|TTL exhausted\.)"
)


def never_ran(error: BaseException) -> bool:
    """Whether Redis certainly did not run a call that failed so: it refused
    it (_REFUSALS), or no connection was made (refused, timed out, or a name
    that does not resolve). A timeout reading the reply, or a connection
    lost once the call was sent, may come after the script ran."""
    if isinstance(error, (*_REFUSALS, redis_errors.MaxConnectionsError)):
        return True
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError | socket.gaierror):
            return True
        if isinstance(cause, redis_errors.ConnectionError | redis_errors.TimeoutError) and (
            _CONNECT_FAILED.match(str(cause))
        ):
            return True
        if isinstance(cause, redis_errors.RedisError | redis_errors.RedisClusterException) and (
            _NOT_SENT.match(str(cause))
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


async def run_scripts(script, calls: list[tuple[list[str], list]], raise_on_error: bool = True) -> list:
    """Runs ``script`` once per (keys, args), all at once, each call alone
    (on a Redis Cluster, on its slot's node), so that each call's failure
    is its own: redis-py's cluster pipeline raises as a whole when one
    node's connect fails (ClusterNode.execute_pipeline sends outside its
    per-command handling), after the other nodes may have run theirs, and a
    caller could then tell neither what to give back nor what to run again.
    A failed call raises (the first, once every call has answered), or with
    ``raise_on_error`` False is its reply (the others ran: the caller may
    have to undo them). redis-py's Script loads itself again where Redis
    lost it (a restart)."""
    if len(calls) == 1:
        [(keys, args)] = calls
        try:
            return [await script(keys=keys, args=args)]
        except Exception as error:
            if raise_on_error:
                raise
            return [error]
    replies = await asyncio.gather(
        *(script(keys=keys, args=args) for keys, args in calls), return_exceptions=True
    )
    for reply in replies:
        if isinstance(reply, BaseException) and not isinstance(reply, Exception):
            raise reply  # cancelled: the caller's, not a failure of a call
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies


# After a call Redis did not run, the backlog tries again after each of
# these in turn, then every last one: a local Redis restarts in about a
# second, a cluster's failover takes its node timeout (15 s by default).
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# While the router stops, what is held is tried again this often until the
# stop's deadline (Backlog.drain): a Redis restarting as the router stops
# answers within a second or so, and the grace is there to use.
STOPPING_RETRY_DELAY_S = 0.25
# A call still not written this long after it first failed is given up
# (logged and counted lost): Redis has been gone longer than any restart or
# failover takes, and a router that kept every turn's write for good would
# run out of memory first.
MAX_AGE_S = 600.0
# What a script that writes once per call (by its call's mark) replies, but
# for 1 (written now) or a list (written now, some skipped: skipped_in): its
# mark was set by a run before that ended (written before, nothing written
# again), or by one that began and stopped midway on an error from Redis
# inside the script (what it wrote before the error stands; the rest is not
# written, and a run again cannot tell which was which).
WRITTEN_BEFORE = 0
STOPPED_BEFORE = -1
# The values of such a call's mark: set first (so that a run again writes
# nothing twice), then MARK_WRITTEN as its last write. Redis runs a script
# alone, so a run that finds MARK_BEGUN follows one that failed midway.
MARK_BEGUN = "0"
MARK_WRITTEN = "1"


def begin_call_lua(expiry: str) -> str:
    """The Lua that opens such a script: sets its call's mark (KEYS' last) to
    MARK_BEGUN for ``expiry`` (a SET option and its value, e.g.
    ``"'PX', ARGV[2]"``) unless it is set, and where it is, returns
    STOPPED_BEFORE if a run began and stopped midway, else WRITTEN_BEFORE."""
    return f"""
if not redis.call('SET', KEYS[#KEYS], '{MARK_BEGUN}', 'NX', {expiry}) then
  return redis.call('GET', KEYS[#KEYS]) == '{MARK_BEGUN}' and {STOPPED_BEFORE} or {WRITTEN_BEFORE}
end
"""


# The Lua of that read-only pass: ``holds(key)``, the key's type as Redis's
# TYPE names it ('none': no such key), asked once per call;
# ``not_counter(value)``, whether a stored value (GET's, HMGET's; nil: none)
# is one INCRBY and HINCRBY refuse ("not an integer or out of range", an
# operator's or a bug's write: a type check does not see it, and it stopped
# a call midway as a key of another type did): anything but a decimal
# integer as Redis writes one, within int64 (an add that overflows one near
# its end still stops a call midway: given up, STOPPED_BEFORE);
# ``counter_holds(key)``, a counter's type, 'string, not an integer' where
# its value is such.
# The most a Redis integer holds (int64): a total of 19 digits above it is
# one HINCRBY refuses as out of range.
_INT64_MAX = b"9223372036854775807"
_COUNTER = re.compile(rb"0|-?([1-9][0-9]{0,18})")


def is_counter(value: bytes) -> bool:
    """Python's not_counter, negated: a stored total the scripts add to, as
    Redis writes one (a reader that took "007" read totals the writers had
    stopped adding to, a final read found)."""
    matched = _COUNTER.fullmatch(value)
    if matched is None:
        return False
    digits = matched.group(1) or b"0"
    return len(digits) < len(_INT64_MAX) or digits <= _INT64_MAX


KEY_TYPES_LUA = """
local key_types = {}
local function holds(key)
  if not key_types[key] then key_types[key] = redis.call('TYPE', key).ok end
  return key_types[key]
end
local function not_counter(value)
  if not value then return false end
  if value == '0' then return false end
  local digits = string.match(value, '^%-?([1-9]%d*)$')
  if not digits then return true end
  return #digits > 19 or (#digits == 19 and digits > '9223372036854775807')
end
local function counter_holds(key)
  local found = holds(key)
  if found == 'string' and not_counter(redis.call('GET', key)) then return 'string, not an integer' end
  return found
end
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Skipped:
    """A record or turn a call did not write: ``index`` its place among the
    call's (1-based), ``key`` the key that holds another type, ``holds`` that
    type (Redis's TYPE)."""

    index: int
    key: str
    holds: str


def skipped_in(reply) -> list[Skipped]:
    """What a call that wrote replied it skipped: ``[1, index, key, type,
    ...]``, one triple per record or turn it skipped (the script's reply of
    a call that skipped none is 1)."""
    if not isinstance(reply, list) or len(reply) < 4:
        return []
    triples = reply[1:]
    return [
        Skipped(int(index), _text(key), _text(holds))
        for index, key, holds in zip(triples[::3], triples[1::3], triples[2::3], strict=True)
    ]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StoppedMidway(Exception):
    """A call sent again found its mark begun (STOPPED_BEFORE): a run of it
    before stopped midway on an error from Redis; given up, not written."""


# How long a script that writes once per call (``idempotent`` by a mark it
# sets in the same script: admission's settlement of a turn's end, the
# ledger's records) keeps a call's mark: past the longest a call is sent
# again (MAX_AGE_S), plus a minute for a call that reached Redis late.
WRITTEN_MARK_TTL_S = int(MAX_AGE_S) + 60
# Bound on the keys' and arguments' characters held (about their memory):
# past it the oldest calls are given up. A ledger record is ~150 characters,
# so ~100,000 turns' records.
MAX_HELD_CHARS = 16 << 20


# A call Redis did not run for one of these says no node of the cluster
# can be reached or serves its slots: the round ends, the rest kept.
_CLUSTER_WIDE = re.compile(r"^(?:Redis Cluster cannot be connected|All slots are not covered)")


def _cluster_wide(error: BaseException) -> bool:
    return isinstance(error, redis_errors.ClusterDownError) or bool(_CLUSTER_WIDE.match(str(error)))


def node_of(script) -> Callable[[list[str]], tuple[str, int]]:
    """Where a call of ``script`` goes (by its first key; a call's keys
    share a slot): the cluster node serving its slot, or "uncovered" for
    every slot no node serves as far as the client knows (one name: a client
    that never got a slot map knows none), and the slot; one name and one
    slot for a single Redis. What one refusal says is down, so a retry round
    tries no other call there."""
    client = getattr(script, "registered_client", None)
    locate = getattr(client, "get_node_from_key", None)
    if locate is None:
        return lambda keys: ("", 0)

    def node(keys: list[str]) -> tuple[str, int]:
        slot = client.keyslot(keys[0])
        try:
            return locate(keys[0]).name, slot
        except redis_errors.SlotNotCoveredError:
            return "uncovered", slot

    return node


class _Completion:
    """What a run's caller is told once each of its calls is written or
    given up: ``done(written)``, written only if every one was."""

    __slots__ = ("_pending", "_done", "_written")

    def __init__(self, pending: int, done: Callable[[bool], None]) -> None:
        self._pending = pending
        self._done: Callable[[bool], None] | None = done
        self._written = True

    def call_ended(self, written: bool) -> None:
        self._written = self._written and written
        self._pending -= 1
        if self._pending <= 0:
            self.tell(self._written)

    def tell(self, written: bool = False) -> None:
        """Tells the caller now (once), whatever is still pending."""
        done, self._done = self._done, None
        if done is not None:
            done(written)


@dataclasses.dataclass(slots=True)
class _Held:
    keys: list[str]
    args: list
    # When it first failed (the backlog's clock).
    since: float
    # Its run's completion, where the caller asked to be told (Backlog.run).
    done: _Completion | None = None
    # Its last failure, for the log of a run of it found stopped midway.
    failure: str = ""
    chars: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.chars = sum(len(str(part)) for part in (*self.keys, *self.args))


class Backlog:
    """Runs a writing script's calls; holds those Redis certainly did not
    run (any that failed, for an ``idempotent`` script) and runs them again,
    in the order they failed, until they are
    written or given up (MAX_AGE_S, MAX_HELD_CHARS, the router stopping).
    A retry round stops trying a node at its first refusal: a cluster shard
    still down holds back only its own calls.

    A call is held exactly as it was made, so it writes what it would have
    (a record in the day it was made for; a settlement's deltas, which
    commute with those written since); run again only after a refusal, it
    is written once.
    """

    def __init__(
        self,
        script,
        write: str,
        clock: Callable[[], float] = time.monotonic,
        delays_s: tuple[float, ...] = RETRY_DELAYS_S,
        max_age_s: float = MAX_AGE_S,
        max_held_chars: int = MAX_HELD_CHARS,
        node: Callable[[list[str]], tuple[str, int]] | None = None,
        idempotent: bool = False,
        on_skipped: Callable[[list[str], list, list[Skipped]], None] | None = None,
    ) -> None:
        self._script = script
        # Told of the records or turns a call wrote around (skipped_in): its
        # owner logs and counts each, as only it can name their tenants.
        self._on_skipped = on_skipped
        # A call run twice writes what it wrote once: one that may have run
        # (a timeout) is held and run again too.
        self._idempotent = idempotent
        # What the calls write, for logs and metrics ("settlement", "ledger").
        self._write = write
        # Which Redis node a call goes to (node_of; a test's stand-in).
        self._node = node or node_of(script)
        self._clock = clock
        self._delays_s = delays_s
        self._max_age_s = max_age_s
        self._max_held_chars = max_held_chars
        self._held: collections.deque[_Held] = collections.deque()
        self._held_chars = 0
        # Of the calls a retry round took from _held, those neither written
        # nor given up yet: still held, as len() says.
        self._in_round = 0
        self._retrying: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        # Once stopping: until when (self._clock) what is held is tried again.
        self._stop_by: float | None = None

    def __len__(self) -> int:
        """Calls held to be run again, those a retry round is trying among
        them (the round takes them all, and holds again those still refused
        once it ends)."""
        return len(self._held) + self._in_round

    @property
    def _outcomes(self):
        # Read when counted (rarely), so the process's metrics setting applies.
        return metrics.router().deferred_writes

    async def run(
        self, calls: list[tuple[list[str], list]], done: Callable[[bool], None] | None = None
    ) -> None:
        """Runs ``calls`` at once. Those Redis certainly did not
        run are held and run again later; other failures are logged and
        given up. Raises nothing: nobody waits on what a turn used.
        ``done(written)`` is called once every call is written (True) or
        given up (False), now or after a later retry."""
        completion = _Completion(len(calls), done) if done is not None else None
        try:
            failures = await self._try(calls)
        except BaseException:
            if completion is not None:
                completion.tell(False)
            raise
        if completion is not None:
            for failure in failures:
                if failure is None:
                    completion.call_ended(True)
        if not any(failures):
            return
        now = self._clock()
        held = self._unwritten([_Held(keys, args, now, completion) for keys, args in calls], failures)
        if held:
            self._outcomes.labels(self._write, "deferred").inc(len(held))
            self._hold(held)
            if self._retrying is None:
                self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def drain(self, until: float | None = None) -> None:
        """Runs what is held once more, now, then every
        STOPPING_RETRY_DELAY_S until it is written or the clock passes
        ``until`` (None: once only), and gives up what is still not written
        (the router is stopping). Tried once only, the writes of turns
        served while Redis restarted were given up 0.1 s into a stop of 10 s
        whose Redis was back at 0.4 s: those turns were never billed (a
        review; the turn journal, in the same Redis, could not keep them
        either)."""
        self._stop_by = until
        self._stopping.set()
        if self._retrying is not None:
            await self._retrying

    async def _retry(self) -> None:
        try:
            attempt = 0
            tried_stopping = False
            while self._held:
                if not self._stopping.is_set():
                    delay = self._delays_s[min(attempt, len(self._delays_s) - 1)]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                elif tried_stopping:
                    await asyncio.sleep(max(0.0, min(STOPPING_RETRY_DELAY_S, self._time_to_stop())))
                tried_stopping = self._stopping.is_set()
                attempt += 1
                held = self._take()
                now = self._clock()
                expired = [call for call in held if now - call.since > self._max_age_s]
                if expired:
                    self._give_up(expired, f"not written within {self._max_age_s:g} s")
                    held = [call for call in held if now - call.since <= self._max_age_s]
                self._in_round = len(held)
                # One call at a time, in order. A call still refused keeps
                # the rest of its node's and of its slot's for the next round,
                # untried: one failed attempt a round against a node that is
                # down, and a slot's calls in their order even where a
                # failover moved it to another node meanwhile (the client's
                # slot map refreshed by another call). Those of other nodes (a
                # cluster's shards that are back) go on; a failure of the
                # whole cluster, or one while stopping, ends the round.
                written, again, down_nodes, down_slots = 0, [], set(), set()
                for index, call in enumerate(held):
                    node, slot = self._node(call.keys)
                    if node in down_nodes or slot in down_slots:
                        again.append(call)
                        # Its slot waits too: were the slot to move to a node
                        # that answers, its later calls must not go first.
                        down_slots.add(slot)
                        continue
                    [failure] = await self._try([(call.keys, call.args)])
                    if failure is None:
                        written += 1
                        self._in_round -= 1
                        if call.done is not None:
                            call.done.call_ended(True)
                    elif self._again(failure):
                        call.failure = str(failure)
                        again.append(call)
                        if _cluster_wide(failure) or self._stopping.is_set():
                            again += held[index + 1 :]
                            break
                        down_nodes.add(node)
                        down_slots.add(slot)
                    else:
                        self._give_up([call], self._why_given_up(call, failure))
                        self._in_round -= 1
                if written:
                    self._outcomes.labels(self._write, "written_late").inc(written)
                    log.info("held usage writes written", write=self._write, calls=written)
                # In front of what failed since: the order they failed in.
                self._in_round = 0
                self._hold(again, front=True)
                if self._stopping.is_set() and self._time_to_stop() <= 0:
                    self._give_up(self._take(), "the router stopped")
        finally:
            self._in_round = 0
            self._retrying = None

    def _time_to_stop(self) -> float:
        """Seconds left to try what is held, the router stopping."""
        return 0.0 if self._stop_by is None else self._stop_by - self._clock()

    async def _try(self, calls: list[tuple[list[str], list]]) -> list[BaseException | None]:
        """Each call's failure (None: written); several at once, each alone.
        A reply of STOPPED_BEFORE is a failure (StoppedMidway): its call was
        not written whole, and cannot be. What a written call skipped is
        told (on_skipped)."""
        replies = await run_scripts(self._script, calls, raise_on_error=False)
        failures: list[BaseException | None] = []
        for (keys, args), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                failures.append(reply)
            elif isinstance(reply, int) and reply == STOPPED_BEFORE:
                failures.append(StoppedMidway("a run of it stopped midway on an error from Redis"))
            else:
                failures.append(None)
                skipped = skipped_in(reply)
                if skipped and self._on_skipped is not None:
                    try:
                        self._on_skipped(keys, args, skipped)
                    except Exception:
                        # Its log is not worth the retry task, nor the
                        # calls' completions.
                        log.exception("what a usage write skipped could not be told", write=self._write)
        return failures

    def _again(self, failure: BaseException) -> bool:
        """Whether a call that failed so is held to be run again: one that
        may not have run whole (an idempotent one however it failed: a
        script error too, as its mark then tells, STOPPED_BEFORE), never one
        found stopped midway."""
        if isinstance(failure, StoppedMidway):
            return False
        return self._idempotent or never_ran(failure)

    @staticmethod
    def _why_given_up(call: _Held, failure: BaseException) -> str:
        if isinstance(failure, StoppedMidway):
            return (
                f"a run of it stopped midway on an error from Redis ({call.failure}): what it wrote"
                " before the error stands, the rest is not written"
            )
        return f"may have been written: {failure}"

    def _unwritten(self, calls: list[_Held], failures: list[BaseException | None]) -> list[_Held]:
        """The calls to hold again: those that failed and certainly did not
        run (or any, idempotent). Those that may have run are given up."""
        again, maybe_run = [], []
        for call, failure in zip(calls, failures, strict=True):
            if failure is not None:
                call.failure = str(failure)
                (again if self._again(failure) else maybe_run).append((call, failure))
        if maybe_run:
            call, failure = maybe_run[0]
            self._give_up([call for call, _ in maybe_run], self._why_given_up(call, failure))
        return [call for call, _ in again]

    def _hold(self, calls: list[_Held], front: bool = False) -> None:
        if front:
            self._held.extendleft(reversed(calls))
        else:
            self._held.extend(calls)
        self._held_chars += sum(call.chars for call in calls)
        dropped = []
        while self._held_chars > self._max_held_chars and self._held:
            dropped.append(self._held.popleft())
            self._held_chars -= dropped[-1].chars
        if dropped:
            self._give_up(dropped, f"more than {self._max_held_chars} characters held")

    def _take(self) -> list[_Held]:
        held = list(self._held)
        self._held.clear()
        self._held_chars = 0
        return held

    def _give_up(self, calls: list[_Held], why: str) -> None:
        if calls:
            self._outcomes.labels(self._write, "given_up").inc(len(calls))
            log.error("usage writes given up", write=self._write, calls=len(calls), why=why)
        for call in calls:
            if call.done is not None:
                call.done.call_ended(False)
