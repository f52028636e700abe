from meshgate.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "parameters", "completion_may_carry_text", "tenant_id", "background")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_MAY_CARRY_TEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    parameters: _common_pb2.GenerationParameters
    completion_may_carry_text: bool
    tenant_id: str
    background: bool
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., completion_may_carry_text: _Optional[bool] = ..., tenant_id: _Optional[str] = ..., background: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "completion")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    delta: GenerateDelta
    completion: GenerateCompletion
    def __init__(self, delta: _Optional[_Union[GenerateDelta, _Mapping]] = ..., completion: _Optional[_Union[GenerateCompletion, _Mapping]] = ...) -> None: ...

class GenerateDelta(_message.Message):
    __slots__ = ("text", "completion_tokens", "prompt_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    completion_tokens: int
    prompt_tokens: int
    def __init__(self, text: _Optional[str] = ..., completion_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateCompletion(_message.Message):
    __slots__ = ("usage", "finish_reason", "backend", "text")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    usage: _common_pb2.Usage
    finish_reason: str
    backend: str
    text: str
    def __init__(self, usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., finish_reason: _Optional[str] = ..., backend: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "count_tokens")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    COUNT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    count_tokens: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., count_tokens: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("dimensions", "vectors", "input_tokens", "model", "model_revision")
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    dimensions: int
    vectors: bytes
    input_tokens: int
    model: str
    model_revision: str
    def __init__(self, dimensions: _Optional[int] = ..., vectors: _Optional[bytes] = ..., input_tokens: _Optional[int] = ..., model: _Optional[str] = ..., model_revision: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "triton_model", "context_window_tokens", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRITON_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    triton_model: str
    context_window_tokens: int
    ready: bool
    def __init__(self, name: _Optional[str] = ..., triton_model: _Optional[str] = ..., context_window_tokens: _Optional[int] = ..., ready: _Optional[bool] = ...) -> None: ...

class GetBackendHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBackendHealthResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    def __init__(self, backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("address", "live", "ready", "in_flight", "models")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    address: str
    live: bool
    ready: bool
    in_flight: int
    models: _containers.RepeatedCompositeFieldContainer[BackendModel]
    def __init__(self, address: _Optional[str] = ..., live: _Optional[bool] = ..., ready: _Optional[bool] = ..., in_flight: _Optional[int] = ..., models: _Optional[_Iterable[_Union[BackendModel, _Mapping]]] = ...) -> None: ...

class BackendModel(_message.Message):
    __slots__ = ("name", "ready", "not_ready_reason", "stub_dead")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    STUB_DEAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    ready: bool
    not_ready_reason: str
    stub_dead: bool
    def __init__(self, name: _Optional[str] = ..., ready: _Optional[bool] = ..., not_ready_reason: _Optional[str] = ..., stub_dead: _Optional[bool] = ...) -> None: ...
