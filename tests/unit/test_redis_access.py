"""Which client a Redis URL selects, and how a cluster URL is read. Nothing
connects: redis-py's clients open connections on their first command."""

from __future__ import annotations

import asyncio
import urllib.parse

import grpc
import hypothesis
import pytest
import redis.asyncio as redis
import structlog
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from meshgate import redis_access
from meshgate.config import ConfigError, load_settings
from meshgate.reasons import Reason
from meshgate.telemetry import ThrottledLog
from tests.clocks import Clock


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


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:7000,:7001",
        "redis+cluster://127.0.0.1:0,h:7001",
    ],
)
def test_a_cluster_node_without_host_and_port_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        redis_access.connect(url)
    # At load too, naming the setting, not at a service's first connection.
    with pytest.raises(ConfigError, match="redis.url: .*host:port"):
        load_settings(environ={"REDIS_URL": url})


def test_a_url_on_port_0_is_refused_at_load():
    """It loaded, and every connection failed at start, naming no setting."""
    with pytest.raises(ConfigError, match="redis.url: .*port is not a number from 1 to 65535"):
        load_settings(environ={"REDIS_URL": "redis://127.0.0.1:0/0"})
    assert load_settings(environ={"REDIS_URL": "redis://127.0.0.1/0"}).redis.url == "redis://127.0.0.1/0"


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
        "redis://127.0.0.1:6379/0?db=0&retry_on_timeout=true",
        "rediss://127.0.0.1:6379/0?retry_on_error=TimeoutError",
    ],
)
async def test_a_url_cannot_turn_on_replica_reads_or_retries(url: str) -> None:
    # redis-py lets the query override connect()'s arguments: refused, not obeyed.
    with pytest.raises(ValueError, match="cannot be set in the URL"):
        redis_access.connect(url)
    with pytest.raises(ValueError, match="cannot be set in the URL"):
        await redis_access.connect_subscriber(url)


@pytest.mark.parametrize("key", ["socket_timeout", "socket_connect_timeout"])
async def test_a_url_cannot_set_a_timeout_beside_redis_timeout_s(key: str) -> None:
    # Obeyed, it would replace redis.timeout_s unseen, under the WAIT that
    # config.check_settings keeps below it.
    with pytest.raises(ValueError, match=f"{key} cannot be set in the URL: set redis.timeout_s instead"):
        redis_access.connect(f"redis://127.0.0.1:6379/0?{key}=0.5")
    with pytest.raises(ValueError, match="set redis.timeout_s instead"):
        await redis_access.connect_subscriber(f"redis+cluster://127.0.0.1:7000?{key}=0.5")


