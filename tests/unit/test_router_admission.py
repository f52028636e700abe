"""The pure parts of admission control: periods, costs, estimates, limit settings."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import math

import grpc
import hypothesis
import pytest
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import (
    ConfigError,
    LimitSettings,
    ModelSettings,
    PriceSettings,
    RouterSettings,
    Settings,
    _build,
    check_router_models,
    load_settings,
)
from meshgate.errors import MeshgateError
from services.router.admission import (
    _ADMIT,
    _SETTLE,
    _SETTLE_ONCE,
    _TOP_UP,
    Admission,
    Scope,
    TurnAdmission,
    _period_ids,
    _Plan,
    admission_scopes,
    cost_nano_usd,
    estimate_prompt_tokens,
    share_nano_usd,
)
from services.router.auth import Tenant
from services.router.ledger import STREAM, Ledger, UsageRecord, day_key
from services.router.prompt_bound import prompt_bounds


def _utc(*fields) -> float:
    return datetime.datetime(*fields, tzinfo=datetime.UTC).timestamp()


def test_periods_roll_over_at_utc_day_and_month_ends():
    day, month, day_left, month_left = _period_ids(_utc(2026, 1, 31, 23, 59, 59))
    assert (day, month, day_left, month_left) == ("2026-01-31", "2026-01", 1, 1)
    day, month, day_left, month_left = _period_ids(_utc(2026, 2, 1, 0, 0, 0))
    assert (day, month) == ("2026-02-01", "2026-02")
    assert day_left == 24 * 3600
    assert month_left == 28 * 24 * 3600
    # December rolls into the next year.
    assert _period_ids(_utc(2026, 12, 31, 12))[3] == 12 * 3600


def test_cost_is_exact_nano_usd_and_free_without_prices():
    price = PriceSettings(prompt_usd_per_million=0.15, completion_usd_per_million=0.6)
    # 1000 * 0.15 + 10 * 0.6 = 156 USD per million tokens -> 156e-6 USD.
    assert cost_nano_usd(price, 1000, 10) == 156_000
    assert cost_nano_usd(None, 1000, 10) == 0


@hypothesis.given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.decimals(0, 1000, places=4, allow_nan=False),
    st.decimals(0, 1000, places=4, allow_nan=False),
    st.decimals(0, 1, places=3, allow_nan=False),
)
def test_costs_and_a_hits_share_are_the_exact_decimal_rounded_up(
    prompt_tokens, completion_tokens, prompt_price, completion_price, fraction
):
    """Binary floats billed 3 tokens at $0.1 a million 301 nano-USD, and
    10% of 300 nano-USD 31: about one turn in eight a nano-USD over."""
    price = PriceSettings(float(prompt_price), float(completion_price), float(fraction))
    exact = (prompt_tokens * prompt_price + completion_tokens * completion_price) * 1000
    cost = cost_nano_usd(price, prompt_tokens, completion_tokens)
    assert cost == math.ceil(exact)
    assert share_nano_usd(cost, price.cache_hit_fraction) == math.ceil(cost * fraction)
    assert cost_nano_usd(PriceSettings(0.1, 0.0), 3, 0) == 300


@pytest.mark.parametrize(
    ("usd", "nano_usd"), [(0.000123456789, 123_456), (0.0000000015, 1), (4.35, 4_350_000_000)]
)
def test_a_cost_limit_is_the_decimal_written_in_whole_nano_usd_rounded_down(usd, nano_usd):
    """round(usd * 1e9) admitted 123,457 nano-USD under a budget of
    $0.000123456789 (0.211 nano-USD over), and 2 under one of 1.5."""
    scope = Scope("tenant", "t", LimitSettings(cost_usd_per_day=usd, cost_usd_per_month=usd))
    assert [check.a for check in _Plan(scope, "", 60_000).checks(1_800_000_000)] == [nano_usd, nano_usd]


def test_the_estimate_bounds_tokens_by_utf8_bytes():
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="héllo")]
    assert estimate_prompt_tokens(messages) == 6
    # ASCII counted without encoding, beside 4-byte characters.
    messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content="hi 😀"))
    assert estimate_prompt_tokens(messages) == 6 + 7


@pytest.mark.parametrize(
    "limits",
    [
        {"requests_per_minute": 0},
        {"tokens_per_minute": -5},
        {"cost_usd_per_day": 0.0},
        {"concurrent_streams": True},
        {"fail_closed": ["requests_per_hour"]},
    ],
)
def test_limits_of_zero_or_below_or_unknown_names_are_refused_at_load(limits):
    with pytest.raises(ConfigError):
        _build(Settings, {"router": {"model_limits": {"tiny-gpt": limits}}}, "")


def test_limits_and_prices_must_name_known_models():
    settings = _build(Settings, {"router": {"model_limits": {"tiny-gtp": {"requests_per_minute": 5}}}}, "")
    with pytest.raises(ConfigError, match="tiny-gtp"):
        check_router_models(settings)
    settings = _build(Settings, {"router": {"prices": {"nope": {"prompt_usd_per_million": 1}}}}, "")
    with pytest.raises(ConfigError, match="nope"):
        check_router_models(settings)


def test_a_limit_table_parses_with_floats_and_optional_fields():
    settings = _build(
        Settings,
        {
            "router": {
                "tenants": [
                    {"id": "a", "limits": {"cost_usd_per_day": 2, "fail_closed": ["cost_usd_per_day"]}}
                ]
            }
        },
        "",
    )
    limits = settings.router.tenants[0].limits
    assert limits.cost_usd_per_day == 2.0 and limits.requests_per_minute is None
    assert limits.configured() and not LimitSettings().configured()


def test_prices_are_checked():
    # A negative price is refused at load, naming it (config._check_number).
    with pytest.raises(ConfigError, match=r"router\.prices\.tiny-gpt\.prompt_usd_per_million"):
        load_settings(environ={"MESHGATE_ROUTER__PRICES__TINY-GPT__PROMPT_USD_PER_MILLION": "-1"})
    # A fraction past 1 too (config._FRACTIONS).
    with pytest.raises(ConfigError, match=r"router\.prices\.tiny-gpt\.cache_hit_fraction must be at most 1"):
        load_settings(environ={"MESHGATE_ROUTER__PRICES__TINY-GPT__CACHE_HIT_FRACTION": "1.5"})


def _admitted(keys: list[str]) -> list[int]:
    """An admit's (or top-up's) reply admitting the turn: each window (its
    keys the entries', then the sum's) at no use, freeing in a minute."""
    return [1] + [0, 60_000] * sum(key.endswith((":rpm:sum", ":tpm:sum")) for key in keys)


class _RecordingRedis:
    """Stands in for a Redis client: records the KEYS of every script call,
    direct or pipelined; ``admit_reply(keys)`` answers each admit and
    ``top_up_reply(keys)`` each top-up."""

    def __init__(
        self,
        admit_reply=_admitted,
        admit_answers: asyncio.Event | None = None,
        top_up_reply=_admitted,
    ) -> None:
        # (script, its KEYS): script "admit", "settle", "top_up" or "other"
        # (the ledger's).
        self.calls: list[tuple[str, list[str]]] = []
        self.admit_reply = admit_reply
        self.top_up_reply = top_up_reply
        self._admit_sha = ""
        # sha -> the script's name.
        self._names: dict[str, str] = {}
        # When given, an admit sent directly is answered once it is set.
        self.admit_answers = admit_answers
        self.admits_sent = 0

    def _answer(self, sha: str, keys: list[str]):
        name = self._names[sha]
        self.calls.append((name, keys))
        if name == "admit":
            return self.admit_reply(keys)
        return self.top_up_reply(keys) if name == "top_up" else 1

    def register_script(self, source: str):
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._names[sha] = {
            _ADMIT: "admit",
            _SETTLE: "settle",
            _SETTLE_ONCE: "settle",
            _TOP_UP: "top_up",
        }.get(source, "other")
        if source == _ADMIT:
            self._admit_sha = sha

        async def run(keys, args):
            if sha == self._admit_sha:
                self.admits_sent += 1
                if self.admit_answers is not None:
                    await self.admit_answers.wait()
            return self._answer(sha, list(keys))

        run.sha = sha
        return run

    def pipeline(self, transaction: bool):
        redis, queued = self, []

        class Pipeline:
            def execute_command(self, command, sha, key_count, *keys_and_args):
                assert command == "EVALSHA"
                queued.append((sha, list(keys_and_args[:key_count])))

            async def execute(self, raise_on_error: bool):
                return [redis._answer(sha, keys) for sha, keys in queued]

        return Pipeline()


_EVERY_LIMIT = LimitSettings(
    requests_per_minute=10,
    tokens_per_minute=10_000,
    concurrent_streams=2,
    tokens_per_day=100_000,
    tokens_per_month=1_000_000,
    cost_usd_per_day=5.0,
    cost_usd_per_month=50.0,
)


def _scopes(tenant_id: str):
    tenant = Tenant(tenant_id, frozenset({"*"}), "0123456789abcdef", _EVERY_LIMIT, _EVERY_LIMIT)
    settings = RouterSettings(model_limits={"tiny-gpt": _EVERY_LIMIT})
    return admission_scopes(tenant, "tiny-gpt", settings)


class _Turn:
    def __init__(self, tenant: Tenant, alias: str = "tiny-gpt") -> None:
        self.tenant, self.model_alias = tenant, alias


@pytest.mark.parametrize(
    ("tenant_limits", "model_limits", "waits"),
    [
        (LimitSettings(), {}, False),
        (LimitSettings(requests_per_minute=5), {}, True),
        (LimitSettings(), {"tiny-gpt": LimitSettings(tokens_per_day=100)}, True),
        (LimitSettings(), {"other": LimitSettings(tokens_per_day=100)}, False),
    ],
)
def test_a_turn_waits_for_admission_only_where_a_limit_applies(tenant_limits, model_limits, waits):
    """Where none applies, admit makes no Redis call, so the pipeline need
    not overlap its exact lookup with it (a task per turn for nothing)."""
    settings = RouterSettings(model_limits=model_limits)
    # A client that never connects: deciding asks nothing of Redis.
    stages = TurnAdmission(Admission(Redis(port=1), max_generation_s=60), settings)
    tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", tenant_limits, LimitSettings())
    assert stages.waits(_Turn(tenant)) is waits


def _slots(keys) -> set[int]:
    return {key_slot(key.encode()) for key in keys}


@pytest.mark.parametrize("tenant_id", ["acme", "a{b}c", "t:1"])
async def test_every_script_call_keeps_its_keys_in_one_cluster_slot(tenant_id):
    """Tenant, key and model limits, every kind: each admit and settle
    script call names all its keys in KEYS, and they share one slot (a
    tenant's and its key's counters in one, the model's, shared by every
    tenant, in its own call)."""
    redis = _RecordingRedis()
    admission = Admission(redis, max_generation_s=60, split_by_slot=True)
    scopes = _scopes(tenant_id)
    price = PriceSettings(prompt_usd_per_million=1.0, completion_usd_per_million=1.0)
    reservation = await admission.admit(scopes, 10, 10, price)
    admission.settle_soon(reservation, 15, 1000)
    await admission.flush()
    admits = [keys for script, keys in redis.calls if script == "admit"]
    settles = [keys for script, keys in redis.calls if script == "settle"]
    # 7 limits in each of 3 scopes; a window names its sum too: 9 keys a
    # scope, and each call the turn's mark (in two calls, one may refuse the
    # turn while the other's may have run: _run_or_refuse).
    assert sorted(len(keys) for keys in admits) == [10, 19]
    # Settled: all but the requests windows, in the same two slots, and each
    # call's mark (_SETTLE_ONCE).
    assert sorted(len(keys) for keys in settles) == [8, 15]
    for keys in admits + settles:
        assert len(_slots(keys)) == 1, keys
    assert {frozenset(_slots(keys)) for keys in admits} == {frozenset(_slots(keys)) for keys in settles}


async def test_a_turn_one_slot_refuses_is_refunded_in_the_slot_that_admitted_it():
    """The model's script refuses (its streams full), the tenant's admitted:
    the tenant's charges are refunded by a settlement in the tenant's slot."""

    def model_refuses(keys):
        return [0, 3, 1000] if ":model:" in keys[0] else _admitted(keys)

    redis = _RecordingRedis(admit_reply=model_refuses)
    admission = Admission(redis, max_generation_s=60, split_by_slot=True)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit(_scopes("acme"), 10, 10)
    assert refused.value.metadata["limit"] == "concurrent_streams"
    assert refused.value.metadata["scope"] == "model"
    refunds = [keys for script, keys in redis.calls if script == "settle"]
    assert refunds, "the tenant's charges were not refunded"
    assert all(":model:" not in key for keys in refunds for key in keys)
    for _, keys in redis.calls:
        assert len(_slots(keys)) == 1, keys
    # The refund names the requests-per-minute window too (a refused turn
    # was no request).
    assert any(key.endswith(":rpm") for keys in refunds for key in keys)


async def test_a_turn_one_slot_fails_to_run_is_refunded_where_admitted_and_follows_the_outage_policy():
    """On a cluster, the model's node refuses to run the script (out of
    memory) while the tenant's admitted the turn: the tenant's charges are
    refunded (else its stream lease and reservation would stand), and the
    turn is admitted without limits (fail open), as for an outage."""

    def model_fails(keys):
        return OutOfMemoryError("OOM command not allowed") if ":model:" in keys[0] else _admitted(keys)

    redis = _RecordingRedis(admit_reply=model_fails)
    admission = Admission(redis, max_generation_s=60, split_by_slot=True)
    opened = await admission.admit(_scopes("acme"), 10, 10)
    # Nothing reserved; its budgets are charged its whole use when it settles.
    assert opened.unchecked and (opened.reserved_tokens, opened.reserved_nano_usd) == (0, 0)
    assert opened.checks and {check.kind for check in opened.checks} == {"budget"}
    refunds = [keys for script, keys in redis.calls if script == "settle"]
    assert len(refunds) == 1, "the tenant's charges were not refunded"
    assert all(":model:" not in key for key in refunds[0])
    assert any(key.endswith(":streams") for key in refunds[0])


async def test_a_limit_that_refuses_wins_over_a_slot_that_fails():
    """The tenant's slot refused (its budget spent) while the model's node
    was read-only: the failure was raised, and the turn admitted (fail
    open) past the tenant's spent budget."""

    def replies(keys):
        if ":model:" in keys[0]:
            return ReadOnlyError("You can't write against a read only replica.")
        return [0, 1, 0]  # the tenant's first check refuses

    admission = Admission(_RecordingRedis(admit_reply=replies), max_generation_s=60, split_by_slot=True)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit(_scopes("acme"), 10, 10)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_one_redis_instance_takes_a_turn_in_one_atomic_call():
    redis = _RecordingRedis()
    admission = Admission(redis, max_generation_s=60, split_by_slot=False)
    first = await admission.admit(_scopes("acme"), 10, 10)
    second = await admission.admit(_scopes("acme"), 10, 10)
    admission.settle_soon(first, 15, 0)
    admission.settle_soon(second, 15, 0)
    await admission.flush()
    # Both turns' settlements in one call that names each key once, and the
    # call's one mark (_SETTLE_ONCE), not a mark a turn.
    calls = [(script, len(keys)) for script, keys in redis.calls]
    assert calls == [("admit", 27), ("admit", 27), ("settle", 22)]


