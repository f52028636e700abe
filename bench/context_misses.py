"""Where context assembly loses a question's evidence (issue 8): an offline analysis.

Re-scores the REALTALK questions as ``context_bench.py --offline`` does (the
service's pure policy, ``relevance.hybrid_scores`` + ``assembly.plan``, over the
vectors cached under bench/.cache/) and prints, at 1k and 2k tokens:

* per question category, the questions kept (every evidence turn INCLUDED) by
  how many evidence turns they have;
* where the budget goes: the template and the question, the recency floor,
  the transcript message's own tokens, the turns chosen by relevance, unused;
* how many questions have an evidence turn in the recency floor;
* the rank of the worst-ranked evidence turn of the misses, and the share of
  questions whose evidence is all within the K best-ranked turns;
* two ceilings: the evidence ranked first (is the budget the bound?), and the
  turns of the person a question names raised by a constant (what knowing who
  is who could buy: the speaker names come from the data, which the service
  never sees).

With ``--ideas``, each ranking idea measured in the fifth session, and the
selection ideas of 2026-12-02 (:data:`SELECTION_IDEAS`: reciprocal rank fusion,
a redundancy penalty, query-term coverage), as the difference from the
service's ranking in the share of questions kept, on all ten conversations,
the first six (by name: the tuning split of ``context_bench.py --offline``)
and the other four (held out). The one that gains on both, the question's
nameless form (relevance.nameless_text), is in the service behind
context.embed_nameless_question (off: it costs a second text in the
question's embedding); its row is the ranking with it (without it, when it
is on). None of the others gains at 1k and 2k on both splits
(bench/README.md, "Names the conversation never uses"), so the service uses
none of them; they live here so that the table can be re-run
(``context_beam.py --selection-ideas`` prints the selection ideas on BEAM-100k).
Then term expansion through the session's own words (:func:`expansion_ideas`,
issue 8's instance questions: "hobbies" against turns that say "skiing"): no
variant gains on both splits at 1k and 2k either (bench/README.md, "Term
expansion through the session's own words"), so it is not in the service.
Last, :data:`TWELFTH_SESSION_IDEAS`: a turn holding the kind of thing the
question's form asks for (a place, a title, a time), entity chaining from the
best turns, BM25's k1; none gains on both splits at 1k and 2k (bench/README.md,
"Answer kinds, entity chaining, BM25's k1").

    .venv/bin/python bench/context_bench.py --offline   # once: caches the vectors
    .venv/bin/python bench/context_misses.py [--ideas]  # 5 s [65 s under the bench lock; 5 min, fresh cache]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import hashlib
import json
import pathlib
import re

import context_bench as bench
import numpy as np
import uvloop

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from services.context import assembly, relevance

TUNING = 6  # the first six conversations by name, as context_bench --offline splits them
FLOOR = Settings().context.recency_floor_turns
# Whether the service scores a question with its nameless form (relevance.nameless_text).
NAMELESS = Settings().context.embed_nameless_question


@functools.cache
def counter():
    """smollm2's counter, as context_bench's offline run counts (built once:
    Settings() per plan would be most of a run's time)."""
    return bench.token_counts.for_models(Settings().models)[bench.MODEL]


CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "commonsense"}


@dataclasses.dataclass
class Conversation:
    costs: assembly.SessionCosts
    postings: dict[str, np.ndarray]
    lengths: np.ndarray
    rows: np.ndarray  # unit rows, as the index stores them
    terms: list[collections.Counter[str]]  # each turn's index terms (for keyword feedback)
    questions: list[Question]
    # The turns' texts, for ideas that would index something new at append (answer kinds).
    texts: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Question:
    category: int
    evidence: list[int]
    terms: list[str]
    vector: np.ndarray
    new: list[assembly.TurnCost]
    # The role of the one participant the question names, from the data's
    # speaker names; None when it names neither or both.
    named_role: int | None
    # Its nameless form, embedded (relevance.nameless_text), as the service scores it.
    nameless: relevance.NamelessQuery | None
    # As asked: the service reads whether it is in the first person from it
    # (relevance.asked_in_first_person).
    text: str


def speakers(path: pathlib.Path) -> list[str]:
    """The conversation's speaker names, the first one (the user) first."""
    raw = json.loads(path.read_text())
    found: list[str] = []
    for key in sorted(
        (k for k in raw if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1])
    ):
        for turn in raw[key]:
            if turn["speaker"] not in found:
                found.append(turn["speaker"])
    return found


def named_role(question: str, names: list[str]) -> int | None:
    named = [i for i, name in enumerate(names) if name.split()[0].lower() in question.lower()]
    if len(named) != 1:
        return None
    return common_pb2.ROLE_USER if named[0] == 0 else common_pb2.ROLE_ASSISTANT


def session_costs(turns: list[common_pb2.Message]) -> assembly.SessionCosts:
    """The turns' counts as the service stores them at append: framed as
    messages, and as transcript lines for packing."""
    counts = asyncio.run(counter().count(turns))
    lines = asyncio.run(counter().count_lines(turns))
    return assembly.SessionCosts.of(
        [assembly.TurnCost(m.role, n, line) for m, n, line in zip(turns, counts, lines, strict=True)]
    )


def question_of(
    q: dict, vector: np.ndarray, nameless: relevance.NamelessQuery | None, role: int | None = None
) -> Question:
    """A data set's question (``question``, ``category``, ``evidence`` as
    turn positions) as the new user message of an assembly."""
    message = common_pb2.Message(role=common_pb2.ROLE_USER, content=q["question"])
    return Question(
        q["category"],
        sorted(q["evidence"]),
        list(relevance.index_terms(q["question"])),
        vector,
        [assembly.TurnCost(message.role, asyncio.run(counter().count([message]))[0])],
        role,
        nameless,
        q["question"],
    )


