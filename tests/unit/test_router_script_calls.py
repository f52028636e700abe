"""script_calls over stand-ins for a Redis script: run_scripts runs a
turn's calls (one per cluster slot) each alone, so each failure is its own
reply; the backlog holds writes Redis certainly did not run, runs them
again once, in order, or gives them up; never_ran tells those from writes
that may have run."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis
import structlog
from redis import exceptions as redis_errors

from meshgate import metrics
from services.router.script_calls import (
    STOPPED_BEFORE,
    Backlog,
    Skipped,
    never_ran,
    node_of,
    run_scripts,
    skipped_in,
)


class SlotScript:
    """A script whose call on ``failing_key`` fails with ``error`` (as a
    cluster node whose connect is refused); the others run."""

    def __init__(self, failing_key: str, error: BaseException) -> None:
        self.failing_key, self.error = failing_key, error
        self.ran: list[str] = []

    async def __call__(self, keys: list[str], args: list) -> list:
        await asyncio.sleep(0)
        if keys[0] == self.failing_key:
            raise self.error
        self.ran.append(keys[0])
        return [1]


async def test_each_call_of_several_fails_alone_and_the_others_run():
    """A cluster pipeline raised as a whole when one node's connect was
    refused, after the other nodes may have run theirs (a review's repro:
    a turn over two slots charged 1,300 for a use of 300)."""
    refused = redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connect call failed.")
    script = SlotScript("model", refused)
    calls = [(["tenant"], []), (["model"], []), (["key"], [])]
    replies = await run_scripts(script, calls, raise_on_error=False)
    assert replies[0] == replies[2] == [1] and replies[1] is refused
    assert sorted(script.ran) == ["key", "tenant"]


async def test_a_lone_call_fails_as_several_do():
    refused = redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connect call failed.")
    script = SlotScript("model", refused)
    assert await run_scripts(script, [(["model"], [])], raise_on_error=False) == [refused]
    with pytest.raises(redis_errors.ConnectionError):
        await run_scripts(script, [(["model"], [])])


async def test_with_raise_on_error_a_failed_call_raises_once_all_have_answered():
    script = SlotScript("b", redis_errors.OutOfMemoryError("OOM command not allowed"))
    with pytest.raises(redis_errors.OutOfMemoryError):
        await run_scripts(script, [(["a"], []), (["b"], []), (["c"], [])])
    assert sorted(script.ran) == ["a", "c"]


# --- the backlog of writes Redis did not run -----------------------------------


def _refused() -> Exception:
    """As redis-py fails a connect Redis refuses (restarting): nothing ran."""
    try:
        raise ConnectionRefusedError(111, "Connect call failed")
    except ConnectionRefusedError:
        try:
            raise redis_errors.ConnectionError("Error 111 connecting: Connection refused") from None
        except redis_errors.ConnectionError as error:
            return error


class StoreStandIn:
    """A Redis script that records each call's first key as written unless
    the failure set for that key (or for every call, "*") is raised."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.failures: dict[str, Exception] = {}
        self.tried: list[str] = []

    async def __call__(self, keys: list[str], args: list) -> list:
        self.tried.append(keys[0])
        await asyncio.sleep(0)
        failure = self.failures.get(keys[0]) or self.failures.get("*")
        if failure is not None:
            raise failure
        self.written.append(keys[0])
        return [1]


def _backlog(store: StoreStandIn, clock=None, **bounds) -> Backlog:
    return Backlog(store, "ledger", clock=clock or time.monotonic, delays_s=(0.01,), **bounds)


async def _settled(backlog: Backlog) -> None:
    """Until the backlog holds nothing (bounded: a test must not hang)."""
    for _ in range(500):
        if not len(backlog):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(backlog)} calls still held")


@pytest.mark.parametrize(
    "refusal",
    [
        _refused(),
        redis_errors.OutOfMemoryError("OOM command not allowed"),
        redis_errors.ReadOnlyError("READONLY"),
    ],
    ids=["connect-refused", "oom", "read-only"],
)
async def test_a_call_redis_did_not_run_is_written_once_it_can_be(refusal):
    store = StoreStandIn()
    backlog = _backlog(store)
    store.failures["*"] = refusal
    await backlog.run([(["a"], [1]), (["b"], [2])])
    await backlog.run([(["c"], [3])])
    assert len(backlog) == 3 and store.written == []
    await asyncio.sleep(0.05)
    assert len(backlog) == 3, "a refused retry is held again"
    del store.failures["*"]
    await _settled(backlog)
    # Each once, in the order they failed.
    assert store.written == ["a", "b", "c"]
    await backlog.drain()


