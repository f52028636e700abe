"""The context service's durable side over real gRPC and a real Redis:
fork and revert, assembly at a version and its inputs, the turn cap, and
the hot cache whose prefetch leaves the next assembly nothing to read."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib

import grpc
import pytest
import redis.asyncio as redis

from meshgate.context.v1 import context_service_pb2 as pb
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.context import relevance
from tests.integration.test_context_service import (
    ASSISTANT,
    MODEL,
    USER,
    failure,
    make_settings,
    msg,
    new_session,
    running,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stub(redis_url: str):
    async with running(make_settings(redis_url)) as stub:
        yield stub


async def append(stub, tenant: str, session_id: str, *contents: str, version: int | None = None) -> int:
    request = pb.AppendTurnsRequest(
        tenant_id=tenant,
        session_id=session_id,
        messages=[msg(USER if i % 2 == 0 else ASSISTANT, c) for i, c in enumerate(contents)],
    )
    if version is None:
        request.any_version = True
    else:
        request.expected_version = version
    return (await stub.AppendTurns(request)).version


async def contents(stub, tenant: str, session_id: str) -> tuple[int, list[str]]:
    session = (await stub.GetSession(pb.GetSessionRequest(tenant_id=tenant, session_id=session_id))).session
    return session.version, [m.content for m in session.messages]


async def assemble(stub, tenant: str, session_id: str, **fields) -> pb.AssembleContextResponse:
    fields.setdefault("max_prompt_tokens", 400)
    return await stub.AssembleContext(
        pb.AssembleContextRequest(
            tenant_id=tenant,
            session_id=session_id,
            new_messages=[msg(USER, "and now?")],
            model=MODEL,
            **fields,
        )
    )


# --- fork and revert ----------------------------------------------------------


async def test_fork_takes_the_turns_of_a_version_and_leaves_the_source(stub, tenant) -> None:
    source = await new_session(stub, tenant)
    for i in range(3):
        await append(stub, tenant, source, f"q{i}", f"a{i}")
    fork = await stub.ForkSession(
        pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=2, new_session_id="forked")
    )
    assert fork.session.session_id == "forked" and fork.session.version == 2
    assert await contents(stub, tenant, "forked") == (2, ["q0", "a0", "q1", "a1"])
    assert await contents(stub, tenant, source) == (3, ["q0", "a0", "q1", "a1", "q2", "a2"])
    # The fork goes on from its version, and its history names the same turns.
    assert await append(stub, tenant, "forked", "other", version=2) == 3
    at_one = await assemble(stub, tenant, "forked", at_version=1)
    assert [m.content for m in at_one.messages] == ["q0", "a0", "and now?"]
    # Version 0 forks an empty session.
    empty = await stub.ForkSession(pb.ForkSessionRequest(tenant_id=tenant, session_id=source, version=0))
    assert await contents(stub, tenant, empty.session.session_id) == (0, [])


async def test_a_fork_takes_the_sources_facts_and_its_pins_of_the_turns_it_holds(stub, tenant) -> None:
    """A fork dropped every pin: a fact the user pinned was gone from the
    fork's prompts, with nothing saying so."""
    source = await new_session(stub, tenant)
    for i in range(3):
        await append(stub, tenant, source, f"q{i}", f"a{i}")
    here = {"tenant_id": tenant, "session_id": source}
    for pin in (
        pb.PinToSessionRequest(**here, message_index=5),
        pb.PinToSessionRequest(**here, fact="FACT"),
        pb.PinToSessionRequest(**here, message_index=1),
    ):
        await stub.PinToSession(pin)
    await stub.ForkSession(pb.ForkSessionRequest(**here, version=2, new_session_id="pinned-fork"))
    prompt = [m.content for m in (await assemble(stub, tenant, "pinned-fork")).messages]
    assert "FACT" in prompt and "a0" in prompt and "a2" not in prompt
    fork = {"tenant_id": tenant, "session_id": "pinned-fork"}
    # Turn 5 is not the fork's: its pin stayed behind; the others came, once.
    behind = stub.UnpinFromSession(pb.UnpinFromSessionRequest(**fork, message_index=5))
    code, reason, _ = await failure(behind)
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PIN_NOT_FOUND")
    assert (await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**fork, fact="FACT"))).pin_count == 1
    assert (await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**fork, message_index=1))).pin_count == 0
    # The source keeps its three.
    assert (await stub.UnpinFromSession(pb.UnpinFromSessionRequest(**here, fact="FACT"))).pin_count == 2


