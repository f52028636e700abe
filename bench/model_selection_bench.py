"""How often the committed model selector sends a held-out prompt where it
belongs, and how much traffic it moves to the fast model.

    .venv/bin/python bench/model_selection_bench.py

On the test portion of ``model_selection_data`` (never trained on), with
the committed ``services/router/model_selector.json`` and the embeddings of
the ``minilm`` model computed offline (the vectors the router's Embed call
gets): per threshold, the share of easy prompts sent to the fast model, of
hard prompts sent to the strong one, and of all prompts sent to the fast
one; then the same for the features-only fallback, per source at the
default threshold, and the CPU the features and classifier take a prompt.
The share moved depends on the mix (this set is about half easy); the
per-class rates do not.
"""

from __future__ import annotations

import sys
import time

import cache_data
import model_selection_data
import numpy as np

from meshgate.config import SelectionSettings
from meshgate.embedding import Embedding
from services.router import model_selection

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    if not model_selection_data.available():
        sys.exit("needs ../shared/data/semantic-pairs and ../shared/data/long-conversations")
    test = [p for p in model_selection_data.load() if p.portion == "test"]
    embedder = cache_data.embedder()
    vectors = {
        text: Embedding(vector, embedder)
        for text, vector in model_selection_data.embeddings([p.text for p in test]).items()
    }
    classifier = model_selection.Classifier.load()
    hard = np.array([p.hard for p in test])
    with_embedding = np.array([classifier.score(p.text, vectors[p.text])[0] for p in test])
    features_only = np.array([classifier.score(p.text, None)[0] for p in test])
    print(f"held-out prompts: {len(test)} ({hard.sum()} hard, {(~hard).sum()} easy)")
    for name, score in (("features + embedding", with_embedding), ("features only", features_only)):
        print(f"\n{name}")
        print("threshold  easy->fast  hard->strong  to fast (all)")
        for threshold in THRESHOLDS:
            strong = score >= threshold
            print(
                f"{threshold:9.1f}  {np.mean(~strong[~hard]):10.1%}  {np.mean(strong[hard]):12.1%}"
                f"  {np.mean(~strong):13.1%}"
            )
    default = SelectionSettings().threshold
    print(f"\nper source at threshold {default} (features + embedding / features only), right model:")
    for source in sorted({p.source for p in test}):
        mask = np.array([p.source == source for p in test])
        right = [np.mean((score[mask] >= default) == hard[mask]) for score in (with_embedding, features_only)]
        print(f"  {source:15s} n={mask.sum():4d}  {right[0]:6.1%}  {right[1]:6.1%}")
    # What choosing costs the router's CPU besides the Embed call: the
    # features and both dot products, per prompt, over the held-out set.
    started = time.process_time()
    for _ in range(5):
        for p in test:
            classifier.score(p.text, vectors[p.text])
    per_prompt_us = (time.process_time() - started) / (5 * len(test)) * 1e6
    print(f"\nfeatures + classifier: {per_prompt_us:.0f} µs CPU per prompt (mean, {len(test)} prompts x 5)")


if __name__ == "__main__":
    main()
