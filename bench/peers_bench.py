"""Triton direct, meshgate and the LiteLLM proxy, interleaved in one run.

    make bench-peers    # installs the pinned LiteLLM proxy (bench/peers/requirements.txt), then:
    .venv/bin/python bench/peers_bench.py [--requests 32] [--rounds 4] [--max-tokens 64]

Starts its own stack (Redis, Triton with tiny_gpt, the four services) with
Triton's HTTP endpoint on, and the LiteLLM proxy (its own virtual
environment, .meshgate/peers/litellm-venv) in front of the same Triton model
through LiteLLM's `triton` provider (HTTP `generate_stream`). LiteLLM runs
offline: its cost map is the packaged one, its chat template is seeded from
the served model's (bench/peers/litellm_proxy.py), telemetry is off and every
proxy variable points at a closed local port, so any attempt to reach the
internet fails instead of being made.

Five paths, the same prompts, greedy, the same number of output tokens:

* Triton direct, gRPC `ModelStreamInfer` (the request meshgate's inference service sends);
* Triton direct, HTTP `generate_stream` (the request LiteLLM sends);
* meshgate, the router's gRPC `Chat`, cache bypassed;
* meshgate, the router's OpenAI HTTP edge, cache bypassed;
* LiteLLM proxy, OpenAI HTTP `/v1/chat/completions`.

At concurrency 1 and 16, in rounds: each round runs every path in turn (the
order rotated each round), so drift of the shared machine hits all of them.
Before measuring, one request per prompt on every path checks that all paths
send Triton the same prompt and produce the same text and token count; while
measuring, every answer's output token count is checked again and answers
of any other length than --max-tokens are counted. The HTTP paths do not say
how many tokens an event carries (several under load: the models' stream
interval), so after each level their answers are asked of Triton again over
gRPC, untimed: an answer with Triton's text has Triton's count. Each measured request's
prompt is one of bench/workload.py's behind a path letter and a request
number, so no two are alike (the router would otherwise share one
generation among identical greedy requests in flight, and a model would
reuse the KV of a prompt another path sent) and every path gets prompts of
the same lengths.
Gateway CPU per request is read from /proc: all four meshgate services, the
LiteLLM proxy process (and any children); Triton's (server and model stub)
beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pathlib
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
from tritonclient.grpc import service_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_bench import (  # noqa: E402
    API_KEY,
    Sample,
    cpu_seconds,
    direct_triton,
    messages,
    parameters,
    percentile,
    run_load,
    through_router,
)
from workload import PROMPTS  # noqa: E402

from meshgate import tokenization  # noqa: E402
from meshgate.config import InferenceSettings  # noqa: E402
from meshgate.local.stack import SERVICES, Ports, Stack, free_port  # noqa: E402
from meshgate.router.v1 import router_service_pb2_grpc  # noqa: E402
from services.inference import triton_protocol  # noqa: E402

MODEL = "tiny-gpt"
PEERS_DIR = ROOT / ".meshgate" / "peers"
DEFAULT_LITELLM_VENV = PEERS_DIR / "litellm-venv"
LITELLM_LAUNCHER = ROOT / "bench" / "peers" / "litellm_proxy.py"
# Nothing listens on the discard port: a request routed through this proxy
# is refused at once, so an offline run cannot reach, or wait for, the internet.
NO_INTERNET_PROXY = "http://127.0.0.1:9"


class HttpStreams:
    """Keep-alive HTTP/1.1 connections to one server, one per concurrent
    request, over asyncio streams: a minimal client, so that its own parsing
    costs little and the same for every HTTP path."""

    def __init__(self, address: str) -> None:
        self._host, port = address.rsplit(":", 1)
        self._port = int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def post_events(self, path: str, body: dict, headers: str = ""):
        """POST `body` and return the server-sent events' data fields, each
        with the perf_counter time its bytes arrived."""
        payload = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n{headers}"
            f"content-length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        # A pooled connection the server closed while idle (keep-alive
        # timeout) fails before any byte of the answer: retry once on a new one.
        for attempt in range(2):
            reused = bool(self._idle) and attempt == 0
            reader, writer = (
                self._idle.pop() if reused else await asyncio.open_connection(self._host, self._port)
            )
            try:
                writer.write(request)
                events = await self._read_events(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if reused:
                    continue
                raise
            self._idle.append((reader, writer))
            return events
        raise AssertionError("unreachable")

    @staticmethod
    async def _read_events(reader: asyncio.StreamReader) -> list[tuple[float, bytes]]:
        status = await reader.readuntil(b"\r\n")
        chunked, length = False, None
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "content-length":
                length = int(value)
        if not status.startswith(b"HTTP/1.1 200"):
            body = await reader.readexactly(length) if length else b""
            raise RuntimeError(f"{status.decode().strip()}: {body[:300]!r}")
        if not chunked:
            raise RuntimeError("expected a chunked event stream")
        events, pending = [], b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            arrived = time.perf_counter()
            *complete, pending = pending.split(b"\n\n")
            events += [(arrived, e[len(b"data: ") :]) for e in complete if e.startswith(b"data: ")]
        await reader.readuntil(b"\r\n")  # the empty trailer
        return events


class Answer(Sample):
    """A Sample that keeps its text (for the check that all paths agree, and
    to count its tokens afterwards: ``counted_by_reference``) and its prompt."""

    __slots__ = ("text", "prompt")

    def __init__(self, ttft: float, total: float, tokens: int, text: str) -> None:
        super().__init__(ttft, total, tokens)
        self.text = text
        self.prompt = ""


def _timed(started: float, events: list[tuple[float, bytes]], texts: list[str], tokens: int) -> Answer:
    arrivals = [arrived for (arrived, _), text in zip(events, texts, strict=False) if text]
    total = (events[-1][0] if events else time.perf_counter()) - started
    return Answer((arrivals[0] - started) if arrivals else total, total, tokens, "".join(texts))


async def triton_http(client: HttpStreams, prompt: str, max_tokens: int) -> Answer:
    """What LiteLLM's triton provider sends: max_tokens (and temperature) as
    request parameters; one event per generated token."""
    body = {
        "text_input": triton_protocol.render_chat(messages(prompt), InferenceSettings().models[MODEL]),
        "parameters": {"max_tokens": max_tokens, "temperature": 0},
        "stream": True,
    }
    started = time.perf_counter()
    events = await client.post_events("/v2/models/tiny_gpt/generate_stream", body)
    decoded = [json.loads(data) for _, data in events]
    if errors := [e["error"] for e in decoded if "error" in e]:
        raise RuntimeError(f"Triton: {errors[0]}")
    return _timed(started, events, [e.get("text_output", "") for e in decoded], len(decoded))


async def openai_chat(
    client: HttpStreams, prompt: str, max_tokens: int, extra: dict, headers: str = ""
) -> Answer:
    """An OpenAI streaming chat completion; output tokens from the usage
    chunk when the server sends one, else one per content chunk."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    started = time.perf_counter()
    events = await client.post_events("/v1/chat/completions", body, headers)
    texts, usage_tokens = [], None
    for _, data in events:
        if data == b"[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream failed: {chunk['error']}")
        if chunk.get("usage"):
            usage_tokens = chunk["usage"]["completion_tokens"]
        texts.append("".join(c["delta"].get("content") or "" for c in chunk.get("choices", ())))
    if events[-1][1] != b"[DONE]":
        raise RuntimeError("the stream ended without [DONE]")
    content_chunks = sum(1 for text in texts if text)
    return _timed(started, events, texts, content_chunks if usage_tokens is None else usage_tokens)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    tree, index = [pid], 0
    while index < len(tree):
        for children in pathlib.Path(f"/proc/{tree[index]}/task").glob("*/children"):
            tree += [int(child) for child in children.read_text().split()]
        index += 1
    return tree


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds({str(pid): pid for pid in pids}).values())


