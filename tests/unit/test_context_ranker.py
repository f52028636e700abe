"""The learned turn ranker experiment of bench/context_ranker.py (the context
service does not use it): its features on a planted fact, the committed
model, and that the training script makes that model."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from services.context import relevance
from tests.unit.test_context_relevance import postings_of

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))

import context_ranker  # noqa: E402  (bench/, put on the path above)


def _planted_fact_session() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Sixty turns of small talk on random directions and one that holds the
    fact, close to the question in words and in meaning."""
    texts = [f"small talk number {i} about the weather and lunch" for i in range(60)]
    texts[17] = "My sister Ana moved to Lisbon last spring for her new job"
    postings, lengths = postings_of(texts)
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(60, 16)).astype(np.float32)
    question_vector = rng.normal(size=16).astype(np.float32)
    vectors[17] = question_vector + 0.3 * rng.normal(size=16).astype(np.float32)
    unit = relevance.unit_rows(relevance.quantize(vectors))
    return postings, lengths, unit, question_vector, list(relevance.index_terms("Where does Ana live now?"))


def test_ranking_features_have_one_finite_column_per_name() -> None:
    postings, lengths, unit, question_vector, terms = _planted_fact_session()
    features = context_ranker.ranking_features(terms, postings, lengths, unit, question_vector)
    assert features.shape == (60, len(context_ranker.FEATURES))
    assert np.isfinite(features).all()
    # The planted turn leads the dense and entity signals it should.
    for name in ("dense", "dense_rank", "entity", "hybrid_rank"):
        assert int(np.argmax(features[:, context_ranker.FEATURES.index(name)])) == 17, name


def test_the_committed_learned_ranker_finds_a_planted_fact() -> None:
    postings, lengths, unit, question_vector, terms = _planted_fact_session()
    ranker = context_ranker.LearnedRanker.load()
    scores = ranker.scores(context_ranker.ranking_features(terms, postings, lengths, unit, question_vector))
    assert int(np.argmax(scores)) == 17
    assert ((scores > 0) & (scores < 1)).all()


def test_a_ranker_trained_on_other_features_is_refused(tmp_path) -> None:
    model = json.loads(context_ranker.MODEL_PATH.read_text())
    model["features"] = [*model["features"], "length"]
    path = tmp_path / "ranker.json"
    path.write_text(json.dumps(model))
    with pytest.raises(ValueError, match="length"):
        context_ranker.LearnedRanker.load(path)


@pytest.mark.heavy
def test_the_committed_ranker_is_what_the_training_script_makes() -> None:
    # Imported here: the training script and the bench it reads load the
    # context and inference services' modules, which only this test needs.
    import context_bench as bench
    import train_context_ranker as training

    if not (bench.DATA.exists() and (bench.CACHE / "realtalk_vectors_plain.npz").exists()):
        pytest.skip("needs ../shared/data/long-conversations and the vectors context_bench --offline caches")
    made = training.build_model()
    committed = json.loads(context_ranker.MODEL_PATH.read_text())
    assert made["features"] == committed["features"] and made["trained_on"] == committed["trained_on"]
    # Rounded to 6 decimals when written; another BLAS, or the cached vectors
    # of another machine's CPU (Triton's minilm embeds them), move them a
    # little: on a fresh machine a feature mean read 0.098502 against the
    # committed 0.098500, and the fitted weights up to 0.3% (5e-4) apart.
    # A model trained on other features, labels or settings moves them far
    # more.
    tolerance = {"mean": {"abs": 1e-5}, "scale": {"abs": 1e-5}, "weights": {"rel": 0.01, "abs": 1e-3}}
    for part, bound in tolerance.items():
        assert made[part] == pytest.approx(committed[part], **bound), part
