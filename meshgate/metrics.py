"""Prometheus metrics of every service, in one place.

Each service process exports its metrics on its own HTTP endpoint
(``<section>.metrics_listen``, started by :mod:`meshgate.serving`), read by
Prometheus, Grafana (``deploy/grafana/``) and ``meshgate top``.

Why prometheus_client and not OpenTelemetry's Prometheus exporter: a counter
increment plus a histogram observation, the work per streamed token, costs
0.85 us with prometheus_client's bound label children and 9.3 us with the
OpenTelemetry SDK's instruments (same labels, 200,000 iterations each; see
bench/README.md, "metrics_bench.py"). Traces stay OpenTelemetry (meshgate/telemetry.py).

Label values are bounded by configuration, never by traffic: model aliases,
deployment and backend names come from the settings; RPC methods, HTTP
routes (never a request's path), status codes, ErrorInfo reasons
(meshgate/reasons.py), limits and dispositions are fixed catalogues. No
tenant, key or session ids are labels: per-tenant usage is the router's
ledger (GetUsage), not a metric.

With ``telemetry.metrics = false`` every family is a no-op object: the hot
paths call the same methods and nothing is counted (bench/metrics_bench.py
compares the two).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from meshgate.config import tcp_listen_address

REGISTRY = prometheus_client.REGISTRY
# A "_created" timestamp series beside every counter and histogram doubles
# what each scrape carries and nothing here reads it.
prometheus_client.disable_created_metrics()

# Seconds. Time to first token spans a cache hit (a few ms) to a long
# prompt on a CPU model (seconds); tokens come every few to hundreds of ms.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
ASSEMBLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class _Disabled:
    """Stands for any family or child when metrics are off."""

    def labels(self, *values: str, **named: str) -> _Disabled:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set_function(self, function) -> None:
        pass


_DISABLED = _Disabled()


class _Families:
    """Makes families in ``registry``, or disabled stand-ins without one."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry

    def counter(self, name: str, help_text: str, labels: Iterable[str] = ()):
        if self.registry is None:
            return _DISABLED
        return prometheus_client.Counter(name, help_text, list(labels), registry=self.registry)

    def gauge(self, name: str, help_text: str, labels: Iterable[str] = ()):
        if self.registry is None:
            return _DISABLED
        return prometheus_client.Gauge(name, help_text, list(labels), registry=self.registry)

    def histogram(self, name: str, help_text: str, labels: Iterable[str], buckets: tuple[float, ...]):
        if self.registry is None:
            return _DISABLED
        return prometheus_client.Histogram(
            name, help_text, list(labels), buckets=buckets, registry=self.registry
        )


