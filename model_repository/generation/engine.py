"""Continuous batching for the text-generation models (tiny_gpt, smollm2): one copy.

Kept free of Triton imports so it can be unit-tested; `vllm_model.py` binds
it to Triton's Python backend. A model plugs in through `new_cache(tokens)`,
`prefill(token_ids, cache) -> logits [V]` (appends after what the cache
holds), `decode(token_ids, caches) -> logits [B, V]`, and for prefix
caching `kv_block(cache, start, stop)` and `load_kv(cache, blocks)`.

Every request is checked when it arrives (SamplingParams.from_json,
check_prompt_fits) so bad values fail that request alone with INVALID_ARG,
and the scheduler isolates sequences while it runs: whatever one sequence
raises fails that sequence alone, never the rest of its batch.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger("generation")


def _as_int(name: str, value) -> int:
    # Like vLLM, numbers may come as strings ("16"); a fraction, a bool or
    # inf is an error rather than something silently truncated.
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_finite_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    # json.loads accepts NaN and Infinity, float() accepts "nan" and "inf".
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class SamplingParams:
    """The subset of vLLM's SamplingParams these models implement, same names and defaults."""

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
        values = {k: v for k, v in raw.items() if v is not None}
        for key in ("max_tokens", "top_k", "seed"):
            if key in values:
                values[key] = _as_int(key, values[key])
        for key in ("temperature", "top_p"):
            if key in values:
                values[key] = _as_finite_float(key, values[key])
        stop = values.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        values["stop"] = tuple(s for s in stop if s)
        params = cls(**values)
        if not 1 <= params.max_tokens < max_context:
            raise ValueError(f"max_tokens must be in [1, {max_context - 1}], got {params.max_tokens}")
        if params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or positive, got {params.top_k}")
        if params.seed is not None and params.seed < 0:
            raise ValueError(f"seed must be >= 0, got {params.seed}")
        return params


@dataclass(frozen=True)
class StreamInterval:
    """How long a streaming generation's deltas may be held, so that under
    load several tokens go out as one response (vLLM's --stream-interval,
    but by time).

    Every response costs whoever reads the stream a gRPC message: the
    inference service reading one per token was most of a streamed token's
    CPU under load (bench/README.md, issue 13). By time rather than by a
    token count, so a slow model (smollm2 on CPU, ~130 ms a step) is never
    made to wait several steps between responses. Off (0) or below
    `min_active` active sequences, one response per token: a few streams
    leave CPU to spare, and a lone one should stream token by token.
    """

    seconds: float = 0.0  # 0: off
    min_active: int = 1
    # Read from the model's config.pbtxt by vllm_model.ModelParameters.


def check_prompt_fits(prompt_tokens: int, max_tokens: int, max_context: int) -> None:
    """Refuse, as vLLM does, a prompt that leaves no room for max_tokens in the window."""
    if prompt_tokens + max_tokens > max_context:
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} that exceeds the "
            f"{max_context}-token context window (at most {max_context - max_tokens} prompt tokens)"
        )


# Temperatures below this sample greedily, as vLLM's _SAMPLING_EPS: the
# logits divided by a tiny one overflowed to inf (1e-320 over logits near
# 10), which left no distribution and failed the request as a model error.
GREEDY_BELOW = 1e-5

# At most this many prompt tokens are read between two decoding steps
# (Scheduler._prefill_pieces, vLLM's chunked prefill): ~1.4 s of smollm2 on
# 2 shared cores, the longest a long prompt stalls the streams already
# running, and the longest a caller gone mid-prompt holds the scheduler.
PREFILL_CHUNK_TOKENS = 256


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0 (below GREEDY_BELOW), else temperature, then top-k, then top-p (nucleus)."""
    if params.temperature < GREEDY_BELOW:
        token = int(np.argmax(logits))
        if not np.isfinite(logits[token]):
            raise ValueError("no finite logit to choose from")
        return token
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth_largest = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled[scaled < kth_largest] = -np.inf
    weights = np.exp(scaled - scaled.max())  # unnormalised probabilities
    if params.top_p < 1.0:
        order = np.argsort(weights)[::-1]
        cumulative = np.cumsum(weights[order])
    else:
        order = None
        cumulative = np.cumsum(weights)
    total = cumulative[-1]
    # NaN logits (or NaN weights from an overflow) would otherwise pick an
    # index past the vocabulary.
    if not (np.isfinite(total) and total > 0):
        raise ValueError("the logits give no valid distribution to sample from")
    if order is None:
        # Inverse CDF: far cheaper than rng.choice(p=...) over a large vocabulary.
        return int(np.searchsorted(cumulative, rng.random() * total, side="right"))
    # Smallest prefix holding top_p of the mass; always at least one token.
    kept = min(int(np.searchsorted(cumulative, params.top_p * total)) + 1, cumulative.size)
    draw = rng.random() * cumulative[kept - 1]
    return int(order[min(np.searchsorted(cumulative[:kept], draw, side="right"), kept - 1)])


class Sender(Protocol):
    """Where one request's responses go (Triton's response sender, or a test's recorder)."""

    def is_cancelled(self) -> bool: ...

    def send(
        self, text: str, finish_reason: str | None, new_tokens: int, final: bool, cached_tokens: int
    ) -> None:
        """cached_tokens: prompt tokens whose KV came from the prefix cache (vLLM's num_cached_tokens)."""

    def fail(self, message: str, kind: str) -> None:
        """Final error response; kind is "internal", "cancelled" or "unavailable"."""