async def test_a_pin_with_an_expected_version_is_refused_once_the_session_moved_on(stub, tenant) -> None:
    """The caller read message 2 ("q1") at version 2 and pins it; a revert
    and another turn since put "other" there. Unguarded, the pin took
    "other", which every later prompt then carried. With the version it
    read, ABORTED VERSION_CONFLICT, nothing pinned; at the session's
    version it pins, and a resend is answered as pins are."""
    session_id = await new_session(stub, tenant)
    here = {"tenant_id": tenant, "session_id": session_id}
    await append(stub, tenant, session_id, "q0", "a0")
    read_at = await append(stub, tenant, session_id, "q1", "a1")
    await stub.RevertSession(pb.RevertSessionRequest(**here, version=1, any_version=True))
    now = await append(stub, tenant, session_id, "other", "answer")
    for stale in (
        pb.PinToSessionRequest(**here, message_index=2, expected_version=read_at),
        pb.PinToSessionRequest(**here, fact="FACT", expected_version=read_at),
    ):
        code, reason, metadata = await failure(stub.PinToSession(stale))
        assert (code, reason, metadata["current_version"]) == (
            grpc.StatusCode.ABORTED,
            "VERSION_CONFLICT",
            str(now),
        )
    session = (await stub.GetSession(pb.GetSessionRequest(**here))).session
    assert (list(session.pinned_turns), list(session.pinned_facts)) == ([], [])
    negative = pb.PinToSessionRequest(**here, message_index=2, expected_version=-1)
    code, reason, _ = await failure(stub.PinToSession(negative))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION")
    current = pb.PinToSessionRequest(**here, message_index=2, expected_version=now)
    assert (await stub.PinToSession(current)).pin_count == 1
    assert (await stub.PinToSession(current)).pin_count == 1
    assert (await stub.PinToSession(pb.PinToSessionRequest(**here, fact="FACT"))).pin_count == 2


async def test_revert_is_a_new_version_and_undone_versions_are_gone(stub, tenant) -> None:
    session_id = await new_session(stub, tenant)
    for i in range(3):
        await append(stub, tenant, session_id, f"q{i}", f"a{i}", version=i)
    reverted = await stub.RevertSession(
        pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=1, expected_version=3)
    )
    assert reverted.version == 4
    assert await contents(stub, tenant, session_id) == (4, ["q0", "a0"])
    # A writer that still holds version 3 is refused, not applied to other turns.
    stale = stub.AppendTurns(
        pb.AppendTurnsRequest(
            tenant_id=tenant, session_id=session_id, expected_version=3, messages=[msg(USER, "late")]
        )
    )
    code, reason, metadata = await failure(stale)
    assert (code, reason, metadata["current_version"]) == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT", "4")
    # Versions 2 and 3 named turns that are gone; 1 and 4 remain readable.
    for version in (2, 3, 9):
        code, reason, metadata = await failure(assemble(stub, tenant, session_id, at_version=version))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
        assert metadata["version"] == str(version)
        fork = stub.ForkSession(
            pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=version)
        )
        assert (await failure(fork))[:2] == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")
    assert [m.content for m in (await assemble(stub, tenant, session_id, at_version=1)).messages][:2] == [
        "q0",
        "a0",
    ]
    assert await append(stub, tenant, session_id, "q1'", version=4) == 5
    assert await contents(stub, tenant, session_id) == (5, ["q0", "a0", "q1'"])