def prepared() -> dict[str, Conversation]:
    paths = {p.stem: p for p in sorted(bench.DATA.glob("*.json"))}
    conversations = {name: bench.load_conversation(path) for name, path in paths.items()}
    vectors = uvloop.run(bench.cached_vectors(conversations))
    nameless = bench.nameless_vectors(conversations)
    out = {}
    for name, (turns, _, questions) in conversations.items():
        postings, lengths, rows = bench.offline_index(turns, vectors[name])
        names = speakers(paths[name])
        without_names = bench.nameless_queries(questions, nameless[name])
        items = [
            question_of(q, vector, nameless_query, named_role(q["question"], names))
            for q, vector, nameless_query in zip(
                questions, vectors[name][len(turns) :], without_names, strict=True
            )
        ]
        terms = [relevance.index_terms(m.content) for m in turns]
        texts = [m.content for m in turns]
        out[name] = Conversation(session_costs(turns), postings, lengths, rows, terms, items, texts)
    return out


def service_scores(
    c: Conversation, q: Question, weights=relevance.DEFAULT_WEIGHTS, rows=None, query=None, nameless=None
):
    """The service's ranking (``nameless``: with the question's nameless form
    or not; None: as the service is configured, context.embed_nameless_question)."""
    if nameless is None:
        nameless = NAMELESS
    return relevance.hybrid_scores(
        q.terms,
        c.postings,
        c.lengths,
        c.rows if rows is None else rows,
        q.vector if query is None else query,
        weights,
        c.costs.roles,
        q.nameless if nameless else None,
        q.text,
    ).scores


def plan(c: Conversation, q: Question, scores: np.ndarray, budget: int, floor: int = FLOOR) -> assembly.Plan:
    return assembly.plan(
        c.costs,
        q.new,
        budget,
        counter().template_tokens,
        relevance=scores,
        recency_floor=floor,
        transcript_tokens=counter().transcript_tokens,
    )


def all_kept(chosen: assembly.Plan, evidence: list[int]) -> bool:
    return all(chosen.reasons[i] for i in evidence)


def ranks(scores: np.ndarray) -> np.ndarray:
    """Each turn's place in the plan's order (0: first), ties to the newer."""
    order = np.lexsort((-np.arange(len(scores)), -scores))
    place = np.empty(len(scores), dtype=np.int64)
    place[order] = np.arange(len(scores))
    return place


def evidence_first(scores: np.ndarray, evidence: list[int]) -> np.ndarray:
    """The ranking with the evidence turns moved above every other turn (the oracle)."""
    ranked = scores - scores.min() + 1.0
    ranked[evidence] += ranked.max() + 1.0
    return ranked


def analysis(data: dict[str, Conversation]) -> list[str]:
    out = []
    rows = []
    for c in data.values():
        for q in c.questions:
            scores = service_scores(c, q)
            place = ranks(scores)
            row = {"category": q.category, "evidence": min(len(q.evidence), 5)}
            row["worst"] = int(max(place[i] for i in q.evidence))
            for budget in (1024, 2048):
                chosen = plan(c, q, scores, budget)
                reasons = np.array(chosen.reasons)
                kept = reasons > 0
                row[budget] = bool(kept[q.evidence].all())
                floor = reasons == pb.INCLUSION_REASON_RECENCY
                row[budget, "floor evidence"] = bool(floor[q.evidence].any())
                row[budget, "turns"] = int(kept.sum())
                line_or_message = np.where(
                    np.isin(np.arange(len(reasons)), chosen.packed), c.costs.lines, c.costs.tokens
                )
                row[budget, "floor"] = int(c.costs.tokens[floor].sum())
                row[budget, "relevant"] = int(line_or_message[kept & ~floor].sum())
                row[budget, "frame"] = chosen.transcript_tokens
                parts = ("floor", "relevant", "frame")
                row[budget, "fixed"] = chosen.prompt_tokens - sum(row[budget, k] for k in parts)
                row[budget, "unused"] = budget - chosen.prompt_tokens
                oracle = plan(c, q, evidence_first(scores, q.evidence), budget)
                row[budget, "oracle"] = all_kept(oracle, q.evidence)
            rows.append(row)
    out.append(f"{len(rows)} questions, the service's ranking (recency floor {FLOOR} turns)")
    for budget in (1024, 2048):
        out += ["", f"## {budget} tokens: {100 * np.mean([r[budget] for r in rows]):.1f}% kept", ""]
        out.append("| category | questions | kept | kept / questions by evidence turns: 1, 2, 3, 4, 5+ |")
        out.append("|---|---|---|---|")
        for category, label in CATEGORIES.items():
            mine = [r for r in rows if r["category"] == category]
            by_count = " ".join(
                f"{sum(r[budget] for r in with_k)}/{len(with_k)}"
                for with_k in ([r for r in mine if r["evidence"] == k] for k in range(1, 6))
            )
            out.append(
                f"| {label} | {len(mine)} | {100 * np.mean([r[budget] for r in mine]):.1f}% | {by_count} |"
            )
        parts = ("fixed", "floor", "frame", "relevant", "unused")
        means = ", ".join(f"{p} {np.mean([r[budget, p] for r in rows]):.0f}" for p in parts)
        out += [
            "",
            f"Tokens, mean a question ({means}: 'fixed' is the template and the question);"
            f" turns kept, median {np.median([r[budget, 'turns'] for r in rows]):.0f}.",
            "Questions with an evidence turn in the recency floor:"
            f" {sum(r[budget, 'floor evidence'] for r in rows)}.",
        ]
        misses = [r["worst"] for r in rows if not r[budget]]
        quartiles = np.percentile(misses, [25, 50, 75]).astype(int).tolist()
        oracle = 100 * np.mean([r[budget, "oracle"] for r in rows])
        out += [
            f"Misses: {len(misses)}; their worst evidence turn ranks {quartiles} (quartiles, 0 = first).",
            f"Ceiling, the evidence ranked first: {oracle:.1f}% kept.",
        ]
    out += ["", "Share of questions whose evidence is all within the K best-ranked turns:", ""]
    out.append("| K | " + " | ".join(CATEGORIES.values()) + " | all |")
    out.append("|---|---|---|---|---|")
    for k in (10, 20, 35, 50, 70, 100, 200):
        cells = [100 * np.mean([r["worst"] < k for r in rows if r["category"] == c]) for c in CATEGORIES]
        cells.append(100 * np.mean([r["worst"] < k for r in rows]))
        out.append(f"| {k} | " + " | ".join(f"{v:.1f}%" for v in cells) + " |")
    out += ["", "Ceiling, the named person's turns raised (speaker names from the data):", ""]
    for lift in (0.2, 0.8):
        out.append(f"+{lift}: " + retention_row(kept_by_conversation(data, role_lift(lift))))
    return out


