"""ListSessions' page sizes and page tokens (services/context/store.py,
meshgate/paging.py): a token names a place in one tenant's listing of its
sessions and nothing else. The pages themselves, on a real Redis, are
tests/integration/test_context_listing.py's."""

import string

import grpc
import pytest

from meshgate import paging
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.context.store import (
    DEFAULT_LIST_PAGE_SIZE,
    MAX_LIST_PAGE_SIZE,
    listed_member,
    listing_cursor,
    listing_token,
)
from services.router.keys import PageCursor

# Fixed: a failure reads the same each run.
MEMBER = listed_member("0f5c2a9be1d34e6f8a7b6c5d4e3f2a1b", 1_764_862_706_123).encode()
TOKEN = listing_token("acme", MEMBER)
BASE64_URL = string.ascii_letters + string.digits + "-_"
INVALID_TOKEN = (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_PAGE_TOKEN)


def refused(token: str, tenant_id: str = "acme") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(MeshgateError) as caught:
        listing_cursor(tenant_id, token)
    return caught.value.code, caught.value.reason


def size(requested: int) -> int:
    return paging.page_size(requested, DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE)


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (7, 7), (1000, 1000), (1001, 1000)])
def test_a_page_holds_what_page_size_asks_zero_the_default_at_most_the_maximum(requested, expected):
    assert size(requested) == expected


@pytest.mark.parametrize(
    "member",
    [MEMBER, listed_member("a", 0).encode(), listed_member("Z_-9" * 32, 9_999_999_999_999_999).encode()],
    ids=["usual", "shortest", "longest"],
)
def test_a_token_names_its_place_exactly(member):
    assert listing_cursor("acme", listing_token("acme", member)) == member


def test_members_order_as_their_sessions_creation_then_id():
    """What the listing's order rests on: members compared as strings (ZRANGEBYLEX)."""
    members = [listed_member(sid, ms) for sid, ms in [("b", 9), ("a", 10), ("b", 10), ("a", 100)]]
    assert sorted(members) == members


def test_a_token_of_another_listing_is_refused_by_each():
    keys_token = PageCursor(1_764_862_706.5, "0123456789abcdef").token("acme")
    assert refused(keys_token) == INVALID_TOKEN
    # Even one whose cursor would be a place in this listing.
    assert refused(paging.page_token("ListKeys", "acme", b"\x01" + MEMBER)) == INVALID_TOKEN
    with pytest.raises(MeshgateError) as caught:
        PageCursor.of_token(TOKEN, "acme")
    assert (caught.value.code, caught.value.reason) == INVALID_TOKEN


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param(b"\x02" + MEMBER, id="another layout's version"),
        pytest.param(b"\x01", id="no member"),
        pytest.param(b"\x01" + MEMBER[:15] + MEMBER[16:], id="a creation time of 15 digits"),
        pytest.param(b"\x01" + b"x" + MEMBER[1:], id="a creation time that is no number"),
        pytest.param(b"\x01" + MEMBER.partition(b":")[0] + b":", id="no session id"),
        pytest.param(b"\x01" + MEMBER.replace(b":", b"-"), id="no separator"),
    ],
)
def test_a_forged_token_still_names_only_a_place_of_this_layout(cursor):
    """A token checked as a listing checks one (what one who read this code
    could forge), of another layout than the listing's."""
    assert refused(paging.page_token("ListSessions", "acme", cursor)) == INVALID_TOKEN
