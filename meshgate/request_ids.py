"""AIP-155 request ids, as every service that takes one checks it and
tells a resend from another request: the AdminService's CreateKey and
RotateKey (services/router/request_ids.py) and ContextService.ForkSession
and CreateSession (services/context/servicer.py; the router's ForkSession
and CreateSession pass it on).

A request id is a UUID4 the client draws, in its 36-character form: one
spelling per id, and unguessable (122 random bits, where a UUID1 or UUID7
is mostly a clock), as AIP-155 asks and as the AdminService's sealed
answers need.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from meshgate.errors import MeshgateError, invalid_argument
from meshgate.reasons import Reason


def canonical(request_id: str) -> str | None:
    """``request_id`` in lower case; None where it is empty (each send then
    acts anew); INVALID_ARGUMENT INVALID_REQUEST_ID where it is not a UUID4."""
    if not request_id:
        return None
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        parsed = None
    # Only the 36-character form: UUID() also takes braces, "urn:uuid:"
    # and no hyphens, which would be one id under several spellings.
    if parsed is None or parsed.version != 4 or str(parsed) != request_id.lower():
        raise invalid_argument(
            Reason.INVALID_REQUEST_ID,
            "request_id must be a UUID4 written as 36 characters (8-4-4-4-12 hex digits)",
        )
    return str(parsed)


def digest(request: Message, normalize: Callable[[Message], None] | None = None) -> str:
    """SHA-256 (hex) of the request's message type and body without its
    request_id (after ``normalize``, given the copy): what a resend must
    match to be given the first send's answer."""
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")
    if normalize is not None:
        normalize(body)
    return hashlib.sha256(
        request.DESCRIPTOR.full_name.encode() + b"\0" + body.SerializeToString(deterministic=True)
    ).hexdigest()


def reused() -> MeshgateError:
    """What a send is told whose request id answered another request."""
    # Not INVALID_ARGUMENT: the request is fine alone, the id is taken (as
    # an entity's name would be); retrying it cannot help.
    return MeshgateError(
        grpc.StatusCode.ALREADY_EXISTS,
        Reason.REQUEST_ID_REUSED,
        "this request_id answered another request; draw a new one for this request",
    )