@dataclass(frozen=True)
class Vocabulary:
    """What the scheduler needs to know about a model's tokenizer."""

    decode: Callable[[list[int]], str]  # must skip special tokens
    stop_ids: frozenset[int]
    never_sampled: np.ndarray  # control tokens that must never appear as text
    # Prompt tokens decoded in front of the new ones and cut off again: a
    # WordPiece decoder needs the previous token to give a word its leading
    # space; byte-level BPE needs none.
    decode_context: int = 0


class Detokenizer:
    """One sequence's text, decoded a few tokens at a time (vLLM's prefix-offset scheme).

    Decoding every id again for each new token made an answer of n tokens
    cost n^2 / 2 token decodes. Here each step decodes only a window: the
    tokens whose text is not yet stable, behind the tokens of the previous
    stable piece (the prefix), and keeps what lies beyond the prefix's own
    text. That suffix is exactly what the whole decode adds: the WordPiece
    decoder (cleanup off) only treats a window's first token differently,
    and it is the prefix's in both decodes; byte-level BPE text is the UTF-8
    of the bytes, and a window starts on a character boundary because text
    counts as stable only when it does not end in U+FFFD (an incomplete
    character, or an invalid byte sequence that the next byte may extend).
    What still grows with the answer is copying its text (a memcpy), not
    decoding, as long as the text keeps becoming stable. A stretch whose
    text keeps ending in U+FFFD (a run of byte tokens that form no valid
    UTF-8, such as lone continuation bytes) never moves the window: each of
    its n tokens decodes the whole stretch again, about n^2 / 2 ids, as
    before. Rare in real output, and the text is still exact.
    """

    def __init__(self, decode: Callable[[list[int]], str], context_ids: list[int]):
        """context_ids: prompt tokens whose text goes before the first new token's and is cut off."""
        self._decode = decode
        # The window: the prefix's ids, then those whose text is not yet stable.
        self._window = list(context_ids)
        self._prefix_length = len(self._window)
        self._prefix_text = decode(self._window)
        self.stable = ""  # the text of the generated ids before the unstable ones: it never changes

    def push(self, token: int) -> str:
        """Add a generated token; the text of all generated tokens, as one decode of them all gives."""
        self._window.append(token)
        unstable = self._decode(self._window)[len(self._prefix_text) :]
        if not unstable or unstable.endswith("\ufffd"):
            return self.stable + unstable
        self.stable += unstable
        # The ids just made stable are the next window's prefix.
        self._window = self._window[self._prefix_length :]
        self._prefix_length = len(self._window)
        self._prefix_text = self._decode(self._window)
        return self.stable


@dataclass
class Generation:
    """One request's state from admission to its final response."""

    request_id: str
    sender: Sender
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    prepend_prompt: bool
    # Only requests with the same salt share prefix-cache blocks (prefix_cache.py).
    cache_salt: bytes = b""
    rng: np.random.Generator = field(init=False)
    cache: object | None = None
    cached_tokens: int = 0
    # Prompt tokens in the cache so far (the reused prefix's included).
    read_tokens: int = 0
    next_logits: np.ndarray | None = None
    # Set at prefill, behind the prompt's last Vocabulary.decode_context tokens.
    detokenizer: Detokenizer | None = None
    generated: list[int] = field(default_factory=list)
    sent_text: str = ""
    sent_tokens: int = 0
    # When the oldest token not yet sent was made (the scheduler's clock),
    # while the stream interval holds this stream's deltas; None: none held.
    held_since: float | None = None

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)


