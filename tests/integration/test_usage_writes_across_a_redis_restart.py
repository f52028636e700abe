"""What turns used, written while Redis restarts: a settlement and a ledger
record that Redis could not take (its connects refused) are written once it
is back, each once (services/router/script_calls.Backlog). Before, both
were logged and lost: the turn's reservation stood as its charge, and its
record was missing from GetUsage."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import uuid

import pytest

from meshgate import redis_access
from meshgate.config import LimitSettings
from meshgate.local import redis_server
from meshgate.local.stack import free_port
from services.router.admission import Admission, Scope
from services.router.ledger import STREAM, Ledger, UsageRecord, day_key

pytestmark = pytest.mark.integration


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def test_a_settlement_and_a_record_refused_while_redis_restarts_are_written_when_it_is_back(tmp_path):
    port = free_port()
    process = redis_server.launch(port, tmp_path)
    client = redis_access.connect(f"redis://127.0.0.1:{port}/0")
    try:
        redis_server.wait_ready(port)
        admission = Admission(client, max_generation_s=60)
        ledger = Ledger(client, stream_max_len=1000, retention_days=1)
        scope = Scope("tenant", uuid.uuid4().hex[:12], LimitSettings(tokens_per_day=5000))
        budget = f"{scope.prefix}:tokens:day:{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
        opened = await admission.admit([scope], prompt_tokens=100, max_tokens=900)
        assert int(await client.get(budget)) == 1000

        # Redis goes away (its data kept on disk) as the turn ends.
        _stop(process)
        # The client's pooled connection reads the close (a router's loop
        # turns meanwhile), so the next call connects anew and is refused: a
        # call certainly not run. A call sent on the connection as Redis
        # went down may have run, and is given up.
        await asyncio.sleep(0.2)
        await admission.settle(opened, 300, 0)
        record = UsageRecord(scope.id, "k1", "tiny-gpt", "live", 100, 200, 0, "miss", 7, 50)
        await ledger.record(record)
        assert len(admission._settlements) == 1 and len(ledger._backlog) == 1
        # Down for a while: the first rounds of retries are refused too.
        await asyncio.sleep(1.8)
        assert len(admission._settlements) == 1 and len(ledger._backlog) == 1

        process = redis_server.launch(port, tmp_path)
        redis_server.wait_ready(port)
        async with asyncio.timeout(30):
            while len(admission._settlements) or len(ledger._backlog):
                await asyncio.sleep(0.1)
        # The turn is charged what it used, not what it reserved; its record
        # is in the log and the day's totals, once.
        assert int(await client.get(budget)) == 300
        assert await client.xlen(STREAM) == 1
        today = f"{ledger.today():%Y-%m-%d}"
        totals = await client.hgetall(day_key(scope.id, today))
        assert totals[b"k1|tiny-gpt|requests"] == b"1"
        assert totals[b"k1|tiny-gpt|completion_tokens"] == b"200"
        await admission.drain()
        await ledger.drain()
    finally:
        await client.aclose()
        _stop(process)
