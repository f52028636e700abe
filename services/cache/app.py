"""Wires the cache service: Redis, the embedder, the servicer."""

from __future__ import annotations

from meshgate import mesh_auth, redis_access, serving
from meshgate.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from meshgate.config import ConfigError, Settings
from meshgate.embedding import InferenceEmbedder, LocalEmbedder
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.serving import Cleanup, Service
from services.cache.embedding_memo import EmbeddingMemo
from services.cache.heartbeat import Heartbeat
from services.cache.index import IndexRegistry
from services.cache.servicer import CacheServicer
from services.cache.stats import Stats
from services.cache.store import CacheStore
from services.cache.verifier import Verifier

SERVICE_NAMES = [cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]

# Only the router calls the cache; an entry is read, written or dropped for
# the tenant the router's token asserts, so nobody else can poison answers.
CALLERS = ("router",)
TENANT_OF = {
    "Lookup": lambda request: request.scope.tenant_id,
    "Store": lambda request: request.scope.tenant_id,
    "Invalidate": lambda request: request.tenant_id,
    "ReportWrongHit": lambda request: request.scope.tenant_id,
    # Totals over every tenant, no tenant's entries: for the mesh's operators.
    "GetStats": None,
}


async def setup(service: Service, settings: Settings) -> Cleanup:
    config = settings.cache
    try:
        verifier = Verifier.load(config.max_false_hit_rate)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    mesh = mesh_auth.Mesh(settings.mesh, service.name)
    service.restrict_to_mesh(mesh, CALLERS, TENANT_OF)
    service.bound_calls(settings.cache.max_concurrent_rpcs)
    local_embedder = None
    if config.embedder == "local":
        local_embedder = LocalEmbedder.load_configured(config.embedding_model, setting="cache.embedder")
    client = await redis_access.connect_checked(settings.redis.url, settings.redis.timeout_s)
    channel = None
    if local_embedder is None:
        # Embeddings act for no tenant: the cache's certificate is enough there.
        channel = serving.client_channel(config.inference_address, mesh.to("inference"))
    stats = Stats(client)
    # The routers copy this replica's hits only while they hear it.
    heartbeat = Heartbeat(client)
    servicer = CacheServicer(
        config,
        CacheStore(client, config.max_entries_per_partition),
        EmbeddingMemo(
            local_embedder or InferenceEmbedder(inference_service_pb2_grpc.InferenceServiceStub(channel)),
            config.embedding_model,
            config.embedding_memo_entries,
        ),
        stats,
        IndexRegistry(
            config.max_entries_per_partition, config.max_resident_rows, config.approximate_index_from
        ),
        verifier,
        heartbeat.heartbeat_id,
    )
    cache_service_pb2_grpc.add_CacheServiceServicer_to_server(servicer, service.server)
    stats.start()
    heartbeat.start()

    return serving.cleanup_steps(
        ("servicer", servicer.close),
        ("heartbeat", heartbeat.close),
        # Hit and miss counts still in flight reach Redis before it closes.
        ("stats", stats.close),
        ("local embedder", local_embedder.close if local_embedder is not None else None),
        ("inference channel", channel.close if channel is not None else None),
        ("redis", client.aclose),
    )
