"""A session's keys over a real Redis (store.SESSION_PARTS): every script
that changes a live session renews all of them, so its pins, turn index
and summaries never expire while it is in use; creating (or forking into)
a session id clears what an earlier session of that id left; a deletion
removes everything at once; a revert drops the pins of the turns it
undoes; and a turn-index write lost after its append stored is read as no
index until it is made good: in the background, by a read that finds it,
or by the append's retry."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import redis.asyncio as redis

from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.embedding import Embeddings
from meshgate.errors import MeshgateError, unavailable
from meshgate.reasons import Reason
from services.context import servicer as context_servicer
from services.context import store as session_store
from services.context import summaries as summaries_lib
from services.context.turn_index import TurnIndex, features
from tests.integration.test_context_service import (
    ASSISTANT,
    MODEL,
    SYSTEM,
    USER,
    failure,
    make_settings,
    msg,
    running,
)

pytestmark = pytest.mark.integration

TTL_S = 600
# What every key's TTL is cut to before a script runs: as if that much of
# the session's life had passed since its keys were last renewed.
SHORTENED_S = 100


@pytest.fixture
async def client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _parts_of(keys: list[str]) -> set[str]:
    return {k.decode().rpartition("}:")[2] for k in keys}


async def _present(client: redis.Redis, tenant: str, session_id: str) -> set[str]:
    """The parts of the session that exist in Redis, found by scanning its
    hash tag: so a key left outside SESSION_PARTS would be seen too."""
    pattern = session_store.key(tenant, session_id, "*")
    return _parts_of([k async for k in client.scan_iter(match=pattern)])


async def _shorten(client: redis.Redis, tenant: str, session_id: str) -> None:
    for k in session_store.session_keys(tenant, session_id):
        await client.expire(k, SHORTENED_S)


async def _ttls(client: redis.Redis, tenant: str, session_id: str) -> dict[str, int]:
    return {
        part: await client.ttl(session_store.key(tenant, session_id, part))
        for part in session_store.SESSION_PARTS
    }


async def _write_index(index: TurnIndex, tenant, session_id, version, *turns) -> None:
    vectors = Embeddings(np.ones((len(turns), 8), np.float32), "minilm@2")
    assert (
        await index.write(tenant, session_id, version, features(list(turns)), vectors, created_ms=None) >= 0
    )


async def test_every_change_renews_every_key_of_the_session(client, tenant) -> None:
    sessions = session_store.SessionStore(client, TTL_S)
    index = TurnIndex(client, TTL_S)
    sid = "renewed"
    await sessions.create(tenant, sid)
    turns = [msg(USER, "Maria signed for crate 101."), msg(ASSISTANT, "Noted, crate 101.")]
    await sessions.append(tenant, sid, 0, turns, {}, turn_id="first")
    await _write_index(index, tenant, sid, 1, *turns)
    await index.pin(tenant, sid, "f:Crates go to Lisbon.", None)
    await client.hset(session_store.key(tenant, sid, "summaries"), "0-4", "digest")
    # Every part exists, so each check below covers all of them.
    assert await _present(client, tenant, sid) == set(session_store.SESSION_PARTS)

    third = msg(USER, "And crate 102?")

    async def pin() -> None:
        await index.pin(tenant, sid, "t:0", 0)

    changes = {
        "append": lambda: sessions.append(tenant, sid, 1, [third], {}),
        "index write": lambda: _write_index(index, tenant, sid, 2, third),
        "pin": pin,
        # Back to version 1: its turn id stays, so turn_ids does too.
        "revert": lambda: sessions.revert(tenant, sid, 1, 2),
        "compaction": lambda: sessions.compact(tenant, sid, 3, 1, []),
    }
    for name, change in changes.items():
        await _shorten(client, tenant, sid)
        await change()
        ttls = await _ttls(client, tenant, sid)
        assert all(ttl > SHORTENED_S for ttl in ttls.values()), (name, ttls)
    assert int(await client.hget(session_store.key(tenant, sid, "meta"), "compacted")) == 1


async def test_with_no_ttl_every_change_makes_every_key_of_the_session_persistent(client, tenant) -> None:
    """A session written while a TTL was configured, then changed under
    session_ttl_s = 0 (kept forever): every change left the old TTL on its
    keys, so it expired that long after its last write under the old
    setting, mid-conversation (reproduced over gRPC: appended under 2 s,
    appended and pinned under 0, gone 2 s later, its new pins key left
    behind for good)."""
    sid = "kept-forever"
    before = session_store.SessionStore(client, TTL_S)
    await before.create(tenant, sid)
    turns = [msg(USER, "Maria signed for crate 101."), msg(ASSISTANT, "Noted, crate 101.")]
    await before.append(tenant, sid, 0, turns, {}, turn_id="first")
    await _write_index(TurnIndex(client, TTL_S), tenant, sid, 1, *turns)
    await TurnIndex(client, TTL_S).pin(tenant, sid, "f:Crates go to Lisbon.", None)
    await client.hset(session_store.key(tenant, sid, "summaries"), "0-2", "digest")
    assert await _present(client, tenant, sid) == set(session_store.SESSION_PARTS)

    forever = session_store.SessionStore(client, 0)
    index = TurnIndex(client, 0)
    third = msg(USER, "And crate 102?")
    changes = {
        "append": lambda: forever.append(tenant, sid, 1, [third], {}),
        "index write": lambda: _write_index(index, tenant, sid, 2, third),
        "pin": lambda: index.pin(tenant, sid, "t:0", 0),
        "unpin": lambda: index.unpin(tenant, sid, "t:0"),
        "revert": lambda: forever.revert(tenant, sid, 1, 2),
        "compaction": lambda: forever.compact(tenant, sid, 3, 1, []),
    }
    for name, change in changes.items():
        await _shorten(client, tenant, sid)
        await change()
        assert set((await _ttls(client, tenant, sid)).values()) == {-1}, name

    # A summary is kept as long as its session: for good here; and where the
    # session still carries a TTL (no change since the setting's), with that
    # one, not for good once the session is gone.
    summaries = summaries_lib.SummaryStore(client, 0)
    created_ms = (await forever.read(tenant, sid)).create_time_ms
    summary = summaries_lib.Summary("id", 0, 2, 1, 1, "extractive", "Maria signed for crate 101.")
    summaries_key = session_store.key(tenant, sid, "summaries")
    assert await summaries.put(tenant, sid, "digest", summary, created_ms)
    assert await client.ttl(summaries_key) == -1
    await _shorten(client, tenant, sid)
    await client.delete(summaries_key)
    assert await summaries.put(tenant, sid, "digest", summary, created_ms)
    assert 0 < await client.ttl(summaries_key) <= SHORTENED_S


async def test_pins_outlive_seconds_of_appends_past_their_ttl(redis_url, client, tenant) -> None:
    settings = make_settings(redis_url)
    settings.context.session_ttl_s = 3
    async with running(settings) as stub:
        created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
        sid = created.session.session_id
        await _append(stub, tenant, sid, msg(USER, "hello"))
        await stub.PinToSession(pb.PinToSessionRequest(tenant_id=tenant, session_id=sid, fact="PINNED-FACT"))
        # Four seconds of use, past the pin's own TTL: each append renews it.
        for i in range(8):
            await asyncio.sleep(0.5)
            await _append(stub, tenant, sid, msg(USER, f"turn {i}"))
        assert await client.lrange(session_store.key(tenant, sid, "pins"), 0, -1) == [b"f:PINNED-FACT"]
        assert "PINNED-FACT" in await _prompt(stub, tenant, sid)


async def test_a_new_session_or_fork_inherits_nothing_of_an_expired_one(client, tenant) -> None:
    sessions = session_store.SessionStore(client, TTL_S)
    index = TurnIndex(client, TTL_S)
    source = "source"
    await sessions.create(tenant, source)
    await sessions.append(tenant, source, 0, [msg(USER, "fresh turn")], {})
    for sid in ("recreated", "forked-into"):
        await sessions.create(tenant, sid)
        old = msg(USER, "OLD turn")
        await sessions.append(tenant, sid, 0, [old], {}, turn_id="old")
        await _write_index(index, tenant, sid, 1, old)
        await index.pin(tenant, sid, "f:OLD-FACT", None)
        await index.pin(tenant, sid, "t:0", 0)
        await client.hset(session_store.key(tenant, sid, "summaries"), "0-4", "digest")
        # Expired: its meta gone first (keys renewed apart, or a summary
        # written after the session's last change, outlive it).
        await client.delete(session_store.session_key(tenant, sid))

    await sessions.create(tenant, "recreated")
    assert await _present(client, tenant, "recreated") == {"meta", "versions"}
    await sessions.fork(tenant, source, 1, "forked-into")
    assert await _present(client, tenant, "forked-into") == {"meta", "turns", "versions"}
    for sid in ("recreated", "forked-into"):
        indexed = await index.read(tenant, sid, None)
        assert (indexed.pinned_facts, indexed.pinned_turns, len(indexed.roles)) == ([], [], 0)


async def test_deleting_an_expired_session_clears_what_it_left(client, tenant) -> None:
    sessions = session_store.SessionStore(client, TTL_S)
    index = TurnIndex(client, TTL_S)
    await sessions.create(tenant, "expired")
    await index.pin(tenant, "expired", "f:LEFT-FACT", None)
    await client.delete(session_store.session_key(tenant, "expired"))
    with pytest.raises(MeshgateError) as caught:
        await sessions.delete(tenant, "expired")
    assert caught.value.reason == Reason.SESSION_NOT_FOUND
    assert await _present(client, tenant, "expired") == set()


async def test_a_delete_drops_every_key_in_its_one_call_and_a_retry_finds_nothing(
    redis_url, client, tenant
) -> None:
    """DeleteSession made separate calls for the pins and the turn index
    after the store's delete: one failing left them for the next session of
    the id, and the retry answered NOT_FOUND without cleaning. Now the
    store's one script takes them all, and nothing after it calls Redis."""
    async with running(make_settings(redis_url)) as stub:
        sid = "deleted"
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=sid))
        await _append(stub, tenant, sid, msg(USER, "hello"))
        await stub.PinToSession(pb.PinToSessionRequest(tenant_id=tenant, session_id=sid, fact="DELETED-FACT"))
        await client.hset(session_store.key(tenant, sid, "summaries"), "0-4", "digest")
        assert {"pins", "ix:roles", "summaries"} <= await _present(client, tenant, sid)
        request = pb.DeleteSessionRequest(tenant_id=tenant, session_id=sid)
        await stub.DeleteSession(request)
        assert await _present(client, tenant, sid) == set()
        assert (await failure(stub.DeleteSession(request)))[:2] == (
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=sid))
        assert "DELETED-FACT" not in await _prompt(stub, tenant, sid)


