"""Trains the router's model selector (services/router/model_selection.py)
and writes ``services/router/model_selector.json``.

    .venv/bin/python bench/train_model_selector.py   # ~30 s the first time (embeddings), then ~2 s

Two L2-regularized logistic regressions of p(hard), fitted by Newton's
method from zero on the train portion of ``model_selection_data`` (labels
and split explained there): one over the cheap features and the prompt's
all-MiniLM-L6-v2 embedding, one over the features alone (the router's
fallback when the embedding does not come). Deterministic: fixed split,
no random draw, so rerunning reproduces the committed file (a unit test
checks it, within the last of the six decimals kept: vectors embedded on
another CPU move a weight by 1e-6). The test portion is never read here:
``bench/model_selection_bench.py`` measures on it.
"""

from __future__ import annotations

import json
import sys

import cache_data
import logistic
import model_selection_data
import numpy as np

from services.router import model_selection

L2 = 1.0
NEWTON_STEPS = 50
# Weights are rounded so the committed file reads and diffs well; the
# scores move by far less than any threshold step.
DIGITS = 6


def fit(x: np.ndarray, y: np.ndarray) -> dict:
    mean, scale, weights, bias = logistic.fit(x, y, L2, NEWTON_STEPS)

    def rounded(values) -> list[float]:
        return [round(float(v), DIGITS) for v in values]

    return {
        "mean": rounded(mean),
        "scale": rounded(scale),
        "weights": rounded(weights),
        "bias": rounded([bias])[0],
    }


def build_model() -> dict:
    train = [p for p in model_selection_data.load() if p.portion == "train"]
    vectors = model_selection_data.embeddings([p.text for p in train])
    x_features = np.stack([model_selection.features(p.text) for p in train])
    x_full = np.hstack([x_features, np.stack([vectors[p.text] for p in train]).astype(np.float64)])
    y = np.array([p.hard for p in train], dtype=np.float64)
    return {
        "feature_names": list(model_selection.FEATURE_NAMES),
        "embedding_dimensions": int(x_full.shape[1] - x_features.shape[1]),
        # The embedder of every vector it was trained on: the router uses the
        # with_embedding half for that embedder's vectors only.
        "embedder": cache_data.embedder_record(),
        "trained_on": {
            "prompts": len(train),
            "hard": int(y.sum()),
            "sources": sorted({p.source for p in train}),
        },
        "with_embedding": fit(x_full, y),
        "features_only": fit(x_features, y),
    }


def main() -> None:
    if not model_selection_data.available():
        sys.exit("needs ../shared/data/semantic-pairs and ../shared/data/long-conversations")
    model = build_model()
    model_selection.MODEL_PATH.write_text(json.dumps(model, indent=1) + "\n")
    print(f"wrote {model_selection.MODEL_PATH} from {model['trained_on']['prompts']} prompts")


if __name__ == "__main__":
    main()