@pytest.mark.parametrize("cancelled", [True, False], ids=["caller-cancelled", "caller-waits"])
async def test_a_turn_admitted_after_its_caller_went_away_is_refunded(cancelled):
    """The admit script went out, then its caller was cancelled (hung up,
    deadline passed) before the reply came: Redis admitted the turn all the
    same, and nothing would settle it, its stream lease held for
    max_generation_s plus a margin. The reply is read anyway and the turn
    refunded, every check of it (requests and the stream too: it never
    ran). A caller that waits gets its reservation, nothing refunded."""
    redis = _RecordingRedis(admit_answers=asyncio.Event())
    admission = Admission(redis, max_generation_s=60, split_by_slot=False)
    asking = asyncio.ensure_future(admission.admit(_scopes("acme"), 10, 10))
    while not redis.admits_sent:
        await asyncio.sleep(0)
    if cancelled:
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
    redis.admit_answers.set()
    if not cancelled:
        assert len((await asking).checks) == 18  # all but the 3 scopes' requests windows
    for _ in range(100):
        await asyncio.sleep(0)
    await admission.flush()
    admit_keys = [keys for script, keys in redis.calls if script == "admit"]
    refunds = [keys for script, keys in redis.calls if script == "settle"]
    if cancelled:
        assert len(refunds) == 1, "the turn Redis admitted was never settled"
        assert refunds == admit_keys  # naming each key the admit charged
        assert any(key.endswith(":streams") for key in refunds[0])
    else:
        assert refunds == []


