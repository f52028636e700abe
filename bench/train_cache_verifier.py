"""Trains the cache's learned verifier and calibrates its threshold per
false-hit bound; writes ``services/cache/verifier_model.json``.

    .venv/bin/python bench/cache_traps.py            # the trap set (committed)
    .venv/bin/python bench/train_cache_verifier.py   # ~1 min once embeddings are cached

Deterministic: the split is by hash (``cache_data``), training is Newton's
method on an L2-regularized logistic regression from zero, and nothing is
sampled at random.

- Train portion (QQP pairs and traps): pairs that pass the structural
  checks, plus hard negatives as the cache meets them: with all train
  questions stored in one partition, each asked question's nearest stored
  questions above the pre-filter that are not labelled its duplicates.
- Calibration portion: the cache is simulated as it serves, all stored
  questions in ONE partition, best ``MAX_CANDIDATES`` by cosine above the
  pre-filter, structural checks, then the score; per bound, the lowest
  threshold whose false-hit rate (lookups served another question's answer,
  over lookups whose question has no duplicate stored) stays within it.
- The test portion is not read here; ``bench/cache_verifier_bench.py``
  measures it through the real services.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import cache_data
import numpy as np

from meshgate.config import CacheSettings
from services.cache import verifier
from services.cache.servicer import MAX_CANDIDATES

BOUNDS = (0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
L2 = 1.0
NEWTON_STEPS = 25
HARD_NEGATIVES_PER_QUESTION = 3


@dataclasses.dataclass
class Portion:
    """One portion's stored questions in one partition, and its lookups."""

    stored: list[str]
    stored_vectors: np.ndarray
    lookups: list[str]
    lookup_vectors: np.ndarray
    # Per lookup, the stored questions labelled its duplicates.
    duplicates: list[set[str]]


def build_portion(pairs: list[cache_data.Pair], vectors: dict[str, np.ndarray]) -> Portion:
    stored = sorted({p.stored for p in pairs})
    stored_set = set(stored)
    duplicates: dict[str, set[str]] = {}
    for p in pairs:
        entry = duplicates.setdefault(p.asked, set())
        if p.duplicate:
            entry.add(p.stored)
        # Labels hold both ways: a stored question asked elsewhere.
        if p.duplicate and p.asked in stored_set:
            duplicates.setdefault(p.stored, set()).add(p.asked)
    # A question already stored is an exact hit, not a semantic lookup.
    lookups = sorted(q for q in duplicates if q not in stored_set)
    return Portion(
        stored,
        np.stack([vectors[q] for q in stored]),
        lookups,
        np.stack([vectors[q] for q in lookups]),
        [duplicates[q] for q in lookups],
    )


def candidates(portion: Portion, prefilter: float) -> list[list[int]]:
    """Per lookup, the rows of the best stored questions above the pre-filter."""
    result = []
    for start in range(0, len(portion.lookups), 512):
        sims = portion.lookup_vectors[start : start + 512] @ portion.stored_vectors.T
        top = np.argsort(-sims, axis=1)[:, :MAX_CANDIDATES]
        for row, columns in enumerate(top):
            result.append([int(c) for c in columns if sims[row, c] >= prefilter])
    return result


