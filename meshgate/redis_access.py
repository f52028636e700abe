"""Redis access for the services that keep state (context, cache).

One connection pool per process, created once; hiredis parses replies when it
is installed. Keys of every service start with ``mg:<service>:`` so one Redis
can serve the whole mesh.
"""

from __future__ import annotations

import redis.asyncio as redis

from meshgate.errors import unavailable


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry_on_timeout=True,
        max_connections=256,
    )


async def ping(client: redis.Redis, url: str) -> None:
    """Fails fast at start-up with a clear message when Redis is unreachable."""
    try:
        await client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        raise unavailable("REDIS_UNAVAILABLE", f"cannot reach Redis at {url}: {error}") from error


# Errors a handler maps to UNAVAILABLE: the store, not the request, is at fault.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