# --- ideas: each a ranking of (conversation, question), or one with the plan's floor -------------


def kept_by_conversation(
    data: dict[str, Conversation], rank, floor: int = FLOOR
) -> dict[str, dict[int, list[bool]]]:
    result = {}
    for name, c in data.items():
        kept = collections.defaultdict(list)
        for q in c.questions:
            scores = rank(c, q)
            for budget in bench.BUDGETS:
                kept[budget].append(all_kept(plan(c, q, scores, budget, floor), q.evidence))
        result[name] = kept
    return result


def shares(kept: dict[str, dict[int, list[bool]]], names: list[str]) -> list[float]:
    return [100 * np.mean([k for n in names for k in kept[n][b]]) for b in bench.BUDGETS]


def retention_row(kept, base=None) -> str:
    """All ten, the six, the four, at 1k / 2k / 4k / 8k (differences from ``base`` if given)."""
    names = sorted(kept)
    cells = []
    for part in (names, names[:TUNING], names[TUNING:]):
        values = shares(kept, part)
        if base is not None:
            values = [v - b for v, b in zip(values, shares(base, part), strict=True)]
            cells.append(" / ".join(f"{v:+.1f}" for v in values))
        else:
            cells.append(" / ".join(f"{v:.1f}" for v in values))
    return " | ".join(cells)


def spans_after(extra, weights: relevance.Weights = relevance.DEFAULT_WEIGHTS):
    """The ranking by ``weights`` before its stretches, plus ``extra`` (an
    array per turn), then the stretches: how a new signal would join the
    hybrid."""

    def rank(c: Conversation, q: Question) -> np.ndarray:
        score = service_scores(c, q, dataclasses.replace(weights, span=0.0))
        return relevance.with_spans(score + extra(c, q, score), weights)

    return rank


def role_lift(lift: float):
    return spans_after(lambda c, q, s: lift * (c.costs.roles == q.named_role) if q.named_role else 0.0)


def length_prior(weight: float):
    """Turns with more index terms say more: a query-independent prior."""
    return spans_after(lambda c, q, s: weight * relevance.scaled(np.log1p(c.lengths)))


def keyword_feedback(terms: int, weight: float, seeds: int = 10):
    """RM3-like: the words most of the best turns share (two of them at
    least), by idf, as a second BM25 query."""

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray:
        best = np.argsort(-score)[:seeds]
        used = collections.Counter(
            t for i in best for t in c.terms[i] if not t.startswith(relevance.ENTITY_MARK)
        )
        n = len(c.lengths)
        ranked = sorted(
            (
                (k * np.log(1 + n / (len(c.postings[t]) + 0.5)), t)
                for t, k in used.items()
                if k >= 2 and t not in q.terms
            ),
            reverse=True,
        )
        return weight * relevance.scaled(
            relevance.bm25([t for _, t in ranked[:terms]], c.postings, c.lengths)
        )

    return spans_after(extra)


def similar_to_best(seeds: int, weight: float):
    """Turns whose vectors are close to one of the best turns' (each seed's
    similarity to itself left out): other statements of the same kind
    elsewhere in the conversation."""

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray:
        best = np.argpartition(-score, seeds - 1)[:seeds]
        similarity = c.rows @ c.rows[best].T
        similarity[best, np.arange(seeds)] = 0.0
        return weight * relevance.scaled(similarity.max(axis=1))

    return spans_after(extra)


def stretch_vector(radius: int, weight: float):
    """The question's cosine with the mean vector of a turn's stretch."""
    cache: dict[int, np.ndarray] = {}

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray:
        if id(c) not in cache:
            sums = np.cumsum(np.vstack([np.zeros((1, c.rows.shape[1])), c.rows]), axis=0)
            n = len(c.rows)
            low = np.clip(np.arange(n) - radius, 0, n)
            high = np.clip(np.arange(n) + radius + 1, 0, n)
            cache[id(c)] = relevance.unit_rows(sums[high] - sums[low])
        return weight * relevance.scaled(cache[id(c)] @ relevance.unit(q.vector))

    return spans_after(extra)


def role_of_best(seeds: int, weight: float, share: float):
    """The role most of the best turns are by, raised: the named person's
    role inferred from the scores."""

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray | float:
        best = np.argpartition(-score, seeds - 1)[:seeds]
        roles, counts = np.unique(c.costs.roles[best], return_counts=True)
        if counts.max() < share * seeds:
            return 0.0
        return weight * (c.costs.roles == roles[counts.argmax()])

    return spans_after(extra)


def minus_session_mean(alpha: float, rows_too: bool):
    """The session's mean turn vector (what every turn of the chat shares)
    taken off the question's vector, and with ``rows_too`` off the turns'."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def rank(c: Conversation, q: Question) -> np.ndarray:
        if id(c) not in cache:
            mean = c.rows.mean(axis=0)
            cache[id(c)] = (relevance.unit_rows(c.rows - alpha * mean) if rows_too else c.rows, mean)
        rows, mean = cache[id(c)]
        return service_scores(c, q, rows=rows, query=relevance.unit(q.vector) - alpha * mean)

    return rank


def with_weights(**changes):
    """The service's ranking with ``changes`` to its weights."""
    weights = dataclasses.replace(relevance.DEFAULT_WEIGHTS, **changes)
    return lambda c, q: service_scores(c, q, weights)


