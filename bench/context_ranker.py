"""A learned turn ranker for context assembly: an experiment the service does
not use, kept so that its negative result can be reproduced.

Per-turn signals (:func:`ranking_features`) computed from what assembly
already holds (the turns' vectors, term counts and the question's postings),
weighed by a linear model (:class:`LearnedRanker`) that
``bench/train_context_ranker.py`` fits on REALTALK's tuning split and writes
to ``bench/data/context_ranker_model.json``. Measured with conversation-level
cross-validation it keeps no more evidence than the service's
``relevance.hybrid_scores`` at 1k and 2k tokens (bench/README.md, "the learned
turn ranker"); ``context_bench.py --offline`` prints it as the "learned" rows
beside the hybrid ("adaptive") ones.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import pathlib

import numpy as np

from services.context import relevance

MODEL_PATH = pathlib.Path(__file__).resolve().parent / "data" / "context_ranker_model.json"

# Ranks as well as levels: a turn among the session's best few by one signal
# is likely evidence whatever that signal's scale in this session. The turn's
# length is left out: the model learns that long turns hold more evidence,
# and then spends the budget on them (held-out retention fell 3-4 points at
# 2k with it).
FEATURES = (
    "dense",
    "dense_z",
    "dense_rank",
    "feedback",
    "feedback_rank",
    "keyword",
    "keyword_rank",
    "entity",
    "hybrid_rank",
    "neighbour",
    "neighbour_rank",
    "position",
    "recent",
)


def _log_rank(values: np.ndarray) -> np.ndarray:
    """-log(1 + rank) of each value (rank 0 = the largest); turns tied at
    zero, those the signal says nothing of, share the lowest."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    ranks[values <= 0] = len(values)
    return -np.log1p(ranks)


def _neighbour_max(values: np.ndarray) -> np.ndarray:
    left = np.concatenate(([values.min()], values[:-1]))
    right = np.concatenate((values[1:], [values.min()]))
    return np.maximum(left, right)


def ranking_features(
    query_terms: collections.abc.Iterable[str],
    postings: collections.abc.Mapping[str, np.ndarray],
    term_counts: np.ndarray,
    unit_vectors: np.ndarray,
    query_vector: np.ndarray,
    weights: relevance.Weights = relevance.DEFAULT_WEIGHTS,
    recent_turns: int = 2,
) -> np.ndarray:
    """One row per turn, one column per :data:`FEATURES` name."""
    n = len(term_counts)
    query_terms = list(query_terms)
    keywords = [t for t in query_terms if not t.startswith(relevance.ENTITY_MARK)]
    entities = [t for t in query_terms if t.startswith(relevance.ENTITY_MARK)]
    keyword = relevance.scaled(relevance.bm25(keywords, postings, term_counts, weights))
    entity = relevance.scaled(relevance.bm25(entities, postings, term_counts, weights))
    query = relevance.unit(query_vector)
    cosines = (unit_vectors @ query).astype(np.float64)
    dense = relevance.scaled(cosines)
    spread = float(cosines.std()) or 1.0
    hybrid = weights.keyword * keyword + weights.entity * entity + weights.dense * dense
    feedback_count = min(weights.feedback_turns, n)
    best = np.argpartition(-hybrid, feedback_count - 1)[:feedback_count]
    moved = query + weights.feedback_weight * unit_vectors[best].mean(axis=0)
    feedback = relevance.scaled((unit_vectors @ moved).astype(np.float64))
    recent = (unit_vectors @ unit_vectors[-recent_turns:].mean(axis=0)).astype(np.float64)
    neighbour = _neighbour_max(hybrid) if n > 1 else np.zeros(n)
    columns = {
        "dense": dense,
        "dense_z": (cosines - cosines.mean()) / spread,
        "dense_rank": _log_rank(cosines - cosines.min() + 1e-9),
        "feedback": feedback,
        "feedback_rank": _log_rank(feedback + 1e-9),
        "keyword": keyword,
        "keyword_rank": _log_rank(keyword),
        "entity": entity,
        "hybrid_rank": _log_rank(hybrid + 1e-9),
        "neighbour": neighbour,
        "neighbour_rank": _neighbour_max(_log_rank(hybrid + 1e-9)) if n > 1 else np.zeros(n),
        "position": np.arange(n) / max(n - 1, 1),
        "recent": recent,
    }
    return np.column_stack([columns[name] for name in FEATURES])


@dataclasses.dataclass(frozen=True, slots=True)
class LearnedRanker:
    """A linear model over standardized :func:`ranking_features`."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray

    @classmethod
    def load(cls, path: pathlib.Path = MODEL_PATH) -> LearnedRanker:
        model = json.loads(path.read_text())
        if tuple(model["features"]) != FEATURES:
            raise ValueError(f"{path} was trained on features {model['features']}, not {FEATURES}")
        return cls(*(np.array(model[k], dtype=np.float64) for k in ("mean", "scale", "weights")))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Each turn's relevance in (0, 1): the logistic of its logit, so
        that every turn counts as relevant to the planner, ordered by the model."""
        logits = ((features - self.mean) / self.scale) @ self.weights
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))
