"""Every number and word setting of every section, probed with values it
cannot work with, through the loading path the services use (a TOML file,
and ``MESHGATE_<SECTION>__<FIELD>`` variables): each must be refused at
load with a ConfigError naming the setting, never loaded to fail, hang or
spin at run time.

The settings are found by walking the dataclasses, so a number added later
is probed too, and must be classified (zero allowed or not) in config.py
before this passes."""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import types
import typing

import pytest

from meshgate import config
from meshgate.config import ConfigError, Settings, load_settings

DIGEST = "a" * 64
# Tables and arrays of tables the walk goes into: one valid entry each, in
# which the probed field is then set. Keys of tables of tables are these.
ENTRIES: dict[str, typing.Any] = {
    "router.tenants": [{"id": "acme", "api_key_sha256": [DIGEST]}],
    "router.templates": [{"name": "t", "messages": [{"content": "hi"}], "models": ["tiny-gpt"]}],
    "router.templates[0].messages": [{"content": "hi"}],
    "models": {"tiny-gpt": {}, "smollm2": {}, "pick": {"selection": {}}},
    "models.tiny-gpt.deployments": [{"name": "local"}],
    "inference.models": {"tiny-gpt": {}},
    "router.prices": {"tiny-gpt": {}},
    "router.model_limits": {"tiny-gpt": {}},
}
# The key of a table of tables the walk probes in (models.pick holds the
# alias that selects: its selection's fields).
TABLE_KEYS = {
    "models": "tiny-gpt",
    "inference.models": "tiny-gpt",
    "router.prices": "tiny-gpt",
    "router.model_limits": "tiny-gpt",
}


def _unwrap(hint: typing.Any) -> typing.Any:
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _leaves(cls: type, prefix: str) -> typing.Iterator[tuple[str, type]]:
    """(dotted path as the loader names it, type) of every scalar setting."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, path = _unwrap(hints[field.name]), prefix + field.name
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            if hint is config.SelectionSettings:
                path = path.replace("models.tiny-gpt.", "models.pick.")
            yield from _leaves(hint, path + ".")
        elif origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            yield from _leaves(typing.get_args(hint)[0], path + "[0].")
        elif origin is dict and dataclasses.is_dataclass(_unwrap(typing.get_args(hint)[1])):
            yield from _leaves(_unwrap(typing.get_args(hint)[1]), f"{path}.{TABLE_KEYS[path]}.")
        elif hint in (int, float, str):
            yield path, hint


def _parts(path: str) -> list[str]:
    return path.replace("[0]", ".[0]").split(".")


def _raw(path: str, value: typing.Any) -> dict[str, typing.Any]:
    """Settings that set ``path`` to ``value``, inside valid entries."""
    raw: dict[str, typing.Any] = {}
    node: typing.Any = raw
    parts = _parts(path)
    for depth, part in enumerate(parts[:-1]):
        if part == "[0]":
            node = node[0]
            continue
        here = ".".join(parts[: depth + 1]).replace(".[0]", "[0]")
        node = node.setdefault(part, copy.deepcopy(ENTRIES.get(here, {})))
    node[parts[-1]] = value
    if path.startswith("models.pick."):
        # Its selection.max_strong_cost_usd needs its strong model priced.
        raw["router"] = {"prices": {"smollm2": {}}}
    return raw


def _toml(value: typing.Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return "{" + ", ".join(f'"{key}" = {_toml(item)}' for key, item in value.items()) + "}"


def _load_file(tmp_path: pathlib.Path, raw: dict[str, typing.Any]) -> Settings:
    path = tmp_path / "settings.toml"
    path.write_text("".join(f'"{key}" = {_toml(value)}\n' for key, value in raw.items()))
    return load_settings(path, environ={})


def _variable(path: str) -> str | None:
    """The environment variable of a setting directly in a section."""
    parts = path.split(".")
    return f"MESHGATE_{parts[0].upper()}__{parts[1].upper()}" if len(parts) == 2 else None


LEAVES = list(_leaves(Settings, ""))
NUMBERS = [(path, hint) for path, hint in LEAVES if hint in (int, float)]


def _refused(tmp_path: pathlib.Path, path: str, value: typing.Any, shown: str | None = "") -> list[str]:
    """What is wrong with how the settings take ``path`` = ``value``
    (from a file, and from its variable where it has one); [] if refused
    as it should be: a ConfigError naming the setting (its section, and its
    own name) and, unless ``shown`` is None, the value as ``shown``."""
    field, section = path.rsplit(".", 1)[-1], path.split(".")[0]
    loads = [("file", lambda: _load_file(tmp_path, _raw(path, value)))]
    if variable := _variable(path):
        text = _toml(value)
        loads.append((variable, lambda: load_settings(environ={variable: text})))
    problems = []
    for source, load in loads:
        try:
            load()
        except ConfigError as error:
            message = str(error)
            named = field in message and section in message
            if not named or (shown is not None and (shown or repr(value)) not in message):
                problems.append(f"{path} = {value!r} ({source}): refused without naming it: {message}")
        except Exception as error:  # noqa: BLE001 (what a setting must never do at load)
            problems.append(f"{path} = {value!r} ({source}): {type(error).__name__}: {error}")
        else:
            problems.append(f"{path} = {value!r} ({source}): loaded")
    return problems


def test_the_walk_finds_every_section_and_the_tables_inside_them():
    paths = {path for path, _ in LEAVES}
    assert {path.split(".")[0] for path in paths} == {field.name for field in dataclasses.fields(Settings)}
    for inner in (
        "router.tenants[0].limits.tokens_per_day",
        "router.tenants[0].key_limits.cost_usd_per_month",
        "router.templates[0].parameters.top_p",
        "models.tiny-gpt.deployments[0].weight",
        "models.pick.selection.embedding_timeout_s",
        "inference.models.tiny-gpt.generation_slots",
        "router.prices.tiny-gpt.cache_hit_fraction",
        "router.model_limits.tiny-gpt.concurrent_streams",
    ):
        assert inner in paths
    assert len(NUMBERS) > 100


def _field(path: str) -> dataclasses.Field:
    owner: typing.Any = Settings
    for part in _parts(path):
        if part == "[0]":
            continue
        if typing.get_origin(owner) is dict:
            owner = _unwrap(typing.get_args(owner)[1])
            continue
        field = {field.name: field for field in dataclasses.fields(owner)}[part]
        hint = _unwrap(typing.get_type_hints(owner)[part])
        owner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
    return field


@pytest.mark.parametrize(("path", "hint"), NUMBERS, ids=[path for path, _ in NUMBERS])
def test_each_probe_goes_into_settings_that_load_with_a_valid_value(tmp_path, path, hint):
    """So each refusal below is the probed value's, not its neighbours'."""
    default = _field(path).default
    value = hint(1) if default is None else default
    assert _load_file(tmp_path, _raw(path, value)) is not None


@pytest.mark.parametrize(("path", "hint"), NUMBERS, ids=[path for path, _ in NUMBERS])
def test_a_number_no_setting_can_work_with_is_refused_naming_it(tmp_path, path, hint):
    """Negative, not a number, infinite, or absurdly large: no setting
    means anything by them."""
    values = [-1.0, math.nan, math.inf, -math.inf, 1e300] if hint is float else [-1, 10**30]
    problems = [problem for value in values for problem in _refused(tmp_path, path, value)]
    assert problems == []


async def test_the_longest_time_a_setting_may_give_is_a_deadline_grpc_takes():
    """A timeout setting becomes a gRPC deadline (router.downstream_timeout_s
    and others): at MAX_SECONDS a call is answered; at 1e10 s, which loaded
    before, gRPC ends it DEADLINE_EXCEEDED at once, as it ended every call."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            answer = await check(health_pb2.HealthCheckRequest(), timeout=config.MAX_SECONDS)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await check(health_pb2.HealthCheckRequest(), timeout=1e10)
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # Past what gRPC takes as a deadline (above).
        ("router.downstream_timeout_s", 1e10),
        ("router.max_generation_s", 1e10),
        # An entry's expiry packs into 8 bytes of milliseconds.
        ("cache.ttl_s", 10**17),
        # ListModels sends both in int32 fields.
        ("models.tiny-gpt.context_window_tokens", 2**31),
        ("models.tiny-gpt.max_output_tokens", 2**31),
    ],
)
def test_a_value_past_what_its_setting_is_used_by_takes_is_refused(tmp_path, path, value):
    assert _refused(tmp_path, path, value) == []


