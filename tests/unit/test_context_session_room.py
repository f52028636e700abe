"""SessionStore.check_room: the append script's decision, made before the
append (an assembly's append_reservation), in the same order on the same
caps; the byte count a hot session keeps when an append extends it in
memory: the script's own (the store's writes are stand-ins there:
tests/integration/test_context_append_reservation.py runs the real ones);
and the compaction runs a refusal asks for."""

from __future__ import annotations

import time
import types

import grpc
import pytest
import redis.asyncio as redis

from meshgate.common.v1 import common_pb2
from meshgate.config import Settings
from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import servicer as servicer_module
from services.context import token_counts
from services.context.hot_cache import HotCache
from services.context.servicer import ContextServicer
from services.context.store import Appended, SessionStore, StoredSession, session_key


def _store(max_turns: int = 0, max_session_bytes: int = 0) -> SessionStore:
    # Never connected: check_room reads nothing from Redis.
    return SessionStore(redis.Redis(), ttl_s=0, max_turns=max_turns, max_session_bytes=max_session_bytes)


# The version the session is at, in the checks below.
VERSION = 3


def _check(store: SessionStore, *args, expected_version: int | None = None) -> None:
    store.check_room("t", "s1", *args, version=VERSION, expected_version=expected_version)


def _refusal(store: SessionStore, *args, expected_version: int | None = None) -> MeshgateError:
    with pytest.raises(MeshgateError) as refused:
        _check(store, *args, expected_version=expected_version)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == Reason.SESSION_FULL
    return refused.value


def test_turns_up_to_the_cap_fit_and_one_more_is_refused_as_the_append_is() -> None:
    store = _store(max_turns=10)
    _check(store, 8, 0, 2, 100)
    refused = _refusal(store, 9, 0, 2, 100)
    assert refused.metadata == {
        "session_id": "s1",
        "unit": "turns",
        "limit": "10",
        "turns": "9",
        "max_turns": "10",
    }


def test_bytes_up_to_the_cap_fit_and_one_more_is_refused_as_the_append_is() -> None:
    store = _store(max_session_bytes=1000)
    _check(store, 3, 900, 2, 100)
    refused = _refusal(store, 3, 900, 2, 101)
    assert refused.metadata == {"session_id": "s1", "unit": "bytes", "limit": "1000", "bytes": "900"}


def test_the_turn_cap_is_checked_first_as_the_append_checks_it() -> None:
    refused = _refusal(_store(max_turns=4, max_session_bytes=10), 4, 10, 2, 5)
    assert refused.metadata["unit"] == "turns"


def test_an_uncounted_session_is_not_refused_by_bytes() -> None:
    # Stored before the count: its append counts it and decides; refusing
    # here could only guess.
    _check(_store(max_session_bytes=10), 1, None, 2, 1_000_000)
    # Its turns still count.
    _refusal(_store(max_turns=2, max_session_bytes=10), 1, None, 2, 1)


def test_no_cap_refuses_nothing() -> None:
    _check(_store(), 10**6, 10**12, 1024, 10**9)


def test_another_version_than_the_expected_one_is_refused_first_as_the_append_refuses_it() -> None:
    # Past both caps and at another version: the append script checks the
    # version before the caps, and so does the check.
    store = _store(max_turns=4, max_session_bytes=10)
    with pytest.raises(MeshgateError) as refused:
        _check(store, 4, 10, 2, 5, expected_version=VERSION - 1)
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.ABORTED, Reason.VERSION_CONFLICT)
    assert refused.value.metadata == {"current_version": str(VERSION)}
    # At its version, the caps decide.
    assert _refusal(store, 4, 10, 2, 5, expected_version=VERSION).metadata["unit"] == "turns"
    _check(_store(max_turns=4), 1, 0, 2, 5, expected_version=VERSION)


class AppendingStore(SessionStore):
    """Its caps and check_room are the real ones; its writes are stand-ins:
    every append lands as the next version, nothing is stored, and the
    session's byte count it reports is ``counted`` (the script's count;
    None: uncounted). Uncapped unless given ``max_session_bytes``."""

    def __init__(self, max_session_bytes: int = 0, counted: int | None = None) -> None:
        super().__init__(redis.Redis(), ttl_s=0, max_session_bytes=max_session_bytes)
        self.version = 1
        self.counted = counted

    async def append(
        self, tenant_id, session_id, expected_version, turns, token_counts, turn_id="", key_id=""
    ):
        self.version += 1
        return Appended(self.version, False, self.counted, 1)

    async def fill_token_counts(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def counters() -> dict[str, token_counts.PromptCounter]:
    return token_counts.for_models(Settings().models)


@pytest.mark.parametrize(
    "cached_bytes",
    # Uncounted when read (stored before the count), and a count that is
    # no longer the session's (read before a compaction whose notice has
    # not reached this replica yet).
    [None, 5000],
)
async def test_a_hot_session_extended_by_an_append_takes_the_append_scripts_byte_count(
    counters, cached_bytes
) -> None:
    held = [
        common_pb2.Message(role=common_pb2.ROLE_USER, content="q" * 300),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="a" * 300),
    ]
    hot = HotCache(1 << 30)
    hot.live = True
    # Created at 1 ms, the life the fake store's append lands in.
    hot.put(session_key("t", "s1"), StoredSession(1, 1, 0, held, {}, held_bytes=cached_bytes), hot.ticket())
    appended = [common_pb2.Message(role=common_pb2.ROLE_USER, content="é" * 200)]
    counted = sum(m.ByteSize() for m in (*held, *appended))
    store = AppendingStore(max_session_bytes=4096, counted=counted)
    servicer = ContextServicer(store, Settings().models, counters, hot=hot)
    await servicer.AppendTurns(
        pb.AppendTurnsRequest(tenant_id="t", session_id="s1", any_version=True, messages=appended), None
    )
    extended = hot.get(session_key("t", "s1"))
    assert extended.version == 2
    # The script's count, whatever the entry held before.
    assert extended.held_bytes == counted

    # An assembly reserving the rest fits; a byte more is refused, from memory.
    room = 4096 - extended.held_bytes

    def assembly(size_bytes: int) -> pb.AssembleContextRequest:
        return pb.AssembleContextRequest(
            tenant_id="t",
            session_id="s1",
            new_messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="and now?")],
            model="tiny-gpt",
            max_prompt_tokens=400,
            append_reservation=pb.AppendReservation(turn_count=2, size_bytes=size_bytes),
        )

    assert (await servicer.AssembleContext(assembly(room), None)).session_version == 2
    with pytest.raises(MeshgateError) as refused:
        await servicer.AssembleContext(assembly(room + 1), None)
    assert refused.value.metadata["bytes"] == str(extended.held_bytes)


