"""Context assembly on long real conversations: is a question's evidence still in the prompt?

Replays each REALTALK conversation of the development set
(/work/shared/data/long-conversations/realtalk, see its README) into a session
of the real context service (real Redis; turn and question embeddings through
the real inference service and Triton's minilm), then asks each question at
budgets of 1k, 2k, 4k and 8k tokens of smollm2's template and reads the
manifest: a question counts as kept when all of its evidence turns are
INCLUDED verbatim (turns only summarized are reported apart). The same for the
"newest turns that fit" strategy at the same budgets.

Also: assembly latency for the sessions of 1,000+ turns, through gRPC with the
question's embedding, and in-process without it (the service's own code,
hot session in memory and cold from Redis), and Redis memory per stored turn.

``--latency-only`` replays only the sessions of 1,000+ turns and measures
latency alone (no retention table), and ``--profile PATH`` adds a cProfile
pass of the gRPC loop after the timed one (into PATH), and one of the cold
in-process loop after its timed one (into PATH.cold). ``--compare-embedders``
times a second context service beside the first, on the same sessions: the
first embeds questions through the inference service, the second in its own
process (context.embedder = "local"), the two calls in alternating order.

``--offline`` re-scores from vectors cached under bench/.cache/ with the pure
modules (relevance.py, assembly.plan), for development; the reported run goes
through the services. A vector file records the digest of its texts and the
embedder beside it, and is embedded again when either changed.

The headline counts the questions all of whose evidence ids resolve to turns
(658 of 728; the first line printed says which are left out and why);
``--partial-evidence`` also keeps those some of whose ids resolve, judged on
those alone (705).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import cProfile
import dataclasses
import hashlib
import json
import os
import pathlib
import pstats
import re
import statistics
import sys
import tempfile
import time
import uuid

# Before numpy loads: the services run in this process, configured as
# their entry points configure them (services/context/__main__.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import uvloop  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import context_ranker  # noqa: E402  (bench/, beside this script)
from tritonclient.grpc import service_pb2_grpc as triton_service_pb2_grpc  # noqa: E402

from meshgate import redis_access, serving  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.config import Settings  # noqa: E402
from meshgate.context.v1 import context_service_pb2 as pb  # noqa: E402
from meshgate.context.v1 import context_service_pb2_grpc  # noqa: E402
from meshgate.embedding import InferenceEmbedder  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2 as inference_pb  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2_grpc  # noqa: E402
from meshgate.local import redis_server, triton  # noqa: E402
from meshgate.local.stack import build_model_weights, free_port  # noqa: E402
from services.context import app as context_app  # noqa: E402
from services.context import assembly, relevance, summaries, token_counts  # noqa: E402
from services.context.hot_cache import HotCache, change_listener  # noqa: E402
from services.context.servicer import ContextServicer  # noqa: E402
from services.context.store import SessionStore  # noqa: E402
from services.context.store import key as session_key_of  # noqa: E402
from services.context.turn_index import TurnIndex  # noqa: E402
from services.inference import app as inference_app  # noqa: E402
from services.inference import triton_protocol  # noqa: E402
from tests.mesh import mesh_settings, router_channel  # noqa: E402

DATA = pathlib.Path("/work/shared/data/long-conversations/realtalk")
CACHE = ROOT / "bench" / ".cache"
MODEL = "smollm2"
BUDGETS = (1024, 2048, 4096, 8192)
STRATEGIES = {"adaptive": pb.ASSEMBLY_STRATEGY_ADAPTIVE, "newest": pb.ASSEMBLY_STRATEGY_NEWEST}
CATEGORIES = {1: "1 multi-hop", 2: "2 temporal", 3: "3 commonsense"}
# Turns per AppendTurns: one embedding batch each, well inside the embedder's deadline.
APPEND_CHUNK = 16
_EVIDENCE_ID = re.compile(r"D\d+:\d+")


# --- the data ----------------------------------------------------------------


def load_conversation(
    path: pathlib.Path, partial_evidence: bool = False
) -> tuple[list[common_pb2.Message], list[str], list[dict]]:
    """Turns (the first speaker as the user), their dia_ids, and the
    questions with evidence resolved to turn positions. A question with
    any evidence id that resolves to no turn is left out, so that "kept"
    means all of its evidence (the headline figure; ``left_out`` counts
    them); with ``partial_evidence`` it is kept with the ids that resolve,
    as the data's README reads ("skip ids that resolve to no turn"), which
    judges it on part of its evidence only."""
    raw = json.loads(path.read_text())
    sessions = sorted((k for k in raw if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1]))
    turns, ids = [], []
    first_speaker = None
    for key in sessions:
        for turn in raw[key]:
            speaker = turn["speaker"]
            first_speaker = first_speaker or speaker
            role = common_pb2.ROLE_USER if speaker == first_speaker else common_pb2.ROLE_ASSISTANT
            # The role tells the two people apart; a name on every line would
            # cost tokens and pull every turn's embedding toward it.
            turns.append(common_pb2.Message(role=role, content=turn["clean_text"]))
            ids.append(turn["dia_id"])
    position = {dia_id: i for i, dia_id in enumerate(ids)}
    questions = []
    for qa in raw["qa"]:
        evidence, unresolved = _evidence(qa, position)
        if evidence and (partial_evidence or not unresolved):
            questions.append({"question": qa["question"], "category": qa["category"], "evidence": evidence})
    return turns, ids, questions


def _evidence(qa: dict, position: dict[str, int]) -> tuple[set[int], int]:
    """A question's evidence as turn positions, and how many of its ids
    (or evidence strings that name no id) resolve to no turn."""
    evidence, unresolved = set(), 0
    for item in qa.get("evidence", []):
        found = _expand(item)
        unresolved += sum(e not in position for e in found) or not found
        evidence.update(position[e] for e in found if e in position)
    return evidence, unresolved


def left_out(paths: list[pathlib.Path]) -> str:
    """What the headline leaves out, by why and by category (an audit found
    the left-out questions said nowhere, most of them multi-hop)."""
    why: collections.Counter = collections.Counter()
    categories: collections.Counter = collections.Counter()
    asked = 0
    for path in paths:
        raw = json.loads(path.read_text())
        position = {turn["dia_id"]: 0 for k in raw if re.fullmatch(r"session_\d+", k) for turn in raw[k]}
        for qa in raw["qa"]:
            asked += 1
            evidence, unresolved = _evidence(qa, position)
            if not qa.get("evidence"):
                why["no evidence listed"] += 1
            elif not evidence:
                why["no evidence id resolves"] += 1
            elif unresolved:
                why["some evidence ids resolve to no turn"] += 1
            else:
                continue
            categories[CATEGORIES.get(qa["category"], str(qa["category"]))] += 1
    reasons = ", ".join(f"{n} {reason}" for reason, n in why.most_common())
    by_category = ", ".join(f"{name} {n}" for name, n in sorted(categories.items()))
    return f"{asked} questions in the data; left out {sum(why.values())}: {reasons} ({by_category})"


def _expand(item: str) -> list[str]:
    """Evidence strings: single ids, lists split by ';' or ',', ranges
    'D12:3-D12:5', trailing dots."""
    found: list[str] = []
    for part in re.split(r"[;,]", item):
        part = part.strip().rstrip(".")
        ends = _EVIDENCE_ID.findall(part)
        if len(ends) == 2 and "-" in part:
            (ds, ts), (de, te) = (e.split(":") for e in ends)
            if ds == de:
                found.extend(f"{ds}:{t}" for t in range(int(ts), int(te) + 1))
                continue
        found.extend(ends)
    return found


# --- results -----------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.kept: dict[tuple, list[bool]] = collections.defaultdict(list)

    @classmethod
    def merged(cls, tallies) -> Tally:
        merged = cls()
        for tally in tallies:
            for cell, kept in tally.kept.items():
                merged.kept[cell] += kept
        return merged

    def add(self, strategy: str, budget: int, category: int, kept: bool) -> None:
        self.kept[(strategy, budget, category)].append(kept)
        self.kept[(strategy, budget, 0)].append(kept)

    def share(self, strategy: str, budget: int, category: int) -> str:
        values = self.kept.get((strategy, budget, category), [])
        return f"{100 * sum(values) / len(values):5.1f}%" if values else "    -"

    def table(self, title: str) -> list[str]:
        categories = sorted({c for (_, _, c) in self.kept if c})
        header = "| budget | strategy | all | " + " | ".join(CATEGORIES[c] for c in categories) + " |"
        rows = [title, "", header, "|" + "---|" * (3 + len(categories))]
        for budget in BUDGETS:
            # The offline run adds strategies the service does not have ("learned").
            for strategy in dict.fromkeys(s for (s, _, _) in self.kept):
                cells = [self.share(strategy, budget, c) for c in (0, *categories)]
                rows.append(f"| {budget} | {strategy} | " + " | ".join(cells) + " |")
        n = len(self.kept.get(("adaptive", BUDGETS[0], 0), []))
        rows.append(f"\n{n} questions")
        return rows


def per_conversation_mean(each: dict[str, Tally]) -> str:
    """Adaptive retention per budget, each conversation weighing the same:
    a change that helps only the conversations with the most questions
    does not move it."""
    cells = []
    for budget in BUDGETS:
        shares = [statistics.mean(t.kept[("adaptive", budget, 0)]) for t in each.values()]
        cells.append(f"{budget}: {100 * statistics.mean(shares):.1f}%")
    return f"Adaptive, mean over the {len(each)} conversations: " + ", ".join(cells)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


# --- offline: the pure policy over cached vectors (development only) --------


async def embed_all(stub, texts: list[str], batch: int = 64) -> np.ndarray:
    rows = []
    for start in range(0, len(texts), batch):
        response = await stub.Embed(
            inference_pb.EmbedRequest(texts=texts[start : start + batch]), timeout=120
        )
        rows.append(np.frombuffer(response.vectors, "<f4").reshape(-1, response.dimensions))
    return np.vstack(rows)


def offline_index(
    turns: list[common_pb2.Message], vectors: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A conversation's postings, term counts and unit turn vectors, as the
    turn index stores them (``vectors`` may run on into the questions')."""
    term_sets = [relevance.index_terms(m.content) for m in turns]
    postings: dict[str, list[int]] = collections.defaultdict(list)
    for index, terms in enumerate(term_sets):
        for term, frequency in terms.items():
            postings[term].append(relevance.pack_posting(index, frequency))
    packed = {t: np.array(p, dtype=np.uint32) for t, p in postings.items()}
    lengths = np.array([sum(t.values()) for t in term_sets], dtype=np.float64)
    return packed, lengths, relevance.unit_rows(relevance.quantize(vectors[: len(turns)]))


