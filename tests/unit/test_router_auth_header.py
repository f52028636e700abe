"""How the router reads the authorization header (gRPC metadata and the
HTTP edge alike): which refusal a malformed one gets."""

from __future__ import annotations

import grpc
import pytest

from meshgate.config import RouterSettings
from meshgate.errors import MeshgateError
from meshgate.reasons import Reason
from services.router.auth import Authenticator

KEY = "header-key"


async def refusal(header: str | None) -> str:
    auth = Authenticator(RouterSettings(dev_api_key=KEY))
    metadata = [] if header is None else [("authorization", header)]
    with pytest.raises(MeshgateError) as raised:
        await auth.authenticate(metadata)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    return raised.value.reason


@pytest.mark.parametrize("header", [None, "", "Bearer", "bearer", "Bearer ", "Bearer   "])
async def test_the_bearer_scheme_without_a_key_is_a_missing_key(header):
    # "Bearer" alone names the right scheme: the key is what is missing, and
    # UNSUPPORTED_AUTH_SCHEME would send the caller after the wrong fix.
    assert await refusal(header) == Reason.API_KEY_MISSING


@pytest.mark.parametrize("header", ["Basic eDp5", "Bearer\tkey", KEY, "Bearerx key"])
async def test_another_scheme_is_unsupported(header):
    assert await refusal(header) == Reason.UNSUPPORTED_AUTH_SCHEME


# Space around the value is no part of it (HTTP's optional whitespace).
@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY} ", f" Bearer {KEY}"])
async def test_a_bearer_key_is_read_in_any_case_and_spacing(header):
    auth = Authenticator(RouterSettings(dev_api_key=KEY))
    assert (await auth.authenticate([("authorization", header)])).id == "dev"


@pytest.mark.parametrize("second", [f"Bearer {KEY}", "Bearer other-key", "Basic eDp5"])
async def test_two_authorization_headers_are_refused_whatever_they_hold(second):
    """A bug hunt's finding: the first of two was served, and a proxy in
    front may read the last (RFC 9110 §5.3: the field is no list)."""
    auth = Authenticator(RouterSettings(dev_api_key=KEY))
    with pytest.raises(MeshgateError) as raised:
        await auth.authenticate([("authorization", f"Bearer {KEY}"), ("authorization", second)])
    assert (raised.value.code, raised.value.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        Reason.API_KEY_INVALID,
    )
    assert "one authorization header" in raised.value.message