def litellm_config(path: pathlib.Path, triton_http_address: str) -> None:
    # JSON is YAML: no YAML writer needed.
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": "triton/tiny_gpt",
                    "api_base": f"http://{triton_http_address}/v2/models/tiny_gpt/generate",
                },
            }
        ],
        "litellm_settings": {"telemetry": False},
    }
    path.write_text(json.dumps(config, indent=2))


def offline_environment() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[name] = NO_INTERNET_PROXY
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def check_litellm_renders_our_prompts(python: pathlib.Path, template_file: pathlib.Path) -> None:
    """LiteLLM falls back to a generic prompt when it cannot find a template:
    make sure it sends Triton exactly what meshgate sends."""
    rendered = subprocess.run(
        [str(python), str(LITELLM_LAUNCHER), str(template_file), "--render", *PROMPTS],
        env=offline_environment(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    theirs = json.loads(rendered.stdout.strip().splitlines()[-1])
    served = InferenceSettings().models[MODEL]
    ours = [triton_protocol.render_chat(messages(p), served) for p in PROMPTS]
    if theirs != ours:
        raise RuntimeError(f"LiteLLM renders {theirs[0]!r}, meshgate {ours[0]!r}")


def start_litellm(python: pathlib.Path, state_dir: pathlib.Path, triton_http_address: str, port: int):
    template_file = state_dir / "tiny_gpt_chat_template.jinja"
    template_file.write_text(tokenization.PLAIN_CHAT_TEMPLATE)
    check_litellm_renders_our_prompts(python, template_file)
    config = state_dir / "litellm.yaml"
    litellm_config(config, triton_http_address)
    log = open(state_dir / "litellm.log", "wb")  # noqa: SIM115 (lives as long as the process)
    process = subprocess.Popen(
        [
            str(python),
            str(LITELLM_LAUNCHER),
            str(template_file),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--telemetry",
            "False",
        ],
        env=offline_environment(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited ({process.returncode}); see {log.name}")
        try:
            with no_proxy.open(f"http://127.0.0.1:{port}/health/liveliness", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("the LiteLLM proxy did not come up within 180 s")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


PATHS = (
    "Triton direct, gRPC",
    "Triton direct, HTTP generate_stream",
    "meshgate router, gRPC",
    "meshgate router, HTTP edge",
    "LiteLLM proxy",
)
_GATEWAY = {
    "meshgate router, gRPC": "meshgate",
    "meshgate router, HTTP edge": "meshgate",
    "LiteLLM proxy": "litellm",
}


async def main_async(args, stack: Stack, litellm_pid: int, litellm_address: str) -> list[str]:
    served = InferenceSettings().models[MODEL]
    assert served.triton_model == "tiny_gpt", "the HTTP paths name the Triton model"
    gateway_pids = {
        "meshgate": [stack.processes[name].pid for name in SERVICES],
        "litellm": process_tree(litellm_pid),
    }
    triton_pids = process_tree(stack.processes["triton"].pid)
    triton_web = HttpStreams(f"127.0.0.1:{stack.ports.triton_http}")
    edge = HttpStreams(stack.address("http"))
    litellm = HttpStreams(litellm_address)
    n = args.max_tokens
    edge_auth = f"authorization: Bearer {API_KEY}\r\n"
    edge_extra = {"cache_policy": "bypass", "stream_options": {"include_usage": True}}
    # LiteLLM's triton provider maps only max_tokens; temperature has to be let through.
    litellm_extra = {"allowed_openai_params": ["temperature"]}
    try:
        async with (
            grpc.aio.insecure_channel(stack.address("triton")) as triton_channel,
            grpc.aio.insecure_channel(stack.address("router")) as router_channel,
        ):
            triton_stub = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
            router_stub = router_service_pb2_grpc.RouterServiceStub(router_channel)
            paths = {
                PATHS[0]: lambda p: direct_triton(triton_stub, MODEL, p, n),
                PATHS[1]: lambda p: triton_http(triton_web, p, n),
                PATHS[2]: lambda p: through_router(router_stub, p, n, model=MODEL),
                PATHS[3]: lambda p: openai_chat(edge, p, n, edge_extra, edge_auth),
                PATHS[4]: lambda p: openai_chat(litellm, p, n, litellm_extra),
            }
            notes = await check_paths_agree(paths, n)
            for one in paths.values():  # warm: connections, lazy imports, Triton's first requests
                await run_load(one, 4, 8)
            # Every measured request unique, numbered alike on every path: the
            # router shares one generation among identical greedy turns in
            # flight (router.coalesce_generations), which at concurrency 16
            # over 8 prompts would halve its work, not the others'; and the
            # models reuse a prompt prefix they computed (prefix caching).
            paths = {name: numbered(one, "ABCDEFGH"[i]) for i, (name, one) in enumerate(paths.items())}
            rows = [
                "| path | concurrency | requests | TTFT p50 (ms) | TTFT p99 (ms) | output tokens/s "
                "| gateway CPU per request (ms) | Triton CPU per request (ms) | answers not of "
                f"{n} tokens |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            results = {}
            for concurrency in (1, args.concurrency):
                total_requests = args.requests if concurrency == 1 else args.requests * 4
                per_round = max(1, total_requests // args.rounds)
                taken = {name: [] for name in paths}
                wall = dict.fromkeys(paths, 0.0)
                gateway_cpu = dict.fromkeys(paths, 0.0)
                triton_cpu = dict.fromkeys(paths, 0.0)
                names = list(paths)
                for round_index in range(args.rounds):
                    shift = round_index % len(names)
                    for name in names[shift:] + names[:shift]:
                        pids = gateway_pids.get(_GATEWAY.get(name, ""), [])
                        before = cpu_of(pids), cpu_of(triton_pids)
                        samples, seconds = await run_load(paths[name], concurrency, per_round)
                        gateway_cpu[name] += cpu_of(pids) - before[0]
                        triton_cpu[name] += cpu_of(triton_pids) - before[1]
                        taken[name] += samples
                        wall[name] += seconds
                # Untimed, after the level's rounds: the HTTP paths' token counts.
                await counted_by_reference(triton_stub, [s for name in names for s in taken[name]], n)
                for name in names:
                    samples = taken[name]
                    ttfts = [s.ttft * 1000 for s in samples]
                    tokens = sum(s.tokens for s in samples)
                    short = sum(1 for s in samples if s.tokens != n)
                    gateway_ms = gateway_cpu[name] / len(samples) * 1000 if name in _GATEWAY else None
                    results[(name, concurrency)] = (
                        statistics.median(ttfts),
                        percentile(ttfts, 0.99),
                        tokens / wall[name],
                        gateway_ms,
                    )
                    rows.append(
                        f"| {name} | {concurrency} | {len(samples)} | {statistics.median(ttfts):.1f} "
                        f"| {percentile(ttfts, 0.99):.1f} | {tokens / wall[name]:.0f} "
                        f"| {'-' if gateway_ms is None else f'{gateway_ms:.1f}'} "
                        f"| {triton_cpu[name] / len(samples) * 1000:.1f} | {short} |"
                    )
            rows += ["", *ratio_rows(results, args.concurrency, n), "", *notes]
            return rows
    finally:
        for client in (triton_web, edge, litellm):
            await client.close()


def numbered(one, tag: str):
    """New prompts, numbered alike on every path but tagged by path from
    their first word: no path finds another's prompt in the model's prefix
    cache."""
    counter = itertools.count()

    async def asked(prompt: str):
        tagged = f"{tag}{next(counter)}: {prompt}"
        answer = await one(tagged)
        if isinstance(answer, Answer):
            answer.prompt = tagged
        return answer

    return asked


async def reference_answer(stub, prompt: str, max_tokens: int) -> tuple[str, int]:
    """What Triton generates for ``prompt`` through gRPC (greedy: what every
    path must have streamed) and its output tokens (``num_output_tokens``)."""
    served = InferenceSettings().models[MODEL]
    request = triton_protocol.generate_request(
        served.triton_model,
        uuid.uuid4().hex,
        triton_protocol.render_chat(messages(prompt), served),
        triton_protocol.sampling_parameters(parameters(max_tokens), max_tokens),
        False,
    )
    call = stub.ModelStreamInfer()
    await call.write(request)
    texts, tokens = [], 0
    # As the inference service reads a stream (one decoder for its text).
    text_output = triton_protocol.text_decoder()
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.error_message:
            raise RuntimeError(f"Triton: {message.error_message}")
        event = triton_protocol.read_generate_response(message.infer_response, text_output)
        texts.append(event.text)
        tokens += event.output_tokens or 0
        if event.final:
            break
    call.cancel()
    return "".join(texts), tokens


async def counted_by_reference(stub, answers: list, max_tokens: int) -> None:
    """Sets the HTTP paths' answers' token counts, after measuring. Neither
    Triton's generate_stream nor LiteLLM's chunks say how many tokens an
    event carries, and under load the bundled models send several a
    response (their stream interval), so counting events undercounts. An
    answer whose text is Triton's own for its prompt has Triton's count; any
    other keeps its event count (and shows as an answer not of --max-tokens)."""
    limit = asyncio.Semaphore(16)

    async def count(answer: Answer) -> None:
        async with limit:
            text, tokens = await reference_answer(stub, answer.prompt, max_tokens)
        if answer.text == text:
            answer.tokens = tokens

    await asyncio.gather(*(count(a) for a in answers if isinstance(a, Answer) and a.prompt))


async def check_paths_agree(paths: dict, max_tokens: int) -> list[str]:
    """One request per prompt on every path, before measuring: the same
    text and the same number of output tokens everywhere, or the run stops.
    The gRPC paths report counts only (the router's deltas, Triton's
    num_output_tokens); the HTTP paths' texts are compared."""
    for prompt in PROMPTS:
        answers = {name: await one(prompt) for name, one in paths.items()}
        counts = {name: a.tokens for name, a in answers.items()}
        texts = {name: a.text for name, a in answers.items() if isinstance(a, Answer)}
        if len(set(texts.values())) != 1:
            raise RuntimeError(f"the paths answered {prompt!r} differently: {texts}")
        if set(counts.values()) != {max_tokens}:
            raise RuntimeError(f"output tokens for {prompt!r} differ from {max_tokens}: {counts}")
    return [
        f"Checked before measuring: for each of the {len(PROMPTS)} prompts, every path produced "
        f"{max_tokens} output tokens and the HTTP paths the same text."
    ]


def ratio_rows(results: dict, loaded: int, max_tokens: int) -> list[str]:
    rows = [
        "| gateway over its upstream | concurrency | TTFT p50 | TTFT p99 | output tokens/s "
        "| gateway CPU per request (ms) | per output token (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    # Each gateway against the Triton front end it speaks to.
    pairs = (
        ("meshgate router, gRPC", "Triton direct, gRPC"),
        ("meshgate router, HTTP edge", "Triton direct, gRPC"),
        ("LiteLLM proxy", "Triton direct, HTTP generate_stream"),
    )
    for concurrency in (1, loaded):
        for gateway, upstream in pairs:
            g, u = results[(gateway, concurrency)], results[(upstream, concurrency)]
            rows.append(
                f"| {gateway} over {upstream.removeprefix('Triton direct, ')} | {concurrency} "
                f"| {g[0] - u[0]:+.1f} ms | {g[1] - u[1]:+.1f} ms | {g[2] / u[2]:.2f}x "
                f"| {g[3]:.1f} | {g[3] / max_tokens:.3f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=32, help="requests per path at concurrency 1 (x4 at 16)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="the loaded level, beside 1")
    parser.add_argument("--litellm-venv", type=pathlib.Path, default=DEFAULT_LITELLM_VENV)
    parser.add_argument("--tracing", action="store_true", help="export every span to a file")
    parser.add_argument(
        "--keep-logs", action="store_true", help=f"copy logs and configs to {PEERS_DIR / 'last-run'}"
    )
    args = parser.parse_args()
    python = args.litellm_venv / "bin" / "python"
    if not python.is_file():
        sys.exit(f"no LiteLLM environment at {args.litellm_venv}: run `make bench-peers`")
    ports = Ports(*(free_port() for _ in range(6)), triton_http=free_port())
    litellm_port = free_port()
    with tempfile.TemporaryDirectory(prefix="meshgate-peers-bench-") as state_dir:
        stack = Stack(
            pathlib.Path(state_dir),
            ports,
            dev_api_key=API_KEY,
            tracing=args.tracing,
            log_level="warning",
            triton_models=("tiny_gpt", "minilm"),
        )
        with stack:
            try:
                litellm = start_litellm(
                    python, pathlib.Path(state_dir), f"127.0.0.1:{ports.triton_http}", litellm_port
                )
                try:
                    rows = uvloop.run(main_async(args, stack, litellm.pid, f"127.0.0.1:{litellm_port}"))
                finally:
                    stop(litellm)
            finally:
                if args.keep_logs:
                    shutil.copytree(state_dir, PEERS_DIR / "last-run", dirs_exist_ok=True)
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        f"model {MODEL}, max_tokens={args.max_tokens}, greedy, tracing {'on' if args.tracing else 'off'}, "
        f"LiteLLM {version}; {args.rounds} interleaved rounds per concurrency; "
        f"{os.cpu_count()} CPU cores shared by Triton, Redis, the gateways and the load generator\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
