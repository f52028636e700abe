"""Where a request goes among equivalent targets: strategies, breakers, a prefix index.

Transport-free, so one copy serves the router (over the deployments of a
model alias) and the inference service (over the Triton servers of a served
model), and unit tests drive it with constructed states.

A target is anything with the attributes of :class:`Target`; the caller
keeps them current (``in_flight``, ``active_tokens`` and ``ttft`` around each
request, ``queue_ms`` from Triton's statistics) and reports outcomes to its
:class:`Health`. :func:`order` ranks the targets a request may go to: those
whose health admits traffic in the strategy's order, then the rest as
last-resort fallbacks (a circuit open on every target must not refuse a
request one of them might now serve). A target of weight 0 is drained: it
is ranked after every other target that admits traffic, whatever the
strategy, so it serves only when none of those is left.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import itertools
import math
import random
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, TypeVar

# --- What a target exposes -----------------------------------------------------------------


class Ewma:
    """An exponentially weighted moving average; None until the first sample."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value


class Target(Protocol):
    key: str  # stable identity: a deployment's name, a Triton server's address
    # Relative capacity (not negative; config.py refuses one). 0: drained,
    # a last resort only (order()).
    weight: float
    in_flight: int
    # Prompt tokens (or characters, where the caller has no tokenizer) of the
    # requests in flight: the KV a target holds for them, which every decode
    # step reads, so the load a new request adds to.
    active_tokens: int
    # Prompt tokens routed here and not yet prefilled (their requests have
    # not streamed a first token): work a new request waits behind.
    queued_prefill_tokens: int
    ttft: Ewma
    health: Health

    def queue_ms(self, model: str) -> float:
        """Recent time a request waited inside the model server; 0 if unknown."""
        ...


T = TypeVar("T", bound=Target)


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    """What a strategy may look at in a request."""

    model: str = ""
    # Session affinity's key; "" for a stateless request.
    affinity_key: str = ""
    # The prompt as a chain of block hashes (prefix_blocks()), and its length
    # in the same units as the blocks' (tokens at the inference service).
    prefix_blocks: tuple[int, ...] = ()
    prompt_units: int = 0


# --- Health: circuit breaking with half-open probes, and outlier ejection ------------------


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass(frozen=True)
class BreakerPolicy:
    # Consecutive failures that open a circuit, and for how long at first;
    # each failed half-open probe doubles it, up to max_open_s.
    failures_to_open: int = 3
    open_for_s: float = 10.0
    max_open_s: float = 120.0
    # Outlier ejection (Envoy's success-rate kind): over the last `window`
    # outcomes, a target with at least min_requests whose success rate is
    # below the group's mean by more than `margin` (and below
    # min_success_rate) is ejected for eject_for_s times its ejections so
    # far, never longer than max_eject_s; never more than
    # max_ejected_fraction of a group (at least one target always stays in).
    # Each eject_decay_s a target spends back in rotation without being
    # ejected again forgives one ejection, so a target that misbehaved once
    # long ago starts again from eject_for_s. Without the cap and the decay
    # every ejection lasted longer than the last, for good: the tenth
    # ejection of a target, months apart, took it out for 5 minutes, the
    # fortieth for 20. 300 s is Envoy's max_ejection_time default; Envoy
    # lowers the multiplier likewise while a host stays in.
    window: int = 50
    min_requests: int = 10
    margin: float = 0.2
    min_success_rate: float = 0.8
    eject_for_s: float = 30.0
    max_eject_s: float = 300.0
    eject_decay_s: float = 30.0
    max_ejected_fraction: float = 0.5