async def test_a_revert_drops_the_pins_of_the_turns_it_undoes(stub_and_client, tenant) -> None:
    stub, client = stub_and_client
    filler = " ".join(f"filler{k}" for k in range(60))
    created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
    sid = created.session.session_id
    await _append(stub, tenant, sid, msg(USER, "q0 " + filler), msg(ASSISTANT, "a0 " + filler), version=0)
    await _append(stub, tenant, sid, msg(USER, "PINNED-ORIGINAL " + filler), version=1)
    for pin in (
        pb.PinToSessionRequest(tenant_id=tenant, session_id=sid, message_index=2),
        pb.PinToSessionRequest(tenant_id=tenant, session_id=sid, message_index=0),
        pb.PinToSessionRequest(tenant_id=tenant, session_id=sid, fact="KEPT-FACT"),
    ):
        await stub.PinToSession(pin)
    revert = pb.RevertSessionRequest(tenant_id=tenant, session_id=sid, version=1, expected_version=2)
    await stub.RevertSession(revert)
    # The undone turn's pin goes; the kept turn's and the fact stay, in order.
    assert await client.lrange(session_store.key(tenant, sid, "pins"), 0, -1) == [b"t:0", b"f:KEPT-FACT"]
    await _append(stub, tenant, sid, msg(USER, "UNRELATED-NEW " + filler), version=3)
    response = await _assemble(stub, tenant, sid, budget=200)
    reasons = {e.index: e.reason for e in response.manifest.entries if e.source == pb.SOURCE_SESSION}
    assert reasons[0] == pb.INCLUSION_REASON_PINNED
    assert reasons[2] != pb.INCLUSION_REASON_PINNED