def scoring_latency(
    conversations, vectors: dict[str, np.ndarray], ranker: context_ranker.LearnedRanker
) -> str:
    """Scoring alone (no planning) for every question of the 1,000+-turn
    conversations, hybrid and learned, interleaved so that a busy machine
    slows both alike: their ratio is the number to read."""
    hybrid, learned = [], []
    for name, (turns, _, questions) in conversations.items():
        if len(turns) < 1000:
            continue
        packed, lengths, turn_vectors = offline_index(turns, vectors[name])
        roles = np.array([m.role for m in turns], dtype=np.uint8)
        for q, vector in zip(questions, vectors[name][len(turns) :], strict=True):
            terms = list(relevance.index_terms(q["question"]))
            started = time.perf_counter()
            relevance.hybrid_scores(
                terms, packed, lengths, turn_vectors, vector, roles=roles, question=q["question"]
            )
            middle = time.perf_counter()
            ranker.scores(context_ranker.ranking_features(terms, packed, lengths, turn_vectors, vector))
            hybrid.append(1000 * (middle - started))
            learned.append(1000 * (time.perf_counter() - middle))
    if not hybrid:
        return "(no conversation of 1,000+ turns: no scoring latency measured)"
    return (
        f"Scoring {len(hybrid)} questions over sessions of 1,000+ turns:"
        f" hybrid p50 {percentile(hybrid, 50):.2f} / p99 {percentile(hybrid, 99):.2f} ms,"
        f" learned p50 {percentile(learned, 50):.2f} / p99 {percentile(learned, 99):.2f} ms"
        f" (learned / hybrid at p50:"
        f" {percentile(learned, 50) / percentile(hybrid, 50):.2f})"
    )