async def test_a_retried_append_that_a_revert_undid_applies_again(stub, tenant) -> None:
    session_id = await new_session(stub, tenant)
    request = pb.AppendTurnsRequest(
        tenant_id=tenant, session_id=session_id, any_version=True, turn_id="t-1", messages=[msg(USER, "hi")]
    )
    assert (await stub.AppendTurns(request)).version == 1
    await stub.RevertSession(
        pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, any_version=True)
    )
    again = await stub.AppendTurns(request)
    assert (again.version, again.replayed) == (3, False)
    assert await contents(stub, tenant, session_id) == (3, ["hi"])


async def test_revert_and_fork_refuse_bad_input_and_keep_what_is_stored(stub, tenant) -> None:
    session_id = await new_session(stub, tenant)
    await append(stub, tenant, session_id, "q0", "a0")
    calls = {
        "INVALID_VERSION": [
            stub.RevertSession(pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=-1)),
            stub.ForkSession(pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=-1)),
            assemble(stub, tenant, session_id, at_version=-1),
        ],
        "VERSION_NOT_FOUND": [
            stub.RevertSession(
                pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=5, any_version=True)
            ),
            stub.ForkSession(pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, version=2)),
        ],
        "VERSION_CONFLICT": [
            stub.RevertSession(
                pb.RevertSessionRequest(
                    tenant_id=tenant, session_id=session_id, version=0, expected_version=0
                )
            )
        ],
        "SESSION_NOT_FOUND": [
            stub.RevertSession(
                pb.RevertSessionRequest(tenant_id=tenant, session_id="nope", any_version=True)
            ),
            stub.ForkSession(pb.ForkSessionRequest(tenant_id=f"{tenant}-x", session_id=session_id)),
        ],
        "SESSION_EXISTS": [
            stub.ForkSession(
                pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, new_session_id=session_id)
            )
        ],
        "INVALID_SESSION_ID": [
            stub.ForkSession(
                pb.ForkSessionRequest(tenant_id=tenant, session_id=session_id, new_session_id="a b")
            )
        ],
    }
    for reason, failing in calls.items():
        for call in failing:
            assert (await failure(call))[1] == reason
    assert await contents(stub, tenant, session_id) == (1, ["q0", "a0"])


async def test_revert_and_appends_racing_keep_versions_consistent(stub, tenant) -> None:
    """Writers append while others revert: every version stays readable or
    cleanly gone, every readable version's turns are a prefix of what some
    writer saw, and the final turns are exactly the history's last length."""
    session_id = await new_session(stub, tenant)
    await append(stub, tenant, session_id, "base")

    async def writer(name: str) -> None:
        for i in range(15):
            await append(stub, tenant, session_id, f"{name}-{i}")

    async def reverter() -> None:
        for _ in range(6):
            await stub.RevertSession(
                pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=1, any_version=True)
            )
            await asyncio.sleep(0.01)

    await asyncio.gather(writer("a"), writer("b"), reverter())
    final_version, final = await contents(stub, tenant, session_id)
    assert final_version == 1 + 30 + 6
    assert final[0] == "base"
    # Each writer's own turns keep their order.
    for name in ("a", "b"):
        mine = [int(c.split("-")[1]) for c in final if c.startswith(f"{name}-")]
        assert mine == sorted(mine)
    readable = 0
    for version in range(final_version + 1):
        try:
            at = await assemble(stub, tenant, session_id, at_version=version)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            continue
        readable += 1
        assert at.session_version == version
        turns = [m.content for m in at.messages][:-1]
        assert turns[:1] == ["base"] or version == 0
    assert readable >= 3
    # The current version is always readable, at its number, with its turns.
    latest = await assemble(stub, tenant, session_id, at_version=final_version)
    assert [m.content for m in latest.messages][:-1] == final


# --- reproducible assembly ----------------------------------------------------


