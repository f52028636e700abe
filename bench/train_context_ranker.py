"""Trains the learned turn ranker of bench/context_ranker.py (an experiment
the context service does not use); writes
``bench/data/context_ranker_model.json``.

    .venv/bin/python bench/context_bench.py --offline   # caches the embeddings once
    .venv/bin/python bench/train_context_ranker.py      # seconds

Deterministic: features are context_ranker.ranking_features, training is
Newton's method from zero on an L2-regularized listwise softmax loss (per
question, the evidence turns against every turn of the session), nothing is
sampled.

Trained on the REALTALK tuning split only (the first six conversations by
name, as ``context_bench --offline`` splits them), so that the bench's
held-out split (the other four) stays an honest test; the script also
prints the swap (trained on the four, measured on the six).
"""

from __future__ import annotations

import asyncio
import json
import sys

import context_bench as bench
import context_ranker
import numpy as np
import uvloop

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from services.context import assembly, relevance

L2 = 1.0
NEWTON_STEPS = 30
# The first six conversations by name, as context_bench --offline splits them.
TUNING = 6


def prepare(conversations, vectors) -> list[dict]:
    """Per conversation: the turns' costs and, per question, its features,
    evidence and cost."""
    counter = bench.token_counts.for_models(Settings().models)[bench.MODEL]
    prepared = []
    for name, (turns, _, questions) in conversations.items():
        counts = asyncio.run(counter.count(turns))
        costs = assembly.SessionCosts.of(
            [assembly.TurnCost(m.role, n) for m, n in zip(turns, counts, strict=True)]
        )
        packed, lengths, turn_vectors = bench.offline_index(turns, vectors[name])
        items = []
        for q, vector in zip(questions, vectors[name][len(turns) :], strict=True):
            message = common_pb2.Message(role=common_pb2.ROLE_USER, content=q["question"])
            terms = list(relevance.index_terms(q["question"]))
            items.append(
                {
                    "features": context_ranker.ranking_features(terms, packed, lengths, turn_vectors, vector),
                    "hybrid": relevance.hybrid_scores(terms, packed, lengths, turn_vectors, vector).scores,
                    "evidence": sorted(q["evidence"]),
                    "category": q["category"],
                    "new": [assembly.TurnCost(message.role, asyncio.run(counter.count([message]))[0])],
                }
            )
        prepared.append(
            {"name": name, "costs": costs, "template": counter.template_tokens, "questions": items}
        )
    return prepared


def fit(prepared: list[dict], l2: float = L2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardization (mean, scale) and weights minimizing the listwise loss."""
    rows = np.vstack([q["features"] for c in prepared for q in c["questions"]])
    mean, scale = rows.mean(axis=0), rows.std(axis=0)
    scale[scale == 0] = 1.0
    weights = np.zeros(rows.shape[1])
    questions = [((q["features"] - mean) / scale, q["evidence"]) for c in prepared for q in c["questions"]]

    def loss(w: np.ndarray) -> float:
        total = 0.5 * l2 * float(w @ w)
        for x, evidence in questions:
            logits = x @ w
            top = logits.max()
            total += len(evidence) * (top + np.log(np.exp(logits - top).sum())) - logits[evidence].sum()
        return total

    current = loss(weights)
    for _ in range(NEWTON_STEPS):
        gradient = l2 * weights
        hessian = l2 * np.eye(len(weights))
        for x, evidence in questions:
            logits = x @ weights
            p = np.exp(logits - logits.max())
            p /= p.sum()
            expected = p @ x
            k = len(evidence)
            gradient += k * expected - x[evidence].sum(axis=0)
            hessian += k * ((x * p[:, None]).T @ x - np.outer(expected, expected))
        step = np.linalg.solve(hessian, gradient)
        # Backtracking: a full Newton step can overshoot far from the optimum.
        size = 1.0
        while size > 1e-6 and loss(weights - size * step) > current:
            size /= 2
        weights = weights - size * step
        previous, current = current, loss(weights)
        if previous - current < 1e-9 * max(abs(previous), 1.0):
            break
    return mean, scale, weights


def retention(prepared: list[dict], score, floor: int) -> bench.Tally:
    """Evidence kept by the adaptive plan when turns are ranked by ``score``."""
    tally = bench.Tally()
    for conversation in prepared:
        costs, template = conversation["costs"], conversation["template"]
        for q in conversation["questions"]:
            scores = score(q)
            for budget in bench.BUDGETS:
                chosen = assembly.plan(
                    costs, q["new"], budget, template, relevance=scores, recency_floor=floor
                )
                tally.add("adaptive", budget, q["category"], all(chosen.reasons[i] for i in q["evidence"]))
    return tally


def line(tally: bench.Tally) -> str:
    return "  ".join(f"{b}: {tally.share('adaptive', b, 0)}" for b in bench.BUDGETS)


def _rounded(values: np.ndarray) -> list[float]:
    # Rounded so the committed file reads and diffs well; scoring with the
    # rounded numbers is what context_bench does.
    return [round(float(v), 6) for v in values]


def load_prepared() -> list[dict]:
    paths = sorted(bench.DATA.glob("*.json"))
    conversations = {p.stem: bench.load_conversation(p) for p in paths}
    return prepare(conversations, uvloop.run(bench.cached_vectors(conversations)))


def build_model(prepared: list[dict] | None = None) -> dict:
    """The committed model: trained on the tuning split (the first six)."""
    prepared = load_prepared() if prepared is None else prepared
    mean, scale, weights = fit(prepared[:TUNING])
    return {
        "features": list(context_ranker.FEATURES),
        "trained_on": [c["name"] for c in prepared[:TUNING]],
        "l2": L2,
        "mean": _rounded(mean),
        "scale": _rounded(scale),
        "weights": _rounded(weights),
    }


def main() -> None:
    prepared = load_prepared()
    tuning, held_out = prepared[:TUNING], prepared[TUNING:]
    floor = Settings().context.recency_floor_turns
    for title, train, test in (("six -> four", tuning, held_out), ("four -> six", held_out, tuning)):
        mean, scale, weights = fit(train)
        ranker = context_ranker.LearnedRanker(mean, scale, weights)
        learned = retention(test, lambda q, r=ranker: r.scores(q["features"]), floor)
        hand = retention(test, lambda q: q["hybrid"], floor)
        print(f"trained {title}, measured on the {title.split()[-1]}:", file=sys.stderr)
        print(f"  learned {line(learned)}", file=sys.stderr)
        print(f"  hybrid  {line(hand)}", file=sys.stderr)
    model = build_model(prepared)
    context_ranker.MODEL_PATH.write_text(json.dumps(model, indent=1) + "\n")
    print(f"wrote {context_ranker.MODEL_PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
