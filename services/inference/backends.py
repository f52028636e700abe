"""The Triton servers behind this service, their health, and the choice among them."""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import dataclasses
import time

import grpc
import structlog
from tritonclient.grpc import service_pb2, service_pb2_grpc

from meshgate import balancing, serving, watching
from meshgate.errors import unavailable
from meshgate.reasons import Reason
from services.inference import triton_protocol

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 2.0
# Consecutive failed probes before a model (or a whole server) leaves rotation.
PROBES_TO_MARK_DOWN = 3
# Why the calls OpenCalls.end() cancels for the probes fail.
LEFT_ROTATION = "the Triton server left rotation with the call open: its health probes failed"
# The canary (TritonBackend.canary): one real request of a model, as small as
# it gets: a one-word prompt and one token, or one word to embed. Triton
# refused a dead stub's request in ~1 s here; a live tiny_gpt answers in
# milliseconds, and the model it probes has no other traffic on that server
# while it is out. One that takes longer proves nothing either way.
CANARY_TIMEOUT_S = 5.0
CANARY_TEXT = "ok"
CANARY_SAMPLING = '{"max_tokens":1}'
# Why the calls TritonBackend.stub_died cancels fail (before the stub's own words).
STUB_DIED_UNDER_CALL = "the model's stub process died: "
# Why a model Triton refused as not loaded is out of rotation on that server
# (TritonBackend.refused_as_not_loaded), and why a draining server's models
# are (TritonBackend.probe): for an operator, and for the callers that then
# find no server with the model ready.
REFUSED_AS_NOT_LOADED = (
    "Triton refused a request of it as not loaded (unloaded, or the server draining on shutdown)"
)
DRAINING = 'the server is draining on shutdown (Triton answers its probes "Server exiting")'
# The longest a stream the pool does not keep may take to close cleanly once
# its request is answered (TritonStreams.retire): Triton ends it a round trip
# after the half-close; one that has not by then is cancelled.
STREAM_CLOSE_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class TritonStatistics:
    """A model's cumulative figures at one backend, from Triton's statistics API."""

    queue_ns: int = 0
    compute_ns: int = 0
    successes: int = 0