async def test_a_pin_made_twice_is_one_pin_and_one_unpin_removes_it(stub_and_client, tenant) -> None:
    """Pinning what is pinned already (a retry after a lost reply) changes
    nothing. It pushed a second copy: the fact went into every prompt twice,
    and after UnpinFromSession, the way out of a pin, it was still pinned."""
    stub, client = stub_and_client
    created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
    sid = created.session.session_id
    await _append(stub, tenant, sid, msg(USER, "Who signed the lease?"), msg(ASSISTANT, "Ana did."))
    here = {"tenant_id": tenant, "session_id": sid}
    fact = "The lease runs until May."
    for _ in range(2):
        assert (await stub.PinToSession(pb.PinToSessionRequest(**here, fact=fact))).pin_count == 1
    for _ in range(2):
        assert (await stub.PinToSession(pb.PinToSessionRequest(**here, message_index=1))).pin_count == 2
    pins_key = session_store.key(tenant, sid, "pins")
    assert await client.lrange(pins_key, 0, -1) == [b"f:" + fact.encode(), b"t:1"]
    assert [m.content for m in (await _assemble(stub, tenant, sid)).messages].count(fact) == 1
    unpinned = await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**here, fact=fact))
    assert unpinned.pin_count == 1
    assert fact not in [m.content for m in (await _assemble(stub, tenant, sid)).messages]
    # A session pinned twice before pins were kept single loses every copy at once.
    await client.rpush(pins_key, b"t:1")
    unpinned = await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**here, message_index=1))
    assert unpinned.pin_count == 0 and await client.lrange(pins_key, 0, -1) == []
    response = await _assemble(stub, tenant, sid)
    assert all(e.reason != pb.INCLUSION_REASON_PINNED for e in response.manifest.entries)


