"""Wires the router: authentication, deployments, and stubs of the other services."""

from __future__ import annotations

import asyncio
import functools

import structlog

from meshgate import mesh_auth, metrics, redis_access, serving
from meshgate.cache.v1 import cache_service_pb2_grpc
from meshgate.config import DEFAULT_DEV_API_KEY, DEV_TENANT_ID, RouterSettings, Settings, summary_usage_ttl_s
from meshgate.context.v1 import context_service_pb2_grpc
from meshgate.embedding import Embedding, InferenceEmbedder
from meshgate.router.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    router_service_pb2,
)
from meshgate.serving import Cleanup, Service
from meshgate.tasks import cancel_and_wait
from services.router.admin import AdminServicer
from services.router.admission import Admission, TenantCalls, TurnAdmission
from services.router.auth import Authenticator, CallerGate
from services.router.deployments import DeploymentTable
from services.router.downstream import CacheService, ContextService, Deployments
from services.router.embeddings import Embeddings
from services.router.hot_exact import HotExactHits, notice_listener
from services.router.http_edge import HttpEdge, HttpServer
from services.router.keys import KeyStore
from services.router.ledger import Ledger
from services.router.model_selection import Selector
from services.router.pipeline import Pipeline
from services.router.servicer import RouterServicer, add_to_server
from services.router.summary_usage import SummaryUsageSweeper
from services.router.turn_journal import TurnJournal

# Settings a running router cannot take over (reload logs that they changed).
# Whole sections where every field is read once, at setup: a field added to
# one later is covered without being listed (redis.timeout_s went unlisted,
# and a changed one was silently ignored).
_RESTART_ONLY = (
    "router.listen",
    "router.metrics_listen",
    "router.context_address",
    "router.cache_address",
    "router.http_listen",
    "router.http_header_timeout_s",
    "router.http_max_header_bytes",
    "router.http_stalled_client_timeout_s",
    "router.downstream_timeout_s",
    "router.max_generation_s",
    "router.deployment_health_interval_s",
    "router.summary_usage_collect_s",
    "router.journal_interval_s",
    "router.journal_stale_s",
    "router.hot_exact_entries",
    "router.hot_exact_max_age_s",
    "router.hot_exact_max_bytes",
    "router.cache_redis_url",
    "redis",
    "mesh",
    "telemetry",
)

log = structlog.get_logger(__name__)

ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVICE_NAMES = [router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name, ADMIN_SERVICE]
# Not counted against router.max_concurrent_rpcs: the operator must still be
# able to revoke a key while that key's streams hold the bound.
_UNCOUNTED_SERVICES = (ADMIN_SERVICE,)


# Prompt embedders kept at most (_PromptEmbeddings): far more than the
# deployments of any configuration.
_MAX_EMBEDDERS = 256


class _PromptEmbeddings:
    """The prompt's embedding for model selection: one Embed call, made
    only for aliases that select, to the inference service of the first
    deployment of the choices in rotation (DeploymentTable.embedding_stub);
    None when it does not answer in time."""

    def __init__(self, deployments: DeploymentTable) -> None:
        self._deployments = deployments
        # One per deployment's stub, so each keeps its throttled warning.
        # Emptied past _MAX_EMBEDDERS: a reload replaces the deployments'
        # stubs, and each replaced one's embedder (holding the stub and its
        # channel) stayed for good, one more set at every such reload.
        self._embedders: dict[object, InferenceEmbedder] = {}

    async def __call__(self, text: str, aliases: tuple[str, ...], timeout_s: float) -> Embedding | None:
        stub = self._deployments.embedding_stub(aliases)
        if stub is None:
            return None
        embedder = self._embedders.get(stub)
        if embedder is None:
            if len(self._embedders) >= _MAX_EMBEDDERS:
                self._embedders.clear()
            embedder = self._embedders[stub] = InferenceEmbedder(stub)
        # With the embedder that made it: the classifier reads only its own
        # training embedder's vectors (model_selection.py).
        return await embedder.embed_or_none(text, timeout_s)


