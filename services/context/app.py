"""Wires the context service: Redis, token counters, servicer."""

from __future__ import annotations

import dataclasses

import structlog

from meshgate import mesh_auth, redis_access, serving
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2, context_service_pb2_grpc
from meshgate.embedding import InferenceEmbedder, LocalEmbedder
from meshgate.inference.v1 import inference_service_pb2_grpc
from services.context import summaries, token_counts
from services.context.hot_cache import HotCache, change_listener
from services.context.servicer import ContextServicer
from services.context.store import SessionStore
from services.context.tenant_sweep import TenantSweep
from services.context.turn_index import TurnIndex

log = structlog.get_logger("meshgate.context")

# What the service reads once, at setup: a reload logs a change to any of
# them as applying only after a restart (the model aliases apply at once).
_RESTART_ONLY_SECTIONS = ("context", "redis", "mesh", "telemetry")

SERVICE_NAMES = [context_service_pb2.DESCRIPTOR.services_by_name["ContextService"].full_name]

# Only the router calls the context service, and every call acts for the
# tenant its request names: the router's token must assert that tenant.
CALLERS = ("router",)
TENANT_OF = {
    "CreateSession": lambda request: request.tenant_id,
    "GetSession": lambda request: request.tenant_id,
    "DeleteSession": lambda request: request.tenant_id,
    "ListSessions": lambda request: request.tenant_id,
    "AppendTurns": lambda request: request.tenant_id,
    "AssembleContext": lambda request: request.tenant_id,
    "ReleaseAppendHold": lambda request: request.tenant_id,
    "ForkSession": lambda request: request.tenant_id,
    "RevertSession": lambda request: request.tenant_id,
    "PinToSession": lambda request: request.tenant_id,
    "UnpinFromSession": lambda request: request.tenant_id,
    "PrefetchSession": lambda request: request.tenant_id,
    "TakeSummaryUsage": lambda request: request.tenant_id,
    "AcknowledgeSummaryUsage": lambda request: request.tenant_id,
    # Every tenant's owing sessions: the router's, for no one tenant.
    "ClaimOwedSummaryUsage": None,
}


def _summarizer(
    settings: Settings, store: SessionStore, client, channel, counters: dict[str, token_counts.PromptCounter]
) -> summaries.Summarizer:
    config = settings.context
    model = None
    if config.summary_model:
        model = summaries.ModelSummarizer(
            inference_service_pb2_grpc.InferenceServiceStub(channel),
            config.summary_model,
            config.summary_timeout_s,
        )
    return summaries.Summarizer(
        store,
        summaries.SummaryStore(client, config.session_ttl_s),
        summaries.SummaryPolicy(
            config.summary_span_turns,
            config.summary_hot_window_turns,
            config.compact_after_turns,
            config.max_session_bytes // 2,
        ),
        model,
        counters.values(),
        config.max_concurrent_summaries,
    )


async def setup(service: serving.Service, settings: Settings) -> serving.Cleanup:
    mesh = mesh_auth.Mesh(settings.mesh, service.name)
    service.restrict_to_mesh(mesh, CALLERS, TENANT_OF)
    service.bound_calls(settings.context.max_concurrent_rpcs)
    local_embedder = None
    if settings.context.embedder == "local":
        local_embedder = LocalEmbedder.load_configured("minilm", setting="context.embedder")
    # Tokenizer and chat template files are read here, once, before serving
    # starts; a template the counts cannot follow exactly stops it here.
    counters = token_counts.for_models(settings.models)
    client = await redis_access.connect_checked(settings.redis.url, settings.redis.timeout_s)
    store = SessionStore(
        client,
        settings.context.session_ttl_s,
        settings.context.max_turns,
        settings.context.max_session_bytes,
        settings.context.max_bytes_per_tenant,
    )
    hot = HotCache(settings.context.hot_cache_bytes, settings.context.session_ttl_s)
    # Summaries and (with embedder = "inference") turn and question
    # embeddings act for no tenant: the context service's certificate is
    # enough there. Summaries go as background work (GenerateRequest.background).
    channel = serving.client_channel(settings.context.inference_address, mesh.to("inference"))
    summarizer = _summarizer(settings, store, client, channel, counters)
    # Summaries under way finish within the grace, as the calls in flight do.
    service.drains.append(summarizer.drain)
    changes = change_listener(settings.redis.url, hot, summarizer, settings.redis.timeout_s)
    changes.start()
    sweep = TenantSweep(client, store.listing, store.holdings)
    sweep.start()
    servicer = ContextServicer(
        store,
        settings.models,
        counters,
        hot,
        TurnIndex(client, settings.context.session_ttl_s),
        local_embedder
        or InferenceEmbedder(
            inference_service_pb2_grpc.InferenceServiceStub(channel),
            max_texts_per_call=settings.inference.max_embed_texts,
        ),
        settings.context.recency_floor_turns,
        summarizer,
        pack_older_turns=settings.context.pack_older_turns,
        embed_nameless_question=settings.context.embed_nameless_question,
        append_embed_timeout_s=settings.context.append_embed_timeout_s,
    )
    context_service_pb2_grpc.add_ContextServiceServicer_to_server(servicer, service.server)
    started_with = settings

    def reload(new: Settings) -> None:
        """The model aliases, each with its window, tokenizer and chat template,
        from reloaded settings (already checked whole), so that a session
        turn on an alias a reload added to the router is counted here
        without a restart. Counters for a new tokenizer and template are
        built (their files read, on the loop: a reload is rare) before
        anything is swapped, so one that cannot count exactly refuses the
        reload and leaves the aliases in use."""
        in_use = servicer.counters
        counters = token_counts.for_models(new.models, reuse=in_use)
        servicer.reconfigure_models(new.models, counters)
        summarizer.reconfigure_counters(counters.values())
        # Said of a reload taken, not of one refused above.
        for section in _RESTART_ONLY_SECTIONS:
            before, after = getattr(started_with, section), getattr(new, section)
            for field in dataclasses.fields(before):
                if getattr(before, field.name) != getattr(after, field.name):
                    log.warning(
                        "a changed setting applies only after a restart", setting=f"{section}.{field.name}"
                    )
        for alias in sorted(set(new.models) - set(in_use)):
            log.info("model alias added: its prompts are counted from now on", alias=alias)

    service.reload_hooks.append(reload)

    return serving.cleanup_steps(
        ("session notices", changes.close),
        ("tenant sweep", sweep.close),
        ("servicer", servicer.close),
        ("summarizer", summarizer.close),
        ("local embedder", local_embedder.close if local_embedder is not None else None),
        ("inference channel", channel.close),
        ("redis", client.aclose),
    )
