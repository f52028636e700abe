"""smollm2 straight to Triton: time to first token and tokens/s for 1 and 8
concurrent streams, and the memory Triton holds with every model loaded.

    .venv/bin/python bench/smollm2_bench.py [--max-tokens 64] [--rounds 2]

Starts its own tritonserver with all of meshgate/local/triton.py's DEFAULT_MODELS
(as `make run` does) and reports how long they took to become ready and the
resident memory (VmRSS from /proc) of tritonserver and of each model's stub
process. Then streams the prompts of bench/workload.py, rendered with
SmolLM2's ChatML template, greedily over gRPC ModelStreamInfer: `--rounds`
sequential requests at concurrency 1, and `--rounds` waves of 8 concurrent
requests. SmolLM2 ends its answers itself, so streams may stop before
max_tokens; tokens/s counts the tokens actually streamed.

    .venv/bin/python bench/smollm2_bench.py --long-prompt [--prompt-tokens 2000]

instead measures what a long prompt costs the streams already running: one
stream runs, and after its third response a request with a prompt of about
`--prompt-tokens` tokens arrives; it prints the running stream's gaps
between responses before that request and while its prompt is read (the
engine reads PREFILL_CHUNK_TOKENS a pass between decoding steps), and the
long request's time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import tritonclient.grpc.aio as grpcaio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workload import PROMPTS  # noqa: E402

from meshgate.local import triton  # noqa: E402
from meshgate.local.stack import build_model_weights, free_port  # noqa: E402

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(question: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_tree(pid: int) -> dict[int, str]:
    """pid -> command line of the process and all its descendants."""
    children: dict[int, list[int]] = {}
    for status in pathlib.Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(fields["Pid"]))
    tree, pending = {}, [pid]
    while pending:
        current = pending.pop()
        try:
            command = pathlib.Path(f"/proc/{current}/cmdline").read_bytes()
            tree[current] = command.replace(b"\0", b" ").decode()
        except OSError:
            continue
        pending += children.get(current, [])
    return tree


def describe(command: str) -> str:
    for argument in command.split():
        if "/model_repository/" in argument:
            return "stub: " + argument.split("/model_repository/")[1].split("/")[0]
    return command.split()[0].rsplit("/", 1)[-1]


def inputs(prompt: str, max_tokens: int) -> list:
    def tensor(name, datatype, value):
        t = grpcaio.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.bool_))
        return t

    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0})
    return [
        tensor("text_input", "BYTES", prompt.encode()),
        tensor("stream", "BOOL", True),
        tensor("sampling_parameters", "BYTES", sampling.encode()),
        tensor("return_num_output_tokens", "BOOL", True),
    ]


async def stream(client, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one greedy stream."""

    async def requests():
        yield {"model_name": "smollm2", "inputs": inputs(prompt, max_tokens)}

    started = time.monotonic()
    first, tokens = None, 0
    async for result, error in client.stream_infer(requests(), stream_timeout=600):
        if error is not None:
            raise error
        first = first or time.monotonic() - started
        tokens += int(result.as_numpy("num_output_tokens")[0])
    return first, tokens, time.monotonic() - started


async def measure(url: str, max_tokens: int, rounds: int) -> list[tuple]:
    rows = []
    async with grpcaio.InferenceServerClient(url) as client:
        await stream(client, chatml("Hi."), 4)  # warm-up
        for concurrency in (1, 8):
            ttfts, tokens, wall = [], 0, 0.0
            for round_ in range(rounds):
                prompts = [PROMPTS[(round_ * concurrency + i) % len(PROMPTS)] for i in range(concurrency)]
                started = time.monotonic()
                results = await asyncio.gather(*(stream(client, chatml(p), max_tokens) for p in prompts))
                wall += time.monotonic() - started
                ttfts += [r[0] for r in results]
                tokens += sum(r[1] for r in results)
            ttft_ms = statistics.median(ttfts) * 1000
            rows.append((concurrency, rounds * concurrency, ttft_ms, tokens, tokens / wall))
    return rows


LONG_ANSWER = "Write a long story about a lighthouse keeper and a storm, with many details."


