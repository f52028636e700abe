"""The semantic index at scale: one partition of 10k, 100k and 1M entries.

    .venv/bin/python bench/cache_scale_bench.py            # or: make bench-cache
    .venv/bin/python bench/cache_scale_bench.py --sizes 10000,100000

Vectors are SYNTHETIC: 384-dimension unit vectors drawn around random
centres (clusters of about 50 per size, like the topics real questions
gather in), not embeddings of real text, which would take hours to embed on
this machine. Queries are stored vectors nudged by noise to cosine ~0.89
with them, as a paraphrase lands near its question (the service's
pre-filter is 0.8). Latency and recall depend on the geometry, so they are
indicative of real embeddings, not identical.

For each size, Redis is emptied and filled through the cache's own Store
script (``CacheStore.put_semantic``), one partition, one sub-partition. The
resident index is then rebuilt from Redis as after a restart (the
service's own load, ``_synced``, which applies each batch read before the
next, then the first search, which hands the rows to a worker thread that
adds them to the graph) and timed: the whole rebuild, the longest the event
loop was held meanwhile (how long a lookup of another partition would have
waited), and lookups answered meanwhile (by the exact scan); then:

- lookup latency: the index search of a lookup (``nearest`` with the
  service's candidate count and pre-filter), excluding the embedding and the
  verifier (constant per lookup, measured by cache_bench.py): wall time,
  which includes being preempted when other processes want the cores, and
  the CPU time of the search itself (``time.thread_time``);
- recall at 100k and above: the share of the exact scan's best
  ``MAX_CANDIDATES`` that the index returns;
- memory per entry: the index's arrays and graph (measured), the Python ids
  and texts (tracemalloc on a 10k sample), and Redis's (INFO used_memory).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pathlib
import sys
import tempfile
import time
import tracemalloc

# As the cache service runs (services/cache/__main__.py): one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import uvloop  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshgate import redis_access  # noqa: E402
from meshgate.cache.v1 import cache_service_pb2 as pb  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.config import CacheSettings  # noqa: E402
from meshgate.local import redis_server  # noqa: E402
from meshgate.local.stack import free_port  # noqa: E402
from services.cache import keys  # noqa: E402
from services.cache.index import IndexRegistry, VectorIndex  # noqa: E402
from services.cache.servicer import MAX_CANDIDATES, CacheServicer  # noqa: E402
from services.cache.stats import Stats  # noqa: E402
from services.cache.store import CacheStore  # noqa: E402

DIMENSIONS = 384
CLUSTER_SIZE = 50
QUERIES = 2000
RECALL_QUERIES = 500
# Lookups timed while the graph is built off the loop, 50 ms apart.
DURING_REBUILD_SEARCHES = 40
FAR_FUTURE_TTL_MS = 7 * 24 * 3600 * 1000


def synthetic_vectors(rng: np.random.Generator, count: int, centres: np.ndarray) -> np.ndarray:
    vectors = centres[rng.integers(0, len(centres), count)]
    vectors = vectors + 0.6 * rng.standard_normal((count, DIMENSIONS), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def nudged(rng: np.random.Generator, vectors: np.ndarray) -> np.ndarray:
    # Noise of norm 0.5 on a unit vector: cosine ~0.89 with it.
    noise = rng.standard_normal(vectors.shape, dtype=np.float32) * (0.5 / np.sqrt(DIMENSIONS))
    queries = vectors + noise
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


async def longest_loop_stall(tick_s: float = 0.005) -> float:
    """Until cancelled, the longest time (ms) the event loop was held past a
    5 ms timer: how long a lookup of another partition would have waited."""
    longest = 0.0
    try:
        while True:
            due = time.perf_counter() + tick_s
            await asyncio.sleep(tick_s)
            longest = max(longest, time.perf_counter() - due)
    except asyncio.CancelledError:
        return longest * 1000


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000, q))


async def fill(store: CacheStore, partition, context_id: str, vectors: np.ndarray, first: int) -> None:
    answer = pb.CachedAnswer(text="a synthetic answer", finish_reason="stop").SerializeToString()
    now_ms = time.time_ns() // 1_000_000
    batch = 512
    for start in range(0, len(vectors), batch):
        await asyncio.gather(
            *(
                store.put_semantic(
                    partition,
                    context_id,
                    f"{first + start + i:032x}",
                    answer,
                    vector.tobytes(),
                    f"synthetic question {first + start + i}",
                    now_ms,
                    FAR_FUTURE_TTL_MS,
                )
                for i, vector in enumerate(vectors[start : start + batch])
            )
        )


def python_bytes_per_entry(rng: np.random.Generator, centres: np.ndarray) -> float:
    """The ids, texts and row maps of an index, per entry, on a 10k sample
    with the graph on (the arrays and graph are counted separately)."""
    count = 10_000
    vectors = synthetic_vectors(rng, count, centres)
    gc.collect()
    tracemalloc.start()
    index = VectorIndex(DIMENSIONS, count, approximate_from=1)
    before = tracemalloc.get_traced_memory()[0]
    for i, vector in enumerate(vectors):
        index.upsert(f"{i:032x}", i + 1, 2**62, vector, f"synthetic question {i}")
    index.nearest(vectors[0], 0, 1)  # hands the pending rows to the graph's worker
    index.wait_for_graph()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # tracemalloc sees the numpy arrays too; they are counted exactly elsewhere.
    arrays = index._vectors.nbytes + index._seqs.nbytes + index._expires_ms.nbytes
    return (traced - arrays) / count


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = np.random.default_rng(20261201)

    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        process = redis_server.launch(port, pathlib.Path(data_dir))
        try:
            redis_server.wait_ready(port)
            client = await redis_access.connect_checked(f"redis://127.0.0.1:{port}/0")
            settings = CacheSettings()
            store = CacheStore(client, settings.max_entries_per_partition)
            scope = pb.CacheScope(
                tenant_id="bench-scale", model="tiny-gpt", parameters=common_pb2.GenerationParameters()
            )
            partition = keys.partition(scope)
            context_id = keys.context_id(partition, settings.embedding_model)
            print(
                "| entries | store (s) | rebuild from Redis (s) | longest loop stall meanwhile (ms) |"
                " search during rebuild p50 (ms) | approximate | search p50 (ms) |"
                " search p99 (ms) | search CPU p50 (ms) | search CPU p99 (ms) | recall@5 vs exact |"
                " index bytes/entry | Redis bytes/entry |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for size in sizes:
                await client.flushdb()
                redis_base = int((await client.info("memory"))["used_memory"])
                centres = rng.standard_normal((size // CLUSTER_SIZE + 1, DIMENSIONS), dtype=np.float32)
                vectors = synthetic_vectors(rng, size, centres)
                started = time.perf_counter()
                await fill(store, partition, context_id, vectors, 0)
                del vectors
                fill_s = time.perf_counter() - started
                redis_bytes = int((await client.info("memory"))["used_memory"]) - redis_base

                # A restarted service: empty registry, the index rebuilt from Redis.
                gc.collect()
                indexes = IndexRegistry(
                    settings.max_entries_per_partition,
                    settings.max_resident_rows,
                    settings.approximate_index_from,
                )
                servicer = CacheServicer(settings, store, None, Stats(client), indexes, None)
                stall = asyncio.ensure_future(longest_loop_stall())
                started = time.perf_counter()
                index, _ = await servicer._synced(partition, context_id, DIMENSIONS)
                now_ms = time.time_ns() // 1_000_000
                index.nearest(np.eye(DIMENSIONS, dtype=np.float32)[0], now_ms, 1)
                assert len(index) == size, (len(index), size)
                resident = index._vectors[: len(index)]
                queries = nudged(rng, resident[rng.integers(0, size, QUERIES)])
                # Lookups meanwhile are answered by the exact scan, on the loop.
                during = []
                while index.building and len(during) < DURING_REBUILD_SEARCHES:
                    began = time.perf_counter()
                    index.nearest(queries[len(during)], now_ms, MAX_CANDIDATES, settings.semantic_threshold)
                    during.append(time.perf_counter() - began)
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(index.wait_for_graph)
                index.nearest(queries[0], now_ms, 1)  # the graph back in service
                rebuild_s = time.perf_counter() - started
                stall.cancel()
                loop_stall_ms = await stall
                timings, cpu = [], []
                for query in queries:
                    began, began_cpu = time.perf_counter(), time.thread_time()
                    index.nearest(query, now_ms, MAX_CANDIDATES, settings.semantic_threshold)
                    timings.append(time.perf_counter() - began)
                    cpu.append(time.thread_time() - began_cpu)
                recall = "-"
                if index.approximate:
                    agreed = 0
                    for query in queries[:RECALL_QUERIES]:
                        similarities = resident @ query
                        best = np.argpartition(-similarities, MAX_CANDIDATES)[:MAX_CANDIDATES]
                        expected = {index._ids[row] for row in best.tolist()}
                        found = {m.entry_id for m in index.nearest(query, now_ms, MAX_CANDIDATES)}
                        agreed += len(expected & found)
                    recall = f"{agreed / (MAX_CANDIDATES * RECALL_QUERIES):.4f}"
                print(
                    f"| {size:,} | {fill_s:.1f} | {rebuild_s:.1f} | {loop_stall_ms:.0f} |"
                    f" {percentile_ms(during, 50) if during else float('nan'):.1f} | {index.approximate} |"
                    f" {percentile_ms(timings, 50):.3f} | {percentile_ms(timings, 99):.3f} |"
                    f" {percentile_ms(cpu, 50):.3f} | {percentile_ms(cpu, 99):.3f} | {recall} |"
                    f" {index.resident_bytes / size:,.0f} | {redis_bytes / size:,.0f} |",
                    flush=True,
                )
                del index, indexes, servicer, resident
            sample_centres = rng.standard_normal((10_000 // CLUSTER_SIZE, DIMENSIONS), dtype=np.float32)
            python_bytes = python_bytes_per_entry(rng, sample_centres)
            print(
                f"\nPython ids, texts and row maps: {python_bytes:,.0f} bytes/entry"
                " (tracemalloc, 10k sample), on top of the index bytes above."
            )
            await client.aclose()
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    uvloop.run(main())