def content_words(question: str, drop_capitalized: bool) -> str:
    """The question's words less stop words (and, with ``drop_capitalized``,
    less the capitalized ones, mostly names), in order: what a turn would
    say, without the asking ("What pets did Vanessa have?" -> "pets Vanessa")."""
    words = [
        w
        for w in relevance.INDEX_WORD.findall(question)
        if w.lower().replace("’", "'") not in relevance.STOP_WORDS
    ]
    if drop_capitalized:
        return " ".join(w for w in words if not w[0].isupper()) or " ".join(words)
    return " ".join(words)


def question_content_texts(turns, questions) -> list[str]:
    """What ``embedded_as`` embeds: every question's content words, then the same less capitals."""
    return [content_words(q["question"], drop) for drop in (False, True) for q in questions]


def embedded_as(vectors: dict[str, np.ndarray], data: dict[str, Conversation], variant: int):
    """The service's ranking with the question's vector replaced by that of
    ``question_content_texts``'s ``variant``-th text."""
    by_question = {}
    for name, c in data.items():
        count = len(c.questions)
        for i, q in enumerate(c.questions):
            by_question[id(q)] = vectors[name][variant * count + i]
    # In place of the question's vector: an alternative to the nameless form, not on top of it.
    return lambda c, q: service_scores(c, q, query=by_question[id(q)], nameless=False)


# --- selection ideas (2026-12-02): fuse ranks, or choose turns by what the chosen ones cover ---
# Each is measured on REALTALK here and on BEAM-100k by ``context_beam.py --selection-ideas``
# (bench/README.md, "Names the conversation never uses", the table of what was tried).

# How far down the service's ranking the greedy selections below reorder: more than 8k's
# prompt holds (about 290 transcript lines of 28 tokens); the turns below keep their order.
GREEDY_POOL = 400


def pool_of(score: np.ndarray) -> np.ndarray:
    """The :data:`GREEDY_POOL` best turns in the plan's order (ties to the newer)."""
    return np.lexsort((-np.arange(len(score)), -score))[:GREEDY_POOL]


def ranked_as(score: np.ndarray, chosen: list[int]) -> np.ndarray:
    """Scores that put the ``chosen`` turns first, in that order, above
    every other turn, which keeps its place in ``score``."""
    ranked = score - score.min() + 1.0
    ranked[chosen] = ranked.max() + np.arange(len(chosen), 0, -1)
    return ranked


def rank_fused(values: np.ndarray, k: int, every_turn: bool) -> np.ndarray:
    """Reciprocal-rank contributions, 1 for the first turn, (k + 1) / (k +
    rank) below (ties share the better rank): the same top as a
    :func:`relevance.scaled` signal, so the weights and the stretches keep
    their meaning. Turns a lexical signal does not match (0) are not in
    its list and get nothing; ``every_turn`` for the dense one."""
    listed = values if every_turn else values[values > 0]
    if not len(listed):
        return np.zeros(len(values))
    descending = np.sort(listed)[::-1]
    rank = np.searchsorted(-descending, -values, side="left") + 1.0
    fused = (k + 1) / (k + rank)
    return fused if every_turn else np.where(values > 0, fused, 0.0)


def reciprocal_rank_fusion(k: int, weights: relevance.Weights = relevance.DEFAULT_WEIGHTS):
    """``relevance.hybrid_scores`` step for step (participant names out of
    the query, feedback, neighbours, the first-person lift, stretches), but
    each of its three signals (dense cosine, keyword BM25, entity BM25)
    enters the weighted sum as a reciprocal rank (:func:`rank_fused`) in
    place of its share of the session's best (:func:`relevance.scaled`):
    ranks ignore how far ahead the best turns are."""

    def rank(c: Conversation, q: Question) -> np.ndarray:
        roles = c.costs.roles
        # The service's own steps, its private helpers, so that only the fusion differs.
        names = relevance._participant_name_turns(q.terms, c.postings, roles, weights)
        spelled = names.keys() | {relevance.stem(name[len(relevance.ENTITY_MARK) :]) for name in names}
        terms = [t for t in q.terms if t not in spelled]
        keywords = [t for t in terms if not t.startswith(relevance.ENTITY_MARK)]
        entities = [t for t in terms if t.startswith(relevance.ENTITY_MARK)]
        lexical = weights.keyword * rank_fused(relevance.bm25(keywords, c.postings, c.lengths), k, False)
        lexical += weights.entity * rank_fused(relevance.bm25(entities, c.postings, c.lengths), k, False)
        query = relevance.unit(q.vector)
        if NAMELESS and relevance._names_only_pull_away(q.nameless, c.postings, names):
            nameless = relevance.unit(q.nameless.vector)
            query = relevance.unit((1 - weights.nameless) * query + weights.nameless * nameless)

        def fused(query: np.ndarray) -> np.ndarray:
            dense = weights.dense * rank_fused(c.rows @ query, k, True)
            return relevance._with_neighbours(lexical + dense, weights)

        score = fused(query)
        seeds = score.copy()
        for turns in names.values():
            seeds[turns] = -np.inf
        feedback = min(weights.feedback_turns, len(seeds))
        best = np.argpartition(-seeds, feedback - 1)[:feedback]
        score = fused(query + weights.feedback_weight * c.rows[best].mean(axis=0))
        asker = relevance._first_person_lift(q.text, roles, len(score), weights, True)
        return relevance.with_spans(score + asker, weights)

    return rank