async def long_prompt_stall(url: str, prompt_tokens: int) -> dict:
    """The running stream's gaps (seconds) before and during a long prompt's
    read, and that request's time to first token."""
    from meshgate import config, tokenization

    tokenizer = tokenization.load(config.SMOLLM2_TOKENIZER)
    paragraph = " ".join(PROMPTS) + " "
    text = paragraph
    while len(tokenizer.encode(chatml("Summarize: " + text), add_special_tokens=False).ids) < prompt_tokens:
        text += paragraph
    long_prompt = chatml("Summarize: " + text)
    counted = len(tokenizer.encode(long_prompt, add_special_tokens=False).ids)
    arrivals: list[float] = []
    third = asyncio.Event()

    async with grpcaio.InferenceServerClient(url) as client:
        await stream(client, chatml("Hi."), 4)  # warm-up

        async def running():
            async def requests():
                yield {"model_name": "smollm2", "inputs": inputs(chatml(LONG_ANSWER), 400)}

            async for _, error in client.stream_infer(requests(), stream_timeout=600):
                if error is not None:
                    raise error
                arrivals.append(time.monotonic())
                if len(arrivals) == 3:
                    third.set()

        task = asyncio.create_task(running())
        await third.wait()
        sent = time.monotonic()
        ttft, _, _ = await stream(client, long_prompt, 4)
        read_until = sent + ttft
        await task
    gaps = np.diff(arrivals)
    before = gaps[:2]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > sent and a < read_until]
    return {
        "prompt_tokens": counted,
        "ttft_s": ttft,
        "gap_before_s": float(np.median(before)),
        "gaps_during": len(during),
        "gap_during_max_s": max(during) if during else float("nan"),
        "gap_during_p50_s": float(np.median(during)) if during else float("nan"),
        "running_tokens": len(arrivals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--long-prompt", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    args = parser.parse_args()

    build_model_weights()
    state_dir = pathlib.Path(tempfile.mkdtemp(prefix="smollm2-bench-"))
    port = free_port()
    started = time.monotonic()
    process = triton.launch(grpc_port=port, state_dir=state_dir, log_file=state_dir / "triton.log")
    try:
        triton.wait_ready(f"127.0.0.1:{port}", timeout=300, process=process)
        ready_s = time.monotonic() - started
        memory = {pid: (rss_mib(pid), command) for pid, command in process_tree(process.pid).items()}
        if args.long_prompt:
            stall = asyncio.run(long_prompt_stall(f"127.0.0.1:{port}", args.prompt_tokens))
        else:
            rows = asyncio.run(measure(f"127.0.0.1:{port}", args.max_tokens, args.rounds))
    finally:
        triton.terminate(process)

    if args.long_prompt:
        print(f"smollm2, greedy: one stream running, then a prompt of {stall['prompt_tokens']} tokens")
        print(
            "\n| running stream: gap p50 before (ms) | gaps while the prompt is read | their p50 (ms) |"
            " their max (ms) | long prompt's TTFT (s) |"
        )
        print("|---|---|---|---|---|")
        gap_before, during_p50, during_max = (
            stall[name] * 1000 for name in ("gap_before_s", "gap_during_p50_s", "gap_during_max_s")
        )
        print(
            f"| {gap_before:.0f} | {stall['gaps_during']} | {during_p50:.0f} | {during_max:.0f}"
            f" | {stall['ttft_s']:.2f} |"
        )
        return

    print(f"Triton with {', '.join(triton.DEFAULT_MODELS)}: ready in {ready_s:.1f} s")
    print("\n| process | VmRSS (MiB) |\n|---|---|")
    for rss, command in sorted(memory.values(), reverse=True):
        print(f"| {describe(command)} | {rss:.0f} |")
    print(f"| all | {sum(rss for rss, _ in memory.values()):.0f} |")
    print(f"\nsmollm2, greedy, max_tokens={args.max_tokens}, ChatML prompts of bench/workload.py")
    print("\n| concurrency | requests | TTFT p50 (ms) | tokens | tokens/s (all streams) |")
    print("|---|---|---|---|---|")
    for concurrency, requests, ttft, tokens, rate in rows:
        print(f"| {concurrency} | {requests} | {ttft:.0f} | {tokens} | {rate:.1f} |")


if __name__ == "__main__":
    main()
