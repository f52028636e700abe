"""What one streamed token's metrics cost in the router's process, in isolation.

    .venv/bin/python bench/metrics_microbench.py [--iterations 200000]

Process CPU time per iteration, on a registry of its own, of: the inter-token
histogram observation the router makes per token (a label child bound once
per turn, as services/router/pipeline.py does); a counter increment plus
that observation with bound children; and the same looking the children up
by label each time. (The OpenTelemetry SDK with its Prometheus reader, 9.3 us
for the counter-plus-histogram case, was measured once with a script not
kept, with opentelemetry-exporter-prometheus installed for that run only.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from meshgate.metrics import INTER_TOKEN_BUCKETS  # noqa: E402


def per_iteration_us(work, iterations: int) -> float:
    started = time.process_time()
    for _ in range(iterations):
        work()
    return (time.process_time() - started) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    args = parser.parse_args()
    registry = CollectorRegistry()
    tokens = Counter("bench_tokens", "tokens", ["model"], registry=registry)
    gaps = Histogram("bench_gap_seconds", "gaps", ["model", "deployment"], buckets=INTER_TOKEN_BUCKETS,
                     registry=registry)  # fmt: skip
    bound_tokens, bound_gaps = tokens.labels("m"), gaps.labels("m", "d")
    cases = {
        "inter-token observation, bound child": lambda: bound_gaps.observe(0.004),
        "counter + histogram, bound children": lambda: (bound_tokens.inc(), bound_gaps.observe(0.004)),
        "counter + histogram, looked up by label": lambda: (
            tokens.labels("m").inc(),
            gaps.labels("m", "d").observe(0.004),
        ),
    }
    for name, work in cases.items():
        print(f"{name}: {per_iteration_us(work, args.iterations):.2f} us")


if __name__ == "__main__":
    main()
