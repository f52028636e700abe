"""Every ErrorInfo reason meshgate sends, spelled once.

A reason is the machine-readable half of a failure (AIP-193): callers branch
on it, so one failure has one reason in every service. Each member is
documented by the string under it; docs/errors.md's table lists the ones
a router caller meets, with compatibility notes for reasons that were merged.
New reasons go here, never as string literals at the raise.

``Reason`` is a ``StrEnum``: a member is the string it names, so it goes into
``ErrorInfo.reason`` as is and compares equal to the string a client reads.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list) -> str:
        # StrEnum's auto() would lower-case the name; a reason is its name.
        return name

    # --- who is calling (UNAUTHENTICATED, PERMISSION_DENIED) ---------------
    API_KEY_MISSING = enum.auto()
    """The call carries no 'authorization: Bearer <key>' header."""

    UNSUPPORTED_AUTH_SCHEME = enum.auto()
    """The authorization header is not a Bearer token."""

    API_KEY_INVALID = enum.auto()
    """The API key belongs to no tenant."""

    MODEL_NOT_ALLOWED = enum.auto()
    """The tenant may not use this model."""

    API_KEY_REVOKED = enum.auto()
    """The API key was revoked (or rotated away) through the AdminService."""

    API_KEY_EXPIRED = enum.auto()
    """The API key's expires_at has passed."""

    ADMIN_REQUIRED = enum.auto()
    """PERMISSION_DENIED: only the admin credential (router.admin_api_key_sha256) may do this."""

    PEER_NOT_ALLOWED = enum.auto()
    """The mesh peer's certificate names a service not allowed to call this one."""

    METHOD_NOT_ALLOWED = enum.auto()
    """The mesh peer may not call this method."""

    TENANT_TOKEN_MISSING = enum.auto()
    """An internal call carries no router-signed tenant token."""

    TENANT_TOKEN_INVALID = enum.auto()
    """The tenant token is forged, expired or for another service."""

    TENANT_MISMATCH = enum.auto()
    """The request names another tenant than its tenant token."""

    # --- the request itself (INVALID_ARGUMENT) -----------------------------
    MALFORMED_REQUEST = enum.auto()
    """The bytes are not a valid message (strings must be UTF-8)."""

    EMPTY_MESSAGES = enum.auto()
    """The request has no messages (was also NO_MESSAGES in context, MISSING_MESSAGES in cache)."""

    TOO_MANY_MESSAGES = enum.auto()
    """More messages than the service accepts in one request."""

    INVALID_ROLE = enum.auto()
    """A message has no valid role."""

    MESSAGE_TOO_LARGE = enum.auto()
    """A message's content is larger than the configured limit."""

    LAST_MESSAGE_NOT_USER = enum.auto()
    """The last message of a turn is not the user's."""

    INVALID_CACHE_POLICY = enum.auto()
    """cache_policy is not a known value."""

    INVALID_MAX_TOKENS = enum.auto()
    """max_tokens is zero or negative."""

    MAX_TOKENS_TOO_LARGE = enum.auto()
    """max_tokens is above the model's output limit."""

    INVALID_TEMPERATURE = enum.auto()
    """temperature is negative, too large, NaN or infinite."""

    INVALID_TOP_P = enum.auto()
    """top_p is outside (0, 1] or not a number."""

    INVALID_SEED = enum.auto()
    """seed is negative."""

    INVALID_STOP = enum.auto()
    """Too many stop sequences, or one empty or too long."""

    TEMPLATE_VARIABLE_MISSING = enum.auto()
    """A template's message uses a variable the request does not give (metadata ``variable``)."""

    TEMPLATE_VARIABLE_UNKNOWN = enum.auto()
    """The request gives a variable the template does not use (metadata ``variable``)."""

    TEMPLATE_MODEL_NOT_ALLOWED = enum.auto()
    """The request's model is not one of the template's models (metadata ``model``)."""

    TEMPLATE_RENDER_TOO_LARGE = enum.auto()
    """A template's message, filled with the request's variables, would be
    larger than the router's max_message_bytes (metadata ``template``,
    ``variable``: the one making most of it, ``limit``); refused before filling."""

    INVALID_USAGE_PERIOD = enum.auto()
    """A usage query's days are negative or beyond the ledger's retention."""

    INVALID_LIMIT = enum.auto()
    """A key's limit is zero or negative, or fail_closed names an unknown limit."""

    INVALID_KEY_SPEC = enum.auto()
    """A key's tenant id, models (an empty name), label or expiry is not acceptable;
    the message says which."""

    TENANT_REQUIRED = enum.auto()
    """An internal request names no tenant (was also MISSING_TENANT in cache)."""

    INVALID_REQUEST_ID = enum.auto()
    """CreateKey's, RotateKey's, ForkSession's or CreateSession's request_id is not
    a UUID4 in its 36-character form (AIP-155), or a ForkSession's comes with a
    new_session_id (a CreateSession's with a session_id)."""

    INVALID_TENANT_ID = enum.auto()
    """An admin call names a tenant id no tenant can have (1-128 printable
    characters, no whitespace or braces)."""

    INVALID_PAGE_SIZE = enum.auto()
    """A listing's page_size is negative (AIP-158)."""

    INVALID_PAGE_TOKEN = enum.auto()
    """A listing's page_token is not a next_page_token of a listing with the
    request's filters (another tenant's, altered, or made up)."""

    MISSING_MODEL = enum.auto()
    """A cache request names no model."""

    SCOPE_TOO_LARGE = enum.auto()
    """A cache request's tenant, model, parameters or route, or a context request's tenant, are larger
    than any the router sends."""

    MISSING_ANSWER = enum.auto()
    """A cache store carries no answer text."""

    INVALID_TTL = enum.auto()
    """A cache entry's time to live is outside 0..cache.ttl_s."""

    INVALID_STORE_FENCE = enum.auto()
    """A cache Store's store_fence is none a Lookup gives."""

    INVALID_USAGE = enum.auto()
    """A cache Store's answer carries negative token counts."""

    INVALID_SELECTED_MODEL = enum.auto()
    """ReportWrongHit's selected_model is not one the request's alias answers
    as: one of the two it selects between, or the alias itself."""

    INVALID_ENTRY_ID = enum.auto()
    """The cache entry id is not one the cache issues."""

    INVALID_SESSION_ID = enum.auto()
    """The session id is not one the context service issues."""

    INVALID_VERSION = enum.auto()
    """A session version is negative, or an assembly without a session names one but 0
    (at_version)."""

    INVALID_TURN_ID = enum.auto()
    """A turn id is too long (over 128 bytes) or holds whitespace (AppendTurns)."""

    INVALID_TAKE_ID = enum.auto()
    """A take id is too long (over 128 bytes) or holds whitespace, or none names a take
    held until acknowledged (TakeSummaryUsage, AcknowledgeSummaryUsage)."""

    INVALID_KEY_ID = enum.auto()
    """A key_id is not a key's id: RotateKey's or RevokeKey's is not 16 hex
    digits (either case); an append's is neither empty nor 16 lower-case hex
    digits (AppendTurns)."""

    INVALID_TOKEN_BUDGET = enum.auto()
    """The prompt token budget is zero or negative."""

    INVALID_APPEND_RESERVATION = enum.auto()
    """An assembly's append_reservation is negative, has no session_id, or has at_version (a rebuild)."""

    UNKNOWN_STRATEGY = enum.auto()
    """An assembly request names a strategy this service does not know."""

    INVALID_PIN = enum.auto()
    """A pin names neither a turn nor a fact, a negative message_index (metadata ``field``),
    or its fact is empty or too large."""

    EMPTY_TEXTS = enum.auto()
    """An embedding request has no texts."""

    TOO_MANY_TEXTS = enum.auto()
    """An embedding request has more texts than the limit."""

    TEXT_TOO_LARGE = enum.auto()
    """A text to embed is larger than the limit."""

    PROMPT_TOO_LARGE = enum.auto()
    """The rendered prompt is larger than inference.max_prompt_bytes (UTF-8 bytes), or a
    cache request's prompt holds more text than the cache takes."""

    CONTEXT_WINDOW_EXCEEDED = enum.auto()
    """The new messages alone do not fit the model's window."""

    CHAT_TEMPLATE_REJECTED = enum.auto()
    """The model's chat template refuses this conversation."""

    INVALID_GENERATION_REQUEST = enum.auto()
    """The model refused the generation request; the message says why."""

    INVALID_EMBEDDING_REQUEST = enum.auto()
    """The embedding model refused the request; the message says why."""

    UNSUPPORTED_PARAMETER = enum.auto()
    """An HTTP request uses an OpenAI parameter meshgate does not implement
    (tools, n > 1, logprobs, ...); refused rather than ignored."""

    BODY_TOO_LARGE = enum.auto()
    """An HTTP request body is larger than router.http_max_body_bytes (HTTP 413)."""

    HEADERS_TOO_LARGE = enum.auto()
    """An HTTP request's URL and header fields are larger than
    router.http_max_header_bytes (HTTP 431; the connection is closed)."""

    UNSUPPORTED_CONTENT_ENCODING = enum.auto()
    """INVALID_ARGUMENT: an HTTP request's body is sent in a content coding
    (Content-Encoding: gzip, br, ...) the edge does not decode (HTTP 415,
    with Accept-Encoding: identity); send it uncompressed."""

    UNSUPPORTED_TRANSFER_CODING = enum.auto()
    """UNIMPLEMENTED: an HTTP request's Transfer-Encoding names a coding other
    than chunked, which the edge does not decode (HTTP 501; the connection
    is closed: where the body ends is not known)."""

    REQUEST_BODY_TIMEOUT = enum.auto()
    """DEADLINE_EXCEEDED: an HTTP request's body did not arrive in full within
    router.http_body_timeout_s of its headers (HTTP 408; the connection is closed)."""

    UNKNOWN_ENDPOINT = enum.auto()
    """UNIMPLEMENTED: the HTTP edge serves no such path (HTTP 404)."""

    METHOD_NOT_SUPPORTED = enum.auto()
    """UNIMPLEMENTED: the HTTP path takes another method (HTTP 405)."""

    METHOD_NOT_IMPLEMENTED = enum.auto()
    """UNIMPLEMENTED: the service's API has this gRPC method, but its servicer
    does not implement it, or no service there has a method of that name
    (metadata ``method``)."""

    # --- what the request names (NOT_FOUND, ALREADY_EXISTS, ABORTED) -------
    MODEL_NOT_FOUND = enum.auto()
    """No model of that name is configured."""

    TEMPLATE_NOT_FOUND = enum.auto()
    """No prompt template of that name (or that version) is configured."""

    API_KEY_NOT_FOUND = enum.auto()
    """No stored API key has this key id (keys of the configuration file are not managed)."""

    SESSION_NOT_FOUND = enum.auto()
    """No such session for this tenant (also another tenant's session)."""

    CACHE_ENTRY_NOT_FOUND = enum.auto()
    """NOT_FOUND: a wrong-hit report names no entry the cache holds in the
    request's scope (expired and trimmed, evicted, invalidated, or never
    stored), and the request was never reported for it before."""

    SESSION_EXISTS = enum.auto()
    """A session with this id already exists."""

    REQUEST_ID_REUSED = enum.auto()
    """ALREADY_EXISTS: a CreateKey or RotateKey request_id already answered
    another request (another body or method) within its retention, or a
    CreateSession's or ForkSession's made a session, which still lives,
    for another request (the other method's, or a fork of another source or
    version): draw a new id."""

    PIN_TARGET_NOT_FOUND = enum.auto()
    """A pin names a turn the session does not hold (metadata ``turns``: how many it holds)."""

    PIN_NOT_FOUND = enum.auto()
    """NOT_FOUND: an unpin names a pin the session does not hold."""

    PIN_UNAVAILABLE = enum.auto()
    """This context service keeps no turn index, so it cannot pin."""

    TOO_MANY_PINS = enum.auto()
    """FAILED_PRECONDITION: the session holds the most pins it may (metadata ``limit``)."""

    VERSION_CONFLICT = enum.auto()
    """The session is not at the expected version (metadata current_version)."""

    VERSION_NOT_FOUND = enum.auto()
    """The session has no such version: never reached, or undone by a revert
    (metadata ``current_version``)."""

    VERSION_COMPACTED = enum.auto()
    """FAILED_PRECONDITION: reading, forking or reverting to that version, or
    pinning that turn, needs the texts of turns compacted into summaries
    since (metadata ``compacted_version``)."""

    CACHE_KEY_WRONG_TYPE = enum.auto()
    """FAILED_PRECONDITION: a cache key holds another type in Redis than the
    cache keeps there (an operator's or another program's write), and the
    call cannot go on without it: metadata ``key_kind`` (which of the cache's
    keys: e.g. ``invalidation marks``, ``stats``), ``key`` (clipped) and
    ``held_type``; the message says what puts it right."""

    USAGE_TOTALS_UNREADABLE = enum.auto()
    """FAILED_PRECONDITION: a tenant's usage totals of a day cannot be read
    as the router writes them (its key holds another type, or a total is
    not an integer: an operator's or another program's write), so GetUsage
    cannot add them up: metadata ``key`` (clipped) and ``held``; the router
    writes no records there until it is mended (each logged, given up)."""

    RESPONSE_TOO_LARGE = enum.auto()
    """RESOURCE_EXHAUSTED: the answer would pass the mesh's message bound
    (GetSession of a session held under context.max_session_bytes = 0, or a
    cache Store of an answer no Lookup could return; metadata ``bytes``,
    ``limit``)."""

    SESSION_FULL = enum.auto()
    """RESOURCE_EXHAUSTED: the append would take the session past context.max_turns
    or context.max_session_bytes (metadata ``unit``, ``turns`` or ``bytes``;
    ``limit``; what the session holds, under the unit's name; and
    ``max_turns`` for the turn cap)."""

    SESSION_QUOTA_EXCEEDED = enum.auto()
    """RESOURCE_EXHAUSTED: a session write (create, fork, append, pin) would
    take what the tenant's sessions hold in Redis past
    context.max_bytes_per_tenant (metadata ``limit`` max_bytes_per_tenant,
    ``scope`` tenant, ``limit_value``, ``bytes``: what they hold)."""

    CACHE_QUOTA_EXCEEDED = enum.auto()
    """RESOURCE_EXHAUSTED: a cache Store would take the tenant's entries past
    cache.max_bytes_per_tenant (metadata ``limit`` max_bytes_per_tenant, ``scope``
    tenant, ``limit_value``, ``bytes``: what its last two windows stored). The
    router logs it and leaves the turn's answer uncached."""

    # --- limits (RESOURCE_EXHAUSTED; metadata ``limit`` and ``scope``) -----
    RATE_LIMITED = enum.auto()
    """A per-minute or concurrent-stream limit is reached; RetryInfo says when to retry."""

    BUDGET_EXHAUSTED = enum.auto()
    """A daily or monthly token or cost budget is spent; RetryInfo points at the period end."""

    REQUEST_EXCEEDS_LIMIT = enum.auto()
    """This request alone is larger than a limit: retrying cannot help."""

    SERVICE_BUSY = enum.auto()
    """A service replica is handling its most calls at once (``<service>.max_concurrent_rpcs``;
    metadata ``limit`` max_concurrent_rpcs, ``scope`` replica, ``limit_value``, ``service``).
    The router passes a busy service behind it on as UNAVAILABLE (DOWNSTREAM_FAILED,
    NO_DEPLOYMENT_AVAILABLE) with a RetryInfo of its own (meshgate/errors.py busy_unavailable).
    Also the router's HTTP edge when its body parser holds its most large bodies, or one waited
    past its timeout (UNAVAILABLE, 503; ``limit`` queued_large_bodies, ``scope`` replica:
    services/router/body_parser.py)."""

    SERVICE_STOPPING = enum.auto()
    """The replica is stopping (draining): a ChatSession stream ends between
    turns, a turn it read then not begun (metadata ``session_id`` and, after
    a turn, ``session_version``); open the stream again, another replica answers."""

    TOO_MANY_SESSION_STREAMS = enum.auto()
    """The tenant holds its most ChatSession streams open on this router replica
    (``router.max_session_streams_per_tenant``; metadata ``limit``, ``scope`` tenant,
    ``limit_value``): one must close first."""

    TOO_MANY_CALLS_IN_FLIGHT = enum.auto()
    """The tenant has its most RouterService calls in flight on this router replica, its
    open streams included (``router.max_concurrent_rpcs_per_tenant``; metadata ``limit``,
    ``scope`` tenant, ``limit_value``), refused before the request is read: one must end first.
    Also the HTTP edge when the tenant has its most large bodies waiting for the router's body
    parser (``limit`` queued_large_bodies: services/router/body_parser.py), with a RetryInfo."""

    TOO_MANY_QUEUED_GENERATIONS = enum.auto()
    """The tenant has its most generations waiting for a model's generation slots on an
    inference replica (``inference.max_queued_generations_per_tenant``; metadata ``limit``,
    ``scope`` tenant, ``limit_value``, ``model``): one must start or end first."""

    LIMITS_UNAVAILABLE = enum.auto()
    """UNAVAILABLE: Redis is unreachable and a limit that applies is configured to fail closed."""

    # --- the mesh (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED): retryable ---
    NO_DEPLOYMENT_AVAILABLE = enum.auto()
    """No deployment of the model could take the request."""

    NO_READY_BACKEND = enum.auto()
    """No Triton server is ready for the model."""

    REDIS_UNAVAILABLE = enum.auto()
    """Redis cannot be reached."""

    EMBEDDER_UNAVAILABLE = enum.auto()
    """The cache needed a question's embedding and could not have it (a wrong-hit report on a
    replica that has not embedded yet, whose embedder is down or overloaded: the sub-partition
    of the entry is that of the embedder's revision); retry."""

    EMBEDDER_CHANGED = enum.auto()
    """An Embed's texts were embedded by two revisions of the embedding model (Triton
    servers of two revisions side by side, an upgrade under way), still after the fewer
    were embedded again (services/inference/shared_embeddings.EMBED_AGAIN_ROUNDS): their
    vectors are not comparable, so none is answered; metadata ``revisions`` names them."""

    STREAM_ENDED_EARLY = enum.auto()
    """A generation stream ended before its final message (was also GENERATION_INCOMPLETE
    in the router); delivered_* metadata says how much went out."""

    DOWNSTREAM_FAILED = enum.auto()
    """A call to another service failed without a meshgate status (a transport failure),
    every attempt found it busy (SERVICE_BUSY: then ``code`` RESOURCE_EXHAUSTED and a RetryInfo),
    or it refused the calling service's own mesh credentials (PEER_NOT_ALLOWED, TENANT_TOKEN_*,
    ...: the mesh is misconfigured, not the caller; UNAVAILABLE); metadata ``service`` and
    ``code`` name it (was <SERVICE>_<CODE>, e.g. CONTEXT_UNAVAILABLE)."""

    DEADLINE_EXCEEDED = enum.auto()
    """The caller's own time is spent: its deadline passed before Triton answered or
    during the router's call to another service (metadata ``service``), a shared embedding
    call outlived ``inference.embed_timeout_s``, or a generation's or an embeddings
    request's ``router.max_generation_s`` (metadata ``max_generation_s``) passed before
    another deployment or inference service could be tried, or during a try, or the caller's
    deadline came while the router replayed a cached answer (no ``service``). A call that
    ran past its own ``router.downstream_timeout_s`` with the caller's time left is
    DOWNSTREAM_FAILED."""

    TRITON_CANCELLED = enum.auto()
    """Triton cancelled the request (CANCELLED from the inference service; UNAVAILABLE
    through the router, which did not ask for it: errors.received_code)."""

    # --- ours (INTERNAL) ---------------------------------------------------
    INTERNAL = enum.auto()
    """A bug; its details are in the service's log, not in the status."""

    MODEL_ERROR = enum.auto()
    """The model failed inside Triton; the message is the model's."""

    BAD_EMBEDDING = enum.auto()
    """The embedding model answered with the wrong shape."""
