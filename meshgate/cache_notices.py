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

And a heartbeat, :data:`HEARTBEAT`, which every cache replica publishes
every :data:`HEARTBEAT_INTERVAL_S`. A router subscribed where the cache
service does not publish (``router.cache_redis_url`` not its Redis) has a
live subscription that hears nothing, and would serve every copy for its
whole age limit after the notice that should have dropped it; hearing no
heartbeat, it serves none. One replica's heartbeat is enough: the replicas
share one Redis, so whoever hears one hears every replica's notices.
"""

from __future__ import annotations

import dataclasses

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
# (and log a warning) once a second while an upgrade's versions mix.
HEARTBEAT = b"e heartbeat"


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
    pass


def entry_notice(entry_id: str) -> bytes:
    return b"e " + entry_id.encode()


def scope_notice(tenant_id: str, model: str) -> bytes:
    return f"s {tenant_id.encode().hex()} {model.encode().hex()}".encode()


def parse(data: bytes) -> EntryNotice | ScopeNotice | Heartbeat | None:
    """The notice ``data`` carries, or None for anything malformed (which a
    listener skips: a notice of a newer format must not stop it)."""
    if data == HEARTBEAT:
        return Heartbeat()
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