def nameless_texts(turns: list[common_pb2.Message], questions: list[dict]) -> list[str]:
    """What the service embeds beside each question (relevance.nameless_text;
    the question itself where it has none, never used)."""
    return [getattr(relevance.nameless_text(q["question"]), "text", q["question"]) for q in questions]


def digest_named_vectors(conversations, stem: str, texts_of) -> dict[str, np.ndarray]:
    """:func:`cached_vectors` of ``texts_of``, in a file named by ``stem``
    and the texts' digest: a change to the code that makes the texts embeds
    the new ones instead of scoring them by the old ones' cached vectors."""
    file_name = f"{stem}-{texts_digest(conversations, texts_of)}.npz"
    return uvloop.run(cached_vectors(conversations, file_name, texts_of))


def texts_digest(conversations, texts_of) -> str:
    """A digest of every conversation's name and ``texts_of`` its turns and
    questions: the part of a vector cache's file name that changes with them."""
    digest = hashlib.sha256()
    for name, (turns, _, questions) in sorted(conversations.items()):
        for text in (name, *texts_of(turns, questions)):
            digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def nameless_vectors(conversations) -> dict[str, np.ndarray]:
    """The vectors of :func:`nameless_texts` (relevance.nameless_text's)."""
    return digest_named_vectors(conversations, "realtalk_nameless_vectors", nameless_texts)


def nameless_queries(questions: list[dict], vectors: np.ndarray) -> list[relevance.NamelessQuery | None]:
    """Each question's NamelessQuery with its vector (of ``nameless_texts``), or None."""
    queries = []
    for q, vector in zip(questions, vectors, strict=True):
        query = relevance.nameless_text(q["question"])
        queries.append(None if query is None else dataclasses.replace(query, vector=vector))
    return queries


