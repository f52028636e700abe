"""The verifier's decisions on the hand-written natural pairs
(``bench/data/cache_natural_pairs.jsonl``, ``cache_data.load_natural``), in
process: the pure policy a Lookup applies to one stored question, in
seconds and with no stack. ``cache_bench.py`` measures the same pairs
through the real services.

    .venv/bin/python bench/cache_natural.py [--list] [--max-false-hit-rate R] [--model PATH]   # seconds

A pair is served when the lookup's first stage lets it through (the stored
question holds ``cache.first_stage_word_share`` of the asked one's content
words: ``VectorIndex.may_match`` on an index of that one entry), its cosine
reaches the pre-filter (``cache.semantic_threshold``), no structural check
vetoes it, and the question head's score reaches the default bound's
threshold. Before the first stage was applied here this printed 47 of 144
paraphrases served where the services serve 40 (an audit). Nothing here is
trained or calibrated on: the file is held out (bench/README.md).
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import cache_data

from meshgate.config import CacheSettings
from services.cache.index import VectorIndex
from services.cache.verifier import MODEL_PATH, Verifier, analyze


def first_stage(stored: str, stored_vector, asked: str, settings: CacheSettings) -> bool:
    """Whether the servicer's first stage would embed ``asked`` to search a
    sub-partition holding ``stored`` alone."""
    index = VectorIndex(len(stored_vector), 1, settings.approximate_index_from)
    index.upsert("stored", 1, 0, stored_vector, stored)
    return index.may_match(analyze(asked).stems, settings.first_stage_word_share)


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
        passed = first_stage(pair.stored, stored, pair.asked, settings)
        hit = passed and cosine >= settings.semantic_threshold and decision.accepted
        served[pair.category].append(hit)
        if args.list:
            why = "served" if hit else "first stage" if not passed else decision.rejected_by or "pre-filter"
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
