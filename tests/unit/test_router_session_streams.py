"""The cap on one tenant's open ChatSession streams per router replica
(services/router/admission.py SessionStreams): its logic alone, over real
asyncio tasks standing for gRPC's call tasks
(tests/integration/test_router_call_bound.py runs it in a real router)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router.admission import SessionStreams

CAP = 2


async def held_open(streams: SessionStreams, tenant: str, release: asyncio.Event) -> None:
    """A stream's call: counted in, then open until ``release`` is set."""
    streams.open(tenant, asyncio.current_task())
    await release.wait()


async def opened(streams: SessionStreams, tenant: str, release: asyncio.Event) -> asyncio.Task:
    call = asyncio.create_task(held_open(streams, tenant, release))
    await asyncio.sleep(0)
    return call


async def refused_at_once(streams: SessionStreams, tenant: str, release: asyncio.Event) -> None:
    """Opens one more stream of ``tenant``, which must end (refused) at once."""
    await asyncio.wait_for(await opened(streams, tenant, release), timeout=1)


async def test_a_tenant_past_its_cap_is_refused_and_other_tenants_are_not() -> None:
    streams, release = SessionStreams(CAP), asyncio.Event()
    calls = [await opened(streams, "a", release) for _ in range(CAP)]
    with pytest.raises(MeshgateError) as error:
        await refused_at_once(streams, "a", release)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.reason == Reason.TOO_MANY_SESSION_STREAMS
    assert error.value.metadata == {
        "limit": "max_session_streams_per_tenant",
        "scope": "tenant",
        "limit_value": str(CAP),
    }
    assert [type(detail) for detail in error.value.details] == [error_details_pb2.QuotaFailure]
    # A refused stream was never counted; another tenant has its own cap.
    assert streams.held("a") == CAP
    calls += [await opened(streams, "b", release) for _ in range(CAP)]
    assert not any(call.done() for call in calls)
    assert (streams.held("a"), streams.held("b")) == (CAP, CAP)
    release.set()
    await asyncio.gather(*calls)
    await asyncio.sleep(0)
    assert (streams.held("a"), streams.held("b")) == (0, 0)


async def test_a_stream_ended_however_frees_its_slot_once() -> None:
    streams, release = SessionStreams(CAP), asyncio.Event()
    cancelled = await opened(streams, "a", release)
    failed = asyncio.create_task(failing(streams))
    await asyncio.sleep(0)
    assert streams.held("a") == CAP
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0)  # its done callbacks have run
    assert streams.held("a") == CAP - 1
    with pytest.raises(RuntimeError):
        await failed
    await asyncio.sleep(0)
    assert streams.held("a") == 0
    # Counted out exactly once each: the whole cap is there again, and no more.
    calls = [await opened(streams, "a", release) for _ in range(CAP)]
    with pytest.raises(MeshgateError):
        await refused_at_once(streams, "a", release)
    release.set()
    await asyncio.gather(*calls)


async def failing(streams: SessionStreams) -> None:
    streams.open("a", asyncio.current_task())
    await asyncio.sleep(0.01)
    raise RuntimeError("the stream's turn failed")


async def test_no_cap_refuses_nothing_and_a_new_cap_applies_to_streams_opened_after() -> None:
    streams, release = SessionStreams(0), asyncio.Event()
    calls = [await opened(streams, "a", release) for _ in range(8 * CAP)]
    assert not any(call.done() for call in calls)
    streams.reconfigure(CAP)
    calls += [await opened(streams, "a", release) for _ in range(CAP)]
    assert not any(call.done() for call in calls)
    with pytest.raises(MeshgateError):
        await refused_at_once(streams, "a", release)
    release.set()
    await asyncio.gather(*calls)
    assert streams.held("a") == 0
