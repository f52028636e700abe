"""How good is the semantic cache's threshold, on labelled data?

Embeds question pairs of Quora Question Pairs through a running inference
service and reports, per threshold, what the cache would do if question 1
were stored and question 2 looked up: precision of the hits, recall of the
duplicates, and the false-hit rate over the non-duplicates. Each pair is
judged on its own; a cache holding many entries offers more near misses to a
lookup, so treat these false-hit rates as lower bounds.

Then checks conversation context with the contextual queries: every
conversation's follow-up question is stored, and each follow-up is looked up
as if asked in its own conversation, whose entry is not there yet. Without
context-keyed sub-partitions any other conversation's follow-up above the
threshold would be served; with them only entries of identical earlier
messages are candidates.

    python bench/cache_quality.py --inference 127.0.0.1:50054
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import pathlib
import random
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Run as a plain script, the repository is not on the path.
sys.path.insert(0, str(REPO_ROOT))

from meshgate import serving  # noqa: E402
from meshgate.cache.v1 import cache_service_pb2  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.config import CacheSettings  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2_grpc  # noqa: E402
from services.cache import keys  # noqa: E402
from services.cache.embedder import Embedder  # noqa: E402

DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "semantic-pairs"
THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(16)]
MAX_FALSE_HIT_RATE = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "pairs_csv",
        nargs="?",
        type=pathlib.Path,
        default=DATA_DIR / "qqp_val.csv",
        help="question1,question2,is_duplicate rows (default: %(default)s)",
    )
    parser.add_argument("--contextual", type=pathlib.Path, default=DATA_DIR / "contextual_queries.json")
    parser.add_argument("--inference", default=CacheSettings().inference_address, help="host:port")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs drawn from the CSV")
    parser.add_argument("--seed", type=int, default=0, help="of the random draw of pairs")
    parser.add_argument("--batch", type=int, default=256, help="texts per Embed call")
    return parser.parse_args()


def load_pairs(path: pathlib.Path, count: int, seed: int) -> list[tuple[str, str, bool]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [
            (row["question1"], row["question2"], row["is_duplicate"].strip() == "1")
            for row in csv.DictReader(f)
        ]
    # A random draw keeps the duplicate share of the whole file; the file's
    # own order is not shuffled.
    return random.Random(seed).sample(rows, min(count, len(rows)))


async def embed_all(embedder: Embedder, texts: list[str], batch: int) -> dict[str, np.ndarray]:
    unique = list(dict.fromkeys(keys.normalize_text(t) for t in texts))
    vectors = {}
    for start in range(0, len(unique), batch):
        chunk = unique[start : start + batch]
        for text, vector in zip(chunk, await embedder.embed(chunk)):
            vectors[text] = vector
    return vectors


def pair_table(similarities: np.ndarray, duplicate: np.ndarray) -> list[dict[str, float]]:
    rows = []
    duplicates, others = int(duplicate.sum()), int((~duplicate).sum())
    for threshold in THRESHOLDS:
        hit = similarities >= threshold
        true_hits = int((hit & duplicate).sum())
        false_hits = int((hit & ~duplicate).sum())
        hits = true_hits + false_hits
        rows.append(
            {
                "threshold": threshold,
                "precision": true_hits / hits if hits else 1.0,
                "recall": true_hits / duplicates if duplicates else 0.0,
                "false_hit_rate": false_hits / others if others else 0.0,
            }
        )
    return rows


def contextual_best(chains: list[dict], vectors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per follow-up, its best similarity among the other conversations'
    follow-ups: across all of them, and within its own sub-partition."""
    partition = keys.partition(cache_service_pb2.CacheScope(tenant_id="bench", model="bench"))
    contexts = [
        keys.context_id(
            partition,
            [
                common_pb2.Message(role=common_pb2.ROLE_USER, content=chain["Main Query"]),
                common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=chain["Main Query Response"]),
            ],
            "bench",
        )
        for chain in chains
    ]
    matrix = np.stack([vectors[keys.normalize_text(c["Follow-Up Query"])] for c in chains])
    similarities = matrix @ matrix.T
    np.fill_diagonal(similarities, -1.0)
    same_context = np.array([[a == b for b in contexts] for a in contexts])
    within = np.where(same_context, similarities, -1.0)
    return similarities.max(axis=1), within.max(axis=1)


def print_report(
    pairs: list[tuple[str, str, bool]],
    table: list[dict[str, float]],
    chains: list[dict],
    without_context: np.ndarray,
    with_context: np.ndarray,
    embed_rate: float,
) -> None:
    duplicates = sum(d for _, _, d in pairs)
    print(
        f"\n{len(pairs)} QQP pairs ({duplicates} duplicates, {len(pairs) - duplicates} not), "
        f"{len(chains)} contextual chains; embeddings at {embed_rate:.0f} texts/s.\n"
    )
    print(
        "| threshold | precision | recall (duplicates) | false-hit rate (non-duplicates) "
        "| follow-ups wrongly served, no context keys | with context keys |"
    )
    print("|---|---|---|---|---|---|")
    for row in table:
        t = row["threshold"]
        print(
            f"| {t:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | {row['false_hit_rate']:.3f} "
            f"| {(without_context >= t).mean():.3f} | {(with_context >= t).mean():.3f} |"
        )
    acceptable = [row for row in table if row["false_hit_rate"] <= MAX_FALSE_HIT_RATE]
    if acceptable:
        best = acceptable[0]
        print(
            f"\nRecommended semantic_threshold: {best['threshold']:.2f} (lowest with a false-hit rate "
            f"<= {MAX_FALSE_HIT_RATE:.0%}: {best['false_hit_rate']:.3f}; precision "
            f"{best['precision']:.3f}, recall {best['recall']:.3f})"
        )
    else:
        print(f"\nNo threshold up to {THRESHOLDS[-1]} keeps the false-hit rate <= {MAX_FALSE_HIT_RATE:.0%}.")


async def main() -> None:
    args = parse_args()
    pairs = load_pairs(args.pairs_csv, args.pairs, args.seed)
    chains = json.loads(args.contextual.read_text(encoding="utf-8"))
    texts = [q for a, b, _ in pairs for q in (a, b)] + [c["Follow-Up Query"] for c in chains]

    channel = serving.client_channel(args.inference)
    try:
        # Batches of hundreds of texts take longer than one question does.
        embedder = Embedder(inference_service_pb2_grpc.InferenceServiceStub(channel), timeout_s=120.0)
        started = time.perf_counter()
        vectors = await embed_all(embedder, texts, args.batch)
        embed_rate = len(vectors) / (time.perf_counter() - started)
    finally:
        await channel.close()

    first = np.stack([vectors[keys.normalize_text(a)] for a, _, _ in pairs])
    second = np.stack([vectors[keys.normalize_text(b)] for _, b, _ in pairs])
    similarities = np.einsum("ij,ij->i", first, second)
    duplicate = np.array([d for _, _, d in pairs])
    without_context, with_context = contextual_best(chains, vectors)
    print_report(
        pairs, pair_table(similarities, duplicate), chains, without_context, with_context, embed_rate
    )


if __name__ == "__main__":
    asyncio.run(main())
