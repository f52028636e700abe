"""Listings a page at a time (AIP-158), alike for every listing of ours
(AdminService.ListKeys, services/router/keys.py; ContextService.ListSessions
through RouterService.ListSessions, services/context/store.py SessionListing): the page
size a request gets, and page tokens.

A page token names a place in one tenant's listing: the listing's own
cursor bytes (what follows which entry), then a check of the cursor, the
listing and the tenant, URL-safe base64 without padding. A token of
another tenant's listing, of another listing, altered or made up is
INVALID_ARGUMENT INVALID_PAGE_TOKEN. The check is keyed with a constant,
not a secret (no secret is shared by every replica of a service): one who
reads this code can forge a token, and gets no further with it than a
place to start in a listing of the tenant whose key it calls with, which
that key lists anyway."""

from __future__ import annotations

import base64
import hashlib

from meshgate.errors import MeshgateError, invalid_argument
from meshgate.reasons import Reason

_CHECK_BYTES = 8


def page_size(requested: int, default: int, most: int) -> int:
    """The entries a page holds for a request's page_size: 0 is ``default``,
    more than ``most`` is ``most``, negative is INVALID_PAGE_SIZE."""
    if requested < 0:
        raise invalid_argument(
            Reason.INVALID_PAGE_SIZE, f"page_size must not be negative (0: {default}, at most {most})"
        )
    return min(requested or default, most)


def _check(listing: str, tenant_id: str, cursor: bytes) -> bytes:
    # cursor + tenant is unambiguous though neither is framed: the cursor
    # is the token's own bytes, so only the tenant can differ. ListKeys'
    # tokens from before this module were checked exactly so.
    return hashlib.blake2b(
        cursor + tenant_id.encode(),
        digest_size=_CHECK_BYTES,
        key=f"meshgate {listing} page token".encode(),
    ).digest()


def page_token(listing: str, tenant_id: str, cursor: bytes) -> str:
    """The page token naming ``cursor`` in ``tenant_id``'s ``listing``
    (the method's name: a token of one listing is no other's)."""
    return base64.urlsafe_b64encode(cursor + _check(listing, tenant_id, cursor)).decode().rstrip("=")


def cursor_of(listing: str, tenant_id: str, token: str) -> bytes:
    """The cursor ``token`` names in ``tenant_id``'s ``listing``;
    INVALID_PAGE_TOKEN where it is no token that listing gave. Its layout is
    the listing's to check (refused())."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:  # not base64, or not ASCII
        raise refused(listing) from None
    cursor, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
    # One spelling per token: base64 decoding skips characters outside its
    # alphabet, and the padding's bits.
    if len(raw) <= _CHECK_BYTES or check != _check(listing, tenant_id, cursor):
        raise refused(listing)
    if page_token(listing, tenant_id, cursor) != token:
        raise refused(listing)
    return cursor


def refused(listing: str) -> MeshgateError:
    return invalid_argument(
        Reason.INVALID_PAGE_TOKEN,
        f"page_token is not a next_page_token of {listing} of this tenant_id",
    )
