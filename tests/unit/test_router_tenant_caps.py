"""The per-tenant caps of a router replica (services/router/admission.py):
SessionStreams, on one tenant's open ChatSession streams, and TenantCalls,
on its RouterService calls in flight, which the router's CallerGate
(services/router/auth.py) counts. Their logic alone, over real asyncio
tasks standing for gRPC's call tasks
(tests/integration/test_router_call_bound.py runs both in a real router)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from meshgate.config import RouterSettings, hash_api_key
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2
from services.router.admission import SessionStreams, TenantCalls
from services.router.auth import Authenticator, CallerGate

CAP = 2

# Each cap, with the setting and the reason its refusal names.
CAPS = [
    (SessionStreams, "max_session_streams_per_tenant", Reason.TOO_MANY_SESSION_STREAMS),
    (TenantCalls, "max_concurrent_rpcs_per_tenant", Reason.TOO_MANY_CALLS_IN_FLIGHT),
]
KINDS = pytest.mark.parametrize("kind", [kind for kind, _, _ in CAPS])


async def held_open(holds, tenant: str, release: asyncio.Event) -> None:
    """A call: counted in, then in flight until ``release`` is set."""
    holds.open(tenant, asyncio.current_task())
    await release.wait()


async def opened(holds, tenant: str, release: asyncio.Event) -> asyncio.Task:
    call = asyncio.create_task(held_open(holds, tenant, release))
    await asyncio.sleep(0)
    return call


async def refused_at_once(holds, tenant: str, release: asyncio.Event) -> None:
    """Opens one more call of ``tenant``, which must end (refused) at once."""
    await asyncio.wait_for(await opened(holds, tenant, release), timeout=1)


@pytest.mark.parametrize(("kind", "limit", "reason"), CAPS)
async def test_a_tenant_past_its_cap_is_refused_and_other_tenants_are_not(kind, limit, reason) -> None:
    holds, release = kind(CAP), asyncio.Event()
    calls = [await opened(holds, "a", release) for _ in range(CAP)]
    with pytest.raises(MeshgateError) as error:
        await refused_at_once(holds, "a", release)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.reason == reason
    assert error.value.metadata == {"limit": limit, "scope": "tenant", "limit_value": str(CAP)}
    # Calls end by themselves, so their refusal says when to retry; streams wait for their client.
    retry = [error_details_pb2.RetryInfo] if kind is TenantCalls else []
    assert [type(detail) for detail in error.value.details] == [error_details_pb2.QuotaFailure, *retry]
    # A refused call was never counted; another tenant has its own cap.
    assert holds.held("a") == CAP
    calls += [await opened(holds, "b", release) for _ in range(CAP)]
    assert not any(call.done() for call in calls)
    assert (holds.held("a"), holds.held("b")) == (CAP, CAP)
    release.set()
    await asyncio.gather(*calls)
    await asyncio.sleep(0)
    assert (holds.held("a"), holds.held("b")) == (0, 0)


@KINDS
async def test_a_call_ended_however_frees_its_place_once(kind) -> None:
    holds, release = kind(CAP), asyncio.Event()
    cancelled = await opened(holds, "a", release)
    failed = asyncio.create_task(failing(holds))
    await asyncio.sleep(0)
    assert holds.held("a") == CAP
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0)  # its done callbacks have run
    assert holds.held("a") == CAP - 1
    with pytest.raises(RuntimeError):
        await failed
    await asyncio.sleep(0)
    assert holds.held("a") == 0
    # Counted out exactly once each: the whole cap is there again, and no more.
    calls = [await opened(holds, "a", release) for _ in range(CAP)]
    with pytest.raises(MeshgateError):
        await refused_at_once(holds, "a", release)
    release.set()
    await asyncio.gather(*calls)


@KINDS
async def test_a_place_released_early_is_given_back_once_and_its_calls_end_gives_back_nothing(kind) -> None:
    holds, release = kind(CAP), asyncio.Event()
    early_hold = None

    async def released_early() -> None:
        nonlocal early_hold
        early_hold = holds.open("a", asyncio.current_task())
        await release.wait()

    early = asyncio.create_task(released_early())
    other = await opened(holds, "a", release)
    await asyncio.sleep(0)
    assert holds.held("a") == CAP
    early_hold.release()
    assert holds.held("a") == CAP - 1
    early_hold.release()
    assert holds.held("a") == CAP - 1
    # Its place is free for another while its task still runs.
    taken = await opened(holds, "a", release)
    assert not taken.done() and holds.held("a") == CAP
    # Its task's end counts nothing out: the other two are still held.
    early.cancel()
    with pytest.raises(asyncio.CancelledError):
        await early
    await asyncio.sleep(0)
    assert holds.held("a") == CAP
    release.set()
    await asyncio.gather(other, taken)
    await asyncio.sleep(0)
    assert holds.held("a") == 0


async def failing(holds) -> None:
    holds.open("a", asyncio.current_task())
    await asyncio.sleep(0.01)
    raise RuntimeError("the call failed")


@KINDS
async def test_no_cap_refuses_nothing_and_a_new_cap_applies_to_calls_opened_after(kind) -> None:
    holds, uncounted_release, release = kind(0), asyncio.Event(), asyncio.Event()
    uncounted = [await opened(holds, "a", uncounted_release) for _ in range(8 * CAP)]
    assert not any(call.done() for call in uncounted)
    holds.reconfigure(CAP)
    calls = [await opened(holds, "a", release) for _ in range(CAP)]
    assert not any(call.done() for call in calls)
    with pytest.raises(MeshgateError):
        await refused_at_once(holds, "a", release)
    # Those opened with no cap were never counted, so their ends count
    # nothing out: the cap's calls are all still held.
    uncounted_release.set()
    await asyncio.gather(*uncounted)
    await asyncio.sleep(0)
    assert holds.held("a") == CAP
    # Lowered with calls in flight: those counted under the old cap are
    # still counted out once each, and the count never goes below zero.
    holds.reconfigure(1)
    release.set()
    await asyncio.gather(*calls)
    await asyncio.sleep(0)
    assert holds.held("a") == 0


ROUTER_SERVICE = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


async def test_the_gate_counts_each_tenants_calls_and_never_the_admin_credentials() -> None:
    settings = RouterSettings(
        dev_tenant=True, dev_api_key="tenant-key", admin_api_key_sha256=[hash_api_key("admin-key")]
    )
    calls, release = TenantCalls(CAP), asyncio.Event()
    gate = CallerGate(Authenticator(settings), calls)

    async def call(method: str, key: str) -> None:
        await gate(f"/{ROUTER_SERVICE}/{method}", (("authorization", f"Bearer {key}"),))
        await release.wait()

    async def in_flight(method: str, key: str) -> asyncio.Task:
        task = asyncio.create_task(call(method, key))
        await asyncio.sleep(0)
        return task

    # GetUsage takes the admin credential, as a caller of no tenant: never counted.
    held = [await in_flight("GetUsage", "admin-key") for _ in range(2 * CAP)]
    held += [await in_flight("ListModels", "tenant-key") for _ in range(CAP)]
    assert not any(task.done() for task in held)
    assert calls.held("dev") == CAP
    with pytest.raises(MeshgateError) as refused:
        await asyncio.wait_for(await in_flight("GetUsage", "tenant-key"), timeout=1)
    assert refused.value.reason == Reason.TOO_MANY_CALLS_IN_FLIGHT
    release.set()
    await asyncio.gather(*held)
    await asyncio.sleep(0)
    assert calls.held("dev") == 0
