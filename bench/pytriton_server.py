"""The PyTriton side of bench/triton_binding_bench.py: tiny_gpt and echo bound
with PyTriton's Python API (`Triton.bind`, decoupled, generator callables).

Runs in bench/.venv-pytriton (PyTriton with its real dependencies, numpy<2),
started by the bench with model_repository/tiny_gpt/1 on PYTHONPATH (for
tiny_gpt_core and weights.npz), and stopped by it with SIGINT. Speaks the same vLLM-style
tensors as model_repository/tiny_gpt, for what the bench sends: streaming
only, and every response carries all four outputs (PyTriton rejects optional
outputs), which the bench's client reads the same way.

tiny_gpt does what model_repository/tiny_gpt/1/model.py does for greedy
streaming: same weights, tokenizer, KV cache and continuous batching (a
scheduler thread advances every active sequence by one token per step), so
the two servers differ only in how requests reach the model.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiny_gpt_core as core
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tokenizers import Tokenizer, decoders

INPUTS = [
    Tensor(name="text_input", dtype=bytes, shape=(1,)),
    Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
    Tensor(name="sampling_parameters", dtype=bytes, shape=(1,), optional=True),
    Tensor(name="exclude_input_in_output", dtype=np.bool_, shape=(1,), optional=True),
    Tensor(name="return_finish_reason", dtype=np.bool_, shape=(1,), optional=True),
    Tensor(name="return_num_input_tokens", dtype=np.bool_, shape=(1,), optional=True),
    Tensor(name="return_num_output_tokens", dtype=np.bool_, shape=(1,), optional=True),
]
TEXT_OUTPUT = Tensor(name="text_output", dtype=bytes, shape=(-1,))
GPT_OUTPUTS = [
    TEXT_OUTPUT,
    Tensor(name="finish_reason", dtype=bytes, shape=(-1,)),
    Tensor(name="num_input_tokens", dtype=np.uint32, shape=(1,)),
    Tensor(name="num_output_tokens", dtype=np.uint32, shape=(-1,)),
]
# As model_repository/tiny_gpt: no Triton batching (shape [1] tensors), one
# request, many responses.
STREAMING = ModelConfig(batching=False, decoupled=True)
MAX_ACTIVE_SEQUENCES = 16


def echo_callable(tokens: int, token_text: str) -> Callable:
    token = np.array([token_text.encode()], dtype=np.object_)

    def echo(requests):
        # PyTriton steps a generator on its event loop, so concurrent
        # streams interleave token by token, as in the Python-backend echo.
        for _ in range(tokens):
            yield [{"text_output": token} for _ in requests]

    return echo


def load_tokenizer(path: Path) -> Tokenizer:
    # The same settings as model_repository/tiny_gpt/1/model.py.
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tokenizer


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    rng: np.random.Generator
    deliver: Callable[[object], None]
    cache: core.KVCache | None = None
    next_logits: np.ndarray | None = None
    generated: list[int] = field(default_factory=list)
    sent_text: str = ""


class TinyGPTCallable:
    """PyTriton callable for tiny_gpt: a call enqueues its request and relays
    its responses; a scheduler thread batches decoding steps across every
    active sequence, as model.py's does."""

    def __init__(self, tokenizer_path: Path):
        with np.load(Path(core.__file__).with_name("weights.npz")) as archive:
            config = core.GPTConfig.from_json(str(archive["config"]))
            weights = {name: archive[name] for name in archive.files if name != "config"}
        self.model = core.TinyGPT(weights, config)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.bos_id = self.tokenizer.token_to_id("[CLS]")
        self.eos_id = self.tokenizer.token_to_id("[SEP]")
        vocab = self.tokenizer.get_vocab()
        self.never_sampled = np.array(
            sorted(i for t, i in vocab.items() if t.startswith("[") and t.endswith("]") and i != self.eos_id)
        )
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._active: list[Sequence] = []
        threading.Thread(target=self._run, name="tiny_gpt-scheduler", daemon=True).start()

    async def infer(self, requests):
        # Batching is off, so Triton hands the proxy one request per execute().
        (request,) = requests
        loop = asyncio.get_running_loop()
        responses: asyncio.Queue = asyncio.Queue()
        deliver = functools.partial(loop.call_soon_threadsafe, responses.put_nowait)
        self._inbox.put(self._parse(request, deliver))
        while True:
            item = await responses.get()
            if isinstance(item, Exception):
                raise item
            response, finished = item
            yield [response]
            if finished:
                return

    def _parse(self, request, deliver: Callable[[object], None]) -> Sequence:
        prompt = request["text_input"].item().decode()
        params = json.loads(request["sampling_parameters"].item()) if "sampling_parameters" in request else {}
        max_tokens = int(params.get("max_tokens", 16))
        prompt_ids = [self.bos_id] + self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return Sequence(
            prompt_ids=prompt_ids[-(self.model.config.max_context - max_tokens) :],
            max_tokens=max_tokens,
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1)),
            rng=np.random.default_rng(params.get("seed")),
            deliver=deliver,
        )

    def _run(self) -> None:
        while True:
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as error:  # fail the batch's requests, keep serving
                for sequence in self._active:
                    sequence.deliver(error)
                self._active.clear()

    def _admit(self) -> None:
        while len(self._active) < MAX_ACTIVE_SEQUENCES:
            try:
                sequence = self._inbox.get() if not self._active else self._inbox.get_nowait()
            except queue.Empty:
                return
            sequence.cache = core.KVCache(self.model.config)
            sequence.next_logits = self.model.prefill(sequence.prompt_ids, sequence.cache)
            self._active.append(sequence)

    def _step(self) -> None:
        continuing = []
        for sequence in self._active:
            logits = sequence.next_logits
            logits[self.never_sampled] = -np.inf
            token = core.sample(logits, sequence.temperature, sequence.top_p, sequence.top_k, sequence.rng)
            sequence.generated.append(token)
            if not self._emit(sequence, token):
                continuing.append(sequence)
        if continuing:
            logits = self.model.decode([s.generated[-1] for s in continuing], [s.cache for s in continuing])
            for sequence, row in zip(continuing, logits):
                sequence.next_logits = row
        self._active = continuing

    def _emit(self, sequence: Sequence, token: int) -> bool:
        # Incremental decoding exactly as model.py: decode after the last
        # prompt token so the new text gets its leading space.
        context = sequence.prompt_ids[-1:]
        prefix = self.tokenizer.decode(context)
        text = self.tokenizer.decode(context + sequence.generated)[len(prefix) :]
        if token == self.eos_id:
            finish_reason = "stop"
        elif len(sequence.generated) >= sequence.max_tokens:
            finish_reason = "length"
        else:
            finish_reason = None
        response = {
            "text_output": np.array([text[len(sequence.sent_text) :].encode()], dtype=np.object_),
            "finish_reason": np.array([str(finish_reason).encode()], dtype=np.object_),
            "num_input_tokens": np.array([len(sequence.prompt_ids)], dtype=np.uint32),
            "num_output_tokens": np.array([1], dtype=np.uint32),
        }
        sequence.sent_text = text
        finished = finish_reason is not None
        sequence.deliver((response, finished))
        return finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True, help="PyTriton polls readiness over HTTP")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the tokenizer.json tiny_gpt uses")
    parser.add_argument("--echo-tokens", type=int, required=True)
    parser.add_argument("--echo-token-text", required=True)
    parser.add_argument("--workspace", type=Path, required=True, help="must not exist; removed on exit")
    args = parser.parse_args()

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        allow_metrics=False,
        log_verbose=0,
        exit_timeout_secs=10,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name="tiny_gpt",
            infer_func=TinyGPTCallable(args.tokenizer).infer,
            inputs=INPUTS,
            outputs=GPT_OUTPUTS,
            config=STREAMING,
        )
        triton.bind(
            model_name="echo",
            infer_func=echo_callable(args.echo_tokens, args.echo_token_text),
            inputs=INPUTS,
            outputs=[TEXT_OUTPUT],
            config=STREAMING,
        )
        triton.serve()


if __name__ == "__main__":
    main()