def _zero(hint: type) -> int | float:
    return hint(0)


def test_every_number_setting_says_whether_zero_means_something():
    """Positive, or zero allowed with what it means: a number setting added
    in neither table has not been decided, and fails here."""
    undecided = [
        path
        for path, _ in NUMBERS
        if path.rsplit(".", 1)[-1] not in config._POSITIVE | set(config._ZERO_MEANS)
    ]
    both = sorted(config._POSITIVE & set(config._ZERO_MEANS))
    assert undecided == [] and both == []
    fields = {path.rsplit(".", 1)[-1] for path, _ in NUMBERS}
    assert sorted(config._POSITIVE - fields) == sorted(set(config._ZERO_MEANS) - fields) == []


POSITIVE = [(path, hint) for path, hint in NUMBERS if path.rsplit(".", 1)[-1] in config._POSITIVE]
ZERO_ALLOWED = [(path, hint) for path, hint in NUMBERS if path.rsplit(".", 1)[-1] in config._ZERO_MEANS]
# What a zero needs beside it to load: the tenant cap may be 0 only where
# the replica's bound is.
ZERO_NEEDS = {"router.max_concurrent_rpcs_per_tenant": {"router.max_concurrent_rpcs": 0}}


@pytest.mark.parametrize(("path", "hint"), POSITIVE, ids=[path for path, _ in POSITIVE])
def test_zero_is_refused_where_it_means_nothing(tmp_path, path, hint):
    assert _refused(tmp_path, path, _zero(hint)) == []