def redundancy_penalty(penalty: float):
    """MMR-like selection over the service's ranking: walk it greedily,
    each next turn the one whose score less ``penalty`` x its highest
    cosine with a turn already chosen is best, so that near-duplicates of
    a chosen turn do not take a small budget's room."""

    def rank(c: Conversation, q: Question) -> np.ndarray:
        score = service_scores(c, q)
        pool = pool_of(score)
        similarity = c.rows[pool] @ c.rows[pool].T
        closest = np.zeros(len(pool))  # a turn's highest cosine with the chosen ones (0 at first)
        open_ = np.ones(len(pool), dtype=bool)
        chosen = []
        for _ in range(len(pool)):
            value = np.where(open_, score[pool] - penalty * closest, -np.inf)
            best = int(np.argmax(value))
            chosen.append(int(pool[best]))
            open_[best] = False
            closest = np.maximum(closest, similarity[best])
        return ranked_as(score, chosen)

    return rank


def query_term_coverage(
    decay: float, with_entities: bool, weights: relevance.Weights = relevance.DEFAULT_WEIGHTS
):
    """Greedy selection over the service's ranking by what the chosen turns
    cover: a multi-hop question's parts are in different turns, so each
    time a chosen turn matches one of the question's keywords (and with
    ``with_entities`` its entities), that term's BM25 counts ``decay``
    times as much for every turn still to choose, and turns matching the
    parts no chosen turn has matched yet move up. Only the direct
    keyword / entity signal changes, scaled as the service scales it; the
    rest of a turn's score (dense, feedback, neighbours, stretches) stays."""

    def rank(c: Conversation, q: Question) -> np.ndarray:
        score = service_scores(c, q, weights)
        names = relevance.participant_names(q.terms, c.postings, c.costs.roles, weights)
        spelled = names | {relevance.stem(name[len(relevance.ENTITY_MARK) :]) for name in names}
        groups = [(weights.keyword, [t for t in q.terms if not t.startswith(relevance.ENTITY_MARK)])]
        if with_entities:
            groups.append((weights.entity, [t for t in q.terms if t.startswith(relevance.ENTITY_MARK)]))
        pool = pool_of(score)
        # Per group: its weight, its terms' BM25 over the pool (turns x terms), and its scale.
        signals = []
        for weight, terms in groups:
            terms = sorted({t for t in terms if t not in spelled and t in c.postings})
            if not terms:
                continue
            per_term = np.stack([relevance.bm25([t], c.postings, c.lengths, weights) for t in terms], axis=1)
            total = per_term.sum(axis=1)
            floor, top = float(np.median(total)), float(total.max())
            if top > floor:
                signals.append((weight, per_term[pool], floor, top))
        if not signals:
            return score
        factors = [np.ones(s[1].shape[1]) for s in signals]

        def lexical(factors) -> np.ndarray:
            return sum(
                w * np.clip((terms @ f - floor) / (top - floor), 0.0, 1.0)
                for (w, terms, floor, top), f in zip(signals, factors, strict=True)
            )

        undecayed = lexical(factors)
        open_ = np.ones(len(pool), dtype=bool)
        chosen = []
        for _ in range(len(pool)):
            value = np.where(open_, score[pool] - undecayed + lexical(factors), -np.inf)
            best = int(np.argmax(value))
            chosen.append(int(pool[best]))
            open_[best] = False
            for (_, terms, _, _), f in zip(signals, factors, strict=True):
                f[terms[best] > 0] *= decay
        return ranked_as(score, chosen)

    return rank


SELECTION_IDEAS = (
    *(
        (
            f"reciprocal rank fusion of dense, keyword and entity ranks, k {k}, then the service's steps",
            reciprocal_rank_fusion(k),
        )
        for k in (60, 10)
    ),
    *(
        (
            f"redundancy penalty at selection, {penalty} x the highest cosine with a chosen turn",
            redundancy_penalty(penalty),
        )
        for penalty in (0.1, 0.3)
    ),
    *(
        (
            f"query-term coverage: a {'keyword or entity' if entities else 'keyword'}'s BM25 x{decay}"
            " per chosen turn matching it",
            query_term_coverage(decay, entities),
        )
        for decay, entities in ((0.5, False), (0.5, True), (0.25, True))
    ),
)


# --- term expansion (2026-12-02, issue 8): a question's words to the session's own words ---------
# "What are Kate's hobbies?" has evidence turns that say "skiing", "a cooking class": BM25 cannot
# match them and the sentence vectors do so weakly. Each of the session's keyword terms gets a
# word vector (minilm on the word alone); a question's content words are matched to the session's
# terms closest to them, and a turn gains by how close its terms come (:func:`term_expansion`).

# Question words and session terms shorter than this are not expanded (mostly fragments and stems
# of stop-like words).
EXPANSION_MIN_CHARS = 3


@dataclasses.dataclass
class SessionTerms:
    """A session's keyword terms (no entities, no numbers), each with its
    most frequent written form (lowercase, as a word of the turns) and the
    turns that have it."""

    terms: list[str]
    written: list[str]
    turns: list[np.ndarray]


def session_terms(c: Conversation, texts: list[str]) -> SessionTerms:
    forms: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for text in texts:
        for _, word in relevance._words(text.replace("’", "'")):
            lower = word.lower()
            if lower not in relevance.STOP_WORDS and not lower[0].isdigit():
                forms[relevance.stem(lower)][lower] += 1
    terms = sorted(
        t
        for t in c.postings
        if not t.startswith(relevance.ENTITY_MARK)
        and not t[0].isdigit()
        and len(t) >= EXPANSION_MIN_CHARS
        and t in forms
    )
    return SessionTerms(
        terms,
        [forms[t].most_common(1)[0][0] for t in terms],
        [(c.postings[t] >> relevance.TF_BITS).astype(np.int64) for t in terms],
    )


