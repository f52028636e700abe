"""Which structural vetoes cost duplicates, on the development portions:
for each labelled pair of the train and calibration portions (QQP pairs and
the trap set) that reaches the pre-filter and is vetoed by the scope or the
negation check, its label, its category, and whether the question head would
have served it without the veto (its score against the default bound's
threshold). Reads no test or held-out pair.

    .venv/bin/python bench/cache_vetoes.py    # ~20 s once cache_data's embeddings are cached

The model never trained on vetoed pairs (bench/train_cache_verifier.py), so
"would have served" is the committed model's word on pairs it never saw.
"""

from __future__ import annotations

import collections

import cache_data

from meshgate.config import CacheSettings
from services.cache import verifier
from services.cache.verifier import _checks


def main() -> None:
    settings = CacheSettings()
    head = verifier.Verifier.load(settings.max_false_hit_rate).question
    pairs = [
        p for p in cache_data.load_qqp() + cache_data.load_traps() if p.portion in ("train", "calibration")
    ]
    vectors = cache_data.embeddings(sorted({q for p in pairs for q in (p.stored, p.asked)}))
    counts: collections.Counter = collections.Counter()
    for p in pairs:
        asked, stored = verifier.analyze(p.asked), verifier.analyze(p.stored)
        if float(vectors[p.asked] @ vectors[p.stored]) < settings.semantic_threshold:
            continue
        veto = verifier.structural_veto(asked, stored)
        if veto == "scope":
            veto += ", swapped" if _checks._replaced(asked.scope, stored.scope) else ", on one side"
        elif veto != "negation":
            continue
        served = head.score(asked, stored, vectors[p.asked], vectors[p.stored]) >= head.threshold()
        counts[(veto, p.duplicate, p.category, served)] += 1
    print(f"pre-filter {settings.semantic_threshold}, threshold {head.threshold():.4f}\n")
    print("| veto | labelled | category | pairs | would be served without it |")
    print("|---|---|---|---|---|")
    for veto, duplicate, category in sorted({key[:3] for key in counts}):
        served = counts[(veto, duplicate, category, True)]
        total = served + counts[(veto, duplicate, category, False)]
        label = "duplicate" if duplicate else "not"
        print(f"| {veto} | {label} | {category} | {total} | {served} |")


if __name__ == "__main__":
    main()