def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """L2-regularized logistic regression on standardized features by Newton's method."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))]).astype(np.float64)
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], L2)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        gradient = z.T @ (p - y) + penalty * w
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return mean, scale, w[:-1], float(w[-1])


def training_set(
    portion: Portion, pairs: list[cache_data.Pair], vectors: dict[str, np.ndarray], prefilter: float
) -> tuple[np.ndarray, np.ndarray]:
    examples: dict[tuple[str, str], bool] = {}
    for p in pairs:
        examples[(p.asked, p.stored)] = p.duplicate
    for lookup, dups, rows in zip(portion.lookups, portion.duplicates, candidates(portion, prefilter)):
        for row in rows[:HARD_NEGATIVES_PER_QUESTION]:
            stored = portion.stored[row]
            if stored not in dups:
                examples.setdefault((lookup, stored), False)
    x, y = [], []
    for (asked, stored), duplicate in examples.items():
        a, b = verifier.analyze(asked), verifier.analyze(stored)
        # The learned stage only ever sees pairs the checks let through.
        if verifier.structural_veto(a, b) is None:
            x.append(verifier.features(a, b, vectors[asked], vectors[stored]))
            y.append(float(duplicate))
    return np.stack(x), np.array(y)


def simulate(portion: Portion, model: verifier.Verifier, prefilter: float) -> list[tuple[float, bool, bool]]:
    """Per lookup: the best accepted candidate's score (-1 when none passes
    the checks), whether that candidate is a duplicate, and whether the
    lookup has a duplicate stored at all."""
    outcomes = []
    for lookup, vector, dups, rows in zip(
        portion.lookups, portion.lookup_vectors, portion.duplicates, candidates(portion, prefilter)
    ):
        best_score, best_correct = -1.0, False
        a = verifier.analyze(lookup)
        for row in rows:
            stored = portion.stored[row]
            b = verifier.analyze(stored)
            if verifier.structural_veto(a, b) is not None:
                continue
            score = model.score(a, b, vector, portion.stored_vectors[row])
            if score > best_score:
                best_score, best_correct = score, stored in dups
        outcomes.append((best_score, best_correct, bool(dups)))
    return outcomes


def rates(outcomes: list[tuple[float, bool, bool]], threshold: float) -> dict[str, float]:
    hits = [(correct, has_dup) for score, correct, has_dup in outcomes if score >= threshold]
    true_hits = sum(1 for correct, _ in hits if correct)
    wrong = len(hits) - true_hits
    with_dup = sum(1 for *_, has_dup in outcomes if has_dup)
    without_dup = len(outcomes) - with_dup
    return {
        "precision": true_hits / len(hits) if hits else 1.0,
        "recall": true_hits / with_dup if with_dup else 0.0,
        "false_hit_rate": wrong / without_dup if without_dup else 0.0,
    }


def main() -> None:
    started = time.perf_counter()
    qqp = cache_data.load_qqp()
    traps = cache_data.load_traps()
    by_portion = {name: [p for p in qqp + traps if p.portion == name] for name in ("train", "calibration")}
    vectors = cache_data.embeddings([q for p in qqp + traps for q in (p.stored, p.asked)])
    prefilter = CacheSettings().semantic_threshold

    train_qqp = [p for p in by_portion["train"] if p.category == "qqp"]
    x, y = training_set(build_portion(train_qqp, vectors), by_portion["train"], vectors, prefilter)
    mean, scale, weights, bias = fit(x, y)
    print(f"trained on {len(y)} pairs ({int(y.sum())} duplicates)", file=sys.stderr)

    unbounded = verifier.Verifier(
        mean, scale, weights, bias, [verifier.CalibrationRow(1.0, 0.0, 1.0)], max_false_hit_rate=1.0
    )
    calibration_qqp = [p for p in by_portion["calibration"] if p.category == "qqp"]
    outcomes = simulate(build_portion(calibration_qqp, vectors), unbounded, prefilter)
    grid = sorted({round(s, 4) for s, _, _ in outcomes if s >= 0} | {1.0001})
    table = []
    for bound in BOUNDS:
        threshold = next(t for t in grid if rates(outcomes, t)["false_hit_rate"] <= bound)
        measured = rates(outcomes, threshold)
        table.append(
            {
                "max_false_hit_rate": bound,
                "threshold": threshold,
                "expected_false_hit_rate": round(measured["false_hit_rate"], 5),
            }
        )
        print(
            f"bound {bound:<6} threshold {threshold:.4f}  calibration: precision {measured['precision']:.3f} "
            f"recall {measured['recall']:.3f} false-hit rate {measured['false_hit_rate']:.4f}",
            file=sys.stderr,
        )
    model = {
        "about": "Written by bench/train_cache_verifier.py; see services/cache/verifier.py.",
        "embedding_model": "all-MiniLM-L6-v2 int8 (minilm)",
        "prefilter_cosine": prefilter,
        "max_candidates": MAX_CANDIDATES,
        "training_pairs": len(y),
        "features": list(verifier.FEATURE_NAMES)
        + ["embedding_product[384]", "embedding_abs_difference[384]"],
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "weights": [round(float(v), 6) for v in weights],
        "bias": round(bias, 6),
        "calibration": table,
    }
    verifier.MODEL_PATH.write_text(json.dumps(model, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {verifier.MODEL_PATH} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
