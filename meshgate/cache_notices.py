"""Notices of cache entries that must no longer be served, from the cache
service to the routers' local copies of hot hits
(``services/router/hot_exact.py``).

The cache service publishes on :data:`CHANNEL` whenever an entry's answer
stops being the one to serve: a wrong hit reported (the entry is deleted
and its sub-partition's verifier made stricter, so the notice names its
tenant and model), an Invalidate of a tenant or of one of its models, any
Store (one replacing an entry, or one giving a prompt that had semantic
hits its own answer), and a Store undone because its scope was invalidated
after its lookup (``StoreRequest.store_fence``). Expiry and eviction publish nothing: the answer a
router still holds was a right one, and a router keeps a copy only for a
short, fixed age (``router.hot_exact_max_age_s``).

Two kinds of notice, both short ASCII (ids and names hex-encoded, so no
tenant id or model name can break the format):

- ``e <entry id>``: one entry (``LookupResponse.entry_id`` or
  ``asked_entry_id``);
- ``s <tenant hex> <model hex>``: every entry of a tenant, of one model or
  (empty model) of all.

And a heartbeat, ``e heartbeat.<id>`` (:func:`heartbeat`), which every
cache replica publishes every :data:`HEARTBEAT_INTERVAL_S` under an id of
its own, and which its hits name (``LookupResponse.heartbeat_id``). A
router subscribed where a replica does not publish (``router.cache_redis_url``
not its Redis; another mesh's Redis, whose cache services publish
heartbeats of their own; one replica alone on another Redis than the
others) has a live subscription that does not hear that replica's notices,
and would serve every copy of its hits for their whole age limit after the
notice that should have dropped them. So a router copies a hit only while
it hears the heartbeat the hit names. The id is the publisher's, not the
Redis's: what a router must know is that what this replica publishes
reaches it, and the replica publishes its notices and its heartbeat where
it keeps its entries (one client, ``redis.url``). Any replica that changes
one of those entries shares that Redis, so its notices reach the router
too (on a Redis Cluster, a PUBLISH reaches the subscribers of every node,
through the cluster bus: tests/integration/test_redis_cluster.py). A Redis
restart breaks the routers' subscriptions, which drops their copies; the
replicas keep their ids, and their heartbeats on the new subscriptions
make the routers copy again. An id of the Redis would say less: Redis's ``run_id`` is one node's
(a cluster's nodes each have their own, and a failover or a restart
changes it), and an id stored in Redis is copied with its data (a staging
Redis loaded from production's dump would name production's).
"""

from __future__ import annotations

import dataclasses
import secrets

CHANNEL = "mg:cache:changes"

# 1 s: a router hears of a cache service gone unheard within
# HEARTBEAT_LOST_AFTER_S, the same bound as a subscription gone silent
# (redis_access.SUBSCRIPTION_SILENT_FOR_S), which these heartbeats also keep
# from needing its PINGs; it costs one PUBLISH a second per cache replica.
HEARTBEAT_INTERVAL_S = 1.0
# Three heartbeats missed: one late or lost (a busy event loop, a slow
# PUBLISH) does not bypass the copies.
HEARTBEAT_LOST_AFTER_S = 3.0
# Written as an entry notice of an id no entry has (entry ids are hex): a
# router from before heartbeats takes it for one and drops nothing, where a
# notice of a new kind, which it cannot read, would drop every copy it holds
# (and log a warning) once a second while an upgrade's versions mix. The
# bare ``e heartbeat`` of the cache services from before heartbeat ids is
# such a notice to a router now: it names no replica, so no hit is copied
# on its word.
_HEARTBEAT_PREFIX = b"e heartbeat."


@dataclasses.dataclass(frozen=True, slots=True)
class EntryNotice:
    entry_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class ScopeNotice:
    tenant_id: str
    # "": every model of the tenant.
    model: str


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    # The publishing replica's (LookupResponse.heartbeat_id).
    heartbeat_id: str


def new_heartbeat_id() -> str:
    """A cache replica's, for its life. Hex: with no space in it, a router
    from before heartbeats reads the heartbeat as the notice of an entry
    no one holds, not as an unreadable notice."""
    return secrets.token_hex(8)


def heartbeat(heartbeat_id: str) -> bytes:
    return _HEARTBEAT_PREFIX + heartbeat_id.encode()


def entry_notice(entry_id: str) -> bytes:
    return b"e " + entry_id.encode()


def scope_notice(tenant_id: str, model: str) -> bytes:
    return f"s {tenant_id.encode().hex()} {model.encode().hex()}".encode()


def parse(data: bytes) -> EntryNotice | ScopeNotice | Heartbeat | None:
    """The notice ``data`` carries, or None for anything malformed (which a
    listener skips: a notice of a newer format must not stop it)."""
    if data.startswith(_HEARTBEAT_PREFIX):
        return Heartbeat(data.removeprefix(_HEARTBEAT_PREFIX).decode("ascii", "replace"))
    parts = data.split(b" ")
    try:
        if parts[0] == b"e" and len(parts) == 2 and parts[1]:
            return EntryNotice(parts[1].decode("ascii"))
        if parts[0] == b"s" and len(parts) == 3 and parts[1]:
            tenant_id, model = (bytes.fromhex(part.decode("ascii")).decode() for part in parts[1:])
            return ScopeNotice(tenant_id, model)
    except (UnicodeDecodeError, ValueError):
        return None
    return None