class _IndexOutage:
    """Turn-index writes fail as a Redis outage would, after their append
    stored the turns: the next ``failing`` of them (None: until ``end``)."""

    def __init__(self, monkeypatch, failing: int | None = 1) -> None:
        self.failing = failing
        self.failed = 0
        original = TurnIndex.write
        outage = self

        async def write(index, *args, **kwargs):
            if outage.failing is None or outage.failed < outage.failing:
                outage.failed += 1
                raise unavailable(Reason.REDIS_UNAVAILABLE, "session store unavailable: injected")
            return await original(index, *args, **kwargs)

        monkeypatch.setattr(TurnIndex, "write", write)
        # The background repair's tries, quickly.
        monkeypatch.setattr(context_servicer, "INDEX_REPAIR_DELAYS_S", (0.01,))

    async def background_tries_spent(self) -> None:
        """Waits until the append's write and its repair's two tries failed."""

        async def spent() -> bool:
            return self.failed >= 3

        await _eventually(spent)

    def end(self) -> None:
        self.failing = 0


async def _eventually(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "not met in time"
        await asyncio.sleep(0.05)


async def _roles(client, tenant: str, sid: str) -> bytes | None:
    return await client.get(session_store.key(tenant, sid, "ix:roles"))


async def _roles_are(client, tenant: str, sid: str, expected: bytes) -> bool:
    return await _roles(client, tenant, sid) == expected


SYSTEM_RULE = msg(SYSTEM, "SYSTEM-RULE: always answer as Bob the pirate.")
LONG = " ".join(f"word{k}" for k in range(200))


async def _system_rule_kept(stub, tenant: str, sid: str) -> bool:
    """Whether a prompt too small for every turn keeps the system turn."""
    response = await _assemble(stub, tenant, sid, budget=120)
    dispositions = {e.disposition for e in response.manifest.entries if e.source == pb.SOURCE_SESSION}
    assert pb.DISPOSITION_DROPPED in dispositions
    return SYSTEM_RULE.content in [m.content for m in response.messages]


async def test_an_append_whose_index_write_is_lost_is_answered_and_indexed_in_the_background(
    stub_and_client, tenant, monkeypatch
) -> None:
    """Answered UNAVAILABLE after its turns were stored, a caller's retry
    without a turn id stored them twice; the index stayed unwritten unless
    a retry came."""
    stub, client = stub_and_client
    sid = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
    outage = _IndexOutage(monkeypatch)
    assert (await _append(stub, tenant, sid, SYSTEM_RULE)).version == 1
    await _eventually(lambda: _roles_are(client, tenant, sid, bytes([SYSTEM])))
    assert outage.failed == 1
    await _append(stub, tenant, sid, msg(USER, "question " + LONG), msg(ASSISTANT, "answer " + LONG))
    indexed = await TurnIndex(client, TTL_S).read(tenant, sid, None)
    assert len(indexed.roles) == indexed.count == 3
    assert await _system_rule_kept(stub, tenant, sid)


async def test_a_lost_index_write_never_retried_is_made_good_after_a_read_finds_it(
    redis_url, client, tenant, monkeypatch
) -> None:
    settings = make_settings(redis_url)
    # How long a read's repair waits for an append in flight to index its turns.
    settings.context.append_embed_timeout_s = 0.05
    async with running(settings) as stub:
        sid = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
        outage = _IndexOutage(monkeypatch, failing=None)
        assert (await _append(stub, tenant, sid, SYSTEM_RULE)).version == 1
        await outage.background_tries_spent()
        outage.end()
        # The next append's index write zero-fills the lost position.
        await _append(stub, tenant, sid, msg(USER, "question " + LONG), msg(ASSISTANT, "answer " + LONG))
        assert await _roles(client, tenant, sid) == bytes([0, USER, ASSISTANT])
        # Covering none but the turns before the lost one: not usable for
        # planning, so the texts are read (the system turn is kept) ...
        indexed = await TurnIndex(client, TTL_S).read(tenant, sid, None)
        assert (len(indexed.roles), indexed.count) == (0, 3)
        assert await _system_rule_kept(stub, tenant, sid)
        # ... and that read asked for the lost write to be made again.
        await _eventually(lambda: _roles_are(client, tenant, sid, bytes([SYSTEM, USER, ASSISTANT])))
        assert await _system_rule_kept(stub, tenant, sid)


async def test_a_repair_a_read_asked_for_in_vain_is_asked_for_again_by_the_next_read(
    redis_url, client, tenant, monkeypatch
) -> None:
    """A read's repair that failed (Redis still away) was noted as asked
    for that turn count: no later read asked again until the session changed."""
    settings = make_settings(redis_url)
    settings.context.append_embed_timeout_s = 0.05
    async with running(settings) as stub:
        sid = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
        outage = _IndexOutage(monkeypatch, failing=None)
        await _append(stub, tenant, sid, SYSTEM_RULE)
        await outage.background_tries_spent()
        await _assemble(stub, tenant, sid)

        async def read_repair_spent() -> bool:
            return outage.failed >= 5

        await _eventually(read_repair_spent)
        outage.end()
        await _assemble(stub, tenant, sid)
        await _eventually(lambda: _roles_are(client, tenant, sid, bytes([SYSTEM])))


async def test_a_stopping_service_ends_its_index_repairs(redis_url, tenant, monkeypatch) -> None:
    """A repair waiting out Redis outlived the service's stop, and would
    have written through a closed client."""

    def repairs() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_name().startswith("turn index repair ")]

    async with running(make_settings(redis_url)) as stub:
        sid = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
        outage = _IndexOutage(monkeypatch, failing=None)
        monkeypatch.setattr(context_servicer, "INDEX_REPAIR_DELAYS_S", (60.0,))
        await _append(stub, tenant, sid, SYSTEM_RULE)

        async def waiting() -> bool:
            return outage.failed >= 2 and bool(repairs())

        await _eventually(waiting)
    assert not repairs()


