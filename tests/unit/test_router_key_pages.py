"""ListKeys' pages (AIP-158, services/router/keys.py): the page size a
request gets, and page tokens, which name a place in one tenant's listing
and nothing else. The pages themselves, on a real Redis, are covered by
tests/integration/test_router_keys.py."""

import base64
import math
import string

import grpc
import pytest

from meshgate import paging
from meshgate.config import hash_api_key
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router import keys as keys_module
from services.router.keys import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageCursor, page_size

# Fixed: a failure reads the same each run.
CURSOR = PageCursor(1_764_862_706.123456, hash_api_key("mgk-" + "k" * 43)[:16])
TOKEN = CURSOR.token("acme")
BASE64_URL = string.ascii_letters + string.digits + "-_"


def refused(token: str, tenant_id: str = "acme") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(MeshgateError) as caught:
        PageCursor.of_token(token, tenant_id)
    return caught.value.code, caught.value.reason


INVALID_TOKEN = (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_PAGE_TOKEN)


@pytest.mark.parametrize(("requested", "size"), [(0, DEFAULT_PAGE_SIZE), (1, 1), (7, 7), (1000, 1000)])
def test_a_page_holds_what_page_size_asks_and_zero_means_the_default(requested, size):
    assert page_size(requested) == size


@pytest.mark.parametrize("requested", [MAX_PAGE_SIZE + 1, 2**31 - 1])
def test_a_page_size_over_the_maximum_is_the_maximum(requested):
    assert page_size(requested) == MAX_PAGE_SIZE == 1000


@pytest.mark.parametrize("created_at", [CURSOR.created_at, 0.0, 5e-324, 1.0 / 3, 253_402_300_799.999999])
def test_a_token_names_its_place_exactly(created_at):
    # Exactly: a score one ulp off would skip or repeat keys created at it.
    cursor = PageCursor(created_at, CURSOR.key_id)
    assert PageCursor.of_token(cursor.token("acme"), "acme") == cursor


def test_a_token_is_opaque_and_url_safe():
    assert set(TOKEN) <= set(BASE64_URL)
    assert CURSOR.key_id not in TOKEN
    raw = base64.urlsafe_b64decode(TOKEN + "==")
    assert b"acme" not in raw
    # No more of the key's hash than its id, which ListKeys shows anyway.
    assert bytes.fromhex(CURSOR.key_id) in raw
    assert bytes.fromhex(hash_api_key("mgk-" + "k" * 43))[8:16] not in raw


def _checked(version: int, created_at: float, tenant_id: str = "acme") -> str:
    """A token made as a listing makes one, of any version and score: what
    one who read this code could forge."""
    cursor = keys_module._PAGE_CURSOR.pack(version, created_at, bytes.fromhex(CURSOR.key_id))
    return paging.page_token("ListKeys", tenant_id, cursor)


def test_a_forged_token_still_names_only_a_finite_place_of_this_layout():
    assert PageCursor.of_token(_checked(1, 2.5), "acme") == PageCursor(2.5, CURSOR.key_id)
    assert refused(_checked(2, 2.5)) == INVALID_TOKEN
    # Redis refuses a NaN score: that would be an INTERNAL error, not the caller's.
    for created_at in (math.nan, math.inf, -math.inf):
        assert refused(_checked(1, created_at)) == INVALID_TOKEN
