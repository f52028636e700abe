"""Checks on a chat turn before any downstream work is spent on it."""

from __future__ import annotations

import grpc

from meshgate.common.v1 import common_pb2
from meshgate.config import ModelSettings, RouterSettings
from meshgate.errors import MeshgateError, aborted, invalid_argument, not_found
from meshgate.reasons import Reason
from meshgate.router.v1 import router_service_pb2
from meshgate.sampling import check_sampling
from meshgate.tokenization import ROLE_NAMES
from services.router.auth import Tenant

_CACHE_POLICIES = frozenset(router_service_pb2.CachePolicy.values())


def resolve_model(alias: str, tenant: Tenant, models: dict[str, ModelSettings]) -> ModelSettings:
    check_model_allowed(alias, tenant)
    model = models.get(alias)
    if not alias or model is None:
        raise not_found(Reason.MODEL_NOT_FOUND, f"unknown model {alias!r}", model=alias)
    return model


def check_model_allowed(alias: str, tenant: Tenant) -> None:
    """Permission before existence (AIP-211): a tenant whose key lists its
    models is refused any alias outside the list alike, whether or not one
    is configured. Told NOT_FOUND for a name that is not, it could probe
    which aliases exist, which its ListModels hides from it; PERMISSION_DENIED
    is what it was told already for one that is, and is true of both. No
    name at all is left to its caller's NOT_FOUND: it hides no alias."""
    if alias and not tenant.may_use(alias):
        raise MeshgateError(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.MODEL_NOT_ALLOWED,
            f"this key may not use model {alias!r} (ListModels, GET /v1/models: the models it may use)",
            {"model": alias},
        )


def check_message_count(count: int, max_messages: int) -> None:
    """router.max_messages: for a turn, and for the HTTP edge before it
    converts a single message of its JSON (each is a protobuf Message made
    on the event loop: 270,000 empty ones in an 8 MB body held the loop
    1.2 s, every other tenant's stream stalled with it)."""
    if count > max_messages:
        raise invalid_argument(Reason.TOO_MANY_MESSAGES, f"at most {max_messages} messages per turn")


def check_turn(turn, model: ModelSettings, settings: RouterSettings) -> int:
    """Validates messages and parameters; returns the max_tokens to use."""
    messages = turn.messages
    if not messages:
        raise invalid_argument(Reason.EMPTY_MESSAGES, "messages must not be empty")
    check_message_count(len(messages), settings.max_messages)
    limit = settings.max_message_bytes
    chars = 0
    for index, message in enumerate(messages):
        if message.role not in ROLE_NAMES:
            raise invalid_argument(Reason.INVALID_ROLE, f"messages[{index}] has no valid role")
        # A character is 1 to 4 UTF-8 bytes: only content whose length leaves
        # the answer open is encoded (admission counts the bytes once more,
        # for its estimate; a turn should not pay for encoding twice).
        length = len(message.content)
        chars += length
        if length > limit or (4 * length > limit and len(message.content.encode()) > limit):
            raise invalid_argument(
                Reason.MESSAGE_TOO_LARGE,
                f"messages[{index}] is larger than {limit} bytes",
                limit=str(limit),
            )
    # The same for the messages together (router.max_turn_bytes): counted in
    # bytes only where their characters leave the answer open.
    most = settings.max_turn_bytes
    if chars > most or (4 * chars > most and sum(len(m.content.encode()) for m in messages) > most):
        raise invalid_argument(
            Reason.MESSAGE_TOO_LARGE,
            f"the messages together are larger than {most} bytes (router.max_turn_bytes)",
            limit=str(most),
            scope="turn",
        )
    if messages[-1].role != common_pb2.ROLE_USER:
        raise invalid_argument(Reason.LAST_MESSAGE_NOT_USER, "the last message must be the user's")

    if turn.cache_policy not in _CACHE_POLICIES:
        raise invalid_argument(Reason.INVALID_CACHE_POLICY, f"unknown cache_policy {turn.cache_policy}")

    parameters = turn.parameters
    max_tokens = model.default_max_tokens
    if parameters.HasField("max_tokens"):
        max_tokens = parameters.max_tokens
        if max_tokens <= 0:
            raise invalid_argument(Reason.INVALID_MAX_TOKENS, "max_tokens must be positive")
        # Below the window too (ModelSettings.most_output_tokens).
        most = model.most_output_tokens
        if max_tokens > most:
            raise invalid_argument(
                Reason.MAX_TOKENS_TOO_LARGE, f"max_tokens may be at most {most}", limit=str(most)
            )
    check_sampling(parameters)
    return max_tokens


def check_expected_version(turn, session_id: str, create_session: bool) -> int | None:
    """A strict turn's expected session version (None: not strict), checked
    before the session a first turn creates is: that session starts at
    version 0, so any other is refused here, as its assembly would refuse
    it, rather than after the session was created (it stayed, empty). A
    turn of no session has no version to hold it to: refused, not answered
    as if the ordering it asked for had held (a review: a client setting
    it but no session id got an answer, saved nowhere, and no error)."""
    if not turn.HasField("expected_session_version"):
        return None
    if not (session_id or create_session):
        raise invalid_argument(
            Reason.UNSUPPORTED_PARAMETER,
            "expected_session_version applies to a turn of a session: set session_id, or leave it unset",
            field="expected_session_version",
        )
    expected = turn.expected_session_version
    if expected < 0:
        raise invalid_argument(
            Reason.INVALID_VERSION,
            "expected_session_version must not be negative",
            field="expected_session_version",
        )
    if create_session and expected != 0:
        raise aborted(
            Reason.VERSION_CONFLICT,
            "the session this turn creates starts at version 0",
            current_version="0",
        )
    return expected
