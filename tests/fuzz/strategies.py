"""Hypothesis strategies for any protobuf message, from its descriptor.

Every field gets the values that break services: strings empty, unicode,
NUL-laden and huge (up to ~1.1 MB, under gRPC's 4 MB message limit), integers
at their type's limits, NaN and infinite floats, enum numbers nobody
defined, and repeated fields from empty to a few entries. A few field names
lean towards values the services accept (a served model, a valid role, small
max_tokens), so the fuzzing also reaches the paths behind validation.
"""

from __future__ import annotations

from google.protobuf import descriptor as protobuf_descriptor
from google.protobuf import message_factory
from hypothesis import strategies as st

from meshgate.common.v1 import common_pb2
from meshgate.router.v1 import router_service_pb2

FieldDescriptor = protobuf_descriptor.FieldDescriptor

INT32_LIMITS = [0, 1, -1, 2**31 - 1, -(2**31)]
INT64_LIMITS = [0, 1, -1, 2**63 - 1, -(2**63)]

_HUGE = st.builds(
    lambda piece, count: piece * count,
    st.sampled_from(["x", "é", "東", " ", "\x00", "How do transformers work? "]),
    st.sampled_from([1_000, 70_000, 300_000, 1_100_000]),
).map(lambda text: text[:1_100_000])
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "tiny-gpt", "minilm", "../../etc/passwd", "%s%n", "💥" * 3, "\u202e"]),
    _HUGE,
)
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from(INT32_LIMITS), st.integers(-3, 600))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from(INT64_LIMITS), st.integers(-3, 600))
FLOAT = st.floats(width=32)  # NaN, ±inf, subnormals and ±0 included
ENUM_NUMBER = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-1, 5))

# Field names whose values are biased towards what gets past validation.
LEANING = {
    "model": st.one_of(st.just("tiny-gpt"), TEXT),
    "role": st.one_of(
        st.sampled_from([common_pb2.ROLE_USER, common_pb2.ROLE_SYSTEM, common_pb2.ROLE_ASSISTANT]),
        ENUM_NUMBER,
    ),
    # Generation costs real CPU: mostly short, sometimes at the limits.
    "max_tokens": st.one_of(st.integers(1, 6), st.sampled_from([*INT32_LIMITS, 256, 257, 511, 512])),
    "tenant_id": st.one_of(st.sampled_from(["dev", "fuzz-tenant"]), st.text(max_size=20)),
    "ttl_seconds": st.one_of(st.integers(-2, 100), st.sampled_from(INT32_LIMITS)),
    # A template's name: mostly the one the fuzz mesh configures (tests/fuzz/conftest.py).
    "name": st.one_of(st.just("fuzz"), TEXT),
}
# Keys of map fields: mostly the fuzz template's variable, sometimes anything.
MAP_KEY = st.one_of(st.just("question"), st.text(max_size=20), st.sampled_from(["", "$", "{{x}}", "\x00"]))

_SCALARS = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: FLOAT,
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: ENUM_NUMBER,
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.name in LEANING:
        return LEANING[field.name]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _SCALARS[field.type]


def messages(descriptor: protobuf_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Any message of this type; each field set or left unset."""
    message_class = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(message_class())
    fields = {}
    for field in descriptor.fields:
        if _is_map(field):
            # map<string, V>: protobuf's entries are set by key, not appended.
            entry = field.message_type
            fields[field.name] = st.dictionaries(
                MAP_KEY, _value(entry.fields_by_name["value"], depth), max_size=4
            ).filter(lambda values: _fits(list(values.values())))
            continue
        value = _value(field, depth)
        if field.is_repeated:
            # Huge entries stay rare: a few of them would pass gRPC's 4 MB limit.
            fields[field.name] = st.lists(value, max_size=4).filter(_fits)
        else:
            fields[field.name] = st.none() | value

    def build(values: dict) -> object:
        message = message_class()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if _is_map(field):
                getattr(message, name).update(value)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build).filter(lambda m: m.ByteSize() < 3_500_000)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _fits(values: list) -> bool:
    return sum(len(v) if isinstance(v, str) else 0 for v in values) < 2_500_000


# Bytes that are rarely a valid message: random, truncated varints, a length
# that runs past the end, and deep nesting.
GARBAGE = st.one_of(
    st.binary(max_size=512),
    st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x0a\x05ab", b"\xff" * 16, b"\x1a\x80" * 200]),
    st.binary(min_size=1, max_size=8).map(lambda b: b * 500),
)


# Turns that get past the first checks, so that fuzzed values also reach
# the context and cache services, Triton and the models behind validation.
_VALID_ROLE = st.sampled_from([common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT])
_SHORT_TEXT = st.one_of(
    st.text(min_size=1, max_size=30), st.sampled_from(["How do transformers work?", "hi"])
)
PARAMETERS = st.builds(
    lambda values: common_pb2.GenerationParameters(**{k: v for k, v in values.items() if v is not None}),
    st.fixed_dictionaries(
        {
            "max_tokens": st.none() | LEANING["max_tokens"],
            "temperature": st.none() | st.floats(0, 2, width=32) | FLOAT,
            "top_p": st.none() | st.floats(0, 1, width=32) | FLOAT,
            "seed": st.none() | st.integers(0, 1000) | INT64,
            "stop": st.none() | st.lists(_SHORT_TEXT, max_size=3) | st.lists(TEXT, max_size=9),
        }
    ),
)


def _turn(message_class, content):
    history = st.lists(st.builds(common_pb2.Message, role=_VALID_ROLE, content=content), max_size=3)
    last = st.builds(common_pb2.Message, role=st.just(common_pb2.ROLE_USER), content=content)
    return st.builds(
        lambda earlier, question, parameters: message_class(
            model="tiny-gpt", messages=[*earlier, question], parameters=parameters
        ),
        history,
        last,
        PARAMETERS,
    )


def _template_turn(message_class):
    """Invocations of the fuzz mesh's template: its variable given (or not,
    or others too), any version, with or without a model."""

    def build(variables, version, model, parameters):
        invocation = router_service_pb2.TemplateInvocation(name="fuzz", variables=variables)
        if version is not None:
            invocation.version = version
        return message_class(template=invocation, model=model, parameters=parameters)

    return st.builds(
        build,
        st.dictionaries(MAP_KEY, st.one_of(_SHORT_TEXT, TEXT), max_size=3)
        | st.fixed_dictionaries({"question": _SHORT_TEXT}),
        st.none() | st.just(1) | INT32,
        st.sampled_from(["", "tiny-gpt"]) | TEXT,
        PARAMETERS,
    )


def plausible(descriptor: protobuf_descriptor.Descriptor) -> st.SearchStrategy | None:
    """Mostly-valid requests for the RPCs that generate, or None."""
    message_class = message_factory.GetMessageClass(descriptor)
    if {"model", "messages", "parameters"} <= set(descriptor.fields_by_name):
        turns = _turn(message_class, st.one_of(_SHORT_TEXT, TEXT))
        if "template" in descriptor.fields_by_name:
            turns = st.one_of(turns, _template_turn(message_class))
        return turns
    return None