async def test_a_retried_append_indexes_the_turns_its_first_try_could_not(
    stub_and_client, tenant, monkeypatch
) -> None:
    stub, client = stub_and_client
    sid = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
    outage = _IndexOutage(monkeypatch, failing=None)
    assert not (await _append(stub, tenant, sid, SYSTEM_RULE, turn_id="t0")).replayed
    await outage.background_tries_spent()
    outage.end()
    assert (await _append(stub, tenant, sid, SYSTEM_RULE, turn_id="t0")).replayed
    assert await _roles(client, tenant, sid) == bytes([SYSTEM])
    # A replay of turns indexed already leaves the index as it is (were it
    # rewritten, this retry's other role would show).
    assert (await _append(stub, tenant, sid, msg(USER, "retried"), turn_id="t0")).replayed
    assert await _roles(client, tenant, sid) == bytes([SYSTEM])


async def test_a_revert_drops_the_undone_turns_index_so_a_lost_write_after_it_reads_unwritten(
    stub_and_client, tenant, monkeypatch
) -> None:
    """The undone turns' roles stayed at their positions: the next append's
    lost index write then left those read as indexed (its SYSTEM turn as
    the undone USER's), and its retry saw them written and left them."""
    stub, client = stub_and_client
    sid = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
    await _append(stub, tenant, sid, msg(USER, "hello"), msg(ASSISTANT, "hi"), version=0)
    await _append(stub, tenant, sid, msg(USER, "zebra undone"), msg(USER, "giraffe undone"), version=1)
    revert = pb.RevertSessionRequest(tenant_id=tenant, session_id=sid, version=1, expected_version=2)
    await stub.RevertSession(revert)
    assert await _roles(client, tenant, sid) == bytes([USER, ASSISTANT])
    outage = _IndexOutage(monkeypatch, failing=None)
    await _append(stub, tenant, sid, SYSTEM_RULE, msg(ASSISTANT, "arr"), turn_id="t1")
    await outage.background_tries_spent()
    outage.end()
    indexed = await TurnIndex(client, TTL_S).read(tenant, sid, None)
    assert (len(indexed.roles), indexed.count) == (2, 4)  # the new turns read unwritten
    assert (await _append(stub, tenant, sid, SYSTEM_RULE, msg(ASSISTANT, "arr"), turn_id="t1")).replayed
    assert await _roles(client, tenant, sid) == bytes([USER, ASSISTANT, SYSTEM, ASSISTANT])
    assert "zebra" not in (await TurnIndex(client, TTL_S).read(tenant, sid, ["zebra"])).postings


