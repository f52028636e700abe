"""The pure parts of admission control: periods, costs, estimates, limit settings."""

from __future__ import annotations

import datetime

import pytest

from meshgate.common.v1 import common_pb2
from meshgate.config import ConfigError, LimitSettings, PriceSettings, Settings, _build, check_router_models
from services.router.admission import _period_ids, cost_nano_usd, estimate_prompt_tokens


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


def test_the_estimate_bounds_tokens_by_utf8_bytes():
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content="héllo")]
    assert estimate_prompt_tokens(messages) == 6


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
    with pytest.raises(ConfigError):
        PriceSettings(prompt_usd_per_million=-1)
    with pytest.raises(ConfigError):
        PriceSettings(cache_hit_fraction=1.5)
