"""Redis access for the services that keep state (context, cache, router).

One connection pool per process, created once; hiredis parses replies when it
is installed. Keys of every service start with ``mg:<service>:`` so one Redis
can serve the whole mesh.

A Redis Cluster is chosen by the URL's scheme: ``redis+cluster://host:port``
(``rediss+cluster://`` for TLS), with more startup nodes after commas
(``redis+cluster://10.0.0.1:6379,10.0.0.2:6379``); the client learns the
rest of the cluster from any one of them. A scheme rather than a separate
setting, so that the one ``REDIS_URL`` an operator sets says everything.
Every multi-key script and transaction keeps its keys in one hash slot with
a hash tag (each service's key builder says which); commands are read from
masters only, so a turn just written is the turn read.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import re
import typing
import urllib.parse

import redis.asyncio as redis
import structlog
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, DefaultParser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from meshgate.config import ConfigError, RedisSettings
from meshgate.errors import MeshgateError, unavailable
from meshgate.reasons import Reason
from meshgate.tasks import cancel_and_wait
from meshgate.telemetry import ThrottledLog

log = structlog.get_logger(__name__)

# Past this many connections a command waits for a free one (up to the
# timeout) instead of failing: a burst must queue, not look like an outage.
MAX_CONNECTIONS = 128
POOL_WAIT_S = 5.0

# A pooled connection idle this long is PINGed before its next command (one
# a restarted Redis closed is replaced, not failed on).
HEALTH_CHECK_INTERVAL_S = 30


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# What connect() returns: both kinds take the same commands, scripts and
# pipelines (a cluster's only for keys of one slot).
Client = redis.Redis | RedisCluster


def is_cluster(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in CLUSTER_SCHEMES


# What redacted() shows in place of a URL it cannot show safely.
UNSHOWN_URL = "<a Redis URL not shown: it does not parse safely (percent-encode / ? # @ [ ] in a password)>"

# Query settings whose values cannot be a secret (numbers, flags, versions):
# the ones redis-py itself parses by type. Every other item may be one
# (password=, username=, or the tail of a password holding an unencoded '&').
_SHOWN_QUERY_SETTINGS = frozenset(URL_QUERY_ARGUMENT_PARSERS)

# One node of the host part: a name or [IPv6] with an optional numeric port,
# or nothing (a unix:// socket's). A host part that is not a list of these
# may be the start of a password cut short by an unencoded '/', '?' or '#'.
_NODE = re.compile(r"(?:\[[^\[\]]*\]|[^:\[\]]+)(?::\d*)?|")


def redacted(url: str) -> str:
    """``url`` as a message may name it: scheme, hosts, ports and database
    shown, anything that may be a secret replaced by ``***``. A deployment's
    Redis URL comes from a secret (deploy/k8s), and what names it reaches logs.

    Hidden: the password of ``user:password@`` (the user stays: it names the
    ACL user); a lone ``credential@`` whole, which many clients read as the
    password (the IANA scheme's ``[[user:]password@]``) and redis-py as the
    user, which deployments set to a token; every query item but
    _SHOWN_QUERY_SETTINGS (``password=``, ``username=``, however encoded);
    the fragment, which redis-py ignores. A URL whose credential an unencoded
    character cut short (its ``@`` past the host part, or a host part that
    is no list of hosts) is not shown at all: where the secret ends cannot
    be told. An unencoded ``&`` in a ``password=`` value followed by the name
    of a shown setting (``password=ab&db=12``) shows that tail: percent-encode
    ``&`` in a password given in the query."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unencoded '[' or ']' in the password
        return UNSHOWN_URL
    userinfo, at, hosts = parts.netloc.rpartition("@")
    cut_short = "@" in parts.path or "@" in parts.query or "@" in parts.fragment
    # With no "@" anywhere there is no credential to cut short: a mistyped
    # port ("host:6379x") is shown, for the operator to see the typo.
    if "@" in url and (cut_short or not all(_NODE.fullmatch(node) for node in hosts.split(","))):
        return UNSHOWN_URL
    shown = f"{parts.scheme}://"
    if at:
        user, colon, _ = userinfo.partition(":")
        shown += f"{user}:***@" if colon else "***@"
    shown += hosts + parts.path
    if parts.query:
        shown += "?" + "&".join(_redacted_query_item(item) for item in parts.query.split("&"))
    if parts.fragment:
        shown += "#***"
    return shown


def _redacted_query_item(item: str) -> str:
    raw_name, equals, _ = item.partition("=")
    # Decoded as redis-py decodes it: pass%77ord= is a password too.
    name = urllib.parse.unquote_plus(raw_name)
    if name in _SHOWN_QUERY_SETTINGS:
        return item
    if name in ("password", "username") and equals:
        return f"{raw_name}=***"
    return "***"


# During an outage every request that touches Redis fails here: one line
# each was thousands of identical lines a second under load, drowning the
# log pipeline. Per message (what failed), the first failure is logged, then
# one line per this many seconds with the count left unlogged in between;
# each caller still gets its own error.
OUTAGE_LOG_INTERVAL_S = 10.0
_outage_log = ThrottledLog(log, OUTAGE_LOG_INTERVAL_S)


def outage(message: str, error: BaseException) -> MeshgateError:
    """What a caller is told of a Redis failure (CONNECTION_ERRORS and the like):
    UNAVAILABLE / REDIS_UNAVAILABLE with ``message`` alone. The error's own
    text names Redis's host and port (a cluster's nodes), which are for our
    logs, not for callers (as errors.from_rpc_error says of a downstream
    call's): it is logged here (throttled: OUTAGE_LOG_INTERVAL_S), with the
    call's trace id."""
    _outage_log.warning("redis unavailable", per=message, message=message, error=str(error))
    return unavailable(Reason.REDIS_UNAVAILABLE, message)


def is_wrong_type(error: BaseException | None) -> bool:
    """Whether ``error`` is Redis refusing a command on a key that holds
    another type than the command's (WRONGTYPE), alone or in a script."""
    return isinstance(error, redis_errors.ResponseError) and "WRONGTYPE" in str(error)


def is_full(error: BaseException | None) -> bool:
    """Whether ``error`` is Redis refusing a write for memory (maxmemory under
    noeviction; a script's first write, _Parser): a call that frees memory
    may go on where one that grows it may not."""
    return isinstance(error, redis_errors.OutOfMemoryError)


# Query keys that would undo what connect() sets on purpose: redis-py lets a
# URL's query override the keyword arguments, so ``?read_from_replicas=true``
# would turn replica reads on, and ``?socket_timeout=0.5`` would cut every
# ReportWrongHit's WAIT (cache.report_replication_timeout_s, which
# config.check_settings keeps under redis.timeout_s) and hide the timeout
# from the configuration a reader checks.
_MASTERS_ONLY_NO_RETRY = (
    "meshgate reads from masters only and retries no command, so that every acknowledged "
    "write is read and none runs twice"
)
_ONE_TIMEOUT = "set redis.timeout_s instead, the one timeout every Redis command and connection takes"
_FIXED_QUERY_KEYS = {
    "read_from_replicas": _MASTERS_ONLY_NO_RETRY,
    "load_balancing_strategy": _MASTERS_ONLY_NO_RETRY,
    "retry": _MASTERS_ONLY_NO_RETRY,
    "retry_on_timeout": _MASTERS_ONLY_NO_RETRY,
    "retry_on_error": _MASTERS_ONLY_NO_RETRY,
    "socket_timeout": _ONE_TIMEOUT,
    "socket_connect_timeout": _ONE_TIMEOUT,
}


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if is_cluster(url):
        _cluster_nodes(url)  # each node's host and port, refused at load as at connect
    else:
        try:
            port = parts.port
        except ValueError:
            # urllib's own message quotes the "port", which is the piece of
            # a password after an unencoded '/', '?' or '#' (":pa/ss@h").
            raise ConfigError(
                f"redis URL {redacted(url)!r}: its port is not a number from 1 to 65535"
            ) from None
        if port == 0:
            # Port 0 loaded, and every connection failed at start (nothing
            # listens there), naming no setting.
            raise ConfigError(f"redis URL {redacted(url)!r}: its port is not a number from 1 to 65535")
    fixed = sorted(_FIXED_QUERY_KEYS.keys() & urllib.parse.parse_qs(parts.query).keys())
    if fixed:
        reasons = "; ".join(dict.fromkeys(_FIXED_QUERY_KEYS[key] for key in fixed))
        raise ConfigError(f"redis URL: {', '.join(fixed)} cannot be set in the URL: {reasons}")


# What a write refused inside a script reads as on the Redis this project
# runs (6.x): "ERR Error running script (call to f_...): @user_script:1:
# @user_script: 1: -OOM command not allowed ...": a plain ResponseError,
# where the same refusal of a plain command is an OutOfMemoryError or a
# ReadOnlyError. Redis 7 passes the inner error on as it is.
_SCRIPT_REFUSAL = re.compile(
    r"^(?:ERR )?Error running script .*?: -((?:OOM|READONLY|MASTERDOWN|LOADING) .*)$", re.DOTALL
)


class _Parser(DefaultParser):
    """redis-py's reply parser, but a command a script ran that Redis
    refused (out of memory under noeviction, a replica's READONLY after a
    failover, its master down, a dataset loading) raises the refusal's own
    class, as the same command sent alone would: CONNECTION_ERRORS holds
    them, so a handler answers UNAVAILABLE (retry later) rather than
    INTERNAL. Redis refuses a script's first write before it writes
    anything, so the refused script ran no write. On a cluster too
    (_connect_cluster gives it to every node's connections)."""

    @classmethod
    def parse_error(cls, response: str) -> Exception:
        error = super().parse_error(response)
        if type(error) is redis_errors.ResponseError:
            refused = _SCRIPT_REFUSAL.match(response)
            if refused is not None:
                return super().parse_error(refused.group(1))
        return error


def connect(url: str, timeout_s: float = RedisSettings.timeout_s) -> Client:
    """A client whose every command and connection attempt gives up after
    ``timeout_s`` (redis.timeout_s) of silence: a stalled Redis costs a call
    one timeout, once (no command is retried, nor the call by gRPC:
    errors.py _NOT_RETRIED_REASONS)."""
    check_url(url)
    if is_cluster(url):
        return _connect_cluster(url, timeout_s)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        decode_responses=False,
        parser_class=_Parser,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        # No command is ever retried, on timeout or on a broken connection:
        # a write script that ran but whose reply was lost would run twice (a
        # turn appended twice). Stale connections are instead caught before a
        # command is sent (below), which is what a Redis restart needs.
        retry_on_timeout=False,
        # The pool checks each connection it hands out and reconnects one
        # whose server closed it (a restarted Redis), so the next request
        # after a restart succeeds. redis-py skips that check while
        # maintenance notifications are on, and their default "auto" counts
        # as on: with it, every pooled connection failed one request with
        # "Connection closed by server" after a restart, whenever each was
        # next used. Those notifications are for managed Redis clusters that
        # move endpoints; the mesh's Redis does not send them.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    # from_pool: closing the client closes the pool too.
    return redis.Redis.from_pool(pool)


def _cluster_nodes(url: str) -> tuple[str, list[ClusterNode]]:
    """The URL redis-py parses (plain scheme, first node) and every startup node."""
    parts = urllib.parse.urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host_port in hosts.split(","):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(
                f"redis URL {redacted(url)!r}: name each cluster node as host:port, the port from 1 to 65535"
            )
        nodes.append(ClusterNode(host, int(port)))
    first = f"{credentials}@{hosts.split(',')[0]}" if credentials else hosts.split(",")[0]
    plain = urllib.parse.urlunsplit((CLUSTER_SCHEMES[parts.scheme], first, parts.path, parts.query, ""))
    return plain, nodes


def _connect_cluster(url: str, timeout_s: float) -> RedisCluster:
    plain, nodes = _cluster_nodes(url)
    client = RedisCluster.from_url(
        plain,
        startup_nodes=nodes,
        decode_responses=False,
        # Per node; past it a command fails with MaxConnectionsError (a
        # cluster pool does not queue like the single node's).
        max_connections=MAX_CONNECTIONS,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        # Masters only, said outright though it is the default (no strategy:
        # no reads from READONLY replicas): a replica may not have the turn
        # its master just acknowledged, and a reader must see every
        # acknowledged write.
        load_balancing_strategy=None,
        # No retries, for the reason given above: redis-py's cluster retries
        # a command after a broken connection or a timeout, which would run
        # a write script twice. MOVED and ASK redirections are still followed
        # (they mean the command did not run); after a connection error the
        # next command rediscovers the cluster, so a promoted replica is
        # found without any retry here.
        retry=Retry(NoBackoff(), 0),
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    # redis-py's cluster client takes no parser_class argument, and without
    # _Parser a write script Redis 6 refused (out of memory, READONLY on a
    # demoted master) read as INTERNAL instead of UNAVAILABLE. Its nodes'
    # connections are made lazily from these kwargs (the nodes manager's for
    # nodes found later, each startup node's own copy): the way redis-py
    # itself adds its maintenance-notification handler after construction.
    client.nodes_manager.connection_kwargs["parser_class"] = _Parser
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["parser_class"] = _Parser
    return client


async def connect_subscriber(url: str, timeout_s: float = RedisSettings.timeout_s) -> Client:
    """A client for one long subscription. ``timeout_s`` (redis.timeout_s)
    bounds each connection attempt and each reply the client waits for
    outside the subscription: the handshake, and on a cluster the slot map
    and command table, asked of one node after another, so that a node
    that accepts connections but never answers (a hung process) costs one
    timeout before the next is asked, rather than the listener for good
    while the other nodes answer. The subscription's own reads take
    their own timeout (redis-py's pubsub ignores the socket's), so an idle
    one does not end (ChannelListener PINGs it instead). On a cluster,
    PUBLISH reaches every node, so a subscription on whichever node the
    client picks (the master of the channel's slot) hears every service's
    notices; the client must know the cluster's nodes before it can pick
    one."""
    check_url(url)
    if not is_cluster(url):
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
        )
    client = _connect_cluster(url, timeout_s)
    try:
        await client.initialize()
    except redis_errors.RedisClusterException as error:
        await client.aclose()
        # What a subscriber already retries on: no node answered.
        raise redis.ConnectionError(f"no Redis Cluster node answered: {error}") from error
    except BaseException:
        await client.aclose()
        raise
    return client


async def connect_checked(url: str, timeout_s: float = RedisSettings.timeout_s) -> Client:
    """A client (:func:`connect`) whose Redis answered a PING: a service
    fails fast at start-up with a clear message instead of on its first
    request. A Redis that may evict keys is logged loudly
    (:func:`eviction_policy`)."""
    client = connect(url, timeout_s)
    try:
        await client.ping()
    except CONNECTION_ERRORS as error:
        await client.aclose()
        raise unavailable(
            Reason.REDIS_UNAVAILABLE, f"cannot reach Redis at {redacted(url)}: {error}"
        ) from error
    except BaseException:
        await client.aclose()
        raise
    policy = await eviction_policy(client)
    if policy is not None:
        log.error(
            "Redis may evict the mesh's keys: set maxmemory-policy noeviction",
            maxmemory_policy=policy,
            consequence=(
                "sessions, their turn indexes and a cache entry's wrong-hit report can disappear "
                "(a reported answer served again); noeviction refuses writes instead (UNAVAILABLE)"
            ),
        )
    return client


@dataclasses.dataclass(frozen=True, slots=True)
class Replicated:
    """What :func:`run_script_replicated` returns."""

    reply: typing.Any
    # Replicas the write was waited for on, and how many had it in time.
    wanted: int
    acknowledged: int


async def run_script_replicated(
    client: Client, script, keys: list, args: list, replicas: int, timeout_s: float
) -> Replicated:
    """Runs a write ``script`` and answers once its writes are also on
    ``replicas`` replicas of the master that ran it (all those online, if
    fewer), or once ``timeout_s`` has passed. Redis replicates
    asynchronously: a master that dies right after acknowledging a plain
    write may be replaced by a replica that never got it.

    WAIT counts the writes of its own connection, so it goes in one
    pipeline with the script: one connection, and on a cluster the master
    of the keys' slot (WAIT has no key to route it by). EVAL, not EVALSHA:
    a cluster pipeline does not load a script Redis lost (a restart, a
    promoted replica), and the callers are rare writes. With no replica
    online (ROLE lists those whose link is up, past their first sync) nothing is waited for: WAIT would
    block for its whole timeout."""
    if replicas <= 0:
        # Not asked to wait: no ROLE round trip either.
        return Replicated(await script(keys=keys, args=args), 0, 0)
    target: dict[str, ClusterNode] = {}
    if isinstance(client, RedisCluster):
        await client.initialize()
        target["target_nodes"] = client.get_node_from_key(keys[0])
    try:
        role = await client.execute_command("ROLE", **target)
    except redis_errors.ResponseError:
        # A managed Redis may refuse ROLE (renamed or not in the user's
        # ACL): the write still matters more than knowing its replicas.
        role = None
    wanted = min(replicas, len(role[2])) if role is not None and role[0] == b"master" else 0
    if wanted == 0:
        return Replicated(await script(keys=keys, args=args), 0, 0)
    async with client.pipeline(transaction=False) as pipe:
        pipe.eval(script.script, len(keys), *keys, *args)
        # In milliseconds, where 0 would wait for ever.
        pipe.wait(wanted, max(1, round(timeout_s * 1000)), **target)
        reply, acknowledged = await pipe.execute(raise_on_error=False)
    if isinstance(reply, Exception):
        raise reply
    if isinstance(acknowledged, Exception):
        # The script ran (a cluster follows a MOVED reply on its own) but
        # the node waited on no longer served its slot: nothing is known.
        acknowledged = 0
    return Replicated(reply, wanted, int(acknowledged))


async def eviction_policy(client: Client) -> str | None:
    """The eviction policy of a Redis (each master of a cluster) that has a
    memory limit and may evict keys under it, else None. Every key the mesh
    writes has a TTL, so even the volatile-* policies reach all of them, and
    they do not evict together: a cache entry outlives its wrong-hit report,
    a session its turn index. Unknown (CONFIG refused, as managed Redis
    services do) counts as None: nothing to say."""
    try:
        if isinstance(client, RedisCluster):
            reply = await client.config_get("maxmemory*", target_nodes=RedisCluster.PRIMARIES)
            # A reply per master, by node; redis-py answers a cluster of one
            # master with that master's reply alone.
            replies = list(reply.values()) if all(isinstance(r, dict) for r in reply.values()) else [reply]
        else:
            replies = [await client.config_get("maxmemory*")]
        for reply in replies:
            policy = reply.get("maxmemory-policy", "noeviction")
            if int(reply.get("maxmemory", 0) or 0) > 0 and policy != "noeviction":
                return str(policy)
    except Exception:  # noqa: BLE001 - a warning's input: no answer says nothing, and never stops a start
        return None
    return None


# Errors a handler maps to UNAVAILABLE: the store, not the request, is at
# fault. The cluster ones mean a command was refused, not run: a failover in
# progress (CLUSTERDOWN, a slot no master serves yet) or keys being moved;
# so do a write refused for memory (maxmemory under noeviction), one sent to
# a master demoted to a replica (READONLY), a replica whose master is down,
# and a Redis still loading its dataset (BusyLoadingError is a
# ConnectionError), inside a script too (_Parser). redis-py's cluster client
# retries a refused or redirected command itself and then raises its own
# errors: ClusterError ("TTL exhausted.": a slot being resharded answers a
# script whose keys are not all on one side TRYAGAIN until its keys have
# moved) and RedisClusterException (no node reachable, slots not covered).
# A MULTI transaction (the context service's reads of a session as of one
# instant) is not redirected at all: a command of it on a key its slot's
# migration moved already is answered ASK, and once the slot is reassigned
# its old master answers MOVED; either aborts the whole transaction
# (EXECABORT: nothing ran), and redis-py raises the redirect (AskError, whose
# subclass MovedError is) instead of following it. A MOVED patches the
# client's slot map first, so the next call goes to the new master.
# RedisClusterException's other uses are misuse of the client (keys of one
# script in two slots), a bug that would read as an outage here: the cluster tests
# (tests/integration/test_redis_cluster.py) run every script and key layout
# on a real cluster so that none ships. Telling them apart by message at
# every handler, or inside redis-py's node manager, costs more than it buys.
CONNECTION_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.ClusterDownError,
    redis_errors.SlotNotCoveredError,
    redis_errors.TryAgainError,
    redis_errors.AskError,
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
)