class RpcMetrics:
    """Every service: its RPCs by outcome, from the error interceptor; the
    router's HTTP requests too, by route (services/router/http_edge.py)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        make = _Families(registry)
        self.requests = make.counter(
            "meshgate_rpc_requests",
            "Finished RPCs by method, gRPC status code and ErrorInfo reason ('' when OK).",
            ("service", "method", "code", "reason"),
        )
        self.duration = make.histogram(
            "meshgate_rpc_duration_seconds",
            "Handling time of an RPC, a whole stream for streaming RPCs.",
            ("service", "method"),
            RPC_BUCKETS,
        )

    def observe(self, service: str, method: str, code: str, reason: str, seconds: float) -> None:
        self.requests.labels(service, method, code, reason).inc()
        self.duration.labels(service, method).observe(seconds)


class RouterMetrics:
    """The router's turns: latency of the stream, tokens, cache outcome, refusals."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        make = _Families(registry)
        self.time_to_first_token = make.histogram(
            "meshgate_router_time_to_first_token_seconds",
            "From the turn's start to its first delta; deployment 'cache' for a cache hit.",
            ("model", "deployment"),
            TTFT_BUCKETS,
        )
        self.inter_token = make.histogram(
            "meshgate_router_inter_token_seconds",
            "Between consecutive generated deltas of a turn (cache replays excluded).",
            ("model", "deployment"),
            INTER_TOKEN_BUCKETS,
        )
        self.prompt_tokens = make.counter(
            "meshgate_router_prompt_tokens", "Prompt tokens of finished turns.", ("model", "deployment")
        )
        self.completion_tokens = make.counter(
            "meshgate_router_completion_tokens",
            "Completion tokens of finished turns (a cache hit's are the stored answer's).",
            ("model", "deployment"),
        )
        self.turns = make.counter(
            "meshgate_router_turns",
            "Turns by model, cache status (exact_hit, semantic_hit, miss, bypassed, none) "
            "and outcome (completed, failed, cancelled).",
            ("model", "cache", "outcome"),
        )
        self.limit_refusals = make.counter(
            "meshgate_router_limit_refusals",
            "Turns refused at admission, by limit, scope kind (tenant, key, model) and reason "
            "(RATE_LIMITED, BUDGET_EXHAUSTED, REQUEST_EXCEEDS_LIMIT, LIMITS_UNAVAILABLE).",
            ("limit", "scope", "reason"),
        )
        self.model_selections = make.counter(
            "meshgate_router_model_selections",
            "Turns of an alias that selects among models (models.<alias>.selection), by the "
            "alias, the model chosen and why (tier, cost_cap, complexity, complexity_features_only).",
            ("alias", "model", "reason"),
        )
        self.streams_in_flight = make.gauge(
            "meshgate_router_streams_in_flight", "Turns under way.", ("model",)
        )
        self.hot_copies_live = make.gauge(
            "meshgate_router_hot_copies_live",
            "1 while this router answers repeats of cache hits from its own copies "
            "(router.hot_exact_entries): subscribed to the cache service's notices and hearing its "
            "heartbeat (every 1 s; lost after 3 s); 0 while they are asked of the cache service: no "
            "heartbeat heard, or a hit within 3 s named a cache replica's heartbeat not heard.",
        )
        # Whose: the router's info log of each names the tenant, as no
        # tenant id is a label (this module's docstring).
        self.cache_quota_refusals = make.counter(
            "meshgate_router_cache_quota_refusals",
            "Answers left uncached because the cache refused their Store at the tenant's "
            "cache.max_bytes_per_tenant (CACHE_QUOTA_EXCEEDED), by model; which tenant: the "
            "router's info log 'answer not cached'.",
            ("model",),
        )
        self.deferred_writes = make.counter(
            "meshgate_router_deferred_writes",
            "Writes of what turns used (write: settlement, ledger) by outcome: deferred (Redis "
            "refused it or was unreachable; held to be written again), written_late, given_up "
            "(held too long or too much, the router stopped, a failure after which it may "
            "have been written, a call that stopped midway in Redis, or a record or turn "
            "skipped as a key of it holds another type).",
            ("write", "outcome"),
        )
        self.lost_turns_claimed = make.counter(
            "meshgate_router_lost_turns_claimed",
            "Turns of another router's journal (one killed, or stalled past "
            "router.journal_stale_s) this router claimed: billed here, unless their own "
            "router's settlement wrote them first (services/router/turn_journal.py).",
            (),
        )


class CacheMetrics:
    """The cache service: lookups by result, verifier rejections, stores, resident entries."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        make = _Families(registry)
        self.lookups = make.counter(
            "meshgate_cache_lookups",
            "Lookups by result: exact_hit, semantic_hit or miss.",
            ("result",),
        )
        self.verifier_rejections = make.counter(
            "meshgate_cache_verifier_rejections",
            "Semantic candidates above the similarity pre-filter that the verifier refused.",
        )
        self.misses_without_embedding = make.counter(
            "meshgate_cache_misses_without_embedding",
            "Semantic lookups answered a miss by the first stage (no stored question holds "
            "cache.first_stage_word_share of the question's content words), unembedded.",
        )
        self.unverifiable_lookups = make.counter(
            "meshgate_cache_unverifiable_lookups",
            "Semantic lookups answered a miss because the question's vector came from an embedder "
            "(model and revision) the verifier was not trained on: retrain it on that embedder.",
        )
        self.stores = make.counter("meshgate_cache_stores", "Answers stored.")
        self.unreplicated_reports = make.counter(
            "meshgate_cache_unreplicated_reports",
            "Wrong-hit reports answered before cache.report_replicas of Redis's replicas had them "
            "(within cache.report_replication_timeout_s): a failover then may lose them.",
        )
        self.embedding_memo = make.counter(
            "meshgate_cache_embedding_memo_lookups",
            "Question embeddings asked of the memo, by result: hit (no Embed call) or miss.",
            ("result",),
        )
        # Resident only: counting every entry in Redis takes a full SCAN,
        # which GetStats does on demand, never a scrape.
        self.resident_entries = make.gauge(
            "meshgate_cache_resident_entries", "Semantic entries held in this replica's vector indexes."
        )
        self.resident_rows = make.gauge(
            "meshgate_cache_resident_rows",
            "What cache.max_resident_rows bounds: the indexes' rows allocated (they grow by doubling) "
            "and their posted words, counted as rows of the same memory.",
        )
        self.resident_indexes = make.gauge(
            "meshgate_cache_resident_indexes", "Vector indexes (sub-partitions) held in memory."
        )


class InferenceMetrics:
    """The inference service's own counts (its backends are BackendCollector's)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        make = _Families(registry)
        self.embedding_texts = make.counter(
            "meshgate_inference_embedding_texts",
            "Texts embedded, by where the vector came from: triton (a call of its own), shared "
            "(a call already in flight, or the same text twice in a request) or memo.",
            ("source",),
        )