@pytest.mark.parametrize("split_by_slot", [False, True])
async def test_the_ledger_names_every_key_it_writes_one_slot_per_call_on_a_cluster(split_by_slot):
    redis = _RecordingRedis()
    ledger = Ledger(redis, 100, retention_days=1, clock=lambda: 0.0, split_by_slot=split_by_slot)
    for tenant in ("acme", "globex", "acme"):
        ledger.submit(UsageRecord(tenant, "k", "tiny-gpt", "live", 1, 2, 0, "miss", 3, 4))
    await ledger.drain()
    acme, globex = day_key("acme", "1970-01-01"), day_key("globex", "1970-01-01")
    calls = sorted(keys for _, keys in redis.calls)
    # Each call's last key is its mark (written once per call), in the slot
    # of the key before it; the marks of two calls differ.
    marks = [keys.pop() for keys in calls]
    assert all(":written:" in mark for mark in marks) and len(set(marks)) == len(marks)
    if split_by_slot:
        # The log, then each tenant's totals, in calls of one slot each.
        assert calls == [[STREAM], [acme], [globex]]
        assert len(_slots([acme, globex])) == 2
        for keys, mark in zip(calls, marks, strict=True):
            assert _slots([*keys, mark]) == _slots(keys), mark
    else:
        assert calls == [[STREAM, acme, globex]]


