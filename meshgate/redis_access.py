"""Redis access for the services that keep state (context, cache).

One connection pool per process, created once; hiredis parses replies when it
is installed. Keys of every service start with ``mg:<service>:`` so one Redis
can serve the whole mesh.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.maint_notifications import MaintNotificationsConfig

from meshgate.errors import unavailable
from meshgate.reasons import Reason

# Past this many connections a command waits for a free one (up to the
# timeout) instead of failing: a burst must queue, not look like an outage.
MAX_CONNECTIONS = 128
POOL_WAIT_S = 5.0


def connect(url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        decode_responses=False,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=10,
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


async def connect_checked(url: str) -> redis.Redis:
    """A client whose Redis answered a PING: a service fails fast at start-up
    with a clear message instead of on its first request."""
    client = connect(url)
    try:
        await client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        await client.aclose()
        raise unavailable(Reason.REDIS_UNAVAILABLE, f"cannot reach Redis at {url}: {error}") from error
    except BaseException:
        await client.aclose()
        raise
    return client


# Errors a handler maps to UNAVAILABLE: the store, not the request, is at fault.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