class OpenCalls:
    """The calls open on one Triton server, each with its model, so that they
    can be ended when the probes take the server out of rotation, or when
    the model's stub process died under them (TritonBackend.stub_died).

    A server that stops answering with its connection up (stopped, wedged)
    is noticed by the probes within PROBES_TO_MARK_DOWN rounds of
    PROBE_TIMEOUT_S plus the inference service's health interval; the channel's
    keepalive would take 5 minutes (serving.TRITON_CHANNEL_OPTIONS), and
    until then every call on it would wait. Those calls are cancelled instead
    and read as UNAVAILABLE to whoever made them, like a call on a server
    that died: retried on another server before any response, a stream
    ended UNAVAILABLE after some.
    """

    def __init__(self, clock: collections.abc.Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._model_of: dict[object, str] = {}
        # The calls end() cancelled, with why.
        self._ended: dict[object, str] = {}
        # When each call that Triton has not answered yet was sent.
        self._unanswered_since: dict[object, float] = {}
        # When Triton was last heard of each model here (a call it answered
        # ending, a canary's end), for quiet_for: while a call is open, the
        # model is not quiet.
        self._last_heard: dict[str, float] = {}
        self._started = clock()

    def __len__(self) -> int:
        return len(self._model_of)

    def add(self, call, model: str) -> None:
        self._model_of[call] = model
        self._unanswered_since[call] = self._clock()

    def answered(self, call) -> None:
        """Triton sent ``call`` its first response."""
        self._unanswered_since.pop(call, None)

    def heard(self, model: str) -> None:
        """Triton answered a request of ``model`` (or a canary of it ended)."""
        self._last_heard[model] = self._clock()

    def quiet_for(self, models: collections.abc.Iterable[str], seconds: float) -> set[str]:
        """Those of ``models`` with no call open here and nothing heard of
        them for over ``seconds`` (since this registry began, for one never
        asked): TritonBackend.probe sends them a canary, so that a stub that
        died while its model was idle is found before a caller's request is."""
        open_models = set(self._model_of.values())
        heard_before = self._clock() - seconds
        return {
            model
            for model in models
            if model not in open_models and self._last_heard.get(model, self._started) < heard_before
        }

    def discard(self, call) -> None:
        """``call`` ended; one Triton answered was heard of to its end (a
        long stream's model is not quiet the moment it ends: quiet_for)."""
        if call not in self._unanswered_since and (model := self._model_of.get(call)) is not None:
            self.heard(model)
        self._model_of.pop(call, None)
        self._ended.pop(call, None)
        self._unanswered_since.pop(call, None)

    def unanswered_for(self, seconds: float) -> set[str]:
        """The models of the calls that have waited over ``seconds`` for
        Triton's first response (TritonBackend.probe sends their model a
        canary: its stub may have died under them)."""
        sent_before = self._clock() - seconds
        return {self._model_of[call] for call, sent in self._unanswered_since.items() if sent < sent_before}

    def end(self, models: set[str], why: str = LEFT_ROTATION) -> int:
        """Cancels the open calls for ``models``, which then fail UNAVAILABLE
        saying ``why`` (ended_here); returns how many. A call that already
        finished is not marked: the error it ended with (a model's
        INVALID_ARGUMENT, a deadline) is its own, not UNAVAILABLE."""
        ended = 0
        for call, model in list(self._model_of.items()):
            if model in models and call.cancel():
                self._ended[call] = why
                ended += 1
        return ended

    def ended_here(self, call) -> grpc.aio.AioRpcError | None:
        """What ``call`` fails with if its cancellation (grpc raises
        CancelledError for a call cancelled here) was end()'s, not its
        caller's (a caller that leaves cancels the task, which then reads as
        cancelling): UNAVAILABLE, as on a server that died. None otherwise."""
        why = self._ended.get(call)
        task = asyncio.current_task()
        if why is None or (task is not None and task.cancelling()):
            return None
        return triton_status(grpc.StatusCode.UNAVAILABLE, why)

    async def answer(self, call, model: str):
        """A unary call's response, with ``call`` open here until it comes."""
        self.add(call, model)
        try:
            response = await call
            self.answered(call)
            return response
        except asyncio.CancelledError as cancelled:
            if (failure := self.ended_here(call)) is not None:
                raise failure from cancelled
            raise
        finally:
            self.discard(call)


class TritonStreams:
    """Open ModelStreamInfer calls to one Triton server, idle between the
    requests they carry, one request at a time.

    Opening a call for every generation (the call object, its headers, the
    half-close, the trailers at the end) cost the inference service ~0.46 ms
    of CPU an answer at 16 concurrent streams, ~10%, as measured (A/B,
    bench/README.md, "Triton streams reused"; a py-spy profile had
    estimated ~1.5 ms, about a quarter).
    A stream carries one request at a time, so cancelling it cancels exactly
    that request inside Triton: any end but a clean final response cancels
    the stream and it never comes back here. Idle streams are not in-flight
    work (TritonBackend.in_flight, calls) and carry no request's trace
    context: one call, many requests, so the W3C context of each request's
    client span cannot ride the call's metadata (only Triton's own tracing,
    off unless started with --trace-config, loses the link).
    """

    def __init__(self, open_stream: collections.abc.Callable[[], object], idle_limit: int) -> None:
        self._open = open_stream
        self._idle_limit = idle_limit
        self._idle: list = []
        # Closing the calls not kept (retire), each a task of its own.
        self._closing: set[asyncio.Task] = set()
        # Calls opened: what reuse saves shows as fewer of these than requests
        # (exported as meshgate_inference_triton_streams_opened_total).
        self.opened = 0

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> tuple[object, bool]:
        """A stream for one request, and whether it was idle here (it may
        have died since without saying so yet: the servicer then tries a new
        one). The most recently used first: the fewest streams stay warm."""
        while self._idle:
            call = self._idle.pop()
            if not call.done():
                return call, True
        self.opened += 1
        return self._open(), False

    def give_back(self, call) -> bool:
        """Keeps ``call``, whose last request ended with its final response,
        for the next request; False (the caller closes it) if it ended or
        the pool is full."""
        if call.done() or len(self._idle) >= self._idle_limit:
            return False
        self._idle.append(call)
        return True

    def retire(self, call) -> None:
        """Closes ``call``, whose last request ended with its final response
        and which the pool does not keep, in a task of its own: half-closed
        and read to its end, which closes it cleanly, where a cancel would
        reach Triton as one. Its request's answer is out: awaited in the
        request's handler, this wait held the caller's status until Triton
        ended the stream, and a connection that dropped or stalled there
        ended a whole answer UNAVAILABLE or DEADLINE_EXCEEDED."""
        if call.done():
            return
        task = asyncio.ensure_future(self._close_cleanly(call))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_cleanly(self, call) -> None:
        try:
            async with asyncio.timeout(STREAM_CLOSE_TIMEOUT_S):
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
        except (TimeoutError, grpc.aio.AioRpcError) as error:
            # No request of ours rides it: nobody's failure.
            log.info("triton stream did not close cleanly after its answer", error=repr(error))
        except Exception:  # noqa: BLE001 - a bug; logged here, not left to an unretrieved task
            log.exception("closing a triton stream after its answer failed")
        finally:
            if not call.done():
                call.cancel()

    def drop(self) -> int:
        """Cancels the idle streams (no request rides them); returns how many."""
        dropped = len(self._idle)
        for call in self._idle:
            call.cancel()
        self._idle.clear()
        return dropped

    async def close(self) -> None:
        """Cancels every stream here, idle or closing, and waits for the closes."""
        self.drop()
        closing = list(self._closing)
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)