@pytest.mark.parametrize(("path", "hint"), ZERO_ALLOWED, ids=[path for path, _ in ZERO_ALLOWED])
def test_zero_loads_where_it_means_something(tmp_path, path, hint):
    raw = _raw(path, _zero(hint))
    for other, value in ZERO_NEEDS.get(path, {}).items():
        section, field = other.split(".")
        raw.setdefault(section, {})[field] = value
    assert _load_file(tmp_path, raw) is not None


def _settings_rows() -> list[str]:
    table = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    return [line for line in table.splitlines() if line.startswith("| `")]


# Settings that take 0 and have no row of their own in the settings table: the
# fields of a table per alias or per template, said in their table's row or
# section in prose (`models.<alias>`, `router.prices.<alias>`, templates).
# A setting newly allowed 0 must get a row saying what 0 means, or be added
# here knowingly.
NO_ROW_OF_THEIR_OWN = {
    "models.tiny-gpt.deployments[0].weight",
    "models.pick.selection.threshold",
    "models.pick.selection.max_strong_cost_usd",
    "router.prices.tiny-gpt.prompt_usd_per_million",
    "router.prices.tiny-gpt.completion_usd_per_million",
    "router.prices.tiny-gpt.cache_hit_fraction",
    "router.templates[0].parameters.temperature",
    "router.templates[0].parameters.seed",
    "inference.models.tiny-gpt.generation_slots",
}


def test_the_settings_table_says_what_zero_means_where_it_names_a_setting_that_takes_it():
    rows = _settings_rows()
    unsaid, rowless = [], set()
    for path, _ in ZERO_ALLOWED:
        meaning = config._ZERO_MEANS[path.rsplit(".", 1)[-1]]
        named = [row for row in rows if f"`{path}`" in row.split(" | ")[0]]
        if not named:
            rowless.add(path)
        unsaid += [f"{path}: its row does not say 0 is {meaning!r}" for row in named if meaning not in row]
    assert unsaid == []
    assert rowless == NO_ROW_OF_THEIR_OWN


FRACTIONS = [(path, hint) for path, hint in NUMBERS if path.rsplit(".", 1)[-1] in config._FRACTIONS]


def test_the_fractions_are_the_settings_that_are_shares_or_probabilities():
    assert sorted(path for path, _ in FRACTIONS) == [
        "cache.first_stage_word_share",
        "cache.max_false_hit_rate",
        "cache.semantic_threshold",
        "models.pick.selection.threshold",
        "router.prices.tiny-gpt.cache_hit_fraction",
    ]


@pytest.mark.parametrize(("path", "hint"), FRACTIONS, ids=[path for path, _ in FRACTIONS])
def test_a_fraction_past_1_is_refused_and_1_loads(tmp_path, path, hint):
    """cache.semantic_threshold = 1.5 loaded before and no cosine ever
    reached it (no semantic hit, unsaid); cache.max_false_hit_rate = 1.5
    loaded and served at the loosest calibrated bound."""
    assert _refused(tmp_path, path, 1.5) == []
    assert _load_file(tmp_path, _raw(path, 1.0)) is not None


# Every setting that takes one of a few words, and one of its words.
WORDS = {
    "telemetry.exporter": "otlp",
    "telemetry.log_level": "debug",
    "models.tiny-gpt.assembly_strategy": "newest",
    "models.tiny-gpt.routing_strategy": "kv_cost",
    "router.templates[0].messages[0].role": "system",
    "context.embedder": "inference",
    "cache.embedder": "inference",
    "inference.models.tiny-gpt.routing_strategy": "weighted",
}


@pytest.mark.parametrize("path", WORDS)
def test_a_word_a_setting_does_not_know_is_refused_naming_it(tmp_path, path):
    """telemetry.exporter = "jaeger" loaded, then failed the service's start
    (ValueError), as telemetry.log_level = "verbose" did (KeyError)."""
    assert _refused(tmp_path, path, "verbose") == []
    assert _load_file(tmp_path, _raw(path, WORDS[path])) is not None


def test_a_log_level_is_taken_in_any_case(tmp_path):
    assert _load_file(tmp_path, {"telemetry": {"log_level": "WARNING"}}).telemetry.log_level == "WARNING"


# Text settings with nothing to mean by "" (each failed its service's
# start or every call that read it), and the one URL every service needs.
NEEDS_TEXT = [
    "redis.url",
    "models.tiny-gpt.tokenizer",
    "models.tiny-gpt.deployments[0].model",
    "router.embedding_model",
    "cache.embedding_model",
    "inference.models.tiny-gpt.triton_model",
    "inference.models.tiny-gpt.tokenizer",
    "inference.embedding_triton_model",
    "inference.embedding_tokenizer",
]


@pytest.mark.parametrize("path", NEEDS_TEXT)
def test_an_empty_text_a_setting_needs_is_refused_naming_it(tmp_path, path):
    assert _refused(tmp_path, path, "", shown="''") == []


def test_a_redis_url_redis_py_cannot_take_is_refused_at_load(tmp_path):
    """redis.url = "localhost:6379" loaded; every service's start then failed
    with redis-py's ValueError, naming no setting."""
    assert _refused(tmp_path, "redis.url", "localhost:6379", shown=None) == []