async def test_assembly_inputs_rebuild_the_same_prompt(stub, tenant, monkeypatch) -> None:
    session_id = await new_session(stub, tenant)
    await append(stub, tenant, session_id, "q0", "a0", version=0)
    first = await assemble(stub, tenant, session_id)
    inputs = first.inputs
    assert (inputs.session_id, inputs.session_version, inputs.model) == (session_id, 1, MODEL)
    assert inputs.max_prompt_tokens == 400 and inputs.tokenizer == first.manifest.tokenizer
    # Adaptive, scored by this ranking, from the words alone: no inference service answers here.
    assert inputs.strategy == "adaptive" and inputs.ranking == relevance.RANKING
    assert not inputs.dense_scored
    assert first.assembly_id == hashlib.sha256(inputs.SerializeToString(deterministic=True)).hexdigest()
    await append(stub, tenant, session_id, "q1", "a1", version=1)
    rebuilt = await assemble(stub, tenant, session_id, at_version=inputs.session_version)
    assert rebuilt.messages == first.messages and rebuilt.manifest == first.manifest
    assert rebuilt.assembly_id == first.assembly_id
    now = await assemble(stub, tenant, session_id)
    assert now.assembly_id != first.assembly_id and now.inputs.session_version == 2
    # A service that scores turns otherwise names another ranking: a rebuild
    # at the same version is not passed off as the same assembly.
    monkeypatch.setattr(relevance, "RANKING", "another-ranking")
    rescored = await assemble(stub, tenant, session_id, at_version=inputs.session_version)
    assert rescored.inputs.ranking == "another-ranking"
    assert rescored.assembly_id != first.assembly_id


async def test_two_lives_of_a_session_id_never_share_an_assembly_id(stub, tenant) -> None:
    """Deleted and made again under its id, a session counts its versions
    from 0 again: the second life's prompt at version 1 differs from the
    first's, and so must its id (a review: the same id, and a rebuild of
    the first life's inputs gave the second life's prompt under it)."""
    session_id = f"named-{tenant}"
    lives = []
    for place in ("Lisbon", "Oslo"):
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
        await append(stub, tenant, session_id, f"The crate went to {place}.", version=0)
        lives.append(await assemble(stub, tenant, session_id))
        await stub.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
    first, second = lives
    assert first.inputs.session_version == second.inputs.session_version == 1
    assert first.messages != second.messages
    assert first.inputs.session_create_time_ms != second.inputs.session_create_time_ms
    assert first.assembly_id != second.assembly_id


async def test_the_recency_floor_is_one_of_an_adaptive_assemblys_inputs(redis_url, stub, tenant) -> None:
    """Replicas (or a restart) with another context.recency_floor_turns keep
    other turns: the same request gave the same id for different prompts."""
    session_id = await new_session(stub, tenant)
    await append(stub, tenant, session_id, *(f"turn {i} about crate {100 + i}" for i in range(12)))
    request = {"max_prompt_tokens": 160}
    floored = await assemble(stub, tenant, session_id, **request)
    assert floored.inputs.recency_floor_turns == 2  # the default
    settings = make_settings(redis_url)
    settings.context.recency_floor_turns = 6
    async with running(settings) as other:
        deeper = await assemble(other, tenant, session_id, **request)
    assert deeper.inputs.recency_floor_turns == 6
    assert deeper.assembly_id != floored.assembly_id
    newest = await assemble(stub, tenant, session_id, strategy=pb.ASSEMBLY_STRATEGY_NEWEST, **request)
    assert newest.inputs.recency_floor_turns == 0


async def test_the_models_window_and_prompt_counter_are_among_an_assemblys_inputs(
    redis_url, stub, tenant
) -> None:
    """A review's finding: the budget used is the smaller of the request's
    and the model's window, and the prompt is rendered and counted with the
    model's tokenizer and chat template, but neither was an input: replicas
    with another window (or template) gave the same assembly_id for prompts
    of 41 and 14 messages."""
    session_id = await new_session(stub, tenant)
    await append(stub, tenant, session_id, *(f"turn {i} about crate {100 + i}" for i in range(40)))
    request = {"max_prompt_tokens": 8192}
    wide = await assemble(stub, tenant, session_id, **request)
    settings = make_settings(redis_url)
    settings.models[MODEL] = dataclasses.replace(settings.models[MODEL], context_window_tokens=160)
    async with running(settings) as other:
        narrow = await assemble(other, tenant, session_id, **request)
    assert (wide.inputs.context_window_tokens, narrow.inputs.context_window_tokens) == (512, 160)
    assert len(narrow.messages) < len(wide.messages)
    assert narrow.assembly_id != wide.assembly_id
    # The same tokenizer and template, the same counter id; set, it names them.
    assert narrow.inputs.counter_id == wide.inputs.counter_id != ""


