"""The cache's in-process embedder under concurrent lookups: one or two
worker threads, and batching the texts that wait (tried, not used).

Offline (no services): the real minilm (``meshgate.minilm.MiniLM``, one
onnxruntime thread per run), asked for unseen QQP train questions by
``--concurrency`` callers at once, as concurrent semantic lookups ask the
cache service. Four ways to run it, rounds interleaved so the shared
machine's drift hits all alike:

- ``LocalEmbedder`` as the cache runs it: two worker threads, one text per run;
- the same on one thread;
- a collector on one or two threads: the texts that arrived while every
  worker was busy go as the next run, one padded batch (at most 32).

Prints texts per second and each call's latency (p50, p99).

    flock /tmp/bench.lock .venv/bin/python bench/local_embedder_probe.py [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cache_data  # noqa: E402

from meshgate.embedding import LocalEmbedder  # noqa: E402
from meshgate.minilm import MiniLM  # noqa: E402


class Collector:
    """The alternative measured against one text per run: at most
    ``workers`` runs at once; texts asked while all are busy wait and go
    together as the next run (at most ``max_batch``)."""

    def __init__(self, model: MiniLM, workers: int, max_batch: int = 32) -> None:
        self._model = model
        self._workers = workers
        self._max_batch = max_batch
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._waiting: list[tuple[str, asyncio.Future]] = []
        self._running = 0

    async def embed_or_none(self, text: str):
        vector = asyncio.get_running_loop().create_future()
        self._waiting.append((text, vector))
        if self._running < self._workers:
            self._run_waiting()
        return await vector

    def _run_waiting(self) -> None:
        batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
        self._running += 1
        run = asyncio.get_running_loop().run_in_executor(self._pool, self._model.embed, [t for t, _ in batch])
        run.add_done_callback(lambda done: self._landed(batch, done))

    def _landed(self, batch, run) -> None:
        self._running -= 1
        for (_, vector), row in zip(batch, run.result()):
            vector.set_result(row)
        if self._waiting:
            self._run_waiting()

    def close(self) -> None:
        self._pool.shutdown()


async def drive(embed, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Seconds to embed ``texts`` with ``concurrency`` callers, and each call's ms."""
    latencies: list[float] = []
    queue = iter(texts)

    async def caller() -> None:
        for text in queue:
            started = time.perf_counter()
            if await embed(text) is None:
                raise RuntimeError(f"no vector for {text!r}")
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def main_async(args) -> None:
    questions = list(dict.fromkeys(p.asked for p in cache_data.load_qqp() if p.portion == "train"))
    model = MiniLM(threads=1)
    embedders = {
        "LocalEmbedder: two threads, one text per run (the cache's)": LocalEmbedder(model, workers=2),
        "LocalEmbedder on one thread": LocalEmbedder(model, workers=1),
        "collector, two threads: waiting texts batched": Collector(model, workers=2),
        "collector, one thread: waiting texts batched": Collector(model, workers=1),
    }
    await next(iter(embedders.values())).embed_or_none("warm up")
    seconds: dict[str, list[float]] = {name: [] for name in embedders}
    latencies: dict[str, list[float]] = {name: [] for name in embedders}
    texts = iter(questions)
    for _ in range(args.rounds):
        for name, embedder in embedders.items():
            # Each way its own questions, as many and of the same kind.
            chunk = [next(texts) for _ in range(args.texts)]
            elapsed, calls = await drive(embedder.embed_or_none, chunk, args.concurrency)
            seconds[name].append(elapsed)
            latencies[name] += calls
    for embedder in embedders.values():
        embedder.close()
    print(
        f"\n{args.rounds} rounds of {args.texts} unseen QQP train questions per way, "
        f"concurrency {args.concurrency}, interleaved\n"
    )
    print("| way | texts/s (median round) | call p50 (ms) | call p99 (ms) |")
    print("|---|---|---|---|")
    for name in embedders:
        rate = args.texts / statistics.median(seconds[name])
        calls = sorted(latencies[name])
        print(
            f"| {name} | {rate:.0f} | {statistics.median(calls):.1f} | {calls[int(0.99 * len(calls))]:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--texts", type=int, default=96, help="questions per way and round")
    parser.add_argument("--rounds", type=int, default=7)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