def offline(
    conversations,
    vectors: dict[str, np.ndarray],
    weights: relevance.Weights,
    floor: int,
    ranker: context_ranker.LearnedRanker | None = None,
    nameless: dict[str, np.ndarray] | None = None,
    embed_nameless_question: bool = False,
) -> Tally:
    """Retention of the pure policy; with ``ranker``, also ranked by the
    learned model (the "learned" rows; the service does not use it). With
    ``nameless`` (the vectors of ``nameless_texts``), also with each
    question's nameless form, as the service with
    context.embed_nameless_question (``embed_nameless_question``: the
    "adaptive" rows are those, and the "no nameless" rows without it; else
    the "nameless" rows are)."""
    counter = token_counts.for_models(Settings().models)[MODEL]
    tally = Tally()
    for name, (turns, _, questions) in conversations.items():
        counts = asyncio.run(counter.count(turns))
        lines = asyncio.run(counter.count_lines(turns))
        costs = assembly.SessionCosts.of(
            [assembly.TurnCost(m.role, n, line) for m, n, line in zip(turns, counts, lines, strict=True)]
        )
        packed, lengths, turn_vectors = offline_index(turns, vectors[name])
        question_vectors = vectors[name][len(turns) :]
        without_names = (
            nameless_queries(questions, nameless[name]) if nameless is not None else [None] * len(questions)
        )
        for q, vector, nameless_query in zip(questions, question_vectors, without_names, strict=True):
            message = common_pb2.Message(role=common_pb2.ROLE_USER, content=q["question"])
            new = [assembly.TurnCost(message.role, asyncio.run(counter.count([message]))[0])]
            text = q["question"]
            terms = list(relevance.index_terms(text))
            if not embed_nameless_question:
                nameless_query, other = None, nameless_query
            else:
                other = None
            scores = {
                "adaptive": relevance.hybrid_scores(
                    terms, packed, lengths, turn_vectors, vector, weights, costs.roles, nameless_query, text
                ).scores,
                "newest": None,
            }
            if nameless is not None:
                # With the question's nameless form (relevance.nameless_text) or
                # without it, whichever "adaptive" is not: what it adds.
                label = "no nameless" if embed_nameless_question else "nameless"
                scores[label] = relevance.hybrid_scores(
                    terms, packed, lengths, turn_vectors, vector, weights, costs.roles, other, text
                ).scores
            # The same ranking, every turn a message of its own (context.pack_older_turns off).
            scores["unpacked"] = scores["adaptive"]
            # Without the dense-stretch share (relevance.with_spans): what it adds.
            scores["no stretches"] = relevance.hybrid_scores(
                terms,
                packed,
                lengths,
                turn_vectors,
                vector,
                dataclasses.replace(weights, span=0.0),
                costs.roles,
                nameless_query,
                text,
            ).scores
            if ranker is not None:
                features = context_ranker.ranking_features(
                    terms, packed, lengths, turn_vectors, vector, weights
                )
                scores["learned"] = ranker.scores(features)
            for budget in BUDGETS:
                for strategy, ranked in scores.items():
                    chosen = assembly.plan(
                        costs,
                        new,
                        budget,
                        counter.template_tokens,
                        relevance=ranked,
                        recency_floor=floor,
                        transcript_tokens=None if strategy == "unpacked" else counter.transcript_tokens,
                    )
                    kept = all(chosen.reasons[i] for i in q["evidence"])
                    tally.add(strategy, budget, q["category"], kept)
    return tally


# --- the services ------------------------------------------------------------


async def replay(stub, tenant: str, turns: list[common_pb2.Message]) -> str:
    created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
    session_id = created.session.session_id
    for start in range(0, len(turns), APPEND_CHUNK):
        await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                messages=turns[start : start + APPEND_CHUNK],
                any_version=True,
            ),
            timeout=60,
        )
    return session_id


def assemble_request(tenant, session_id, question: str, budget: int, strategy: int):
    return pb.AssembleContextRequest(
        tenant_id=tenant,
        session_id=session_id,
        new_messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=question)],
        model=MODEL,
        max_prompt_tokens=budget,
        strategy=strategy,
    )


async def redis_bytes_per_turn(client, tenant: str, session_id: str, count: int) -> tuple[float, float]:
    total = index = 0
    async for key in client.scan_iter(match=session_key_of(tenant, session_id, "*")):
        used = await client.memory_usage(key, samples=0) or 0
        total += used
        if b":ix:" in key:
            index += used
    return total / count, index / count