async def test_a_run_is_told_once_each_call_is_written_or_given_up():
    """What the turn journal waits on (Ledger.submit's on_written): a turn
    it named stays in it until its record's calls are written."""
    store = StoreStandIn()
    backlog = _backlog(store)
    told: list[tuple[str, bool]] = []
    await backlog.run([(["a"], [])], lambda written: told.append(("a", written)))
    assert told == [("a", True)]
    store.failures["c"] = _refused()
    await backlog.run([(["b"], []), (["c"], [])], lambda written: told.append(("bc", written)))
    assert told == [("a", True)]  # c held: not yet
    del store.failures["c"]
    await _settled(backlog)
    assert told == [("a", True), ("bc", True)]
    # Given up (may have run): told at once, not written.
    store.failures["d"] = redis_errors.TimeoutError("Timeout reading from socket")
    await backlog.run([(["d"], [])], lambda written: told.append(("d", written)))
    assert told[-1] == ("d", False)
    # Held, then given up as the router stops.
    store.failures["e"] = _refused()
    await backlog.run([(["e"], [])], lambda written: told.append(("e", written)))
    await backlog.drain()
    assert told[-1] == ("e", False) and len(told) == 4


@pytest.mark.parametrize(
    "failure",
    [
        redis_errors.TimeoutError("Timeout reading from socket"),
        redis_errors.ConnectionError("Connection closed by server."),
        redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ],
    ids=["timeout", "connection-lost", "script-error"],
)
async def test_a_call_that_may_have_run_is_not_written_again(failure):
    """A timeout, a connection lost after the call was sent, a script that
    failed midway: the call may have written part or all of it, and the
    scripts add, so running it again could count it twice."""
    store = StoreStandIn()
    backlog = _backlog(store)
    store.failures["a"] = failure
    await backlog.run([(["a"], [])])
    assert len(backlog) == 0
    del store.failures["a"]
    await asyncio.sleep(0.05)
    assert store.written == []


async def test_an_idempotent_call_that_may_have_run_is_run_again():
    """A release (admission's _RELEASE) timing out while Redis is still
    stalled: given up, it left a refused turn charged; run twice, it
    releases once, so it is run again until Redis answers."""
    store = StoreStandIn()
    backlog = Backlog(store, "release", delays_s=(0.01,), idempotent=True)
    store.failures["a"] = redis_errors.TimeoutError("Timeout reading from socket")
    await backlog.run([(["a"], [])])
    assert len(backlog) == 1
    await asyncio.sleep(0.05)
    assert len(backlog) == 1, "a retry that timed out again is held again"
    del store.failures["a"]
    await _settled(backlog)
    assert store.written == ["a"]
    await backlog.drain()


