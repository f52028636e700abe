"""The OpenAI-compatible HTTP edge against gRPC, the same requests through
the same router pipeline, in one run.

    .venv/bin/python bench/edge_bench.py

Starts its own stack (Redis, Triton with tiny_gpt and minilm, the four
services) on free ports, then at concurrency 1, alternating the two front
ends in blocks so drift of the shared machine hits both alike:

1. generated answers (cache bypassed): time to first token and output
   tokens per second;
2. exact cache hits (no inference): time to first token, where the front
   end is most of what is left.

For each, the router process's CPU per request (from /proc) by front end.
The HTTP client is a minimal keep-alive HTTP/1.1 client over asyncio
streams, so the client's own parsing does not pass for the edge's cost.
Results go to stdout as markdown. Compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
import uuid

import grpc
import uvloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_bench import API_KEY, METADATA, Sample, cpu_seconds, percentile  # noqa: E402

from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.local.stack import Ports, Stack, free_port  # noqa: E402
from meshgate.router.v1 import router_service_pb2 as pb  # noqa: E402
from meshgate.router.v1 import router_service_pb2_grpc  # noqa: E402

_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')
_POLICY_NAMES = {pb.CACHE_POLICY_BYPASS: "bypass", pb.CACHE_POLICY_USE: "use"}


async def through_grpc(stub, prompt: str, max_tokens: int, policy: int) -> Sample:
    request = pb.ChatRequest(
        model="tiny-gpt",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt)],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0),
        cache_policy=policy,
    )
    started = time.perf_counter()
    ttft, tokens = None, 0
    async for response in stub.Chat(request, metadata=METADATA):
        if response.HasField("delta"):
            if ttft is None:
                ttft = time.perf_counter() - started
        else:
            tokens = response.completion.usage.completion_tokens
    total = time.perf_counter() - started
    return Sample(ttft or total, total, tokens)


class HttpClient:
    """One keep-alive connection; streams a chat completion and times its
    first content event."""

    def __init__(self, address: str) -> None:
        self._host, port = address.rsplit(":", 1)
        self._port = int(port)

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()

    async def chat(self, prompt: str, max_tokens: int, policy: int) -> Sample:
        body = json.dumps(
            {
                "model": "tiny-gpt",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "cache_policy": _POLICY_NAMES[policy],
            }
        ).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
            f"authorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        self._writer.write(head + body)
        buffer, ttft = b"", None
        # The chunked body ends with a zero-length chunk.
        while not buffer.endswith(b"\r\n0\r\n\r\n"):
            data = await self._reader.read(65536)
            if not data:
                raise RuntimeError(f"the edge closed the connection: {buffer[-300:]!r}")
            buffer += data
            if ttft is None and b'"content":' in buffer:
                ttft = time.perf_counter() - started
        total = time.perf_counter() - started
        if not buffer.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in buffer:
            raise RuntimeError(f"unexpected answer: {buffer[:300]!r}")
        tokens = _COMPLETION_TOKENS.findall(buffer)
        return Sample(ttft or total, total, int(tokens[-1]) if tokens else 0)


async def compare(one_grpc, one_http, prompts, router_pid: int, block: int) -> dict[str, dict]:
    """Alternating blocks of ``block`` requests through each front end."""
    samples: dict[str, list[Sample]] = {"gRPC": [], "HTTP edge": []}
    cpu = {"gRPC": 0.0, "HTTP edge": 0.0}
    fronts = {"gRPC": one_grpc, "HTTP edge": one_http}
    for start in range(0, len(prompts), block):
        order = ["gRPC", "HTTP edge"] if (start // block) % 2 == 0 else ["HTTP edge", "gRPC"]
        for name in order:
            before = cpu_seconds({"router": router_pid})["router"]
            for prompt in prompts[start : start + block]:
                samples[name].append(await fronts[name](prompt))
            cpu[name] += cpu_seconds({"router": router_pid})["router"] - before
    results = {}
    for name, taken in samples.items():
        ttfts = [sample.ttft * 1000 for sample in taken]
        rates = [sample.tokens / sample.total for sample in taken if sample.tokens]
        results[name] = {
            "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p90": percentile(ttfts, 0.9),
            "tokens_per_s": statistics.median(rates) if rates else 0.0,
            "cpu_ms": cpu[name] / len(taken) * 1000,
        }
    return results


def rows(title: str, results: dict[str, dict], requests: int) -> list[str]:
    grpc_r, http_r = results["gRPC"], results["HTTP edge"]
    lines = []
    for name, r in results.items():
        lines.append(
            f"| {title} | {name} | {requests} | {r['ttft_p50']:.2f} | {r['ttft_p90']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['cpu_ms']:.2f} |"
        )
    lines.append(
        f"| {title} | edge - gRPC | | {http_r['ttft_p50'] - grpc_r['ttft_p50']:+.2f} | "
        f"{http_r['ttft_p90'] - grpc_r['ttft_p90']:+.2f} | | {http_r['cpu_ms'] - grpc_r['cpu_ms']:+.2f} |"
    )
    return lines


async def main_async(args, stack: Stack) -> list[str]:
    router_pid = stack.processes["router"].pid
    http = HttpClient(stack.address("http"))
    await http.connect()
    out = [
        "| workload | front end | requests | TTFT p50 (ms) | TTFT p90 (ms) | output tokens/s (median) "
        "| router CPU per request (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        async with grpc.aio.insecure_channel(stack.address("router")) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            bypass, use = pb.CACHE_POLICY_BYPASS, pb.CACHE_POLICY_USE
            # Warm both paths (connections, Triton's first requests).
            for _ in range(5):
                await through_grpc(stub, "warm up", args.max_tokens, bypass)
                await http.chat("warm up", args.max_tokens, bypass)

            run = uuid.uuid4().hex[:6]
            prompts = [f"Tell me something about topic {run}-{i}." for i in range(args.requests)]
            generated = await compare(
                lambda p: through_grpc(stub, p, args.max_tokens, bypass),
                lambda p: http.chat(p, args.max_tokens, bypass),
                prompts,
                router_pid,
                args.block,
            )
            out += rows(f"generated ({args.max_tokens} tokens)", generated, args.requests)

            hit_prompt = f"What is the capital of France? {run}"
            await through_grpc(stub, hit_prompt, args.max_tokens, use)  # stores the answer
            hits = await compare(
                lambda p: through_grpc(stub, p, args.max_tokens, use),
                lambda p: http.chat(p, args.max_tokens, use),
                [hit_prompt] * args.hits,
                router_pid,
                args.block,
            )
            out += rows("exact cache hits", hits, args.hits)
    finally:
        await http.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="generated answers per front end")
    parser.add_argument("--hits", type=int, default=500, help="exact hits per front end")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--block", type=int, default=25, help="requests per alternating block")
    args = parser.parse_args()
    ports = Ports(*(free_port() for _ in range(6)))
    with tempfile.TemporaryDirectory(prefix="meshgate-edge-bench-") as state_dir:
        stack = Stack(
            pathlib.Path(state_dir),
            ports,
            dev_api_key=API_KEY,
            tracing=False,
            log_level="warning",
            triton_models=("tiny_gpt", "minilm"),
        )
        with stack:
            table = uvloop.run(main_async(args, stack))
    print(f"tiny-gpt, greedy, concurrency 1, one run; HTTP edge at {stack.address('http')}\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