async def unembedded_turns(client, tenant: str, session_id: str, count: int) -> int:
    raw = await client.get(session_key_of(tenant, session_id, "ix:vectors")) or b""
    dimensions = int(await client.hget(session_key_of(tenant, session_id, "ix:postings"), "\0dim") or 384)
    rows = np.frombuffer(raw, dtype=np.int8)[: count * dimensions]
    rows = rows.reshape(-1, dimensions) if len(rows) else np.zeros((0, dimensions))
    return count - int((np.abs(rows).sum(axis=1) > 0).sum())


async def through_services(conversations, args) -> list[str]:
    build_model_weights()
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meshgate-context-bench-") as state:
        state_dir = pathlib.Path(state)
        redis_port, triton_port = free_port(), free_port()
        redis_process = redis_server.launch(redis_port, state_dir)
        triton_process = triton.launch(
            grpc_port=triton_port, state_dir=state_dir, log_file=state_dir / "triton.log", models=("minilm",)
        )
        try:
            redis_server.wait_ready(redis_port)
            triton.wait_ready(f"127.0.0.1:{triton_port}", ("minilm",), timeout=180, process=triton_process)
            settings = Settings(mesh=mesh_settings())
            settings.redis.url = f"redis://127.0.0.1:{redis_port}/0"
            settings.inference.triton_urls = [f"127.0.0.1:{triton_port}"]
            settings.context.session_ttl_s = 0
            settings.context.pack_older_turns = not args.no_pack
            if args.embed_nameless_question:
                settings.context.embed_nameless_question = True
            # The inference service's memo would hold every turn AppendTurns
            # embedded and every question the retention pass asked: most of
            # the latency pass's embeddings would be memo hits, and its Embed
            # row would never reach Triton. Off, every embedding below is
            # Triton's.
            settings.inference.embedding_memo_entries = 0
            # Summaries are another measure: without a chat model loaded, none are asked for.
            settings.context.summary_model = ""
            out += await _run(conversations, args, settings)
        finally:
            triton.terminate(triton_process)
            redis_process.terminate()
            redis_process.wait(10)
    return out


async def _start(app_module, name: str, settings: Settings) -> tuple[serving.Service, str]:
    service = serving.Service(name, app_module.SERVICE_NAMES)
    cleanup = await app_module.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    return service, f"127.0.0.1:{port}"


async def _run(conversations, args, settings: Settings) -> list[str]:
    inference, inference_address = await _start(inference_app, "inference", settings)
    settings.context.inference_address = inference_address
    if args.compare_embedders:
        settings.context.embedder = "inference"
    context, context_address = await _start(context_app, "context", settings)
    # With --compare-embedders, a second context service on the same Redis
    # (so the same sessions) that embeds its questions in its own process.
    local = None
    if args.compare_embedders:
        local_settings = copy.deepcopy(settings)
        local_settings.context.embedder = "local"
        local, local_address = await _start(context_app, "context", local_settings)
    client = await redis_access.connect_checked(settings.redis.url)
    out: list[str] = []
    try:
        async with (
            router_channel(context_address, "context") as channel,
            router_channel(inference_address, "inference") as inference_channel,
            contextlib.AsyncExitStack() as local_channels,
        ):
            stub = context_service_pb2_grpc.ContextServiceStub(channel)
            if local is not None:
                local_channel = await local_channels.enter_async_context(
                    router_channel(local_address, "context")
                )
                args.local_stub = context_service_pb2_grpc.ContextServiceStub(local_channel)
            embed_stub = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)
            await _wait_for_embeddings(embed_stub)
            tenant = f"bench-{uuid.uuid4().hex[:6]}"
            tally, summarized = Tally(), Tally()
            sessions = {}
            memory, memory_index, unembedded, replay_s = [], [], 0, 0.0
            for name, (turns, _, questions) in conversations.items():
                started = time.perf_counter()
                session_id = await replay(stub, tenant, turns)
                replay_s += time.perf_counter() - started
                sessions[name] = session_id
                if args.latency_only:
                    print(f"{name}: {len(turns)} turns replayed", file=sys.stderr, flush=True)
                    continue
                unembedded += await unembedded_turns(client, tenant, session_id, len(turns))
                per_turn, per_turn_index = await redis_bytes_per_turn(client, tenant, session_id, len(turns))
                memory.append(per_turn)
                memory_index.append(per_turn_index)
                for q in questions:
                    for budget in BUDGETS:
                        for strategy, value in STRATEGIES.items():
                            response = await stub.AssembleContext(
                                assemble_request(tenant, session_id, q["question"], budget, value), timeout=60
                            )
                            entries = [e for e in response.manifest.entries if e.source == pb.SOURCE_SESSION]
                            tally.add(
                                strategy,
                                budget,
                                q["category"],
                                all(entries[i].disposition == pb.DISPOSITION_INCLUDED for i in q["evidence"]),
                            )
                            summarized.add(
                                strategy,
                                budget,
                                q["category"],
                                all(entries[i].disposition != pb.DISPOSITION_DROPPED for i in q["evidence"]),
                            )
                print(f"{name}: {len(turns)} turns, {len(questions)} questions", file=sys.stderr, flush=True)
            if args.latency_only:
                return await _latency(conversations, sessions, tenant, stub, embed_stub, settings, args)
            total_turns = sum(len(t) for t, _, _ in conversations.values())
            out += tally.table(
                "### Evidence kept verbatim (share of questions with every evidence turn INCLUDED)"
            )
            out += [""] + summarized.table(
                "### Evidence kept verbatim or summarized (every evidence turn INCLUDED or SUMMARIZED)"
            )
            out += [
                "",
                f"Replay: {total_turns} turns appended in {replay_s:.0f} s ({unembedded} without a vector)",
            ]
            out += [
                f"Redis memory per stored turn: {statistics.mean(memory):.0f} B"
                f" (of which the retrieval index {statistics.mean(memory_index):.0f} B)",
                "",
            ]
            out += await _latency(conversations, sessions, tenant, stub, embed_stub, settings, args)
    finally:
        await client.aclose()
        await serving.stop(context, grace_s=1)
        if local is not None:
            await serving.stop(local, grace_s=1)
        await serving.stop(inference, grace_s=1)
    return out