class FullStore(SessionStore):
    """A session at ``live_turns`` holding ``held_bytes``: its appends meet
    the real check_room on its caps, as the append script decides; none
    fits (the tests below only refuse)."""

    def __init__(self, live_turns: int, held_bytes: int, max_turns: int, max_session_bytes: int) -> None:
        super().__init__(redis.Redis(), ttl_s=0, max_turns=max_turns, max_session_bytes=max_session_bytes)
        self.live_turns = live_turns
        self.held_bytes = held_bytes

    async def append(
        self, tenant_id, session_id, expected_version, turns, token_counts, turn_id="", key_id=""
    ):
        size = sum(turn.ByteSize() for turn in turns)
        self.check_room(
            tenant_id,
            session_id,
            self.live_turns,
            self.held_bytes,
            len(turns),
            size,
            version=1,
            expected_version=None,
        )
        raise AssertionError(f"{len(turns)} turns of {size} bytes fit")


class CountingSummarizer:
    """Counts the runs asked for; runs none (as a run that failed)."""

    def __init__(self) -> None:
        self.scheduled = 0

    def schedule(self, tenant_id: str, session_id: str) -> None:
        self.scheduled += 1


def _full_servicer(counters, store: FullStore) -> tuple[ContextServicer, CountingSummarizer]:
    summarizer = CountingSummarizer()
    return ContextServicer(store, Settings().models, counters, summarizer=summarizer), summarizer


async def _refused_on(servicer: ContextServicer, *contents: str) -> str:
    """The unit an append of ``contents`` is refused on."""
    messages = [common_pb2.Message(role=common_pb2.ROLE_USER, content=c) for c in contents]
    request = pb.AppendTurnsRequest(tenant_id="t", session_id="s1", any_version=True, messages=messages)
    with pytest.raises(MeshgateError) as refused:
        await servicer.AppendTurns(request, None)
    assert refused.value.reason == Reason.SESSION_FULL
    return refused.value.metadata["unit"]


async def test_refusals_alternating_between_the_caps_ask_for_one_run_per_amount_held(counters) -> None:
    """A session one turn short of its turn cap and a few bytes short of its
    byte cap: one turn is refused on bytes, two on turns. Noted per session
    alone, each refusal replaced the other cap's note, and every one of them
    asked for a run reading the whole session."""
    store = FullStore(live_turns=99, held_bytes=990, max_turns=100, max_session_bytes=1000)
    servicer, summarizer = _full_servicer(counters, store)
    for _ in range(3):
        assert await _refused_on(servicer, "q" * 20) == "bytes"
        assert await _refused_on(servicer, "q", "a") == "turns"
    assert summarizer.scheduled == 2
    # A new amount held is asked for again, on either cap.
    store.held_bytes = 995
    assert await _refused_on(servicer, "q" * 20) == "bytes"
    assert await _refused_on(servicer, "q", "a") == "turns"
    assert summarizer.scheduled == 3
    store.live_turns = 98
    assert await _refused_on(servicer, "q", "a", "q") == "turns"
    assert summarizer.scheduled == 4


async def test_a_refusal_at_an_amount_already_asked_for_asks_again_once_the_note_expires(
    counters, monkeypatch
) -> None:
    """A run asked for may never compact the session: one that failed on a
    Redis error, one dropped from the summarizer's waiting queue. Noted for
    good, the session stayed full for good at that amount."""
    now = [1000.0]
    monkeypatch.setattr(
        servicer_module,
        "time",
        types.SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter, time=time.time),
    )
    servicer, summarizer = _full_servicer(counters, FullStore(10, 0, max_turns=10, max_session_bytes=0))
    await _refused_on(servicer, "q")
    now[0] += servicer_module.COMPACTION_ASKED_FOR_S - 1
    await _refused_on(servicer, "q")
    assert summarizer.scheduled == 1
    now[0] += 1
    await _refused_on(servicer, "q")
    assert summarizer.scheduled == 2
    await _refused_on(servicer, "q")
    assert summarizer.scheduled == 2
