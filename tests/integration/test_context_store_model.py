"""The session store (services/context/store.py, and the pins of
services/context/turn_index.py) against a plain Python model of its
sessions, over a real Redis: hypothesis drives random sequences of create,
append (with and without an expected version and a turn id, concurrent
ones too), read at a version, revert, fork (also cut at a pinned turn),
pin, unpin, compaction (also of a read of an earlier life of the session,
and racing an append), delete, the clock moving on (sessions expire) and
a restart with another TTL (0 too: kept forever), and after every step
what Redis holds must be what the module's docstring says: the model's
turns, versions, history, turn ids, pins, token counts and byte count,
every key renewed by every write that changed the session (and by no
other step), and nothing at all of a session that is gone. A refused step
must leave everything as it was.

The clock is Redis's expiry, moved on by a script that takes as long off
every TTL the run's sessions hold (move_clock): no test sleeps. Reads do
not renew a session (docs/configuration.md: sessions untouched this long expire; the
store renews on writes), and neither does a step that changed nothing (a
retried append, a pin held already, a compaction of no more turns).
SummarizedSessionStoreMachine (below) adds summaries, the summarizer's
compaction behind them and their usage record to the same model."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import typing
import uuid

import grpc
import numpy as np
import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from meshgate.common.v1 import common_pb2
from meshgate.context.v1 import context_service_pb2 as context_pb
from meshgate.embedding import Embeddings
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context import relevance, turn_index
from services.context import store as session_store
from services.context import summaries as summaries_lib

pytestmark = pytest.mark.integration

TTL_S = 600
# What a restart may configure instead (0: kept forever, from the next write).
OTHER_TTLS_S = (0, 300)
# The model counts time in the clock's moves only; real time passes too, a
# few seconds a sequence at most. So a key's TTL is checked to within this,
# and the clock never stops this close before a session's expiry.
REAL_TIME_S = 20
# Small caps, so that sequences reach them, and compaction makes room again.
MAX_TURNS = 8
MAX_BYTES = 300
# TURN_IDS_KEPT for the run: small, so compactions drop turn ids.
TURN_IDS_KEPT = 2
COUNTER = "model-counter"
# What the model's vectors are named as made by (turn_index.py's \0embedder).
EMBEDDER = "minilm@2"
SESSIONS = ("s1", "s2", "s3")
TURN_IDS = ("id1", "id2", "id3", "id4", "id5")
FACTS = ("f:Ana lives in Lisbon", "f:prefers tea")
# What ...:versions holds for a version a revert undid, as the scripts compare it.
UNDONE = session_store.UNDONE

ROLES = st.sampled_from([common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_SYSTEM])
# Few words, so that turns share terms (and postings), up to ~40 bytes.
CONTENT = st.lists(
    st.sampled_from(["Ana", "moved", "to", "Lisbon", "tea", "tea", "in", "2020"]), max_size=6
).map(" ".join)
TURNS = st.lists(
    st.builds(common_pb2.Message, role=ROLES, content=CONTENT),
    min_size=1,
    max_size=3,
)


class Seen(typing.NamedTuple):
    """A version as a reader of it saw it."""

    messages: tuple[common_pb2.Message, ...]
    history: tuple[int | None, ...]


@dataclasses.dataclass
class Session:
    """What one life of a session should hold."""

    version: int = 0
    # Serialized turns, oldest first; b"" once compaction emptied one.
    turns: list[bytes] = dataclasses.field(default_factory=list)
    # The turns as appended, whatever compaction did to their bodies: what
    # their index rows were made of.
    messages: list[common_pb2.Message] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    # Turns held at each version; None for one a revert undid.
    history: list[int | None] = dataclasses.field(default_factory=lambda: [0])
    turn_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    pins: list[str] = dataclasses.field(default_factory=list)
    compacted: int = 0
    compacted_version: int = -1
    # Its life's create_time_ms, as a compaction's read passes it.
    created_ms: int = 0
    # Seconds until it expires as the model's clock runs; None: kept forever.
    left_s: int | None = None
    # Its ...:summaries hash: span (first, end) -> (summary id, first_version, end_version).
    summaries: dict[tuple[int, int], tuple[str, int, int]] = dataclasses.field(default_factory=dict)
    # What a summarizer that read version v saw: its turns (as appended) and
    # the history then; kept for the versions a revert undid since too, as a
    # run that read one may still be writing. None before the life began (a fork's).
    seen: list[Seen | None] = dataclasses.field(default_factory=lambda: [Seen((), (0,))])
    # Compacted by a step that wrote no summary of the turns (compact()):
    # nothing then says which summaries stand for them.
    blind: bool = False

    @property
    def system(self) -> list[bool]:
        return [message.role == common_pb2.ROLE_SYSTEM for message in self.messages]

    @property
    def live(self) -> int:
        return len(self.turns) - self.compacted

    @property
    def bytes(self) -> int:
        return sum(len(turn) for turn in self.turns)

    def turns_at(self, version: int) -> int | None:
        return self.history[version] if 0 <= version <= self.version else None


def vectors_of(turns: list[common_pb2.Message]) -> Embeddings:
    """Any embedding the model can tell apart: the index only keeps it."""
    rows = [[len(turn.content) + 1, turn.role, 1, -1] for turn in turns]
    return Embeddings(np.array(rows, dtype=np.float32).reshape(len(turns), 4), EMBEDDER)


def index_of(model: Session) -> tuple[bytes, bytes, bytes, list[tuple[bytes, int]]]:
    """The turn index the model's session should hold (turn_index.py's
    docstring): roles and term counts of every turn, vectors and postings of
    the live ones."""
    features = turn_index.features(model.messages)
    postings = [
        (term.encode(), relevance.pack_posting(position, frequency))
        for position, turn in enumerate(features)
        if position >= model.compacted
        for term, frequency in turn.terms.items()
    ]
    return (
        bytes(message.role for message in model.messages),
        turn_index.term_counts(features).tobytes(),
        relevance.quantize(vectors_of(model.messages[model.compacted :]).rows).tobytes(),
        sorted(postings),
    )


def counts_of(turns: list[common_pb2.Message]) -> list[int]:
    """Any per-turn counts the model can tell apart: the store only keeps them."""
    return [len(turn.content) + 1 for turn in turns]


class SessionStoreMachine(RuleBasedStateMachine):
    # Set by the test: one event loop and Redis for every example.
    runner: asyncio.Runner
    redis_url: str

    def __init__(self) -> None:
        super().__init__()
        self.tenant = f"model-{uuid.uuid4().hex[:8]}"
        self.client = redis.Redis.from_url(self.redis_url)
        self.start(TTL_S)
        self.sessions: dict[str, Session] = {}

    def start(self, ttl_s: int) -> None:
        """The store and index as a process configured with ``ttl_s`` has them."""
        self.ttl_s = ttl_s
        self.store = session_store.SessionStore(self.client, ttl_s, MAX_TURNS, MAX_BYTES)
        self.index = turn_index.TurnIndex(self.client, ttl_s)

    def renewed(self, model: Session) -> None:
        """A write that changed the session renews every one of its keys."""
        model.left_s = self.ttl_s or None

    def teardown(self) -> None:
        self.run(self.client.aclose())

    def run(self, awaitable):
        return self.runner.run(awaitable)

    def refused(self, awaitable, code: grpc.StatusCode, reason: Reason) -> MeshgateError:
        with pytest.raises(MeshgateError) as caught:
            self.run(awaitable)
        assert (caught.value.code, caught.value.reason) == (code, reason), caught.value.message
        return caught.value

    def missing(self, awaitable) -> None:
        self.refused(awaitable, grpc.StatusCode.NOT_FOUND, Reason.SESSION_NOT_FOUND)

    def append_call(self, session_id: str, expected: int | None, turns, turn_id: str = ""):
        return self.store.append(
            self.tenant, session_id, expected, turns, {COUNTER: counts_of(turns)}, turn_id
        )

    def apply_append(
        self, session_id: str, model: Session, turns: list[common_pb2.Message], turn_id: str, created_ms: int
    ) -> None:
        """The model's append, and the index write the servicer follows it with."""
        self.renewed(model)
        first = len(model.turns)
        model.turns += [turn.SerializeToString() for turn in turns]
        model.messages += turns
        model.counts += counts_of(turns)
        model.version += 1
        model.history.append(len(model.turns))
        model.seen.append(Seen(tuple(model.messages), tuple(model.history)))
        if turn_id:
            model.turn_ids[turn_id] = model.version
        write = self.index.write(
            self.tenant,
            session_id,
            model.version,
            turn_index.features(turns),
            vectors_of(turns),
            created_ms=created_ms,
        )
        assert self.run(write) == first

    def room_for(self, model: Session, turns: list[common_pb2.Message]) -> bool:
        added = sum(len(turn.SerializeToString()) for turn in turns)
        return model.live + len(turns) <= MAX_TURNS and model.bytes + added <= MAX_BYTES

    # --- what a step acts on -------------------------------------------------------
    # Drawn from what the model holds, so that few steps are refusals or no-ops:
    # a bug in a script shows only once a sequence reaches the state it
    # mishandles (a turn id above a revert's target, a pin at the index a revert
    # or fork cuts at, a compacted turn kept for its pin). Each draw still
    # names, now and then, what is absent or undone, for the refusals.

    def draw_session(self, data) -> str:
        """Mostly a session that exists; now and then any id."""
        return data.draw(st.sampled_from(sorted(self.sessions) * 3 + list(SESSIONS)), label="session")

    def draw_new_session(self, data) -> str:
        """Mostly an id no session holds, to create or fork into; now and then any id."""
        absent = [session_id for session_id in SESSIONS if session_id not in self.sessions]
        return data.draw(st.sampled_from(absent * 3 + list(SESSIONS)), label="new session")

    def draw_version(self, data, model: Session | None) -> int:
        """Mostly a version the session can restore; now and then an undone or later one."""
        if model is None:
            return data.draw(st.integers(0, 3), label="version")
        restorable = [version for version, held in enumerate(model.history) if held is not None]
        return data.draw(st.sampled_from(restorable * 3 + list(range(model.version + 3))), label="version")

    # --- rules ------------------------------------------------------------------

    @initialize()
    def create_the_first(self) -> None:
        """Most rules need a session: every sequence starts with one."""
        self.created(SESSIONS[0], self.run(self.store.create(self.tenant, SESSIONS[0])))

    def created(self, session_id: str, created_ms: int) -> None:
        self.sessions[session_id] = model = Session(created_ms=created_ms)
        self.renewed(model)

    # Only while an id is free: with every id taken, each create would be a
    # refusal (draw_new_session still names a taken one now and then).
    @precondition(lambda self: len(self.sessions) < len(SESSIONS))
    @rule(data=st.data())
    def create(self, data) -> None:
        session_id = self.draw_new_session(data)
        if session_id in self.sessions:
            self.refused(
                self.store.create(self.tenant, session_id),
                grpc.StatusCode.ALREADY_EXISTS,
                Reason.SESSION_EXISTS,
            )
            return
        self.created(session_id, self.run(self.store.create(self.tenant, session_id)))

    # Two rules, not one: swarm testing turns rules off by name, and a
    # sequence without appends holds nothing for the others to act on.
    @rule(
        data=st.data(),
        turns=TURNS,
        expected=st.sampled_from(["current", "any", "current", "any", "stale", "ahead"]),
    )
    def append(self, data, turns, expected: str) -> None:
        self.append_as(self.draw_session(data), turns, expected, "")

    @rule(data=st.data(), turns=TURNS, turn_id=st.sampled_from(TURN_IDS))
    def append_with_turn_id(self, data, turns, turn_id: str) -> None:
        """An id from a few: some are taken, and the append is a retry then."""
        self.append_as(self.draw_session(data), turns, "any", turn_id)

    def append_as(self, session_id: str, turns, expected: str, turn_id: str) -> None:
        model = self.sessions.get(session_id)
        if model is None:
            self.missing(self.append_call(session_id, None, turns, turn_id))
            return
        version = {"current": model.version, "stale": model.version - 1, "ahead": model.version + 1}
        expected_version = version.get(expected)
        call = self.append_call(session_id, expected_version, turns, turn_id)
        if turn_id in model.turn_ids:
            appended = self.run(call)
            assert (appended.version, appended.replayed) == (model.turn_ids[turn_id], True)
        elif expected_version is not None and expected_version != model.version:
            error = self.refused(call, grpc.StatusCode.ABORTED, Reason.VERSION_CONFLICT)
            assert error.metadata["current_version"] == str(model.version)
        elif not self.room_for(model, turns):
            self.refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSION_FULL)
        else:
            appended = self.run(call)
            self.apply_append(session_id, model, turns, turn_id, appended.create_time_ms)
            assert (appended.version, appended.replayed, appended.held_bytes) == (
                model.version,
                False,
                model.bytes,
            )

    @rule(data=st.data(), writers=st.integers(2, 4))
    def concurrent_appends(self, data, writers: int) -> None:
        """Appends at one expected version, at once: exactly one wins."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        turns = [[common_pb2.Message(role=common_pb2.ROLE_USER, content=f"w{i}")] for i in range(writers)]
        if model is None or not self.room_for(model, turns[0]):
            return

        async def race():
            calls = (self.append_call(session_id, model.version, turn) for turn in turns)
            return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = self.run(race())
        won = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, session_store.Appended)]
        assert len(won) == 1, outcomes
        for i, outcome in enumerate(outcomes):
            if i != won[0]:
                assert isinstance(outcome, MeshgateError) and outcome.reason == Reason.VERSION_CONFLICT, (
                    outcome
                )
        winner = outcomes[won[0]]
        self.apply_append(session_id, model, turns[won[0]], "", winner.create_time_ms)
        assert winner.version == model.version

    @rule(data=st.data(), turn_id=st.sampled_from(TURN_IDS))
    def concurrent_retries(self, data, turn_id: str) -> None:
        """One append and its retry, at once: applied once, the other answered so."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        turns = [common_pb2.Message(role=common_pb2.ROLE_USER, content=f"retried {turn_id}")]
        if model is None or turn_id in model.turn_ids or not self.room_for(model, turns):
            return

        async def race():
            return await asyncio.gather(
                *(self.append_call(session_id, None, turns, turn_id) for _ in range(2))
            )

        outcomes = self.run(race())
        self.apply_append(session_id, model, turns, turn_id, outcomes[0].create_time_ms)
        assert sorted((o.version, o.replayed) for o in outcomes) == [
            (model.version, False),
            (model.version, True),
        ]

    @rule(data=st.data(), latest=st.booleans())
    def read(self, data, latest: bool) -> None:
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        at = None if latest else self.draw_version(data, model)
        call = self.store.read(self.tenant, session_id, at)
        if model is None:
            self.missing(call)
            return
        if at is not None and model.compacted > 0 and at <= model.compacted_version:
            self.refused(call, grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_COMPACTED)
            return
        held = len(model.turns) if at is None or at == model.version else model.turns_at(at)
        if held is None:
            self.refused(call, grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND)
            return
        stored = self.run(call)
        assert stored.version == (model.version if at is None else at)
        assert [turn.SerializeToString() for turn in stored.turns] == model.turns[:held]
        assert [int(c) for c in stored.token_counts.get(COUNTER, ())] == model.counts[:held]
        assert stored.compacted == min(model.compacted, held)

    @rule(data=st.data(), expected=st.sampled_from(["current", "any", "stale"]))
    def revert(self, data, expected: str) -> None:
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        to_version = self.draw_version(data, model)
        if model is None:
            self.missing(self.store.revert(self.tenant, session_id, to_version, None))
            return
        expected_version = {"current": model.version, "stale": model.version - 1}.get(expected)
        call = self.store.revert(self.tenant, session_id, to_version, expected_version)
        held = model.turns_at(to_version)
        if expected_version is not None and expected_version != model.version:
            self.refused(call, grpc.StatusCode.ABORTED, Reason.VERSION_CONFLICT)
        elif held is None:
            self.refused(call, grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND)
        elif held < model.compacted:
            self.refused(call, grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_COMPACTED)
        else:
            version = self.run(call)
            self.reverted(model, to_version)
            assert version == model.version

    def reverted(self, model: Session, to_version: int) -> None:
        """The model's revert to ``to_version``, which it may be reverted to."""
        held = model.turns_at(to_version)
        del model.turns[held:], model.messages[held:], model.counts[held:]
        model.pins = [pin for pin in model.pins if not pin.startswith("t:") or int(pin[2:]) < held]
        for undone in range(to_version + 1, model.version + 1):
            model.history[undone] = None
        model.turn_ids = {turn_id: made for turn_id, made in model.turn_ids.items() if made <= to_version}
        model.version += 1
        model.history.append(held)
        model.seen.append(Seen(tuple(model.messages), tuple(model.history)))
        self.renewed(model)

    @rule(data=st.data())
    def fork(self, data) -> None:
        source_id = self.draw_session(data)
        at_version = self.draw_version(data, self.sessions.get(source_id))
        self.fork_as(source_id, at_version, self.draw_new_session(data))

    @rule(data=st.data(), side=st.sampled_from(["at", "before"]))
    def fork_at_a_pinned_turn(self, data, side: str) -> None:
        """Pins the turn a version ends at (its fork leaves the pin behind)
        or the one before (its fork takes it), and forks at that version:
        fork()'s draws rarely meet either."""
        before = side == "before"
        cuts = [
            (session_id, version, held - before)
            for session_id, model in sorted(self.sessions.items())
            if model.compacted == 0
            for version, held in enumerate(model.history)
            if held is not None and 0 <= held - before < len(model.turns)
        ]
        if not cuts:
            return
        source_id, at_version, index = data.draw(st.sampled_from(cuts), label="cut")
        model = self.sessions[source_id]
        self.pinned(model, f"t:{index}")
        assert self.run(self.index.pin(self.tenant, source_id, f"t:{index}", index)) == len(model.pins)
        self.fork_as(source_id, at_version, self.draw_new_session(data))

    def fork_as(self, source_id: str, at_version: int, fork_id: str) -> None:
        model = self.sessions.get(source_id)
        call = self.store.fork(self.tenant, source_id, at_version, fork_id)
        if model is None:
            self.missing(call)
            return
        held = model.turns_at(at_version)
        if held is None:
            self.refused(call, grpc.StatusCode.NOT_FOUND, Reason.VERSION_NOT_FOUND)
        elif model.compacted > 0 and held > 0:
            self.refused(call, grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_COMPACTED)
        elif fork_id in self.sessions:
            self.refused(call, grpc.StatusCode.ALREADY_EXISTS, Reason.SESSION_EXISTS)
        else:
            made_id, created_ms = self.run(call)
            assert made_id == fork_id
            self.sessions[fork_id] = fork = Session(
                version=at_version,
                turns=model.turns[:held],
                messages=model.messages[:held],
                counts=model.counts[:held],
                history=(history := model.history[: at_version + 1]),
                pins=[pin for pin in model.pins if not pin.startswith("t:") or int(pin[2:]) < held],
                created_ms=created_ms,
                seen=[None] * at_version + [Seen(tuple(model.messages[:held]), tuple(history))],
            )
            self.renewed(fork)

    @rule(data=st.data())
    def pin_turn(self, data) -> None:
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        # Mostly a turn the session holds; now and then one just outside.
        held = len(model.turns) if model else 0
        index = data.draw(st.sampled_from([*range(held)] * 3 + [-1, held]), label="index")
        call = self.index.pin(self.tenant, session_id, f"t:{index}", index)
        if model is None:
            self.missing(call)
        elif not 0 <= index < len(model.turns):
            self.refused(call, grpc.StatusCode.NOT_FOUND, Reason.PIN_TARGET_NOT_FOUND)
        elif model.turns[index] == b"":
            self.refused(call, grpc.StatusCode.FAILED_PRECONDITION, Reason.VERSION_COMPACTED)
        else:
            self.pinned(model, f"t:{index}")
            assert self.run(call) == len(model.pins)

    def pinned(self, model: Session, pin: str) -> None:
        # A pin held already changes nothing, and renews nothing.
        if pin not in model.pins:
            model.pins.append(pin)
            self.renewed(model)

    @rule(data=st.data(), fact=st.sampled_from(FACTS))
    def pin_fact(self, data, fact: str) -> None:
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        call = self.index.pin(self.tenant, session_id, fact, None)
        if model is None:
            self.missing(call)
            return
        self.pinned(model, fact)
        assert self.run(call) == len(model.pins)

    @rule(data=st.data())
    def unpin(self, data) -> None:
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        # Mostly a pin the session holds; now and then one it does not.
        pins = model.pins if model else []
        pin = data.draw(st.sampled_from(pins * 3 + [*FACTS, "t:0"]), label="pin")
        call = self.index.unpin(self.tenant, session_id, pin)
        if model is None:
            self.missing(call)
        elif pin not in model.pins:
            self.refused(call, grpc.StatusCode.NOT_FOUND, Reason.PIN_NOT_FOUND)
        else:
            model.pins.remove(pin)
            self.renewed(model)
            if pin.startswith("t:") and (index := int(pin[2:])) < model.compacted and not model.system[index]:
                # Kept only for its pin: compacted now (turn_index._UNPIN).
                model.turns[index] = b""
            assert self.run(call) == len(model.pins)

    @rule(
        data=st.data(),
        read_back=st.integers(0, 3),
        life=st.sampled_from(["this", "this", "this", "earlier"]),
    )
    def compact(self, data, read_back: int, life: str) -> None:
        """As the summarizer does: up to turns it read ``read_back`` versions
        ago, now and then in an earlier life of the session (deleted and
        created again since the read)."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        if model is None:
            assert self.run(self.store.compact(self.tenant, session_id, 0, 2, [])) == -1
            return
        read = max(model.version - read_back, 0)
        held_then = model.turns_at(read)
        if held_then is None:
            return
        # Mostly past what is compacted already, so that this one compacts more.
        upto = data.draw(
            st.sampled_from([*range(model.compacted + 1, held_then + 1)] * 3 + [*range(held_then + 1)]),
            label="upto",
        )
        created_ms = model.created_ms - (life == "earlier")
        call = self.compact_call(session_id, model, read, upto, created_ms)
        compacted = self.run(call)
        # A revert since the read to fewer than `upto` turns: they may be others now.
        changed = any(held is not None and held < upto for held in model.history[read + 1 :])
        if changed or life == "earlier":
            assert compacted == -1
            return
        assert compacted == self.compacted(model, upto)

    def compact_call(self, session_id: str, model: Session, read: int, upto: int, created_ms: int):
        system = [i for i, is_system in enumerate(model.system[:upto]) if is_system]
        return self.store.compact(self.tenant, session_id, read, upto, system, created_ms)

    def compacted(self, model: Session, upto: int, blind: bool = True) -> int:
        """The model's compaction of its first ``upto`` turns, now (``blind``:
        by a step that wrote no summary of them); returns how many turns are
        compacted after it."""
        if upto <= model.compacted:
            return model.compacted
        model.blind |= blind
        pinned = {int(pin[2:]) for pin in model.pins if pin.startswith("t:")}
        for i in range(model.compacted, upto):
            if not model.system[i] and i not in pinned:
                model.turns[i] = b""
        model.compacted, model.compacted_version = upto, model.version
        for turn_id, made in list(model.turn_ids.items()):
            held = model.history[made]
            if made <= model.version - TURN_IDS_KEPT and held is not None and held <= upto:
                del model.turn_ids[turn_id]
        self.renewed(model)
        return upto

    @rule(
        data=st.data(),
        turns=TURNS,
        turn_id=st.sampled_from(["", *TURN_IDS]),
        read_back=st.integers(0, 2),
    )
    def compaction_racing_an_append(self, data, turns, turn_id: str, read_back: int) -> None:
        """The summarizer compacts what it read ``read_back`` versions ago
        while an append lands: Redis runs one script, then the other, and
        either order must leave the session as the model's same order does
        (the compaction's room taken by the append, or not; the turn ids it
        drops counted from the version it ran at)."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        if model is None or turn_id in model.turn_ids:
            return
        read = max(model.version - read_back, 0)
        held_then = model.turns_at(read)
        # Only a compaction that takes more turns, of a read no revert undid since.
        if held_then is None or held_then <= model.compacted:
            return
        if any(held is not None and held < held_then for held in model.history[read + 1 :]):
            return
        upto = data.draw(st.integers(model.compacted + 1, held_then), label="upto")

        async def race():
            return await asyncio.gather(
                self.compact_call(session_id, model, read, upto, model.created_ms),
                self.append_call(session_id, None, turns, turn_id),
                return_exceptions=True,
            )

        room_before = self.room_for(model, turns)
        compacted, appended = self.run(race())
        assert compacted == upto, compacted
        if isinstance(appended, MeshgateError):
            # Full even if compacted first: the compaction only makes room.
            assert appended.reason == Reason.SESSION_FULL and not room_before, appended
            self.compacted(model, upto)
            assert not self.room_for(model, turns)
            return
        assert isinstance(appended, session_store.Appended), appended
        meta = session_store.key(self.tenant, session_id, "meta")
        if int(self.run(self.client.hget(meta, "compacted_version"))) == model.version:
            event("compacted, then appended")
            self.compacted(model, upto)
            assert self.room_for(model, turns)
        else:
            event("appended, then compacted")
            assert room_before
        self.apply_append(session_id, model, turns, turn_id, appended.create_time_ms)
        self.compacted(model, upto)
        assert (appended.version, appended.replayed) == (model.version, False)

    # Never the last one: swarm testing turns create and fork off in some
    # sequences, whose every later step would then act on no session.
    @precondition(lambda self: len(self.sessions) > 1)
    @rule(data=st.data())
    def delete(self, data) -> None:
        session_id = self.draw_session(data)
        call = self.store.delete(self.tenant, session_id)
        if self.sessions.pop(session_id, None) is None:
            self.missing(call)
        else:
            self.run(call)

    @rule(data=st.data())
    def move_clock(self, data) -> None:
        """Time passes: up to a session's expiry, or to just before it."""
        lefts = sorted({model.left_s for model in self.sessions.values() if model.left_s is not None})
        # Mostly a minute, so that sessions renewed since live longer than
        # the others. Never stopping within REAL_TIME_S before an expiry:
        # real time would end it too.
        moves = [
            seconds
            for seconds in [60] * 3 + [end for left in lefts for end in (left, left - REAL_TIME_S - 1)]
            if seconds > 0 and not any(0 < left - seconds <= REAL_TIME_S for left in lefts)
        ]
        if not moves:
            return
        seconds = data.draw(st.sampled_from(moves), label="seconds")
        keys = [key for session_id in SESSIONS for key in session_store.session_keys(self.tenant, session_id)]
        self.run(self.client.eval(_MOVE_CLOCK, len(keys), *keys, seconds * 1000))
        for session_id, model in list(self.sessions.items()):
            if model.left_s is not None:
                model.left_s -= seconds
                if model.left_s <= 0:
                    event("a session expired")
                    del self.sessions[session_id]

    @rule(ttl_s=st.sampled_from(OTHER_TTLS_S))
    def restart_with_another_ttl(self, ttl_s: int) -> None:
        """A process configured with another TTL: each session keeps the
        one it was written with until its next write."""
        self.start(ttl_s)

    # --- what Redis holds, after every step ---------------------------------------

    @invariant()
    def redis_holds_the_model(self) -> None:
        for session_id in SESSIONS:
            self.run(self.check(session_id, self.sessions.get(session_id)))

    async def check(self, session_id: str, model: Session | None) -> None:
        keys = session_store.session_keys(self.tenant, session_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.pttl(k)
            pipe.hgetall(keys[0])
            pipe.lrange(keys[1], 0, -1)
            pipe.hgetall(keys[2])
            pipe.lrange(keys[4], 0, -1)
            for k in keys[5:8]:
                pipe.get(k)
            pipe.hgetall(keys[8])
            *ttls, meta, turns, turn_ids, pins, roles, lengths, vectors, postings = await pipe.execute()
        if model is None:
            # Gone whole: nothing of it may come back with a session of its id.
            assert ttls == [-2] * len(keys), dict(zip(session_store.SESSION_PARTS, ttls, strict=True))
            return
        # Every part there is lives as long as the session: renewed together,
        # when the model's clock says.
        if model.left_s is None:
            assert all(ttl in (-2, -1) for ttl in ttls), ttls
        else:
            renewed_ms = model.left_s * 1000
            assert all(ttl == -2 or renewed_ms - REAL_TIME_S * 1000 < ttl <= renewed_ms for ttl in ttls), (
                renewed_ms,
                ttls,
            )
        assert int(meta[b"version"]) == model.version
        assert turns == model.turns
        assert {k.decode(): int(v) for k, v in turn_ids.items()} == model.turn_ids
        assert [pin.decode() for pin in pins] == model.pins
        assert int(meta[b"bytes"]) == model.bytes
        assert int(meta.get(b"compacted", 0)) == model.compacted
        assert int(meta.get(b"compacted_version", -1)) == model.compacted_version
        assert await self.store.history(self.tenant, session_id) == model.history
        stored = await self.store.read(self.tenant, session_id)
        assert [int(c) for c in stored.token_counts.get(COUNTER, ())] == model.counts
        postings.pop(session_store.DIMENSIONS_FIELD.encode(), None)
        assert postings.pop(session_store.EMBEDDER_FIELD.encode(), EMBEDDER.encode()) == EMBEDDER.encode()
        stored_postings = sorted(
            (term, int(posting))
            for term, packed in postings.items()
            for posting in np.frombuffer(packed, "<u4")
        )
        assert (roles or b"", lengths or b"", vectors or b"", stored_postings) == index_of(model)


# KEYS: every key of the run's sessions. ARGV: ms. Takes them off every TTL,
# as that much time passing would; a key left with none is expired (deleted).
_MOVE_CLOCK = """
for _, key in ipairs(KEYS) do
  local left = redis.call('PTTL', key)
  if left > 0 then
    if left <= tonumber(ARGV[1]) then redis.call('DEL', key)
    else redis.call('PEXPIRE', key, left - ARGV[1]) end
  end
end
"""


def test_the_session_store_keeps_what_its_model_keeps(redis_url, monkeypatch) -> None:
    monkeypatch.setattr(session_store, "TURN_IDS_KEPT", TURN_IDS_KEPT)
    SessionStoreMachine.redis_url = redis_url
    # As tests/fuzz: CI draws the same sequences every run; HYPOTHESIS_PROFILE=fuzz
    # (with MESHGATE_MODEL_EXAMPLES, say 2000) draws new ones, to find new bugs.
    hunting = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
    # Fewer, longer sequences than a test of one step: expiry, a cut at a
    # pin and a compaction's turn ids each need several steps before them.
    examples = int(os.environ.get("MESHGATE_MODEL_EXAMPLES", "45"))
    # Its own loop, never set as the thread's: the suite's session loop stays as it is.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        SessionStoreMachine.runner = runner
        run_state_machine_as_test(
            SessionStoreMachine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=50,
                deadline=None,
                derandomize=not hunting,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


# --- summaries and their usage record -------------------------------------------

# The summarizer's policy in the model: spans of 2 turns out of a hot window
# of 2, compacted past 4 live turns, so sequences within MAX_TURNS reach all three.
SUMMARY_POLICY = summaries_lib.SummaryPolicy(span_turns=2, hot_window_turns=2, compact_after_turns=4)
SPENDS = st.none() | st.builds(
    summaries_lib.ModelSpend,
    model=st.sampled_from(["m1", "m2"]),
    prompt_tokens=st.integers(1, 50),
    completion_tokens=st.integers(1, 9),
)


@dataclasses.dataclass
class Usage:
    """A session id's usage record (store.py's docstring) as it should be:
    not a part of any life of the session, so kept by id."""

    # Model -> [prompt tokens, completion tokens, summaries] no take took.
    unbilled: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # ``unbilled_take`` and ``unbilled_held``: (take id, what it took).
    take: tuple[str, dict[str, list[int]]] | None = None
    held: tuple[str, dict[str, list[int]]] | None = None
    # Whether a summary of a live session wrote ``latest_key``.
    keyed: bool = False
    # Every model's spend the record counted, summed: what its takes must
    # bill, each once.
    spent: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # Take id -> what the router billed under it (each id once, as its ledger).
    billed: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return bool(self.unbilled or self.take or self.held or self.keyed)


def added(into: dict[str, list[int]], model: str, counts: list[int]) -> None:
    into[model] = [held + more for held, more in zip(into.get(model, [0, 0, 0]), counts, strict=True)]


def taken_of(raw: bytes | str) -> dict[str, list[int]]:
    """What a take took, as the record and a take's answer spell it ('' for nothing)."""
    return {spend.model: list(spend[1:]) for spend in session_store._spends(raw)}


class SummarizedSessionStoreMachine(SessionStoreMachine):
    """The session store's model, with summaries written as the summarizer
    writes them (services/context/summaries.py: over a span of turns read at
    a version, with the versions of its turns' appends, by SummaryStore.put),
    by the summarizer itself (which compacts behind them), racing appends
    and reverts, and the usage record their models' tokens are added to,
    taken for the router to bill (held, acknowledged, retried). Besides
    what the store's model checks, after every step: the summaries hash is
    the model's (nothing a client or the summarizer stored is lost), a
    summary that holds at the current version (summaries.valid_at) is of
    exactly the turns the session holds in its span (after reverts, forks
    and a new life of the id too), the turns compacted behind summaries
    have one holding for each of them, an assembly's manifest marks turns
    SUMMARIZED only with a summary of them, and every spend the record
    counted is billed once, by take id, or still waits in the record."""

    def __init__(self) -> None:
        super().__init__()
        self.usage: dict[str, Usage] = {session_id: Usage() for session_id in SESSIONS}
        self.takes = 0

    def start(self, ttl_s: int) -> None:
        super().start(ttl_s)
        self.summary_store = summaries_lib.SummaryStore(self.client, ttl_s)

    def summary_of(self, model: Session, read: int, first: int, end: int) -> summaries_lib.Summary:
        """The summary a run that read ``read`` makes of turns [first, end)."""
        seen = model.seen[read]
        span = list(seen.messages[first:end])
        first_version, end_version = summaries_lib.versions_of_span(list(seen.history), first, end, read)
        return summaries_lib.Summary(
            summary_id=summaries_lib.summary_id(first, end, summaries_lib.span_digest(span)),
            first_turn=first,
            end_turn=end,
            first_version=first_version,
            end_version=end_version,
            method="extractive",
            text=summaries_lib.extractive_summary(span),
        )

    def put_call(self, session_id: str, summary: summaries_lib.Summary, created_ms: int, spent):
        # Its id for the content key's digest: a key no run reads (theirs are
        # whole digests), as the model leaves that shared copy out.
        return self.summary_store.put(self.tenant, session_id, summary.summary_id, summary, created_ms, spent)

    def put(self, session_id: str, summary: summaries_lib.Summary, created_ms: int, spent) -> bool:
        """The model's _PUT: what it counts; returns whether it writes."""
        model = self.sessions.get(session_id)
        span = (summary.first_turn, summary.end_turn)
        live = model is not None and model.created_ms == created_ms
        if spent is not None:
            before = model.summaries.get(span) if model else None
            if before is None or before[0] != summary.summary_id:
                usage = self.usage[session_id]
                counts = [spent.prompt_tokens, spent.completion_tokens, 1]
                added(usage.unbilled, spent.model, counts)
                added(usage.spent, spent.model, counts)
                usage.keyed |= live
        if not live or model.history[summary.end_version] is None:
            return False
        model.summaries[span] = (summary.summary_id, summary.first_version, summary.end_version)
        return True

    def draw_read(self, data, model: Session, least_turns: int) -> int | None:
        """A version a summarizer run may have read in this life of the
        session, holding ``least_turns`` turns or more: mostly the current
        one or one a revert undid since (whose summaries are refused)."""
        reads = [
            version
            for version, seen in enumerate(model.seen)
            if seen is not None and len(seen.messages) >= least_turns
        ]
        reads += [
            version for version in reads if version == model.version or model.history[version] is None
        ] * 2
        return data.draw(st.sampled_from(reads), label="read") if reads else None

    def draw_span(self, data, held: int) -> tuple[int, int]:
        first = data.draw(st.integers(0, held - 1), label="first")
        return first, data.draw(st.integers(first + 1, min(first + 3, held)), label="end")

    @rule(
        data=st.data(),
        spent=SPENDS,
        life=st.sampled_from(["this", "this", "this", "earlier"]),
        runs=st.integers(1, 2),
    )
    def write_summary(self, data, spent, life: str, runs: int) -> None:
        """A summary of a span of turns read at some version, as a run writes
        it after its model call: appends, reverts (also undoing the version
        read) or a delete may have come since; now and then it was made from
        an earlier life of the session; or by ``runs`` replicas' runs, each
        of which paid a model for it (its tenant pays once)."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        if model is None or (read := self.draw_read(data, model, 1)) is None:
            return
        first, end = self.draw_span(data, len(model.seen[read].messages))
        summary = self.summary_of(model, read, first, end)
        created_ms = model.created_ms - (life == "earlier")
        for _ in range(runs):
            written = self.run(self.put_call(session_id, summary, created_ms, spent))
            assert written == self.put(session_id, summary, created_ms, spent)
            event(f"summary written: {written}")

    @rule(data=st.data(), spent=SPENDS)
    def summary_of_a_deleted_session(self, data, spent) -> None:
        """A run's summary of a session deleted (or expired) while its model
        call ran: nothing is written, but what the model spent is counted."""
        absent = [session_id for session_id in SESSIONS if session_id not in self.sessions]
        if not absent:
            return
        session_id = data.draw(st.sampled_from(absent), label="gone")
        summary = summaries_lib.Summary("0" * 32, 0, 1, 1, 1, "extractive", "gone")
        assert not self.run(self.put_call(session_id, summary, 1, spent))
        assert not self.put(session_id, summary, 1, spent)

    @rule(data=st.data(), spent=SPENDS, order=st.sampled_from(["at once", "summary first", "revert first"]))
    def summary_racing_a_revert(self, data, spent, order: str) -> None:
        """A summary of turns read now, written while a revert lands: written
        first and then undone, or refused because its turns' version is
        undone already; never holding for turns the session no longer holds.
        Sent at once, the revert lands first (the summary's write is two
        calls): one before the other is drawn too."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        if model is None or not model.turns:
            return
        first, end = self.draw_span(data, len(model.turns))
        summary = self.summary_of(model, model.version, first, end)
        targets = [
            version
            for version, held in enumerate(model.history)
            if held is not None and held >= model.compacted
        ]
        to_version = data.draw(st.sampled_from(targets), label="to version")

        async def race():
            put = self.put_call(session_id, summary, model.created_ms, spent)
            revert = self.store.revert(self.tenant, session_id, to_version, None)
            if order == "at once":
                return await asyncio.gather(put, revert)
            if order == "summary first":
                return await put, await revert
            version = await revert
            return await put, version

        written, version = self.run(race())
        undone = summary.end_version > to_version
        event(f"summary racing a revert: undone {undone}, written {written}")
        # In the order Redis ran them: the summary refused only after the
        # revert undid its turns' version.
        if order == "summary first" or (order == "at once" and written):
            assert written == self.put(session_id, summary, model.created_ms, spent)
            self.reverted(model, to_version)
        else:
            self.reverted(model, to_version)
            assert written == self.put(session_id, summary, model.created_ms, spent)
        assert version == model.version

    @rule(data=st.data(), spent=SPENDS, turns=TURNS)
    def summary_racing_an_append(self, data, spent, turns) -> None:
        """A summary of turns read at some version, written while an append
        lands: an append leaves every turn before it as it was."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        if (
            model is None
            or not self.room_for(model, turns)
            or (read := self.draw_read(data, model, 1)) is None
        ):
            return
        first, end = self.draw_span(data, len(model.seen[read].messages))
        summary = self.summary_of(model, read, first, end)

        async def race():
            return await asyncio.gather(
                self.put_call(session_id, summary, model.created_ms, spent),
                self.append_call(session_id, None, turns),
            )

        written, appended = self.run(race())
        assert written == self.put(session_id, summary, model.created_ms, spent)
        self.apply_append(session_id, model, turns, "", appended.create_time_ms)
        assert appended.version == model.version

    def summarizer(self) -> summaries_lib.Summarizer:
        return summaries_lib.Summarizer(self.store, self.summary_store, SUMMARY_POLICY, None)

    @rule(data=st.data())
    def summarize_due(self, data) -> None:
        """The summarizer's run (extractive): every due span summarized, and
        turns compacted behind the summaries past the soft cap."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        call = self.summarizer().summarize_due(self.tenant, session_id)
        if model is None:
            self.missing(call)
            return
        assert self.run(call) == (model.version, model.created_ms)
        self.summarized(session_id, model)

    @rule(data=st.data(), turns=TURNS)
    def summarize_due_racing_an_append(self, data, turns) -> None:
        """The summarizer's run while an append lands: whatever it wrote and
        compacted holds for the turns the session has after both."""
        session_id = self.draw_session(data)
        model = self.sessions.get(session_id)
        if model is None:
            return

        async def race():
            return await asyncio.gather(
                self.summarizer().summarize_due(self.tenant, session_id),
                self.append_call(session_id, None, turns),
                return_exceptions=True,
            )

        room_before = self.room_for(model, turns)
        (read, _), appended = self.run(race())
        meta = session_store.key(self.tenant, session_id, "meta")
        compacted, compacted_version = self.run(self.client.hmget(meta, "compacted", "compacted_version"))
        if isinstance(appended, MeshgateError):
            # Full, and compacted after the refusal, if at all.
            assert appended.reason == Reason.SESSION_FULL and not room_before, appended
            self.summarized(session_id, model)
            return
        assert isinstance(appended, session_store.Appended), appended
        if int(compacted or 0) > model.compacted and int(compacted_version) == model.version:
            event("summarizer compacted, then appended")
            self.summarized(session_id, model)
        else:
            assert room_before
        self.apply_append(session_id, model, turns, "", appended.create_time_ms)
        assert read in (model.version - 1, model.version)
        self.summarized(session_id, model)

    def summarized(self, session_id: str, model: Session) -> None:
        """Takes what the summarizer wrote into the model, once it is what
        it may write: a summary of the session's own turns, holding now,
        where the hash held none that holds; and a compaction no further
        than the run of summaries from turn 0 that holds (summaries.coverage)."""
        stored = self.run(self.summary_store.spans(self.tenant, session_id))[0]
        for span, summary in stored.items():
            entry = (summary.summary_id, summary.first_version, summary.end_version)
            before = model.summaries.get(span)
            if before == entry:
                continue
            assert before is None or not self.holds(model, before[2]), (span, before, entry)
            assert self.holds(model, summary.end_version), summary
            assert summary.summary_id == summaries_lib.summary_id(
                *span, summaries_lib.span_digest(model.messages[span[0] : span[1]])
            )
            model.summaries[span] = entry
            event("the summarizer wrote a summary")
        assert stored.keys() == model.summaries.keys(), "a summary the summarizer never wrote, or lost"
        meta = session_store.key(self.tenant, session_id, "meta")
        compacted = int(self.run(self.client.hget(meta, "compacted")) or 0)
        if compacted > model.compacted:
            event("the summarizer compacted")
            assert model.blind or compacted <= self.covered(model)
            self.compacted(model, compacted, blind=False)

    def holds(self, model: Session, end_version: int) -> bool:
        """summaries.valid_at, for the model's session now."""
        return end_version <= model.version and model.history[end_version] is not None

    def standing(self, model: Session) -> list[summaries_lib.Summary]:
        """The model's summaries that hold now, as summaries.coverage chooses them."""
        return summaries_lib.coverage(
            summaries_lib.Summary(summary_id, first, end, first_version, end_version, "", "")
            for (first, end), (summary_id, first_version, end_version) in model.summaries.items()
            if self.holds(model, end_version)
        )

    def covered(self, model: Session) -> int:
        return summaries_lib.covered_end(self.standing(model))

    def draw_usage(self, data) -> str:
        """Mostly a session id whose record holds usage or a take; now and then any."""
        owing = [
            session_id for session_id, usage in sorted(self.usage.items()) if usage.unbilled or usage.held
        ]
        return data.draw(st.sampled_from(owing * 3 + list(SESSIONS)), label="usage of")

    @rule(data=st.data(), hold=st.booleans(), again=st.sampled_from(["at once", "at once", "later", "no"]))
    def take_usage(self, data, hold: bool, again: str) -> None:
        """A router's take of a session's usage (by id, also of a session
        gone; ``hold``: held until acknowledged): a new take, sent again
        ``at once`` (its reply lost), or the ``later`` one sent again after
        the steps since."""
        session_id = self.draw_usage(data)
        latest = self.usage[session_id].held or self.usage[session_id].take
        if again == "later" and latest is not None:
            self.take(session_id, latest[0], hold)
            return
        self.takes += 1
        self.take(session_id, f"take-{self.takes}", hold)
        if again == "at once":
            self.take(session_id, f"take-{self.takes}", hold)

    def take(self, session_id: str, take_id: str, hold: bool) -> None:
        usage = self.usage[session_id]
        call = (self.store.take_held if hold else self.store.take_unbilled)(self.tenant, session_id, take_id)
        if not usage.exists and session_id not in self.sessions:
            self.missing(call)
            return
        answered = self.run(call)
        answered_id, spends = answered if hold else (take_id, answered)
        taken = {spend.model: list(spend[1:]) for spend in spends}
        if hold and usage.held:
            expected = usage.held
        elif usage.take and usage.take[0] == take_id:
            expected = usage.take
        else:
            expected = (take_id, usage.unbilled)
            usage.unbilled, usage.take = {}, None
            if hold:
                usage.held = expected if expected[1] else None
            else:
                usage.take = expected
        assert (answered_id, taken) == expected
        # The router's ledger bills each take id once: a take answered again
        # must answer what was billed under its id.
        if taken:
            assert usage.billed.setdefault(answered_id, taken) == taken, (answered_id, usage.billed)

    @rule(data=st.data())
    def acknowledge_take(self, data) -> None:
        session_id = self.draw_usage(data)
        usage = self.usage[session_id]
        # Mostly the held take's; now and then another's, which ends no hold.
        held = [usage.held[0]] * 3 if usage.held else []
        take_id = data.draw(st.sampled_from([*held, f"take-{self.takes}"]), label="take id")
        self.run(self.store.acknowledge_take(self.tenant, session_id, take_id))
        if usage.held and usage.held[0] == take_id:
            usage.take, usage.held = usage.held, None

    async def check(self, session_id: str, model: Session | None) -> None:
        await super().check(session_id, model)
        await self.check_usage(session_id, self.usage[session_id])
        if model is None:
            return
        raw = await self.client.hgetall(session_store.key(self.tenant, session_id, "summaries"))
        stored = {}
        for field, value in raw.items():
            summary = summaries_lib.decode(value)
            first, end = map(int, field.decode().split("-"))
            assert (summary.first_turn, summary.end_turn) == (first, end), field
            stored[first, end] = (summary.summary_id, summary.first_version, summary.end_version)
        assert stored == model.summaries
        # A summary that holds now stands for exactly the turns the session
        # holds in its span; one of turns a revert undid, or of another
        # life's or another session's, never holds.
        for (first, end), (summary_id, _, end_version) in model.summaries.items():
            if self.holds(model, end_version):
                digest = summaries_lib.span_digest(model.messages[first:end])
                assert summary_id == summaries_lib.summary_id(first, end, digest), (first, end)
        if not model.blind:
            # Compacted turns have a summary standing for each.
            assert self.covered(model) >= model.compacted
        await self.check_manifest(session_id, model)

    async def check_manifest(self, session_id: str, model: Session) -> None:
        """An assembly leaving every turn out: its manifest marks a turn
        SUMMARIZED only with a summary, sent in the prompt, of exactly the
        span holding it; and every compacted turn whose body is gone gets
        one, unless compact() emptied it with no summary."""
        served = await self.summarizer().summaries_for(
            self.tenant, session_id, model.version, model.created_ms, [(0, len(model.turns))]
        )
        response = context_pb.AssembleContextResponse()
        for index in range(len(model.turns)):
            response.manifest.entries.add(
                source=context_pb.SOURCE_SESSION, index=index, disposition=context_pb.DISPOSITION_DROPPED
            )
        sent = summaries_lib.add_summaries(response, served, [1] * len(served), len(served), 0)
        assert sent == served
        for entry in response.manifest.entries[: len(model.turns)]:
            if entry.disposition == context_pb.DISPOSITION_SUMMARIZED:
                # The summary sent of the span holding the turn, named by its
                # own id (two spans of the same turns have one each).
                (ref,) = [ref for ref in response.inputs.summaries if ref.summary_id == entry.summary_id]
                assert ref.first_turn <= entry.index < ref.end_turn
                span = model.messages[ref.first_turn : ref.end_turn]
                digest = summaries_lib.span_digest(span)
                assert entry.summary_id == summaries_lib.summary_id(ref.first_turn, ref.end_turn, digest)
            elif not model.blind:
                assert model.turns[entry.index] != b"", entry

    async def check_usage(self, session_id: str, usage: Usage) -> None:
        record = await self.client.hgetall(session_store.unbilled_key(self.tenant, session_id))
        assert taken_of(record.get(b"unbilled", b"")) == usage.unbilled
        for field, expected in ((b"unbilled_take", usage.take), (b"unbilled_held", usage.held)):
            take_id, _, taken = record[field].decode().partition(" ") if field in record else ("", "", "")
            assert (take_id, taken_of(taken)) == (expected or ("", {})), field
        assert (b"latest_key" in record) == usage.keyed
        # Every spend counted is billed once or still owed.
        billed: dict[str, list[int]] = {}
        for taken in [*usage.billed.values(), usage.unbilled]:
            for model_name, counts in taken.items():
                added(billed, model_name, counts)
        assert billed == usage.spent


def test_summaries_and_their_usage_keep_what_their_model_keeps(redis_url, monkeypatch) -> None:
    monkeypatch.setattr(session_store, "TURN_IDS_KEPT", TURN_IDS_KEPT)
    SummarizedSessionStoreMachine.redis_url = redis_url
    hunting = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
    examples = int(os.environ.get("MESHGATE_MODEL_EXAMPLES", "30"))
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        SummarizedSessionStoreMachine.runner = runner
        run_state_machine_as_test(
            SummarizedSessionStoreMachine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=50,
                deadline=None,
                derandomize=not hunting,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
