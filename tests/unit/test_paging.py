"""What every listing's page tokens share (meshgate/paging.py), checked
through each listing that uses it: ListKeys (services/router/keys.py) and
ListSessions (services/context/store.py), whose tokens each refuses of
the other (test_context_listing_tokens.py). A token names a place in one
tenant's listing and nothing else, and has one spelling. What each
listing's cursor holds is its own test file's: test_router_key_pages.py,
test_context_listing_tokens.py."""

from __future__ import annotations

import base64
import dataclasses
import string
import typing

import grpc
import pytest

from meshgate import paging
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context.store import listed_member, listing_cursor, listing_token
from services.router.keys import PageCursor

BASE64_URL = string.ascii_letters + string.digits + "-_"
INVALID_TOKEN = (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_PAGE_TOKEN)


@dataclasses.dataclass(frozen=True)
class Listing:
    # A token of tenant "acme"'s listing (fixed: a failure reads the same each run).
    token: str
    # A token for another tenant of the same place.
    token_for: typing.Callable[[str], str]
    # What the listing does with a token given for a tenant: its cursor, or raises.
    read: typing.Callable[[str, str], object]


_KEYS_CURSOR = PageCursor(1_764_862_706.123456, "0123456789abcdef")
_MEMBER = listed_member("0f5c2a9be1d34e6f8a7b6c5d4e3f2a1b", 1_764_862_706_123).encode()
LISTINGS = {
    "ListKeys": Listing(
        _KEYS_CURSOR.token("acme"),
        _KEYS_CURSOR.token,
        lambda token, tenant: PageCursor.of_token(token, tenant),
    ),
    "ListSessions": Listing(
        listing_token("acme", _MEMBER),
        lambda tenant: listing_token(tenant, _MEMBER),
        lambda token, tenant: listing_cursor(tenant, token),
    ),
}


@pytest.fixture(params=list(LISTINGS))
def listing(request) -> Listing:
    return LISTINGS[request.param]


def refused(listing: Listing, token: str, tenant_id: str = "acme") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(MeshgateError) as caught:
        listing.read(token, tenant_id)
    return caught.value.code, caught.value.reason


def test_a_token_is_read_back_by_its_tenant(listing):
    listing.read(listing.token, "acme")


def test_a_token_is_opaque_and_url_safe(listing):
    assert set(listing.token) <= set(BASE64_URL)
    assert b"acme" not in base64.urlsafe_b64decode(listing.token + "==")


def test_a_token_of_another_tenants_listing_is_refused(listing):
    assert refused(listing, listing.token, "other") == INVALID_TOKEN
    # Nor where one tenant's id is a prefix of the other's.
    assert refused(listing, listing.token, "acme2") == INVALID_TOKEN
    assert refused(listing, listing.token_for("acm")) == INVALID_TOKEN


def test_every_change_of_one_character_is_refused(listing):
    """Including those of the last character's padding bits alone (base64
    decodes them to the same bytes): a token has one spelling."""
    for position, original in enumerate(listing.token):
        for replacement in BASE64_URL.replace(original, ""):
            altered = listing.token[:position] + replacement + listing.token[position + 1 :]
            assert refused(listing, altered) == INVALID_TOKEN, (position, replacement)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda token: "", id="empty"),
        pytest.param(lambda token: "x", id="one character"),
        pytest.param(lambda token: "not a token", id="words"),
        pytest.param(lambda token: "é" * len(token), id="not ASCII"),
        pytest.param(lambda token: token[:-1], id="cut short"),
        pytest.param(lambda token: token + "A", id="one more"),
        pytest.param(lambda token: token + "==", id="padded"),
        # Characters base64 decoding would skip.
        pytest.param(lambda token: token[:10] + "!" + token[10:], id="a stray character"),
        pytest.param(lambda token: token[:10] + "\n" + token[10:], id="a newline"),
        pytest.param(lambda token: "A" * 100_000, id="100k characters"),
    ],
)
def test_what_no_listing_gave_is_refused(listing, make):
    assert refused(listing, make(listing.token)) == INVALID_TOKEN


@pytest.mark.parametrize("requested", [-1, -(2**31)])
def test_a_negative_page_size_is_refused(requested):
    with pytest.raises(MeshgateError) as caught:
        paging.page_size(requested, 50, 1000)
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_PAGE_SIZE,
    )
