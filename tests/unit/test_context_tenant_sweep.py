"""The tenant sweep's own bookkeeping (services/context/tenant_sweep.py),
over stand-ins for the tenant's listing and record; the sweep over a real
Redis is tests/integration/test_context_tenant_sweep.py's."""

from __future__ import annotations

import pytest
import redis.exceptions

from services.context import store, tenant_sweep


class Listing:
    def __init__(self, failing: set[str]) -> None:
        self.failing = failing
        self.checked: list[str] = []

    async def checked_due(self, tenant_id: str, most: int) -> int:
        if tenant_id in self.failing:
            self.failing.discard(tenant_id)
            raise redis.exceptions.ConnectionError("Redis went away")
        self.checked.append(tenant_id)
        return 0


class Holdings:
    async def forget_expired(self, tenant_id: str, most: int) -> int:
        return 0


async def test_a_tenant_whose_sweep_failed_is_swept_first_at_the_next_tick(monkeypatch):
    """It was taken off the tenants found before its sweep: a failure lost
    it for the rest of the pass (the SCAN may have passed its keys)."""
    listing = Listing(failing={"b"})
    sweep = tenant_sweep.TenantSweep(None, listing, Holdings())

    async def scanned() -> None:
        pass

    monkeypatch.setattr(sweep, "_scan", scanned)
    monkeypatch.setattr(sweep, "_pass_scanned", lambda: True)
    for tenant_id in ("a", "b", "c"):
        sweep._found[tenant_id] = None
    with pytest.raises(redis.exceptions.ConnectionError):
        await sweep.tick()
    assert listing.checked == ["a"]
    assert await sweep.tick()
    assert listing.checked == ["a", "b", "c"]


def test_a_sessions_meta_key_names_its_session_whatever_the_tenant_id_holds():
    """The SCAN returns sessions' metas among other keys: each names its
    tenant and session (a tenant id may hold braces, colons, even the
    ``}:meta`` that ends the key); no other key of a session, a tenant's
    listing or record, or a summary's content key names one."""
    for tenant_id in ("acme", "a:b", "{x:y}", "t}:meta", "ünï"):
        meta = store.session_key(tenant_id, "s-1").encode()
        assert tenant_sweep._session_of(meta) == (tenant_id, "s-1")
        others = [
            *(store.key(tenant_id, "s-1", part) for part in store.SESSION_PARTS[1:]),
            store.unbilled_key(tenant_id, "s-1"),
            store.listing_key(tenant_id, "due"),
            store.holdings_key(tenant_id, "expiry"),
            store.summary_copy_key(tenant_id, "e" * 64),
        ]
        assert [tenant_sweep._session_of(other.encode()) for other in others] == [None] * len(others)
        assert tenant_sweep._tenant_of(store.listing_key(tenant_id, "due").encode()) == tenant_id
        assert tenant_sweep._tenant_of(meta) is None