def question_words(c: Conversation, q: Question, head_only: bool) -> list[tuple[str, str]]:
    """The question's content words as (term, written lowercase): not stop
    words, numbers, participant names or words it capitalizes (names), at
    least :data:`EXPANSION_MIN_CHARS` long; with ``head_only``, the first
    one alone ("What are Kate's hobbies?" -> hobbies)."""
    names = relevance.participant_names(q.terms, c.postings, c.costs.roles)
    spelled = {relevance.stem(n[len(relevance.ENTITY_MARK) :]) for n in names}
    words, seen = [], set()
    for written, word in relevance._words(q.text.replace("’", "'")):
        lower = word.lower()
        term = relevance.stem(lower)
        if (
            lower in relevance.STOP_WORDS
            or lower[0].isdigit()
            or written[0].isupper()
            or len(term) < EXPANSION_MIN_CHARS
            or term in spelled
            or term in seen
        ):
            continue
        seen.add(term)
        words.append((term, lower))
    return words[:1] if head_only else words


_ASKS_WHICH = re.compile(r"\s*(?:what|which)\b", re.IGNORECASE)


def asks_for_instances(question: str, words: list[tuple[str, str]]) -> bool:
    """Whether the question asks "what / which ..." and its first content
    word is a plural ("What are Kate's hobbies?", "Which countries has she
    visited?"): an answer that names instances of it."""
    first = words[0][1] if words else ""
    return bool(_ASKS_WHICH.match(question)) and first.endswith("s") and not first.endswith("ss")


def cached_word_vectors(cache_name: str):
    """An embedder of words (``meshgate.minilm`` on each word alone) whose
    vectors are kept under bench/.cache/ in a file named by ``cache_name``
    and the words' digest: run once, then read back."""

    def embed(words: list[str]) -> np.ndarray:
        digest = hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]
        path = bench.CACHE / f"{cache_name}-{digest}.npz"
        if path.exists():
            return np.load(path)["vectors"]
        from meshgate.minilm import MiniLM

        model = MiniLM(threads=2)
        vectors = np.vstack([model.embed(words[i : i + 256]) for i in range(0, len(words), 256)])
        bench.CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, vectors=vectors)
        return vectors

    return embed


class TermVectors:
    """Word vectors of every session's terms, stemmed and as written, and of
    every question's content words, from ``embed`` (words in, one row
    each out: :func:`cached_word_vectors`), called once with them all."""

    def __init__(self, sessions: list[tuple[Conversation, list[str]]], embed) -> None:
        self.sessions = {id(c): session_terms(c, texts) for c, texts in sessions}
        words = set()
        for terms in self.sessions.values():
            words.update(terms.terms, terms.written)
        for c, _ in sessions:
            for q in c.questions:
                for term, written in question_words(c, q, False):
                    words.update((term, written))
        ordered = sorted(words)
        self.index = {w: i for i, w in enumerate(ordered)}
        self.vectors = relevance.unit_rows(embed(ordered))
        self._matrices: dict[tuple[int, bool, bool], tuple[np.ndarray, np.ndarray]] = {}

    def of(self, words: list[str]) -> np.ndarray:
        return self.vectors[[self.index[w] for w in words]]

    def matrix(self, c: Conversation, written: bool, centred: bool) -> tuple[np.ndarray, np.ndarray]:
        """The session's term vectors (as written or stemmed) and the mean
        taken off them (zero unless ``centred``: what every word vector of
        the session shares, which puts unrelated words at 0.2-0.4 from each
        other)."""
        key = (id(c), written, centred)
        if key not in self._matrices:
            terms = self.sessions[id(c)]
            rows = self.of(terms.written if written else terms.terms)
            mean = rows.mean(axis=0) if centred else np.zeros(rows.shape[1], np.float32)
            self._matrices[key] = (relevance.unit_rows(rows - mean), mean)
        return self._matrices[key]


def term_expansion(
    space: TermVectors,
    weight: float,
    combine: str = "max",
    written: bool = True,
    top: int = 10,
    floor: float = 0.5,
    centred: bool = False,
    head_only: bool = False,
    instance_questions: bool = False,
):
    """The service's ranking plus a signal of the session's terms closest to
    the question's content words (:func:`question_words`) by word vector:
    per question word, its ``top`` nearest terms of the session at cosine
    ``floor`` or more (itself left out: BM25 has it), and per turn
    ``combine``: "max", the highest cosine of any such term it has;
    "sum", per question word the highest, summed over the words; "bm25",
    each such term's BM25 of the turn times its cosine, summed. Scaled as
    the other signals (:func:`relevance.scaled`) and weighted, before the
    stretches (:func:`spans_after`). With ``instance_questions``, only
    questions that ask for instances of a plural noun (:func:`asks_for_instances`)."""

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray | float:
        words = question_words(c, q, head_only)
        if not words or (instance_questions and not asks_for_instances(q.text, words)):
            return 0.0
        terms = space.sessions[id(c)]
        rows, mean = space.matrix(c, written, centred)
        asked = relevance.unit_rows(space.of([w if written else t for t, w in words]) - mean)
        similarity = asked @ rows.T
        n = len(c.lengths)
        per_word = np.zeros((len(words), n))
        for i, (term, _) in enumerate(words):
            near = np.argsort(-similarity[i])[: top + 1]
            near = [j for j in near if similarity[i, j] >= floor and terms.terms[j] != term][:top]
            for j in near:
                if combine == "bm25":
                    per_word[i] += similarity[i, j] * relevance.bm25([terms.terms[j]], c.postings, c.lengths)
                else:
                    turns = terms.turns[j][terms.turns[j] < n]
                    per_word[i, turns] = np.maximum(per_word[i, turns], similarity[i, j])
        value = per_word.max(axis=0) if combine == "max" else per_word.sum(axis=0)
        return weight * relevance.scaled(value)

    return spans_after(extra)