class Scheduler(threading.Thread):
    """Continuous batching: admits waiting requests between steps, one token per active sequence per step."""

    def __init__(
        self,
        name: str,
        model,
        vocabulary: Vocabulary,
        max_active: int,
        prefix_cache=None,
        on_prefill: Callable[[], None] | None = None,
        stream_interval: StreamInterval = StreamInterval(),
        clock: Callable[[], float] = time.monotonic,
    ):
        """prefix_cache: a prefix_cache.PrefixCache this thread alone uses, or None for none;
        on_prefill: called after each prefill (the Triton side reports the cache's stats);
        clock: seconds, read once a step (the stream interval's; a test's fake)."""
        super().__init__(name=f"{name}-scheduler", daemon=True)
        self.model_name = name
        self.model = model
        self.vocabulary = vocabulary
        self.max_active = max_active
        self.prefix_cache = prefix_cache
        self.on_prefill = on_prefill
        self._inbox: queue.SimpleQueue[Generation] = queue.SimpleQueue()
        self._stopping = threading.Event()
        # Admitted, their prompts being read, oldest first; then active.
        self._prefilling: list[Generation] = []
        self._active: list[Generation] = []
        self.stream_interval = stream_interval
        self._clock = clock
        # The stream interval's view of the current step: when it began, how
        # long the previous one took (from the start of one step to the next,
        # admissions and prefills included: when a sequence's next token
        # comes), and whether deltas may be held in it.
        self._step_began: float | None = None
        self._step_s = 0.0
        self._holding = False

    def submit(self, generation: Generation) -> None:
        self._inbox.put(generation)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._loop_once()
            except Exception:  # a bug outside the per-sequence guards: keep serving
                log.exception(f"{self.model_name}: scheduler step failed")
                for generation in self._prefilling + self._active:
                    self._fail(generation, None)
                self._prefilling.clear()
                self._active.clear()
        for generation in self._prefilling + self._active + self._drain_inbox():
            # Worded for the inference service, which reads it as UNAVAILABLE
            # (services/inference/triton_protocol.stream_error_code).
            generation.sender.fail(f"{self.model_name}: model is shutting down", "unavailable")

    def _loop_once(self) -> None:
        """Admits what waits, reads a piece of the waiting prompts, and takes
        one decoding step; waits for a request (briefly) when idle."""
        self._admit()
        if self._prefilling:
            self._prefill_pieces()
        if self._active:
            self._step()
        elif not self._prefilling:
            self._step_began = None  # idle time is no step's duration

    def _drain_inbox(self) -> list[Generation]:
        drained = []
        while True:
            try:
                drained.append(self._inbox.get_nowait())
            except queue.Empty:
                return drained

    def _admit(self) -> None:
        while len(self._prefilling) + len(self._active) < self.max_active:
            busy = self._prefilling or self._active
            try:
                # Idle: wait (briefly, to notice shutdown); busy: never stall the running batch.
                generation = self._inbox.get_nowait() if busy else self._inbox.get(timeout=0.1)
            except queue.Empty:
                return
            try:
                cancelled = self._cancelled(generation)
            except Exception as error:  # the sender's own failure: this request alone
                self._fail(generation, error)
                continue
            if not cancelled:
                self._prefilling.append(generation)

    def _start(self, generation: Generation) -> None:
        """A new cache for the request, holding what the prefix cache has of
        its prompt: looked up when its first piece is due, not at admission,
        so it finds the blocks of the prompts read before it, a burst of
        identical prompts included."""
        cache = self.model.new_cache(len(generation.prompt_ids))
        if self.prefix_cache is not None:
            self.model.load_kv(cache, self.prefix_cache.lookup(generation.prompt_ids, generation.cache_salt))
            generation.cached_tokens = generation.read_tokens = cache.length
        generation.cache = cache

    def _prefill_pieces(self) -> None:
        """Reads at most PREFILL_CHUNK_TOKENS prompt tokens, oldest request
        first, then lets the running streams take a step (vLLM's chunked
        prefill): a long prompt read whole held every other sequence of the
        model for its whole length (2,000 tokens of smollm2: ~11 s without a
        token), now for one piece at a time. Short prompts that arrive
        together are read in the same pass, up to the same total, so a burst
        of them costs the running streams one pause, not one per prompt.

        The models' prefill appends after what the cache holds, as it does
        after a reused prefix, so the pieces give the logits the whole prompt
        gives, up to the rounding of the matrix products. Each request's
        cancellation is checked before each of its pieces (it may have waited
        behind other prompts since admission); a request that fails or is
        cancelled mid-prompt is answered alone and leaves the queue."""
        budget = PREFILL_CHUNK_TOKENS
        while budget > 0 and self._prefilling:
            generation = self._prefilling[0]
            prompt = generation.prompt_ids
            try:
                if self._cancelled(generation):
                    self._prefilling.pop(0)
                    continue
                if generation.cache is None:
                    self._start(generation)
                piece = prompt[generation.read_tokens : generation.read_tokens + budget]
                generation.next_logits = self.model.prefill(piece, generation.cache)
                generation.read_tokens += len(piece)
                budget -= len(piece)
                if generation.read_tokens < len(prompt):
                    return  # the budget is spent: the rest after a decoding step
                self._prefilling.pop(0)
                self._prefilled(generation)
            except Exception as error:
                if self._prefilling and self._prefilling[0] is generation:
                    self._prefilling.pop(0)
                self._fail(generation, error)
                continue
            self._active.append(generation)

    def _prefilled(self, generation: Generation) -> None:
        prompt, cache = generation.prompt_ids, generation.cache
        generation.detokenizer = Detokenizer(
            self.vocabulary.decode, prompt[len(prompt) - self.vocabulary.decode_context :]
        )
        if self.prefix_cache is not None:
            try:
                self.prefix_cache.insert(
                    prompt, lambda start, stop: self.model.kv_block(cache, start, stop), generation.cache_salt
                )
            except Exception:  # the cache only saves later work: this request is prefilled and goes on
                log.warning(f"{self.model_name}: could not cache the prompt's blocks", exc_info=True)
        if self.on_prefill is not None:
            self.on_prefill()

    def _step(self) -> None:
        if self.stream_interval.seconds > 0:
            now = self._clock()
            if self._step_began is not None:
                self._step_s = now - self._step_began
            self._step_began = now
            self._holding = len(self._active) >= self.stream_interval.min_active
        continuing = []
        for generation in self._active:
            try:
                if self._cancelled(generation):
                    continue
                logits = generation.next_logits
                logits[self.vocabulary.never_sampled] = -np.inf
                token = sample(logits, generation.params, generation.rng)
                generation.generated.append(token)
                if not self._emit(generation, token):
                    continuing.append(generation)
            except Exception as error:
                self._fail(generation, error)
        self._active = self._decode(continuing)

    def _decode(self, generations: list[Generation]) -> list[Generation]:
        """One batched decoding step; if it raises, each sequence alone, so only the faulty one fails."""
        if not generations:
            return []
        try:
            logits = self.model.decode([g.generated[-1] for g in generations], [g.cache for g in generations])
        except Exception:
            log.warning(
                f"{self.model_name}: batched decode failed; retrying each sequence alone", exc_info=True
            )
            survivors = []
            for generation in generations:
                try:
                    generation.next_logits = self.model.decode(
                        [generation.generated[-1]], [generation.cache]
                    )[0]
                except Exception as error:
                    self._fail(generation, error)
                    continue
                survivors.append(generation)
            return survivors
        for generation, row in zip(generations, logits):
            generation.next_logits = row
        return generations

    def _cancelled(self, generation: Generation) -> bool:
        if not generation.sender.is_cancelled():
            return False
        log.info(
            f"{self.model_name}: request {generation.request_id} cancelled "
            f"after {len(generation.generated)} tokens"
        )
        # Read as CANCELLED by triton_protocol.stream_error_code, as worded here.
        generation.sender.fail("request was cancelled", "cancelled")
        return True

    def _emit(self, generation: Generation, token: int) -> bool:
        """Account for a new token and send what the client should see; True when finished."""
        p, vocabulary, detokenizer = generation.params, self.vocabulary, generation.detokenizer
        # No stop string lay within the text of the previous step, whose
        # stable part this text begins with: only an occurrence that reaches
        # past that part can be new, so the search starts just before its end.
        searched = len(detokenizer.stable)
        text = detokenizer.push(token)

        finish_reason = None
        found = (text.find(s, max(0, searched - len(s) + 1)) for s in p.stop)
        stops = [i for i in found if i >= 0]
        if stops:
            finish_reason, visible = "stop", text[: min(stops)]
        else:
            # A character whose UTF-8 bytes span tokens decodes as U+FFFD
            # until its last byte arrives: wait for it. One the answer ends
            # in the middle of (max_tokens, the end-of-sequence token) never
            # arrives, and is left out, as vLLM's detokenizer leaves it: "晨"
            # then half of "走" ends the answer "晨", not "晨\ufffd" (to the
            # caller and in the cache). Before the stop-string hold below,
            # so that it counts characters, not the placeholder: "!" then
            # half of "¡" must not show the "!" of a stop "!¡".
            visible = text.rstrip("\ufffd")
            if token in vocabulary.stop_ids:
                finish_reason = "stop"
            elif len(generation.generated) >= p.max_tokens:
                finish_reason = "length"
            elif p.stop:
                # Hold back a possible beginning of a stop string: streamed
                # text must never show one, even partially.
                visible = visible[: max(0, len(visible) - (max(map(len, p.stop)) - 1))]
        finished = finish_reason is not None

        if generation.stream:
            if not finished and self._holds(generation):
                return False
            self._send(generation, visible[len(generation.sent_text) :], finish_reason, finished)
            generation.sent_text = visible
            generation.held_since = None
        elif finished:
            prompt = generation.prompt if generation.prepend_prompt else ""
            self._send(generation, prompt + visible, finish_reason, True)
        return finished

    def _holds(self, generation: Generation) -> bool:
        """Whether this step's delta waits for a later one (the stream interval).

        Never before text went out: the first text is the time to first
        token (a first response may carry none: half a character, a held-back
        stop-string prefix). The final response is never held (the caller
        checks), nor a failure or a cancellation (they do not come here).
        A token is held only if the sequence's next one is due, a step from
        now as the last step took, before the oldest held one has waited
        the interval: what is held then goes out with that next token, and
        a model whose steps take longer than it streams token by token as
        before. So the oldest held token waits less than the interval plus
        one step: at the last step that held it, it had waited less than the
        interval minus that guess, and the next step's own length comes on
        top. A step that reads prompts includes their pieces (at most
        PREFILL_CHUNK_TOKENS tokens a step), which delay held text as they delay the
        next token of every stream. Flushing before each admission pass would
        bound the wait by a decode step, but under staggered arrivals (a
        pass every few steps at 16 streams) it roughly halved the tokens a
        response in a fake-clock simulation: the messages this interval
        exists to save.
        """
        if not (self._holding and generation.sent_text):
            return False
        if generation.held_since is None:
            generation.held_since = self._step_began
        return self._step_began + self._step_s - generation.held_since < self.stream_interval.seconds

    @staticmethod
    def _send(generation: Generation, text: str, finish_reason: str | None, final: bool) -> None:
        new_tokens = len(generation.generated) - generation.sent_tokens
        generation.sent_tokens = len(generation.generated)
        generation.sender.send(text, finish_reason, new_tokens, final, generation.cached_tokens)

    def _fail(self, generation: Generation, error: Exception | None) -> None:
        log.error(
            f"{self.model_name}: request {generation.request_id} failed",
            exc_info=(type(error), error, error.__traceback__) if error is not None else None,
        )
        generation.sender.fail(f"{self.model_name}: internal error during generation", "internal")


def plan_generation(
    request_id: str,
    sender: Sender,
    prompt: str,
    encode: Callable[[str], list[int]],
    sampling_json: str,
    stream: bool,
    exclude_input_in_output: bool | None,
    max_context: int,
    cache_salt: str | None = None,
) -> Generation:
    """Validate one request completely before it reaches the scheduler; ValueError when invalid."""
    # vLLM backend semantics: the prompt is prepended unless excluded, and
    # streaming defaults to (and only allows) excluding it.
    prepend_prompt = (not stream) if exclude_input_in_output is None else not exclude_input_in_output
    if stream and prepend_prompt:
        raise ValueError("when streaming, exclude_input_in_output = False is not allowed")
    params = SamplingParams.from_json(sampling_json, max_context)
    prompt_ids = encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    check_prompt_fits(len(prompt_ids), params.max_tokens, max_context)
    return Generation(
        request_id=request_id,
        sender=sender,
        prompt=prompt,
        prompt_ids=prompt_ids,
        params=params,
        stream=stream,
        prepend_prompt=prepend_prompt,
        cache_salt=(cache_salt or "").encode(),
    )