def _field(settings: Settings, dotted: str):
    value = settings
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def _warn_of_public_dev_key(router: RouterSettings) -> None:
    """Warns where the dev tenant (every model, no limits) is on with the
    public key of the docs beside configured tenants or an admin credential: settings
    that serve someone else, where anyone can send that key."""
    public_key = router.dev_tenant and router.dev_api_key == DEFAULT_DEV_API_KEY
    if public_key and (router.tenants or router.admin_api_key_sha256):
        log.warning(
            "the dev tenant is on with the public default key beside configured tenants or an "
            "admin credential; set router.dev_tenant = false, or a secret router.dev_api_key",
            tenant=DEV_TENANT_ID,
        )


async def setup(service: Service, settings: Settings) -> Cleanup:
    # The router's own port stays public (API keys); its calls into the mesh
    # carry its certificate and, per call, a token naming the tenant.
    mesh = mesh_auth.Mesh(settings.mesh, service.name)
    service.bound_calls(settings.router.max_concurrent_rpcs, _UNCOUNTED_SERVICES)
    context_channel = serving.client_channel(settings.router.context_address, mesh.to("context"))
    cache_channel = serving.client_channel(settings.router.cache_address, mesh.to("cache"))
    deployments = DeploymentTable(settings.models, mesh.to("inference"))
    tenant_tokens = mesh.tenant_tokens()
    # Limits and the usage ledger share the mesh's Redis ([redis]). The
    # client connects lazily: a router without limits still starts (and
    # serves) while Redis is down; its usage records are then logged as lost.
    redis = redis_access.connect(settings.redis.url, settings.redis.timeout_s)
    router = settings.router
    _warn_of_public_dev_key(router)
    # A summary take's markers live as long as the context service may hold it.
    take_marker_ttl_s = summary_usage_ttl_s(settings.context.session_ttl_s)
    ledger = Ledger(
        redis, router.usage_stream_max_len, router.usage_retention_days, take_marker_ttl_s=take_marker_ttl_s
    )
    journal = (
        TurnJournal(redis, ledger, router.journal_interval_s, router.journal_stale_s)
        if router.journal_interval_s
        else None
    )
    admission = TurnAdmission(
        Admission(redis, router.max_generation_s, take_marker_ttl_s=take_marker_ttl_s),
        router,
        ledger,
        journal,
    )
    hot_exact = listener = heartbeat_watch = None
    if router.hot_exact_entries > 0:
        hot_exact = HotExactHits(
            router.hot_exact_entries, router.hot_exact_max_age_s, max_bytes=router.hot_exact_max_bytes
        )
        # The cache service's notices, on its Redis where that is not ours.
        notices_url = router.cache_redis_url or settings.redis.url
        listener = notice_listener(notices_url, hot_exact, settings.redis.timeout_s)
        listener.start()
        heartbeat_watch = asyncio.create_task(hot_exact.watch_heartbeat())
        metrics.router().hot_copies_live.set_function(lambda: hot_exact.live)
    cache = CacheService(
        cache_service_pb2_grpc.CacheServiceStub(cache_channel), tenant_tokens, settings.router, hot_exact
    )
    contexts = ContextService(
        context_service_pb2_grpc.ContextServiceStub(context_channel),
        tenant_tokens,
        settings.router,
        channel=context_channel,
        redis_timeout_s=settings.redis.timeout_s,
    )
    pipeline = Pipeline(
        settings.router,
        settings.models,
        contexts,
        cache,
        Deployments(deployments, settings.router, tenant_tokens),
        admission,
        Selector(_PromptEmbeddings(deployments)),
    )
    keys = KeyStore(redis, timeout_s=settings.redis.timeout_s)
    authenticator = Authenticator(settings.router, keys)
    summary_usage = SummaryUsageSweeper(
        contexts.claim_owed_summary_usage,
        contexts.take_summary_usage,
        contexts.acknowledge_summary_usage,
        authenticator.billed_tenant,
        admission.bill_summary_take,
        router.summary_usage_collect_s,
    )
    # Every gRPC call's key is checked before its request is read, and
    # before the call bound counts it; a tenant's call is counted against
    # its own cap there, so that no one key holds the whole bound.
    tenant_calls = TenantCalls(router.tenant_call_cap())
    service.errors.gate(CallerGate(authenticator, tenant_calls))
    servicer = RouterServicer(settings, pipeline, ledger)
    # ChatSession streams end between turns once the router stops (serving.stop).
    service.drains.append(servicer.drain)
    add_to_server(servicer, service.server)
    # Keys as data, on the same port, behind the admin credential.
    admin = AdminServicer(
        keys, settings.models, settings.router.embedding_model, cache, settings.router.deadline_margin_s
    )
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, service.server)
    # The OpenAI-compatible HTTP edge: the same pipeline, on this event loop.
    embeddings = Embeddings(settings.router, settings.inference, deployments, admission)
    edge = HttpEdge(settings.router, settings.models, authenticator, tenant_calls, pipeline, embeddings)
    http = (
        HttpServer(
            edge,
            router.http_listen,
            router.http_header_timeout_s,
            router.http_max_header_bytes,
            router.http_stalled_client_timeout_s,
        )
        if router.http_listen
        else None
    )
    if http is not None:
        await http.start()
        # Drained with the gRPC server, with its grace (serving.stop).
        service.drains.append(http.stop)
    # Health checks of the deployments' inference services: a silent one
    # leaves rotation and its calls end (services/router/deployments.py).
    # Started last, so that a failed start leaves no task behind.
    deployment_checks = asyncio.create_task(deployments.watch(router.deployment_health_interval_s))
    summary_usage.start()
    if journal is not None:
        journal.start()

    started_with = settings

    def reload(new: Settings) -> None:
        """Tenants, keys, limits, prices, model routes and the bounds on calls
        in flight (the replica's and each tenant's) from reloaded settings
        (already checked whole). Each part swaps one reference, with
        no await in between: a turn sees the old settings or the new, and a
        stream under way finishes with what it started with."""
        for field in _RESTART_ONLY:
            if _field(started_with, field) != _field(new, field):
                log.warning("a changed setting applies only after a restart", setting=field)
        # Safe with calls in flight (ErrorInterceptor.bound): each counted
        # call is counted out once, whatever the bound is by then.
        service.bound_calls(new.router.max_concurrent_rpcs, _UNCOUNTED_SERVICES)
        tenant_calls.reconfigure(new.router.tenant_call_cap())
        deployments.reconfigure(new.models)
        pipeline.reconfigure(new.router, new.models)
        admission.reconfigure(new.router)
        authenticator.reconfigure(new.router)
        _warn_of_public_dev_key(new.router)
        ledger.reconfigure(new.router.usage_stream_max_len, new.router.usage_retention_days)
        servicer.reconfigure(new)
        admin.reconfigure(new.models, new.router.embedding_model, new.router.deadline_margin_s)
        edge.reconfigure(new.router, new.models)
        embeddings.reconfigure(new.router, new.inference)

    service.reload_hooks.append(reload)

    return serving.cleanup_steps(
        # The HTTP edge first (drained already when the service stopped,
        # serving.stop; not when its start failed): its streams under way
        # finish over the channels below.
        ("http edge", http.stop if http is not None else None),
        ("http body parser", edge.close),
        ("deployment checks", functools.partial(cancel_and_wait, deployment_checks)),
        ("deployments", deployments.close),
        ("cache notices", listener.close if listener is not None else None),
        (
            "cache heartbeat watch",
            functools.partial(cancel_and_wait, heartbeat_watch) if heartbeat_watch is not None else None,
        ),
        # A sweep under way takes over the context channel, and bills through admission.
        ("summary usage", summary_usage.close),
        ("context channel", context_channel.close),
        ("cache channel", cache_channel.close),
        # Settlements and usage records still in flight finish first, though
        # a step before failed: they are what the tenants are billed. Those
        # Redis refuses are tried again until the stop's grace ends.
        ("admission", lambda: admission.drain(service.stop_deadline)),
        # Its turns settled (admission's drain wrote their records): removed.
        ("turn journal", journal.close if journal is not None else None),
        ("redis", redis.aclose),
    )
