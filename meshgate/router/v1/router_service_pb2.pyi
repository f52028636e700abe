from meshgate.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CachePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_POLICY_UNSPECIFIED: _ClassVar[CachePolicy]
    CACHE_POLICY_USE: _ClassVar[CachePolicy]
    CACHE_POLICY_BYPASS: _ClassVar[CachePolicy]
    CACHE_POLICY_REFRESH: _ClassVar[CachePolicy]

class CacheStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATUS_UNSPECIFIED: _ClassVar[CacheStatus]
    CACHE_STATUS_EXACT_HIT: _ClassVar[CacheStatus]
    CACHE_STATUS_SEMANTIC_HIT: _ClassVar[CacheStatus]
    CACHE_STATUS_MISS: _ClassVar[CacheStatus]
    CACHE_STATUS_BYPASSED: _ClassVar[CacheStatus]

class RateLimitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATE_LIMIT_KIND_UNSPECIFIED: _ClassVar[RateLimitKind]
    RATE_LIMIT_KIND_REQUESTS_PER_MINUTE: _ClassVar[RateLimitKind]
    RATE_LIMIT_KIND_TOKENS_PER_MINUTE: _ClassVar[RateLimitKind]
CACHE_POLICY_UNSPECIFIED: CachePolicy
CACHE_POLICY_USE: CachePolicy
CACHE_POLICY_BYPASS: CachePolicy
CACHE_POLICY_REFRESH: CachePolicy
CACHE_STATUS_UNSPECIFIED: CacheStatus
CACHE_STATUS_EXACT_HIT: CacheStatus
CACHE_STATUS_SEMANTIC_HIT: CacheStatus
CACHE_STATUS_MISS: CacheStatus
CACHE_STATUS_BYPASSED: CacheStatus
RATE_LIMIT_KIND_UNSPECIFIED: RateLimitKind
RATE_LIMIT_KIND_REQUESTS_PER_MINUTE: RateLimitKind
RATE_LIMIT_KIND_TOKENS_PER_MINUTE: RateLimitKind

