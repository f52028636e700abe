"""Fair shares of a model's generation slots among tenants.

A generation model runs a fixed number of sequences at once (the bundled
models' ``max_active_sequences``, the generation engine's config parameter)
and queues the rest in one first-in, first-out inbox: a tenant with 64
streams open took all 16 of tiny_gpt's slots, and another tenant's first
request waited behind its whole queue (18.8 s for an 8-token answer that
takes 0.03 s alone). So this service admits at most the model's slots'
worth of generations into Triton at once and holds the rest here, one
queue per tenant, granting each freed slot to the next tenant in turn
that has a generation waiting: one tenant's queue never stands in front
of another's first request, which waits for at most one freed slot per
other tenant waiting.

The mesh's own background work (the context service's summaries, and any
generation that names no tenant: no router vouched for it) takes a slot
when no tenant's generation waits, or once it has waited while a model's
capacity of tenant grants went by (so it cannot starve behind a steady
stream of tenants), and holds at most a quarter of a model's slots (at
least one), so it never fills a model.

The uncontended path costs a comparison and a counter: ``try_take``.
"""

from __future__ import annotations

import asyncio
import collections

import grpc

from meshgate.errors import MeshgateError, retry_info
from meshgate.reasons import Reason

# The share of a model's slots background work may hold at once.
BACKGROUND_SHARE = 0.25
# The queue key of background work: no tenant id is None.
BACKGROUND = None
# When a tenant refused for a full queue may try again: about a generation.
QUEUE_FULL_RETRY_AFTER_S = 1.0


class ModelSlots:
    """One Triton model's generation slots in this process. ``capacity``
    None: not known (the model's config names no slot count and none is
    set), and nothing waits here."""

    def __init__(self, model: str, max_queued_per_tenant: int) -> None:
        self.model = model
        self._max_queued = max_queued_per_tenant
        self.capacity: int | None = None
        self._background_capacity = 0
        self.active = 0
        self.background_active = 0
        # Tenants with generations waiting, next to be granted first; each
        # tenant's own waiters first in, first out.
        self._tenants: collections.OrderedDict[str, collections.deque[asyncio.Future]] = (
            collections.OrderedDict()
        )
        self._background: collections.deque[asyncio.Future] = collections.deque()
        # Slots granted to tenants while background work waited since it was
        # last granted one (aging: _next_waiter).
        self._tenant_grants_passed = 0

    @property
    def queued(self) -> int:
        return sum(map(len, self._tenants.values())) + len(self._background)

    def set_capacity(self, capacity: int | None) -> None:
        """The model's slots (Triton's probes read them, or a setting): a
        change grants what it frees. Calls running past a lower capacity
        finish; no new one starts until the count is below it."""
        self.capacity = capacity
        self._background_capacity = 0 if capacity is None else max(1, int(capacity * BACKGROUND_SHARE))
        self._grant()

    def try_take(self, tenant: str | None) -> bool:
        """Takes a slot at once if one is free and no one it must yield to
        waits: the whole cost of an uncontended generation."""
        bounded = self.capacity is not None
        if bounded and (self.active >= self.capacity or self._tenants):
            return False
        if tenant is BACKGROUND:
            if bounded and (self._background or self.background_active >= self._background_capacity):
                return False
            self.background_active += 1
        # Counted unbounded too: a count known later must see what runs.
        self.active += 1
        return True

    async def wait(self, tenant: str | None, timeout_s: float | None) -> None:
        """Waits for ``tenant``'s turn (after try_take said no), at most
        ``timeout_s`` (the caller's deadline): DEADLINE_EXCEEDED then; a
        caller that leaves (cancelled) leaves the queue. Refused at once
        with RESOURCE_EXHAUSTED when the tenant has its most waiting."""
        if tenant is BACKGROUND:
            queue = self._background
        else:
            queue = self._tenants.get(tenant)
            if queue is None:
                queue = self._tenants[tenant] = collections.deque()
        if len(queue) >= self._max_queued:
            raise self._queue_full()
        if tenant is BACKGROUND and not queue:
            # Background work starts waiting: its age counts from here.
            self._tenant_grants_passed = 0
        granted = asyncio.get_running_loop().create_future()
        queue.append(granted)
        try:
            async with asyncio.timeout(timeout_s):
                await granted
        except BaseException as leaving:
            if granted.done() and not granted.cancelled():
                # Granted as the caller left: the slot goes to the next.
                self.give_back(tenant)
            else:
                self._leave(tenant, queue, granted)
            if isinstance(leaving, TimeoutError):
                raise MeshgateError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    Reason.DEADLINE_EXCEEDED,
                    "the deadline passed while the generation waited for a slot of its model",
                ) from None
            raise

    def give_back(self, tenant: str | None) -> None:
        """Frees the slot a generation of ``tenant`` held (try_take or wait)."""
        self.active -= 1
        if tenant is BACKGROUND:
            self.background_active -= 1
        if self._tenants or self._background:
            self._grant()

    def _grant(self) -> None:
        while self.capacity is None or self.active < self.capacity:
            granted = self._next_waiter()
            if granted is None:
                return
            self.active += 1
            granted.set_result(None)

    def _next_waiter(self) -> asyncio.Future | None:
        """The next waiter to grant, out of its queue: a tenant's in turn,
        else background work's within its share. Background work that has
        waited while ``capacity`` tenant grants went by goes first, within
        its share: with tenants always waiting it never got a slot, and a
        summary waited its whole deadline (the context service's
        summary_timeout_s, 120 s) before its model was rested. ``capacity``
        grants are about one generation's time (every slot turned over
        once), so a waiting summary starts within about one generation
        while tenants still get ``capacity`` of every ``capacity + 1``
        grants. A waiter whose caller is leaving (cancelled, not yet out of
        its queue) is passed over."""
        if self._tenant_grants_passed >= (self.capacity or 0) and (granted := self._next_background()):
            return granted
        while self._tenants:
            tenant, queue = next(iter(self._tenants.items()))
            granted = queue.popleft()
            if not queue:
                del self._tenants[tenant]
            if granted.done():
                continue
            if queue:
                # Its turn is over: the other waiting tenants go first.
                self._tenants.move_to_end(tenant)
            if self._background:
                self._tenant_grants_passed += 1
            return granted
        return self._next_background()

    def _next_background(self) -> asyncio.Future | None:
        """Background work's next waiter, within its share; None if none or
        at its share."""
        while self._background and (
            self.capacity is None or self.background_active < self._background_capacity
        ):
            granted = self._background.popleft()
            if not granted.done():
                self.background_active += 1
                self._tenant_grants_passed = 0
                return granted
        return None

    def _leave(self, tenant: str | None, queue: collections.deque, granted: asyncio.Future) -> None:
        if granted in queue:
            queue.remove(granted)
        if not queue and tenant is not BACKGROUND and self._tenants.get(tenant) is queue:
            del self._tenants[tenant]

    def _queue_full(self) -> MeshgateError:
        # The router tries the model's other deployments first, then passes
        # this on to public callers (with its RetryInfo: errors.from_rpc_error):
        # it names no Triton model, an internal name; the caller knows the
        # model it asked for.
        return MeshgateError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.TOO_MANY_QUEUED_GENERATIONS,
            f"this tenant has its most generations ({self._max_queued}) waiting for a slot of this "
            "model here; one must start or end first",
            {
                "limit": "max_queued_generations_per_tenant",
                "scope": "tenant",
                "limit_value": str(self._max_queued),
            },
            details=[retry_info(QUEUE_FULL_RETRY_AFTER_S)],
        )