class _RefusingRedis:
    """Stands in for a Redis client that is up but refuses every command
    with ``error`` (a ResponseError: out of memory, a read-only replica)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def register_script(self, source: str):
        async def run(keys, args):
            raise self.error

        run.sha = hashlib.sha1(source.encode()).hexdigest()
        return run

    def pipeline(self, transaction: bool):
        error = self.error

        class Pipeline:
            def hgetall(self, key):
                pass

            async def execute(self, raise_on_error: bool = True):
                raise error

        return Pipeline()


_REFUSALS = [
    OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
    ReadOnlyError("You can't write against a read only replica."),
]


@pytest.mark.parametrize("error", _REFUSALS, ids=["oom", "read-only"])
async def test_redis_refusing_the_admit_script_follows_the_outage_policy(error):
    """A Redis that answers but refuses to run the script cannot check the
    limits, as an unreachable one cannot: fail open by default, UNAVAILABLE
    LIMITS_UNAVAILABLE for a limit configured to fail closed (not INTERNAL)."""
    admission = Admission(_RefusingRedis(error), max_generation_s=60)
    tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", LimitSettings(requests_per_minute=5))
    opened = await admission.admit(admission_scopes(tenant, "tiny-gpt", RouterSettings()), 1, 1)
    assert opened.checks == ()
    closed = LimitSettings(requests_per_minute=5, fail_closed=["requests_per_minute"])
    tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", closed)
    with pytest.raises(MeshgateError) as refused:
        await admission.admit(admission_scopes(tenant, "tiny-gpt", RouterSettings()), 1, 1)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "LIMITS_UNAVAILABLE"


@pytest.mark.parametrize("error", [*_REFUSALS, ConnectionRefusedError()], ids=["oom", "read-only", "refused"])
async def test_a_refused_ledger_write_is_held_and_a_refused_usage_read_is_unavailable(error):
    """Records are written off the turns' path: a refusal (or a connect
    failing below redis-py) raises nothing there; the record is held to be
    written again (script_calls.Backlog) and given up when the router stops.
    GetUsage's read says UNAVAILABLE REDIS_UNAVAILABLE, the store at fault,
    not a bug."""
    ledger = Ledger(_RefusingRedis(error), 100, retention_days=1, clock=lambda: 0.0)
    await ledger.record(UsageRecord("acme", "k", "tiny-gpt", "live", 1, 2, 0, "miss", 3, 4))
    assert len(ledger._backlog) == 1
    await ledger.drain()
    assert len(ledger._backlog) == 0
    day = datetime.date(1970, 1, 1)
    with pytest.raises(MeshgateError) as refused:
        await ledger.usage("acme", day, day)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "REDIS_UNAVAILABLE"


# --- the reservation bounds the rendered prompt --------------------------------


class _PromptTurn:
    """A turn as TurnAdmission reads it (pipeline.Turn's fields)."""

    def __init__(self, tenant: Tenant, messages, model: ModelSettings | None = None) -> None:
        self.tenant, self.model_alias, self.model = tenant, "tiny-gpt", model or ModelSettings()
        self.messages, self.max_tokens = messages, 8


def _hello() -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content="hello")]


