"""Chooses ``cache.first_stage_word_share``: how much of a question's content
words some stored question must hold before a lookup embeds the question.

    .venv/bin/python bench/cache_first_stage.py   # 6-20 s once embeddings are cached

The first stage (``VectorIndex.may_match``) decides without an embedding, so
what it rejects is never verified: a rejected question the verifier would
have served is a lost hit. Per share, on the TRAIN and CALIBRATION portions
only (the test portion is never read here), with the verifier at the
default bound and the default pre-filter:

- hits lost, each labelled pair alone (one question stored, the other
  asked; QQP and traps): the pairs the verifier accepts whose asked
  question the one-row index rejects. The worst case, a partition holding
  nothing else that could let the question through.
- hits lost, one partition: all QQP questions of the portion stored in one
  partition, each lookup served as the cache serves it (the best
  ``MAX_CANDIDATES`` verified, ``train_cache_verifier.served``); lost when
  the whole partition's index rejects the lookup.
- a busy partition's misses: ``cache_bench``'s partition (3,001 train
  questions, the one its miss path stores) and unseen train questions
  asked, served as above; the share of those the verifier does not serve that the stage
  rejects, i.e. that skip the embedding, and the hits it serves there that
  the stage loses.
- conversations: the development scenarios' same-context variants
  (``cache_conversations``), resolved as the cache resolves them (question
  and topic turn): the share the stage would reject against their own
  stored conversation alone, if multi-turn texts were held to the share.

Then the stage's own cost in the busy partition: analyzing an unseen
question and ``may_match`` at the default share, in this process; and the
memory its postings take per entry there (traced allocations of the busy
index less those of one as large whose questions have no words).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
import tracemalloc

import cache_bench
import cache_conversations
import cache_data
import numpy as np
import train_cache_verifier

from meshgate.config import CacheSettings
from services.cache import conversation, verifier
from services.cache.index import VectorIndex

SHARES = (0.0, 0.2, 0.25, 0.3, 0.34, 0.4, 0.5)
BUSY_ENTRIES = 3001
BUSY_ASKED = 2000
COST_CALLS = 1000


def _index(questions: list[str]) -> VectorIndex:
    """An index holding ``questions`` for the stage's postings only: one
    dimension, and never a graph (which would drop the postings)."""
    index = VectorIndex(1, max(1, len(questions)), approximate_from=10**9)
    vector = np.ones(1, np.float32)
    for seq, question in enumerate(questions, 1):
        index.upsert(f"e{seq}", seq, 2**62, vector, question)
    return index


def _traced_index_bytes(questions: list[str]) -> int:
    """What an index of ``questions`` holds in memory, words included: the
    analysis cache is emptied, so only the postings keep a word."""
    verifier.clear_analysis_memo()
    gc.collect()
    tracemalloc.start()
    try:
        index = _index(questions)
        verifier.clear_analysis_memo()
        gc.collect()
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del index
    return size


def _passes(index: VectorIndex, question: str, share: float) -> bool:
    return index.may_match(verifier.analyze(question).stems, share)


def _rate(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.3f})" if whole else "0/0"


@dataclasses.dataclass
class Portion:
    name: str
    # (asked, stored) of each labelled pair the verifier accepts alone.
    accepted_alone: list[tuple[str, str]]
    # Lookups the one-partition simulation serves, and its stored questions.
    served_lookups: list[str]
    partition: VectorIndex


def portion_data(
    name: str, pairs: list[cache_data.Pair], vectors, model: verifier.Verifier, prefilter: float
) -> Portion:
    accepted = []
    for p in pairs:
        asked, stored = vectors[p.asked], vectors[p.stored]
        if float(asked @ stored) >= prefilter and model.decide(p.asked, asked, p.stored, stored).accepted:
            accepted.append((p.asked, p.stored))
    simulated = train_cache_verifier.build_portion([p for p in pairs if p.category == "qqp"], vectors)
    served = train_cache_verifier.served(simulated, model, prefilter)
    return Portion(name, accepted, [simulated.lookups[i] for i, _, _ in served], _index(simulated.stored))


def main() -> None:
    started = time.perf_counter()
    settings = CacheSettings()
    model = verifier.Verifier.load(settings.max_false_hit_rate)
    prefilter = settings.semantic_threshold
    seen = [
        p for p in cache_data.load_qqp() + cache_data.load_traps() if p.portion in ("train", "calibration")
    ]
    stored, unseen = cache_bench.busy_partition_questions(BUSY_ENTRIES, BUSY_ASKED)
    vectors = cache_data.embeddings([q for p in seen for q in (p.stored, p.asked)] + stored + unseen)
    portions = [
        portion_data(name, [p for p in seen if p.portion == name], vectors, model, prefilter)
        for name in ("train", "calibration")
    ]

    busy = _index(stored)
    busy_lookups = train_cache_verifier.Portion(
        stored,
        np.stack([vectors[q] for q in stored]),
        unseen,
        np.stack([vectors[q] for q in unseen]),
        # Unlabelled: only which lookups are served is asked here.
        [set() for _ in unseen],
    )
    served_rows = {i for i, _, _ in train_cache_verifier.served(busy_lookups, model, prefilter)}
    busy_served = [q for i, q in enumerate(unseen) if i in served_rows]
    busy_missed = [q for i, q in enumerate(unseen) if i not in served_rows]

    same_context = []
    for s in cache_conversations.load(("train", "calibration")):
        stored_text, stored_multi = conversation.resolve(cache_bench.messages_of(s["stored"]))
        for variant in s["asked"]:
            asked_text, asked_multi = conversation.resolve(cache_bench.messages_of(variant["messages"]))
            if variant["should_hit"] and stored_multi and asked_multi:
                same_context.append((asked_text, _index([stored_text])))

    print(
        f"Verifier at max_false_hit_rate {settings.max_false_hit_rate}, pre-filter {prefilter}; "
        f"busy partition: {len(stored)} train questions, {len(unseen)} unseen train questions asked "
        f"({len(busy_served)} served, {len(busy_missed)} misses); {len(same_context)} same-context "
        f"conversation variants (train and calibration scenarios).\n"
    )
    header = ["share"]
    for p in portions:
        header += [f"{p.name}: hits lost, pairs alone", f"{p.name}: hits lost, one partition"]
    header += [
        "busy partition: misses rejected (no embedding)",
        "busy partition: hits lost",
        "conversations: same-context rejected",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for share in SHARES:
        cells = [f"{share:g}"]
        for p in portions:
            lost_alone = sum(1 for asked, s in p.accepted_alone if not _passes(_index([s]), asked, share))
            lost_one = sum(1 for asked in p.served_lookups if not _passes(p.partition, asked, share))
            cells += [_rate(lost_alone, len(p.accepted_alone)), _rate(lost_one, len(p.served_lookups))]
        rejected = sum(1 for q in busy_missed if not _passes(busy, q, share))
        lost_busy = sum(1 for q in busy_served if not _passes(busy, q, share))
        conversations_rejected = sum(1 for asked, index in same_context if not _passes(index, asked, share))
        cells += [
            _rate(rejected, len(busy_missed)),
            _rate(lost_busy, len(busy_served)),
            _rate(conversations_rejected, len(same_context)),
        ]
        print("| " + " | ".join(cells) + " |")

    # The stage's cost per lookup of an unseen question: its analysis
    # (uncached, as for a new question) and the postings count.
    share = settings.first_stage_word_share
    costs = []
    for question in (unseen * (COST_CALLS // len(unseen) + 1))[:COST_CALLS]:
        begin = time.perf_counter()
        busy.may_match(verifier.analyze_uncached(question).stems, share)
        costs.append((time.perf_counter() - begin) * 1e6)
    costs.sort()
    print(
        f"\nThe stage's cost in the busy partition at share {share:g} (analysis + may_match, "
        f"{len(costs)} calls): p50 {statistics.median(costs):.0f} us, "
        f"p99 {costs[int(0.99 * len(costs)) - 1]:.0f} us.",
    )
    postings_bytes = _traced_index_bytes(stored) - _traced_index_bytes([""] * len(stored))
    print(
        f"The postings' memory in the busy partition: {postings_bytes / len(stored):.0f} B an entry "
        f"({len(stored)} entries, words included; tracemalloc).",
    )
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