class Health:
    """One target's circuit breaker and ejection state.

    Closed: traffic flows, consecutive failures are counted. Open: no traffic
    until the open time passes. Half-open: one request at a time is let
    through as a probe; its success closes the circuit, its failure opens it
    again for twice as long. A probe that tells nothing of the target (its
    caller left, or a busy replica refused it unread) frees the slot at once
    (release_probe); one whose outcome never comes otherwise frees it after
    open_for_s, so it cannot wedge the target.

    A caller that probes its targets actively (the router's health checks of
    its deployments) may also mark one down: open for as long as it stays
    down, whatever the open time, then half-open once marked up, so that one
    request tries it before the rest follow. One whose probes only tell
    whether the target answers (the inference service's of its Tritons,
    which take a server out of rotation by their own rules) says so with
    probe_answered: an open circuit goes half-open at an answered round, once
    until a request succeeds there or a round finds it unreachable.
    """

    def __init__(self, policy: BreakerPolicy | None = None, clock: Callable[[], float] = time.monotonic):
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._open_for = self.policy.open_for_s
        self._probe_until = 0.0
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=self.policy.window)
        self.ejected_until = 0.0
        self.ejections = 0
        self.down = False
        # Whether an answered probe round may end an open time early
        # (probe_answered): once, until a success or an unanswered round.
        self._may_skip_open_time = True

    @property
    def state(self) -> BreakerState:
        if self.down:
            return BreakerState.OPEN
        if self._open_until == 0.0:
            return BreakerState.CLOSED
        if self._clock() < self._open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    @property
    def ejected(self) -> bool:
        return self._clock() < self.ejected_until

    @property
    def admits(self) -> bool:
        """Whether a request may be sent here now."""
        if self.ejected:
            return False
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and self._clock() >= self._probe_until
        )

    def begin(self) -> float:
        """A request is sent here: in half-open it is the probe, unless one
        is under way (a request tried here last, when every other target
        refused it). Returns the probe's slot when it took it (a true
        value, for release_probe), else 0.0."""
        if self.state is BreakerState.HALF_OPEN and self._clock() >= self._probe_until:
            self._probe_until = self._clock() + self.policy.open_for_s
            return self._probe_until
        return 0.0

    def release_probe(self, probe: float) -> None:
        """The probe sent (``probe``, what begin() returned) was never taken
        (a busy replica refused it unread), or its caller left (cancelled:
        counted as neither success nor failure): it tells nothing of the
        target's health, so in half-open the next request may probe at
        once, not after another open_for_s. Only while the slot is still
        that probe's: one that outlived open_for_s had its slot taken by a
        later probe, which its release would have freed, letting a third
        in beside it; and another request's refusal would let a second in
        beside the first."""
        if self._probe_until == probe:
            self._probe_until = 0.0

    def record_success(self) -> None:
        self._may_skip_open_time = True
        self._outcomes.append(True)
        self._failures = 0
        self._open_until = self._probe_until = 0.0
        self._open_for = self.policy.open_for_s

    def record_failure(self) -> None:
        self._outcomes.append(False)
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open_for = min(self._open_for * 2, self.policy.max_open_s)
            self._open(self._open_for)
            return
        self._failures += 1
        if state is BreakerState.CLOSED and self._failures >= self.policy.failures_to_open:
            self._open(self._open_for)

    def mark_down(self) -> None:
        """Its health probes fail: open until mark_up()."""
        self.down = True

    def mark_up(self) -> None:
        """Its health probes answer again: half-open at once, so the next
        request probes it and its outcome closes the circuit or opens it
        again (for twice the open time, as a failed probe does)."""
        if self.down:
            self.down = False
            self._open_until = self._clock()
            self._probe_until = 0.0

    def probe_answered(self, answered: bool) -> None:
        """A probe round of the target was answered, or found it unreachable.
        An open circuit goes half-open at an answered round, once: the
        failures that opened it were likely the target going away (a
        restart, its connections dropped) and it is back, so one request
        tries it now rather than after the open time (a review: a Triton
        whose connections dropped, read ready again half a second later,
        was sent nothing for 10 s, and its slots were left out of the
        count). Once only until a request succeeds there or a round finds
        it unreachable: a target that answers its probes while failing
        requests gets that one try, then its open time, doubled at each
        failed try, as before."""
        if not answered:
            self._may_skip_open_time = True
            return
        if self._may_skip_open_time and self.state is BreakerState.OPEN and not self.down:
            self._open_until = self._clock()
            self._probe_until = 0.0
            self._may_skip_open_time = False

    def _open(self, seconds: float) -> None:
        self._open_until = self._clock() + seconds
        self._probe_until = 0.0
        self._failures = 0

    def success_rate(self) -> float | None:
        if len(self._outcomes) < self.policy.min_requests:
            return None
        return sum(self._outcomes) / len(self._outcomes)

    def eject(self) -> None:
        policy = self.policy
        now = self._clock()
        if self.ejections and now > self.ejected_until:
            forgiven = int((now - self.ejected_until) // policy.eject_decay_s)
            self.ejections = max(self.ejections - forgiven, 0)
        # No count past the one that reaches the cap: more would only take
        # longer to forgive.
        most = max(math.ceil(policy.max_eject_s / policy.eject_for_s), 1)
        self.ejections = min(self.ejections + 1, most)
        self.ejected_until = now + min(policy.eject_for_s * self.ejections, policy.max_eject_s)
        # Fresh evidence after the ejection: the old window would eject it again at once.
        self._outcomes.clear()


def eject_outliers(targets: Sequence[Target]) -> list[Target]:
    """Ejects the targets whose recent success rate stands out below their
    peers'; returns those ejected now."""
    if len(targets) < 2:
        return []
    policy = targets[0].health.policy
    rates = {id(t): t.health.success_rate() for t in targets}
    known = [r for r in rates.values() if r is not None]
    if len(known) < 2:
        return []
    mean = statistics.fmean(known)
    allowed = int(len(targets) * policy.max_ejected_fraction)
    ejected_now = []
    already = sum(t.health.ejected for t in targets)
    for target in sorted(targets, key=lambda t: rates[id(t)] if rates[id(t)] is not None else 1.0):
        rate = rates[id(target)]
        if already >= allowed or rate is None or target.health.ejected:
            continue
        if rate < policy.min_success_rate and rate < mean - policy.margin:
            target.health.eject()
            ejected_now.append(target)
            already += 1
    return ejected_now


# --- The prefix index ----------------------------------------------------------------------


def prefix_blocks(units: Sequence[int] | str, block_size: int, salt: str = "") -> tuple[int, ...]:
    """Full blocks of a prompt (token ids, or characters of text) hashed as a
    chain: each block's hash covers its parent's, so a hash names the whole
    prefix up to it, as the models' prefix cache keys its KV blocks (vLLM's
    automatic prefix caching does the same). A partial last block is left
    out: no cache holds it either. ``salt`` roots the chain, as the models'
    cache salt roots theirs (a tenant's id: no tenant reuses another's
    blocks), so one tenant's prompts never make a target look warm for
    another's."""
    hashes = []
    parent = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little") if salt else 0
    for start in range(0, len(units) - block_size + 1, block_size):
        block = units[start : start + block_size]
        # Integer tuples hash the same in every process (only str and bytes
        # are salted), and this is ~1 µs a block.
        parent = hash((parent, block if isinstance(block, str) else tuple(block)))
        hashes.append(parent)
    return tuple(hashes)


class PrefixRecord:
    """What :meth:`PrefixIndex.record` did for one send: the target,
    the prompt's blocks, how many leading ones the target was believed to
    hold before it (``believed``), when each was last routed there before
    it (``earlier``, None for none). Called, it takes itself back: each
    block it touched that no later record or confirm did goes back to what
    was believed before (forgotten, or held since its earlier time, though
    now among the newest: the LRU order is approximate anyway).

    A send is *unsettled* until its model's report is confirmed, it is
    taken back, or it is let go (garbage collected: its request ended some
    other way): a belief that only an unsettled send made is not yet known
    computed (PrefixIndex.confirm)."""

    def __init__(
        self,
        key: str,
        blocks: tuple[int, ...],
        believed: int,
        earlier: dict[int, float | None],
        held: collections.OrderedDict[int, float],
        at: float,
        settle: Callable[[str, float], None],
    ) -> None:
        self.key, self.blocks, self.believed, self.earlier = key, blocks, believed, earlier
        self._held, self._at = held, at
        # Runs once: at the first of settle(), or when the record is let go.
        self.settle = weakref.finalize(self, settle, key, at)

    def __call__(self) -> None:
        self.settle()
        for block, earlier in self.earlier.items():
            if self._held.get(block) != self._at:
                continue
            if earlier is None:
                del self._held[block]
            else:
                self._held[block] = earlier


class PrefixIndex:
    """Which prompt-prefix blocks each target is believed to hold, learned
    from what was routed there: approximate, since a model server evicts on
    its own; `ttl_s` and `max_blocks` (least recently used first) model that
    eviction, and confirm() corrects it from what a model reports it reused."""

    def __init__(
        self, block_size: int, ttl_s: float = 600.0, max_blocks: int = 65536, clock=time.monotonic
    ) -> None:
        self.block_size = block_size
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks
        self._clock = clock
        # Per target: block hash -> when it was last routed (oldest first).
        self._held: dict[str, collections.OrderedDict[int, float]] = collections.defaultdict(
            collections.OrderedDict
        )
        # Per target: the times of its sends not yet settled (PrefixRecord),
        # with how many were made at each.
        self._unsettled: dict[str, collections.Counter[float]] = collections.defaultdict(collections.Counter)

    def overlap(self, key: str, blocks: Sequence[int]) -> int:
        """How many leading blocks of `blocks` the target is believed to hold."""
        held = self._held.get(key)
        if not held:
            return 0
        expired_before = self._clock() - self.ttl_s
        count = 0
        for block in blocks:
            seen = held.get(block)
            if seen is None or seen < expired_before:
                break
            count += 1
        return count

    def record(self, key: str, blocks: Sequence[int]) -> PrefixRecord:
        """The target computes (so caches) these blocks: they are its newest.
        Returns the record, which :meth:`confirm` judges the model's report
        against and which, called, takes itself back, for a target that
        then refuses the request unread (no room, its model not loaded): it
        computed none of them, and believed to hold them it would draw the
        next requests sharing the prefix, to be refused there first again.
        Recorded at the send, not at the first output, so that requests
        sharing a prefix that arrive while the first one's prompt is
        computed (seconds on a CPU) go where it will be held."""
        believed = self.overlap(key, blocks)
        before, now = self._mark(key, blocks)
        self._unsettled[key][now] += 1
        return PrefixRecord(key, tuple(blocks), believed, before, self._held[key], now, self._settle)

    def _mark(self, key: str, blocks: Sequence[int]) -> tuple[dict[int, float | None], float]:
        """Marks ``blocks`` the target's newest; returns when each was
        marked before (None: never) and the time marked now."""
        held = self._held[key]
        now = self._clock()
        before = {}
        for block in blocks:
            before[block] = held.get(block)
            held[block] = now
            held.move_to_end(block)
        while len(held) > self.max_blocks:
            held.popitem(last=False)
        return before, now

    def _settle(self, key: str, at: float) -> None:
        unsettled = self._unsettled[key]
        unsettled[at] -= 1
        if unsettled[at] <= 0:
            del unsettled[at]

    def confirm(self, record: PrefixRecord, cached_units: int) -> None:
        """The model reports it reused ``cached_units`` of the prompt of
        ``record``. Where we believed, before its send, that it held more,
        it evicted blocks we thought it had; its cache is LRU, so whatever
        we last routed there before those is gone too.

        Judged against the belief before the send, not the index now: the
        send's own record says every block of the prompt is held, and read
        as a belief, a new prompt's report (nothing reused, as for every
        prompt first seen) was an eviction of the whole target's index (a
        review, 2026-12-06: each server's index held one conversation, the
        last to complete). Nor a belief that only a send still unsettled
        made (two requests of one system prompt sent together: the second
        may be computed before the first's prefix is cached, and its report
        says nothing of what the model evicted)."""
        record.settle()
        held = self._held.get(record.key)
        actual = cached_units // self.block_size
        if held and actual < record.believed:
            missed = record.earlier[record.blocks[actual]]
            if missed is not None and not self._unsettled[record.key].get(missed):
                for block, seen in list(held.items()):
                    if seen > missed:
                        break
                    del held[block]
        self._mark(record.key, record.blocks)

    def size(self, key: str) -> int:
        return len(self._held.get(key, ()))


# --- Strategies ----------------------------------------------------------------------------


def _nothing_to_take_back() -> None:
    pass


class Strategy:
    """Ranks the targets that admit traffic, best first."""

    name: ClassVar[str]
    # Whether it reads RouteRequest.prefix_blocks: callers skip tokenizing otherwise.
    uses_prefix: ClassVar[bool] = False

    def rank(self, targets: list[T], request: RouteRequest) -> list[T]:
        raise NotImplementedError

    def routed(self, target: Target, request: RouteRequest) -> Callable[[], None]:
        """The request went to `target` (called once per target it is sent
        to). Returns what takes that back where the target refuses it unread
        and the request goes to another."""
        return _nothing_to_take_back

    def prefill_left(self, target: Target, request: RouteRequest) -> int:
        """Prompt units `target` would have to prefill: all of them, unless a
        prefix strategy believes it holds some (ask before routed())."""
        return request.prompt_units

    def reported(self, target: Target, routed: Callable[[], None], cached_units: int) -> None:
        """The target's model says how much of the prompt it served from
        cache; ``routed`` is what :meth:`routed` returned for its send."""


class _Rotation:
    """Spreads ties: rotating the start of a list before a stable sort."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def rotate(self, targets: list[T]) -> list[T]:
        if not targets:
            return targets
        start = next(self._counter) % len(targets)
        return targets[start:] + targets[:start]


class Weighted(Strategy):
    """A weighted draw without replacement (the router's historical choice)."""

    name = "weighted"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def rank(self, targets, request):
        remaining, ordered = list(targets), []
        # As shares of the largest: weights near the float maximum (finite,
        # so accepted at load) summed to infinity, and every draw raised.
        largest = max((t.weight for t in targets), default=1.0)
        scale = largest if largest > 1.0 else 1.0
        while remaining:
            pick = self._rng.choices(remaining, weights=[max(t.weight / scale, 1e-9) for t in remaining])[0]
            ordered.append(pick)
            remaining.remove(pick)
        return ordered


class LeastOutstanding(Strategy):
    """Fewest requests in flight per unit of weight, counting the one to
    send: idle, the heaviest first; under load, requests in flight settle
    in proportion to the weights. Ties rotate."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def rank(self, targets, request):
        return sorted(self._rotation.rotate(list(targets)), key=_outstanding)


def _outstanding(target: Target) -> float:
    # The request to send counts: with in_flight alone every idle target
    # scored 0 whatever its weight, and the weight only mattered under load.
    return (target.in_flight + 1) / max(target.weight, 1e-9)


class PowerOfTwoTtft(Strategy):
    """Two targets drawn at random, the one with the lower expected time to
    first token first: its TTFT EWMA scaled by the requests ahead per unit
    of weight (_outstanding). A target with no TTFT yet scores 0, so a new
    one gets tried; between equal scores, the least outstanding."""

    name = "p2c_ttft"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def rank(self, targets, request):
        targets = list(targets)
        if len(targets) < 2:
            return targets
        pair = self._rng.sample(targets, 2)
        first = min(pair, key=_expected_ttft)
        rest = sorted((t for t in targets if t is not first), key=_expected_ttft)
        return [first, *rest]


def _expected_ttft(target: Target) -> tuple[float, float]:
    outstanding = _outstanding(target)
    return ((target.ttft.value or 0.0) * outstanding, outstanding)


class SessionAffinity(Strategy):
    """Rendezvous (highest random weight) hashing of the session id: a
    session stays on its target while that admits traffic and moves to its
    next-ranked one otherwise (order() puts a broken target last), and adding
    or removing a target moves only the sessions it wins or held. Weighted
    rendezvous (score -weight / ln(hash in (0, 1))): a target's share of
    sessions follows its weight, and with equal weights the ranking is the
    hash's own. Requests without a session go to the least outstanding."""

    name = "session_affinity"

    def __init__(self) -> None:
        self._fallback = LeastOutstanding()

    def rank(self, targets, request):
        if not request.affinity_key:
            return self._fallback.rank(targets, request)
        return sorted(targets, key=lambda t: _rendezvous(t.key, request.affinity_key, t.weight), reverse=True)


def _rendezvous(target_key: str, affinity_key: str, weight: float = 1.0) -> float:
    # Stable across processes (unlike hash() of str), so every router replica agrees.
    digest = hashlib.blake2b(f"{target_key}\0{affinity_key}".encode(), digest_size=8).digest()
    # Its top 52 bits as a number strictly inside (0, 1) (exact in a float),
    # so the logarithm is finite and below zero.
    unit = ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52
    return -max(weight, 1e-9) / math.log(unit)


class QueueAware(Strategy):
    """Lowest expected wait from the model server's own figures: the recent
    queue time per request Triton reports, plus our requests in flight there
    (each one ahead is work), weighted by capacity."""

    name = "queue_aware"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def rank(self, targets, request):
        def wait(target: Target) -> tuple[float, float]:
            return (target.queue_ms(request.model), _outstanding(target))

        return sorted(self._rotation.rotate(list(targets)), key=wait)


class _PrefixStrategy(Strategy):
    uses_prefix = True

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._rotation = _Rotation()

    def routed(self, target, request):
        return self.index.record(target.key, request.prefix_blocks)

    def prefill_left(self, target, request):
        cached = self.index.overlap(target.key, request.prefix_blocks) * self.index.block_size
        return max(request.prompt_units - cached, 0)

    def reported(self, target, routed, cached_units):
        self.index.confirm(routed, cached_units)


class PrefixAffinity(_PrefixStrategy):
    """Longest believed prefix overlap first, ignoring load (the cost
    strategy weighs both), once the overlap is at least `min_share` of the
    prompt: every prompt of a chat template shares its first block or two
    (the template's own default system prompt), and counting those would
    send all traffic to whichever server saw a prompt first. Below it, and
    between equal overlaps, the least outstanding."""

    name = "prefix_affinity"

    def __init__(self, index: PrefixIndex, min_share: float = 0.5) -> None:
        super().__init__(index)
        self.min_share = min_share

    def rank(self, targets, request):
        needed = self.min_share * len(request.prefix_blocks)

        def score(target: Target) -> tuple[int, float]:
            overlap = self.index.overlap(target.key, request.prefix_blocks)
            return (-overlap if overlap and overlap >= needed else 0, _outstanding(target))

        return sorted(self._rotation.rotate(list(targets)), key=score)


class KvCost(_PrefixStrategy):
    """Cost in the spirit of NVIDIA Dynamo's KV router, in prompt tokens: the
    prefill a target would still do for this request after the prefix it
    holds (weighted by `prefill_weight`), plus the prefill already queued
    there, plus its decode load (the KV of the requests it runs, read by
    every decode step) weighted by `decode_weight`. Lowest cost first; with
    no prefix held anywhere it is the least loaded.

    Why these weights. A new request's uncached tokens are paid twice: in its
    own time to first token, and again in cache capacity, since a second
    copy of a prefix pushes other prefixes out of that server's cache; hence
    2 (Dynamo's overlap weight plays this part). Under it a server holding a
    prefix keeps taking its requests until about two other prompts' prefill
    queue there. A decoding token counts a tenth: on the bundled models' CPU
    engine a prefill token costs ~2.5 ms, while one more running sequence
    slows a decode step by ~25 ms (the bundled models' README), so a first
    token waits on prefill, not on the decodes beside it.
    """

    name = "kv_cost"

    def __init__(self, index: PrefixIndex, prefill_weight: float = 2.0, decode_weight: float = 0.1) -> None:
        super().__init__(index)
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight

    def cost(self, target: Target, request: RouteRequest) -> float:
        work = (
            self.prefill_weight * self.prefill_left(target, request)
            + target.queued_prefill_tokens
            + self.decode_weight * target.active_tokens
        )
        return work / max(target.weight, 1e-9)

    def rank(self, targets, request):
        return sorted(
            self._rotation.rotate(list(targets)),
            key=lambda t: (self.cost(t, request), _outstanding(t)),
        )


STRATEGIES = (
    Weighted.name,
    LeastOutstanding.name,
    PowerOfTwoTtft.name,
    SessionAffinity.name,
    PrefixAffinity.name,
    QueueAware.name,
    KvCost.name,
)


def build(name: str, block_size: int = 32, prefix_ttl_s: float = 600.0, max_blocks: int = 65536) -> Strategy:
    """A strategy by its configured name (config.py checks names against STRATEGIES)."""
    if name in (PrefixAffinity.name, KvCost.name):
        index = PrefixIndex(block_size, prefix_ttl_s, max_blocks)
        return PrefixAffinity(index) if name == PrefixAffinity.name else KvCost(index)
    simple = {
        Weighted.name: Weighted,
        LeastOutstanding.name: LeastOutstanding,
        PowerOfTwoTtft.name: PowerOfTwoTtft,
        SessionAffinity.name: SessionAffinity,
        QueueAware.name: QueueAware,
    }
    if name not in simple:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return simple[name]()


def order(strategy: Strategy, targets: Sequence[T], request: RouteRequest) -> list[T]:
    """The targets in the order to try them: the strategy's ranking of those
    whose health admits traffic, then the drained ones (weight 0) that admit
    it, fewest in flight first, then the others (open, ejected, probing) as
    last-resort fallbacks, drained ones last.

    Drained is decided here, not by each strategy's arithmetic: a weight of
    0 made a load score 0 / 1e-9 = 0, as good as any idle target's, so most
    strategies sent a drained deployment its share of traffic."""
    eject_outliers(targets)
    admitted: list[T] = []
    drained: list[T] = []
    refusing: list[T] = []
    for target in targets:
        if not target.health.admits:
            refusing.append(target)
        elif target.weight > 0:
            admitted.append(target)
        else:
            drained.append(target)
    ranked = strategy.rank(admitted, request) if admitted else []
    if drained:
        # Not ranked by the strategy: a second rank() would turn its
        # rotation (or draw) twice per request.
        ranked += sorted(drained, key=lambda t: t.in_flight)
    if refusing:
        ranked += sorted(refusing, key=lambda t: t.weight <= 0)
    return ranked