def expansion_ideas(space: TermVectors) -> tuple:
    """(label, ranking) of :func:`term_expansion`'s variants: a handful, each at three weights."""
    variants = (
        ("max, as written, top 10, cosine 0.5+", {}),
        ("sum over question words, as written, top 10, 0.5+", {"combine": "sum"}),
        ("BM25 x cosine, as written, top 10, 0.5+", {"combine": "bm25"}),
        ("max, stems, top 10, 0.5+", {"written": False}),
        ("max, as written, centred on the session's mean, top 10, 0.4+", {"centred": True, "floor": 0.4}),
        ("max, as written, the question's first content word only, top 10, 0.5+", {"head_only": True}),
        (
            "BM25 x cosine, first content word only, 'what / which' + plural questions only",
            {"combine": "bm25", "head_only": True, "instance_questions": True},
        ),
    )
    return tuple(
        (f"term expansion: {label}, weight {weight}", term_expansion(space, weight, **options))
        for label, options in variants
        for weight in (0.1, 0.3, 1.0)
    )


# --- answer kinds and entity chaining (2026-12-02, twelfth session) ------------------------------
# Two ideas for the misses that no earlier row measured, and BM25's k1 (its b was tried, bench/
# README.md "Participant names are not topics"); none gains (bench/README.md, "Answer kinds, entity
# chaining, BM25's k1"). (1) The question's form says
# what kind of thing answers it ("where", "which cities" -> a place; "what movies" -> a title;
# "when", "how long" -> a time): a turn that holds such a thing is likelier to answer. Each turn's
# kinds (:func:`answer_kinds`) would be computed at append from its text. (2) Multi-hop chaining:
# the names the best turns mention, other than the question's, lead to the turns that say more
# about them, if those also match the question's words (:func:`entity_chaining`).

# Question forms and the kind of answer they ask for. A "what / which" question is read by its
# first word after "what / which" (its head noun, mostly: "What movies ...", "Which country ...").
_PLACE_HEAD_LIST = """
city cities country countries place places destination destinations location locations state states
restaurant restaurants bar bars gallery galleries museum museums town towns
"""
_PLACE_HEADS = frozenset(_PLACE_HEAD_LIST.split())
_TITLE_HEAD_LIST = """
movie movies film films book books tv show shows series song songs band bands game games anime sitcom
famous company companies youtube club clubs brand brands artist artists
"""
_TITLE_HEADS = frozenset(_TITLE_HEAD_LIST.split())
_ASKS_WHAT_OR_WHICH = re.compile(r"\s*(?:what|which)\s+(\w+)", re.IGNORECASE)
_ASKS_WHEN = re.compile(
    r"\s*(?:when\b|since when\b|how long\b|how often\b|what (?:time|year|date|day|month)\b)", re.I
)
_ASKS_WHERE = re.compile(r"\s*(?:where|in which|to which|from which)\b", re.IGNORECASE)


def asked_kind(question: str) -> str | None:
    """The kind of thing the question's form asks for: "place", "title" or
    "time"; None for the rest ("what are ...", "how does ...", yes / no)."""
    if _ASKS_WHEN.match(question):
        return "time"
    if _ASKS_WHERE.match(question):
        return "place"
    head = _ASKS_WHAT_OR_WHICH.match(question)
    if head:
        word = head.group(1).lower()
        if word in _PLACE_HEADS:
            return "place"
        if word in _TITLE_HEADS:
            return "title"
    return None


# A sentence starts after its end mark (or the turn's start): its first word's capital says nothing.
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+|\n\s*)$")
_QUOTED = re.compile(r"[\"“][^\"”]{2,60}[\"”]")
_DURATION_UNIT_LIST = (
    "second seconds minute minutes hour hours day days week weeks month months year years ago"
)
_DURATION_UNITS = frozenset(_DURATION_UNIT_LIST.split())
_TIME_WORDS = relevance._TIME_WORDS  # months, weekdays, today, yesterday, weekend, ...


def answer_kinds(text: str) -> dict[str, int]:
    """How many things of each kind a turn holds: "name" (a capitalized
    word not starting a sentence, not "I" or a time word; or a quoted
    title), for place and title questions alike, as a turn cannot tell a
    city from a film by capitals; "time" (a number, a month, weekday or
    relative day, a duration unit)."""
    names = len(_QUOTED.findall(text))
    times = 0
    for match in relevance.INDEX_WORD.finditer(text.replace("’", "'")):
        word = match.group()
        lower = relevance._POSSESSIVE.sub("", word).lower()
        if word[0].isdigit() or lower in _TIME_WORDS or lower in _DURATION_UNITS:
            times += 1
        elif (
            word[0].isupper()
            and lower not in relevance.STOP_WORDS
            and not _SENTENCE_START.search(text[: match.start()])
        ):
            names += 1
    return {"name": names, "time": times}


# The turn kind that answers each question kind.
_ANSWERED_BY = {"place": "name", "title": "name", "time": "time"}


def answer_kind_signal(weight: float, counted: bool = False, kinds=("place", "title", "time")):
    """The service's ranking plus ``weight`` for each turn holding a thing
    of the kind the question asks for (:func:`asked_kind`, of ``kinds``):
    1 if it holds one (or, ``counted``, the number of them scaled as the
    other signals), before the stretches; other questions unchanged."""
    cache: dict[int, dict[str, np.ndarray]] = {}

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray | float:
        kind = asked_kind(q.text)
        if kind not in kinds:
            return 0.0
        if id(c) not in cache:
            per_turn = [answer_kinds(t) for t in c.texts]
            cache[id(c)] = {k: np.array([p[k] for p in per_turn], np.float64) for k in ("name", "time")}
        held = cache[id(c)][_ANSWERED_BY[kind]]
        return weight * (relevance.scaled(held) if counted else (held > 0))

    return spans_after(extra)