async def _wait_for_embeddings(stub, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await stub.Embed(inference_pb.EmbedRequest(texts=["ready?"]), timeout=10)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _latency(conversations, sessions, tenant, stub, embed_stub, settings: Settings, args) -> list[str]:
    """Assembly of sessions with 1,000+ turns, at 2k tokens, adaptive."""
    long = {n: c for n, c in conversations.items() if len(c[0]) >= 1000}
    if not long:
        return ["(no session of 1,000+ turns in this run: no latency measured)"]
    requests = [
        assemble_request(tenant, sessions[n], q["question"], 2048, pb.ASSEMBLY_STRATEGY_ADAPTIVE)
        for n, (_, _, questions) in long.items()
        for q in questions
    ]
    # Through gRPC, with the question's embedding (the service embeds it);
    # the question's Embed call alone; and Triton's minilm asked directly
    # (what the inference service adds to an Embed is the difference: its
    # memo is off in this bench, so each Embed reaches Triton too), one
    # after the other per question, so that the shared machine's drift hits
    # all three alike.
    # With --compare-embedders, the second context service's call (the
    # question embedded in its own process) too, the two in turns first.
    rpc, rpc_local, embed, triton_direct = [], [], [], []
    local_stub = getattr(args, "local_stub", None)
    if local_stub is not None:
        # Its hot cache holds no session yet (the replay went to the other).
        for request in {r.session_id: r for r in requests}.values():
            await local_stub.AssembleContext(request, timeout=60)
    async with grpc.aio.insecure_channel(settings.inference.triton_urls[0]) as triton_channel:
        triton_stub = triton_service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
        model = settings.inference.embedding_triton_model
        for number, request in enumerate(requests):
            question = request.new_messages[0].content
            calls = [(stub, rpc)] if local_stub is None else [(stub, rpc), (local_stub, rpc_local)]
            for context_stub, times in calls if number % 2 == 0 else reversed(calls):
                started = time.perf_counter()
                await context_stub.AssembleContext(request, timeout=60)
                times.append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            await embed_stub.Embed(inference_pb.EmbedRequest(texts=[question]), timeout=60)
            embed.append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            await triton_stub.ModelInfer(triton_protocol.embed_request(model, [question]), timeout=60)
            triton_direct.append(1000 * (time.perf_counter() - started))
    if args.profile:
        # Afterwards, so the profiler inflates none of the figures above.
        profiler = cProfile.Profile()
        profiler.enable()
        for request in requests:
            await stub.AssembleContext(request, timeout=60)
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    # The service's own code in this process, with the summaries the
    # service adds: hot (session and index in memory) with and without the
    # question's embedding (the same inference service, not through the
    # context service's gRPC), and cold (index from Redis) without.
    counters = token_counts.for_models(settings.models)
    client = await redis_access.connect_checked(settings.redis.url)
    hot = HotCache(256 * 1024 * 1024, 0)
    listener = change_listener(settings.redis.url, hot)
    listener.start()
    try:
        for _ in range(100):
            if hot.live:
                break
            await asyncio.sleep(0.05)
        store = SessionStore(client, 0)
        index = TurnIndex(client, 0)
        results = {}
        paths = (
            ("hot, embedded", hot, InferenceEmbedder(embed_stub)),
            ("hot", hot, None),
            ("cold", HotCache(0, 0), None),
        )
        for label, cache, embedder in paths:
            summarizer = summaries.Summarizer(
                store,
                summaries.SummaryStore(client, 0),
                summaries.SummaryPolicy(
                    settings.context.summary_span_turns, settings.context.summary_hot_window_turns
                ),
                None,
                counters.values(),
            )
            floor = settings.context.recency_floor_turns
            servicer = ContextServicer(
                store,
                settings.models,
                counters,
                cache,
                index,
                embedder,
                floor,
                summarizer,
                pack_older_turns=settings.context.pack_older_turns,
                embed_nameless_question=settings.context.embed_nameless_question,
            )
            for name in long:
                servicer.prefetch(tenant, sessions[name])
            await asyncio.sleep(2)
            # As in the service after appends: the summarizer holds each session's summaries.
            for name in long:
                first = next(r for r in requests if r.session_id == sessions[name])
                await servicer.AssembleContext(first, None)
            times = []
            for request in requests:
                started = time.perf_counter()
                await servicer.AssembleContext(request, None)
                times.append(1000 * (time.perf_counter() - started))
            results[label] = times
            if args.profile and label == "cold":
                # The cold path's own profile, also after its timed loop.
                cold_profile = f"{args.profile}.cold"
                profiler = cProfile.Profile()
                profiler.enable()
                for request in requests:
                    await servicer.AssembleContext(request, None)
                profiler.disable()
                profiler.dump_stats(cold_profile)
                print(f"cold in-process loop profiled into {cold_profile}", file=sys.stderr)
    finally:
        await listener.close()
        await client.aclose()
    turns = sorted(len(c[0]) for c in long.values())

    def row(path: str, values: list[float]) -> str:
        return f"| {path} | {percentile(values, 50):.2f} | {percentile(values, 99):.2f} |"

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"### Assembly latency, adaptive at 2,048 tokens, {len(requests)} questions over sessions of"
        f" {', '.join(map(str, turns))} turns",
        "",
        f"Load average at the end: {load} (1, 5, 15 min; {os.cpu_count()} cores)",
        "",
        "The inference service's embedding memo is off (inference.embedding_memo_entries = 0):"
        " every embedding below is computed by Triton, none is a memo hit.",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---|---|",
        row(
            f"AssembleContext over gRPC, with the question's embedding (context.embedder = "
            f"{settings.context.embedder})",
            rpc,
        ),
        *(
            [
                row(
                    "AssembleContext over gRPC, with the question's embedding (context.embedder = local)",
                    rpc_local,
                )
            ]
            if rpc_local
            else []
        ),
        row(
            "in-process, hot session, with the question's embedding, with summaries",
            results["hot, embedded"],
        ),
        row("in-process, no embedding, hot session, with summaries", results["hot"]),
        row("in-process, no embedding, cold (index read from Redis), with summaries", results["cold"]),
        row("the question's Embed call alone (inference service, then Triton)", embed),
        row("Triton's minilm asked directly (ModelInfer, no inference service)", triton_direct),
    ]