async def test_a_turn_without_limits_reserves_its_content_and_measures_no_template():
    """The hot path of a turn no limit charges stays as it was: no Redis,
    and no chat template read or measured (this one could not be)."""
    redis = _RecordingRedis()
    stages = TurnAdmission(Admission(redis, max_generation_s=60), RouterSettings())
    lost = ModelSettings(chat_template="/nonexistent/template.jinja")
    tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", LimitSettings())
    grant = await stages.admit(_PromptTurn(tenant, _hello(), lost))
    assert grant.reserved_tokens == len("hello") + 8
    assert redis.calls == [] and stages._bounds == {}


async def test_a_limited_turn_reserves_its_prompt_as_the_chat_template_renders_it():
    """Inference bills the rendered prompt (the template's text around each
    message, its prefix and generation cue): admission reserves its bound,
    not only the content's bytes."""
    stages = TurnAdmission(Admission(_RecordingRedis(), max_generation_s=60), RouterSettings())
    tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", LimitSettings(tokens_per_minute=1_000))
    messages = [*_hello(), common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="hi"), *_hello()]
    grant = await stages.admit(_PromptTurn(tenant, messages))
    template = prompt_bounds({"tiny-gpt": ModelSettings()})["tiny-gpt"].template_bytes(3)
    assert grant.reserved_tokens == len("hellohihello") + template + 8
    rendered = tokenization.load_chat_template("").render_messages(
        messages, as_text=tokenization.as_text(ModelSettings().tokenizer)
    )
    assert len(rendered.encode()) <= grant.reserved_tokens - 8


