"""The sweep of what expired sessions leave in their tenants' records, and
of the live sessions their tenants' listings lack.

A tenant's listing of its sessions (SessionListing) and its holdings record
(TenantHoldings) lie in the tenant's slot, apart from every session's
(services/context/store.py), and have no TTL: an append renews a live
session and never touches the tenant's slot, so a TTL on them would unlist
and forget sessions that live. What Redis's expiry of a session leaves
there (its two listing entries, ~270 bytes, and its fields in the record,
~300) is otherwise cleared only by the tenant's own calls: a create checks
LISTING_SWEPT_PER_CREATE due entries, a page prunes those it meets, each
call of the record forgets a few expired sessions. A tenant whose sessions
all expired with none of those to follow kept them for good (a batch
tenant that made 1M sessions and went quiet: about 570 MB).

The listing also lacks live sessions, for their whole life unless found:
those made before the listing existed (or by a replica of before it during
a rolling upgrade), and those whose listing call failed after their create
or fork script made them, with no request id whose resend would list them
(SessionStore._listed). The sweep finds them too.

Every context replica runs a TenantSweep. Every SWEEP_INTERVAL_S (times
1 ± JITTER) a tick SCANs SCAN_COUNT more keys of each Redis master (every
master of a cluster), from where its last tick left off, for the tenants'
sorted sets (a listing's ``due``, a record's ``expiry``) and the sessions'
metas, in one SCAN (_SCANNED). Of the sessions found it lists those live
and not listed (SessionListing.listed_found: their creation times in their
slots, then one script in each tenant's slot adding what its listing
lacks, due at once), before its cursor moves on (a failure SCANs the same
keys again next tick). It then sweeps up to TENANTS_PER_TICK of the
tenants found (with those whose listing it added to): checks up to
ENTRIES_PER_TENANT of the tenant's due listing entries, as a create does
(unlisting those of sessions gone, giving the others their TTL left, so a
session renewed past its first due time stays), and forgets up to as many
expired sessions of its record, deleting a record left with none. A
tenant that had more to sweep is swept again after the others found. Once
every master's SCAN is through and every tenant found swept, a pass has
ended, and the next begins.

A session deleted between the sweep's read of it and its listing would
be listed again by that script, which cannot see the session (another
slot); its delete's unlisting may have come first. The entry is due at
once, so the check of the tenant's due entries that follows (this tick or
a later one, or a create's, whichever replica's) reads the session after
the listing and unlists it; with no session TTL an entry due never would
have stayed until a page met it. A page never shows it meanwhile (it
reads every session it lists).

What it costs (bench/tenant_sweep_bench.py, 20,000 sessions of 20
tenants, 46,747 keys, one node, three runs): the SCAN examines as many
keys as before (SCAN_COUNT a tick, one call a master) and returns each
session's meta besides the tenants' sets (20,040 keys a pass where TYPE
zset returned 60), in 0.71-0.83x the TYPE-filtered SCAN's time in Redis;
a second SCAN for the hashes (TYPE hash) would take 1.38-1.62x and twice
the calls. Each meta found then costs a HMGET, and each tenant of them a
script, a tick: two more round trips a tick (221 a pass for 127), and a
pass 2.98-3.39x the old pass's time in Redis, spread over its ticks as
before (at most about SCAN_COUNT metas a tick).

What bounds the leftovers and the sessions missing: a tenant's entries of
sessions expired are gone, and a live session missing from its tenant's
listing is listed, within one pass of every replica's sweep after they
expired or it was made (SCAN returns every key present throughout a pass). A pass takes (keys on the master of
the tenant's slot) / SCAN_COUNT ticks (a master of 1M keys: 1,000 ticks,
about 1.4 h), or more where more than TENANTS_PER_TICK tenants a tick have
entries to sweep, and a tenant's own sweep a tick per ENTRIES_PER_TENANT
of its entries (1M expired sessions: 2,000 ticks, about 2.8 h). An entry
whose delete's unlisting was lost is swept once due, as an expired
session's; without a session TTL (context.session_ttl_s 0) it is never
due, and only a page prunes it.

Replicas sweeping the same tenant at once do no harm: a check unlists only
the entries of sessions gone (a member names one life of a session) and
moves a live one's due time only if it is still listed; a forget takes each
expired session's fields once, in one script; a listing of a session found
adds only an entry its listing lacks (ZADD NX), so a session listed by
two replicas, or by its create's listing and a sweep, is listed once.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re

import structlog
from redis.asyncio.cluster import RedisCluster

from meshgate import metrics, redis_access
from meshgate.tasks import cancel_and_wait
from services.context.store import SessionListing, TenantHoldings, session_key

log = structlog.get_logger(__name__)

# A tick comes every SWEEP_INTERVAL_S times 1 ± JITTER, so that replicas
# started together do not sweep together.
SWEEP_INTERVAL_S = 5.0
JITTER = 0.2
# Keys a tick's SCAN examines on each master (SCAN's COUNT): well under a
# millisecond of Redis's time, and a pass over 1M keys in 1,000 ticks.
SCAN_COUNT = 1000
# Tenants a tick sweeps at most, and the entries of each: about a pipeline
# of ENTRIES_PER_TENANT one-key scripts and two short scripts a tenant, a
# few milliseconds of Redis's time a tick at most.
TENANTS_PER_TICK = 16
ENTRIES_PER_TENANT = 500

# The tenant's sorted sets (store.listing_key, store.holdings_key): the
# tenant's hex, between the braces of its hash tag.
_SWEPT_KEY = re.compile(rb"mg:context:(?:listed:\{([0-9a-f]*)\}:due|held:\{([0-9a-f]*)\}:expiry)")
# A session's meta (store.session_key): the session id holds no colon
# (servicer._SESSION_ID); the tenant id may hold anything.
_SESSION_META = re.compile(rb"mg:context:\{([^:]+):(.*)\}:meta", re.DOTALL)
# The SCAN's MATCH: the keys ending as those above do (``due``,
# ``expiry``, ``meta``), so that of a session's keys only its meta comes
# back; a glob cannot say "one of three names", so the regexes above pick
# them out (a summary's content key whose digest ends in a or e passes the
# glob too). No TYPE filter: the sets and the hashes come in one SCAN.
_SCANNED = "mg:context:*[aey]"


class TenantSweep:
    """The sweep of the module's docstring, on ``client`` (a node or a
    cluster), started and stopped with the service (start, close);
    ``tick`` is one step of it."""

    def __init__(
        self, client: redis_access.Client, listing: SessionListing, holdings: TenantHoldings
    ) -> None:
        self._client = client
        self._listing = listing
        self._holdings = holdings
        # Where each master's SCAN goes on (by node name; "" for one node),
        # and the masters whose SCAN is through for this pass.
        self._cursors: dict[str, int] = {}
        self._scanned: set[str] = set()
        # Tenants found and not yet swept (or with more to sweep), in the
        # order found; a dict as an ordered set.
        self._found: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._running: asyncio.Task | None = None

    def start(self) -> None:
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stops sweeping. A tick cut short leaves nothing half done that
        the next (this replica's or another's) does not finish."""
        if self._running is not None:
            await cancel_and_wait(self._running)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S * random.uniform(1 - JITTER, 1 + JITTER))
            try:
                await self.tick()
            except redis_access.CONNECTION_ERRORS as error:
                # The next tick goes on from where this one left off.
                log.warning("tenants' records not swept", error=str(error))
            except Exception:
                # A bug: logged here, as nothing awaits the task.
                log.exception("tenants' records not swept")

    async def tick(self) -> bool:
        """One step of the sweep: SCANs on where fewer than TENANTS_PER_TICK
        tenants wait, then sweeps up to TENANTS_PER_TICK of those found.
        Returns whether it ended a pass (every master's SCAN through since
        the pass began, and every tenant found swept)."""
        if len(self._found) < TENANTS_PER_TICK:
            await self._scan()
        for _ in range(min(TENANTS_PER_TICK, len(self._found))):
            tenant_id, _ = self._found.popitem(last=False)
            try:
                more = await self._swept(tenant_id)
            except Exception as error:
                if not isinstance(error, redis_access.CONNECTION_ERRORS):
                    # This tenant's own keys (one of a session's name holding
                    # another type): put back first, as below, it was tried
                    # again every tick and no other tenant was ever swept (a
                    # review). Left to the next pass; the others go on.
                    log.warning("a tenant's records not swept: left to the next pass", error=str(error))
                    continue
                self._requeue_first(tenant_id)
                raise
            except BaseException:
                self._requeue_first(tenant_id)
                raise
            if more:
                # More left: after the others found.
                self._found[tenant_id] = None
        if self._found or not self._pass_scanned():
            return False
        self._scanned.clear()
        return True

    def _requeue_first(self, tenant_id: str) -> None:
        """Still to sweep, first (Redis out of reach, or the sweep stopped):
        the SCAN may have passed its keys, and a tenant dropped here would
        wait for the next pass."""
        self._found[tenant_id] = None
        self._found.move_to_end(tenant_id, last=False)

    async def _swept(self, tenant_id: str) -> bool:
        """Sweeps the tenant's listing and record; returns whether either
        had more to sweep than one tick's share."""
        checked = await self._listing.checked_due(tenant_id, ENTRIES_PER_TENANT)
        forgotten = await self._holdings.forget_expired(tenant_id, ENTRIES_PER_TENANT)
        return max(checked, forgotten) >= ENTRIES_PER_TENANT

    def _masters(self) -> list:
        """The masters to SCAN: the cluster's (as its client knows them
        now), or the one node (None)."""
        if isinstance(self._client, RedisCluster):
            return self._client.get_primaries()
        return [None]

    def _pass_scanned(self) -> bool:
        return all(_name(master) in self._scanned for master in self._masters())

    async def _scan(self) -> None:
        """One SCAN on each master whose SCAN is not through for this pass;
        the live sessions among the keys it returns that their tenants'
        listings lack are listed, and the tenants of its keys (and those
        listings) join those found."""
        masters = self._masters()
        # A master failed over is SCANned from the start under its new name.
        names = {_name(master) for master in masters}
        self._cursors = {name: cursor for name, cursor in self._cursors.items() if name in names}
        for master in masters:
            name = _name(master)
            if name in self._scanned:
                continue
            cursor = self._cursors.get(name, 0)
            if master is None:
                cursor, keys = await self._client.scan(cursor, _SCANNED, SCAN_COUNT)
            else:
                cursors, keys = await self._client.scan(cursor, _SCANNED, SCAN_COUNT, target_nodes=master)
                cursor = cursors[name]
            found = [tenant_id for tenant_id in map(_tenant_of, keys) if tenant_id is not None]
            sessions = [session for session in map(_session_of, keys) if session is not None]
            # Before the cursor moves on: where Redis fails here, the next
            # tick SCANs these keys again, and no session waits a pass.
            listed = await self._listing.listed_found(sessions)
            if listed:
                metrics.context().sessions_listed_by_sweep.inc(sum(listed.values()))
                log.info("sessions found unlisted listed", sessions=sum(listed.values()), tenants=len(listed))
            self._cursors[name] = cursor
            if cursor == 0:
                self._scanned.add(name)
            # A tenant whose listing got entries has them checked (they are
            # due at once): one whose session was deleted since it was read
            # is unlisted there (store._LIST_FOUND).
            for tenant_id in [*found, *listed]:
                self._found.setdefault(tenant_id, None)


def _name(master) -> str:
    return "" if master is None else master.name


def _session_of(key: bytes) -> tuple[str, str] | None:
    """The session (tenant, session id) whose meta ``key`` is; None for any
    other key."""
    matched = _SESSION_META.fullmatch(key)
    if matched is None:
        return None
    try:
        session = matched[2].decode(), matched[1].decode()
    except UnicodeDecodeError:
        return None
    # The layout spelled once (store.key): a key that parses but is not
    # the meta key of what it parsed to is none.
    return session if session_key(*session).encode() == key else None


def _tenant_of(key: bytes) -> str | None:
    """The tenant whose listing's ``due`` or record's ``expiry`` ``key`` is;
    None for any other key."""
    matched = _SWEPT_KEY.fullmatch(key)
    if matched is None:
        return None
    try:
        return bytes.fromhex((matched[1] or matched[2]).decode()).decode()
    except ValueError:
        return None