async def test_other_query_settings_still_reach_the_client() -> None:
    client = redis_access.connect("redis://127.0.0.1:6379/0?health_check_interval=7")
    assert client.connection_pool.connection_kwargs["health_check_interval"] == 7
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
        # A lone credential: redis-py's user name (a token, in some
        # deployments), the password to clients that follow the IANA scheme.
        ("redis://S3cret@h:1/0", "redis://***@h:1/0"),
        ("rediss://S3cret@h:1/0", "rediss://***@h:1/0"),
        ("redis+cluster://S3cret@h1:1,h2:2", "redis+cluster://***@h1:1,h2:2"),
        ("redis://h:1/0?username=S3cret", "redis://h:1/0?username=***"),
        # Decoded as redis-py decodes the query: still the password.
        ("redis://h:1/0?pass%77ord=S3cret", "redis://h:1/0?pass%77ord=***"),
        ("unix:///run/redis.sock?db=2&password=S3cret", "unix:///run/redis.sock?db=2&password=***"),
        ("unix://:S3cret@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("redis://:S3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://:p%40ss%2Fw%3F@[fe80::1%25eth0]:6379/3", "redis://:***@[fe80::1%25eth0]:6379/3"),
        # The tail of a password holding an unencoded '&' or '#'.
        ("redis://h:1/0?password=S3&cret", "redis://h:1/0?password=***&***"),
        ("redis://h:1/0?password=S3#cret", "redis://h:1/0?password=***#***"),
        ("redis://h:1/0?socket_timeout=3&client_name=S3cret", "redis://h:1/0?socket_timeout=3&***"),
        # A password holding an unencoded '/', '?', '#' or '[' ends the
        # host part early: where the secret ends cannot be told.
        ("redis://:S3/cret@h:1/0", redis_access.UNSHOWN_URL),
        ("redis://:S3?cret@h:1/0", redis_access.UNSHOWN_URL),
        ("redis://:S3#cret@h:1/0", redis_access.UNSHOWN_URL),
        ("redis://u:S3@c/ret@h:1/0", redis_access.UNSHOWN_URL),
        ("redis://S3/cret@h:1/0", redis_access.UNSHOWN_URL),
        ("redis://:12/34@h:1/0", redis_access.UNSHOWN_URL),
        ("redis://[S3cret", redis_access.UNSHOWN_URL),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        # No "@" anywhere: no credential to cut short; a mistyped port is shown.
        ("redis://redis.internal:6379x/0", "redis://redis.internal:6379x/0"),
        ("redis+cluster://10.0.0.1:6379,10.0.0.2:6379", "redis+cluster://10.0.0.1:6379,10.0.0.2:6379"),
    ],
)
def test_a_url_named_in_a_message_shows_no_password(url: str, shown: str) -> None:
    assert redis_access.redacted(url) == shown


# Any password, written as a URL must write it (percent-encoded), in every
# place a Redis URL can carry one: hidden, and where the Redis is stays shown.
_PASSWORDS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1)


@hypothesis.given(password=_PASSWORDS)
def test_an_encoded_password_is_hidden_wherever_the_url_holds_it(password: str) -> None:
    secret = urllib.parse.quote(password, safe="")
    forms = {
        f"redis://:{secret}@redis.internal:6379/0": "redis://:***@redis.internal:6379/0",
        f"rediss://default:{secret}@redis.internal:6380/1": "rediss://default:***@redis.internal:6380/1",
        f"redis://{secret}@redis.internal:6379/0": "redis://***@redis.internal:6379/0",
        f"redis://[::1]:6379/0?db=1&password={secret}": "redis://[::1]:6379/0?db=1&password=***",
        f"unix://:{secret}@/run/redis.sock?db=1": "unix://:***@/run/redis.sock?db=1",
        f"rediss+cluster://u:{secret}@10.0.0.1:7000,[::2]:7001": "rediss+cluster://u:***@10.0.0.1:7000,[::2]:7001",
    }
    for url, shown in forms.items():
        assert redis_access.redacted(url) == shown


# As an operator may paste it: unencoded, any of the characters that end a
# part of a URL. Secrets are upper case, all else lower case, so any leak of
# any piece of one shows.
_RAW_PASSWORDS = st.text(st.sampled_from("SECRT/?#@:[]%&=,+ "), min_size=1)


@hypothesis.given(password=_RAW_PASSWORDS)
def test_an_unencoded_password_is_hidden_or_the_url_not_shown(password: str) -> None:
    urls = [
        f"redis://:{password}@redis.internal:6379/0",
        f"redis://user:{password}@redis.internal:6379/0",
        f"redis+cluster://u:{password}@node.a:7000,node.b:7001",
        f"redis://redis.internal:6379/0?db=1&password={password}",
    ]
    if ":" not in password:
        # With one, a lone credential is user:password to every client.
        urls.append(f"redis://{password}@redis.internal:6379/0")
    for url in urls:
        shown = redis_access.redacted(url)
        assert shown == redis_access.UNSHOWN_URL or shown == shown.lower(), (url, shown)


def test_a_refused_cluster_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        redis_access.connect("redis+cluster://default:S3cret@127.0.0.1")
    assert "S3cret" not in str(refused.value) and "default:***@127.0.0.1" in str(refused.value)


