from meshgate.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOOKUP_STATUS_UNSPECIFIED: _ClassVar[LookupStatus]
    LOOKUP_STATUS_EXACT_HIT: _ClassVar[LookupStatus]
    LOOKUP_STATUS_SEMANTIC_HIT: _ClassVar[LookupStatus]
    LOOKUP_STATUS_MISS: _ClassVar[LookupStatus]
LOOKUP_STATUS_UNSPECIFIED: LookupStatus
LOOKUP_STATUS_EXACT_HIT: LookupStatus
LOOKUP_STATUS_SEMANTIC_HIT: LookupStatus
LOOKUP_STATUS_MISS: LookupStatus

class CacheScope(_message.Message):
    __slots__ = ("tenant_id", "model", "parameters", "route")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    model: str
    parameters: _common_pb2.GenerationParameters
    route: str
    def __init__(self, tenant_id: _Optional[str] = ..., model: _Optional[str] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., route: _Optional[str] = ...) -> None: ...

class CachedAnswer(_message.Message):
    __slots__ = ("text", "usage", "deployment", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    usage: _common_pb2.Usage
    deployment: str
    finish_reason: str
    def __init__(self, text: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., deployment: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("scope", "messages", "semantic", "semantic_follows", "fence_only")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    FENCE_ONLY_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    semantic: bool
    semantic_follows: bool
    fence_only: bool
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., semantic: _Optional[bool] = ..., semantic_follows: _Optional[bool] = ..., fence_only: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("status", "answer", "similarity", "entry_id", "asked_entry_id", "store_fence", "expires_in_ms", "heartbeat_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ASKED_ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_FENCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ID_FIELD_NUMBER: _ClassVar[int]
    status: LookupStatus
    answer: CachedAnswer
    similarity: float
    entry_id: str
    asked_entry_id: str
    store_fence: str
    expires_in_ms: int
    heartbeat_id: str
    def __init__(self, status: _Optional[_Union[LookupStatus, str]] = ..., answer: _Optional[_Union[CachedAnswer, _Mapping]] = ..., similarity: _Optional[float] = ..., entry_id: _Optional[str] = ..., asked_entry_id: _Optional[str] = ..., store_fence: _Optional[str] = ..., expires_in_ms: _Optional[int] = ..., heartbeat_id: _Optional[str] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("scope", "messages", "answer", "ttl_seconds", "store_fence")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STORE_FENCE_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    answer: CachedAnswer
    ttl_seconds: int
    store_fence: str
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., answer: _Optional[_Union[CachedAnswer, _Mapping]] = ..., ttl_seconds: _Optional[int] = ..., store_fence: _Optional[str] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("entry_id", "invalidated_since_lookup")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    INVALIDATED_SINCE_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    invalidated_since_lookup: bool
    def __init__(self, entry_id: _Optional[str] = ..., invalidated_since_lookup: _Optional[bool] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("tenant_id", "model")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    model: str
    def __init__(self, tenant_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("entries_removed",)
    ENTRIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    entries_removed: int
    def __init__(self, entries_removed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("exact_hits", "semantic_hits", "misses", "stores", "entries", "semantic_threshold", "expected_false_hit_rate", "max_false_hit_rate", "verifier_rejections", "wrong_hit_reports")
    EXACT_HITS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FALSE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_FALSE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    WRONG_HIT_REPORTS_FIELD_NUMBER: _ClassVar[int]
    exact_hits: int
    semantic_hits: int
    misses: int
    stores: int
    entries: int
    semantic_threshold: float
    expected_false_hit_rate: float
    max_false_hit_rate: float
    verifier_rejections: int
    wrong_hit_reports: int
    def __init__(self, exact_hits: _Optional[int] = ..., semantic_hits: _Optional[int] = ..., misses: _Optional[int] = ..., stores: _Optional[int] = ..., entries: _Optional[int] = ..., semantic_threshold: _Optional[float] = ..., expected_false_hit_rate: _Optional[float] = ..., max_false_hit_rate: _Optional[float] = ..., verifier_rejections: _Optional[int] = ..., wrong_hit_reports: _Optional[int] = ...) -> None: ...

class ReportWrongHitRequest(_message.Message):
    __slots__ = ("scope", "messages", "entry_id")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    entry_id: str
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., entry_id: _Optional[str] = ...) -> None: ...

class ReportWrongHitResponse(_message.Message):
    __slots__ = ("entry_removed", "reports_in_partition")
    ENTRY_REMOVED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_IN_PARTITION_FIELD_NUMBER: _ClassVar[int]
    entry_removed: bool
    reports_in_partition: int
    def __init__(self, entry_removed: _Optional[bool] = ..., reports_in_partition: _Optional[int] = ...) -> None: ...