# A subscription's liveness (ChannelListener): a PING after this long with
# nothing heard, and lost once nothing was heard for the second (a PONG
# comes back within a millisecond; a Redis too busy to answer one for
# seconds costs a reconnect and an emptied copy, nothing else).
SUBSCRIPTION_PING_AFTER_S = 1.0
SUBSCRIPTION_SILENT_FOR_S = 3.0


class ChannelListener:
    """One pub/sub channel heard for as long as the process runs, for a
    process-local copy that must stop serving what another replica changed.

    Pub/sub delivers at most once, so the copy is trusted only while the
    subscription is known to be up: ``set_live(True)`` from Redis's
    confirmation of SUBSCRIBE on (a notice published between sending
    SUBSCRIBE and its confirmation would be lost), ``set_live(False)`` the
    moment the connection breaks; each call must also forget what the copy
    holds, since whatever changed meanwhile is unknown. Reconnects every
    ``retry_s``; an outage is logged once as it begins (a warning) and once
    as it ends (info), its reconnects in between at debug level: one
    warning per retry was two lines a second for as long as Redis was
    down, in every router and context replica.

    A subscription whose link went silent without closing (a partition, a
    Redis host gone without a FIN) fails nothing by itself: nothing is sent
    on an idle one, and it was taken for live for good while the notices of
    every write elsewhere were lost. So the listener PINGs after
    SUBSCRIPTION_PING_AFTER_S of quiet, and a subscription that heard
    nothing (no notice, no PONG) for SUBSCRIPTION_SILENT_FOR_S is taken for
    lost: that is how long a copy may go on serving what another replica
    changed.
    """

    def __init__(
        self,
        url: str,
        channel: str,
        on_message: collections.abc.Callable[[bytes], None],
        set_live: collections.abc.Callable[[bool], None],
        retry_s: float = 0.5,
        timeout_s: float = RedisSettings.timeout_s,
    ) -> None:
        self._url = url
        # redis.timeout_s: each connection attempt's bound.
        self._timeout_s = timeout_s
        self._channel = channel
        self._on_message = on_message
        self._set_live = set_live
        self._retry_s = retry_s
        self._task: asyncio.Task | None = None
        self.subscribed = asyncio.Event()
        # Whether the subscription is down and that was logged: the next
        # failure is the same outage's, the next subscription its end.
        self._outage = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            # A client of its own (connect_subscriber), not the pool's: the
            # subscription holds its connection for as long as it lasts. Plain
            # PUBLISH, not Redis 7's sharded SPUBLISH: notices are one short
            # message per write, the wheel's Redis is 6.2, and one channel
            # heard on any node of a cluster needs no subscription per shard
            # to follow through failovers.
            client = None
            try:
                client = await connect_subscriber(self._url, self._timeout_s)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    async for message in self._heard(pubsub):
                        if message["type"] == "message":
                            self._on_message(message["data"])
                        elif message["type"] == "subscribe":
                            self._set_live(True)
                            self.subscribed.set()
                            if self._outage:
                                self._outage = False
                                log.info("notices heard again; local copy in use", channel=self._channel)
            except asyncio.CancelledError:
                raise
            except (*CONNECTION_ERRORS, redis.RedisError) as error:
                if self._outage:
                    log.debug("notices still lost; reconnecting", channel=self._channel, error=str(error))
                else:
                    self._outage = True
                    log.warning(
                        "notices lost; local copy bypassed until back",
                        channel=self._channel,
                        error=str(error),
                    )
            finally:
                self._set_live(False)
                self.subscribed.clear()
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
            await asyncio.sleep(self._retry_s)

    async def _heard(self, pubsub) -> collections.abc.AsyncIterator[dict]:
        """The subscription's messages (its PONGs among them), until it has
        been silent for SUBSCRIPTION_SILENT_FOR_S: then ConnectionError."""
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while True:
            message = await pubsub.get_message(timeout=SUBSCRIPTION_PING_AFTER_S)
            if message is not None:
                last_heard = loop.time()
                yield message
                continue
            silent_s = loop.time() - last_heard
            if silent_s >= SUBSCRIPTION_SILENT_FOR_S:
                raise redis.ConnectionError(f"subscription silent for {silent_s:.1f} s: no answer to PING")
            await pubsub.ping()