class StoppedMidwayStandIn:
    """A once-per-call script (the ledger's, admission's settlements) whose
    first run fails midway, as a WRONGTYPE no type check foresaw: its mark
    stays begun, and each run again replies STOPPED_BEFORE."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, keys: list[str], args: list) -> int:
        self.runs += 1
        await asyncio.sleep(0)
        if self.runs == 1:
            raise redis_errors.ResponseError(
                "WRONGTYPE Operation against a key holding the wrong kind of value script: f_1"
            )
        return STOPPED_BEFORE


def _deferred_writes(outcome: str) -> float:
    return metrics.router().deferred_writes.labels("ledger", outcome)._value.get()


async def test_an_idempotent_call_whose_run_stopped_midway_is_given_up_not_counted_written():
    """A review's finding: a call that failed midway in Redis (not rolled
    back: its mark set, the records after the failure not written) was sent
    again, found its mark and replied 0, which counted it written: every
    record after the failure lost, logged as "held usage writes written".
    Sent again, it now says its run before stopped midway: given up, told
    not written, never sent again."""
    script = StoppedMidwayStandIn()
    backlog = Backlog(script, "ledger", delays_s=(0.01,), idempotent=True)
    told: list[bool] = []
    given_up, written_late = _deferred_writes("given_up"), _deferred_writes("written_late")
    with structlog.testing.capture_logs() as logged:
        await backlog.run([(["a"], [])], told.append)
        assert len(backlog) == 1, "a script error of an idempotent call is sent again: its mark tells"
        await _settled(backlog)
    assert told == [False] and script.runs == 2
    assert _deferred_writes("given_up") == given_up + 1
    assert _deferred_writes("written_late") == written_late
    [line] = [line for line in logged if line["event"] == "usage writes given up"]
    assert "stopped midway" in line["why"] and "WRONGTYPE" in line["why"]
    await asyncio.sleep(0.05)
    assert script.runs == 2
    await backlog.drain()


async def test_what_a_written_call_skipped_is_told_to_its_owner_and_the_call_counts_written():
    """A call that wrote all but a record or turn whose key holds another
    type replies which it skipped: its owner logs and counts them; the call
    is written (not sent again: a run again would skip them again)."""

    async def skipping(keys: list[str], args: list) -> list:
        await asyncio.sleep(0)
        return [1, 2, b"mg:router:usage:{t:broken}:2026-05-01", b"string"]

    skipped: list = []
    backlog = Backlog(
        skipping, "ledger", delays_s=(0.01,), idempotent=True, on_skipped=lambda *call: skipped.append(call)
    )
    told: list[bool] = []
    await backlog.run([(["k"], ["arg"])], told.append)
    assert told == [True] and len(backlog) == 0
    assert skipped == [(["k"], ["arg"], [Skipped(2, "mg:router:usage:{t:broken}:2026-05-01", "string")])]
    assert skipped_in(1) == skipped_in(0) == skipped_in([1]) == []


async def test_of_a_batch_only_the_refused_call_is_held():
    """On a cluster a batch is one call per slot, run at once, each alone:
    the one a node refused is held, the others ran and are not run again
    (a cluster pipeline failing as a whole would not say which ran)."""
    store = StoreStandIn()
    backlog = _backlog(store)
    store.failures["b"] = _refused()
    await backlog.run([(["a"], []), (["b"], []), (["c"], [])])
    assert sorted(store.written) == ["a", "c"] and len(backlog) == 1
    del store.failures["b"]
    await _settled(backlog)
    assert sorted(store.written) == ["a", "b", "c"] and store.written[-1] == "b"


async def test_held_calls_are_given_up_past_their_age_and_past_the_bound_on_memory():
    now = [0.0]
    store = StoreStandIn()
    store.failures["*"] = _refused()
    backlog = _backlog(store, clock=lambda: now[0], max_age_s=60, max_held_chars=32)
    await backlog.run([(["old"], ["x" * 10])])
    now[0] = 30
    await backlog.run([(["newer"], ["y" * 10])])
    assert len(backlog) == 2
    # Over the bound on memory: the oldest goes.
    now[0] = 50
    await backlog.run([(["newest"], ["z" * 10])])
    assert len(backlog) == 2
    now[0] = 95  # "newer" is past its age; "newest" (failed at 50) is not
    for _ in range(500):  # until a round has run at 95 (bounded)
        if len(backlog) < 2:
            break
        await asyncio.sleep(0.01)
    assert len(backlog) == 1
    del store.failures["*"]
    await _settled(backlog)
    assert store.written == ["newest"]


async def test_drain_runs_what_is_held_once_more_then_gives_it_up():
    store = StoreStandIn()
    backlog = Backlog(store, "settlement", delays_s=(3600.0,))
    store.failures["*"] = _refused()
    await backlog.run([(["a"], [])])
    del store.failures["*"]
    await asyncio.wait_for(backlog.drain(), 5)
    assert store.written == ["a"] and len(backlog) == 0
    store.failures["*"] = _refused()
    backlog = Backlog(store, "settlement", delays_s=(3600.0,))
    await backlog.run([(["b"], [])])
    await asyncio.wait_for(backlog.drain(), 5)
    assert store.written == ["a"] and len(backlog) == 0


async def test_drain_tries_what_is_held_again_until_its_deadline():
    """A review's finding: a router stopped while Redis restarted gave up
    its held usage writes 0.1 s into a stop of 10 s, though Redis was back
    at 0.4 s: the turns it had served were never billed. Drained with a
    deadline, what is held is tried again until it is written or the
    deadline passes, then given up."""
    store = StoreStandIn()
    backlog = Backlog(store, "ledger", delays_s=(3600.0,), idempotent=True)
    store.failures["*"] = _refused()
    await backlog.run([(["a"], [])])

    async def redis_back_after(seconds: float) -> None:
        await asyncio.sleep(seconds)
        del store.failures["*"]

    back = asyncio.ensure_future(redis_back_after(0.6))
    await asyncio.wait_for(backlog.drain(until=time.monotonic() + 5), 10)
    await back
    assert store.written == ["a"] and len(backlog) == 0

    # Still refused at the deadline: given up then, not before.
    backlog = Backlog(store, "ledger", delays_s=(3600.0,), idempotent=True)
    store.failures["*"] = _refused()
    await backlog.run([(["b"], [])])
    began = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(backlog.drain(until=began + 0.8), 10)
    assert time.monotonic() - began >= 0.8
    assert store.written == ["a"] and len(backlog) == 0
    assert [e["why"] for e in logs if e["event"] == "usage writes given up"] == ["the router stopped"]


@pytest.mark.parametrize(
    ("error", "ran"),
    [
        # redis-py's words for a connect that failed: nothing was sent.
        (redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connect call failed."), False),
        (redis_errors.ConnectionError("Error -2 connecting to redis:6379. Name not known."), False),
        (redis_errors.TimeoutError("Timeout connecting to server"), False),
        (redis_errors.OutOfMemoryError("OOM command not allowed"), False),
        (redis_errors.BusyLoadingError("LOADING Redis is loading the dataset in memory"), False),
        # Sent, and then: the reply lost, or the script failed midway.
        (redis_errors.TimeoutError("Timeout reading from socket"), True),
        (redis_errors.ConnectionError("Connection closed by server."), True),
        (redis_errors.ConnectionError("Error while reading from 127.0.0.1:6379 : (104, 'reset')"), True),
        (redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), True),
    ],
)
def test_never_ran_only_where_nothing_was_sent_or_redis_refused_it(error, ran):
    assert never_ran(error) is not ran


def test_a_refused_connect_found_through_a_stale_pooled_connection_never_ran():
    """The chain redis-py 8 gives when a pooled connection is found closed
    and connecting anew is refused: the socket error is not in it."""
    try:
        try:
            raise redis_errors.ConnectionError("Connection has data") from None
        except redis_errors.ConnectionError:
            # Implicitly chained, as redis-py raises it.
            raise redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connect call failed.")  # noqa: B904
    except redis_errors.ConnectionError as error:
        assert never_ran(error)


async def test_held_calls_stay_held_while_redis_still_refuses_them():
    """Held calls retried while Redis still refuses them stay held (a first
    version retried them in one pipeline, whose failure as a whole read as
    'may have run', and gave them all up at the first round Redis was still
    down)."""
    store = StoreStandIn()
    backlog = _backlog(store)
    store.failures["*"] = _refused()
    for key in "abc":
        await backlog.run([([key], [])])
    await asyncio.sleep(0.1)  # several rounds, each refused
    assert len(backlog) == 3
    store.failures.clear()
    await _settled(backlog)
    assert store.written == ["a", "b", "c"]


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ConnectionError("No connection available."),
        redis_errors.MaxConnectionsError("Too many connections"),
        redis_errors.RedisClusterException("Redis Cluster cannot be connected. Please provide one node"),
        redis_errors.RedisClusterException("All slots are not covered after query all startup_nodes."),
        redis_errors.ClusterError("TTL exhausted."),
    ],
    ids=["pool-wait", "cluster-pool", "no-node", "slots-uncovered", "redirected-out"],
)
def test_failures_before_anything_was_sent_never_ran(error):
    assert never_ran(error)


async def test_a_round_tries_no_more_calls_of_a_node_still_down_and_goes_on_with_the_others():
    """A cluster shard still down held back every call after its first one,
    those of shards already back included, until it came back or they aged
    out; and a round tries a node that refuses once, not once per call."""
    store = StoreStandIn()
    # The node is the key's letter, the slot the key: "a1" and "a2" on node a.
    backlog = Backlog(store, "ledger", delays_s=(0.01,), node=lambda keys: (keys[0][0], hash(keys[0])))
    store.failures["*"] = _refused()
    await backlog.run([(["a1"], []), (["b1"], []), (["a2"], []), (["b2"], [])])
    assert len(backlog) == 4
    del store.failures["*"]
    store.failures["a1"] = store.failures["a2"] = _refused()
    store.tried.clear()
    for _ in range(500):
        if store.written == ["b1", "b2"]:
            break
        await asyncio.sleep(0.01)
    assert store.written == ["b1", "b2"] and len(backlog) == 2
    # Every round since: a1 once, never a2 behind it.
    assert "a2" not in store.tried and store.tried.count("a1") >= 1
    store.failures.clear()
    await _settled(backlog)
    assert store.written == ["b1", "b2", "a1", "a2"]


async def test_a_slot_refused_keeps_its_later_calls_behind_it_when_a_failover_moves_it():
    """A review: the round remembered only the refusing node's name, and a
    failover that moved the slot (the client's map refreshed by another
    call) let a later call of the same slot be written before the refused
    one: the ledger's stream out of order."""
    store = StoreStandIn()
    where = {"a1": ("old-master", 7), "b1": ("other", 9), "a2": ("old-master", 7)}

    def node(keys):
        return where[keys[0]]

    backlog = Backlog(store, "ledger", delays_s=(0.01,), node=node)
    store.failures["*"] = _refused()
    await backlog.run([(["a1"], []), (["b1"], []), (["a2"], [])])
    del store.failures["*"]
    store.failures["a1"] = _refused()
    store.tried.clear()
    # Slot 7 now on the promoted replica, as the refreshed map says.
    where["a2"] = ("new-master", 7)
    for _ in range(500):
        if store.written == ["b1"] and store.tried.count("a1") >= 2:
            break
        await asyncio.sleep(0.01)
    assert store.written == ["b1"] and "a2" not in store.tried
    store.failures.clear()
    await _settled(backlog)
    assert store.written == ["b1", "a1", "a2"]


