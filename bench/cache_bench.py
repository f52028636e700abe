"""How well the verified semantic cache serves, on the held-out TEST portion,
through the real services at their default settings.

    .venv/bin/python bench/cache_bench.py           # or: make bench-cache

Starts its own stack (Redis, Triton with minilm, the services, mutual TLS
between them) on free ports, and calls the cache service as the router
would. The test portion of the labelled data (``cache_data``: QQP
development pairs and the trap set, split by hash of linked question groups)
is never read by ``train_cache_verifier.py``; this is the one place it is
used. Then:

1. One partition: every stored question of the QQP test pairs in ONE
   partition, each other question looked up. A hit is correct only when the
   served entry's question is labelled a duplicate of the asked one, so an
   unlabelled duplicate served counts as wrong: precision is a lower bound.
   Recall is over lookups that have a labelled duplicate stored.
2. Own partitions: each QQP test pair alone (one question stored, the other
   looked up), where every outcome has a label: precision, recall, and the
   false-hit rate over non-duplicate pairs (the quantity the bound is
   calibrated on).
3. Traps, each pair alone: per category, the share served (a wrong hit for
   negations, numbers, entities and scope; a hit for paraphrases and
   retyped repeats); then the same for the hand-written natural pairs
   (``cache_data.load_natural``), held out from training and calibration.
4. Conversations (``cache_conversations``: the test portion of the
   multi-turn scenarios): every stored conversation in ONE partition, then
   each variant asked. A same-context variant (reworded, extra small talk,
   unrelated earlier history) is a correct hit only when served its own
   scenario's entry; a changed context (another topic, a later other topic,
   a swapped referent) is wrongly served by any hit.
5. Verification time per lookup: the verifier, in this process, deciding the
   candidates the one-partition index offers each lookup (its best
   ``MAX_CANDIDATES`` above the pre-filter), with the vectors the services
   embedded.
6. The miss path in a busy partition: ``--busy-entries`` QQP TRAIN-portion
   questions stored (through Store) in the partition the router's turns
   use, then unseen train questions streamed through the router at
   concurrency 1, alternately with the cache bypassed and on (misses that
   share words with stored questions, as nearly every question does in a
   busy partition): time to first token of each, in the same run, with the
   cache misses once per ``cache.embedder``: the stack's cache service (the
   default, "local") and a second one with "inference", each behind a
   router of its own, interleaved turn by turn. Then the pieces of a miss's
   lookup, each at concurrency 1 on questions of its own: the Lookup RPC
   without and with the semantic stage (per embedder), both as the router
   sends them (exact only, then semantic: the first starts the embedding the
   second uses), the inference service's Embed RPC, Triton's ``minilm``
   called directly, and the same model in this process.
   ``--only-miss-path`` runs this section alone.

Results go to stdout as markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
import unittest.mock
import urllib.request

import grpc
import numpy as np
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2_grpc as triton_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cache_conversations  # noqa: E402
import cache_data  # noqa: E402

from meshgate.cache.v1 import cache_service_pb2 as pb  # noqa: E402
from meshgate.cache.v1 import cache_service_pb2_grpc  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.config import CacheSettings, Settings, route_of  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2 as inference_pb  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2_grpc  # noqa: E402
from meshgate.local.stack import Ports, Stack, free_port  # noqa: E402
from meshgate.minilm import MiniLM  # noqa: E402
from meshgate.router.v1 import router_service_pb2 as router_pb  # noqa: E402
from meshgate.router.v1 import router_service_pb2_grpc  # noqa: E402
from services.cache import verifier as verifier_module  # noqa: E402
from services.cache.servicer import MAX_CANDIDATES  # noqa: E402
from services.inference import triton_protocol  # noqa: E402
from tests.mesh import router_channel  # noqa: E402

MODEL = "tiny-gpt"
MAX_TOKENS = 64
# The router's tenant for the development key the bench's stack is given.
API_KEY = "bench-key"
ROUTER_TENANT = "dev"
HIT = (pb.LOOKUP_STATUS_SEMANTIC_HIT, pb.LOOKUP_STATUS_EXACT_HIT)
TRAP_ORDER = ("negation", "number", "entity_swap", "entity_order", "scope", "paraphrase", "repeat")


# What the stack's router puts in its turns' scopes beside the alias: its deployments' model.
ROUTE = route_of(Settings().models[MODEL], Settings().models)


def scope(tenant: str) -> pb.CacheScope:
    return pb.CacheScope(
        tenant_id=tenant,
        model=MODEL,
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
        route=ROUTE,
    )


def question(text: str) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content=text)]


async def bounded(calls, concurrency: int) -> list:
    """Runs the coroutine factories ``calls`` at most ``concurrency`` at a time, in order."""
    results: list = [None] * len(calls)
    queue = collections.deque(enumerate(calls))

    async def worker():
        while queue:
            i, call = queue.popleft()
            results[i] = await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


class Cache:
    def __init__(self, stub: cache_service_pb2_grpc.CacheServiceStub) -> None:
        self.stub = stub
        self.lookup_ms: list[float] = []

    async def store(self, tenant: str, text: str) -> str:
        answer = pb.CachedAnswer(text=f"answer to: {text}", finish_reason="stop", deployment="local")
        response = await self.stub.Store(
            pb.StoreRequest(scope=scope(tenant), messages=question(text), answer=answer), timeout=60
        )
        return response.entry_id

    async def lookup(self, tenant: str, text: str) -> pb.LookupResponse:
        started = time.perf_counter()
        response = await self.stub.Lookup(
            pb.LookupRequest(scope=scope(tenant), messages=question(text), semantic=True), timeout=60
        )
        self.lookup_ms.append((time.perf_counter() - started) * 1000)
        return response


def rate(part: int, whole: int) -> str:
    return f"{part / whole:.3f} ({part}/{whole})" if whole else "-"


async def one_partition(cache: Cache, pairs: list[cache_data.Pair], concurrency: int) -> dict:
    stored = sorted({p.stored for p in pairs})
    stored_set = set(stored)
    duplicates: dict[str, set[str]] = {}
    for p in pairs:
        entry = duplicates.setdefault(p.asked, set())
        if p.duplicate:
            entry.add(p.stored)
            # Labels hold both ways: a stored question asked elsewhere.
            if p.asked in stored_set:
                duplicates.setdefault(p.stored, set()).add(p.asked)
    # A question also stored would be an exact hit, not a semantic lookup.
    lookups = sorted(q for q in duplicates if q not in stored_set)
    tenant = "bench-one-partition"
    ids = await bounded([lambda q=q: cache.store(tenant, q) for q in stored], concurrency)
    question_of = dict(zip(ids, stored))
    responses = await bounded([lambda q=q: cache.lookup(tenant, q) for q in lookups], concurrency)
    hits = correct = 0
    for asked, response in zip(lookups, responses):
        if response.status in HIT:
            hits += 1
            correct += question_of.get(response.entry_id) in duplicates[asked]
    with_duplicate = sum(1 for q in lookups if duplicates[q])
    return {
        "stored": len(stored),
        "lookups": len(lookups),
        "hits": hits,
        "correct": correct,
        "with_duplicate": with_duplicate,
        "stored_questions": stored,
        "lookup_questions": lookups,
    }


async def own_partitions(
    cache: Cache, pairs: list[cache_data.Pair], concurrency: int, tag: str
) -> list[bool]:
    """Per pair, in a partition of its own: whether the asked question was served."""

    async def one(i: int, p: cache_data.Pair) -> bool:
        tenant = f"bench-{tag}-{i}"
        await cache.store(tenant, p.stored)
        return (await cache.lookup(tenant, p.asked)).status in HIT

    return await bounded([lambda i=i, p=p: one(i, p) for i, p in enumerate(pairs)], concurrency)


CONVERSATION_ORDER = (
    "reworded",
    "small_talk",
    "unrelated_history",
    "other_topic",
    "later_other_topic",
    "swapped_referent",
    "swapped_referent_reworded",
    "slot_small_talk",
    "slot_reworded_request",
    "slot_other_request",
)
_ROLES = {"user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}


def messages_of(turns: list[dict]) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=_ROLES[t["role"]], content=t["content"]) for t in turns]


async def conversations(cache: Cache, scenarios: list[dict], concurrency: int) -> dict[str, list[str]]:
    """Per variant category, each lookup's outcome: "own" (served its own
    scenario's entry), "other" (another scenario's) or "miss"."""
    tenant = "bench-conversations"

    async def store(scenario):
        answer = pb.CachedAnswer(text=scenario["answer"], finish_reason="stop")
        messages = messages_of(scenario["stored"])
        request = pb.StoreRequest(scope=scope(tenant), messages=messages, answer=answer)
        return (await cache.stub.Store(request, timeout=60)).entry_id

    ids = await bounded([lambda s=s: store(s) for s in scenarios], concurrency)
    asked = [(i, variant) for i, scenario in enumerate(scenarios) for variant in scenario["asked"]]

    async def ask(i, variant):
        messages = messages_of(variant["messages"])
        request = pb.LookupRequest(scope=scope(tenant), messages=messages, semantic=True)
        response = await cache.stub.Lookup(request, timeout=60)
        if response.status not in HIT:
            return "miss"
        return "own" if response.entry_id == ids[i] else "other"

    outcomes = await bounded([lambda i=i, v=v: ask(i, v) for i, v in asked], concurrency)
    by_category: dict[str, list[str]] = collections.defaultdict(list)
    for (_, variant), outcome in zip(asked, outcomes):
        by_category[variant["category"]].append(outcome)
    return by_category


async def embed(stub, texts: list[str], concurrency: int) -> np.ndarray:
    batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]

    async def one(batch):
        response = await stub.Embed(inference_pb.EmbedRequest(texts=batch), timeout=60)
        return np.frombuffer(response.vectors, "<f4").reshape(len(batch), response.dimensions)

    return np.stack(
        [v for chunk in await bounded([lambda b=b: one(b) for b in batches], concurrency) for v in chunk]
    )


def verification_times(stored: list[str], stored_vectors, lookups: list[str], lookup_vectors) -> list[float]:
    """Milliseconds the verifier takes per lookup on the candidates the
    one-partition index would offer it (best ``MAX_CANDIDATES`` above the
    pre-filter); lookups with no candidate are not timed (nothing to verify)."""
    settings = CacheSettings()
    verifier = verifier_module.Verifier.load(settings.max_false_hit_rate)
    times = []
    for text, vector in zip(lookups, lookup_vectors):
        similarities = stored_vectors @ vector
        rows = [
            r
            for r in np.argsort(-similarities)[:MAX_CANDIDATES]
            if similarities[r] >= settings.semantic_threshold
        ]
        if not rows:
            continue
        # Fresh analyses, as for a question the service has not seen.
        verifier_module.clear_analysis_memo()
        started = time.perf_counter()
        for row in rows:
            verifier.decide(text, vector, stored[row], stored_vectors[row])
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def busy_partition_questions(entries: int, unseen: int) -> tuple[list[str], list[str]]:
    """``entries`` train-portion QQP questions to store, and ``unseen``
    others, asked sides of pairs neither of whose own two sides is stored.
    Only the pair itself is checked: an unseen question may still duplicate
    a stored one (labelled in another pair, or not at all); such a hit is
    counted and left out of the misses."""
    pairs = [p for p in cache_data.load_qqp() if p.portion == "train"]
    random.Random(11).shuffle(pairs)
    stored: dict[str, None] = {}
    rest = iter(pairs)
    for p in rest:
        if len(stored) >= entries:
            break
        stored.update({p.stored: None, p.asked: None})
    asked: dict[str, None] = {}
    for p in rest:
        if len(asked) >= unseen:
            break
        if p.stored not in stored and p.asked not in stored:
            asked[p.asked] = None
    return list(stored), list(asked)


async def router_turn(stub, text: str, policy) -> tuple[float, int]:
    """Time to first token (ms) of one turn through the router, and its cache status."""
    request = router_pb.ChatRequest(
        model=MODEL,
        messages=question(text),
        parameters=common_pb2.GenerationParameters(max_tokens=MAX_TOKENS),
        cache_policy=policy,
    )
    started = time.perf_counter()
    ttft = None
    status = router_pb.CACHE_STATUS_UNSPECIFIED
    async for response in stub.Chat(request, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=60):
        if response.HasField("delta"):
            if ttft is None:
                ttft = time.perf_counter() - started
        else:
            status = response.completion.cache_status
    return ((ttft if ttft is not None else time.perf_counter() - started) * 1000, status)


async def timed(call) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


def start_inference_embedder_pair(stack: Stack) -> tuple[str, str]:
    """A second cache service with ``cache.embedder = "inference"`` and a
    router in front of it, beside the stack's own (the default embedder), on
    the same Redis, inference service and Triton: the miss path with each
    embedder in one run, on the same entries. Stopped with the stack."""
    cache, router = "cache-inference", "router-inference"
    for name in (cache, router):
        stack.replica_ports[name] = free_port()
        stack.replica_metrics_ports[name] = free_port()
    stack.replica_http_ports[router] = free_port()
    overrides = {
        "MESHGATE_CACHE__EMBEDDER": "inference",
        "MESHGATE_ROUTER__CACHE_ADDRESS": stack.address(cache),
    }
    with unittest.mock.patch.dict(os.environ, overrides):
        stack.start_service(cache)
        stack.start_service(router)
    stack.wait_serving(cache)
    stack.wait_serving(router)
    return cache, router


def first_stage_misses(stack: Stack, cache_name: str) -> float:
    """The lookups the cache service ``cache_name`` answered a miss at its
    first stage so far, without embedding the question (its counter
    meshgate_cache_misses_without_embedding)."""
    with urllib.request.urlopen(f"http://{stack.metrics_address(cache_name)}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    family = families.get("meshgate_cache_misses_without_embedding")
    if family is None:
        # Renamed or gone: the pass share printed would read 1.0, not an error.
        raise RuntimeError(f"{cache_name} exports no meshgate_cache_misses_without_embedding counter")
    # A labelled counter never incremented has no sample yet: 0.
    return sum(s.value for s in family.samples if s.name == "meshgate_cache_misses_without_embedding_total")


async def miss_path(stack: Stack, cache: Cache, inference_channel, args) -> list[str]:
    requests = args.miss_requests
    warm = 8
    default_embedder = CacheSettings().embedder
    cache_names = {default_embedder: "cache", "inference": None}
    router_names = {default_embedder: "router", "inference": None}
    if default_embedder != "inference":
        cache_names["inference"], router_names["inference"] = start_inference_embedder_pair(stack)
    embedders = list(cache_names)
    stored, unseen = busy_partition_questions(args.busy_entries, 16 * (requests + warm))
    stored_words = set().union(*(verifier_module.analyze(q).content for q in stored))
    await bounded([lambda q=q: cache.store(ROUTER_TENANT, q) for q in stored], args.concurrency)
    paths = [("bypass", "router", router_pb.CACHE_POLICY_BYPASS)] + [
        (embedder, router_names[embedder], router_pb.CACHE_POLICY_USE) for embedder in embedders
    ]
    turns, pieces = unseen[: len(paths) * (requests + warm)], unseen[len(paths) * (requests + warm) :]
    rows = []
    async with contextlib.AsyncExitStack() as channels:
        routers = {
            name: router_service_pb2_grpc.RouterServiceStub(
                await channels.enter_async_context(grpc.aio.insecure_channel(stack.address(name)))
            )
            for name in dict.fromkeys(router for _, router, _ in paths)
        }
        # The stored questions are the routers' own partition: asked again, an exact hit.
        for router in routers.values():
            _, status = await router_turn(router, stored[0], router_pb.CACHE_POLICY_USE)
            if status != router_pb.CACHE_STATUS_EXACT_HIT:
                raise RuntimeError(
                    f"a stored question through the router: {router_pb.CacheStatus.Name(status)}"
                )
        ttfts: dict[str, list[float]] = collections.defaultdict(list)
        hits = 0
        asked = []
        for i in range(requests + warm):
            if i == warm:
                stage_misses_before = {e: first_stage_misses(stack, cache_names[e]) for e in embedders}
            # Rotating which path goes first, so none always follows another.
            shift = i % len(paths)
            for k, (name, router, policy) in enumerate(paths[shift:] + paths[:shift]):
                text = turns[len(paths) * i + k]
                ttft, status = await router_turn(routers[router], text, policy)
                if i < warm:
                    continue
                if policy == router_pb.CACHE_POLICY_BYPASS:
                    ttfts[name].append(ttft)
                    continue
                asked.append(text)
                if status == router_pb.CACHE_STATUS_MISS:
                    ttfts[name].append(ttft)
                elif status in (router_pb.CACHE_STATUS_EXACT_HIT, router_pb.CACHE_STATUS_SEMANTIC_HIT):
                    hits += 1
                else:
                    # A lookup that timed out or failed (BYPASSED, nothing)
                    # is neither: left out, it would vanish from the misses.
                    raise RuntimeError(
                        f"a cache-on turn through the router: {router_pb.CacheStatus.Name(status)}"
                    )
        # As the cache services counted them: the questions their first
        # stage answered a miss; the others were embedded (or hit at once).
        stage_misses = sum(
            first_stage_misses(stack, cache_names[e]) - stage_misses_before[e] for e in embedders
        )
    sharing = sum(1 for q in asked if verifier_module.analyze(q).content & stored_words)
    word_share = CacheSettings().first_stage_word_share
    embedded = len(asked) - round(stage_misses)
    p50 = statistics.median
    rows.append(
        f"\nThe miss path, a partition of {len(stored)} train-portion questions (the router's: "
        f"tenant {ROUTER_TENANT!r}, {MODEL}, max_tokens {MAX_TOKENS}), concurrency 1, "
        f"{requests} turns each, interleaved; cache.embedder {' and '.join(embedders)} each in a cache "
        f"service of its own (and a router in front), on the same entries; "
        f"{rate(sharing, len(asked))} of the cache-on questions share a "
        f"content word with a stored one, {rate(embedded, len(asked))} pass the first stage "
        f"(a stored question holds {word_share:g} of their content words: embedded; the rest as the "
        f"cache services counted them, meshgate_cache_misses_without_embedding); "
        f"{hits} hits (duplicates of a stored question) left out.\n"
    )
    rows.append("| router turn, unseen train questions | turns | TTFT p50 (ms) | TTFT p99 (ms) |")
    rows.append("|---|---|---|---|")
    labels = {"bypass": "cache bypassed", **{e: f"cache on, misses, cache.embedder = {e}" for e in embedders}}
    for name, label in labels.items():
        values = ttfts[name]
        rows.append(f"| {label} | {len(values)} | {p50(values):.1f} | {percentile(values, 99):.1f} |")
    rows.append("")
    for embedder in embedders:
        rows.append(
            f"Miss over bypass, TTFT p50, cache.embedder = {embedder}: "
            f"**{p50(ttfts[embedder]) - p50(ttfts['bypass']):+.1f} ms**."
        )
    rows.append("")

    # The pieces of a miss's lookup, one call at a time, round-robin so that
    # the machine's load falls on all alike.
    inference = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)
    embedding_model = CacheSettings().embedding_model
    in_process = MiniLM(threads=1)
    async with contextlib.AsyncExitStack() as channels:
        triton = triton_grpc.GRPCInferenceServiceStub(
            await channels.enter_async_context(grpc.aio.insecure_channel(stack.address("triton")))
        )
        caches = {default_embedder: cache.stub}
        for embedder in embedders[1:]:
            channel = router_channel(stack.address(cache_names[embedder]), "cache", stack.mesh_settings)
            caches[embedder] = cache_service_pb2_grpc.CacheServiceStub(
                await channels.enter_async_context(channel)
            )

        def lookup(stub, messages, semantic: bool):
            request = pb.LookupRequest(scope=scope(ROUTER_TENANT), messages=messages, semantic=semantic)
            return stub.Lookup(request, timeout=60)

        async def as_the_router(stub, text: str):
            # An exact-only miss starts the embedding that the semantic
            # lookup of the same prompt, sent once the miss is back, uses.
            await lookup(stub, question(text), False)
            await lookup(stub, question(text), True)

        async def embed_in_process(text: str):
            in_process.embed([text])

        pieces_of = {
            # A system message: the same GET, and nothing embedded ahead.
            "cache Lookup, exact only (one GET)": lambda t: (
                lambda: lookup(
                    cache.stub, [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=t)], False
                )
            ),
        }
        for embedder, stub in caches.items():
            pieces_of[f"cache Lookup, semantic alone (a miss), cache.embedder = {embedder}"] = (
                lambda t, stub=stub: lambda: lookup(stub, question(t), True)
            )
            pieces_of[
                f"cache Lookups as the router sends them: exact only, then semantic (a miss), "
                f"cache.embedder = {embedder}"
            ] = lambda t, stub=stub: lambda: as_the_router(stub, t)
        pieces_of.update(
            {
                "inference Embed, one question": lambda t: (
                    lambda: inference.Embed(inference_pb.EmbedRequest(texts=[t]), timeout=60)
                ),
                f"Triton {embedding_model} ModelInfer, direct": lambda t: (
                    lambda: triton.ModelInfer(triton_protocol.embed_request(embedding_model, [t]), timeout=60)
                ),
                "meshgate.minilm in this process (1 thread, on the event loop)": lambda t: (
                    lambda: embed_in_process(t)
                ),
            }
        )
        if len(pieces) < len(pieces_of) * (requests + warm):
            raise RuntimeError(f"only {len(pieces)} unseen questions for the pieces")
        times: dict[str, list[float]] = collections.defaultdict(list)
        # Each piece its own questions: an embedding is remembered by text.
        for i in range(requests + warm):
            for k, (name, make) in enumerate(pieces_of.items()):
                elapsed = await timed(make(pieces[i * len(pieces_of) + k]))
                if i >= warm:
                    times[name].append(elapsed)
    rows.append("| a miss's pieces, concurrency 1, unseen questions | calls | p50 (ms) | p99 (ms) |")
    rows.append("|---|---|---|---|")
    for name in pieces_of:
        values = times[name]
        rows.append(f"| {name} | {len(values)} | {p50(values):.2f} | {percentile(values, 99):.2f} |")
    return rows


def trap_table(pairs: list[cache_data.Pair], served: list[bool], title: str) -> list[str]:
    """Per category, the share of pairs served: wrong for the traps, right for
    paraphrases and repeats."""
    rows = [f"| {title} | pairs | served | should be served |", "|---|---|---|---|"]
    by_category: dict[str, list[bool]] = collections.defaultdict(list)
    for p, hit in zip(pairs, served):
        by_category[p.category].append(hit)
    for category in TRAP_ORDER:
        outcomes = by_category.get(category, [])
        should = "yes" if category in ("paraphrase", "repeat") else "no"
        rows.append(f"| {category} | {len(outcomes)} | {rate(sum(outcomes), len(outcomes))} | {should} |")
    return rows


async def main_async(args, stack: Stack) -> list[str]:
    qqp = [p for p in cache_data.load_qqp() if p.portion == "test"]
    traps = [p for p in cache_data.load_traps() if p.portion == "test"]
    natural = cache_data.load_natural()
    scenarios = cache_conversations.load(("test",))
    if args.limit:
        qqp, traps, scenarios = qqp[: args.limit], traps[: args.limit], scenarios[: args.limit]
        natural = natural[: args.limit]
    rows: list[str] = []
    async with (
        router_channel(stack.address("cache"), "cache", stack.mesh_settings) as cache_channel,
        router_channel(stack.address("inference"), "inference", stack.mesh_settings) as inference_channel,
    ):
        cache = Cache(cache_service_pb2_grpc.CacheServiceStub(cache_channel))
        if args.only_miss_path:
            return await miss_path(stack, cache, inference_channel, args)
        started = time.perf_counter()
        one = await one_partition(cache, qqp, args.concurrency)
        alone = await own_partitions(cache, qqp, args.concurrency, "qqp")
        trapped = await own_partitions(cache, traps, args.concurrency, "trap")
        natural_served = await own_partitions(cache, natural, args.concurrency, "natural")
        conversed = await conversations(cache, scenarios, args.concurrency)
        elapsed = time.perf_counter() - started
        stats = await cache.stub.GetStats(pb.GetStatsRequest(), timeout=30)
        embedder = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)
        stored_vectors = await embed(embedder, one["stored_questions"], args.concurrency)
        lookup_vectors = await embed(embedder, one["lookup_questions"], args.concurrency)
        lookup_ms = list(cache.lookup_ms)
        miss_rows = await miss_path(stack, cache, inference_channel, args) if args.busy_entries else []
    times = verification_times(
        one["stored_questions"], stored_vectors, one["lookup_questions"], lookup_vectors
    )

    settings = CacheSettings()
    rows.append(
        f"Defaults: pre-filter cosine {settings.semantic_threshold}, cache.max_false_hit_rate "
        f"{settings.max_false_hit_rate} (GetStats: expected false-hit rate "
        f"{stats.expected_false_hit_rate:.4f}); "
        f"{len(qqp)} QQP test pairs, {len(traps)} test traps, {len(scenarios)} test conversation "
        f"scenarios; {elapsed:.0f} s of cache calls at concurrency "
        f"{args.concurrency}, {os.cpu_count()} CPU cores.\n"
    )
    rows.append("| QQP test portion | lookups | hits | precision | recall | false-hit rate |")
    rows.append("|---|---|---|---|---|---|")
    rows.append(
        f"| one partition ({one['stored']} entries) | {one['lookups']} | {one['hits']} | "
        f"{rate(one['correct'], one['hits'])} | {rate(one['correct'], one['with_duplicate'])} | "
        f"{rate(one['hits'] - one['correct'], one['lookups'] - one['with_duplicate'])}¹ |"
    )
    duplicate = [p.duplicate for p in qqp]
    true_hits = sum(1 for d, hit in zip(duplicate, alone) if d and hit)
    false_hits = sum(1 for d, hit in zip(duplicate, alone) if not d and hit)
    rows.append(
        f"| each pair in its own partition | {len(qqp)} | {true_hits + false_hits} | "
        f"{rate(true_hits, true_hits + false_hits)} | {rate(true_hits, sum(duplicate))} | "
        f"{rate(false_hits, len(qqp) - sum(duplicate))} |"
    )
    rows.append(
        "\n¹ wrong hits over lookups without a labelled duplicate stored; wrong hits include unlabelled "
        "duplicates, so this is an upper bound and precision a lower bound.\n"
    )
    rows.extend(trap_table(traps, trapped, "trap category (each pair alone)"))
    rows.append("")
    rows.extend(
        trap_table(natural, natural_served, "hand-written natural phrasing, held out (each pair alone)")
    )
    rows.append(
        f"\n| conversation variant (all {len(scenarios)} stored in one partition) | lookups | "
        "served its own entry | served another's | should be served |"
    )
    rows.append("|---|---|---|---|---|")
    same = changed = same_hits = changed_wrong = 0
    for category in CONVERSATION_ORDER:
        outcomes = conversed.get(category, [])
        own, other = outcomes.count("own"), outcomes.count("other")
        should = category in (
            "reworded",
            "small_talk",
            "unrelated_history",
            "slot_small_talk",
            "slot_reworded_request",
        )
        if should:
            same, same_hits = same + len(outcomes), same_hits + own
        else:
            changed, changed_wrong = changed + len(outcomes), changed_wrong + own + other
        rows.append(
            f"| {category} | {len(outcomes)} | {rate(own, len(outcomes))} | {rate(other, len(outcomes))} | "
            f"{'yes' if should else 'no'} |"
        )
    rows.append(
        f"\nSame-context conversations served their entry: {rate(same_hits, same)}; changed contexts "
        f"served any entry: {rate(changed_wrong, changed)}.\n"
    )
    rows.append("| latency | lookups | p50 (ms) | p99 (ms) |")
    rows.append("|---|---|---|---|")
    rows.append(
        f"| verification of a lookup's candidates (in-process) | {len(times)} | "
        f"{percentile(times, 50):.3f} | {percentile(times, 99):.3f} |"
    )
    rows.append(
        f"| Lookup RPC, all phases above, concurrency {args.concurrency} | {len(lookup_ms)} | "
        f"{statistics.median(lookup_ms):.1f} | {percentile(lookup_ms, 99):.1f} |"
    )
    return rows + miss_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--limit", type=int, default=0, help="only the first N pairs of each set (a smoke run)"
    )
    parser.add_argument(
        "--busy-entries",
        type=int,
        default=3000,
        help="train questions stored before the miss-path TTFT is measured (0: skip that section)",
    )
    parser.add_argument(
        "--miss-requests", type=int, default=64, help="turns per path in the miss-path section"
    )
    parser.add_argument("--only-miss-path", action="store_true", help="only the miss-path section")
    args = parser.parse_args()
    ports = Ports(*(free_port() for _ in range(6)))
    with tempfile.TemporaryDirectory(prefix="meshgate-cache-bench-") as state_dir:
        stack = Stack(
            pathlib.Path(state_dir),
            ports,
            dev_api_key=API_KEY,
            tracing=False,
            log_level="warning",
            triton_models=("tiny_gpt", "minilm"),
        )
        with stack:
            rows = uvloop.run(main_async(args, stack))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
