"""meshgate top's arithmetic and screen, from Prometheus text."""

from __future__ import annotations

import pytest

from meshgate import cli, top

_TTFT = "meshgate_router_time_to_first_token_seconds"


def router_text(fast: int, slow: int, tokens: int, errors: int) -> str:
    """``fast`` first tokens within 10 ms, ``slow`` ones within 100 ms."""
    total = fast + slow
    return f"""
# TYPE {_TTFT} histogram
{_TTFT}_bucket{{model="m",deployment="local",le="0.01"}} {fast}
{_TTFT}_bucket{{model="m",deployment="local",le="0.1"}} {total}
{_TTFT}_bucket{{model="m",deployment="local",le="+Inf"}} {total}
{_TTFT}_count{{model="m",deployment="local"}} {total}
{_TTFT}_sum{{model="m",deployment="local"}} 1.0
# TYPE meshgate_router_completion_tokens counter
meshgate_router_completion_tokens_total{{model="m",deployment="local"}} {tokens}
# TYPE meshgate_rpc_requests counter
meshgate_rpc_requests_total{{service="router",method="C",code="OK",reason=""}} {total}
meshgate_rpc_requests_total{{service="router",method="C",code="NOT_FOUND",reason="MODEL_NOT_FOUND"}} {errors}
"""