async def test_a_call_skipped_for_its_node_holds_its_slot_too():
    """A review: only a refused call's slot was held, so a call skipped for
    its node (X down) let a later call of its slot through once the slot had
    moved to a node that answers, written before it."""
    where = {"A": ("X", 7), "B": ("X", 8), "D": ("Z", 9), "C": ("X", 8)}

    class MovesSlot8(StoreStandIn):
        armed = False

        async def __call__(self, keys, args):
            if self.armed and keys[0] == "D":
                where["C"] = where["B"] = ("Y", 8)  # a failover, seen by the client now
            return await super().__call__(keys, args)

    store = MovesSlot8()
    backlog = Backlog(store, "ledger", delays_s=(0.01,), node=lambda keys: where[keys[0]])
    store.failures["*"] = _refused()
    await backlog.run([(["A"], []), (["B"], []), (["D"], []), (["C"], [])])
    del store.failures["*"]
    store.failures["A"] = _refused()
    store.armed = True
    for _ in range(500):
        if "D" in store.written:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # more rounds: A still refused
    # The round that wrote D skipped B (node X down) and so held slot 8: C
    # waited for B, which the next round wrote, now on Y.
    assert store.written[0] == "D"
    assert store.written.index("B") < store.written.index("C") if "C" in store.written else True
    store.failures.clear()
    await _settled(backlog)
    assert store.written.index("B") < store.written.index("C")
    assert sorted(store.written) == ["A", "B", "C", "D"]


