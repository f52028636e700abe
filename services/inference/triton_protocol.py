"""Triton's gRPC messages for the models we front, built and read directly.

Generation speaks the tensor names of Triton's vLLM backend (``text_input``,
``stream``, ``sampling_parameters`` as JSON -> ``text_output``), so the same
service fronts the bundled model or a real vLLM-on-Triton deployment by
configuration alone. Requests are assembled as protobufs with raw tensor
contents: no numpy round trip per request.
"""

from __future__ import annotations

import codecs
import json
import re
import struct

import grpc
import jinja2
from tritonclient.grpc import service_pb2

from meshgate import tokenization
from meshgate.common.v1 import common_pb2
from meshgate.config import ServedModelSettings
from meshgate.errors import invalid_argument
from meshgate.reasons import Reason

_TRUE = b"\x01"
_FINAL_FLAG = "triton_final_response"


def render_chat(messages, served: ServedModelSettings) -> str:
    """The prompt: the served model's chat template (its setting; empty: the
    plain one of the bundled tiny-gpt) over the messages, with the cue for
    the assistant's turn, as Hugging Face's apply_chat_template renders it,
    but with any special token of the model's tokenizer that a content
    writes broken into text (tokenization.AsText): the model tokenizes the
    whole prompt, so only the template's own text may make special tokens.

    Templates and tokenizers are loaded once per process (the service loads
    them at start). A template may refuse a conversation
    (``raise_exception``): that is the caller's INVALID_ARGUMENT, not a
    failure of the service.
    """
    template = tokenization.load_chat_template(served.chat_template)
    as_text = tokenization.as_text(served.tokenizer)
    try:
        return template.render_messages(messages, as_text=as_text)
    except jinja2.TemplateError as error:
        reason = f"the model's chat template refused the conversation: {error}"
        raise invalid_argument(Reason.CHAT_TEMPLATE_REJECTED, reason) from error


def sampling_parameters(parameters: common_pb2.GenerationParameters, default_max_tokens: int) -> str:
    """vLLM SamplingParams as JSON; unset fields stay unset so the model's defaults apply."""
    values: dict = {
        "max_tokens": parameters.max_tokens if parameters.HasField("max_tokens") else default_max_tokens
    }
    if parameters.HasField("temperature"):
        values["temperature"] = parameters.temperature
    if parameters.HasField("top_p"):
        values["top_p"] = parameters.top_p
    if parameters.stop:
        values["stop"] = list(parameters.stop)
    if parameters.HasField("seed"):
        values["seed"] = parameters.seed
    return json.dumps(values, separators=(",", ":"))


def _bytes_element(data: bytes) -> bytes:
    # Triton's BYTES wire format: each element is a 4-byte little-endian length, then the bytes.
    return struct.pack("<I", len(data)) + data


def _add_input(request, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)


# An input of the bundled models only (vLLM's backend has no such input and
# Triton refuses unknown ones), so it is sent to a model that declares it.
CACHED_TOKENS_FLAG = "return_num_cached_tokens"
# Also the bundled models' only: only requests with the same salt share
# prefix-cache blocks; the service salts each tenant's with its id.
CACHE_SALT_INPUT = "cache_salt"
# The parameter of the bundled generation models' configs saying how many
# sequences one instance runs at once (the bundled generation engine):
# the model's generation slots on that server (generation_slots.py).
GENERATION_SLOTS_PARAMETER = "max_active_sequences"


def generate_request(
    triton_model: str,
    request_id: str,
    prompt: str,
    sampling_json: str,
    batched: bool,
    cached_tokens: bool = False,
    cache_salt: str = "",
) -> service_pb2.ModelInferRequest:
    shape = [1, 1] if batched else [1]
    request = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    _add_input(request, "text_input", "BYTES", shape, _bytes_element(prompt.encode()))
    _add_input(request, "stream", "BOOL", shape, _TRUE)
    _add_input(request, "sampling_parameters", "BYTES", shape, _bytes_element(sampling_json.encode()))
    _add_input(request, "exclude_input_in_output", "BOOL", shape, _TRUE)
    for flag in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        _add_input(request, flag, "BOOL", shape, _TRUE)
    if cached_tokens:
        _add_input(request, CACHED_TOKENS_FLAG, "BOOL", shape, _TRUE)
    if cache_salt:
        _add_input(request, CACHE_SALT_INPUT, "BYTES", shape, _bytes_element(cache_salt.encode()))
    # Without it, a model that ends with an empty final response leaves the
    # stream silent and the caller could not tell "done" from "slow".
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def embed_request(triton_model: str, texts: list[str]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=triton_model)
    _add_input(
        request,
        "text",
        "BYTES",
        [len(texts), 1],
        b"".join(_bytes_element(t.encode()) for t in texts),
    )
    return request


