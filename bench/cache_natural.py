"""The verifier's decisions on the hand-written natural pairs
(``bench/data/cache_natural_pairs.jsonl``, ``cache_data.load_natural``), in
process: the pure policy a Lookup applies to one stored question, in
seconds and with no stack. ``cache_bench.py`` measures the same pairs
through the real services.

    .venv/bin/python bench/cache_natural.py [--list] [--max-false-hit-rate R] [--model PATH]   # seconds

A pair is served when its cosine reaches the pre-filter
(``cache.semantic_threshold``), no structural check vetoes it, and the
question head's score reaches the default bound's threshold. Nothing here is
trained or calibrated on: the file is held out (bench/README.md).
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import cache_data

from meshgate.config import CacheSettings
from services.cache.verifier import MODEL_PATH, Verifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print each pair's decision")
    parser.add_argument(
        "--max-false-hit-rate", type=float, help="the bound whose threshold decides (default: the setting's)"
    )
    parser.add_argument(
        "--model",
        type=pathlib.Path,
        default=MODEL_PATH,
        help="the verifier's model file (default: the committed one)",
    )
    args = parser.parse_args()
    settings = CacheSettings()
    if args.max_false_hit_rate is not None:
        settings = CacheSettings(max_false_hit_rate=args.max_false_hit_rate)
    verifier = Verifier.load(settings.max_false_hit_rate, args.model)
    pairs = cache_data.load_natural()
    # Embedded once, then read from cache_data's on-disk cache (its texts are
    # keys, never training data: the training script asks for its own).
    vectors = cache_data.embeddings([q for pair in pairs for q in (pair.stored, pair.asked)])
    served: dict[str, list[bool]] = collections.defaultdict(list)
    for pair in pairs:
        stored, asked = vectors[pair.stored], vectors[pair.asked]
        cosine = float(stored @ asked)
        decision = verifier.decide(pair.asked, asked, pair.stored, stored)
        hit = cosine >= settings.semantic_threshold and decision.accepted
        served[pair.category].append(hit)
        if args.list:
            why = "served" if hit else ("pre-filter" if decision.accepted else decision.rejected_by)
            print(
                f"{pair.category:12} {why:10} cos {cosine:.3f} score {decision.score:.3f} | "
                f"{pair.stored} || {pair.asked}"
            )
    print(f"cache.max_false_hit_rate {settings.max_false_hit_rate}, pre-filter {settings.semantic_threshold}")
    print("| category | pairs | served | should be served |")
    print("|---|---|---|---|")
    for category, hits in served.items():
        should = "yes" if category in ("paraphrase", "repeat") else "no"
        print(f"| {category} | {len(hits)} | {sum(hits)} ({sum(hits) / len(hits):.0%}) | {should} |")


if __name__ == "__main__":
    main()
