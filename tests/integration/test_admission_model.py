"""Admission against a plain Python model of its limits, step by step
(Hypothesis' stateful testing), on a real Redis with an injected clock.

Rules admit turns of two tenants' keys on a limited and an unlimited model,
grow them, settle them (to less, as much or more than reserved; failed,
cancelled; once more), admit while Redis is unreachable, move the clock
across minutes, days and months, and reload limits and prices. The model
says, for every admission and growth, whether it is admitted and which
limit refuses it, and after every step what Redis must hold: each window's
live entries and sum, each budget, each stream lease
(docs/limits-and-usage.md). A divergence is shrunk to its shortest run of
steps."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import uuid

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from meshgate import redis_access
from meshgate.config import LimitSettings, PriceSettings
from meshgate.errors import MeshgateError
from services.router.admission import NANO_USD, Admission, Scope, cost_nano_usd
from tests.clocks import Clock

pytestmark = pytest.mark.integration

# `make fuzz` (HYPOTHESIS_PROFILE=fuzz) draws new runs each time, more of
# them; CI draws the same ones on every run (tests/fuzz/conftest.py).
FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"

MAX_GENERATION_S = 60
LEASE_MS = MAX_GENERATION_S * 1000 + 60_000
MINUTE_MS = 60_000
GRACE_S = 2 * 24 * 3600
# 90 s before midnight at the end of a month: a few steps cross a minute, a
# day and a month.
START_S = datetime.datetime(2026, 1, 31, 23, 58, 30, tzinfo=datetime.UTC).timestamp()

# (limit, kind, key suffix (a budget's before its period), what it charges)
LIMITS = (
    ("requests_per_minute", "window", "rpm", "requests"),
    ("tokens_per_minute", "window", "tpm", "tokens"),
    ("concurrent_streams", "streams", "streams", "requests"),
    ("tokens_per_day", "budget", "tokens:day", "tokens"),
    ("tokens_per_month", "budget", "tokens:month", "tokens"),
    ("cost_usd_per_day", "budget", "cost:day", "cost"),
    ("cost_usd_per_month", "budget", "cost:month", "cost"),
)
_NAMES = [name for name, *_ in LIMITS]

limit_settings = st.builds(
    LimitSettings,
    requests_per_minute=st.none() | st.integers(1, 6),
    tokens_per_minute=st.none() | st.integers(80, 400),
    concurrent_streams=st.none() | st.integers(1, 3),
    tokens_per_day=st.none() | st.integers(100, 800),
    tokens_per_month=st.none() | st.integers(200, 1500),
    # At 1,000 USD a million tokens, 100 to 1,500 tokens.
    cost_usd_per_day=st.none() | st.sampled_from([0.0001, 0.0004, 0.0007]),
    cost_usd_per_month=st.none() | st.sampled_from([0.0002, 0.0006, 0.0015]),
    fail_closed=st.lists(st.sampled_from(_NAMES), max_size=2),
)
prices = st.none() | st.builds(
    PriceSettings,
    prompt_usd_per_million=st.sampled_from([0.0, 0.1, 1000.0, 3000.0]),
    completion_usd_per_million=st.sampled_from([0.0, 0.3, 1000.0]),
)


# What a turn's admission draws: its key, its model and its token counts.
TURN_DRAWS = dict(
    key=st.sampled_from(["k1", "k2", "k3"]),
    model=st.sampled_from(["m1", "m2"]),
    prompt=st.integers(1, 60),
    max_tokens=st.integers(0, 60),
)


def _periods(now_s: float) -> tuple[str, str, int, int]:
    """The UTC day and month of ``now_s`` and when each ends (epoch s)."""
    moment = datetime.datetime.fromtimestamp(int(now_s), datetime.UTC)
    day_start = moment.replace(hour=0, minute=0, second=0)
    next_day = day_start + datetime.timedelta(days=1)
    month_start = day_start.replace(day=1)
    next_month = (month_start + datetime.timedelta(days=32)).replace(day=1)
    return (
        f"{day_start:%Y-%m-%d}",
        f"{month_start:%Y-%m}",
        int(next_day.timestamp()),
        int(next_month.timestamp()),
    )


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    """One limit a turn was charged to, as the model sees it."""

    limit: str
    kind: str
    key: str
    bound: int
    charges: str
    # A budget's period end plus the grace: a settlement after it that
    # finds no counter makes none.
    expires_at_s: int

    def cost(self, tokens: int, nano_usd: int) -> int:
        if self.charges == "tokens":
            return tokens
        return nano_usd if self.charges == "cost" else 1


@dataclasses.dataclass
class Turn:
    grant: object  # the code's Reservation
    price: PriceSettings | None
    prompt: int
    max_tokens: int
    tokens: int
    nano_usd: int
    # Charged at admission, requests_per_minute left out (never settled).
    checks: tuple[ModelCheck, ...]
    admitted_ms: float = 0.0
    unchecked: bool = False
    settled: bool = False


class AdmissionMachine(RuleBasedStateMachine):
    turns = Bundle("turns")
    settled_turns = Bundle("settled_turns")

    def __init__(self, redis_url: str, split_by_slot: bool) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = redis_access.connect(redis_url)
        self.dead = redis_access.connect("redis://127.0.0.1:1/0")
        self.clock = Clock(START_S)
        self.admission = Admission(self.redis, MAX_GENERATION_S, self.clock, split_by_slot=split_by_slot)
        # The same router with Redis unreachable (connections refused).
        self.unreachable = Admission(self.dead, MAX_GENERATION_S, self.clock, split_by_slot=split_by_slot)
        run = uuid.uuid4().hex[:10]
        # Two tenants; the first has two keys. One model alias has limits.
        self.split_by_slot = split_by_slot
        self.keys = {"k1": f"t1-{run}", "k2": f"t1-{run}", "k3": f"t2-{run}"}
        self.limits: dict[tuple[str, str], LimitSettings] = {}
        self.prices: dict[str, PriceSettings | None] = {"m1": None, "m2": None}
        self.model_alias = {"m1": f"m1-{run}", "m2": f"m2-{run}"}
        self.run_id = run
        # What Redis must hold: a window's entries (lease -> [score ms, cost]),
        # budgets (key -> value; present once made), streams (lease -> expiry ms).
        self.windows: dict[str, dict[str, list]] = {}
        self.budgets: dict[str, int] = {}
        self.streams: dict[str, dict[str, float]] = {}
        # The periods the clock has been in.
        self.periods = {_periods(self.clock.now)}

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.redis.aclose())
        self.run(self.dead.aclose())
        self.loop.close()

    @property
    def now_ms(self) -> float:
        return self.clock.now * 1000

    # -- set-up and reloads ---------------------------------------------

    @initialize(
        tenant1=limit_settings,
        tenant2=limit_settings,
        key1=limit_settings,
        key2=limit_settings,
        key3=limit_settings,
        model=limit_settings,
        price1=prices,
        price2=prices,
    )
    def configure(self, tenant1, tenant2, key1, key2, key3, model, price1, price2):
        self.limits = {
            ("tenant", "t1"): tenant1,
            ("tenant", "t2"): tenant2,
            ("key", "k1"): key1,
            ("key", "k2"): key2,
            ("key", "k3"): key3,
            ("model", "m1"): model,
        }
        self.prices = {"m1": price1, "m2": price2}

    @rule(
        scope=st.sampled_from(
            [("tenant", "t1"), ("tenant", "t2"), ("key", "k1"), ("key", "k3"), ("model", "m1")]
        ),
        limits=limit_settings,
    )
    def reload_limits(self, scope, limits):
        # A reload: new settings objects, the counters kept.
        self.limits[scope] = limits

    @rule(model=st.sampled_from(["m1", "m2"]), price=prices)
    def reload_prices(self, model, price):
        self.prices[model] = price

    @rule(step_s=st.sampled_from([0.001, 1.0, 20.0, 59.999, 60.0, 61.0, 3600.0, 86400.0]))
    def advance_clock(self, step_s):
        self.clock.now += step_s
        self.periods.add(_periods(self.clock.now))

    # -- scopes as the router builds them ---------------------------------

    def _scopes(self, key: str, model: str) -> list[Scope]:
        tenant = "t1" if key in ("k1", "k2") else "t2"
        tenant_id = self.keys[key]
        scopes = [
            Scope("tenant", tenant_id, self.limits[("tenant", tenant)]),
            Scope("key", f"{key}-{self.run_id}", self.limits[("key", key)], tenant_id),
        ]
        if model == "m1":
            scopes.append(Scope("model", self.model_alias["m1"], self.limits[("model", "m1")]))
        return scopes

    def _model_checks(self, scopes: list[Scope]) -> list[ModelCheck]:
        day, month, day_end_s, month_end_s = _periods(self.clock.now)
        checks = []
        for scope in scopes:
            for name, kind, suffix, charges in LIMITS:
                value = getattr(scope.limits, name)
                if value is None:
                    continue
                bound = round(value * NANO_USD) if charges == "cost" else value
                expires_at_s = 0
                if kind == "budget":
                    daily = suffix.endswith("day")
                    suffix = f"{suffix}:{day if daily else month}"
                    expires_at_s = (day_end_s if daily else month_end_s) + GRACE_S
                checks.append(
                    ModelCheck(name, kind, f"{scope.prefix}:{suffix}", bound, charges, expires_at_s)
                )
        return checks

    # -- what the model says a check holds --------------------------------

    def _live(self, key: str) -> dict[str, list]:
        since = self.now_ms - MINUTE_MS
        return {lease: entry for lease, entry in self.windows.get(key, {}).items() if entry[0] > since}

    def _held(self, key: str) -> set[str]:
        return {lease for lease, expiry in self.streams.get(key, {}).items() if expiry > self.now_ms}

    def _refuses(self, check: ModelCheck, cost: int) -> bool:
        if check.kind == "window":
            return sum(cost for _, cost in self._live(check.key).values()) + cost > check.bound
        if check.kind == "budget":
            return self.budgets.get(check.key, 0) + cost > check.bound
        return len(self._held(check.key)) >= check.bound

    # -- turns --------------------------------------------------------------

    @rule(target=turns, **TURN_DRAWS)
    def admit(self, key, model, prompt, max_tokens):
        scopes = self._scopes(key, model)
        price = self.prices[model]
        tokens, nano_usd = prompt + max_tokens, cost_nano_usd(price, prompt, max_tokens)
        checks = self._model_checks([scope for scope in scopes if scope.limits.configured()])
        costs = [check.cost(tokens, nano_usd) for check in checks]
        too_big = [c for c, cost in zip(checks, costs) if c.kind != "streams" and cost > c.bound]
        refusing = [c for c, cost in zip(checks, costs) if self._refuses(c, cost)]
        try:
            grant = self.run(self.admission.admit(scopes, prompt, max_tokens, price))
        except MeshgateError as error:
            expected = too_big or refusing
            assert expected, f"refused {error.metadata} where the model admits"
            first = expected[0]
            event(f"admit refused: {error.reason} {first.limit}")
            reason = {"window": "RATE_LIMITED", "budget": "BUDGET_EXHAUSTED", "streams": "RATE_LIMITED"}
            assert error.metadata["limit"] == first.limit
            assert str(error.reason) == ("REQUEST_EXCEEDS_LIMIT" if too_big else reason[first.kind])
            return multiple()
        assert not too_big and not refusing, f"admitted past {(too_big or refusing)[0]}"
        lease = grant.lease_id
        for check, cost in zip(checks, costs):
            if check.kind == "window":
                self.windows.setdefault(check.key, {})[lease] = [self.now_ms, cost]
            elif check.kind == "budget":
                self.budgets[check.key] = self.budgets.get(check.key, 0) + cost
            else:
                self.streams.setdefault(check.key, {})[lease] = self.now_ms + LEASE_MS
        settled = tuple(c for c in checks if c.limit != "requests_per_minute")
        return Turn(grant, price, prompt, max_tokens, tokens, nano_usd, settled, self.now_ms)

    @rule(target=turns, **TURN_DRAWS)
    def admit_while_redis_is_unreachable(self, key, model, prompt, max_tokens):
        scopes = self._scopes(key, model)
        price = self.prices[model]
        tokens, nano_usd = prompt + max_tokens, cost_nano_usd(price, prompt, max_tokens)
        configured = [scope for scope in scopes if scope.limits.configured()]
        checks = self._model_checks(configured)
        too_big = [c for c in checks if c.kind != "streams" and c.cost(tokens, nano_usd) > c.bound]
        closed = [c for s in configured for c in self._model_checks([s]) if c.limit in s.limits.fail_closed]
        try:
            grant = self.run(self.unreachable.admit(scopes, prompt, max_tokens, price))
        except MeshgateError as error:
            expected = too_big or closed
            assert expected, f"refused {error.reason} {error.metadata} failing open"
            assert error.metadata["limit"] == expected[0].limit
            assert str(error.reason) == ("REQUEST_EXCEEDS_LIMIT" if too_big else "LIMITS_UNAVAILABLE")
            return multiple()
        assert not too_big and not closed, "admitted failing open past a limit that fails closed"
        budgets = tuple(c for c in checks if c.kind == "budget")
        if not checks:
            return Turn(grant, price, prompt, max_tokens, tokens, nano_usd, ())
        # Fail open: nothing reserved; its budgets are charged its use at its end.
        return Turn(grant, price, prompt, max_tokens, 0, 0, budgets, unchecked=True)

    @rule(turn=turns, extra_prompt=st.integers(1, 80) | st.integers(80, 400))
    def grow(self, turn, extra_prompt):
        """A session turn's assembled history, known after admission."""
        if turn.settled:
            return
        if self.split_by_slot and self.now_ms - turn.admitted_ms >= MINUTE_MS:
            # Known divergence, left: on a cluster, a growth one slot refuses
            # after the turn's window entry left its window (charged anew
            # from now in the other slot) is given back to the reservation,
            # not to nothing, so the window holds the old reservation anew
            # until the turn settles (milliseconds later). The pipeline grows
            # a turn right after its session's assembly, within
            # router.downstream_timeout_s of admission: never a minute on.
            return
        prompt = turn.prompt + extra_prompt
        tokens = prompt + turn.max_tokens
        nano_usd = cost_nano_usd(turn.price, prompt, turn.max_tokens)
        grown = [
            c
            for c in turn.checks
            if c.kind != "streams" and c.cost(tokens, nano_usd) != c.cost(turn.tokens, turn.nano_usd)
        ]
        if turn.unchecked or not turn.checks:
            grown = []
        lease = turn.grant.lease_id
        # Refused before Redis where one turn alone could never fit; else by
        # the first limit that cannot hold the growth.
        expected = next((c for c in grown if c.cost(tokens, nano_usd) > c.bound), None)
        reason = "REQUEST_EXCEEDS_LIMIT"
        more = {}
        for c in grown:
            before, after = c.cost(turn.tokens, turn.nano_usd), c.cost(tokens, nano_usd)
            if c.kind == "window":
                # Its entry gone from the window: the grown cost is charged anew.
                more[c] = after - before if lease in self._live(c.key) else after
                used = sum(cost for _, cost in self._live(c.key).values())
            else:
                more[c] = after - before
                used = self.budgets.get(c.key, 0)
            if expected is None and used + more[c] > c.bound:
                expected, reason = c, ("RATE_LIMITED" if c.kind == "window" else "BUDGET_EXHAUSTED")
        try:
            self.run(self.admission.top_up(turn.grant, tokens, nano_usd))
        except MeshgateError as error:
            event(f"growth refused: {error.reason} {error.metadata['limit']}")
            assert expected is not None, f"growth refused {error.metadata} where the model holds it"
            assert (error.metadata["limit"], str(error.reason)) == (expected.limit, reason)
            return
        assert expected is None, f"growth admitted past {expected}"
        event(f"growth admitted, {len(grown)} grown")
        if not grown:
            if not turn.unchecked and turn.checks:
                turn.prompt, turn.tokens, turn.nano_usd = prompt, tokens, nano_usd
            return
        for c in grown:
            if c.kind == "window":
                entry = self._live(c.key).get(lease)
                score = entry[0] if entry is not None else self.now_ms
                self.windows[c.key][lease] = [score, c.cost(tokens, nano_usd)]
            else:
                self.budgets[c.key] += more[c]
        turn.prompt, turn.tokens, turn.nano_usd = prompt, tokens, nano_usd

    @rule(
        target=settled_turns,
        turn=consumes(turns),
        end=st.sampled_from(["less", "equal", "more", "failed", "cancelled"]),
        completion=st.integers(0, 150),
        batched=st.booleans(),
    )
    def settle(self, turn, end, completion, batched):
        prompt, max_tokens = turn.prompt, turn.max_tokens
        used_prompt, used_completion = {
            "less": (prompt, min(completion, max_tokens) // 2),
            "equal": (prompt, max_tokens),
            # Past the reservation: a template that cannot be measured, fail open.
            "more": (prompt, max_tokens + completion + 1),
            "failed": (0, 0),
            "cancelled": (prompt, 0),
        }[end]
        tokens = used_prompt + used_completion
        nano_usd = cost_nano_usd(turn.price, used_prompt, used_completion)
        self._settle(turn, tokens, nano_usd, batched)
        return turn

    def _settle(self, turn: Turn, tokens: int, nano_usd: int, batched: bool) -> None:
        if batched:
            self.run(self._settle_soon(turn.grant, tokens, nano_usd))
        else:
            self.run(self.admission.settle(turn.grant, tokens, nano_usd))
        if turn.settled:
            return
        turn.settled = True
        lease = turn.grant.lease_id
        for c in turn.checks:
            reserved, used = c.cost(turn.tokens, turn.nano_usd), c.cost(tokens, nano_usd)
            if c.kind == "window":
                entry = self.windows.get(c.key, {}).get(lease)
                if entry is not None:
                    entry[1] = used
            elif c.kind == "budget" and used != reserved:
                if c.key in self.budgets:
                    self.budgets[c.key] += used - reserved
                elif used > reserved and c.expires_at_s * 1000 > self.now_ms:
                    self.budgets[c.key] = used - reserved
            elif c.kind == "streams":
                self.streams[c.key].pop(lease, None)

    async def _settle_soon(self, grant, tokens: int, nano_usd: int) -> None:
        # As the router settles: batched, written by the next flush.
        self.admission.settle_soon(grant, tokens, nano_usd)
        await self.admission.flush()

    @rule(turn=settled_turns, tokens=st.integers(0, 300), batched=st.booleans())
    def settle_again(self, turn, tokens, batched):
        """A turn settled already: nothing changes, whatever this says."""
        self._settle(turn, tokens, tokens * 1000, batched)

    # -- what Redis holds -----------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_says(self):
        if not self.limits:
            return
        self.run(self._compare())

    async def _compare(self) -> None:
        since = self.now_ms - MINUTE_MS
        pipe = self.redis.pipeline(transaction=False)
        windows, budgets, streams = list(self.windows), list(self.budgets), list(self.streams)
        for key in windows:
            pipe.zrange(key, 0, -1, withscores=True)
            pipe.get(f"{key}:sum")
        for key in budgets:
            pipe.get(key)
        for key in streams:
            pipe.zrangebyscore(key, f"({self.now_ms!r}", "+inf")
        replies = iter(await pipe.execute())
        for key in windows:
            entries, total = next(replies), int(next(replies) or 0)
            costs = {member.decode(): score for member, score in entries}
            # The sum counts every entry still in the set.
            assert total == sum(int(member.rsplit(":", 1)[1]) for member in costs), key
            live = {}
            for member, score in costs.items():
                lease, cost = member.rsplit(":", 1)
                assert int(cost) >= 0, (key, member)
                if score > since and int(cost):
                    live[lease] = int(cost)
            expected = {lease: cost for lease, (score, cost) in self._live(key).items() if cost}
            assert live == expected, f"{key}: Redis {live}, model {expected}"
        for key in budgets:
            value = int(next(replies) or 0)
            assert value >= 0, key
            assert value == self.budgets[key], f"{key}: Redis {value}, model {self.budgets[key]}"
        for key in streams:
            held = {member.decode() for member in next(replies)}
            assert held == self._held(key), f"{key}: Redis {held}, model {self._held(key)}"
        # No budget the model never charged holds anything (a turn one slot
        # refused is refunded in the other: its counters back to 0).
        others = [key for key in self._every_budget_key() if key not in self.budgets]
        for key, value in zip(others, await self.redis.mget(others) if others else []):
            assert int(value or 0) == 0, f"{key} charged {value}, unknown to the model"

    def _every_budget_key(self):
        """Every budget counter a turn of any scope could have charged in
        the periods the clock has been in."""
        prefixes = [scope.prefix for key in self.keys for scope in self._scopes(key, "m1")]
        for day, month, *_ in self.periods:
            for prefix in dict.fromkeys(prefixes):
                yield from (f"{prefix}:{kind}:day:{day}" for kind in ("tokens", "cost"))
                yield from (f"{prefix}:{kind}:month:{month}" for kind in ("tokens", "cost"))


@pytest.mark.parametrize("split_by_slot", [False, True], ids=["one-instance", "cluster-slots"])
def test_admission_keeps_to_its_model(redis_url, split_by_slot):
    """Every admission, growth and settlement does what docs/limits-and-usage.md's model
    of the limits says, and Redis holds the model's counters after each."""
    run_state_machine_as_test(
        lambda: AdmissionMachine(redis_url, split_by_slot),
        settings=settings(
            max_examples=int(os.environ.get("MESHGATE_FUZZ_EXAMPLES") or (300 if FUZZING else 40)),
            stateful_step_count=40,
            deadline=None,
            derandomize=not FUZZING,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