class GenerateEvent:
    """What one streamed response of a vLLM-style model carried.

    As in the vLLM backend, ``output_tokens`` counts the tokens since the
    previous response, so a stream's total is their sum.
    """

    __slots__ = ("text", "final", "finish_reason", "input_tokens", "output_tokens", "cached_tokens")

    def __init__(self) -> None:
        self.text = ""
        self.final = False
        self.finish_reason = ""
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        # Prompt tokens the model served from its prefix cache.
        self.cached_tokens: int | None = None


def ends_stream(message: service_pb2.ModelStreamInferResponse) -> bool:
    """Whether a streamed message is the last one (the final response, or a
    failure): read without the rest of the response, for every message."""
    if message.error_message:
        return True
    final = message.infer_response.parameters.get(_FINAL_FLAG)
    return bool(final and final.bool_param)


def stream_error_code(error_message: str, triton_model: str) -> grpc.StatusCode:
    """The status a streamed ``error_message`` stands for. On a stream,
    Triton passes an error on as text alone (its status code would need its
    triton_grpc_error mode, which crashed tritonserver:
    backends.TritonBackend._open_stream), so the wording decides, as the
    bundled generation models and Triton word them: a request the model
    refuses ("<model>: invalid request: ...") is the caller's
    INVALID_ARGUMENT; a model shutting down, or one this server does not
    have (ready) just now, UNAVAILABLE, so the request is tried on another
    server if nothing went out yet; the model's own "request was cancelled",
    CANCELLED; then the real vLLM and TensorRT-LLM backends' wording
    (_BACKEND_WORDING), also as TensorRT-LLM's BLS model relays it inside a
    Python traceback; a Python-backend model whose stub process died
    (stub_died), UNAVAILABLE too; anything else, a failure of the model:
    INTERNAL.

    The code a backend gives its error (pb_utils.TritonError's) is not in
    the text: Triton streams TRITONSERVER_ErrorMessage alone (server
    src/grpc/stream_infer_handler.cc), without the "[StatusCode....]" that
    tritonclient prints in front of an exception."""
    if error_message.startswith(f"{triton_model}: invalid request: "):
        return grpc.StatusCode.INVALID_ARGUMENT
    if error_message == f"{triton_model}: model is shutting down" or model_not_here(error_message):
        return grpc.StatusCode.UNAVAILABLE
    if error_message == "request was cancelled":
        return grpc.StatusCode.CANCELLED
    if stub_died(error_message):
        return grpc.StatusCode.UNAVAILABLE
    raised = _raised_in_traceback(error_message)
    if raised is not None:
        exception, text = raised
        if exception == "lib.decode.RequestValidationError":
            return grpc.StatusCode.INVALID_ARGUMENT
        if exception != "c_python_backend_utils.TritonModelException":
            return grpc.StatusCode.INTERNAL
        # A composing model's error, relayed (the BLS's
        # triton_decoder._exec_triton_request): read as that model worded it.
        return stream_error_code(text, triton_model)
    for wording, code in _BACKEND_WORDING:
        if wording.match(error_message):
            return code
    return grpc.StatusCode.INTERNAL


def model_not_here(error_message: str) -> bool:
    """Whether a Triton error (a stream's error_message, a unary call's
    details) says this server has no such model ready just now (unloaded,
    loading, or the server not ready): the request never ran, and another
    server may have it. A unary call gets it as NOT_FOUND ("Request for
    unknown model: 'minilm' has no available versions", tritonserver 2.51),
    which would otherwise read as the caller's mistake."""
    return model_unknown(error_message) or error_message.startswith("Server not ready")


