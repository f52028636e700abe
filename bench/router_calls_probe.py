"""Where two routers' CPU an answer differs, counted rather than timed.

    .venv/bin/python bench/router_calls_probe.py --against TREE [--requests 200]

The streamed A/B (``mesh_bench.py --against TREE --skip-hits``) times each
router's CPU an answer, and on a shared 2-core machine a +2 ms difference
takes many rounds to tell from noise and says nothing of where it comes
from. This probe runs two extra routers on one stack (its Redis, cache,
context, inference and Triton), one from this checkout and one from
``TREE``, each under cProfile, sends each the same streamed answers at
concurrency 1 (cache bypassed, every prompt new, alternating between the
two), stops them (SIGTERM: a graceful stop, so cProfile writes its file),
and prints per answer: Python function calls in all, and the functions
whose calls an answer differ most between the two. Calls are counted, not
timed, so the machine's noise moves them little (deltas an answer still
vary with timing: both sides' are printed). cProfile sees the main thread
only: work in gRPC's core or in threads is not in it.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import pstats
import signal
import sys
import tempfile
import time

import grpc
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mesh_bench import API_KEY, run_load, start_router_from, through_router  # noqa: E402

from meshgate.config import InferenceSettings  # noqa: E402
from meshgate.local.stack import Ports, Stack, free_port  # noqa: E402
from meshgate.router.v1 import router_service_pb2_grpc  # noqa: E402

WARM_UP = 8  # answers each router gets first
PROMPT_NUMBERS = itertools.count()


def calls_by_function(profile: pathlib.Path) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """Calls in all, seconds in all (cProfile's own, inflated by it alike on
    both sides), and calls and own seconds by function."""
    stats = pstats.Stats(str(profile))
    by_function, seconds = {}, {}
    for (filename, _line, function), (_, ncalls, tottime, *_rest) in stats.stats.items():
        # Paths differ between the two trees; the file's name inside the
        # repository (or the library's) names the function on both sides.
        short = filename.split("/main/")[-1].split("/old/")[-1].split("site-packages/")[-1]
        # Lines move between trees: a function is its file and name.
        key = f"{short}({function})"
        by_function[key] = by_function.get(key, 0) + ncalls
        seconds[key] = seconds.get(key, 0.0) + tottime
    return stats.total_calls, stats.total_tt, by_function, seconds


async def drive(stack: Stack, args, names: dict[str, str]) -> dict[str, list[int]]:
    """Each side's answers, alternating sides round by round; returns each
    side's completion tokens an answer (deltas vary with timing)."""
    tokens = {side: [] for side in names}
    channels = {side: grpc.aio.insecure_channel(stack.address(name)) for side, name in names.items()}
    try:
        stubs = {side: router_service_pb2_grpc.RouterServiceStub(ch) for side, ch in channels.items()}

        def path(side):
            # Every prompt new (no coalescing, no prefix reuse between calls).
            return lambda p: through_router(
                stubs[side], f"{names[side]} {next(PROMPT_NUMBERS)}: {p}", args.max_tokens, model=args.model
            )

        rounds = 4
        for round_number in range(rounds):
            order = list(names) if round_number % 2 == 0 else list(reversed(names))
            for side in order:
                samples, _ = await run_load(path(side), 1, args.requests // rounds)
                tokens[side] += [sample.tokens for sample in samples]
    finally:
        for channel in channels.values():
            await channel.close()
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", metavar="TREE", required=True)
    parser.add_argument("--requests", type=int, default=200, help="answers a side, after the warm-up's")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="tiny-gpt", choices=sorted(InferenceSettings().models))
    parser.add_argument("--top", type=int, default=25, help="functions shown, by difference")
    args = parser.parse_args()
    trees = {"this": ROOT, "against": pathlib.Path(args.against).resolve()}
    # Two routers a tree: one answers the warm-up only, the other the warm-up
    # and the measured answers; their profiles' difference is the measured
    # answers' alone (the start, imports and the stop cancel out).
    runs = {(side, phase): f"router-{side}-{phase}" for side in trees for phase in ("base", "run")}
    with tempfile.TemporaryDirectory(prefix="meshgate-calls-") as state_dir:
        state = pathlib.Path(state_dir)
        profiles = {run: state / f"{name}.prof" for run, name in runs.items()}
        stack = Stack(
            state,
            Ports(*(free_port() for _ in range(6))),
            dev_api_key=API_KEY,
            log_level="warning",
            triton_models=(InferenceSettings().models[args.model].triton_model, "minilm"),
        )
        with stack:
            for (side, phase), name in runs.items():
                profiled = ("-m", "cProfile", "-o", str(profiles[side, phase]))
                start_router_from(stack, trees[side], name, profiled)
            warm = argparse.Namespace(**{**vars(args), "requests": WARM_UP})
            uvloop.run(drive(stack, warm, dict(runs.items())))  # imports, channels, the model's caches
            tokens = uvloop.run(drive(stack, args, {side: runs[side, "run"] for side in trees}))
            for name in runs.values():
                process = stack.processes.pop(name)
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        deadline = time.monotonic() + 10
        while not all(p.exists() for p in profiles.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        counted = {run: calls_by_function(profile) for run, profile in profiles.items()}
    answers = {side: len(tokens[side]) for side in trees}
    calls, seconds = {}, {}
    for side in trees:
        _, _, run_calls, run_seconds = counted[side, "run"]
        _, _, base_calls, base_seconds = counted[side, "base"]
        calls[side] = {f: (n - base_calls.get(f, 0)) / answers[side] for f, n in run_calls.items()}
        seconds[side] = {f: (t - base_seconds.get(f, 0.0)) / answers[side] for f, t in run_seconds.items()}
    print(
        f"model {args.model}, max_tokens {args.max_tokens}, {args.requests} measured answers a side "
        f"after {WARM_UP} to warm up; figures an answer (a run's profile less its base's)\n"
    )
    print("| side | tree | completion tokens an answer | Python calls an answer | profiled ms an answer |")
    print("|---|---|---|---|---|")
    for side, tree in trees.items():
        mean_tokens = sum(tokens[side]) / max(1, len(tokens[side]))
        total_calls = sum(calls[side].values())
        total_ms = sum(seconds[side].values()) * 1000
        print(f"| {side} | {tree} | {mean_tokens:.1f} | {total_calls:.0f} | {total_ms:.2f} |")
    for title, figures, unit in (("calls", calls, 1.0), ("profiled µs", seconds, 1e6)):
        this, against = figures["this"], figures["against"]
        differences = sorted(
            (((this.get(f, 0) - against.get(f, 0)) * unit, f) for f in this.keys() | against.keys()),
            key=lambda item: -abs(item[0]),
        )
        print(f"\n| {title} an answer, this - against | this | against | function |\n|---|---|---|---|")
        for difference, function in differences[: args.top]:
            print(
                f"| {difference:+.1f} | {this.get(function, 0) * unit:.1f} "
                f"| {against.get(function, 0) * unit:.1f} | `{function}` |"
            )


if __name__ == "__main__":
    main()
