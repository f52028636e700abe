from meshgate.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AssemblyStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASSEMBLY_STRATEGY_UNSPECIFIED: _ClassVar[AssemblyStrategy]
    ASSEMBLY_STRATEGY_ADAPTIVE: _ClassVar[AssemblyStrategy]
    ASSEMBLY_STRATEGY_NEWEST: _ClassVar[AssemblyStrategy]

class Disposition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISPOSITION_UNSPECIFIED: _ClassVar[Disposition]
    DISPOSITION_INCLUDED: _ClassVar[Disposition]
    DISPOSITION_SUMMARIZED: _ClassVar[Disposition]
    DISPOSITION_DROPPED: _ClassVar[Disposition]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_SESSION: _ClassVar[Source]
    SOURCE_REQUEST: _ClassVar[Source]
    SOURCE_SUMMARY: _ClassVar[Source]
    SOURCE_PINNED_FACT: _ClassVar[Source]
    SOURCE_TRANSCRIPT: _ClassVar[Source]

class InclusionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INCLUSION_REASON_UNSPECIFIED: _ClassVar[InclusionReason]
    INCLUSION_REASON_SYSTEM: _ClassVar[InclusionReason]
    INCLUSION_REASON_REQUEST: _ClassVar[InclusionReason]
    INCLUSION_REASON_RECENCY: _ClassVar[InclusionReason]
    INCLUSION_REASON_RELEVANCE: _ClassVar[InclusionReason]
    INCLUSION_REASON_PINNED: _ClassVar[InclusionReason]
    INCLUSION_REASON_SUMMARY: _ClassVar[InclusionReason]
    INCLUSION_REASON_TRANSCRIPT: _ClassVar[InclusionReason]
ASSEMBLY_STRATEGY_UNSPECIFIED: AssemblyStrategy
ASSEMBLY_STRATEGY_ADAPTIVE: AssemblyStrategy
ASSEMBLY_STRATEGY_NEWEST: AssemblyStrategy
DISPOSITION_UNSPECIFIED: Disposition
DISPOSITION_INCLUDED: Disposition
DISPOSITION_SUMMARIZED: Disposition
DISPOSITION_DROPPED: Disposition
SOURCE_UNSPECIFIED: Source
SOURCE_SESSION: Source
SOURCE_REQUEST: Source
SOURCE_SUMMARY: Source
SOURCE_PINNED_FACT: Source
SOURCE_TRANSCRIPT: Source
INCLUSION_REASON_UNSPECIFIED: InclusionReason
INCLUSION_REASON_SYSTEM: InclusionReason
INCLUSION_REASON_REQUEST: InclusionReason
INCLUSION_REASON_RECENCY: InclusionReason
INCLUSION_REASON_RELEVANCE: InclusionReason
INCLUSION_REASON_PINNED: InclusionReason
INCLUSION_REASON_SUMMARY: InclusionReason
INCLUSION_REASON_TRANSCRIPT: InclusionReason

class Session(_message.Message):
    __slots__ = ("session_id", "tenant_id", "version", "messages", "create_time_ms", "update_time_ms", "compacted_turns", "pinned_turns", "pinned_facts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_TURNS_FIELD_NUMBER: _ClassVar[int]
    PINNED_TURNS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FACTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant_id: str
    version: int
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    create_time_ms: int
    update_time_ms: int
    compacted_turns: int
    pinned_turns: _containers.RepeatedScalarFieldContainer[int]
    pinned_facts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., version: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., create_time_ms: _Optional[int] = ..., update_time_ms: _Optional[int] = ..., compacted_turns: _Optional[int] = ..., pinned_turns: _Optional[_Iterable[int]] = ..., pinned_facts: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

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

class AppendTurnsRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "expected_version", "messages", "any_version", "turn_id", "key_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ANY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    expected_version: int
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    any_version: bool
    turn_id: str
    key_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., any_version: _Optional[bool] = ..., turn_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class AppendTurnsResponse(_message.Message):
    __slots__ = ("version", "replayed", "summary_usage")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_USAGE_FIELD_NUMBER: _ClassVar[int]
    version: int
    replayed: bool
    summary_usage: _containers.RepeatedCompositeFieldContainer[SummaryUsage]
    def __init__(self, version: _Optional[int] = ..., replayed: _Optional[bool] = ..., summary_usage: _Optional[_Iterable[_Union[SummaryUsage, _Mapping]]] = ...) -> None: ...

class SummaryUsage(_message.Message):
    __slots__ = ("model", "prompt_tokens", "completion_tokens", "summaries")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: int
    completion_tokens: int
    summaries: int
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., summaries: _Optional[int] = ...) -> None: ...

class TakeSummaryUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "take_id", "hold_until_acknowledged")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TAKE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLD_UNTIL_ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    take_id: str
    hold_until_acknowledged: bool
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., take_id: _Optional[str] = ..., hold_until_acknowledged: _Optional[bool] = ...) -> None: ...

class TakeSummaryUsageResponse(_message.Message):
    __slots__ = ("summary_usage", "take_id")
    SUMMARY_USAGE_FIELD_NUMBER: _ClassVar[int]
    TAKE_ID_FIELD_NUMBER: _ClassVar[int]
    summary_usage: _containers.RepeatedCompositeFieldContainer[SummaryUsage]
    take_id: str
    def __init__(self, summary_usage: _Optional[_Iterable[_Union[SummaryUsage, _Mapping]]] = ..., take_id: _Optional[str] = ...) -> None: ...

class AcknowledgeSummaryUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "take_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TAKE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    take_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., take_id: _Optional[str] = ...) -> None: ...

class AcknowledgeSummaryUsageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClaimOwedSummaryUsageRequest(_message.Message):
    __slots__ = ("owed_for_ms", "max_sessions")
    OWED_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    owed_for_ms: int
    max_sessions: int
    def __init__(self, owed_for_ms: _Optional[int] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class ClaimOwedSummaryUsageResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[OwedSummaryUsage]
    def __init__(self, sessions: _Optional[_Iterable[_Union[OwedSummaryUsage, _Mapping]]] = ...) -> None: ...

class OwedSummaryUsage(_message.Message):
    __slots__ = ("tenant_id", "session_id", "key_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    key_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class AssembleContextRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "new_messages", "model", "max_prompt_tokens", "at_version", "rebuild_summaries", "strategy", "append_reservation")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REBUILD_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    APPEND_RESERVATION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    new_messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    model: str
    max_prompt_tokens: int
    at_version: int
    rebuild_summaries: RebuildSummaries
    strategy: AssemblyStrategy
    append_reservation: AppendReservation
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., new_messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., model: _Optional[str] = ..., max_prompt_tokens: _Optional[int] = ..., at_version: _Optional[int] = ..., rebuild_summaries: _Optional[_Union[RebuildSummaries, _Mapping]] = ..., strategy: _Optional[_Union[AssemblyStrategy, str]] = ..., append_reservation: _Optional[_Union[AppendReservation, _Mapping]] = ...) -> None: ...

class ReleaseAppendHoldRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "hold_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    hold_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., hold_id: _Optional[str] = ...) -> None: ...

class ReleaseAppendHoldResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RebuildSummaries(_message.Message):
    __slots__ = ("summary_ids",)
    SUMMARY_IDS_FIELD_NUMBER: _ClassVar[int]
    summary_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, summary_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AppendReservation(_message.Message):
    __slots__ = ("turn_count", "size_bytes", "expected_version", "hold_id", "hold_for_ms")
    TURN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    HOLD_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    turn_count: int
    size_bytes: int
    expected_version: int
    hold_id: str
    hold_for_ms: int
    def __init__(self, turn_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., expected_version: _Optional[int] = ..., hold_id: _Optional[str] = ..., hold_for_ms: _Optional[int] = ...) -> None: ...

class PinToSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "message_index", "fact", "expected_version")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FACT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    message_index: int
    fact: str
    expected_version: int
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., message_index: _Optional[int] = ..., fact: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class UnpinFromSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "message_index", "fact")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FACT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    message_index: int
    fact: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., message_index: _Optional[int] = ..., fact: _Optional[str] = ...) -> None: ...

class UnpinFromSessionResponse(_message.Message):
    __slots__ = ("pin_count",)
    PIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    pin_count: int
    def __init__(self, pin_count: _Optional[int] = ...) -> None: ...

class PrefetchSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class PrefetchSessionResponse(_message.Message):
    __slots__ = ("already_hot",)
    ALREADY_HOT_FIELD_NUMBER: _ClassVar[int]
    already_hot: bool
    def __init__(self, already_hot: _Optional[bool] = ...) -> None: ...

class PinToSessionResponse(_message.Message):
    __slots__ = ("pin_count",)
    PIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    pin_count: int
    def __init__(self, pin_count: _Optional[int] = ...) -> None: ...

