"""The tenant sweep's own bookkeeping (services/context/tenant_sweep.py),
over stand-ins for the tenant's listing and record; the sweep over a real
Redis is tests/integration/test_context_tenant_sweep.py's."""

from __future__ import annotations

import pytest
import redis.exceptions

from services.context import tenant_sweep


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