# --- the turn cap -------------------------------------------------------------


async def test_a_session_at_its_cap_refuses_more_and_keeps_its_turns(redis_url, tenant) -> None:
    settings = make_settings(redis_url)
    settings.context.max_turns = 3
    async with running(settings) as capped:
        session_id = await new_session(capped, tenant)
        await append(capped, tenant, session_id, "q0", "a0")
        code, reason, metadata = await failure(append(capped, tenant, session_id, "q1", "a1"))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL")
        assert metadata["max_turns"] == "3" and metadata["turns"] == "2"
        assert await contents(capped, tenant, session_id) == (1, ["q0", "a0"])
        assert await append(capped, tenant, session_id, "q1") == 2


# --- the hot cache ------------------------------------------------------------

# Commands that read or write session data; PING, INFO and the subscription are not.
_DATA_COMMANDS = (
    *("evalsha", "eval", "hgetall", "hget", "hmget", "lrange", "getrange", "get", "exists", "llen"),
)


async def _data_commands(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in _DATA_COMMANDS)


@contextlib.asynccontextmanager
async def _own_redis(tmp_path):
    """A Redis of this test's alone, so its command counts are this test's."""
    port = free_port()
    process = redis_server.launch(port, tmp_path)
    try:
        redis_server.wait_ready(port)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        try:
            yield url, client
        finally:
            await client.aclose()
    finally:
        process.terminate()
        process.wait(10)


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def _settled(client: redis.Redis, timeout_s: float = 10.0) -> int:
    """The data command count once background reads (a prefetch) are done."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    previous = await _data_commands(client)
    while True:
        await asyncio.sleep(0.1)
        current = await _data_commands(client)
        if current == previous:
            return current
        assert asyncio.get_running_loop().time() < deadline, "Redis never went quiet"
        previous = current


async def _reads_nothing(client: redis.Redis, call) -> bool:
    """Whether ``call()``, awaited once background reads are done, sends
    Redis no data command."""
    before = await _settled(client)
    await call()
    return await _data_commands(client) == before


async def test_after_a_prefetch_assembly_reads_nothing_from_redis(tmp_path, tenant) -> None:
    async with _own_redis(tmp_path) as (url, client), running(make_settings(url)) as stub:
        warm_up = await new_session(stub, tenant)

        # The cache goes live once its subscription is up; wait for that.
        async def live() -> bool:
            await append(stub, tenant, warm_up, "more")
            before = await _settled(client)
            await assemble(stub, tenant, warm_up)
            return await _data_commands(client) == before

        await _until(live)

        # A session this replica never read: its first append prefetches it.
        session_id = await new_session(stub, tenant)
        await append(stub, tenant, session_id, "q0", "a0", version=0)
        before = await _settled(client)
        first = await assemble(stub, tenant, session_id)
        assert await _data_commands(client) == before
        assert [m.content for m in first.messages] == ["q0", "a0", "and now?"]

        # The next append extends the cached entry: again nothing to read.
        version = await append(stub, tenant, session_id, "q1", "a1", version=1)
        before = await _settled(client)
        second = await assemble(stub, tenant, session_id)
        assert await _data_commands(client) == before
        assert second.session_version == version == 2
        assert [m.content for m in second.messages] == ["q0", "a0", "q1", "a1", "and now?"]

        # The count does see reads: an assembly at a past version goes to Redis.
        await assemble(stub, tenant, session_id, at_version=1)
        assert await _data_commands(client) > before


async def test_a_prefetch_request_leaves_the_first_assembly_nothing_to_read(tmp_path, tenant) -> None:
    """What the router asks for when a ChatSession stream opens: a replica
    that never read the session warms it, answering at once."""
    async with (
        _own_redis(tmp_path) as (url, client),
        running(make_settings(url)) as writer,
        running(make_settings(url)) as opener,
    ):
        warm_up = await new_session(writer, tenant)
        await append(writer, tenant, warm_up, "q", "a", version=0)

        async def live() -> bool:
            # Once the opener's cache is live, an assembly it repeats reads nothing.
            await assemble(opener, tenant, warm_up)
            await _settled(client)
            before = await _data_commands(client)
            await assemble(opener, tenant, warm_up)
            return await _data_commands(client) == before

        await _until(live)

        session_id = await new_session(writer, tenant)
        await append(writer, tenant, session_id, "q0", "a0", version=0)
        await append(writer, tenant, session_id, "q1", "a1", version=1)
        prefetch = pb.PrefetchSessionRequest(tenant_id=tenant, session_id=session_id)
        assert not (await opener.PrefetchSession(prefetch)).already_hot
        before = await _settled(client)
        first = await assemble(opener, tenant, session_id)
        assert await _data_commands(client) == before
        assert [m.content for m in first.messages] == ["q0", "a0", "q1", "a1", "and now?"]
        assert (await opener.PrefetchSession(prefetch)).already_hot

        # A session that does not exist is not an error here (the next call that needs it says so).
        missing = pb.PrefetchSessionRequest(tenant_id=tenant, session_id="no-such-session")
        assert not (await opener.PrefetchSession(missing)).already_hot
        bad = opener.PrefetchSession(pb.PrefetchSessionRequest(tenant_id=tenant, session_id="a b"))
        assert (await failure(bad))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SESSION_ID")


async def test_another_replicas_change_reaches_the_cache(tmp_path, tenant) -> None:
    """Two replicas over one Redis: what one appends or reverts, the other's
    next assembly shows, though it had the session cached."""
    async with (
        _own_redis(tmp_path) as (url, client),
        running(make_settings(url)) as one,
        running(make_settings(url)) as two,
    ):
        session_id = await new_session(one, tenant)
        await append(one, tenant, session_id, "q0", "a0", version=0)

        async def cached_by_two() -> bool:
            await assemble(two, tenant, session_id)
            before = await _data_commands(client)
            await assemble(two, tenant, session_id)
            return await _data_commands(client) == before

        await _until(cached_by_two)
        await append(one, tenant, session_id, "q1", version=1)

        async def two_sees(expected: list[str]) -> bool:
            response = await assemble(two, tenant, session_id)
            return [m.content for m in response.messages][:-1] == expected

        await _until(lambda: two_sees(["q0", "a0", "q1"]))
        await one.RevertSession(
            pb.RevertSessionRequest(tenant_id=tenant, session_id=session_id, version=0, any_version=True)
        )
        await _until(lambda: two_sees([]))
        await one.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))

        async def two_sees_it_gone() -> bool:
            try:
                await assemble(two, tenant, session_id)
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.NOT_FOUND
            return False

        await _until(two_sees_it_gone)


@pytest.mark.parametrize("behind", [0, 1], ids=["as-long", "shorter"])
async def test_an_append_never_extends_a_hot_session_of_a_life_deleted_elsewhere(
    tmp_path, tenant, behind
) -> None:
    """A replica whose change notices come late (its subscription held at a
    proxy) holds a session hot; another replica deletes it and creates it
    again under the same id, with turns of its own. The first replica's
    next append landed in the new life, and its hot entry of the old one
    was taken for the version before: where the new life had reached the
    old one's version, the entry was extended with the appended turn, and
    reads there gave the deleted life's turns followed by the new one's
    (GetSession, and the prompt); where it had not, the old life's entry
    stayed, read as the session at the version the append had just made."""
    session_id = "chat-7"
    async with _own_redis(tmp_path) as (url, client):
        proxy = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
        proxy.watch(b"SUBSCRIBE")
        late_url = f"redis://127.0.0.1:{await proxy.start()}/0"
        try:
            async with running(make_settings(late_url)) as late, running(make_settings(url)) as other:
                await late.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
                await append(late, tenant, session_id, "OLD q0", "OLD a0", version=0)

                # Hot on the late replica (once its notices flow): read from memory.
                async def hot() -> bool:
                    await append(late, tenant, session_id, "OLD q", "OLD a")
                    return await _reads_nothing(client, lambda: contents(late, tenant, session_id))

                await _until(hot)
                old_version, _ = await contents(late, tenant, session_id)
                assert old_version >= 2
                assert proxy.hold_watched() == 1  # the late replica's subscription

                await other.DeleteSession(pb.DeleteSessionRequest(tenant_id=tenant, session_id=session_id))
                await asyncio.sleep(0.01)  # another millisecond: another life
                await other.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id))
                # Up to the old life's version, or the one before it.
                new_turns = [f"NEW {k}" for k in range(old_version - behind)]
                for k, turn in enumerate(new_turns):
                    await append(other, tenant, session_id, turn, version=k)
                version = await append(late, tenant, session_id, "NEW last")
                assert version == len(new_turns) + 1

                expected = (version, [*new_turns, "NEW last"])
                assert await contents(other, tenant, session_id) == expected
                assert await contents(late, tenant, session_id) == expected
                prompt = await assemble(late, tenant, session_id)
                assert [m.content for m in prompt.messages] == [*new_turns, "NEW last", "and now?"]
        finally:
            await proxy.close()


async def test_a_replica_whose_subscription_went_silent_stops_serving_its_hot_copy(tmp_path, tenant) -> None:
    """A replica's subscription whose link to Redis goes silent without
    closing (a partition, a Redis host gone without a FIN: the proxy holds
    every reply to it for good) was taken for live for ever: nothing is
    sent on an idle subscription, so nothing failed. Another replica's
    appends were never announced to it, and its hot copy answered the
    session as it was before them (its reads, its prompts), with no bound."""
    async with _own_redis(tmp_path) as (url, client):
        proxy = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]))
        proxy.watch(b"SUBSCRIBE")
        silent_url = f"redis://127.0.0.1:{await proxy.start()}/0"
        try:
            async with running(make_settings(silent_url)) as silent, running(make_settings(url)) as other:
                session_id = await new_session(silent, tenant)

                async def hot() -> bool:
                    await append(silent, tenant, session_id, "q", "a")
                    return await _reads_nothing(client, lambda: contents(silent, tenant, session_id))

                await _until(hot)
                assert proxy.hold_watched() == 1  # the silent replica's subscription
                version = await append(other, tenant, session_id, "LATER")

                async def silent_sees_it() -> bool:
                    seen = await contents(silent, tenant, session_id)
                    return seen == await contents(other, tenant, session_id)

                # Within the listener's bound (PING after 1 s of quiet, lost
                # 3 s after the last word heard) and a reconnect.
                await _until(silent_sees_it, timeout_s=8.0)
                assert (await contents(silent, tenant, session_id))[0] == version
        finally:
            await proxy.close()


async def test_get_session_reads_its_pins_from_memory_while_hot_and_sees_pins_made_elsewhere(
    tmp_path, tenant
) -> None:
    """GetSession answers a session's pins with its turns. A hot session's
    come from memory with them (its read stays without a Redis call); a pin
    another replica makes reaches its reads there as a new version would."""
    async with (
        _own_redis(tmp_path) as (url, client),
        running(make_settings(url)) as reader,
        running(make_settings(url)) as writer,
    ):
        session_id = await new_session(reader, tenant)
        await append(reader, tenant, session_id, "q0", "a0", version=0)
        fact = pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, fact="the cat is Zanzibar")
        await reader.PinToSession(fact)

        async def pins() -> tuple[list[int], list[str]]:
            request = pb.GetSessionRequest(tenant_id=tenant, session_id=session_id)
            session = (await reader.GetSession(request)).session
            return list(session.pinned_turns), list(session.pinned_facts)

        async def hot() -> bool:
            await append(reader, tenant, session_id, "q", "a")
            return await _reads_nothing(client, pins)

        await _until(hot)
        assert await pins() == ([], ["the cat is Zanzibar"])

        await writer.PinToSession(
            pb.PinToSessionRequest(tenant_id=tenant, session_id=session_id, message_index=0)
        )

        async def seen() -> bool:
            return await pins() == ([0], ["the cat is Zanzibar"])

        await _until(seen, timeout_s=5.0)
