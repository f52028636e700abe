"""A decoupled Triton Python-backend model speaking the tensor protocol of
Triton's vLLM backend, around engine.Scheduler; tiny_gpt and smollm2 subclass it.

execute() only parses, validates and tokenizes (an invalid request gets an
INVALID_ARG error response at once), then hands the request to the
scheduler thread, which does continuous batching.

How a model imports this: model_repository/generation/ is not a model.
Triton runs with explicit model control (meshgate/local/triton.py passes
--load-model per model), so it loads only the named directories and never
takes this one for a model; each model.py puts this directory on sys.path.
Keeping the shared code inside the model repository keeps the repository
self-contained: a Triton elsewhere needs no meshgate package to serve it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import engine
import numpy as np
import prefix_cache
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# num_cached_tokens is ours (vLLM's RequestOutput.num_cached_tokens; the vLLM
# backend has no such output): prompt tokens served from the prefix cache. A
# tensor, not a response parameter, because this stub's InferenceResponse
# takes only output_tensors and error (r24.10; parameters came later).
EXTRA_OUTPUTS = ("finish_reason", "num_input_tokens", "num_output_tokens", "num_cached_tokens")


class TritonLogHandler(logging.Handler):
    """The engine logs with `logging`; in the stub those lines belong in Triton's log."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


class TritonSender:
    """engine.Sender over a decoupled response sender, with the vLLM backend's output tensors."""

    def __init__(self, response_sender, extra_outputs: frozenset[str], model_name: str):
        self.response_sender = response_sender
        self.extra_outputs = extra_outputs
        self.model_name = model_name
        self.prompt_tokens = 0
        # Whether a response carried num_input_tokens yet (below).
        self.prompt_count_sent = False

    def is_cancelled(self) -> bool:
        return self.response_sender.is_cancelled()

    def send(
        self, text: str, finish_reason: str | None, new_tokens: int, final: bool, cached_tokens: int
    ) -> None:
        outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if "num_output_tokens" in self.extra_outputs:
            # Tokens since the previous response, as the vLLM backend reports it.
            outputs.append(pb_utils.Tensor("num_output_tokens", np.array([new_tokens], dtype=np.uint32)))
        # The rest says nothing new before the end (vLLM sends finish_reason
        # str(None) until then, and the prompt's counts never change), so it
        # rides on the final response only: every tensor is a shared-memory
        # copy here and bytes on the wire for each streamed token. But for
        # the prompt's count on the first response too: a caller billing a
        # request cut short before the final one (hung up, its deadline
        # passed) bills the tokens the model read, not a bound (one tensor
        # a request).
        if final:
            outputs.extend(self._final_outputs(finish_reason, cached_tokens))
        elif not self.prompt_count_sent and "num_input_tokens" in self.extra_outputs:
            outputs.append(self._prompt_count())
        self.response_sender.send(
            pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if final else 0
        )

    def _final_outputs(self, finish_reason: str | None, cached_tokens: int) -> list:
        outputs = []
        if "finish_reason" in self.extra_outputs:
            outputs.append(
                pb_utils.Tensor("finish_reason", np.array([str(finish_reason).encode()], dtype=np.object_))
            )
        if "num_input_tokens" in self.extra_outputs:
            outputs.append(self._prompt_count())
        if "num_cached_tokens" in self.extra_outputs:
            outputs.append(pb_utils.Tensor("num_cached_tokens", np.array([cached_tokens], dtype=np.uint32)))
        return outputs

    def _prompt_count(self):
        self.prompt_count_sent = True
        return pb_utils.Tensor("num_input_tokens", np.array([self.prompt_tokens], dtype=np.uint32))

    def fail(self, message: str, kind: str) -> None:
        # Looked up here: the stub adds TritonError to pb_utils only after importing the models.
        codes = {
            "internal": pb_utils.TritonError.INTERNAL,
            "cancelled": pb_utils.TritonError.CANCELLED,
            "unavailable": pb_utils.TritonError.UNAVAILABLE,
        }
        self.send_error(message, codes[kind])

    def send_error(self, message: str, code) -> None:
        try:
            self.response_sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL
            )
        except Exception:  # the client may be gone already; nothing left to tell it
            pb_utils.Logger.log_warn(f"{self.model_name}: could not send a final error response")