async def test_a_failure_of_the_whole_cluster_ends_the_round():
    """A review: a router that never reached the cluster named every call
    by its own slot, so a round made one slow attempt per held call."""
    store = StoreStandIn()
    backlog = Backlog(store, "ledger", delays_s=(0.01,), node=lambda keys: (keys[0], hash(keys[0])))
    store.failures["*"] = redis_errors.RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least one reachable node"
    )
    await backlog.run([([key], []) for key in ("k1", "k2", "k3", "k4")])
    store.tried.clear()
    for _ in range(500):  # until three rounds have run (bounded)
        if len(store.tried) >= 3:
            break
        await asyncio.sleep(0.01)
    assert len(store.tried) >= 3 and set(store.tried) == {"k1"}
    store.failures.clear()
    await _settled(backlog)
    assert store.written == ["k1", "k2", "k3", "k4"]


def test_a_single_redis_is_one_node():
    script = redis.Redis().register_script("return 1")
    node = node_of(script)
    assert node(["mg:usage:t1"]) == node(["mg:limits:t2:x"]) == ("", 0)


def test_a_cluster_client_without_a_slot_map_names_every_slot_uncovered():
    client = redis.RedisCluster(host="127.0.0.1", port=1)  # never connected: no slot map
    node = node_of(client.register_script("return 1"))
    assert {node([f"mg:usage:t{i}"])[0] for i in range(20)} == {"uncovered"}
    assert node(["mg:usage:t1"])[1] == client.keyslot("mg:usage:t1")