async def test_a_prompt_the_reservation_covers_or_no_token_limit_charges_grows_nothing():
    """reserve_prompt goes to Redis only for a prompt above what admission
    reserved and a token or cost limit that charges it: a stateless turn's
    own messages, or a turn limited by requests and streams alone, make no
    round trip."""
    redis = _RecordingRedis()
    stages = TurnAdmission(Admission(redis, max_generation_s=60), RouterSettings())
    history = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="x" * 500)
    for limits in (LimitSettings(tokens_per_day=10_000), LimitSettings(concurrent_streams=2)):
        tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", limits)
        turn = _PromptTurn(tenant, _hello())
        grant = await stages.admit(turn)
        await stages.reserve_prompt(grant, turn, turn.messages)
        if limits.tokens_per_day is None:
            await stages.reserve_prompt(grant, turn, [history, *turn.messages])
    assert [script for script, _ in redis.calls] == ["admit", "admit"]
    # A history above the reservation, under a token limit: one top-up.
    tenant = Tenant("t1", frozenset({"*"}), "0123456789abcdef", LimitSettings(tokens_per_day=10_000))
    turn = _PromptTurn(tenant, _hello())
    grant = await stages.admit(turn)
    await stages.reserve_prompt(grant, turn, [history, *turn.messages])
    assert [script for script, _ in redis.calls][-1] == "top_up"
    assert grant.reserved_tokens > 500 + len("hello") + 8


async def test_a_top_up_one_slot_refuses_is_given_back_in_the_other_without_freeing_its_stream():
    """On a cluster the model's budget refuses a session's history, the
    tenant's grew: the tenant's growth is given back by a settlement that
    names its token and cost counters only (its stream stays held: the turn
    still runs until it fails and settles), and the model's refusal stands."""

    def model_refuses(keys):
        return [0, 1, 0] if ":model:" in keys[0] else _admitted(keys)

    redis = _RecordingRedis(top_up_reply=model_refuses)
    admission = Admission(redis, max_generation_s=60, split_by_slot=True)
    grant = await admission.admit(_scopes("acme"), 10, 10)
    with pytest.raises(MeshgateError) as refused:
        await admission.top_up(grant, 2_000, 0)
    assert refused.value.metadata["scope"] == "model"
    assert grant.reserved_tokens == 20  # as admitted: the turn settles from it
    give_backs = [keys for script, keys in redis.calls if script == "settle"]
    assert len(give_backs) == 1
    assert all(":model:" not in key and not key.endswith(":streams") for key in give_backs[0])
