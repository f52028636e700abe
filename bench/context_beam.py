"""Context assembly on BEAM-100k, the scale set of issue 8: is a question's evidence still in the prompt?

Every retention figure before this one is REALTALK's, the set the ranking
weights were chosen on. BEAM-100k (/work/shared/data/long-conversations/beam-100k,
see its README) is the other labelled set: twenty generated user-assistant
chats of about 100k tokens, their questions in ten categories. Offline, as
``context_bench.py --offline`` and ``context_misses.py`` score REALTALK, with
their helpers: the service's pure policy (``relevance.hybrid_scores`` with the
committed weights, ``assembly.plan`` with smollm2's real token counts and the
configured recency floor) over vectors computed once and cached.

- Each chat as the context service would store it: its batches' turns'
  messages in order, user or assistant, less the generator's ``->-> n,m``
  marker (:data:`MARKER`).
- Questions: every category but abstention (no evidence). The evidence is
  every message id of ``source_chat_ids`` (a list, nested lists, or a dict of
  lists); a question whose ids do not all name a message, or that has none,
  is left out and counted. For knowledge_update, whose dict tells the
  original from the update, "updated kept" counts the update alone.
- Vectors: ``meshgate.minilm`` in this process, one text per run as the
  context service's local embedder runs it (context.embedder = "local"):
  the very vectors the service stores. Cached under bench/.cache/ in a file
  named by the texts' digest (``context_bench.texts_digest``).

Prints, per budget (1k / 2k / 4k / 8k), the share of questions with every
evidence turn INCLUDED: adaptive, newest turns that fit, and the ceiling
with the evidence ranked first, overall and per category; the share whose
evidence is all within the K best-ranked turns; and the REALTALK-tuned pieces
switched off one at a time (stretches, feedback, neighbours, participant
names, the recency floor, the nameless form), and the piece BEAM suggested
(the user's turns raised for questions asked in the first person,
``Weights.first_person_lift``), as differences from adaptive.
``--realtalk`` prints the same pieces' differences on REALTALK
(``context_misses.prepared``), so that a change BEAM suggests is weighed on
both. ``--halves`` prints retention by first-person lift on the odd-numbered
chats and the even-numbered ones, with the vectors and by words alone (as
with the inference service down). Not a blind check: the lift, and 1.0,
were first seen on all twenty chats; the halves show the effect holds on
each. ``--selection-ideas`` prints ``context_misses.SELECTION_IDEAS`` (tried
on REALTALK with ``context_misses.py --ideas``) on BEAM.

    # The first run embeds ~6.4k texts (minutes):
    .venv/bin/python bench/context_beam.py [--realtalk] [--halves] [--selection-ideas]
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import dataclasses
import json
import pathlib
import re
import sys
import time

import context_bench as bench
import context_misses as misses
import numpy as np

from meshgate.common.v1 import common_pb2
from services.context import relevance

DATA = bench.DATA.parent / "beam-100k"
ROLES = {"user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}
# Knowledge_update's key for the message that replaces the original's fact.
UPDATED = "updated_info"
KS = (5, 10, 20, 50)
# The first-person lifts --halves compares (Weights.first_person_lift).
LIFTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
# The generator's "->-> batch,turn" at the end of 2,199 of the 5,732 messages,
# user and assistant ("2,N/A", "1,5)" and "2,22, 24" too; user messages give
# the same in their "index" field): bookkeeping that no user types and no
# question carries, which would only give those turns number terms in
# common. Cut, as the service would never see it. (model_selection_data's
# pattern takes the plain "n,m" form of user messages only.)
MARKER = re.compile(r"\s*->->[^\n]*\Z")


# --- the data ----------------------------------------------------------------


def message_ids(source) -> list[int]:
    """Every message id in ``source_chat_ids``: a list (event_ordering nests
    lists of the messages of one mention), or a dict of such lists."""
    if isinstance(source, dict):
        return [i for part in source.values() for i in message_ids(part)]
    if isinstance(source, list):
        return [i for part in source for i in message_ids(part)]
    return [source]


def load_chat(
    directory: pathlib.Path,
) -> tuple[list[common_pb2.Message], list[int], list[dict], collections.Counter]:
    """A chat's messages, their ids, its questions with evidence as message
    positions (and ``updated``, knowledge_update's update alone, else None),
    and per category the questions left out (abstention included)."""
    messages, ids = [], []
    for batch in json.loads((directory / "chat.json").read_text()):
        for turn in batch["turns"]:
            for message in turn:
                content = MARKER.sub("", message["content"])
                messages.append(common_pb2.Message(role=ROLES[message["role"]], content=content))
                ids.append(message["id"])
    position = {message_id: i for i, message_id in enumerate(ids)}
    raw = json.loads((directory / "probing_questions" / "probing_questions.json").read_text())
    questions, left_out = [], collections.Counter()
    for category, items in sorted(raw.items()):
        for item in items:
            evidence = message_ids(item.get("source_chat_ids") or [])
            if not evidence or any(i not in position for i in evidence):
                left_out[category] += 1
                continue
            source = item["source_chat_ids"]
            updated = source.get(UPDATED) if isinstance(source, dict) else None
            questions.append(
                {
                    "question": item["question"],
                    "category": category,
                    "evidence": {position[i] for i in evidence},
                    "updated": None if updated is None else {position[i] for i in message_ids(updated)},
                }
            )
    return messages, ids, questions, left_out


def turns_questions_nameless(turns: list[common_pb2.Message], questions: list[dict]) -> list[str]:
    """What is embedded: each turn, each question, each question's nameless form."""
    return bench.turns_and_questions(turns, questions) + bench.nameless_texts(turns, questions)


def cached_vectors(chats) -> dict[str, np.ndarray]:
    """Per chat the vectors of :func:`turns_questions_nameless`, by
    ``meshgate.minilm`` one text per run, kept under bench/.cache/."""
    path = bench.CACHE / f"beam_vectors-{bench.texts_digest(chats, turns_questions_nameless)}.npz"
    if path.exists():
        return dict(np.load(path))
    from meshgate.minilm import MiniLM

    model = MiniLM(threads=2)
    vectors = {}
    for name, (turns, _, questions) in chats.items():
        started = time.perf_counter()
        texts = turns_questions_nameless(turns, questions)
        vectors[name] = np.vstack([model.embed([text]) for text in texts])
        print(
            f"embedded chat {name}: {len(texts)} texts, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    bench.CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **vectors)
    return vectors


@dataclasses.dataclass
class Probe:
    question: misses.Question
    # knowledge_update's updated message(s), as turn positions; None elsewhere.
    updated: list[int] | None


def prepared(chats, vectors: dict[str, np.ndarray]) -> dict[str, tuple[misses.Conversation, list[Probe]]]:
    """Each chat as ``context_misses`` scores a conversation."""
    out = {}
    for name, (turns, _, questions, _) in chats.items():
        postings, lengths, rows = bench.offline_index(turns, vectors[name])
        question_vectors = vectors[name][len(turns) : len(turns) + len(questions)]
        nameless = bench.nameless_queries(questions, vectors[name][len(turns) + len(questions) :])
        probes = [
            Probe(
                misses.question_of(q, vector, nameless_query),
                None if q["updated"] is None else sorted(q["updated"]),
            )
            for q, vector, nameless_query in zip(questions, question_vectors, nameless, strict=True)
        ]
        # No per-turn terms: only context_misses' keyword-feedback idea reads them.
        out[name] = (
            misses.Conversation(
                misses.session_costs(turns), postings, lengths, rows, [], [p.question for p in probes]
            ),
            probes,
        )
    return out


# --- the pieces tuned on REALTALK, each switched off; ideas ---------------------


# No speaker's share can reach more than all of a name's turns.
without_participant_names = misses.with_weights(participant_one_sided=1.01)


def every_question_lifted(lift: float):
    """An idea, not in the service: the user's turns raised by ``lift`` for
    every question, not only those asked in the first person (the service's
    lift off, this one added before the stretches, as the service adds its
    own). In REALTALK "user" is only the first of two people, and its
    questions name them instead."""
    return misses.spans_after(
        lambda c, q, s: lift * (c.costs.roles == common_pb2.ROLE_USER),
        dataclasses.replace(relevance.DEFAULT_WEIGHTS, first_person_lift=0.0),
    )


def first_person(questions: collections.abc.Iterable[misses.Question]) -> int:
    """How many of ``questions`` the service's gate finds asked in the first person."""
    return sum(relevance.asked_in_first_person(q.text) for q in questions)


def variants() -> tuple:
    """(label, ranking, recency floor) of each variant."""
    return (
        ("no stretches (Weights.span = 0)", misses.with_weights(span=0.0), misses.FLOOR),
        ("no feedback (Weights.feedback_weight = 0)", misses.with_weights(feedback_weight=0.0), misses.FLOOR),
        ("no neighbours (Weights.neighbour = 0)", misses.with_weights(neighbour=0.0), misses.FLOOR),
        ("no participant names", without_participant_names, misses.FLOOR),
        (
            ("without" if misses.NAMELESS else "with")
            + " the nameless form (context.embed_nameless_question)",
            lambda c, q: misses.service_scores(c, q, nameless=not misses.NAMELESS),
            misses.FLOOR,
        ),
        ("recency floor 0 turns", misses.service_scores, 0),
        (
            "without the first-person lift (Weights.first_person_lift = 0)",
            misses.with_weights(first_person_lift=0.0),
            misses.FLOOR,
        ),
        (
            "idea, not in the service: the lift for every question (no first-person gate)",
            every_question_lifted(relevance.DEFAULT_WEIGHTS.first_person_lift),
            misses.FLOOR,
        ),
    )


def variant_kept(data, rank, floor: int) -> dict[str, dict[int, list[bool]]]:
    return misses.kept_by_conversation({n: c for n, (c, _) in data.items()}, rank, floor)


def all_shares(kept: dict[str, dict[int, list[bool]]]) -> list[float]:
    return misses.shares(kept, sorted(kept))


# --- the tables ---------------------------------------------------------------


def percent(values) -> str:
    values = list(values)
    return f"{100 * np.mean(values):.1f}%" if values else "-"


def measured(data) -> list[dict]:
    """Per question: its category, the rank of its worst-ranked evidence
    turn, and per budget whether adaptive, newest and the oracle keep all of
    its evidence (and adaptive the updated message alone)."""
    rows = []
    for c, probes in data.values():
        for probe in probes:
            q = probe.question
            scores = misses.service_scores(c, q)
            place = misses.ranks(scores)
            row = {"category": q.category, "worst": int(place[q.evidence].max())}
            # Whose turns the ranking puts first, against whose the evidence is.
            assistant = c.costs.roles == common_pb2.ROLE_ASSISTANT
            row["assistant in top 5"] = int(assistant[place < 5].sum())
            row["assistant evidence"] = int(assistant[q.evidence].sum()), len(q.evidence)
            oracle_scores = misses.evidence_first(scores, q.evidence)
            for budget in bench.BUDGETS:
                adaptive = misses.plan(c, q, scores, budget)
                newest = misses.plan(c, q, None, budget)
                row["adaptive", budget] = misses.all_kept(adaptive, q.evidence)
                row["turns", budget] = sum(reason > 0 for reason in adaptive.reasons)
                row["newest", budget] = misses.all_kept(newest, q.evidence)
                row["oracle", budget] = misses.all_kept(misses.plan(c, q, oracle_scores, budget), q.evidence)
                if probe.updated is not None:
                    row["updated kept", budget] = misses.all_kept(adaptive, probe.updated)
                    row["updated kept, newest", budget] = misses.all_kept(newest, probe.updated)
            rows.append(row)
    return rows


def report(chats, data, rows: list[dict]) -> list[str]:
    categories = sorted({r["category"] for r in rows})
    tokens = np.concatenate([c.costs.tokens for c, _ in data.values()])
    roles = np.concatenate([c.costs.roles for c, _ in data.values()])
    left_out = sum((left for *_, left in chats.values()), collections.Counter())
    user, assistant = (
        tokens[roles == role].mean() for role in (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)
    )
    out = [
        f"{len(chats)} chats, {len(tokens)} messages, {int(tokens.sum())} tokens (smollm2):"
        f" {tokens.mean():.0f} per message (user {user:.0f}, assistant {assistant:.0f},"
        f" median {np.median(tokens):.0f}); recency floor {misses.FLOOR} turns.",
        f"{len(rows)} questions; left out: "
        + ", ".join(f"{category} {count}" for category, count in sorted(left_out.items()))
        + " (abstention: no evidence; others: no id, or an id naming no message).",
        "",
        "### Evidence kept verbatim (share of questions with every evidence turn INCLUDED)",
        "",
        "| budget | strategy | all | " + " | ".join(categories) + " |",
        "|" + "---|" * (3 + len(categories)),
    ]
    for budget in bench.BUDGETS:
        for strategy in ("adaptive", "newest", "oracle"):
            cells = [percent(r[strategy, budget] for r in rows)]
            cells += [percent(r[strategy, budget] for r in rows if r["category"] == c) for c in categories]
            label = "oracle (evidence ranked first)" if strategy == "oracle" else strategy
            out.append(f"| {budget} | {label} | " + " | ".join(cells) + " |")
    updates = [r for r in rows if ("updated kept", bench.BUDGETS[0]) in r]
    assistant_evidence, evidence = np.sum([r["assistant evidence"] for r in rows], axis=0)
    out += [
        "",
        f"knowledge_update, the updated message alone kept ({len(updates)} questions), adaptive / newest: "
        + ", ".join(
            f"{b}: {percent(r['updated kept', b] for r in updates)}"
            f" / {percent(r['updated kept, newest', b] for r in updates)}"
            for b in bench.BUDGETS
        ),
        "Turns in adaptive's prompt, median: "
        + ", ".join(f"{b}: {np.median([r['turns', b] for r in rows]):.0f}" for b in bench.BUDGETS),
        f"Assistant turns: {assistant_evidence} of the {evidence} evidence turns (question by question),"
        f" {sum(r['assistant in top 5'] for r in rows)} of the {5 * len(rows)} turns adaptive ranks in"
        " its top 5",
        "",
        "### Evidence all within the K best-ranked turns (adaptive's ranking)",
        "",
        "| K | all | " + " | ".join(categories) + " |",
        "|" + "---|" * (2 + len(categories)),
    ]
    for k in KS:
        cells = [percent(r["worst"] < k for r in rows)]
        cells += [percent(r["worst"] < k for r in rows if r["category"] == c) for c in categories]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out


def pieces(data) -> list[str]:
    base = all_shares(variant_kept(data, misses.service_scores, misses.FLOOR))
    out = [
        "### The REALTALK-tuned pieces switched off one at a time, and ideas (all questions,"
        " points vs adaptive)",
        "",
        "Adaptive, 1k / 2k / 4k / 8k: " + " / ".join(f"{v:.1f}%" for v in base),
        "",
        "| variant | 1k / 2k / 4k / 8k |",
        "|---|---|",
    ]
    for label, rank, floor in variants():
        shares = all_shares(variant_kept(data, rank, floor))
        out.append(
            f"| {label} | " + " / ".join(f"{v - b:+.1f}" for v, b in zip(shares, base, strict=True)) + " |"
        )
    names = sum(
        bool(relevance.participant_names(q.terms, c.postings, c.costs.roles))
        for c, probes in data.values()
        for q in (p.question for p in probes)
    )
    out += [
        "",
        f"Questions naming a participant (relevance.participant_names): {names};"
        " asked in the first person (relevance.asked_in_first_person):"
        f" {first_person(p.question for _, probes in data.values() for p in probes)}",
    ]
    return out


def realtalk_pieces() -> list[str]:
    """The same variants on REALTALK: all ten | the six | the four."""
    data = misses.prepared()
    base = misses.kept_by_conversation(data, misses.service_scores)
    out = [
        "### The same on REALTALK (points vs the service; all ten | the six (tuning) | the four (held out),"
        " each 1k / 2k / 4k / 8k)",
        "",
        "Service: " + misses.retention_row(base),
        "",
        "| variant | all ten | the six | the four |",
        "|---|---|---|---|",
    ]
    for label, rank, floor in variants():
        kept = misses.kept_by_conversation(data, rank, floor)
        out.append(f"| {label} | " + misses.retention_row(kept, base) + " |")
    asked = first_person(q for c in data.values() for q in c.questions)
    out += ["", f"Questions asked in the first person (relevance.asked_in_first_person): {asked}"]
    return out


def words_only(**changes):
    """The service's ranking without vectors (the inference service down, or
    turns stored without them): by words alone."""
    weights = dataclasses.replace(relevance.DEFAULT_WEIGHTS, **changes)

    def rank(c: misses.Conversation, q: misses.Question) -> np.ndarray:
        return relevance.hybrid_scores(
            q.terms, c.postings, c.lengths, None, None, weights, c.costs.roles, question=q.text
        ).scores

    return rank


def risked_kept(part, kept: dict[str, dict[int, list[bool]]]) -> str:
    """What the lift risks: of the first-person questions whose evidence
    holds an assistant turn (an answer the assistant gave), how many, and
    how many adaptive keeps at each budget."""
    risked = [
        [kept[name][budget][i] for budget in bench.BUDGETS]
        for name, (c, _) in part.items()
        for i, q in enumerate(c.questions)
        if relevance.asked_in_first_person(q.text)
        and (c.costs.roles[q.evidence] == common_pb2.ROLE_ASSISTANT).any()
    ]
    return f"{len(risked)}: " + " / ".join(str(n) for n in np.sum(risked, axis=0))


def halves(data) -> list[str]:
    """Adaptive's retention by first-person lift on the odd-numbered chats
    and the even-numbered ones, with vectors and by words alone. Not a blind
    check: the lift, and 1.0, were first seen on all twenty chats; the
    halves show whether the effect holds on each."""
    parts = {
        "odd chats": {n: v for n, v in data.items() if int(n) % 2},
        "even chats": {n: v for n, v in data.items() if not int(n) % 2},
    }
    out = [
        "### First-person lift (Weights.first_person_lift) on the odd and the even chats",
        "",
        "| scored by | lift | "
        + " | ".join(f"{label}, 1k / 2k / 4k / 8k" for label in parts)
        + " | first-person questions with an assistant turn in their evidence, kept: odd chats | all chats |",
        "|---|---|" + "---|" * (len(parts) + 2),
    ]
    for path, ranking, lifts in (
        ("vectors and words", misses.with_weights, LIFTS),
        ("words alone", words_only, LIFTS),
    ):
        for lift in lifts:
            rank = ranking(first_person_lift=lift)
            kept = {label: variant_kept(part, rank, misses.FLOOR) for label, part in parts.items()}
            cells = [" / ".join(f"{v:.1f}%" for v in all_shares(k)) for k in kept.values()]
            cells.append(risked_kept(parts["odd chats"], kept["odd chats"]))
            cells.append(risked_kept(data, {n: v for k in kept.values() for n, v in k.items()}))
            out.append(f"| {path} | {lift} | " + " | ".join(cells) + " |")
    counts = {
        label: (
            first_person(p.question for _, probes in part.values() for p in probes),
            sum(len(probes) for _, probes in part.values()),
        )
        for label, part in parts.items()
    }
    out += [
        "",
        "Asked in the first person: "
        + ", ".join(f"{label} {n} of {total}" for label, (n, total) in counts.items()),
    ]
    return out


def selection_ideas(data) -> list[str]:
    """``context_misses.SELECTION_IDEAS`` (rank fusion, a redundancy penalty,
    query-term coverage), measured there on REALTALK, on all of BEAM's
    questions: points against adaptive."""
    base = all_shares(variant_kept(data, misses.service_scores, misses.FLOOR))
    out = [
        "### context_misses' selection ideas on BEAM (all questions, points vs adaptive)",
        "",
        "| idea | 1k / 2k / 4k / 8k |",
        "|---|---|",
    ]
    for label, rank in misses.SELECTION_IDEAS:
        shares = all_shares(variant_kept(data, rank, misses.FLOOR))
        out.append(
            f"| {label} | " + " / ".join(f"{v - b:+.1f}" for v, b in zip(shares, base, strict=True)) + " |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realtalk", action="store_true", help="also the variants' differences on REALTALK")
    parser.add_argument(
        "--halves", action="store_true", help="also retention by first-person lift on the odd and even chats"
    )
    parser.add_argument(
        "--selection-ideas",
        action="store_true",
        help="also context_misses' selection ideas (rank fusion, redundancy penalty, query-term coverage)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    chats = {d.name: load_chat(d) for d in sorted(DATA.iterdir(), key=lambda d: int(d.name)) if d.is_dir()}
    vectors = cached_vectors({n: (turns, ids, qs) for n, (turns, ids, qs, _) in chats.items()})
    data = prepared(chats, vectors)
    print("\n".join(report(chats, data, measured(data))) + "\n", flush=True)
    print("\n".join(pieces(data)) + "\n", flush=True)
    if args.halves:
        print("\n".join(halves(data)) + "\n", flush=True)
    if args.selection_ideas:
        print("\n".join(selection_ideas(data)) + "\n", flush=True)
    if args.realtalk:
        print("\n".join(realtalk_pieces()) + "\n")
    print(f"Run time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