def ended_by_this_service(details: str) -> bool:
    """Whether a failed call's details say this service ended it (OpenCalls.end):
    the probes as its server left rotation (LEFT_ROTATION), or
    TritonBackend.stub_died."""
    return details == LEFT_ROTATION or details.startswith(STUB_DIED_UNDER_CALL)


def triton_status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """What a Triton call that ended with ``code`` raises, for a failure
    seen otherwise: the retry and mapping rules for that code apply as they are."""
    metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, metadata, metadata, details)


class TritonBackend:
    """One Triton server, as a balancing target (meshgate/balancing.Target)."""

    weight = 1.0

    def __init__(
        self,
        address: str,
        idle_streams: int = 0,
        embedding_model: str = "",
        unanswered_canary_s: float | None = None,
        idle_canary_s: float | None = None,
    ) -> None:
        """``embedding_model`` is canaried with an embedding, every other
        model with a generation; ``unanswered_canary_s``: how long a call may
        wait for Triton's first response before its model is canaried
        (inference.stream_stall_s; None: never); ``idle_canary_s``: how long
        a model may go unheard with no call open before it is canaried
        (inference.idle_canary_s; None: never)."""
        self.address = self.key = address
        # Inference goes over a traced channel, so the Triton call is a client
        # span of the request's trace and Triton receives its traceparent.
        self._channel = serving.triton_channel(address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # Streamed generations go on a channel without the client interceptor:
        # it would add two async generators per streamed token, and one span
        # per call, where a call carries many requests (TritonStreams); the
        # servicer makes a client span per request (telemetry.start_grpc_client_span).
        self._stream_channel = serving.triton_channel(address, traced=False)
        self.stream_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._stream_channel)
        self.streams = TritonStreams(self._open_stream, idle_streams)
        # Probes every few seconds would bury real traces; they go untraced.
        self._probe_channel = grpc.aio.insecure_channel(address, options=serving.RECONNECT_OPTIONS)
        self._probe_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._probe_channel)
        self.live = False
        self.ready = False
        # The models requests may go to here: ready by the probes, and their
        # stub not known dead.
        self.ready_models: set[str] = set()
        # Models whose Python-backend stub died here, with why they are out
        # of rotation (stub_died), until a canary of theirs is answered.
        self.stub_dead: dict[str, str] = {}
        # How many times each model was marked stub-dead here: a canary
        # answered clears only a mark set before it was sent.
        self._stub_deaths: collections.Counter[str] = collections.Counter()
        # The canary in flight for each model, at most one (_start_canaries).
        self._canaries: dict[str, asyncio.Task] = {}
        # Probe rounds begun here, and for each model Triton refused as not
        # loaded (refused_as_not_loaded) or a probe found draining, how many
        # had begun then, and why: it stays out until a round begun after
        # that reads it ready.
        self._probe_rounds = 0
        self._out_until_ready: dict[str, tuple[int, str]] = {}
        self._embedding_model = embedding_model
        self._unanswered_canary_s = unanswered_canary_s
        self._idle_canary_s = idle_canary_s
        # What the last probe round failed with (a status code's name), if it did.
        self._probe_failure: str | None = None
        self.in_flight = 0
        self.calls = OpenCalls()
        # Prompt tokens of the generations in flight here (their KV is what
        # each decode step reads) and those not yet prefilled, the recent
        # time to first token, and the circuit breaker: what strategies weigh.
        self.active_tokens = 0
        self.queued_prefill_tokens = 0
        self.ttft = balancing.Ewma()
        self.health = balancing.Health()
        self._misses: dict[str, int] = {}
        # Probe rounds in a row that got no answer at all (timeout, refused).
        self._silent_rounds = 0
        # Whether a model takes a leading batch dimension (max_batch_size > 0),
        # whether it reports the prompt tokens it served from its cache, and
        # whether it takes a cache salt.
        self.batched: dict[str, bool] = {}
        self.reports_cached_tokens: dict[str, bool] = {}
        self.takes_cache_salt: dict[str, bool] = {}
        # The sequences a model runs at once here, where its config says
        # (triton_protocol.GENERATION_SLOTS_PARAMETER): its generation slots.
        self.generation_slots: dict[str, int] = {}
        # Models whose config is read again at their next ready answer.
        self._config_stale: set[str] = set()
        # What is probed, and Triton's queue and compute figures, for metrics.
        self.models: list[str] = []
        self.statistics: dict[str, TritonStatistics] = {}
        # Mean queue time per request over the last probe interval, per model.
        self._recent_queue_ms: dict[str, float] = {}

    def __str__(self) -> str:
        # How logs name it (meshgate/watching.py).
        return self.address

    def _open_stream(self):
        # No request iterator: requests go by write(), one after another.
        # Not in Triton's triton_grpc_error mode (the model's status code
        # ends the stream): with it, tritonserver crashed (SIGSEGV) within a
        # few hundred refused requests beside concurrent streams, with or
        # without reuse, and never without it (bench/triton_refusal_probe.py).
        # A model's error then comes as a response's error_message, which
        # triton_protocol.stream_error_code reads as a status code.
        return self.stream_stub.ModelStreamInfer()

    def stub_died(self, model: str, error_message: str) -> None:
        """A request of ``model`` here was refused because the model's
        Python-backend stub process died (triton_protocol.stub_died): the
        requests it was running are lost, and Triton sends them nothing more,
        no error and no final response, while the server and the model still
        read ready, so the probes never end them; each waited for its
        caller's deadline, or forever. They end now, as UNAVAILABLE: one that
        had sent nothing goes to another server, one that had ends saying how
        much (servicer.Generate).

        Triton (2.51) refuses every later request of the model and never
        starts the stub again by itself; unloading and loading the model
        does (a load alone is a no-op while its files are unchanged). So
        the model leaves rotation here, though Triton still reads it ready:
        health reports it not ready, and requests go to other servers (or
        fail NO_READY_BACKEND at once) instead of each paying a refusal
        first. It comes back when a canary of it is answered (probe)."""
        if model not in self.stub_dead:
            log.warning("model out of rotation: its stub process died", backend=self.address, model=model)
        self._stub_deaths[model] += 1
        self.stub_dead[model] = (
            f"its Python-backend stub process died ({error_message}); Triton refuses its requests "
            "until the model is unloaded and loaded again; a canary request retries it every probe round"
        )
        self.ready_models.discard(model)
        self.ready = self.ready and bool(self.ready_models)
        if ended := self.calls.end({model}, STUB_DIED_UNDER_CALL + error_message):
            log.warning("calls ended: the model's stub process died", backend=self.address, calls=ended)

    def note_refusal(self, model: str, code: grpc.StatusCode, details: str) -> bool:
        """A failed call of ``model`` here: a stub's death or a refusal as
        not loaded takes the model out of this server's rotation (stub_died,
        refused_as_not_loaded), as Generate and Embed both need. Returns
        whether its stub died."""
        if triton_protocol.stub_died(details):
            self.stub_died(model, details)
            return True
        if triton_protocol.refused_as_not_loaded(code, details, model):
            self.refused_as_not_loaded(model, details)
        return False

    def refused_as_not_loaded(self, model: str, details: str) -> None:
        """Triton refused a request of ``model`` here as not loaded
        (triton_protocol.refused_as_not_loaded): unloaded, or every model
        unloading at once as the server drains on SIGTERM. Left in rotation
        until the probes read it not ready PROBES_TO_MARK_DOWN times (~6 s
        at the default interval), it drew requests all that while, each
        refused here first and tried elsewhere, and with no other server
        failed NO_READY_BACKEND while this one still read ready. It leaves
        rotation at once instead, and is back at the first probe round
        begun after this refusal that reads it ready (a round already under
        way may have read it ready just before). The calls it runs here are
        left to run: Triton finishes them as it drains, and ends them
        itself on an unload."""
        if model in self.ready_models:
            log.warning(
                "model out of rotation: triton refused it as not loaded",
                backend=self.address,
                model=model,
                error=details,
            )
        self._out_until_ready[model] = (self._probe_rounds, REFUSED_AS_NOT_LOADED)
        self.ready_models.discard(model)
        self.ready = self.ready and bool(self.ready_models)

    def out_until_ready(self, model: str) -> str:
        """Why ``model`` is out of rotation here until a probe round reads it
        ready (refused as not loaded, or the server draining); "" if it is not."""
        marked = self._out_until_ready.get(model)
        return marked[1] if marked is not None else ""

    def not_ready_reason(self, model: str) -> str:
        """Why requests of ``model`` do not go here, for an operator; "" if they do."""
        if model in self.ready_models:
            return ""
        if model in self.stub_dead:
            return self.stub_dead[model]
        if why := self.out_until_ready(model):
            return why
        if self._probe_failure is not None:
            return f"the server does not answer its health probes ({self._probe_failure})"
        return "Triton reports the model not ready"

    async def canary(self, model: str) -> str | None:
        """Sends ``model`` here one real request, as small as it gets
        (CANARY_TEXT): None if it was answered, else what it failed with.
        ModelReady cannot tell a dead stub (Triton reads it ready); only a
        request that reaches the stub can. A generation goes as a stream
        (the generation models are decoupled: ModelInfer refuses them)."""
        try:
            if model == self._embedding_model:
                request = triton_protocol.embed_request(model, [CANARY_TEXT])
                await self._probe_stub.ModelInfer(request, timeout=CANARY_TIMEOUT_S)
                return None
            request = triton_protocol.generate_request(
                model, "meshgate-canary", CANARY_TEXT, CANARY_SAMPLING, self.batched.get(model, False)
            )
            call = self._probe_stub.ModelStreamInfer(timeout=CANARY_TIMEOUT_S)
            try:
                await call.write(request)
                await call.done_writing()
                while (message := await call.read()) is not grpc.aio.EOF:
                    if message.error_message:
                        return message.error_message
                    if triton_protocol.ends_stream(message):
                        return None
            finally:
                call.cancel()
            return "Triton closed the stream before the final response"
        except grpc.aio.AioRpcError as error:
            return error.details() or error.code().name
        except asyncio.InvalidStateError:
            # A write on a stream that already ended (servicer._write).
            return "the stream ended before the request went out"

    def _start_canaries(self, answers: dict[str, bool]) -> None:
        """Canaries, among the models Triton just read ready, those whose
        stub died here, and those with a call that has waited longer than
        unanswered_canary_s for Triton's first response: a stub that died
        under a request before it answered leaves it waiting for its
        caller's deadline when no later request of the model comes here to
        be refused (stub_died). None while every stub answers.

        Each goes as a task of its own, at most one in flight per model,
        which the probe round does not wait for: a busy but live model's
        canary waits in Triton's queue up to CANARY_TIMEOUT_S, and awaited
        here it delayed the server's next probe, so a dead server left
        rotation ~21 s late instead of ~6 s, and slot counts and serving
        status lagged as long."""
        suspects = set(self.stub_dead)
        if self._unanswered_canary_s is not None:
            suspects |= self.calls.unanswered_for(self._unanswered_canary_s)
        if self._idle_canary_s is not None:
            # A stub that died while its model was idle (killed by the OOM
            # killer) is otherwise found by the next caller's request, which
            # fails: health read the model ready all along.
            suspects |= self.calls.quiet_for(answers, self._idle_canary_s)
        for model in sorted(suspects):
            if answers.get(model) and model not in self._canaries:
                # The marks so far are read now: the task starts later.
                task = asyncio.create_task(self._canary_and_mark(model, self._stub_deaths[model]))
                self._canaries[model] = task
                task.add_done_callback(lambda _, model=model: self._canaries.pop(model, None))

    async def _canary_and_mark(self, model: str, deaths_before: int) -> None:
        """One canary of ``model``: answered, it puts a model whose stub died
        back in rotation (at the next probe round that reads it ready)
        unless its stub was marked dead again since ``deaths_before`` marks
        (a refusal while the canary was in flight is newer news); refused by
        a dead stub, it takes the model out."""
        failure = await self.canary(model)
        # Whatever it found: an idle model's next canary is a quiet spell later.
        self.calls.heard(model)
        if failure is None:
            if self._stub_deaths[model] == deaths_before and self.stub_dead.pop(model, None) is not None:
                log.info("model back in rotation: a canary was answered", backend=self.address, model=model)
        elif triton_protocol.stub_died(failure):
            self.stub_died(model, failure)

    def _read_generation_slots(self, model: str, config) -> None:
        parameter = config.parameters.get(triton_protocol.GENERATION_SLOTS_PARAMETER)
        try:
            slots = int(parameter.string_value) if parameter is not None else 0
        except ValueError:
            slots = 0
        if slots > 0:
            self.generation_slots[model] = slots
        else:
            # Not said (vLLM's backend), or not a count: unknown, not a bound.
            self.generation_slots.pop(model, None)

    def queue_ms(self, model: str) -> float:
        return self._recent_queue_ms.get(model, 0.0)

    async def probe(self, models: list[str]) -> None:
        """Updates readiness, tolerating a few bad probes in a row: a busy
        Python-backend model can answer Triton's own health check late and
        read as not ready for a moment, and one such blip must not take the
        only backend out of rotation."""
        self._probe_rounds += 1
        this_round = self._probe_rounds
        try:
            live = await self._probe_stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=PROBE_TIMEOUT_S)
            ready = await self._probe_stub.ServerReady(
                service_pb2.ServerReadyRequest(), timeout=PROBE_TIMEOUT_S
            )
            answers = {}
            for model in models:
                answer = await self._probe_stub.ModelReady(
                    service_pb2.ModelReadyRequest(name=model), timeout=PROBE_TIMEOUT_S
                )
                answers[model] = answer.ready
                if not answer.ready:
                    # Its config is read again when it answers ready: a model
                    # reloaded or a Triton restarted with another config
                    # (max_batch_size, its inputs) had every request refused
                    # INTERNAL until this service restarted. The last one
                    # read serves meanwhile: a not-ready blip changes nothing.
                    self._config_stale.add(model)
                elif model not in self.batched or model in self._config_stale:
                    self._config_stale.discard(model)
                    config = await self._probe_stub.ModelConfig(
                        service_pb2.ModelConfigRequest(name=model), timeout=PROBE_TIMEOUT_S
                    )
                    self.batched[model] = config.config.max_batch_size > 0
                    inputs = {tensor.name for tensor in config.config.input}
                    self.reports_cached_tokens[model] = triton_protocol.CACHED_TOKENS_FLAG in inputs
                    self.takes_cache_salt[model] = triton_protocol.CACHE_SALT_INPUT in inputs
                    self._read_generation_slots(model, config.config)
        except grpc.aio.AioRpcError as error:
            answers = dict.fromkeys(models, False)
            live = ready = None
            failure = error.code().name
            # No answer: the server may be restarting, perhaps with new configs.
            self._config_stale.update(models)
            # Or it answered that it drains (SIGTERM): its models are unloading
            # and it refuses new requests, but finishes those it runs.
            draining = triton_protocol.server_exiting(error.code(), error.details() or "")
        else:
            failure = None
            draining = False
        self.models = models
        self._probe_failure = failure
        if failure is None:
            await self._read_statistics(models)
            self._start_canaries(answers)
        # A draining server answers: counted as silent, its rounds ended the
        # calls it was finishing once three had failed (~6 s into the drain).
        self._silent_rounds = 0 if failure is None or draining else self._silent_rounds + 1
        # Back after it went away: its breaker, opened by the calls that
        # failed as it went, lets the next request try it (Health.probe_answered).
        self.health.probe_answered(failure is None)
        was_ready = self.ready
        out: set[str] = set()
        left: set[str] = set()
        for model, is_ready in answers.items():
            self._misses[model] = 0 if is_ready else self._misses.get(model, 0) + 1
            if self._out_until_ready.get(model, (this_round,))[0] < this_round:
                # This round began after the mark: what it read is newer.
                del self._out_until_ready[model]
            if draining:
                self._out_until_ready[model] = (this_round, DRAINING)
                self.ready_models.discard(model)
            if is_ready:
                if model not in self.stub_dead and model not in self._out_until_ready:
                    self.ready_models.add(model)
            elif self._misses[model] >= PROBES_TO_MARK_DOWN:
                if model in self.ready_models:
                    left.add(model)
                self.ready_models.discard(model)
                out.add(model)
        # Only a server that answers nothing strands its calls; one that says
        # a model is not ready (unloading, or busy for a moment) still ends
        # that model's calls itself, and they may yet finish. So calls end
        # once PROBES_TO_MARK_DOWN rounds in a row got no answer, for every
        # model out of rotation: a model may have left on rounds that
        # answered "not ready" before the server stopped answering, and one
        # probe timeout on a busy server must not end its running generations.
        silent = self._silent_rounds >= PROBES_TO_MARK_DOWN
        if out and silent and (ended := self.calls.end(out)):
            log.warning("calls ended on a backend out of rotation", backend=self.address, calls=ended)
        if left or silent or draining:
            # Idle streams on a server leaving rotation are likely dead, and
            # hold its connection's resources if it is not: new ones are
            # opened when it is back. A draining Triton's gRPC server waits
            # for them to close before it exits. Only as a model leaves (or while the
            # server answers nothing), not on every round a model stays out:
            # a configured model this server does not load (smollm2 beside a
            # tiny_gpt-only Triton) cancelled every idle stream each round.
            self.streams.drop()
        self.live = live.live if live is not None else bool(self.ready_models)
        # Ready to serve: Triton's ServerReady stays true with every model
        # unloaded (explicit model control), which GetBackendHealth reported
        # as ready.
        self.ready = (ready.ready if ready is not None else True) and bool(self.ready_models)
        if was_ready and not self.ready_models:
            log.warning("triton backend down", backend=self.address, error=failure)
        elif not was_ready and self.ready:
            log.info("triton backend ready", backend=self.address, models=sorted(self.ready_models))

    async def _read_statistics(self, models: list[str]) -> None:
        """Triton's cumulative queue and compute times, one call per probe
        (every few seconds): how long requests wait inside Triton, which no
        timing of ours can see. A failure only leaves the last figures."""
        try:
            answer = await self._probe_stub.ModelStatistics(
                service_pb2.ModelStatisticsRequest(), timeout=PROBE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return
        for stats in answer.model_stats:
            if stats.name in models:
                figures = stats.inference_stats
                latest = TritonStatistics(figures.queue.ns, figures.compute_infer.ns, figures.success.count)
                previous = self.statistics.get(stats.name)
                if previous is not None and latest.successes > previous.successes:
                    # Cumulative figures: their change since the last probe is
                    # what requests wait now, not since the server started.
                    self._recent_queue_ms[stats.name] = (
                        (latest.queue_ns - previous.queue_ns) / (latest.successes - previous.successes) / 1e6
                    )
                self.statistics[stats.name] = latest

    async def close(self) -> None:
        canaries = list(self._canaries.values())
        for canary in canaries:
            canary.cancel()
        await asyncio.gather(*canaries, return_exceptions=True)
        await self.streams.close()
        await self._channel.close()
        await self._stream_channel.close()
        await self._probe_channel.close()


class BackendPool:
    """The Triton servers, and the choice among those with a model ready."""

    def __init__(
        self,
        addresses: list[str],
        models: list[str],
        idle_streams: int = 0,
        embedding_model: str = "",
        unanswered_canary_s: float | None = None,
        idle_canary_s: float | None = None,
    ) -> None:
        self.backends = [
            TritonBackend(a, idle_streams, embedding_model, unanswered_canary_s, idle_canary_s)
            for a in addresses
        ]
        self._models = models
        # For calls that name no strategy (embeddings).
        self._least_outstanding = balancing.LeastOutstanding()

    def choose(
        self,
        model: str,
        exclude: frozenset[str] = frozenset(),
        strategy: balancing.Strategy | None = None,
        request: balancing.RouteRequest | None = None,
    ) -> TritonBackend:
        """The strategy's first choice among the servers with the model
        ready; one whose circuit is open only when no other is left."""
        candidates = [b for b in self.backends if model in b.ready_models and b.address not in exclude]
        if not candidates:
            message = f"no Triton server has model {model!r} ready"
            # What is true during a drain or an unload, where the caller was
            # told no more than this while the server read ready.
            if whys := sorted({why for b in self.backends if (why := b.out_until_ready(model))}):
                message += ": " + "; ".join(whys)
            raise unavailable(Reason.NO_READY_BACKEND, message, model=model)
        return balancing.order(
            strategy or self._least_outstanding, candidates, request or balancing.RouteRequest(model=model)
        )[0]

    def generation_slots(self, model: str, per_server: int = 0) -> int | None:
        """The generations ``model`` runs at once on the servers choose()
        sends it to: ``per_server`` each (a setting), or what each one's
        config says. Those are the servers with it ready whose breaker
        admits traffic (balancing.order), or all with it ready where none
        does (choose() then falls back to them): counting a server whose
        breaker is open, or that is ejected, admitted its slots' worth of
        generations into the others' queues exactly when it failed. None
        (not known: no bound) where one of them has no count and no setting
        applies (vLLM's config says nothing): the sum of the others
        under-admitted such a fleet. 0 where no server has it ready.

        Counted after each server's probe: a breaker that opens between two
        probes over-admits into the others until the next (a few seconds),
        while its failing calls mostly go elsewhere anyway; reacting to each
        breaker change would tie balancing.Health to this service's slots."""
        ready = [backend for backend in self.backends if model in backend.ready_models]
        chosen = [backend for backend in ready if backend.health.admits] or ready
        if per_server:
            return per_server * len(chosen)
        counts = [backend.generation_slots.get(model) for backend in chosen]
        return None if None in counts else sum(counts)

    @property
    def any_ready(self) -> bool:
        return any(b.ready_models for b in self.backends)

    async def watch(
        self, interval_s: float, after_probe: collections.abc.Callable[[], collections.abc.Awaitable[None]]
    ) -> None:
        """Probes each server on a schedule of its own, ``interval_s`` after
        its last probe ended, and awaits ``after_probe()`` after each, one
        at a time, until cancelled. One round for all servers waited for the
        slowest one's answers: with one stopped, every round took
        PROBE_TIMEOUT_S, and a model unloaded on a healthy server left
        rotation there 6.5 s after the unload instead of under 1 s (0.2 s
        interval), as a model loaded again came back as late; a server
        behind a link that delays each reply held the others' rounds for
        all its calls."""
        # Two servers' probes that end together must not interleave what
        # after_probe sets (the serving status of each health service name).
        one_at_a_time = asyncio.Lock()

        async def probe(backend: TritonBackend) -> None:
            await backend.probe(self._models)
            async with one_at_a_time:
                await after_probe()

        await watching.watch_each(lambda: self.backends, probe, interval_s)

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends))
