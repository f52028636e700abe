"""The docs' settings are config.py's: every setting they name exists, and
the settings table (docs/configuration.md) gives each setting the default
config.py gives it."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tomllib
import types
import typing

from meshgate.config import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
# What an operator reads settings in (bench/README.md also tells of settings
# tried and dropped, by name).
DOCS = (
    "README.md",
    "deploy/k8s/README.md",
    *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")),
)
SECTIONS = {field.name for field in dataclasses.fields(Settings)}

# `router.listen`, `models.<alias>.routing_strategy`, `[[router.tenants]]`:
# lower-case keys, a placeholder for a table's key in angle brackets.
SETTING = re.compile(r"`\[{0,2}([a-z_][a-z0-9_]*(?:\.(?:[a-z_][a-z0-9_]*|<[^>]+>))+)\]{0,2}`")
# A name's parts: dots inside a placeholder (`<context.summary_model>`) split nothing.
PART = re.compile(r"<[^>]+>|[^.]+")
# Files and modules named like settings: `router.pem`, `telemetry.py`.
FILE_NAME = re.compile(r"\.(py|pem|key|json|toml)$")

# Table rows whose default is said in words rather than as values; each is
# checked by hand, or by the tests of config.py, not here.
DEFAULTS_IN_WORDS = {
    "router.context_address",  # "the defaults above": the listen addresses
    "models.<alias>",  # the built-in aliases' windows and output bounds
    "inference.models.<name>",  # the built-in served models
    "mesh.router_cert_file",  # `cert_file` with `{service}` = `router`
}


def _unwrap(hint: typing.Any) -> typing.Any:
    """`X | None` is X: a setting unset by default still has X's keys."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _field(name: str) -> dataclasses.Field:
    """The dataclass field a dotted setting name ends at; a placeholder or a
    key under a table of tables (`models.<alias>`, `router.prices.smollm2`)
    walks into the table's value type."""
    owner: typing.Any = Settings
    parts = PART.findall(name)
    found = None
    for index, part in enumerate(parts):
        if typing.get_origin(owner) is dict:
            owner = _unwrap(typing.get_args(owner)[1])
            continue
        if not dataclasses.is_dataclass(owner):
            raise LookupError(f"{name}: {'.'.join(parts[:index])} has no keys")
        fields = {field.name: field for field in dataclasses.fields(owner)}
        if part not in fields:
            raise LookupError(f"{name}: {owner.__name__} has no {part!r}")
        found = fields[part]
        owner = _unwrap(typing.get_type_hints(owner)[part])
    if found is None:
        raise LookupError(f"{name}: no setting")
    return found


def _names(text: str) -> list[str]:
    return [
        name
        for name in SETTING.findall(text)
        if name.split(".")[0] in SECTIONS and not FILE_NAME.search(name)
    ]


def test_every_setting_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        names = sorted(set(_names((ROOT / doc).read_text())))
        for name in names:
            try:
                _field(name)
            except LookupError as error:
                missing.append(f"{doc}: {error}")
    assert missing == []
    assert "docs/configuration.md" in DOCS
    assert len(_names(CONFIGURATION)) > 100  # the scan finds the settings table's settings at all


def _default(field: dataclasses.Field) -> typing.Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _value(text: str) -> typing.Any:
    """A value as the table writes it: `text`, true, 16, 2.0, 64 MiB, `[...]`."""
    text = text.strip()
    if match := re.fullmatch(r"(\d+) MiB", text):
        return int(match[1]) * 2**20
    if text in ("true", "false", "`true`", "`false`"):
        return text.strip("`") == "true"
    code = text.strip("`")
    try:
        return tomllib.loads(f"value = {code}")["value"]
    except tomllib.TOMLDecodeError:
        assert text.startswith("`") and text.endswith("`"), f"not a value: {text!r}"
        return code


def _values(cell: str, count: int) -> list[typing.Any]:
    # `127.0.0.1:50051` … `:50054`: one address per setting, ports counting up.
    if match := re.fullmatch(r"`([^`]+):(\d+)` … `:(\d+)`", cell):
        host, first, last = match[1], int(match[2]), int(match[3])
        assert last - first + 1 == count, cell
        return [f"{host}:{port}" for port in range(first, last + 1)]
    values = [_value(text) for text in re.split(r",\s+(?=(?:[^`]*`[^`]*`)*[^`]*$)", cell)]
    assert len(values) == count, f"{count} settings, {len(values)} defaults: {cell!r}"
    return values


def _table_rows():
    for line in CONFIGURATION.splitlines():
        if line.startswith("| `"):
            setting, default, _meaning = line.strip("|").split(" | ", 2)
            yield _names(setting), default.strip()


def test_the_settings_table_gives_each_setting_its_default():
    checked = []
    for names, cell in _table_rows():
        assert names, f"a row that names no setting: {cell!r}"
        if names[0] in DEFAULTS_IN_WORDS:
            continue
        # `router.prices.<alias>`: the table of them, empty by default.
        fields = [_field(re.sub(r"\.<[^>]+>$", "", name)) for name in names]
        defaults = [_default(field) for field in fields]
        if cell.startswith("unset"):
            expected = [None] * len(names)
        elif cell == "none":
            assert all(default in ([], {}) for default in defaults), names
            continue
        else:
            expected = _values(cell, len(names))
        for name, default, value in zip(names, defaults, expected, strict=True):
            # 1 == True: a switch's default is a boolean on both sides.
            said = f"{name}: docs/configuration.md says {value!r}, config.py {default!r}"
            assert (type(default) is bool) == (type(value) is bool), said
            assert default == value, said
            checked.append(name)
    assert len(checked) > 60
