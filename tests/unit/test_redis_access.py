"""Which client a Redis URL selects, and how a cluster URL is read. Nothing
connects: redis-py's clients open connections on their first command."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from meshgate import redis_access
from meshgate.config import ConfigError
from meshgate.reasons import Reason


async def test_a_plain_url_gets_one_node_client() -> None:
    client = redis_access.connect("redis://127.0.0.1:6379/0")
    assert not isinstance(client, RedisCluster)
    await client.aclose()


async def test_a_cluster_url_names_every_startup_node_and_keeps_credentials() -> None:
    client = redis_access.connect("rediss+cluster://user:secret@127.0.0.1:7000,127.0.0.2:7001")
    try:
        assert isinstance(client, RedisCluster)
        manager = client.nodes_manager
        assert sorted(manager.startup_nodes) == ["127.0.0.1:7000", "127.0.0.2:7001"]
        assert (manager.connection_kwargs["username"], manager.connection_kwargs["password"]) == (
            "user",
            "secret",
        )
        assert manager.connection_kwargs["connection_class"] is SSLConnection
        # Reads from masters only, and no command retried after a broken
        # connection (a write script must never run twice).
        assert client.load_balancing_strategy is None and not client.read_from_replicas
        assert client.retry.get_retries() == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize("url", ["redis+cluster://127.0.0.1", "redis+cluster://127.0.0.1:7000,:7001"])
def test_a_cluster_node_without_host_and_port_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        redis_access.connect(url)


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://h:1/0", False),
        ("rediss://h:1/0", False),
        ("redis+cluster://h:1", True),
        ("rediss+cluster://h:1", True),
    ],
)
def test_the_scheme_alone_says_cluster(url: str, cluster: bool) -> None:
    assert redis_access.is_cluster(url) is cluster


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000?read_from_replicas=true",
        "redis+cluster://127.0.0.1:7000,127.0.0.2:7001?load_balancing_strategy=1",
        "redis+cluster://127.0.0.1:7000?retry=3",
        "redis://127.0.0.1:6379/0?socket_timeout=3&retry_on_timeout=true",
        "rediss://127.0.0.1:6379/0?retry_on_error=TimeoutError",
    ],
)
async def test_a_url_cannot_turn_on_replica_reads_or_retries(url: str) -> None:
    # redis-py lets the query override connect()'s arguments: refused, not obeyed.
    with pytest.raises(ValueError, match="cannot be set in the URL"):
        redis_access.connect(url)
    with pytest.raises(ValueError, match="cannot be set in the URL"):
        await redis_access.connect_subscriber(url)


async def test_other_query_settings_still_reach_the_client() -> None:
    client = redis_access.connect("redis://127.0.0.1:6379/0?socket_timeout=3")
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
    await client.aclose()


_SCRIPT = "ERR Error running script (call to f_8ec4): @user_script:37: @user_script: 37: -"


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (_SCRIPT + "OOM command not allowed when used memory > 'maxmemory'.", "OutOfMemoryError"),
        (_SCRIPT + "READONLY You can't write against a read only replica.", "ReadOnlyError"),
        (_SCRIPT + "MASTERDOWN Link with MASTER is down", "MasterDownError"),
        (_SCRIPT + "ERR wrong number of arguments for 'set' command", "ResponseError"),
        ("OOM command not allowed when used memory > 'maxmemory'.", "OutOfMemoryError"),
        ("ERR unknown command 'FOO'", "ResponseError"),
    ],
)
def test_a_refusal_inside_a_script_is_parsed_as_the_refusal_itself(reply, kind):
    error = redis_access._Parser.parse_error(reply)
    assert type(error).__name__ == kind
    assert isinstance(error, redis_access.CONNECTION_ERRORS) == (kind != "ResponseError")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://default:S3cret@10.0.0.1:6379/0", "redis://default:***@10.0.0.1:6379/0"),
        ("redis://:S3cret@h:1/0", "redis://:***@h:1/0"),
        # A password holding what separates the parts of a URL.
        ("rediss+cluster://u:p@ss:w@h1:1,h2:2", "rediss+cluster://u:***@h1:1,h2:2"),
        ("redis://h:1/0?db=1&password=S3cret", "redis://h:1/0?db=1&password=***"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://[S3cret", "<a Redis URL that cannot be parsed>"),
    ],
)
def test_a_url_named_in_a_message_shows_no_password(url: str, shown: str) -> None:
    assert redis_access.redacted(url) == shown


def test_a_refused_cluster_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        redis_access.connect("redis+cluster://default:S3cret@127.0.0.1")
    assert "S3cret" not in str(refused.value) and "default:***@127.0.0.1" in str(refused.value)


def test_an_outage_tells_the_caller_what_failed_and_the_log_why() -> None:
    error = redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")
    with structlog.testing.capture_logs() as logs:
        failure = redis_access.outage("usage cannot be read", error)
    assert (failure.code, failure.reason, failure.message) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.REDIS_UNAVAILABLE,
        "usage cannot be read",
    )
    assert not failure.metadata
    assert [(log["event"], log["error"]) for log in logs] == [("redis unavailable", str(error))]


async def test_a_write_asked_to_wait_for_no_replica_sends_only_its_script() -> None:
    """cache.report_replicas = 0: no ROLE round trip, no WAIT."""
    sent: list[str] = []

    class Client:
        async def execute_command(self, *args, **options):
            sent.append(args[0])

    async def script(keys, args):
        sent.append("script")
        return 7

    result = await redis_access.run_script_replicated(Client(), script, ["k"], [], 0, 1.0)
    assert (result.reply, result.wanted, result.acknowledged) == (7, 0, 0)
    assert sent == ["script"]
