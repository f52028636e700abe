"""ledger.run_scripts over a stand-in Redis: a call refused on its second
try (Redis had lost the script, then refused the call) is that call's
reply when the caller asked for replies, as a first refusal is, so the
caller can undo what the other calls did."""

from __future__ import annotations

import pytest
from redis.exceptions import NoScriptError, ResponseError

from services.router.ledger import run_scripts


class Pipeline:
    def __init__(self, replies: list) -> None:
        self._replies = replies

    def execute_command(self, *args) -> None:
        pass

    async def execute(self, raise_on_error: bool = True) -> list:
        return list(self._replies)


class Redis:
    def __init__(self, replies: list) -> None:
        self._replies = replies

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self._replies)


class RefusingScript:
    sha = "0" * 40

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, keys: list[str], args: list) -> list:
        self.calls.append(keys)
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")


async def test_a_call_refused_after_its_script_was_reloaded_is_its_reply_not_a_raise():
    script = RefusingScript()
    redis = Redis([NoScriptError("NOSCRIPT No matching script."), [1]])
    replies = await run_scripts(redis, script, [(["a"], []), (["b"], [])], raise_on_error=False)
    assert isinstance(replies[0], ResponseError) and replies[1] == [1]
    assert script.calls == [["a"]]


async def test_with_raise_on_error_the_second_refusal_raises():
    redis = Redis([NoScriptError("NOSCRIPT No matching script."), [1]])
    with pytest.raises(ResponseError, match="OOM"):
        await run_scripts(redis, RefusingScript(), [(["a"], []), (["b"], [])])


class BrokenConnectionScript(RefusingScript):
    async def __call__(self, keys: list[str], args: list) -> list:
        self.calls.append(keys)
        raise ConnectionResetError("connection reset by peer")


async def test_a_call_whose_retry_lost_its_connection_is_its_reply_too():
    """A raw socket error on the second try is one of CONNECTION_ERRORS
    (OSError), not a RedisError: it must not escape either."""
    redis = Redis([NoScriptError("NOSCRIPT No matching script."), [1]])
    replies = await run_scripts(
        redis, BrokenConnectionScript(), [(["a"], []), (["b"], [])], raise_on_error=False
    )
    assert isinstance(replies[0], ConnectionResetError) and replies[1] == [1]
