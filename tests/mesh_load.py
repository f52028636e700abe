"""A bounded load on the router while parts of the mesh are killed: the
callers that tests/chaos/test_faults.py and tests/e2e/test_replicas.py run,
and what counts as a whole answer. Each suite tallies outcomes in phases of
its own (what it kills, what it must see) by overriding :meth:`Load.failed`
and :meth:`Load.answered`."""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import time
from typing import Any

import grpc

from meshgate.common.v1 import common_pb2
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc
from services.router.servicer import SAVING_METADATA

REQUEST_TIMEOUT_S = 30.0
# A caller that failed waits a little before its next request, as a real
# client would, instead of spinning on fast failures.
FAILURE_PAUSE_S = 0.1
# Stateless callers cycle through this many questions, so that some of
# their requests are cache hits.
STATELESS_QUESTIONS = 4


@dataclasses.dataclass
class Acknowledged:
    session_id: str
    question: str
    answer: str


def short_answer(text: str, completion: pb.ChatCompletion | None, max_tokens: int) -> str:
    """Why an OK stream is not a whole answer, or ""."""
    if completion is None:
        return "ended OK without a completion"
    tokens = completion.usage.completion_tokens
    # A model may choose its stop token first (tiny_gpt's seeded weights
    # sometimes do): one token, no text, finish "stop" is a whole answer.
    stopped_at_once = completion.finish_reason == "stop" and tokens == 1
    if tokens == 0 or (not text and not stopped_at_once):
        return f"{tokens} tokens, {len(text)} characters, finish_reason {completion.finish_reason!r}"
    if completion.finish_reason == "length" and tokens < max_tokens:
        return f"finish_reason length after {tokens} of {max_tokens} tokens"
    return ""


class Load:
    """Concurrent callers of the router until stopped, one per entry of
    ``kinds``: "session" (turns of one session each, uncached), "stateless"
    (questions that repeat, cache allowed) or "long" (long uncached streams,
    so that a kill finds a stream in the middle). Each outcome counts for
    the phase in which its request started (``phases[-1]`` then); a phase
    needs ``ok`` (a count) and ``short_answers`` (a list)."""

    def __init__(
        self,
        router: router_service_pb2_grpc.RouterServiceStub,
        metadata: collections.abc.Sequence[tuple[str, str]],
        kinds: collections.abc.Sequence[str],
        max_tokens: collections.abc.Mapping[str, int],
        first_phase: Any,
    ) -> None:
        self._router = router
        self._metadata = metadata
        self._kinds = kinds
        self._max_tokens = max_tokens
        self.phases: list[Any] = [first_phase]
        self.acknowledged: list[Acknowledged] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i, kind)) for i, kind in enumerate(self._kinds)]

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def failed(
        self, phase: Any, error: grpc.aio.AioRpcError, text: str, began: float, saving: bool = False
    ) -> None:
        """A request that started at ``began`` (monotonic) failed after
        delivering ``text`` ("" before any delta); ``saving``: its router had
        committed it to store its turn (SAVING_METADATA)."""
        raise NotImplementedError

    def answered(self, phase: Any, kind: str, began: float) -> None:
        """A request of ``kind`` that started at ``began`` (monotonic) was answered whole."""

    def _request(self, worker: int, kind: str, turn: int, session_id: str) -> pb.ChatRequest:
        if kind == "session":
            question = f"worker {worker} turn {turn}: what happens next?"
            request = pb.ChatRequest(session_id=session_id, cache_policy=pb.CACHE_POLICY_BYPASS)
        elif kind == "stateless":
            question = f"worker {worker} asks question {turn % STATELESS_QUESTIONS}: how do gateways work?"
            request = pb.ChatRequest(cache_policy=pb.CACHE_POLICY_USE)
        else:
            question = f"worker {worker} asks for a long story, number {turn}"
            request = pb.ChatRequest(cache_policy=pb.CACHE_POLICY_BYPASS)
        request.parameters.max_tokens = self._max_tokens[kind]
        request.model = "tiny-gpt"
        request.messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=question))
        return request

    async def _worker(self, worker: int, kind: str) -> None:
        session_id = ""
        turn = 0
        while not self._stopping.is_set():
            turn += 1
            phase = self.phases[-1]
            began = time.monotonic()
            if kind == "session" and not session_id:
                try:
                    created = await self._router.CreateSession(
                        pb.CreateSessionRequest(), metadata=self._metadata, timeout=REQUEST_TIMEOUT_S
                    )
                except grpc.aio.AioRpcError as error:
                    self.failed(phase, error, "", began)
                    await asyncio.sleep(FAILURE_PAUSE_S)
                    continue
                session_id = created.session_id
            request = self._request(worker, kind, turn, session_id)
            text, completion = "", None
            call = self._router.Chat(request, metadata=self._metadata, timeout=REQUEST_TIMEOUT_S)
            try:
                async for response in call:
                    if response.HasField("delta"):
                        text += response.delta.text
                    else:
                        completion = response.completion
            except grpc.aio.AioRpcError as error:
                saving = tuple(SAVING_METADATA[0]) in tuple(await call.initial_metadata() or ())
                self.failed(phase, error, text, began, saving=saving)
                await asyncio.sleep(FAILURE_PAUSE_S)
                continue
            short = short_answer(text, completion, request.parameters.max_tokens)
            if short:
                phase.short_answers.append(short)
                continue
            phase.ok += 1
            self.answered(phase, kind, began)
            if kind == "session":
                self.acknowledged.append(Acknowledged(session_id, request.messages[0].content, text))