def model_unknown(error_message: str) -> bool:
    """Whether a Triton error says this server has no such model loaded
    (unloaded, or still loading), while the server itself serves its others."""
    return error_message.startswith("Request for unknown model")


# How tritonserver refuses a request of a model it has no ready version of
# (Triton core's ModelRepositoryManager::GetModel puts "Request for unknown
# model: " before the model lifecycle's words): every version unloaded or
# still loading, as while the server drains on SIGTERM, which unloads every
# model at once and refuses each new request so while it finishes those it
# runs ("has no available versions", tritonserver 2.51); a version asked for
# by number that is not ready; a model it never had. A unary call gets it
# as NOT_FOUND (UNAVAILABLE in older releases, whose GetInferenceBackend
# worded it so; INVALID_ARGUMENT for a model never in the repository), a
# stream as the text alone.
_NOT_LOADED_WORDING = r"(?:has no available versions|version \d+ is not at ready state|is not found)\Z"
_NOT_LOADED_CODES = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT}
)


def refused_as_not_loaded(code: grpc.StatusCode, details: str, triton_model: str) -> bool:
    """Whether a failed Triton call of ``triton_model`` (its status code,
    stream_error_code's reading on a stream, and its details) is the server
    refusing it as not loaded there: the request never ran, the server may
    serve its other models, and another server may have this one. The
    wording is anchored and must name ``triton_model``: a model's own error
    that quotes Triton's words about another model (a composing model's) is
    not this one missing."""
    if code not in _NOT_LOADED_CODES:
        return False
    wording = f"Request for unknown model: '{re.escape(triton_model)}' {_NOT_LOADED_WORDING}"
    return re.match(wording, details) is not None


