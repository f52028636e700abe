"""Routing strategies over two Triton servers, measured in one run.

    .venv/bin/python bench/routing_bench.py            # or: make bench-routing

Starts two real Triton servers (smollm2 only, each with its own prefix
cache) and, per strategy, the real inference service in front of both (in
this process, over gRPC on 127.0.0.1). Three workloads:

- shared prefixes: many users, each request one of a few long system
  prompts (~1,000 tokens) plus a short question of its own;
- unrelated prompts: word salads of ~400 tokens, no two alike;
- sessions: many chat sessions, each a history of its own (~450 tokens)
  that every turn extends; the sessions take turns in rounds, each round in
  a new order, so a session comes back after the others' turns, as chat
  users do (a server's index that kept only its last conversation, a bug
  fixed in f51148e, routes most of them away from their prefix).

Per workload and strategy: time to first token p50/p99, output tokens per
second over the phase, the share of prompt tokens the models served from
their prefix caches (Triton's meshgate_prefix_cache_* metrics, read before
and after each phase), and how the requests split over the two servers.
Each phase uses prompts of its own, so one phase's cached prefixes never
help the next.

The models' prefix caches are sized (--prefix-cache-mib, a copy of the
model repository with that config) so that the system prompts together
overflow one server's cache but fit in both: the case where the place a
request goes decides whether its prefix is cached. With caches larger than
every prompt together, any strategy ends up with every prefix everywhere.
The machine is shared and noisy: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request

import grpc
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_bench import percentile  # noqa: E402

from meshgate import serving, tokenization  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.config import (  # noqa: E402
    SMOLLM2_CHAT_TEMPLATE,
    SMOLLM2_TOKENIZER,
    InferenceSettings,
    MeshSettings,
    ServedModelSettings,
    Settings,
    TelemetrySettings,
)
from meshgate.inference.v1 import inference_service_pb2 as inference_pb  # noqa: E402
from meshgate.inference.v1 import inference_service_pb2_grpc  # noqa: E402
from meshgate.local import triton  # noqa: E402
from meshgate.local.stack import free_port  # noqa: E402
from services.inference import app as inference_app  # noqa: E402

MODEL = "smollm2"
QUESTIONS = [
    "How do I reset my password?",
    "Can I change the delivery address after ordering?",
    "What does the premium plan include?",
    "Why was my card declined?",
    "How long does a refund take?",
    "Is there a student discount?",
    "Where can I download my invoice?",
    "How do I cancel my subscription?",
]
_WORDS = [
    *("account", "billing", "customer", "delivery", "invoice", "order", "payment", "plan", "policy"),
    *("product", "refund", "renewal", "request", "schedule", "service", "shipment", "subscription"),
    *("support", "ticket", "warranty", "agent", "always", "never", "politely", "briefly", "clearly"),
    *("escalate", "confirm", "verify", "explain", "apologise"),
]


def words_to_tokens(rng: random.Random, tokens: int, opening: str = "") -> str:
    """Text of at least `tokens` smollm2 tokens (counted, not guessed)."""
    tokenizer = tokenization.load(SMOLLM2_TOKENIZER)
    pieces = [opening]
    while len(tokenizer.encode(" ".join(pieces), add_special_tokens=False).ids) < tokens:
        pieces.append(" ".join(rng.choice(_WORDS) for _ in range(12)) + ".")
    return " ".join(pieces)


def shared_prefix_requests(phase: int, args) -> list[list[common_pb2.Message]]:
    rng = random.Random(1000 + phase)
    systems = [
        words_to_tokens(rng, args.system_tokens, f"You are support agent {phase}-{k} of company {k}.")
        for k in range(args.system_prompts)
    ]
    requests = []
    for i in range(args.requests):
        system = rng.choice(systems)
        question = f"{rng.choice(QUESTIONS)} (ticket {phase}-{i})"
        requests.append(
            [
                common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=system),
                common_pb2.Message(role=common_pb2.ROLE_USER, content=question),
            ]
        )
    return requests


def unrelated_requests(phase: int, args) -> list[list[common_pb2.Message]]:
    rng = random.Random(2000 + phase)
    requests = []
    for i in range(args.unrelated_requests):
        text = words_to_tokens(rng, args.unrelated_tokens, f"Request {phase}-{i}: {rng.random()}")
        requests.append([common_pb2.Message(role=common_pb2.ROLE_USER, content=text)])
    return requests


def session_rounds(phase: int, args) -> list[list[list[common_pb2.Message]]]:
    """The turns of ``args.sessions`` sessions in ``args.turns`` rounds: in
    round k every session sends its k-th turn, its whole conversation so
    far (a fixed assistant reply stands for each earlier answer: the
    prefix cache matches prompt tokens, so turn k's prompt is a prefix of
    turn k+1's whatever the model said), the sessions in a new order each
    round. Rounds run one after the other, so a session's turn never
    overtakes its previous one."""
    rng = random.Random(3000 + phase)
    histories = [
        [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=f"You help customer {phase}-{s}."),
            common_pb2.Message(
                role=common_pb2.ROLE_USER,
                content=words_to_tokens(rng, args.session_tokens, f"Session {phase}-{s}, my history:"),
            ),
        ]
        for s in range(args.sessions)
    ]
    rounds = []
    for turn in range(args.turns):
        if turn:
            for history in histories:
                history.append(common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Noted, go on."))
                question = f"{rng.choice(QUESTIONS)} (turn {turn})"
                history.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=question))
        order = list(range(args.sessions))
        rng.shuffle(order)
        rounds.append([list(histories[s]) for s in order])
    return rounds


def prefix_cache_counters(metrics_urls: list[str]) -> dict[str, float]:
    """Prompt tokens looked up and served from cache, all servers together."""
    totals = {"queried": 0.0, "hit": 0.0}
    for url in metrics_urls:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for name, key in (("queried_tokens", "queried"), ("hit_tokens", "hit")):
            for value in re.findall(rf"^meshgate_prefix_cache_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M):
                totals[key] += float(value)
    return totals


def model_repository_with_cache(target: pathlib.Path, cache_mib: int) -> pathlib.Path:
    """smollm2 and the shared generation code, with the prefix cache resized."""
    source = ROOT / "model_repository"
    for name in ("smollm2", "generation"):
        shutil.copytree(source / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / "smollm2" / "config.pbtxt"
    text, count = re.subn(
        r'(key: "prefix_cache_bytes"\s*value: \{ string_value: ")\d+(")',
        rf"\g<1>{cache_mib * 1024 * 1024}\g<2>",
        config.read_text(),
    )
    if count != 1:
        raise RuntimeError("smollm2/config.pbtxt has no prefix_cache_bytes parameter to resize")
    config.write_text(text)
    return target


async def run_phase(strategy: str, triton_urls: list[str], rounds, args) -> dict:
    """``rounds``: lists of requests, each list driven once the one before
    it has ended."""
    settings = Settings(
        mesh=MeshSettings(tls=False),
        telemetry=TelemetrySettings(metrics=False),
        inference=InferenceSettings(
            triton_urls=triton_urls,
            health_interval_s=0.5,
            # The index believes a server holds what its cache can (46,080
            # bytes a smollm2 token: 30 layers x K and V x 3 heads x 64 x 4).
            prefix_index_blocks=args.prefix_cache_mib * 1024 * 1024 // 46_080 // 16,
            models={
                MODEL: ServedModelSettings(
                    triton_model=MODEL,
                    context_window_tokens=8192,
                    chat_template=SMOLLM2_CHAT_TEMPLATE,
                    tokenizer=SMOLLM2_TOKENIZER,
                    routing_strategy=strategy,
                )
            },
        ),
    )
    service = serving.Service("inference", inference_app.SERVICE_NAMES)
    cleanup = await inference_app.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            await wait_both_ready(stub, len(triton_urls))
            return await drive(stub, rounds, args)
    finally:
        await serving.stop(service, grace_s=1)


async def wait_both_ready(stub, backends: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = await stub.GetBackendHealth(inference_pb.GetBackendHealthRequest())
        if sum(b.ready for b in health.backends) == backends:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the inference service never saw both Triton servers ready")


async def drive(stub, rounds, args) -> dict:
    parameters = common_pb2.GenerationParameters(max_tokens=args.max_tokens, temperature=0.0)
    queue = []
    ttfts, per_backend, output_tokens = [], {}, 0

    async def one(messages) -> None:
        nonlocal output_tokens
        started = time.monotonic()
        first = None
        call = stub.Generate(
            # One tenant's turns, as the router sends them: a request naming no
            # tenant waits as background work, within a quarter of the slots.
            inference_pb.GenerateRequest(
                model=MODEL, messages=messages, parameters=parameters, tenant_id="bench"
            ),
            timeout=600,
        )
        async for response in call:
            if response.HasField("delta") and first is None:
                first = time.monotonic() - started
            elif response.HasField("completion"):
                output_tokens += response.completion.usage.completion_tokens
                backend = response.completion.backend
                per_backend[backend] = per_backend.get(backend, 0) + 1
        ttfts.append(first if first is not None else time.monotonic() - started)

    async def worker() -> None:
        while queue:
            await one(queue.pop(0))

    started = time.monotonic()
    for requests in rounds:
        queue.extend(requests)
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.monotonic() - started
    return {
        "p50": percentile(ttfts, 0.50),
        "p99": percentile(ttfts, 0.99),
        "tokens_per_s": output_tokens / wall,
        "wall": wall,
        "split": sorted(per_backend.values(), reverse=True),
    }


async def main_async(args, triton_urls: list[str], metrics_urls: list[str]) -> list[str]:
    rows = [
        "| workload | strategy | TTFT p50 (s) | TTFT p99 (s) | output tokens/s | prompt tokens from cache | "
        "requests per server | phase (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    phase = 0
    results = {}
    workloads = {
        "shared prefixes": lambda phase: [shared_prefix_requests(phase, args)],
        "unrelated": lambda phase: [unrelated_requests(phase, args)],
        "sessions": lambda phase: session_rounds(phase, args),
    }
    for workload in args.workloads:
        for strategy in args.strategies:
            phase += 1
            rounds = workloads[workload](phase)
            before = prefix_cache_counters(metrics_urls)
            result = await run_phase(strategy, triton_urls, rounds, args)
            after = prefix_cache_counters(metrics_urls)
            queried = after["queried"] - before["queried"]
            hit_share = (after["hit"] - before["hit"]) / queried if queried else 0.0
            results[workload, strategy] = result
            rows.append(
                f"| {workload} | {strategy} | {result['p50']:.2f} | {result['p99']:.2f} | "
                f"{result['tokens_per_s']:.1f} | {hit_share:.0%} | "
                f"{' / '.join(map(str, result['split']))} | {result['wall']:.0f} |"
            )
            print(rows[-1], flush=True)
    baseline = args.strategies[0]
    rows.append("")
    for workload in args.workloads:
        for strategy in args.strategies[1:]:
            base, this = results[workload, baseline], results[workload, strategy]
            throughput = this["tokens_per_s"] / base["tokens_per_s"]
            rows.append(
                f"- {workload}: {strategy} TTFT p50 {base['p50'] / this['p50']:.2f}x lower than {baseline}, "
                f"p99 {base['p99'] / this['p99']:.2f}x, tokens/s {throughput:.2f}x"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strategies",
        default="least_outstanding,kv_cost,prefix_affinity",
        help="comma-separated; the first is the baseline of the ratios",
    )
    parser.add_argument(
        "--workloads", default="shared prefixes,unrelated,sessions", help="comma-separated, in this order"
    )
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=32, help="per shared-prefix phase")
    parser.add_argument("--unrelated-requests", type=int, default=12)
    parser.add_argument("--unrelated-tokens", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--session-tokens", type=int, default=450, help="each session's opening history")
    parser.add_argument("--turns", type=int, default=4, help="per session, one round each")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--prefix-cache-mib", type=int, default=112, help="per server: ~2,500 smollm2 tokens at ~46 KB each"
    )
    args = parser.parse_args()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := set(args.workloads) - {"shared prefixes", "unrelated", "sessions"}:
        parser.error(f"unknown workloads: {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="meshgate-routing-bench-") as state:
        state_dir = pathlib.Path(state)
        repository = model_repository_with_cache(state_dir / "models", args.prefix_cache_mib)
        ports = [(free_port(), free_port()) for _ in range(2)]
        processes = []
        try:
            for i, (grpc_port, metrics_port) in enumerate(ports):
                processes.append(
                    triton.launch(
                        model_repository=repository,
                        grpc_port=grpc_port,
                        metrics_port=metrics_port,
                        state_dir=state_dir / f"triton{i}",
                        log_file=state_dir / f"triton{i}.log",
                        models=(MODEL,),
                    )
                )
            for (grpc_port, _), process in zip(ports, processes, strict=True):
                triton.wait_ready(f"127.0.0.1:{grpc_port}", (MODEL,), timeout=300, process=process)
            rows = uvloop.run(
                main_async(
                    args,
                    [f"127.0.0.1:{g}" for g, _ in ports],
                    [f"http://127.0.0.1:{m}/metrics" for _, m in ports],
                )
            )
        finally:
            for process in processes:
                triton.terminate(process)
    print(
        f"\n{MODEL}, two Triton servers, prefix cache {args.prefix_cache_mib} MiB each; shared: "
        f"{args.system_prompts} system prompts of {args.system_tokens} tokens, {args.requests} requests; "
        f"unrelated: {args.unrelated_requests} prompts of {args.unrelated_tokens} tokens; "
        f"sessions: {args.sessions} of {args.session_tokens} tokens, {args.turns} turns each; "
        f"concurrency {args.concurrency}, max_tokens {args.max_tokens}, greedy; "
        f"{os.cpu_count()} CPU cores shared by both Tritons, the service and the load generator\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
