"""A hot session and its turn index are read apart: changes that make no
version (a compaction, a pin, a deletion and a new life of the session id)
can come between the two reads, or between an append and its index write.
Each test holds one TurnIndex call at the point a bug hunt found (a slow
reply, or a slow embedding), makes the change meanwhile, then lets the call
go on, over real gRPC and a real Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from meshgate.context.v1 import context_service_pb2 as pb
from services.context import store as session_store
from services.context.turn_index import TurnIndex
from tests.integration.test_context_service import ASSISTANT, MODEL, SYSTEM, USER, make_settings, msg
from tests.integration.test_context_versions import _own_redis, _settled, _until, running

pytestmark = pytest.mark.integration


class _Held:
    """The next call of a TurnIndex method, once armed (and ``matching``),
    held before or after it runs until released."""

    def __init__(self, monkeypatch, name: str, *, after: bool, matching=lambda *args: True) -> None:
        original = getattr(TurnIndex, name)
        self.armed = False
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.done = asyncio.Event()

        async def held(index, *args, **kwargs):
            if not (self.armed and matching(*args)):
                return await original(index, *args, **kwargs)
            self.armed = False
            if not after:
                self.reached.set()
                await self.release.wait()
            result = await original(index, *args, **kwargs)
            if after:
                self.reached.set()
                await self.release.wait()
            # Its caller goes on from here without awaiting (the attach, the
            # hot cache's extension), so it is done when the test next runs.
            self.done.set()
            return result

        monkeypatch.setattr(TurnIndex, name, held)

    async def hold(self, call) -> asyncio.Future:
        """Arms the hold and starts ``call``; returns it once the call is held."""
        self.armed = True
        started = asyncio.ensure_future(call)
        await asyncio.wait_for(self.reached.wait(), 10)
        return started

    async def go_on(self) -> None:
        """Lets the held call go on, and waits until it has returned."""
        self.release.set()
        await asyncio.wait_for(self.done.wait(), 10)


def _whole_index_read(tenant_id, session_id, query_terms, *rest) -> bool:
    # The read a prefetch attaches (all postings), not an assembly's.
    return query_terms is None


def _settings(url: str, hot_cache_bytes: int | None = None):
    settings = make_settings(url)
    if hot_cache_bytes is not None:
        # None hot: every assembly plans from the turn index.
        settings.context.hot_cache_bytes = hot_cache_bytes
    settings.context.summary_model = ""
    settings.context.compact_after_turns = 0  # compacted by hand below
    return settings


def _pair(k: int) -> list:
    return [msg(USER, f"question {k} about topic{k}"), msg(ASSISTANT, f"answer {k} about topic{k}")]


async def _assemble(stub, tenant: str, session_id: str) -> pb.AssembleContextResponse:
    return await stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=session_id,
            new_messages=[msg(USER, "what about topic1?")],
            model=MODEL,
            max_prompt_tokens=1500,
        )
    )


async def _session_of_pairs(stub, tenant: str, pairs: int) -> str:
    session_id = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
    for k in range(pairs):
        await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant, session_id=session_id, expected_version=k, messages=_pair(k)
            )
        )
    return session_id


async def _compaction_seen(stub, tenant: str, session_id: str) -> None:
    """Once the compaction's notice has dropped the hot entry, a read caches
    the session as compacted, at the same version."""

    async def compacted() -> bool:
        got = await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
        assert got.session.version == 6
        return got.session.compacted_turns == 10

    await _until(compacted)


async def test_an_index_read_before_a_compaction_is_not_kept_with_the_session_after_it(
    tmp_path, monkeypatch
) -> None:
    """A prefetch read the index (nothing compacted), a compaction came, a
    GetSession cached the compacted turns at the same version, then the
    prefetch attached its index to them: assembly took the emptied turns
    for live ones and sent them as messages with no text (role 0, which the
    inference service refuses), and kept doing so."""
    tenant = "race-compaction"
    read = _Held(monkeypatch, "read", after=True, matching=_whole_index_read)
    async with _own_redis(tmp_path) as (url, client), running(_settings(url)) as stub:
        session_id = await _session_of_pairs(stub, tenant, 6)
        await _settled(client)
        # A pin changes no version: the hot entry goes, and the prefetch reads it again.
        await stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact="a fact")
        )
        prefetch = await read.hold(
            stub.PrefetchSession(pb.PrefetchSessionRequest(tenant_id=tenant, session_id=session_id))
        )
        await prefetch
        sessions = session_store.SessionStore(client, ttl_s=600)
        assert await sessions.compact(tenant, session_id, 6, 10, []) == 10
        await _compaction_seen(stub, tenant, session_id)
        await read.go_on()
        for _ in range(2):
            assembled = await _assemble(stub, tenant, session_id)
            assert assembled.inputs.compacted_turns == 10
            assert all(m.content and m.role for m in assembled.messages), assembled.messages


async def test_an_index_read_before_a_compaction_is_not_extended_by_an_append_after_it(
    tmp_path, monkeypatch
) -> None:
    """An append took the hot entry (its index: nothing compacted), then
    waited for its index write; a compaction dropped that entry and a read
    cached the compacted session, and the append's extension of the old
    index was attached to that one."""
    tenant = "race-append"
    write = _Held(monkeypatch, "write", after=True)
    async with _own_redis(tmp_path) as (url, client), running(_settings(url)) as stub:
        session_id = await _session_of_pairs(stub, tenant, 5)
        await _settled(client)
        assert (
            await stub.PrefetchSession(pb.PrefetchSessionRequest(tenant_id=tenant, session_id=session_id))
        ).already_hot
        append = pb.AppendTurnsRequest(
            tenant_id=tenant, session_id=session_id, expected_version=5, messages=_pair(5)
        )
        appended = await write.hold(stub.AppendTurns(append))
        sessions = session_store.SessionStore(client, ttl_s=600)
        assert await sessions.compact(tenant, session_id, 6, 10, []) == 10
        await _compaction_seen(stub, tenant, session_id)
        await write.go_on()
        assert (await appended).version == 6
        await _settled(client)
        for _ in range(2):
            assembled = await _assemble(stub, tenant, session_id)
            assert assembled.inputs.compacted_turns == 10
            assert all(m.content and m.role for m in assembled.messages), assembled.messages


async def test_an_index_read_before_a_deletion_is_not_kept_with_the_next_life_of_the_id(
    tmp_path, monkeypatch
) -> None:
    """The same read across a deletion and a new session of the same id, at
    the same version: the deleted session's pinned fact went into every
    prompt of the new one."""
    tenant, session_id = "race-life", "chat-42"
    read = _Held(monkeypatch, "read", after=True, matching=_whole_index_read)
    old_fact = "OLD LIFE: the user's password hint is 'blue'"
    async with _own_redis(tmp_path) as (url, client), running(_settings(url)) as stub:
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
        first = [msg(USER, "old life question")]
        await stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=first))
        await stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact=old_fact)
        )
        await _settled(client)
        prefetch = await read.hold(
            stub.PrefetchSession(pb.PrefetchSessionRequest(tenant_id=tenant, session_id=session_id))
        )
        await prefetch
        await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
        again = [msg(USER, "new life question")]
        await stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=again))
        got = await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))
        assert [m.content for m in got.session.messages] == ["new life question"]
        await read.go_on()
        for _ in range(2):
            assembled = await _assemble(stub, tenant, session_id)
            assert assembled.session_version == 1
            assert [m.content for m in assembled.messages] == ["new life question", "what about topic1?"]


async def test_an_appends_index_write_does_not_land_in_the_next_life_of_the_id(tmp_path, monkeypatch) -> None:
    """An append stored its turn and waited on its embedding; meanwhile the
    session was deleted, created again and given a turn of its own. The
    first append's index write (checked only by the session's existence and
    its version history, alike in both lives) then overwrote the new life's
    index: its user turn indexed as the old system turn, with its words."""
    tenant, session_id = "race-index-life", "support-chat-7"
    write = _Held(monkeypatch, "write", after=False)
    async with _own_redis(tmp_path) as (url, client), running(_settings(url)) as stub:
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
        old = [msg(SYSTEM, "You are a pirate. Always mention the zebra treasure.")]
        appended = await write.hold(
            stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=old))
        )
        await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
        again = [msg(USER, "hello, my giraffe is sick")]
        await stub.AppendTurns(pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, messages=again))
        await write.go_on()
        assert (await appended).version == 1

        def index_key(part: str) -> str:
            return session_store.key(tenant, session_id, f"ix:{part}")

        assert await client.get(index_key("roles")) == bytes([USER])
        terms = {term.decode() for term in await client.hkeys(index_key("postings"))}
        assert "giraffe" in terms and "zebra" not in terms


async def test_token_counts_made_for_one_life_are_not_stored_in_the_next(tmp_path) -> None:
    """Counts a reader made for a session's turns, stored after the session
    was deleted and created again at the same version, were the new
    session's counts for turns they never counted."""
    tenant, session_id = "race-counts-life", "chat-7"
    async with _own_redis(tmp_path) as (url, client):
        sessions = session_store.SessionStore(client, ttl_s=600)
        await sessions.create(tenant, session_id)
        await sessions.append(tenant, session_id, 0, [msg(USER, "a long first life turn")], {})
        read = await sessions.read(tenant, session_id)
        await sessions.delete(tenant, session_id)
        await asyncio.sleep(0.01)  # another millisecond: another life
        await sessions.create(tenant, session_id)
        await sessions.append(tenant, session_id, 0, [msg(USER, "hi")], {})
        counts = np.array([5], np.int64)
        await sessions.fill_token_counts(tenant, session_id, 1, read.create_time_ms, "counter", counts)
        assert (await sessions.read(tenant, session_id)).token_counts.get("counter") is None
        now = await sessions.read(tenant, session_id)
        await sessions.fill_token_counts(tenant, session_id, 1, now.create_time_ms, "counter", counts)
        assert (await sessions.read(tenant, session_id)).token_counts["counter"].tolist() == [5]