class PrefixCacheMetrics:
    """The prefix cache's cumulative stats as Triton custom metrics, on Triton's metrics port.

    Counters in tokens as vLLM's prefix_cache_queries / prefix_cache_hits, so
    hits / queries is the token hit rate; labelled by model, one family per
    name across models. Pushed after each prefill (a few IPC calls per
    request, never per token), as deltas of what was reported before.
    """

    COUNTERS = {
        "lookups": ("meshgate_prefix_cache_lookups_total", "Prompts looked up in the prefix cache"),
        "queried_tokens": ("meshgate_prefix_cache_queried_tokens_total", "Prompt tokens looked up"),
        "hit_tokens": ("meshgate_prefix_cache_hit_tokens_total", "Prompt tokens served from the cache"),
        "evicted_blocks": ("meshgate_prefix_cache_evicted_blocks_total", "Blocks evicted (LRU)"),
    }
    GAUGES = {
        "used_bytes": ("meshgate_prefix_cache_bytes", "Bytes of KV held by the prefix cache"),
        "blocks": ("meshgate_prefix_cache_blocks", "Blocks held by the prefix cache"),
    }

    def __init__(self, cache: prefix_cache.PrefixCache, model_name: str):
        self.cache = cache
        self.model_name = model_name
        labels = {"model": model_name}
        # Families must outlive their metrics (the stub says so), hence kept.
        self.families = {}
        self.metrics = {}
        for field, (name, description) in self.COUNTERS.items():
            self.families[field] = pb_utils.MetricFamily(name, description, pb_utils.MetricFamily.COUNTER)
            self.metrics[field] = self.families[field].Metric(labels=labels)
        for field, (name, description) in self.GAUGES.items():
            self.families[field] = pb_utils.MetricFamily(name, description, pb_utils.MetricFamily.GAUGE)
            self.metrics[field] = self.families[field].Metric(labels=labels)
        self.reported = dict.fromkeys(self.COUNTERS, 0)

    def report(self) -> None:
        try:
            for field in self.COUNTERS:
                value = getattr(self.cache.stats, field)
                if value != self.reported[field]:
                    self.metrics[field].increment(value - self.reported[field])
                    self.reported[field] = value
            for field in self.GAUGES:
                self.metrics[field].set(getattr(self.cache.stats, field))
        except Exception:  # metrics are a report: they must never fail the request that prefilled
            pb_utils.Logger.log_warn(f"{self.model_name}: could not update the prefix-cache metrics")


def _bool_input(request, name: str) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else bool(tensor.as_numpy().item())