@pytest.mark.parametrize("url", ["redis://:Xq7/S3cret@h:1/0", "rediss://u:Xq7#S3cret@h:1/0"])
async def test_a_password_that_cuts_the_host_part_short_is_refused_without_naming_it(url: str) -> None:
    # urllib's own error quotes the "port", which is the password's first piece.
    with pytest.raises(ConfigError, match="port is not a number") as refused:
        redis_access.connect(url)
    with pytest.raises(ConfigError, match="port is not a number") as refused_too:
        await redis_access.connect_subscriber(url)
    for error in (refused.value, refused_too.value):
        assert "Xq7" not in str(error) and "S3cret" not in str(error)


def test_a_mistyped_port_is_refused_naming_the_url() -> None:
    with pytest.raises(ConfigError, match="port is not a number") as refused:
        redis_access.connect("redis://redis.internal:6379x/0")
    assert "redis://redis.internal:6379x/0" in str(refused.value)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The outage log, fresh (another test's outage would have spent its
    first line) and on a clock the test moves."""
    clock = Clock()
    outage_log = ThrottledLog(redis_access.log, redis_access.OUTAGE_LOG_INTERVAL_S, clock)
    monkeypatch.setattr(redis_access, "_outage_log", outage_log)
    return clock


def test_an_outage_tells_the_caller_what_failed_and_the_log_why(clock) -> None:
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


def test_an_outage_logs_its_first_failure_then_one_line_per_interval_with_how_many_went_unlogged(
    clock,
) -> None:
    """Every request fails during an outage: thousands of identical lines a
    second drowned the log pipeline. Each caller still gets its own error."""
    interval_s = redis_access.OUTAGE_LOG_INTERVAL_S
    error = redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")
    failures = []

    def fail(message: str, times: int = 1) -> None:
        failures.extend(redis_access.outage(message, error) for _ in range(times))

    with structlog.testing.capture_logs() as logs:
        fail("usage cannot be read", times=50)
        clock.now += interval_s - 0.001
        fail("usage cannot be read", times=30)
        fail("API keys cannot be checked")  # another failure: its own first line
        clock.now += 0.001
        fail("usage cannot be read", times=2)
        clock.now += interval_s
        fail("usage cannot be read")
    assert [(log["event"], log["message"], log["suppressed"], log["error"]) for log in logs] == [
        ("redis unavailable", "usage cannot be read", 0, str(error)),
        ("redis unavailable", "API keys cannot be checked", 0, str(error)),
        ("redis unavailable", "usage cannot be read", 49 + 30, str(error)),
        ("redis unavailable", "usage cannot be read", 1, str(error)),
    ]
    assert len(failures) == 84 and len({id(failure) for failure in failures}) == 84
    assert {(f.code, f.reason) for f in failures} == {(grpc.StatusCode.UNAVAILABLE, Reason.REDIS_UNAVAILABLE)}
    assert [f.message for f in failures].count("API keys cannot be checked") == 1


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


async def test_a_subscription_connects_within_the_configured_redis_timeout(monkeypatch) -> None:
    # redis.timeout_s bounds every connection attempt; a subscriber's too
    # (the hot copies' listeners). It took the 3 s default whatever was set.
    client = await redis_access.connect_subscriber("redis://127.0.0.1:6379/0", 7.5)
    assert client.connection_pool.connection_kwargs["socket_connect_timeout"] == 7.5
    await client.aclose()

    asked: list[float] = []

    async def unreachable(url: str, timeout_s: float) -> None:
        asked.append(timeout_s)
        raise redis.ConnectionError("no Redis here")

    monkeypatch.setattr(redis_access, "connect_subscriber", unreachable)
    listener = redis_access.ChannelListener(
        "redis://127.0.0.1:6379/0", "channel", lambda data: None, lambda live: None, timeout_s=7.5
    )
    listener.start()
    try:
        while not asked:
            await asyncio.sleep(0.01)
    finally:
        await listener.close()
    assert asked[0] == 7.5