def test_quantiles_interpolate_within_the_bucket_as_promql_does():
    buckets = [(0.01, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert top.histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert top.histogram_quantile(0.75, buckets) == pytest.approx(0.055)
    assert top.histogram_quantile(0.99, buckets) == pytest.approx(0.0982)
    assert top.histogram_quantile(0.5, [(0.01, 0.0), (float("inf"), 0.0)]) is None
    # Past the last finite bucket only its bound is known.
    assert top.histogram_quantile(0.99, [(0.01, 1.0), (float("inf"), 10.0)]) == 0.01


def test_rows_use_the_interval_and_fall_back_to_the_whole_run():
    before = top.Scrape("router", "a", 0.0, top.parse(router_text(10, 0, 100, 0)))
    now = top.Scrape("router", "a", 2.0, top.parse(router_text(10, 4, 180, 1)))
    (row,) = top.model_rows(now, before, 2.0)
    assert (row.model, row.deployment) == ("m", "local")
    assert row.turns_per_s == 2.0 and row.tokens_per_s == 40.0
    # The interval's four turns were all slow: its quantiles, not the run's.
    assert not row.whole_run and row.ttft_p50_s == pytest.approx(0.055)
    (quiet,) = top.model_rows(now, now, 1.0)
    assert quiet.whole_run and quiet.turns_per_s == 0.0
    # The whole run: 7th of 14, within the first bucket of 10.
    assert quiet.ttft_p50_s == pytest.approx(0.007)


def test_a_restarted_router_counting_from_zero_again_reads_no_negative_rate():
    """A review: RPC/s read 0.0 after a router's restart, but TURNS/s
    -495.0 and TOKENS/s -24850.0 (its own arithmetic, unclamped)."""
    before = top.Scrape("router", "a", 0.0, top.parse(router_text(1000, 0, 50000, 0)))
    now = top.Scrape("router", "a", 2.0, top.parse(router_text(10, 0, 300, 0)))
    (row,) = top.model_rows(now, before, 2.0)
    assert row.turns_per_s == 0.0 and row.tokens_per_s == 0.0 and row.turns == 10


def test_an_earlier_scrape_that_failed_gives_no_rate():
    """No rate is taken from a scrape that could not be read: a review,
    with that check left out, had a service's RPC/s, ERR/s and CPU read
    from a failed scrape's empty totals (502.5, 2.5, 1500%)."""
    before = {"router": top.Scrape("router", "127.0.0.1:1", 0.0, error="connection refused")}
    now = {"router": top.Scrape("router", "127.0.0.1:1", 2.0, top.parse(router_text(3, 1, 40, 2)))}
    screen = top.render(now, before).splitlines()
    (service,) = [line.split() for line in screen if "127.0.0.1:1" in line]
    # RPC/s, ERR/s: none; RPCS, ERRORS: the totals.
    assert service[3:7] == ["0.0", "0.0", "6", "2"]
    (model,) = [line.split() for line in screen if line.startswith("m ")]
    assert model[2] == "0.0"  # TURNS/s


def test_the_screen_names_down_services_and_errors_by_reason():
    now = {
        "router": top.Scrape("router", "127.0.0.1:1", 1.0, top.parse(router_text(3, 1, 40, 2))),
        "cache": top.Scrape("cache", "127.0.0.1:2", 1.0, error="connection refused"),
    }
    screen = top.render(now, None)
    assert "cache      127.0.0.1:2            DOWN   connection refused" in screen
    assert any(
        line.split() == ["router", "NOT_FOUND", "MODEL_NOT_FOUND", "2"] for line in screen.splitlines()
    )
    assert any(line.split()[:2] == ["m", "local"] for line in screen.splitlines())


def inference_text(ok: int, cancelled: int, internal: int) -> str:
    return f"""
# TYPE meshgate_rpc_requests counter
meshgate_rpc_requests_total{{service="inference",method="G",code="OK",reason=""}} {ok}
meshgate_rpc_requests_total{{service="inference",method="G",code="CANCELLED",reason=""}} {cancelled}
meshgate_rpc_requests_total{{service="inference",method="G",code="INTERNAL",reason=""}} {internal}
"""


def test_a_services_errors_leave_out_cancelled_and_the_whole_runs_table_lists_it():
    """A router dropping its speculative generation, or a caller hanging up,
    ends the inference service's Generate CANCELLED: the caller's choice,
    not the service's failure. They were counted in its ERR/s and ERRORS."""
    before = {"inference": top.Scrape("inference", "127.0.0.1:3", 0.0, top.parse(inference_text(10, 0, 0)))}
    now = {"inference": top.Scrape("inference", "127.0.0.1:3", 2.0, top.parse(inference_text(12, 4, 1)))}
    screen = top.render(now, before).splitlines()
    (row,) = [line.split() for line in screen if "127.0.0.1:3" in line]
    # RPC/s, ERR/s, RPCS, ERRORS: 7 RPCs in 2 s, one INTERNAL.
    assert row[3:7] == ["3.5", "0.5", "17", "1"]
    assert any(line.split() == ["inference", "CANCELLED", "-", "4"] for line in screen)
    assert any(line.split() == ["inference", "INTERNAL", "-", "1"] for line in screen)


def test_a_service_whose_metrics_are_off_is_a_row_that_says_so():
    """It was left out of the screen without a word; it is no failure."""
    now = top.scrape_all({"context": ""})
    assert now["context"].off and not now["context"].error
    assert "context    -                      OFF    metrics_listen is unset" in top.render(now, None)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--interval", "-1"], "argument --interval: a number of seconds above 0"),
        (["--interval", "nan"], "argument --interval: a number of seconds above 0"),
    ],
)
def test_an_interval_time_cannot_sleep_is_a_usage_error(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["top", "--once", *arguments])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "No such file or directory"),
        ("x = ", "Invalid value"),
        ('[router]\nmetrics_listen = "nope"', "nope"),
    ],
    ids=["missing", "not TOML", "a bad address"],
)
def test_settings_top_cannot_read_are_one_line_and_exit_1(tmp_path, text, message, capsys):
    config = tmp_path / "meshgate.toml"
    if text is not None:
        config.write_text(text)
    assert cli.main(["top", "--once", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshgate top: cannot read the settings: ") and message in err
    assert "Traceback" not in err


def cache_text(exact: int, miss: int) -> str:
    return f"""
# TYPE meshgate_cache_lookups counter
meshgate_cache_lookups_total{{result="exact_hit"}} {exact}
meshgate_cache_lookups_total{{result="miss"}} {miss}
"""


def turns_text(exact: int, miss: int) -> str:
    return f"""
# TYPE meshgate_router_turns counter
meshgate_router_turns_total{{model="m",cache="exact_hit",outcome="completed"}} {exact}
meshgate_router_turns_total{{model="m",cache="miss",outcome="completed"}} {miss}
meshgate_router_turns_total{{model="m",cache="miss",outcome="failed"}} 1
"""


def test_the_cache_hit_rate_counts_the_hits_the_router_answered_from_its_hot_copies():
    """One miss, then five repeats: the router answered four of them from
    its hot copies, so the cache saw one miss and one hit (a review: top
    said 50%)."""
    cache = top.Scrape("cache", "127.0.0.1:2", 1.0, top.parse(cache_text(exact=1, miss=1)))
    router = top.Scrape("router", "127.0.0.1:1", 1.0, top.parse(turns_text(exact=5, miss=1)))
    screen = top.render({"router": router, "cache": cache}, None)
    assert "CACHE  hit rate 71.4% of 7 turns (exact 5, semantic 0, miss 2); cache lookups 2;" in screen
    # Without the router's numbers, the cache's own lookups.
    alone = top.render({"cache": cache}, None)
    assert "CACHE  hit rate 50.0% of 2 lookups (exact 1, semantic 0, miss 1); cache lookups 2;" in alone