def _string_input(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _sampling_json(request) -> str:
    """The `sampling_parameters` tensor, else the request's parameters, as
    Triton's vLLM backend reads them: a client of Triton's HTTP `generate`
    endpoint (LiteLLM's `triton` provider) sends `max_tokens` and friends as
    request parameters, which that endpoint cannot put in a tensor."""
    tensor_json = _string_input(request, "sampling_parameters")
    return tensor_json if tensor_json is not None else request.parameters()


@dataclass(frozen=True)
class ModelParameters:
    """The `parameters` of a generation model's config.pbtxt."""

    max_active_sequences: int = 16
    prefix_cache_bytes: int = 0  # 0: no prefix cache
    stream_interval: engine.StreamInterval = engine.StreamInterval()

    @classmethod
    def from_parameters(cls, parameters: dict) -> ModelParameters:
        """From the parameters as Triton gives them ({"max_active_sequences":
        {"string_value": "16"}, ...}); ValueError naming the parameter when one
        is invalid, so the model's load fails with a message saying which."""

        def integer(key: str, default: int, minimum: int) -> int:
            entry = parameters.get(key)
            if entry is None:
                return default
            raw = entry.get("string_value", "")
            number = engine._as_int(key, raw)  # as the engine reads its own: "2.5", "" and "16x" fail
            if number < minimum:
                raise ValueError(f"{key} must be >= {minimum}, got {raw!r}")
            return number

        def milliseconds(key: str) -> float:
            entry = parameters.get(key)
            if entry is None:
                return 0.0
            raw = entry.get("string_value", "")
            number = engine._as_finite_float(key, raw)
            if number < 0:
                raise ValueError(f"{key} must be >= 0 (0: off), got {raw!r}")
            return number

        default_interval = engine.StreamInterval()
        return cls(
            max_active_sequences=integer("max_active_sequences", cls.max_active_sequences, minimum=1),
            prefix_cache_bytes=integer("prefix_cache_bytes", cls.prefix_cache_bytes, minimum=0),
            stream_interval=engine.StreamInterval(
                seconds=milliseconds("stream_interval_ms") / 1000,
                min_active=integer("stream_interval_min_active", default_interval.min_active, minimum=1),
            ),
        )


class VLLMStyleModel:
    """Subclasses set `name` and implement load(); the rest is shared."""

    name = "text-generation"

    def load(self, model_config: dict) -> tuple[object, engine.Vocabulary]:
        """The model (new_cache, prefill, decode, config.max_context) and its vocabulary."""
        raise NotImplementedError

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, exactly as the model sees them."""
        raise NotImplementedError

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException(f"{self.name} must use the decoupled transaction policy")
        handler = TritonLogHandler()
        engine.log.addHandler(handler)
        engine.log.setLevel(logging.INFO)
        engine.log.propagate = False
        try:
            parameters = ModelParameters.from_parameters(model_config.get("parameters", {}))
        except ValueError as error:
            raise pb_utils.TritonModelException(f"{self.name}: invalid model parameter: {error}") from error
        self.model, vocabulary = self.load(model_config)
        cache_bytes = parameters.prefix_cache_bytes
        cache = prefix_cache.PrefixCache(cache_bytes) if cache_bytes > 0 else None
        self.prefix_cache_metrics = PrefixCacheMetrics(cache, self.name) if cache is not None else None
        self.scheduler = engine.Scheduler(
            self.name,
            self.model,
            vocabulary,
            parameters.max_active_sequences,
            prefix_cache=cache,
            on_prefill=self.prefix_cache_metrics.report if cache is not None else None,
            stream_interval=parameters.stream_interval,
        )
        self.scheduler.start()

    def execute(self, requests):
        for request in requests:
            extra_outputs = frozenset(
                name for name in EXTRA_OUTPUTS if _bool_input(request, f"return_{name}")
            )
            sender = TritonSender(request.get_response_sender(), extra_outputs, self.name)
            try:
                stream = bool(_bool_input(request, "stream"))
                generation = engine.plan_generation(
                    request_id=request.request_id(),
                    sender=sender,
                    prompt=_string_input(request, "text_input"),
                    encode=self.encode,
                    sampling_json=_sampling_json(request) or "",
                    stream=stream,
                    exclude_input_in_output=_bool_input(request, "exclude_input_in_output"),
                    max_context=self.model.config.max_context,
                    cache_salt=_string_input(request, "cache_salt"),
                )
            except Exception as error:  # any malformed input becomes an error response for it alone
                # "<model>: invalid request: " is how the inference service
                # tells a refusal (INVALID_ARGUMENT) from a failure: on a
                # stream, Triton passes the error on as text alone
                # (services/inference/triton_protocol.stream_error_code).
                sender.send_error(f"{self.name}: invalid request: {error}", pb_utils.TritonError.INVALID_ARG)
                continue
            sender.prompt_tokens = len(generation.prompt_ids)
            self.scheduler.submit(generation)
        return None

    def finalize(self):
        self.scheduler.shutdown()
