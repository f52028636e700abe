"""Wires the inference service: Triton backends, their health, the servicer."""

from __future__ import annotations

import asyncio
import functools

from meshgate import mesh_auth, metrics, tokenization
from meshgate.config import Settings
from meshgate.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from meshgate.serving import Cleanup, Service, cleanup_steps
from meshgate.tasks import cancel_and_wait
from services.inference.backends import BackendPool
from services.inference.servicer import InferenceServicer

SERVICE_NAMES = [inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

# The router generates; the cache embeds; the context service embeds and
# summarizes. A generation may act for a tenant (the router's, whose token
# must assert it: it decides the generation's place among tenants waiting
# for the model's slots) or for none (summaries); nothing else acts for one.
CALLERS = ("router", "cache", "context")
TENANT_OF = {
    "Generate": mesh_auth.OptionalTenant(lambda request: request.tenant_id),
    "Embed": None,
    "ListModels": None,
    "GetBackendHealth": None,
}


async def setup(service: Service, settings: Settings) -> Cleanup:
    service.restrict_to_mesh(mesh_auth.Mesh(settings.mesh, service.name), CALLERS, TENANT_OF)
    service.bound_calls(settings.inference.max_concurrent_rpcs)
    config = settings.inference
    for served in config.models.values():
        # Read (and checked) now, so a missing template or tokenizer stops
        # the start, not a request.
        tokenization.load_chat_template(served.chat_template)
        tokenization.as_text(served.tokenizer)
    models = sorted({m.triton_model for m in config.models.values()} | {config.embedding_triton_model})
    pool = BackendPool(
        config.triton_urls,
        models,
        config.triton_idle_streams,
        config.embedding_triton_model,
        # A call unanswered this long (a generation's longest wait between
        # two responses) gets its model a canary: its stub may have died.
        config.stream_stall_s,
        # So does a model idle this long: its stub may have died unseen.
        config.idle_canary_s or None,
    )
    servicer = InferenceServicer(config, pool)
    metrics.watch_backends(pool, servicer.generation_slots)
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, service.server)

    async def after_probe() -> None:
        # Health mirrors the backends: balancers stop sending work here while
        # no Triton server is ready, instead of receiving UNAVAILABLE.
        servicer.count_generation_slots()
        if not service.draining:
            await service.set_serving(pool.any_ready)

    service.serving_when_started = False
    watcher = asyncio.create_task(pool.watch(config.health_interval_s, after_probe))

    return cleanup_steps(
        ("triton watcher", functools.partial(cancel_and_wait, watcher)), ("triton pool", pool.close)
    )