def turns_and_questions(turns: list[common_pb2.Message], questions: list[dict]) -> list[str]:
    """What ``cached_vectors`` embeds by default: each turn, then each question."""
    return [m.content for m in turns] + [q["question"] for q in questions]


async def cached_vectors(
    conversations, file_name: str = "realtalk_vectors_plain.npz", texts_of=turns_and_questions
) -> dict[str, np.ndarray]:
    """Vectors per conversation of ``texts_of(turns, questions)``, embedded
    once through a Triton of this run's own and kept under
    bench/.cache/``file_name``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / file_name
    made_of = {"texts": texts_digest(conversations, texts_of), "embedder": _embedder()}
    record = path.with_suffix(".json")
    if path.exists():
        vectors = dict(np.load(path))
        if record.exists() and json.loads(record.read_text()) == made_of:
            return vectors
        if not record.exists() and _sampled_rows_match(conversations, vectors, texts_of):
            # A file from before the record was kept: its rows are the texts'.
            _write_record(record, made_of)
            return vectors
        # Vectors of other texts, or of another embedder: an audit scored
        # rewritten turns by the old file's vectors, unwarned.
        print(f"{path.name} is of other texts or another embedder: embedding again", file=sys.stderr)
    build_model_weights()
    with tempfile.TemporaryDirectory(prefix="meshgate-context-bench-") as state:
        state_dir = pathlib.Path(state)
        port = free_port()
        process = triton.launch(
            grpc_port=port, state_dir=state_dir, log_file=state_dir / "t.log", models=("minilm",)
        )
        try:
            triton.wait_ready(f"127.0.0.1:{port}", ("minilm",), timeout=180, process=process)
            settings = Settings(mesh=mesh_settings())
            settings.inference.triton_urls = [f"127.0.0.1:{port}"]
            inference, address = await _start(inference_app, "inference", settings)
            try:
                async with router_channel(address, "inference") as channel:
                    stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
                    await _wait_for_embeddings(stub)
                    vectors = {}
                    for name, (turns, _, questions) in conversations.items():
                        vectors[name] = await embed_all(stub, texts_of(turns, questions))
                        print(f"embedded {name}", file=sys.stderr, flush=True)
            finally:
                await serving.stop(inference, grace_s=1)
        finally:
            triton.terminate(process)
    record.unlink(missing_ok=True)  # the old file's, until the new one is whole
    np.savez(path, **vectors)
    _write_record(record, made_of)
    return vectors


def _write_record(record: pathlib.Path, made_of: dict) -> None:
    try:
        record.write_text(json.dumps(made_of))
    except OSError as error:  # a read-only cache: the vectors are still these texts'
        print(f"{record.name} not written ({error}): the file is checked again next time", file=sys.stderr)


def _embedder() -> str:
    from meshgate import minilm
    from meshgate.embedding import embedder_name

    return embedder_name("minilm", minilm.REVISION)


def _sampled_rows_match(
    conversations, vectors: dict[str, np.ndarray], texts_of, per_conversation: int = 4
) -> bool:
    """Whether a vector file holds a row per text of ``texts_of`` and some
    of its rows, spread over each conversation, are the texts' embeddings
    (in process, by the code Triton's minilm runs, which gives its vectors
    to within float rounding)."""
    from meshgate.minilm import MiniLM

    model = None
    for name, (turns, _, questions) in conversations.items():
        texts = texts_of(turns, questions)
        rows = vectors.get(name)
        if rows is None or len(rows) != len(texts):
            return False
        model = model or MiniLM()
        picked = np.linspace(0, len(texts) - 1, per_conversation).astype(int)
        embedded = model.embed([texts[i] for i in picked])
        if not np.allclose(embedded, rows[picked], atol=1e-4):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offline", action="store_true", help="re-score cached vectors (development)")
    parser.add_argument("--floor", type=int, default=Settings().context.recency_floor_turns)
    parser.add_argument("--limit", type=int, default=0, help="only the first N conversations")
    parser.add_argument(
        "--no-pack", action="store_true", help="context.pack_older_turns off: every kept turn a message"
    )
    parser.add_argument(
        "--embed-nameless-question",
        action="store_true",
        help="context.embed_nameless_question on: the question's nameless form embedded and scored with it",
    )
    parser.add_argument(
        "--partial-evidence",
        action="store_true",
        help="also score the questions some of whose evidence ids resolve to no turn, on the ids that do",
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="replay only the sessions of 1,000+ turns and measure assembly latency, no retention",
    )
    parser.add_argument(
        "--compare-embedders",
        action="store_true",
        help="a second context service with context.embedder = local, timed beside the first (inference)",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="also cProfile the gRPC latency loop into PATH, the cold in-process one into PATH.cold",
    )
    args = parser.parse_args()
    paths = sorted(DATA.glob("*.json"))
    conversations = every = {p.stem: load_conversation(p, args.partial_evidence) for p in paths}
    print(
        "questions with some evidence unresolvable kept and judged on the rest"
        if args.partial_evidence
        else left_out(paths)
    )
    if args.latency_only:
        conversations = {n: c for n, c in conversations.items() if len(c[0]) >= 1000}
    if args.limit:
        conversations = dict(list(conversations.items())[: args.limit])
    if args.offline:
        file_name = "realtalk_vectors_partial.npz" if args.partial_evidence else "realtalk_vectors_plain.npz"
        # Of every conversation, as the other scripts read the file: a subset's
        # digest never matched the whole file's record (a final read).
        vectors = uvloop.run(cached_vectors(every, file_name))
        # Weights were chosen, and the learned ranker trained
        # (bench/train_context_ranker.py), on the first six conversations (by
        # name); the other four tell whether a choice generalises.
        names = sorted(conversations)
        ranker = context_ranker.LearnedRanker.load()
        # What the service embeds beside a question: once, as the vectors above.
        nameless = nameless_vectors(every)
        embed_nameless = args.embed_nameless_question or Settings().context.embed_nameless_question
        each = {
            n: offline(
                {n: conversations[n]},
                vectors,
                relevance.DEFAULT_WEIGHTS,
                args.floor,
                ranker,
                nameless,
                embed_nameless,
            )
            for n in names
        }
        for title, part in (
            ("all", names),
            ("tuning split: the first six", names[:6]),
            ("held-out split: the other four", names[6:]),
        ):
            if part:
                tally = Tally.merged(each[n] for n in part)
                print("\n".join(tally.table(f"### Offline (pure policy, cached vectors), {title}")) + "\n")
        print(per_conversation_mean(each) + "\n")
        print(scoring_latency(conversations, vectors, ranker))
        return
    print("\n".join(uvloop.run(through_services(conversations, args))))


if __name__ == "__main__":
    main()
