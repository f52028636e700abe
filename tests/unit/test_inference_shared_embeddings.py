"""Single-flight and the memo of the inference service's embeddings
(services/inference/shared_embeddings.py), over a fake Triton fetch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.inference.shared_embeddings import SharedEmbeddings
from tests.unit.test_streaming import until


def vector_of(text: str) -> bytes:
    return text.encode().ljust(8, b"\0")[:8]


class FakeTriton:
    """Records each fetch's texts; a fetch waits for ``release`` when gated."""

    def __init__(self, gated: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        if not gated:
            self.release.set()
        self.started = asyncio.Event()
        self.cancelled = 0
        self.failure: Exception | None = None

    async def fetch(self, texts: list[str], revision: str = "") -> list[bytes]:
        self.calls.append(list(texts))
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.failure is not None:
            raise self.failure
        return [vector_of(text) for text in texts]


async def test_concurrent_asks_for_one_text_make_one_fetch():
    triton = FakeTriton(gated=True)
    shared = SharedEmbeddings(triton.fetch, 16)
    first = asyncio.create_task(shared.vectors(["what is a tide?"]))
    await triton.started.wait()
    second = asyncio.create_task(shared.vectors(["what is a tide?", "and a wave?"]))
    await until(lambda: len(triton.calls) == 2)
    triton.release.set()
    assert await first == [vector_of("what is a tide?")]
    assert await second == [vector_of("what is a tide?"), vector_of("and a wave?")]
    # The second caller sent only the text nobody had in flight.
    assert triton.calls == [["what is a tide?"], ["and a wave?"]]


async def test_a_text_repeated_in_one_request_is_fetched_once():
    triton = FakeTriton()
    shared = SharedEmbeddings(triton.fetch, 16)
    vectors = await shared.vectors(["a", "b", "a", "a"])
    assert vectors == [vector_of(t) for t in ("a", "b", "a", "a")]
    assert triton.calls == [["a", "b"]]


async def test_the_memo_answers_repeats_and_keeps_only_the_most_recent():
    triton = FakeTriton()
    shared = SharedEmbeddings(triton.fetch, 2)
    await shared.vectors(["one"])
    await shared.vectors(["two"])
    assert await shared.vectors(["one"]) == [vector_of("one")]  # a hit, and now the newest
    assert len(triton.calls) == 2
    await shared.vectors(["three"])  # pushes out "two", the least recent
    assert len(shared) == 2
    await shared.vectors(["one", "three"])
    assert len(triton.calls) == 3
    await shared.vectors(["two"])
    assert triton.calls[-1] == ["two"]


async def test_without_a_memo_repeats_are_fetched_but_flights_are_still_shared():
    triton = FakeTriton(gated=True)
    shared = SharedEmbeddings(triton.fetch, 0)
    both = asyncio.gather(shared.vectors(["same"]), shared.vectors(["same"]))
    await triton.started.wait()
    triton.release.set()
    assert await both == [[vector_of("same")], [vector_of("same")]]
    assert triton.calls == [["same"]]
    await shared.vectors(["same"])
    assert triton.calls == [["same"], ["same"]]
    assert len(shared) == 0


async def test_a_caller_that_leaves_does_not_end_the_call_for_the_others():
    triton = FakeTriton(gated=True)
    shared = SharedEmbeddings(triton.fetch, 16)
    leaving = asyncio.create_task(shared.vectors(["q"]))
    await triton.started.wait()
    staying = asyncio.create_task(shared.vectors(["q"]))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    triton.release.set()
    assert await staying == [vector_of("q")]
    assert triton.cancelled == 0
    assert triton.calls == [["q"]]


async def test_when_every_caller_has_left_the_call_is_cancelled_and_the_next_starts_afresh():
    triton = FakeTriton(gated=True)
    shared = SharedEmbeddings(triton.fetch, 16)
    callers = [asyncio.create_task(shared.vectors(["q"])) for _ in range(2)]
    await triton.started.wait()
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await until(lambda: triton.cancelled == 1)
    triton.release.set()
    # Nothing of the cancelled call was remembered or joined.
    assert await shared.vectors(["q"]) == [vector_of("q")]
    assert triton.calls == [["q"], ["q"]]


async def test_a_failure_reaches_every_waiter_as_its_own_error_and_is_not_remembered():
    triton = FakeTriton(gated=True)
    triton.failure = MeshgateError(
        grpc.StatusCode.INTERNAL, Reason.MODEL_ERROR, "Triton: boom", {"model": "minilm"}
    )
    shared = SharedEmbeddings(triton.fetch, 16)
    callers = [asyncio.create_task(shared.vectors(["q", f"own {i}"])) for i in range(3)]
    await until(lambda: len(triton.calls) == 3)
    triton.release.set()
    errors = await asyncio.gather(*callers, return_exceptions=True)
    for error in errors:
        assert isinstance(error, MeshgateError)
        assert (error.code, error.reason, error.message, error.metadata) == (
            grpc.StatusCode.INTERNAL,
            Reason.MODEL_ERROR,
            "Triton: boom",
            {"model": "minilm"},
        )
    assert len({id(error) for error in errors}) == 3
    assert triton.failure not in errors
    triton.failure = None
    assert await shared.vectors(["q"]) == [vector_of("q")]
    assert triton.calls[-1] == ["q"]


async def test_a_fetch_that_answers_the_wrong_number_of_vectors_fails_its_waiters():
    async def short(texts: list[str], revision: str = "") -> list[bytes]:
        return [b"x" * 8]

    shared = SharedEmbeddings(short, 16)
    with pytest.raises(MeshgateError, match="1 vectors fetched for 2 texts") as failed:
        await asyncio.wait_for(shared.vectors(["a", "b"]), 5)
    assert (failed.value.code, failed.value.reason) == (grpc.StatusCode.INTERNAL, Reason.BAD_EMBEDDING)


class ChunkGates:
    """A fetch per chunk, each waiting for its own gate (named by its first text)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.failures: dict[str, Exception] = {}

    async def fetch(self, texts: list[str], revision: str = "") -> list[bytes]:
        self.calls.append(list(texts))
        await self.gates.setdefault(texts[0], asyncio.Event()).wait()
        if (failure := self.failures.get(texts[0])) is not None:
            raise failure
        return [vector_of(text) for text in texts]

    def release(self, first_text: str) -> None:
        self.gates.setdefault(first_text, asyncio.Event()).set()


async def test_a_request_goes_in_flights_of_one_batch_and_a_joiner_waits_for_its_chunk_alone():
    triton = ChunkGates()
    shared = SharedEmbeddings(triton.fetch, 16, batch_size=2)
    whole = asyncio.create_task(shared.vectors(["a", "b", "c", "d", "e"]))
    await until(lambda: len(triton.calls) == 3)
    assert triton.calls == [["a", "b"], ["c", "d"], ["e"]]
    joiner = asyncio.create_task(shared.vectors(["b"]))
    triton.release("a")
    # Answered while the rest of the first request is still in flight.
    assert await asyncio.wait_for(joiner, 5) == [vector_of("b")]
    assert not whole.done()
    triton.release("c")
    triton.release("e")
    assert await whole == [vector_of(t) for t in "abcde"]
    assert len(triton.calls) == 3


async def test_a_failed_chunk_fails_only_those_who_wait_for_its_texts():
    triton = ChunkGates()
    triton.failures["c"] = MeshgateError(grpc.StatusCode.INTERNAL, Reason.MODEL_ERROR, "Triton: boom")
    shared = SharedEmbeddings(triton.fetch, 16, batch_size=2)
    whole = asyncio.create_task(shared.vectors(["a", "b", "c", "d"]))
    await until(lambda: len(triton.calls) == 2)
    joiner = asyncio.create_task(shared.vectors(["a"]))
    triton.release("c")
    triton.release("a")
    assert await asyncio.wait_for(joiner, 5) == [vector_of("a")]
    with pytest.raises(MeshgateError) as failed:
        await whole
    assert failed.value.reason == Reason.MODEL_ERROR
    # The chunk that succeeded is remembered.
    assert await shared.vectors(["b"]) == [vector_of("b")]
    assert len(triton.calls) == 2


async def test_a_hung_fetch_fails_its_waiters_after_the_limit_and_leaves_the_flight():
    triton = FakeTriton(gated=True)
    shared = SharedEmbeddings(triton.fetch, 16, timeout_s=0.05)
    # Two waiters without a deadline of their own.
    callers = [asyncio.create_task(shared.vectors(["q"])) for _ in range(2)]
    errors = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
    for error in errors:
        assert isinstance(error, MeshgateError)
        assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)
    # The hung call was cancelled, and the next ask starts its own.
    assert triton.cancelled == 1
    triton.release.set()
    assert await shared.vectors(["q"]) == [vector_of("q")]
    assert triton.calls == [["q"], ["q"]]


async def test_an_unexpected_error_reaches_each_waiter_as_its_own_internal_status():
    async def broken(texts: list[str], revision: str = "") -> list[bytes]:
        await asyncio.sleep(0.01)
        raise IndexError("list index out of range")

    shared = SharedEmbeddings(broken, 16)
    callers = [asyncio.create_task(shared.vectors(["q"])) for _ in range(2)]
    errors = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    for error in errors:
        assert isinstance(error, MeshgateError)
        assert (error.code, error.reason) == (grpc.StatusCode.INTERNAL, Reason.INTERNAL)
        # The bug's own words stay in the log.
        assert error.message == "internal error"
    assert errors[0] is not errors[1]


class RevisedFetch:
    """A Triton fetch answering as ``revision``: each text's vector named by it."""

    def __init__(self) -> None:
        self.revision = "2"
        self.calls: list[list[str]] = []

    async def fetch(self, texts: list[str], revision: str = "") -> list[tuple[str, bytes]]:
        self.calls.append(list(texts))
        return [(self.revision, vector_of(text)) for text in texts]


async def test_a_request_is_answered_from_the_one_revision_that_remembers_most_of_its_texts():
    """Two revisions serving side by side: one answer names one revision,
    so a request's texts remembered only by the other are fetched again,
    not answered beside them; among revisions remembering as many, the
    last to answer."""
    triton = RevisedFetch()
    shared = SharedEmbeddings(triton.fetch, 16, revision_of=lambda embedded: embedded[0], clock=lambda: 0.0)
    await shared.vectors(["a", "b"])
    triton.revision = "3"
    await shared.vectors(["c"])
    triton.revision = "2"
    answered = await shared.vectors(["a", "b", "c"])
    assert [revision for revision, _ in answered] == ["2", "2", "2"]
    assert triton.calls[-1] == ["c"]
    # One text each: revision 3 answered last.
    await shared.vectors(["d"])
    triton.revision = "3"
    await shared.vectors(["e"])
    answered = await shared.vectors(["d", "e"])
    assert [revision for revision, _ in answered] == ["3", "3"]
    assert triton.calls[-1] == ["d"]