@pytest.fixture
async def stub_and_client(redis_url: str, client):
    async with running(make_settings(redis_url)) as stub:
        yield stub, client


async def _append(stub, tenant: str, sid: str, *messages, version: int | None = None, turn_id: str = ""):
    request = pb.AppendTurnsRequest(tenant_id=tenant, session_id=sid, messages=messages, turn_id=turn_id)
    if version is None:
        request.any_version = True
    else:
        request.expected_version = version
    return await stub.AppendTurns(request)


async def _assemble(stub, tenant: str, sid: str, budget: int = 300) -> pb.AssembleContextResponse:
    return await stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=sid,
            new_messages=[msg(USER, "Who signed?")],
            model=MODEL,
            max_prompt_tokens=budget,
            strategy=pb.ASSEMBLY_STRATEGY_NEWEST,
        )
    )


async def _prompt(stub, tenant: str, sid: str) -> list[str]:
    return [m.content for m in (await _assemble(stub, tenant, sid)).messages]


async def test_a_fork_takes_the_index_of_the_turns_it_copies_and_no_later_postings(client, tenant) -> None:
    """Without its source's index a fork's index never covered its copied
    turns: every assembly of it read and scored all their texts. With it,
    the fork reads as the source did at that version, and a turn it appends
    where the source has a later one is found by its own words only."""
    sessions = session_store.SessionStore(client, TTL_S)
    index = TurnIndex(client, TTL_S)
    source = "indexed-source"
    await sessions.create(tenant, source)
    copied = [msg(USER, "Maria signed for crate 101 in Lisbon."), msg(ASSISTANT, "Crate 101 is noted.")]
    later = [msg(USER, "Crate 202 went to Porto.")]
    await sessions.append(tenant, source, 0, copied, {})
    await _write_index(index, tenant, source, 1, *copied)
    await sessions.append(tenant, source, 1, later, {})
    await _write_index(index, tenant, source, 2, *later)

    await sessions.fork(tenant, source, 1, "indexed-fork")
    forked = await index.read(tenant, "indexed-fork", None)
    assert (forked.count, list(forked.roles)) == (2, [USER, ASSISTANT])
    assert forked.unit_vectors is not None and len(forked.unit_vectors) == 2
    assert set(forked.postings) >= {"crate", "maria", "lisbon"}
    # The source's later turn (position 2) is not the fork's.
    assert "porto" not in forked.postings
    assert all((forked.postings[t] >> 4 < 2).all() for t in forked.postings)

    own = [msg(USER, "Crate 303 stays in Faro.")]
    await sessions.append(tenant, "indexed-fork", 1, own, {})
    await _write_index(index, tenant, "indexed-fork", 2, *own)
    grown = await index.read(tenant, "indexed-fork", None)
    assert "porto" not in grown.postings and list(grown.postings["faro"] >> 4) == [2]
    assert len(grown.roles) == grown.count == 3
