"""Wires the cache service: Redis, the embedding client, the servicer."""

from __future__ import annotations

from meshgate import redis_access, serving
from meshgate.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from meshgate.config import ConfigError, Settings
from meshgate.inference.v1 import inference_service_pb2_grpc
from meshgate.serving import Cleanup, Service
from services.cache.embedder import Embedder
from services.cache.index import IndexRegistry
from services.cache.servicer import CacheServicer
from services.cache.stats import Stats
from services.cache.store import CacheStore
from services.cache.verifier import Verifier

SERVICE_NAMES = [cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name]


async def setup(service: Service, settings: Settings) -> Cleanup:
    config = settings.cache
    if config.ttl_s <= 0:
        raise ConfigError("cache.ttl_s must be positive")
    try:
        verifier = Verifier.load(config.max_false_hit_rate)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    client = await redis_access.connect_checked(settings.redis.url)
    channel = serving.client_channel(config.inference_address)
    stats = Stats(client)
    servicer = CacheServicer(
        config,
        CacheStore(client, config.max_entries_per_partition),
        Embedder(inference_service_pb2_grpc.InferenceServiceStub(channel)),
        stats,
        IndexRegistry(config.max_entries_per_partition),
        verifier,
    )
    cache_service_pb2_grpc.add_CacheServiceServicer_to_server(servicer, service.server)
    stats.start()

    async def cleanup() -> None:
        await stats.close()
        await channel.close()
        await client.aclose()

    return cleanup