class ContextMetrics:
    """The context service: prompt assembly latency and the tokens it weighed."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        make = _Families(registry)
        self.assembly = make.histogram(
            "meshgate_context_assembly_seconds",
            "AssembleContext handling time, by strategy (adaptive, newest).",
            ("strategy",),
            ASSEMBLY_BUCKETS,
        )
        self.assembly_tokens = make.counter(
            "meshgate_context_assembly_tokens",
            "Tokens of the messages assemblies weighed, by disposition (included, summarized, dropped).",
            ("disposition",),
        )
        self.turns_reembedded = make.counter(
            "meshgate_context_turns_reembedded",
            "Turns given vectors of the current embedding model by a backfill (after a revision change).",
        )
        self.sessions_unlisted = make.counter(
            "meshgate_context_sessions_unlisted",
            "Sessions a create or fork without a request id made and Redis failed to list: "
            "ListSessions shows them once the tenant sweep lists them (within one pass).",
        )
        self.sessions_listed_by_sweep = make.counter(
            "meshgate_context_sessions_listed_by_sweep",
            "Live sessions the tenant sweep found missing from their tenant's listing and listed"
            " (made before the listing, or their listing failed after their create or fork).",
        )
        self.summary_copies_left = make.counter(
            "meshgate_context_summary_copies_left",
            "Summaries' content keys a DeleteSession, or a summary's write that left them named by no"
            " session, could not delete after its own write (Redis failed between): they expire"
            " session_ttl_s after they were written.",
        )


class BackendCollector(Collector):
    """The inference service's Triton backends, read from its pool at scrape
    time: no work on the request path. Triton's queue figures are its
    cumulative statistics, fetched with each health probe."""

    NAMES = (
        "meshgate_inference_backend_live",
        "meshgate_inference_backend_ready",
        "meshgate_inference_backend_in_flight",
        "meshgate_inference_model_ready",
        "meshgate_triton_queue_seconds",
        "meshgate_triton_compute_seconds",
        "meshgate_triton_inferences",
        "meshgate_inference_backend_circuit",
        "meshgate_inference_triton_streams_opened",
        "meshgate_inference_generation_slots",
        "meshgate_inference_generation_slots_in_use",
        "meshgate_inference_generations_queued",
    )

    def __init__(self, pool=None, slots=None) -> None:
        self._pool = pool
        # The servicer's ModelSlots by Triton model (generation_slots.py).
        self._slots = slots if slots is not None else {}

    def describe(self):
        return list(self._families())

    def collect(self):
        return self._families()

    def _families(self):
        live = GaugeMetricFamily(
            self.NAMES[0], "1 when the Triton server answers ServerLive.", labels=["backend"]
        )
        ready = GaugeMetricFamily(self.NAMES[1], "1 when the Triton server is ready.", labels=["backend"])
        in_flight = GaugeMetricFamily(
            self.NAMES[2], "Requests this service has under way at the backend.", labels=["backend"]
        )
        model_ready = GaugeMetricFamily(
            self.NAMES[3], "1 when the model is in rotation at the backend.", labels=["backend", "model"]
        )
        queue = CounterMetricFamily(
            self.NAMES[4],
            "Time requests waited in Triton's queue (Triton's statistics).",
            labels=["backend", "model"],
        )
        compute = CounterMetricFamily(
            self.NAMES[5], "Time Triton spent executing requests.", labels=["backend", "model"]
        )
        inferences = CounterMetricFamily(
            self.NAMES[6], "Requests Triton finished successfully.", labels=["backend", "model"]
        )
        circuit = GaugeMetricFamily(
            self.NAMES[7],
            "1 for the backend's circuit state (closed, open, half_open; ejected: an outlier, "
            "out of rotation whatever its circuit; meshgate/balancing.py).",
            labels=["backend", "state"],
        )
        streams_opened = CounterMetricFamily(
            self.NAMES[8],
            "ModelStreamInfer calls opened to the backend. Each carries one generation at a time and "
            "is reused between them (inference.triton_idle_streams): against the generations, what "
            "the reuse saves.",
            labels=["backend"],
        )
        # Fair admission (services/inference/generation_slots.py): a model's
        # slots full with generations queued is where another tenant waits.
        capacity = GaugeMetricFamily(
            self.NAMES[9],
            "Generations of the model this service lets into Triton at once (0: no known bound).",
            labels=["model"],
        )
        in_use = GaugeMetricFamily(
            self.NAMES[10], "Generations of the model in Triton now, from this service.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            self.NAMES[11],
            "Generations waiting here for a slot of the model, tenants' and background work's.",
            labels=["model"],
        )
        for model, slots in self._slots.items():
            capacity.add_metric([model], float(slots.capacity or 0))
            in_use.add_metric([model], float(slots.active))
            queued.add_metric([model], float(slots.queued))
        for backend in self._pool.backends if self._pool is not None else ():
            address = backend.address
            state = "ejected" if backend.health.ejected else backend.health.state.value
            for name in ("closed", "open", "half_open", "ejected"):
                circuit.add_metric([address, name], float(name == state))
            live.add_metric([address], float(backend.live))
            ready.add_metric([address], float(backend.ready))
            in_flight.add_metric([address], float(backend.in_flight))
            streams_opened.add_metric([address], backend.streams.opened)
            for model in backend.models:
                model_ready.add_metric([address, model], float(model in backend.ready_models))
            for model, figures in backend.statistics.items():
                queue.add_metric([address, model], figures.queue_ns / 1e9)
                compute.add_metric([address, model], figures.compute_ns / 1e9)
                inferences.add_metric([address, model], figures.successes)
        return iter(
            (
                live,
                ready,
                in_flight,
                model_ready,
                queue,
                compute,
                inferences,
                circuit,
                streams_opened,
                capacity,
                in_use,
                queued,
            )
        )


# --- the process's metrics -------------------------------------------------------

_enabled = True
# One group per class and switch state, kept for the process's life: a
# metric may be registered with the registry only once, so switching back on
# must find the group made before, not register its names again.
_groups: dict[tuple[type, bool], object] = {}


def configure(enabled: bool) -> None:
    """Called at process start, before any service code asks for its
    metrics (``telemetry.metrics``); tests switch it back and forth."""
    global _enabled
    _enabled = enabled


def _group(cls):
    group = _groups.get((cls, _enabled))
    if group is None:
        group = _groups[(cls, _enabled)] = cls(REGISTRY if _enabled else None)
    return group


def rpc() -> RpcMetrics:
    return _group(RpcMetrics)


def router() -> RouterMetrics:
    return _group(RouterMetrics)


def cache() -> CacheMetrics:
    return _group(CacheMetrics)


def context() -> ContextMetrics:
    return _group(ContextMetrics)


def inference() -> InferenceMetrics:
    return _group(InferenceMetrics)


def watch_backends(pool, slots=None) -> None:
    """Exports ``pool``'s backends and the generation ``slots`` of each
    model (the inference service, once)."""
    if _enabled and BackendCollector not in _groups:
        collector = _groups[BackendCollector] = BackendCollector(pool, slots)
        REGISTRY.register(collector)


class RpcObserver:
    """What the error interceptor reports each finished RPC to."""

    __slots__ = ("_metrics", "_service")

    def __init__(self, service: str) -> None:
        self._service = service
        self._metrics = rpc()

    def __call__(self, method: str, code: str, reason: str, started: float) -> None:
        # The method's last part only: "/meshgate.router.v1.RouterService/Chat" -> "RouterService/Chat".
        self._metrics.observe(
            self._service, method.rpartition(".")[2], code, reason, time.perf_counter() - started
        )


def serve(address: str) -> tuple[object, int]:
    """Starts the metrics endpoint on ``host:port`` (port 0: any free one) in
    a background thread; returns the server (``shutdown()`` stops it) and its port."""
    host, port = tcp_listen_address(address)
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=REGISTRY)
    return server, server.server_address[1]


def exported_series(
    groups: Iterable[type] = (RpcMetrics, RouterMetrics, CacheMetrics, ContextMetrics),
) -> set[str]:
    """Every series name the services can export (with the process
    collector's), for checking dashboards against: the families of a fresh
    registry holding every group (labelled ones, still without samples,
    included), as Prometheus names their series."""
    registry = CollectorRegistry()
    for group in groups:
        group(registry)
    registry.register(BackendCollector())
    prometheus_client.ProcessCollector(registry=registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names