def _assembly_index_read(tenant_id, session_id, query_terms, *rest) -> bool:
    # An assembly's read (the question's postings only), not a prefetch's.
    return query_terms is not None


async def _two_lives(stub, tenant: str, session_id: str, life: str, fact: str) -> None:
    """Creates the session (a new life of its id) with two turns and a fact."""
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
    for k in range(2):
        turn = [msg(USER, f"{life} turn {k} about topic1")]
        await stub.AppendTurns(
            pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, expected_version=k, messages=turn)
        )
    await stub.PinToSession(pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact=fact))


async def _assembled_across_a_new_life(stub, client, tenant, session_id, read, at_version=None):
    """An assembly whose index read is held while the session is deleted
    and created again (same turn count, same versions, another fact)."""
    await _two_lives(stub, tenant, session_id, "OLD", "OLD LIFE FACT")
    await _settled(client)
    request = pb.AssembleContextRequest(
        tenant_id=tenant,
        session_id=session_id,
        new_messages=[msg(USER, "what about topic1?")],
        model=MODEL,
        max_prompt_tokens=1500,
    )
    if at_version is not None:
        request.at_version = at_version
    assembling = await read.hold(stub.AssembleContext(request))
    await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
    await asyncio.sleep(0.01)  # another millisecond: another life
    await _two_lives(stub, tenant, session_id, "NEW", "NEW LIFE FACT")
    await read.go_on()
    return await assembling