class AssembleContextResponse(_message.Message):
    __slots__ = ("messages", "manifest", "session_version", "inputs", "assembly_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ASSEMBLY_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    manifest: ContextManifest
    session_version: int
    inputs: AssemblyInputs
    assembly_id: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., manifest: _Optional[_Union[ContextManifest, _Mapping]] = ..., session_version: _Optional[int] = ..., inputs: _Optional[_Union[AssemblyInputs, _Mapping]] = ..., assembly_id: _Optional[str] = ...) -> None: ...

class SummaryRef(_message.Message):
    __slots__ = ("summary_id", "first_turn", "end_turn", "first_version", "end_version", "method")
    SUMMARY_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TURN_FIELD_NUMBER: _ClassVar[int]
    END_TURN_FIELD_NUMBER: _ClassVar[int]
    FIRST_VERSION_FIELD_NUMBER: _ClassVar[int]
    END_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    summary_id: str
    first_turn: int
    end_turn: int
    first_version: int
    end_version: int
    method: str
    def __init__(self, summary_id: _Optional[str] = ..., first_turn: _Optional[int] = ..., end_turn: _Optional[int] = ..., first_version: _Optional[int] = ..., end_version: _Optional[int] = ..., method: _Optional[str] = ...) -> None: ...

class AssemblyInputs(_message.Message):
    __slots__ = ("tenant_id", "session_id", "session_version", "model", "max_prompt_tokens", "strategy", "tokenizer", "new_messages_sha256", "summaries", "packs_older_turns", "ranking", "dense_scored", "pins_sha256", "compacted_turns", "session_create_time_ms", "recency_floor_turns", "context_window_tokens", "counter_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    NEW_MESSAGES_SHA256_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    PACKS_OLDER_TURNS_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORED_FIELD_NUMBER: _ClassVar[int]
    PINS_SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPACTED_TURNS_FIELD_NUMBER: _ClassVar[int]
    SESSION_CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    RECENCY_FLOOR_TURNS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNTER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    session_version: int
    model: str
    max_prompt_tokens: int
    strategy: str
    tokenizer: str
    new_messages_sha256: str
    summaries: _containers.RepeatedCompositeFieldContainer[SummaryRef]
    packs_older_turns: bool
    ranking: str
    dense_scored: bool
    pins_sha256: str
    compacted_turns: int
    session_create_time_ms: int
    recency_floor_turns: int
    context_window_tokens: int
    counter_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., session_version: _Optional[int] = ..., model: _Optional[str] = ..., max_prompt_tokens: _Optional[int] = ..., strategy: _Optional[str] = ..., tokenizer: _Optional[str] = ..., new_messages_sha256: _Optional[str] = ..., summaries: _Optional[_Iterable[_Union[SummaryRef, _Mapping]]] = ..., packs_older_turns: _Optional[bool] = ..., ranking: _Optional[str] = ..., dense_scored: _Optional[bool] = ..., pins_sha256: _Optional[str] = ..., compacted_turns: _Optional[int] = ..., session_create_time_ms: _Optional[int] = ..., recency_floor_turns: _Optional[int] = ..., context_window_tokens: _Optional[int] = ..., counter_id: _Optional[str] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "version", "new_session_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    version: int
    new_session_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., version: _Optional[int] = ..., new_session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class RevertSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "version", "expected_version", "any_version")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ANY_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    version: int
    expected_version: int
    any_version: bool
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., version: _Optional[int] = ..., expected_version: _Optional[int] = ..., any_version: _Optional[bool] = ...) -> None: ...

class RevertSessionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ManifestEntry(_message.Message):
    __slots__ = ("source", "index", "role", "tokens", "disposition", "summary_id", "reason", "relevance", "packed")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DISPOSITION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    source: Source
    index: int
    role: _common_pb2.Role
    tokens: int
    disposition: Disposition
    summary_id: str
    reason: InclusionReason
    relevance: float
    packed: bool
    def __init__(self, source: _Optional[_Union[Source, str]] = ..., index: _Optional[int] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., tokens: _Optional[int] = ..., disposition: _Optional[_Union[Disposition, str]] = ..., summary_id: _Optional[str] = ..., reason: _Optional[_Union[InclusionReason, str]] = ..., relevance: _Optional[float] = ..., packed: _Optional[bool] = ...) -> None: ...

class ContextManifest(_message.Message):
    __slots__ = ("entries", "prompt_tokens", "budget_tokens", "tokenizer")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ManifestEntry]
    prompt_tokens: int
    budget_tokens: int
    tokenizer: str
    def __init__(self, entries: _Optional[_Iterable[_Union[ManifestEntry, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., tokenizer: _Optional[str] = ...) -> None: ...
