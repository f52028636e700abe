"""``meshgate top``: the mesh at a glance for an operator without Grafana.

Reads every service's Prometheus endpoint (the settings' ``metrics_listen``),
parses the text format with ``prometheus_client.parser`` and shows request
and error rates, time to first token p50/p99 (from the histogram's buckets,
as PromQL's ``histogram_quantile`` does), tokens per second, the cache's hit
rate, errors by reason and each process's CPU and memory (a service's
errors leave out CANCELLED, its caller's choice). Rates are over the
refresh interval; quantiles over it too, or over the whole run (marked
``*``) when the interval saw no turn.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

from meshgate.config import Settings

SERVICES = ("router", "context", "cache", "inference")
_SCRAPE_TIMEOUT_S = 2.0

Labels = tuple[tuple[str, str], ...]


@dataclasses.dataclass
class Scrape:
    """One service's samples at one moment; ``samples`` is empty when it
    could not be read (``error`` says why)."""

    service: str
    address: str
    taken_at: float
    samples: dict[str, dict[Labels, float]] = dataclasses.field(default_factory=dict)
    error: str = ""
    # Its metrics_listen is unset: nothing to read, and no failure.
    off: bool = False

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def total(self, name: str, **match: str) -> float:
        return sum(value for labels, value in self.series(name).items() if _matches(labels, match))


def _matches(labels: Labels, match: Mapping[str, str]) -> bool:
    values = dict(labels)
    return all(values.get(key) == wanted for key, wanted in match.items())


def parse(text: str) -> dict[str, dict[Labels, float]]:
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(service: str, address: str) -> Scrape:
    taken_at = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=_SCRAPE_TIMEOUT_S) as response:
            samples = parse(response.read().decode())
    except (urllib.error.URLError, OSError) as error:
        return Scrape(service, address, taken_at, error=str(getattr(error, "reason", error)))
    except (http.client.HTTPException, ValueError):
        # Something answers there, but not with Prometheus text: another
        # server, or a metrics_listen set to the service's own gRPC port
        # (not HTTP/1: http.client.BadStatusLine). Its bytes say nothing useful.
        return Scrape(service, address, taken_at, error="answers, but not with Prometheus metrics")
    return Scrape(service, address, taken_at, samples)


def endpoints(settings: Settings) -> dict[str, str]:
    return {name: getattr(settings, name).metrics_listen for name in SERVICES}


def scrape_all(targets: Mapping[str, str]) -> dict[str, Scrape]:
    """Every service's scrape; one whose metrics_listen is unset is a row
    that says so (it was left out of the screen without a word)."""
    return {
        name: scrape(name, address) if address else Scrape(name, "", time.monotonic(), off=True)
        for name, address in targets.items()
    }


def histogram_quantile(quantile: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """``quantile`` of a histogram given as (upper bound, cumulative count)
    pairs, interpolated linearly within its bucket as Prometheus does;
    None without observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = quantile * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                # Beyond the last finite bucket: its bound is all we know.
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return ordered[-1][0]