def entity_chaining(weight: float, seeds: int = 10, with_keywords: bool = False):
    """Multi-hop by the names the best turns mention: the entities (and,
    ``with_keywords``, the keywords) of the service's ``seeds`` best turns
    (before the stretches) that the question does not have, and that few
    turns use (at most 2% of the session's, 3 at least: a topic, not a
    greeting), make a second BM25 query; a turn gains ``weight`` x its
    share of that query's best only if it also matches one of the
    question's own keywords or entities: a chain from the question through
    a found turn, not a drift toward the found turns' topic (the keyword
    feedback row's)."""

    def extra(c: Conversation, q: Question, score: np.ndarray) -> np.ndarray | float:
        n = len(c.lengths)
        names = relevance.participant_names(q.terms, c.postings, c.costs.roles)
        spelled = names | {relevance.stem(t[len(relevance.ENTITY_MARK) :]) for t in names}
        asked = [t for t in q.terms if t not in spelled]
        matches_question = relevance.bm25(asked, c.postings, c.lengths) > 0
        best = np.argpartition(-score, seeds - 1)[:seeds]
        rare = max(3, int(0.02 * n))
        bridges = set()
        for i in best:
            for term in c.terms[i]:
                entity = term.startswith(relevance.ENTITY_MARK)
                word = term[len(relevance.ENTITY_MARK) :] if entity else term
                if (
                    (entity or with_keywords)
                    and term not in q.terms
                    and term not in spelled
                    and not word[:1].isdigit()
                    and word not in _TIME_WORDS
                    and len(c.postings.get(term, ())) <= rare
                ):
                    bridges.add(term)
        if not bridges:
            return 0.0
        chained = relevance.bm25(bridges, c.postings, c.lengths) * matches_question
        return weight * relevance.scaled(chained)

    return spans_after(extra)


TWELFTH_SESSION_IDEAS = (
    *(
        (f"answer kind: a turn holding what the question's form asks for, +{w}", answer_kind_signal(w))
        for w in (0.1, 0.2, 0.3)
    ),
    *(
        (
            f"entity chaining: the 10 best turns' rare entities, turns matching the question too, {w}",
            entity_chaining(w),
        )
        for w in (0.2, 0.5)
    ),
    (
        "entity chaining: the 10 best turns' rare entities and keywords, turns matching the question"
        " too, 0.2",
        entity_chaining(0.2, with_keywords=True),
    ),
    *((f"BM25 k1 {k1} (the service's 1.2)", with_weights(bm25_k1=k1)) for k1 in (0.6, 2.0)),
)


def ideas(data: dict[str, Conversation]) -> list[str]:
    base = kept_by_conversation(data, service_scores)
    out = [
        "Share of questions kept, the service's ranking: all ten | the six | the four, 1k / 2k / 4k / 8k:",
        retention_row(base),
        "",
        "| idea | all ten | the six (tuning) | the four (held out) |",
        "|---|---|---|---|",
    ]

    def row(label: str, kept) -> None:
        out.append(f"| {label} | " + retention_row(kept, base) + " |")

    row(
        ("without" if NAMELESS else "with")
        + " the question's nameless form (context.embed_nameless_question)",
        kept_by_conversation(data, lambda c, q: service_scores(c, q, nameless=not NAMELESS)),
    )
    for floor in (0, 1):
        row(f"recency floor {floor} turns", kept_by_conversation(data, service_scores, floor))
    for weight in (0.1, 0.2):
        row(f"length prior {weight}", kept_by_conversation(data, length_prior(weight)))
    for terms, weight in ((5, 0.3), (10, 0.3), (10, 0.6)):
        row(
            f"keyword feedback, {terms} terms, weight {weight}",
            kept_by_conversation(data, keyword_feedback(terms, weight)),
        )
    for seeds, weight in ((3, 0.2), (10, 0.2), (10, 0.4)):
        row(
            f"similar to one of the {seeds} best, weight {weight}",
            kept_by_conversation(data, similar_to_best(seeds, weight)),
        )
    for radius in (2, 5, 10):
        row(
            f"stretch mean vector, radius {radius}, weight 0.2",
            kept_by_conversation(data, stretch_vector(radius, 0.2)),
        )
    for alpha, rows_too in ((0.5, False), (0.5, True), (1.0, False)):
        what = "question and turns" if rows_too else "question"
        row(
            f"session mean x{alpha} off the {what}",
            kept_by_conversation(data, minus_session_mean(alpha, rows_too)),
        )
    for seeds, weight, share in ((10, 0.1, 0.6), (50, 0.1, 0.55), (50, 0.2, 0.6)):
        row(
            f"role of the {seeds} best raised {weight} (when {share:.0%}+ of them)",
            kept_by_conversation(data, role_of_best(seeds, weight, share)),
        )
    for percentile in (99.5, 99.0):
        row(
            f"signals scaled to their {percentile}th percentile",
            kept_by_conversation(data, with_weights(top_percentile=percentile)),
        )
    conversations = {p.stem: bench.load_conversation(p) for p in sorted(bench.DATA.glob("*.json"))}
    # Embedded once through a Triton of this run's own (about 1.5 min: run it under the bench lock).
    content = bench.digest_named_vectors(
        conversations, "realtalk_question_content_vectors", question_content_texts
    )
    row("question embedded as its content words", kept_by_conversation(data, embedded_as(content, data, 0)))
    row(
        "question embedded as its content words, less capitalized ones",
        kept_by_conversation(data, embedded_as(content, data, 1)),
    )
    row(
        "participant names: 90% one-sided instead of 95%",
        kept_by_conversation(data, with_weights(participant_one_sided=0.9)),
    )
    for label, rank in SELECTION_IDEAS:
        row(label, kept_by_conversation(data, rank))
    # Word vectors of every term, embedded once in this process (under a minute: run it under the bench lock).
    space = TermVectors(
        [(c, [m.content for m in conversations[n][0]]) for n, c in data.items()],
        cached_word_vectors("realtalk_term_vectors"),
    )
    for label, rank in expansion_ideas(space):
        row(label, kept_by_conversation(data, rank))
    for label, rank in TWELFTH_SESSION_IDEAS:
        row(label, kept_by_conversation(data, rank))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ideas", action="store_true", help="also re-score the fifth session's ranking ideas"
    )
    args = parser.parse_args()
    data = prepared()
    print("\n".join(analysis(data)), flush=True)
    if args.ideas:
        print()
        print("\n".join(ideas(data)))


if __name__ == "__main__":
    main()
