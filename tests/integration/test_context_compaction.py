"""The soft cap over real gRPC, a real Redis and real embeddings: past
context.compact_after_turns, the oldest summarized turns are compacted
(texts, vectors and postings leave Redis), assembly marks them SUMMARIZED
by the summary that stands for them and reads only the live turns, and
what would need their texts is refused with VERSION_COMPACTED."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import numpy as np
import pytest
import redis.asyncio as redis

from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.embedding import Embeddings
from services.context import store as session_store
from services.context.turn_index import TurnIndex, features
from tests.integration.test_context_service import ASSISTANT, MODEL, SYSTEM, USER, failure, make_settings, msg
from tests.integration.test_context_versions import _own_redis, _settled, _until, append, contents, running
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

# Eight appends of two turns: version k holds 2k turns. With spans of 4, a
# hot window of 4 and a cap of 8 (compacting down to half of it), the
# summarizer compacts turns 0-7 when it sees 12 or 14 turns, or 0-11 when it
# first sees 16 (it may skip versions; one that saw 10 compacts 0-3, and a
# later run goes on): either way, the system turn 0 keeps its text.
APPENDS = 8
SUMMARY = "Summary of earlier turns"


def _settings(url: str, inference_address: str):
    settings = make_settings(url)
    settings.context.inference_address = inference_address
    settings.context.summary_model = ""
    settings.context.summary_span_turns = 4
    settings.context.summary_hot_window_turns = 4
    settings.context.compact_after_turns = 8
    return settings


def _pair(k: int) -> list:
    if k == 0:
        return [msg(SYSTEM, "You answer tersely."), msg(USER, "My cat is called zebulon.")]
    return [msg(ASSISTANT, f"Noted, answer number {k}."), msg(USER, f"Topic {k}: the harbour at kestrel{k}.")]


async def test_a_session_past_its_soft_cap_is_compacted_and_stays_consistent(
    tmp_path, inference_address, monkeypatch
) -> None:
    tenant = "compaction"
    # Eight appends: the newest two keep their turn ids whatever is compacted.
    monkeypatch.setattr(session_store, "TURN_IDS_KEPT", 2)
    async with _own_redis(tmp_path) as (url, client), running(_settings(url, inference_address)) as stub:
        session_id = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))).session.session_id
        for k in range(APPENDS):
            await stub.AppendTurns(
                pb.AppendTurnsRequest(
                    tenant_id=tenant,
                    session_id=session_id,
                    expected_version=k,
                    messages=_pair(k),
                    turn_id=f"turn-{k}",
                )
            )
        get = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)

        async def compacted() -> bool:
            return (await stub.GetSession(get)).session.compacted_turns > 0

        await _until(compacted, timeout_s=60)
        await _settled(client)
        session = (await stub.GetSession(get)).session
        compacted_turns = session.compacted_turns
        assert compacted_turns in (8, 12)
        assert session.version == APPENDS
        texts = [m.content for m in session.messages]
        assert texts[0] == "You answer tersely."
        assert texts[1:compacted_turns] == [""] * (compacted_turns - 1)
        live_pairs = range(compacted_turns // 2, APPENDS)
        assert texts[compacted_turns:] == [m.content for k in live_pairs for m in _pair(k)]

        # Their index rows are gone from Redis: vectors for the live turns only,
        # postings naming no compacted turn.
        key = session_store.key(tenant, session_id, "ix:vectors")
        assert await client.strlen(key) == (2 * APPENDS - compacted_turns) * 384
        postings = await client.hgetall(session_store.key(tenant, session_id, "ix:postings"))
        positions = [
            int.from_bytes(value[at : at + 4], "little") >> 4
            for field, value in postings.items()
            if not field.startswith(b"\0")
            for at in range(0, len(value), 4)
        ]
        assert positions and min(positions) >= compacted_turns
        # The turn ids of appends all of whose turns are compacted (and with
        # two newer appends) are gone (they grew with the session's age); a
        # live one's retry is still answered, not appended again.
        turn_ids = await client.hgetall(session_store.key(tenant, session_id, "turn_ids"))
        assert sorted(turn_ids) == [f"turn-{k}".encode() for k in range(compacted_turns // 2, APPENDS)]
        retried = await stub.AppendTurns(
            pb.AppendTurnsRequest(
                tenant_id=tenant,
                session_id=session_id,
                messages=_pair(APPENDS - 1),
                turn_id=f"turn-{APPENDS - 1}",
            )
        )
        assert retried.version == APPENDS
        assert (await stub.GetSession(get)).session.version == APPENDS

        # Assembly: the system turn verbatim, the compacted spans by their
        # summaries, the live turns; a question about a compacted turn's
        # words finds only its summary. It reads the live turns' texts alone.
        lindex_before = (await client.info("commandstats")).get("cmdstat_lindex", {}).get("calls", 0)
        response = await stub.AssembleContext(
            pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id=session_id,
                new_messages=[msg(USER, "What is my cat zebulon called?")],
                model=MODEL,
                max_prompt_tokens=2000,
            )
        )
        lindex = (await client.info("commandstats")).get("cmdstat_lindex", {}).get("calls", 0) - lindex_before
        assert lindex <= 1 + (2 * APPENDS - compacted_turns)
        entries = response.manifest.entries
        assert entries[0].disposition == pb.DISPOSITION_INCLUDED
        summary_ids = {e.summary_id for e in entries if e.source == pb.SOURCE_SUMMARY}
        assert len(summary_ids) == compacted_turns // 4
        for index in range(1, compacted_turns):
            assert entries[index].disposition == pb.DISPOSITION_SUMMARIZED, index
            assert entries[index].summary_id in summary_ids
        for ref in response.inputs.summaries:
            assert ref.end_turn <= compacted_turns
        prompt = [m.content for m in response.messages]
        assert "" not in prompt
        assert prompt[0] == "You answer tersely."
        assert sum(1 for text in prompt if text.startswith(SUMMARY)) == compacted_turns // 4
        live = 2 * APPENDS - compacted_turns
        assert prompt[-(live + 1) :] == [*texts[compacted_turns:], "What is my cat zebulon called?"]

        # What needs the compacted texts is refused, never answered differently.
        at_old = stub.AssembleContext(
            pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id=session_id,
                new_messages=[msg(USER, "again")],
                model=MODEL,
                max_prompt_tokens=2000,
                at_version=3,
            )
        )
        code, reason, metadata = await failure(at_old)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_COMPACTED")
        # The version the last run compacted at, which the cap allowed:
        # version v holds 2v turns, of which the newest half cap (4) stay
        # live, so 8 compacted at version 6 or 7 (a run may see version 6
        # with both spans due), 12 at version 8.
        meta = session_store.key(tenant, session_id, "meta")
        compacted_at = int(await client.hget(meta, "compacted_version"))
        assert int(metadata["compacted_version"]) == compacted_at
        assert (compacted_turns + 4) // 2 <= compacted_at <= APPENDS
        fork = stub.ForkSession(pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=7))
        assert (await failure(fork))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_COMPACTED")
        pin = stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=3)
        )
        assert (await failure(pin))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_COMPACTED")
        # The system turn kept its text: it may be pinned.
        pinned = await stub.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=0)
        )
        assert pinned.pin_count == 1
        into_compacted = stub.RevertSession(
            pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=3, any_version=True)
        )
        refused = await failure(into_compacted)
        assert refused[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_COMPACTED")
        assert (await stub.GetSession(get)).session.version == APPENDS

        # A revert that keeps every compacted turn works: their summaries still stand.
        reverted = await stub.RevertSession(
            pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=7, any_version=True)
        )
        after = await stub.AssembleContext(
            pb.AssembleContextRequest(
                tenant_id=tenant,
                session_id=session_id,
                new_messages=[msg(USER, "and now?")],
                model=MODEL,
                max_prompt_tokens=2000,
            )
        )
        assert after.session_version == reverted.version
        assert [m.content for m in after.messages][-3:] == [m.content for m in _pair(6)] + ["and now?"]
        assert sum(1 for m in after.messages if m.content.startswith(SUMMARY)) == compacted_turns // 4


async def test_compaction_applies_after_appends_but_not_after_a_revert_under_it(redis_url) -> None:
    """The summarizer compacts what it read at some version: appends since
    leave those turns as they were; a revert to fewer of them does not."""
    client = redis.Redis.from_url(redis_url)
    sessions = session_store.SessionStore(client, ttl_s=600)
    tenant, session_id = "compaction-store", uuid.uuid4().hex
    try:
        await sessions.create(tenant, session_id)
        for k in range(4):
            await sessions.append(tenant, session_id, k, _pair(k), {})
        read = await sessions.read(tenant, session_id)
        await sessions.append(tenant, session_id, None, _pair(4), {})
        # Read at 4, now at 5: the first four turns are unchanged.
        assert await sessions.compact(tenant, session_id, read.version, 4, [0]) == 4
        stored = await sessions.read(tenant, session_id)
        assert (stored.version, stored.compacted) == (5, 4)
        assert [t.content for t in stored.turns[:4]] == ["You answer tersely.", "", "", ""]

        # A revert to 6 turns, then other turns appended: what was read at 5 is not what it holds.
        await sessions.revert(tenant, session_id, 3, None)
        await sessions.append(tenant, session_id, None, [msg(USER, "other"), msg(ASSISTANT, "turns")], {})
        assert await sessions.compact(tenant, session_id, 5, 8, []) == -1
        after = await sessions.read(tenant, session_id)
        assert after.compacted == 4
        assert [t.content for t in after.turns[6:]] == ["other", "turns"]
    finally:
        await sessions.delete(tenant, session_id)
        await client.aclose()


async def _session_of(sessions, index, tenant: str, session_id: str, turns: int, compact_to: int) -> None:
    """``turns`` indexed turns (random vectors), the first ``compact_to`` compacted."""
    rng = np.random.default_rng(turns)
    await sessions.create(tenant, session_id)
    for version in range(turns // 2):
        pair = [msg(USER, f"harbour question {version}"), msg(ASSISTANT, f"harbour answer {version}")]
        await sessions.append(tenant, session_id, version, pair, {"counter": [7, 7]})
        vectors = Embeddings(rng.standard_normal((2, 384)).astype(np.float32), "minilm@2")
        await index.write(tenant, session_id, version + 1, features(pair), vectors, created_ms=None)
    assert await sessions.compact(tenant, session_id, turns // 2, compact_to, []) == compact_to


async def test_an_assemblys_index_read_is_bounded_by_the_live_turns_not_the_sessions_age(tmp_path) -> None:
    """Two sessions with the same eight live turns, one five times older:
    what the index read (the only read a planning assembly makes before the
    chosen texts) gets from Redis differs by a few bytes per compacted turn
    (role, term count, token count), not by their vectors and postings."""
    async with _own_redis(tmp_path) as (url, client):
        sessions = session_store.SessionStore(client, ttl_s=0)
        index = TurnIndex(client, ttl_s=0)
        await _session_of(sessions, index, "bounded", "young", 40, 32)
        await _session_of(sessions, index, "bounded", "old", 200, 192)

        async def read_bytes(session_id: str) -> tuple[int, int]:
            before = (await client.info("stats"))["total_net_output_bytes"]
            indexed = await index.read("bounded", session_id, ["harbour", "question"], "counter")
            after = (await client.info("stats"))["total_net_output_bytes"]
            assert indexed.first_live == indexed.count - 8
            assert indexed.unit_vectors.shape == (8, 384)
            assert all(p.min() >> 4 >= indexed.first_live for p in indexed.postings.values())
            return after - before, indexed.count

        young, young_turns = await read_bytes("young")
        old, old_turns = await read_bytes("old")
        compacted_more = old_turns - young_turns
        # 7 bytes a turn stay (role 1, term count 2, token count 4), and the
        # INFO reply's own size may differ by a few digits.
        assert old - young <= 7 * compacted_more + 64
        # Uncompacted, each of those turns would have cost its 384-byte vector at least.
        assert old - young < 384 * compacted_more // 10


async def test_a_compaction_under_the_same_version_changes_the_assembly_id(
    tmp_path, inference_address
) -> None:
    """A compaction makes no new version but takes turns out of the prompt:
    a bug hunt assembled the same session at the same version before and
    after one and got the same assembly_id for two prompts (the planted
    turn INCLUDED, then DROPPED). The inputs now carry compacted_turns.

    A rebuild asked for at that version by number is refused as for any
    version before the compaction (its first assembly held the turns
    verbatim): the index path answered it while the store refused it, so
    the same request was answered or refused by what happened to be cached."""
    tenant = "compaction-id"
    async with _own_redis(tmp_path) as (url, client):
        settings = _settings(url, inference_address)
        settings.context.compact_after_turns = 0  # compacted below, by hand
        async with running(settings) as stub:
            created = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
            session_id = created.session.session_id
            for k in range(APPENDS):
                await stub.AppendTurns(
                    pb.AppendTurnsRequest(
                        tenant_id=tenant, session_id=session_id, expected_version=k, messages=_pair(k)
                    )
                )

            async def assemble(**at) -> pb.AssembleContextResponse:
                return await stub.AssembleContext(
                    pb.AssembleContextRequest(
                        tenant_id=tenant,
                        session_id=session_id,
                        new_messages=[msg(USER, "What is my cat zebulon called?")],
                        model=MODEL,
                        max_prompt_tokens=2000,
                        **at,
                    )
                )

            before = await assemble()
            assert before.inputs.compacted_turns == 0
            store = session_store.SessionStore(client, settings.context.session_ttl_s)
            assert await store.compact(tenant, session_id, APPENDS, 8, [0]) == 8
            await _settled(client)

            async def compacted_seen() -> bool:
                return (await assemble()).inputs.compacted_turns == 8

            await _until(compacted_seen, timeout_s=30)
            after = await assemble()
            assert after.session_version == before.session_version == APPENDS
            assert after.assembly_id != before.assembly_id
            code, reason, metadata = await failure(assemble(at_version=APPENDS))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_COMPACTED")
            assert metadata["compacted_version"] == str(APPENDS)


async def test_a_session_at_its_cap_whose_run_a_restart_cut_short_is_compacted_once_an_append_is_refused(
    redis_url, inference_address, tenant
) -> None:
    """Only an append that succeeds starts the summarizer. The service
    stopped while the run after the append that filled the session waited on
    its model: after the restart every append was refused SESSION_FULL, and a
    refusal started a run only for a session past its cap, not at it, so
    nothing ever compacted it and it stayed full for good."""
    host, port = inference_address.rsplit(":", 1)
    assert host == "127.0.0.1"
    model_link = TcpProxy(int(port))
    # The model never answers: the run is still in its model call at the stop.
    model_link.hold()
    hung = _settings(redis_url, f"127.0.0.1:{await model_link.start()}")
    hung.context.summary_model = "tiny-gpt"
    hung.context.max_turns = 12
    turns = [_pair(k)[i] for k in range(6) for i in range(2)]
    try:
        async with running(hung) as stub:
            session_id = (
                await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant))
            ).session.session_id
            request = pb.AppendTurnsRequest(tenant_id=tenant, session_id=session_id, any_version=True)
            request.messages.extend(turns)
            await stub.AppendTurns(request)
            await asyncio.sleep(0.5)
    finally:
        await model_link.close()

    restarted = _settings(redis_url, inference_address)
    restarted.context.max_turns = 12
    async with running(restarted) as stub:
        code, reason, metadata = await failure(append(stub, tenant, session_id, "one more", "and its answer"))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
        assert (metadata["unit"], metadata["turns"], metadata["limit"]) == ("turns", "12", "12")
        get = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)

        async def compacted() -> bool:
            return (await stub.GetSession(get)).session.compacted_turns > 0

        await _until(compacted, timeout_s=15)
        assert await append(stub, tenant, session_id, "one more", "and its answer") == 2
        _, texts = await contents(stub, tenant, session_id)
        # Nothing stored was lost: the system turn and the live ones keep their texts.
        assert texts[0] == turns[0].content
        assert texts[8:] == [t.content for t in turns[8:]] + ["one more", "and its answer"]