def server_exiting(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed health call (ServerLive, ServerReady) is Triton
    saying it drains on SIGTERM (core src/server.cc: UNAVAILABLE "Server
    exiting", tritonserver 2.51): it answers, unloads every model and
    refuses new requests (refused_as_not_loaded), and finishes those it
    runs within its --exit-timeout-secs."""
    return code == grpc.StatusCode.UNAVAILABLE and details == "Server exiting"


# What Triton's Python backend answers, without running the model, to a
# request for a model instance whose stub process died (killed: the OOM
# killer's SIGKILL): the instance's name, as tritonserver 2.51 sent it here
# on streams and unary calls alike, or python_backend src/python_be.cc
# SendMessageToStub's wording inside the backend's "Failed to process the
# request(s)". The instance stays dead, and reads ready, until the model is
# unloaded and loaded again (a load alone is a no-op while its files are
# unchanged); another server's instance is not dead with it.
_STUB_DIED = re.compile(
    r"(?:Stub process '[^']*' is not healthy\.|Failed to process the request\(s\) for model '[^']*', "
    r"message: Stub process is not healthy\.)\Z"
)


def stub_died(error_message: str) -> bool:
    """Whether a Triton error (a stream's error_message, a unary call's
    details) says the model's Python-backend stub process died: the request
    never ran, so another server may take it, and every other request of
    that model on this server is stranded (Triton sends them nothing more)."""
    return _STUB_DIED.match(error_message) is not None


# The wording of the real backends' errors, as read in their source
# (triton-inference-server/vllm_backend 8de0c14 of 2026-01; TensorRT-LLM's
# triton_backend/ in NVIDIA/TensorRT-LLM, where tensorrtllm_backend moved its
# source in 2025; vLLM's v1 engine; python_backend f9088ff for how an
# exception from execute() is worded), each
# anchored at the start of the message: a message may quote other text (a
# path, a model's words) and a wrong reading costs more than INTERNAL does.
# A wrong INVALID_ARGUMENT blames the caller for the server's failure (a 400
# at the HTTP edge) and would show an outage (every request failing) as bad
# callers; a wrong UNAVAILABLE retries a refusal on every server and counts
# against each one's breaker; a wrong INTERNAL fails that request and counts
# once against its server's breaker (servicer._server_fault), which a
# request failing so on every server opens on each at worst, with traffic
# still tried there (balancing.order). So a
# wording maps only where nothing but that cause produces it; anything
# ambiguous stays INTERNAL. Left INTERNAL
# on purpose: vLLM backend's "Error generating stream: 'NoneType' object has
# no attribute 'lora_name'" (src/utils/vllm_backend_utils.py
# TritonSamplingParams.from_dict swallows every exception, bad JSON and a
# broken vLLM alike, and the sampling parameters we send are checked before
# they go: meshgate.sampling), and the generic "Error generating stream: "/
# "Error generating request: " around anything else an engine raises.
_BACKEND_WORDING: tuple[tuple[re.Pattern[str], grpc.StatusCode], ...] = tuple(
    (re.compile(wording), code)
    for wording, code in (
        # vLLM's prompt checks (vllm/v1/engine/input_processor.py
        # InputProcessor._validate_prompt_len), passed on by the vLLM
        # backend as "Error generating stream: {e}" (src/model.py _infer).
        (
            r"Error generating stream: The decoder prompt \(length \d+\) (?:plus the number of "
            r"requested output tokens \(at least 1\) )?is longer than the maximum model length of \d+\.",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (r"Error generating stream: The decoder prompt cannot be empty", grpc.StatusCode.INVALID_ARGUMENT),
        # TensorRT-LLM's executor refusing a prompt longer than the engine
        # takes (cpp/tensorrt_llm/batch_manager/llmRequest.cpp
        # LlmRequest::validate, wrapped in executor/executorImpl.cpp), as the
        # C++ backend sends it (triton_backend/inflight_batcher_llm/src/
        # model_instance_state.cc fillTritonResponse).
        (
            r"Executor failed process requestId \d+ due to the following error: Encountered an error "
            r"when fetching new request: Prompt length \(\d+\) exceeds maximum input length \(\d+\)\.",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # The vLLM backend's health check found its engine dead (src/model.py
        # _check_health; the model is being unloaded), or the engine died
        # under the request (vllm/v1/engine/exceptions.py EngineDeadError).
        (r"Model is unavailable due to unhealthy vLLM engine\Z", grpc.StatusCode.UNAVAILABLE),
        (r"Error generating stream: EngineCore encountered an issue\.", grpc.StatusCode.UNAVAILABLE),
        # A request that reached a model being unloaded: the vLLM backend's
        # and TensorRT-LLM's LLM API model's execute() assert (src/model.py;
        # triton_backend/all_models/llmapi/tensorrt_llm/1/model.py), as the
        # Python backend words an exception from execute() (python_backend
        # src/pb_stub.cc Stub::ProcessRequests; the model's instance name).
        (
            r"Failed to process the request\(s\) for model '[^']*', message: AssertionError: "
            r"Cannot create tasks after shutdown has been requested(?:\n|\Z)",
            grpc.StatusCode.UNAVAILABLE,
        ),
        # TensorRT-LLM's executor shut down or its queue full
        # (executorImpl.cpp Executor::Impl::enqueueRequests), as the C++
        # backend sends what enqueue threw (model_instance_state.cc enqueue).
        (
            r"\[TensorRT-LLM\]\[ERROR\] Assertion failed: Shutdown called, cannot enqueue requests \(",
            grpc.StatusCode.UNAVAILABLE,
        ),
        (
            r"Maximum queue size of \d+ has been reached, please try again later",
            grpc.StatusCode.UNAVAILABLE,
        ),
        # Cancelled, as the request's sender was told (vLLM backend
        # src/model.py _infer; LLM API model cancellation_loop and
        # handle_stop_request).
        (r"Request was cancelled\Z", grpc.StatusCode.CANCELLED),
        (r"Request cancelled by client\Z", grpc.StatusCode.CANCELLED),
    )
)

# A line of a Python traceback that names the exception raised: source lines
# are indented, the header and "During handling ..." lines have no "Name: ",
# and C++ stack frames (TensorRT-LLM's, after its message) start with a number.
_TRACEBACK_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.MULTILINE)


def _raised_in_traceback(error_message: str) -> tuple[str, str] | None:
    """The last exception (qualified name, first line of its message) of a
    Python traceback sent as the error, as TensorRT-LLM's tensorrt_llm_bls
    model sends every error (traceback.format_exc(): its model.py execute);
    None for any other message."""
    if not error_message.startswith("Traceback (most recent call last):\n"):
        return None
    raised = _TRACEBACK_EXCEPTION.findall(error_message)
    return raised[-1] if raised else None


def needs_no_hold(message: service_pb2.ModelStreamInferResponse) -> bool:
    """Whether a streamed message goes on at once rather than wait in the
    inference service's stream interval: the last one (``ends_stream``), or
    one that carries several tokens. A model that sends those already holds
    its deltas (the bundled models' ``stream_interval_ms``, the generation
    engine's StreamInterval): holding its responses again
    would compound the two intervals (a response every 80 ms, held up to 80
    ms more), while a backend that sends one token a response (vLLM or
    TensorRT-LLM on Triton) is still held here. Read for every message,
    without the text."""
    if ends_stream(message):
        return True
    response = message.infer_response
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.name == "num_output_tokens":
            tokens = _first_integer(raw, output.datatype)
            return tokens is not None and tokens > 1
    return False


def text_decoder() -> codecs.IncrementalDecoder:
    """The decoder of one stream's ``text_output`` bytes, kept for the whole
    stream: a backend that sends byte-level tokens (vLLM or TensorRT-LLM on
    Triton) may split a character's UTF-8 bytes across two responses, and
    each decoded alone read as two U+FFFD. Bytes that do not end a character
    wait for the next response; the stream is never flushed, so a character
    the answer ends in the middle of is left out, as the bundled generation
    engine and vLLM's detokenizer leave it, rather than sent as U+FFFD.
    Bytes that are no UTF-8 at all are still replaced, not raised."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def read_generate_response(
    response: service_pb2.ModelInferResponse, text: codecs.IncrementalDecoder
) -> GenerateEvent:
    """One response of a stream, its ``text_output`` decoded by the stream's
    ``text`` (text_decoder)."""
    event = GenerateEvent()
    final = response.parameters.get(_FINAL_FLAG)
    event.final = bool(final and final.bool_param)
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.name == "text_output":
            event.text = text.decode(_first_bytes_element(raw))
        elif output.name == "finish_reason":
            # Replaced, as the text is: a strict decode of a foreign model's
            # bytes raised out of the stream as a bare INTERNAL, without the
            # counts delivered (a review of the inference service).
            reason = _first_bytes_element(raw).decode("utf-8", errors="replace")
            # vLLM sends str(None) until the sequence has finished.
            event.finish_reason = "" if reason == "None" else reason
        elif output.name == "num_input_tokens":
            event.input_tokens = _first_integer(raw, output.datatype)
        elif output.name == "num_output_tokens":
            event.output_tokens = _first_integer(raw, output.datatype)
        elif output.name == "num_cached_tokens":
            event.cached_tokens = _first_integer(raw, output.datatype)
    return event


EMBEDDING_OUTPUT = "embedding"
REVISION_OUTPUT = "revision"


def embedding_outputs(response: service_pb2.ModelInferResponse) -> tuple[list[int], bytes, str]:
    """An embedding model's answer: the vectors' shape and bytes (its
    "embedding" output, else its first), and the revision that made them
    (its "revision" output's first row: one model instance made them all;
    "" from a model without one)."""
    by_name = {output.name: index for index, output in enumerate(response.outputs)}
    vectors = by_name.get(EMBEDDING_OUTPUT, 0)
    revision = by_name.get(REVISION_OUTPUT)
    return (
        list(response.outputs[vectors].shape),
        response.raw_output_contents[vectors],
        "" if revision is None else _first_bytes_element(response.raw_output_contents[revision]).decode(),
    )


def _first_bytes_element(raw: bytes) -> bytes:
    if len(raw) < 4:
        return b""
    (length,) = struct.unpack_from("<I", raw)
    return raw[4 : 4 + length]


_INTEGER_FORMATS = {"UINT32": "<I", "INT32": "<i", "UINT64": "<Q", "INT64": "<q"}


def _first_integer(raw: bytes, datatype: str) -> int | None:
    fmt = _INTEGER_FORMATS.get(datatype)
    if fmt is None or len(raw) < struct.calcsize(fmt):
        return None
    return struct.unpack_from(fmt, raw)[0]