class RateLimit(_message.Message):
    __slots__ = ("kind", "limit", "remaining", "reset_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_MS_FIELD_NUMBER: _ClassVar[int]
    kind: RateLimitKind
    limit: int
    remaining: int
    reset_ms: int
    def __init__(self, kind: _Optional[_Union[RateLimitKind, str]] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_ms: _Optional[int] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("model", "session_id", "messages", "parameters", "cache_policy", "expected_session_version", "template", "completion_may_carry_text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_MAY_CARRY_TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    parameters: _common_pb2.GenerationParameters
    cache_policy: CachePolicy
    expected_session_version: int
    template: TemplateInvocation
    completion_may_carry_text: bool
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ..., expected_session_version: _Optional[int] = ..., template: _Optional[_Union[TemplateInvocation, _Mapping]] = ..., completion_may_carry_text: _Optional[bool] = ...) -> None: ...

class TemplateInvocation(_message.Message):
    __slots__ = ("name", "version", "variables")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    variables: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., variables: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("delta", "completion")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    completion: ChatCompletion
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., completion: _Optional[_Union[ChatCompletion, _Mapping]] = ...) -> None: ...

class ChatSessionRequest(_message.Message):
    __slots__ = ("model", "session_id", "messages", "parameters", "cache_policy", "expected_session_version", "completion_may_carry_text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_MAY_CARRY_TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    parameters: _common_pb2.GenerationParameters
    cache_policy: CachePolicy
    expected_session_version: int
    completion_may_carry_text: bool
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ..., expected_session_version: _Optional[int] = ..., completion_may_carry_text: _Optional[bool] = ...) -> None: ...

class ChatSessionResponse(_message.Message):
    __slots__ = ("delta", "completion", "failure")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    completion: ChatCompletion
    failure: bytes
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., completion: _Optional[_Union[ChatCompletion, _Mapping]] = ..., failure: _Optional[bytes] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ChatCompletion(_message.Message):
    __slots__ = ("usage", "cache_status", "cache_similarity", "deployment", "trace_id", "session_id", "session_version", "finish_reason", "selected_model", "selection_reason", "selection_score", "text", "cache_entry_id", "rate_limits")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SELECTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    SELECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    SELECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    usage: _common_pb2.Usage
    cache_status: CacheStatus
    cache_similarity: float
    deployment: str
    trace_id: str
    session_id: str
    session_version: int
    finish_reason: str
    selected_model: str
    selection_reason: str
    selection_score: float
    text: str
    cache_entry_id: str
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    def __init__(self, usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cache_status: _Optional[_Union[CacheStatus, str]] = ..., cache_similarity: _Optional[float] = ..., deployment: _Optional[str] = ..., trace_id: _Optional[str] = ..., session_id: _Optional[str] = ..., session_version: _Optional[int] = ..., finish_reason: _Optional[str] = ..., selected_model: _Optional[str] = ..., selection_reason: _Optional[str] = ..., selection_score: _Optional[float] = ..., text: _Optional[str] = ..., cache_entry_id: _Optional[str] = ..., rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "version", "messages", "create_time_ms", "update_time_ms", "compacted_turns", "pinned_turns", "pinned_facts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_TURNS_FIELD_NUMBER: _ClassVar[int]
    PINNED_TURNS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FACTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    create_time_ms: int
    update_time_ms: int
    compacted_turns: int
    pinned_turns: _containers.RepeatedScalarFieldContainer[int]
    pinned_facts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., create_time_ms: _Optional[int] = ..., update_time_ms: _Optional[int] = ..., compacted_turns: _Optional[int] = ..., pinned_turns: _Optional[_Iterable[int]] = ..., pinned_facts: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionSummary]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("session_id", "version", "create_time_ms", "update_time_ms", "turn_count")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TURN_COUNT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    create_time_ms: int
    update_time_ms: int
    turn_count: int
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., create_time_ms: _Optional[int] = ..., update_time_ms: _Optional[int] = ..., turn_count: _Optional[int] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "version", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session_id", "version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RevertSessionRequest(_message.Message):
    __slots__ = ("session_id", "version", "expected_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: int
    expected_version: int
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class RevertSessionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PinToSessionRequest(_message.Message):
    __slots__ = ("session_id", "message_index", "fact", "expected_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FACT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message_index: int
    fact: str
    expected_version: int
    def __init__(self, session_id: _Optional[str] = ..., message_index: _Optional[int] = ..., fact: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class PinToSessionResponse(_message.Message):
    __slots__ = ("pin_count",)
    PIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    pin_count: int
    def __init__(self, pin_count: _Optional[int] = ...) -> None: ...

class UnpinFromSessionRequest(_message.Message):
    __slots__ = ("session_id", "message_index", "fact")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FACT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message_index: int
    fact: str
    def __init__(self, session_id: _Optional[str] = ..., message_index: _Optional[int] = ..., fact: _Optional[str] = ...) -> None: ...

class UnpinFromSessionResponse(_message.Message):
    __slots__ = ("pin_count",)
    PIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    pin_count: int
    def __init__(self, pin_count: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("alias", "context_window_tokens", "max_output_tokens")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    context_window_tokens: int
    max_output_tokens: int
    def __init__(self, alias: _Optional[str] = ..., context_window_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class ReportWrongHitRequest(_message.Message):
    __slots__ = ("request", "cache_entry_id", "selected_model")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    request: ChatRequest
    cache_entry_id: str
    selected_model: str
    def __init__(self, request: _Optional[_Union[ChatRequest, _Mapping]] = ..., cache_entry_id: _Optional[str] = ..., selected_model: _Optional[str] = ...) -> None: ...

class ReportWrongHitResponse(_message.Message):
    __slots__ = ("entry_removed",)
    ENTRY_REMOVED_FIELD_NUMBER: _ClassVar[int]
    entry_removed: bool
    def __init__(self, entry_removed: _Optional[bool] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "days")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    days: int
    def __init__(self, tenant_id: _Optional[str] = ..., days: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("tenant_id", "first_day", "last_day", "rows")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_DAY_FIELD_NUMBER: _ClassVar[int]
    LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    first_day: str
    last_day: str
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    def __init__(self, tenant_id: _Optional[str] = ..., first_day: _Optional[str] = ..., last_day: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key_id", "model", "requests", "failures", "cache_hits", "prompt_tokens", "completion_tokens", "saved_tokens", "cost_nano_usd", "latency_ms_total", "summaries", "summary_prompt_tokens", "summary_completion_tokens")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    model: str
    requests: int
    failures: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    saved_tokens: int
    cost_nano_usd: int
    latency_ms_total: int
    summaries: int
    summary_prompt_tokens: int
    summary_completion_tokens: int
    def __init__(self, key_id: _Optional[str] = ..., model: _Optional[str] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., cache_hits: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., saved_tokens: _Optional[int] = ..., cost_nano_usd: _Optional[int] = ..., latency_ms_total: _Optional[int] = ..., summaries: _Optional[int] = ..., summary_prompt_tokens: _Optional[int] = ..., summary_completion_tokens: _Optional[int] = ...) -> None: ...