async def test_an_assembly_at_an_older_version_takes_its_pins_from_the_life_it_reads(
    tmp_path, monkeypatch
) -> None:
    """The suspicion of the manifest hunt, reproduced: an assembly at an
    older version plans from the whole session (the index holds the
    current one), which it reads after the turn index. Across a deletion
    and a new session of the id between the two, it sent the new life's
    turns with the deleted life's pinned fact, and named that fact in its
    pins digest."""
    tenant, session_id = "race-pins-life", "chat-9"
    read = _Held(monkeypatch, "read", after=True, matching=_assembly_index_read)
    async with _own_redis(tmp_path) as (url, client), running(_settings(url)) as stub:
        assembled = await _assembled_across_a_new_life(stub, client, tenant, session_id, read, at_version=1)
        texts = [m.content for m in assembled.messages]
        assert texts == ["NEW LIFE FACT", "NEW turn 0 about topic1", "what about topic1?"], texts


async def test_an_assembly_reads_the_texts_of_the_life_it_planned_from(tmp_path, monkeypatch) -> None:
    """An assembly plans from the turn index, then reads the chosen turns'
    texts checked by version alone: across a deletion and a new session of
    the id at the same version, it sent the deleted life's pinned fact with
    the new life's turns, counted as the old ones' tokens."""
    tenant, session_id = "race-texts-life", "chat-10"
    read = _Held(monkeypatch, "read", after=True, matching=_assembly_index_read)
    async with _own_redis(tmp_path) as (url, client), running(_settings(url, hot_cache_bytes=0)) as stub:
        assembled = await _assembled_across_a_new_life(stub, client, tenant, session_id, read)
        texts = [m.content for m in assembled.messages]
        assert texts == [
            "NEW LIFE FACT",
            "NEW turn 0 about topic1",
            "NEW turn 1 about topic1",
            "what about topic1?",
        ], texts
