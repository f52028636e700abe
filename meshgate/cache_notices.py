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
"""

from __future__ import annotations

import dataclasses

CHANNEL = "mg:cache:changes"


@dataclasses.dataclass(frozen=True, slots=True)
class EntryNotice:
    entry_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class ScopeNotice:
    tenant_id: str
    # "": every model of the tenant.
    model: str


def entry_notice(entry_id: str) -> bytes:
    return b"e " + entry_id.encode()


def scope_notice(tenant_id: str, model: str) -> bytes:
    return f"s {tenant_id.encode().hex()} {model.encode().hex()}".encode()


def parse(data: bytes) -> EntryNotice | ScopeNotice | None:
    """The notice ``data`` carries, or None for anything malformed (which a
    listener skips: a notice of a newer format must not stop it)."""
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