def _buckets(scrape_: Scrape, name: str, match: Mapping[str, str]) -> dict[float, float]:
    buckets: dict[float, float] = {}
    for labels, value in scrape_.series(name + "_bucket").items():
        if _matches(labels, match):
            bound = float(dict(labels)["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def _delta(now: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {bound: count - before.get(bound, 0.0) for bound, count in now.items()}


@dataclasses.dataclass
class ModelRow:
    model: str
    deployment: str
    turns_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    # Whether the quantiles are over the whole run (the interval saw no turn).
    whole_run: bool
    tokens_per_s: float
    turns: float


def model_rows(now: Scrape, before: Scrape | None, seconds: float) -> list[ModelRow]:
    ttft = "meshgate_router_time_to_first_token_seconds"
    keys = sorted(
        {(dict(labels)["model"], dict(labels)["deployment"]) for labels in now.series(ttft + "_count")}
    )
    rows = []
    for model, deployment in keys:
        match = {"model": model, "deployment": deployment}
        buckets = _buckets(now, ttft, match)
        window = _delta(buckets, _buckets(before, ttft, match)) if before is not None else {}
        whole_run = not window or max(window.values(), default=0.0) <= 0
        chosen = buckets if whole_run else window
        rows.append(
            ModelRow(
                model,
                deployment,
                # As every rate here: 0 without an earlier scrape, never
                # below 0 (a restarted router counts from 0 again).
                _rate(now, before, ttft + "_count", seconds, **match),
                histogram_quantile(0.5, chosen.items()),
                histogram_quantile(0.99, chosen.items()),
                whole_run,
                _rate(now, before, "meshgate_router_completion_tokens_total", seconds, **match),
                now.total(ttft + "_count", **match),
            )
        )
    return rows


def _earlier(before: Mapping[str, Scrape] | None, service: str) -> Scrape | None:
    """``service``'s earlier scrape, None where there is none or it could not
    be read: no rate is taken from it."""
    previous = before.get(service) if before else None
    return None if previous is None or previous.error else previous


def _per_second(now_total: float, before_total: float | None, seconds: float) -> float:
    """A counter's rate between two scrapes' totals: 0 without an earlier
    one (``before_total`` None), never below 0 (a restarted service counts
    from 0 again)."""
    if before_total is None:
        return 0.0
    return max(0.0, now_total - before_total) / seconds


def _rate(now: Scrape, before: Scrape | None, name: str, seconds: float, **match: str) -> float:
    return _per_second(
        now.total(name, **match), None if before is None else before.total(name, **match), seconds
    )


# Codes a service's ERR/s and ERRORS leave out: CANCELLED is its caller's
# choice ("cancelled, typically by the caller", gRPC's status codes), not a
# failure of the service: a caller that hung up, or the router dropping its
# own speculative generation, showed as errors of the inference service.
# Alerting on gRPC error rates leaves it out too (etcd's mixin counts
# Unknown, Internal, Unavailable, DeadlineExceeded..., never Canceled). The
# whole run's errors by reason still list it. Grafana's "Errors by reason"
# (deploy/grafana/overview.json) leaves out the same codes
# (tests/unit/test_dashboards.py).
NOT_SERVICE_ERRORS = frozenset({"OK", "CANCELLED"})


def _errors(scrape: Scrape) -> float:
    """The RPCs the service failed: those that ended with a code not in NOT_SERVICE_ERRORS."""
    return sum(
        value
        for labels, value in scrape.series("meshgate_rpc_requests_total").items()
        if dict(labels).get("code") not in NOT_SERVICE_ERRORS
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def render(now: Mapping[str, Scrape], before: Mapping[str, Scrape] | None) -> str:
    """One screen: the mesh's services, models, cache and errors."""
    lines = [f"meshgate top   {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S}"]
    first = next(iter(now.values()), None)
    earlier = next(iter(before.values()), None) if before else None
    seconds = max(1e-3, first.taken_at - earlier.taken_at) if first and earlier else 1.0
    lines.append(f"rates over the last {seconds:.1f} s; * = over the whole run (no turn in the interval)")
    lines.append("ERR/s and ERRORS leave out CANCELLED (the caller's choice); errors by reason list it")
    lines.append("")
    lines.append(
        f"{'SERVICE':<10} {'METRICS':<22} {'STATE':<6} {'RPC/s':>8} {'ERR/s':>7} "
        f"{'RPCS':>9} {'ERRORS':>7} {'CPU%':>6} {'RSS MiB':>8}"
    )
    for name, current in now.items():
        previous = _earlier(before, name)
        if current.off:
            lines.append(f"{name:<10} {'-':<22} {'OFF':<6} metrics_listen is unset: nothing to read")
            continue
        if current.error:
            lines.append(f"{name:<10} {current.address:<22} {'DOWN':<6} {current.error}")
            continue
        rpcs = current.total("meshgate_rpc_requests_total")
        errors = _errors(current)
        errors_rate = _per_second(errors, None if previous is None else _errors(previous), seconds)
        cpu = _rate(current, previous, "process_cpu_seconds_total", seconds) * 100
        rss = current.total("process_resident_memory_bytes") / 2**20
        lines.append(
            f"{name:<10} {current.address:<22} {'up':<6} "
            f"{_rate(current, previous, 'meshgate_rpc_requests_total', seconds):>8.1f} {errors_rate:>7.1f} "
            f"{rpcs:>9.0f} {errors:>7.0f} {cpu:>6.1f} {rss:>8.1f}"
        )

    router = now.get("router")
    if router is not None and not router.error:
        previous = _earlier(before, "router")
        lines.append("")
        lines.append(
            f"{'MODEL':<14} {'DEPLOYMENT':<12} {'TURNS/s':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
            f"{'TOKENS/s':>9} {'TURNS':>8}"
        )
        rows = model_rows(router, previous, seconds)
        for row in rows:
            mark = "*" if row.whole_run else " "
            lines.append(
                f"{row.model:<14} {row.deployment:<12} {row.turns_per_s:>8.1f} "
                f"{_ms(row.ttft_p50_s) + mark:>12} {_ms(row.ttft_p99_s) + mark:>12} "
                f"{row.tokens_per_s:>9.1f} {row.turns:>8.0f}"
            )
        if not rows:
            lines.append("(no turns yet)")

    cache = now.get("cache")
    if cache is not None and not cache.error:
        lookups = cache.total("meshgate_cache_lookups_total")
        # The hit rate of turns, where the router is read: it answers repeats
        # from its hot copies without a Lookup (router.hot_exact_entries), so
        # the cache's own lookups left those hits out (a review: 50% where
        # five of six turns were hits). Else the cache's lookups.
        if router is not None and not router.error:
            counter, label, counted = "meshgate_router_turns_total", "cache", "turns"
            source = router
        else:
            counter, label, counted = "meshgate_cache_lookups_total", "result", "lookups"
            source = cache
        exact = source.total(counter, **{label: "exact_hit"})
        semantic = source.total(counter, **{label: "semantic_hit"})
        misses = source.total(counter, **{label: "miss"})
        total = exact + semantic + misses
        hit_rate = f"{(exact + semantic) / total:.1%}" if total else "-"
        lines.append("")
        lines.append(
            f"CACHE  hit rate {hit_rate} of {total:.0f} {counted} (exact {exact:.0f}, semantic "
            f"{semantic:.0f}, miss {misses:.0f}); cache lookups {lookups:.0f}; verifier rejections "
            f"{cache.total('meshgate_cache_verifier_rejections_total'):.0f}; resident entries "
            f"{cache.total('meshgate_cache_resident_entries'):.0f}"
        )

    errors: dict[tuple[str, str, str], float] = {}
    for name, current in now.items():
        for labels, value in current.series("meshgate_rpc_requests_total").items():
            values = dict(labels)
            if values.get("code") != "OK" and value:
                key = (name, values.get("code", ""), values.get("reason", ""))
                errors[key] = errors.get(key, 0.0) + value
    lines.append("")
    if errors:
        lines.append(f"{'ERRORS (whole run)':<20} {'CODE':<20} {'REASON':<28} {'COUNT':>7}")
        for (name, code, reason), count in sorted(errors.items(), key=lambda item: -item[1])[:10]:
            lines.append(f"{name:<20} {code:<20} {reason or '-':<28} {count:>7.0f}")
    else:
        lines.append("ERRORS none")
    return "\n".join(lines) + "\n"


def run(targets: Mapping[str, str], once: bool, interval_s: float = 1.0, out=sys.stdout) -> int:
    """Refreshes every ``interval_s`` until interrupted; ``once``: two
    scrapes ``interval_s`` apart (for the rates), one screen, exit 0 when
    every endpoint answered."""
    before = scrape_all(targets)
    while True:
        time.sleep(interval_s)
        now = scrape_all(targets)
        screen = render(now, before)
        if once:
            out.write(screen)
            return 0 if all(not s.error for s in now.values()) else 1
        # Clear the terminal and draw from its top-left corner.
        out.write("\x1b[2J\x1b[H" + screen)
        out.flush()
        before = now
