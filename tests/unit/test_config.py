import re

import pytest

from meshgate import serving
from meshgate.config import (
    MAX_READABLE_SESSION_BYTES,
    MAX_USAGE_RETENTION_DAYS,
    ConfigError,
    ContextSettings,
    LimitSettings,
    hash_api_key,
    load_settings,
    tcp_listen_address,
)


def test_defaults_describe_a_working_local_mesh():
    settings = load_settings(environ={})
    assert settings.router.listen == "127.0.0.1:50051"
    assert settings.context.listen == "127.0.0.1:50052"
    assert settings.cache.listen == "127.0.0.1:50053"
    assert settings.inference.listen == "127.0.0.1:50054"
    assert settings.models["tiny-gpt"].deployments[0].address == settings.inference.listen


def test_file_then_environment_override(tmp_path):
    path = tmp_path / "meshgate.toml"
    path.write_text('[cache]\nsemantic_threshold = 0.8\nttl_s = 60\n[redis]\nurl = "redis://file"\n')
    settings = load_settings(
        path,
        environ={
            "MESHGATE_CACHE__TTL_S": "120",
            "MESHGATE_INFERENCE__TRITON_URLS": '["a:1", "b:2"]',
            "REDIS_URL": "redis://env",
        },
    )
    assert settings.cache.semantic_threshold == 0.8
    assert settings.cache.ttl_s == 120
    assert settings.inference.triton_urls == ["a:1", "b:2"]
    assert settings.redis.url == "redis://env"


def test_dev_key_from_environment():
    assert load_settings(environ={"MESHGATE_DEV_API_KEY": "k1"}).router.dev_api_key == "k1"


def test_unknown_and_mistyped_settings_are_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[cache]\nsemantic_treshold = 0.8\n")
    with pytest.raises(ConfigError, match="semantic_treshold"):
        load_settings(path, environ={})
    with pytest.raises(ConfigError, match="ttl_s"):
        load_settings(environ={"MESHGATE_CACHE__TTL_S": '"soon"'})


@pytest.mark.parametrize(
    "body",
    [
        'redis = "redis://:hunter2@redis.internal:6379"\n',
        '[redis]\nurl = { url = "redis://:hunter2@redis.internal:6379" }\n',
        '[router]\ndev_api_key = ["hunter2"]\n',
    ],
    ids=["a section as a URL", "a URL as a table", "a key as an array"],
)
def test_a_mistyped_setting_is_refused_without_showing_its_value(tmp_path, body):
    """The refusal is logged (a start's, a reload's): a section written as
    its URL showed the URL, password and all."""
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match="expected") as refused:
        load_settings(path, environ={})
    assert "hunter2" not in str(refused.value)


def test_nested_model_tables(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(
        "[models.big]\ncontext_window_tokens = 8192\n"
        'deployments = [{ name = "a", address = "h:1", model = "m", weight = 3 }]\n'
    )
    big = load_settings(path, environ={}).models["big"]
    assert big.context_window_tokens == 8192
    assert big.deployments[0].weight == 3.0


def test_a_models_table_lists_the_aliases_served_and_a_built_in_it_names_keeps_its_settings(tmp_path):
    """``[models.smollm2] deployments = [...]`` made smollm2 a bare model:
    a 512-token window, minilm's tokenizer, no chat template, so its
    counts and bounds were another model's."""
    built_in = load_settings(environ={}).models["smollm2"]
    path = tmp_path / "models.toml"
    path.write_text('[models.smollm2]\ndeployments = [{ name = "a", address = "h:1", model = "smollm2" }]\n')
    for settings in (
        load_settings(path, environ={}),
        load_settings(environ={"MESHGATE_MODELS__SMOLLM2__DEPLOYMENTS": path.read_text().split("= ", 1)[1]}),
    ):
        assert list(settings.models) == ["smollm2"]
        moved = settings.models["smollm2"]
        assert moved.deployments[0].address == "h:1"
        assert (moved.context_window_tokens, moved.tokenizer, moved.chat_template) == (
            built_in.context_window_tokens,
            built_in.tokenizer,
            built_in.chat_template,
        )
    served = load_settings(environ={"MESHGATE_INFERENCE__MODELS__SMOLLM2__TRITON_MODEL": "other"}).inference
    assert list(served.models) == ["smollm2"]
    assert served.models["smollm2"].triton_model == "other"
    assert served.models["smollm2"].context_window_tokens == 8192


def test_a_built_in_alias_given_whole_by_a_variable_keeps_its_settings_too():
    """Such a table was still its text when its keys were read: AttributeError at start."""
    table = '{ deployments = [{ name = "a", address = "h:1", model = "smollm2" }] }'
    moved = load_settings(environ={"MESHGATE_MODELS__SMOLLM2": table}).models["smollm2"]
    assert moved.deployments[0].address == "h:1" and moved.context_window_tokens == 8192
    served = load_settings(environ={"MESHGATE_INFERENCE__MODELS": '{ smollm2 = { triton_model = "x" } }'})
    assert served.inference.models["smollm2"].triton_model == "x"


@pytest.mark.parametrize(
    ("table", "body"),
    [
        ("models", 'deployments = [{ name = "a", address = "h:1", model = "m" }]'),
        ("inference.models", 'triton_model = "tiny_gpt"'),
    ],
)
def test_an_empty_model_name_is_refused_at_load(tmp_path, table, body):
    """Each loaded (as the only model of its table). [models.""] was an
    alias no request could use (one that names no model is refused
    MODEL_NOT_FOUND); [inference.models.""] served every GenerateRequest
    that names no model. A reload loads the file the same way."""
    path = tmp_path / "models.toml"
    path.write_text(f'[{table}.""]\n{body}\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(table)}: a model name must not be empty"):
        load_settings(path, environ={})


def test_a_models_default_max_tokens_must_be_within_its_cap():
    """A built-in alias keeps the keys a table leaves out: lowering its cap
    alone left the default of 256 above it, which no request check sees."""
    with pytest.raises(ConfigError, match="default_max_tokens"):
        load_settings(environ={"MESHGATE_MODELS__SMOLLM2__MAX_OUTPUT_TOKENS": "128"})
    lowered = {"MESHGATE_MODELS__SMOLLM2": "{ max_output_tokens = 128, default_max_tokens = 64 }"}
    assert load_settings(environ=lowered).models["smollm2"].max_output_tokens == 128


def _deployments(count: int, prefix: str) -> str:
    """``count`` deployments, each of another model whose name is 500 characters."""
    models = [f"{prefix}{i}".ljust(500, "m") for i in range(count)]
    return ", ".join(f'{{ name = "d{i}", address = "h:1", model = "{m}" }}' for i, m in enumerate(models))


def test_an_alias_whose_cache_route_passes_the_caches_bound_is_refused(tmp_path):
    """Every cache call of an alias carries its route (its deployments'
    model names joined, config.route_of), and the cache refuses a route
    past MAX_SCOPE_ROUTE_CHARS (SCOPE_TOO_LARGE): such an alias loaded, and
    then each of its lookups and stores was refused, a warning each."""
    path = tmp_path / "models.toml"
    path.write_text(f"[models.wide]\ndeployments = [{_deployments(9, 'w')}]\n")
    with pytest.raises(
        ConfigError, match=r"models\.wide: .* 4508 characters; the cache refuses more than 4096"
    ):
        load_settings(path, environ={})
    # Eight such names (4,007 characters) are within it.
    path.write_text(f"[models.wide]\ndeployments = [{_deployments(8, 'w')}]\n")
    assert len(load_settings(path, environ={}).models["wide"].deployments) == 8
    # An alias that selects answers with both aliases' models: each within
    # the bound, together past it.
    path.write_text(
        f"[models.fast]\ndeployments = [{_deployments(5, 'f')}]\n"
        f"[models.strong]\ndeployments = [{_deployments(5, 's')}]\n"
        '[models.picky]\nselection = { fast = "fast", strong = "strong" }\n'
    )
    with pytest.raises(ConfigError, match=r"models\.picky: .* 5009 characters"):
        load_settings(path, environ={})


def test_api_key_hash_is_sha256_hex():
    assert hash_api_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_an_append_embedding_timeout_that_is_not_positive_is_refused():
    for value in ("0", "-1"):
        with pytest.raises(ConfigError, match="append_embed_timeout_s"):
            load_settings(environ={"MESHGATE_CONTEXT__APPEND_EMBED_TIMEOUT_S": value})
    settings = load_settings(environ={"MESHGATE_CONTEXT__APPEND_EMBED_TIMEOUT_S": "5"})
    assert settings.context.append_embed_timeout_s == 5


def test_an_http_body_timeout_that_is_not_positive_and_finite_is_refused():
    assert load_settings(environ={}).router.http_body_timeout_s == 30
    for value in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="http_body_timeout_s"):
            load_settings(environ={"MESHGATE_ROUTER__HTTP_BODY_TIMEOUT_S": value})
    settings = load_settings(environ={"MESHGATE_ROUTER__HTTP_BODY_TIMEOUT_S": "0.5"})
    assert settings.router.http_body_timeout_s == 0.5


def test_an_http_stalled_client_timeout_that_is_not_positive_and_finite_is_refused():
    assert load_settings(environ={}).router.http_stalled_client_timeout_s == 30
    for value in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="http_stalled_client_timeout_s"):
            load_settings(environ={"MESHGATE_ROUTER__HTTP_STALLED_CLIENT_TIMEOUT_S": value})
    settings = load_settings(environ={"MESHGATE_ROUTER__HTTP_STALLED_CLIENT_TIMEOUT_S": "0.5"})
    assert settings.router.http_stalled_client_timeout_s == 0.5


def test_http_header_bounds_out_of_range_are_refused():
    router = load_settings(environ={}).router
    assert (router.http_header_timeout_s, router.http_max_header_bytes) == (10, 65536)
    for value in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="http_header_timeout_s"):
            load_settings(environ={"MESHGATE_ROUTER__HTTP_HEADER_TIMEOUT_S": value})
    for value in ("0", "1023"):
        with pytest.raises(ConfigError, match="http_max_header_bytes"):
            load_settings(environ={"MESHGATE_ROUTER__HTTP_MAX_HEADER_BYTES": value})
    environ = {
        "MESHGATE_ROUTER__HTTP_HEADER_TIMEOUT_S": "0.5",
        "MESHGATE_ROUTER__HTTP_MAX_HEADER_BYTES": "1024",
    }
    settings = load_settings(environ=environ)
    assert (settings.router.http_header_timeout_s, settings.router.http_max_header_bytes) == (0.5, 1024)


def test_a_hot_exact_byte_bound_below_a_mebibyte_is_refused():
    assert load_settings(environ={}).router.hot_exact_max_bytes == 64 * 1024 * 1024
    for value in ("0", "-1", "1048575"):
        with pytest.raises(ConfigError, match="hot_exact_max_bytes"):
            load_settings(environ={"MESHGATE_ROUTER__HOT_EXACT_MAX_BYTES": value})
    settings = load_settings(environ={"MESHGATE_ROUTER__HOT_EXACT_MAX_BYTES": "1048576"})
    assert settings.router.hot_exact_max_bytes == 1048576


def test_a_cache_redis_url_that_cannot_be_subscribed_to_is_refused_at_load():
    """The router subscribes to it only in the background, where a URL that
    cannot work would leave its hot copies bypassed for good, unsaid."""
    assert load_settings(environ={}).router.cache_redis_url == ""
    for url, why in (
        ("http://cache-redis:6379", "is no Redis URL"),
        ("redis://:pa/ss@cache-redis:6379", "port is not a number"),
        ("redis://cache-redis:6379/0?retry_on_timeout=true", "cannot be set in the URL"),
    ):
        with pytest.raises(ConfigError, match=f"router.cache_redis_url.*{why}") as refused:
            load_settings(environ={"MESHGATE_ROUTER__CACHE_REDIS_URL": url})
        assert "pa/ss" not in str(refused.value)
    for url in ("redis://cache-redis:6379/1", "rediss+cluster://node-a:6379,node-b:6379"):
        assert load_settings(environ={"MESHGATE_ROUTER__CACHE_REDIS_URL": url}).router.cache_redis_url == url


def test_a_usage_retention_longer_than_getusage_can_read_is_refused():
    """A bug hunt's finding: any positive retention loaded, and GetUsage may
    ask for every day kept, one Redis read a day on the router's loop: 1e6
    days loaded, GetUsage of 700,000 days held the replica 13 s, and of
    800,000 failed INTERNAL (before the calendar's year 1)."""
    most = MAX_USAGE_RETENTION_DAYS
    for value in (most + 1, 1_000_000):
        with pytest.raises(ConfigError, match=f"router.usage_retention_days must be at most {most}"):
            load_settings(environ={"MESHGATE_ROUTER__USAGE_RETENTION_DAYS": str(value)})
    settings = load_settings(environ={"MESHGATE_ROUTER__USAGE_RETENTION_DAYS": str(most)})
    assert settings.router.usage_retention_days == most


def test_a_first_stage_word_share_outside_zero_to_one_is_refused():
    with pytest.raises(ConfigError, match="first_stage_word_share"):
        load_settings(environ={"MESHGATE_CACHE__FIRST_STAGE_WORD_SHARE": "1.5"})
    settings = load_settings(environ={"MESHGATE_CACHE__FIRST_STAGE_WORD_SHARE": "0"})
    assert settings.cache.first_stage_word_share == 0


def test_max_embed_texts_below_one_is_refused():
    with pytest.raises(ConfigError, match="max_embed_texts"):
        load_settings(environ={"MESHGATE_INFERENCE__MAX_EMBED_TEXTS": "0"})
    settings = load_settings(environ={"MESHGATE_INFERENCE__MAX_EMBED_TEXTS": "1"})
    assert settings.inference.max_embed_texts == 1


UNBOUNDED = {"MESHGATE_ROUTER__MAX_CONCURRENT_RPCS": "0"}
PER_TENANT_CAPS = ("MAX_CONCURRENT_RPCS_PER_TENANT", "MAX_SESSION_STREAMS_PER_TENANT")


@pytest.mark.parametrize("cap", PER_TENANT_CAPS)
def test_a_negative_per_tenant_cap_is_refused(cap):
    with pytest.raises(ConfigError, match=f"{cap.lower()} must not be negative"):
        load_settings(environ=UNBOUNDED | {f"MESHGATE_ROUTER__{cap}": "-1"})
    settings = load_settings(environ=UNBOUNDED | {f"MESHGATE_ROUTER__{cap}": "0"})
    assert getattr(settings.router, cap.lower()) == 0


def test_the_router_bounds_its_calls_and_each_tenants_below_them_by_default():
    router = load_settings(environ={}).router
    assert router.max_concurrent_rpcs == 4096 and router.tenant_call_cap() == 512
    assert 0 < router.max_session_streams_per_tenant < router.tenant_call_cap()


@pytest.mark.parametrize(("bound", "cap"), [("256", 32), ("1", 1), ("0", 0)])
def test_an_unset_tenant_call_cap_is_an_eighth_of_the_bound(bound, cap):
    """A bound set lower brings its own tenant cap: settings that set only
    the bound (or the streams cap) keep loading."""
    environ = {
        "MESHGATE_ROUTER__MAX_CONCURRENT_RPCS": bound,
        "MESHGATE_ROUTER__MAX_SESSION_STREAMS_PER_TENANT": "128",
    }
    assert load_settings(environ=environ).router.tenant_call_cap() == cap


@pytest.mark.parametrize("streams", ["0", "5000"])
def test_the_session_stream_cap_needs_no_rule_beside_the_bound(streams):
    # Its streams are calls the tenant call cap counts: off or above it, the call cap still binds.
    router = load_settings(environ={"MESHGATE_ROUTER__MAX_SESSION_STREAMS_PER_TENANT": streams}).router
    assert router.max_session_streams_per_tenant == int(streams) and router.tenant_call_cap() == 512


@pytest.mark.parametrize("value", ["0", "8", "9"])
def test_a_router_call_bound_needs_a_tenant_call_cap_set_below_it(value):
    bound = {"MESHGATE_ROUTER__MAX_CONCURRENT_RPCS": "8"}
    with pytest.raises(ConfigError, match="max_concurrent_rpcs_per_tenant must be above 0 and below"):
        load_settings(environ=bound | {"MESHGATE_ROUTER__MAX_CONCURRENT_RPCS_PER_TENANT": value})
    router = load_settings(environ=bound | {"MESHGATE_ROUTER__MAX_CONCURRENT_RPCS_PER_TENANT": "7"}).router
    assert (router.max_concurrent_rpcs, router.tenant_call_cap()) == (8, 7)


@pytest.mark.parametrize(
    ("variable", "value", "refused"),
    [
        ("MESHGATE_INFERENCE__HEALTH_INTERVAL_S", "-1", "inference.health_interval_s must be positive"),
        ("MESHGATE_INFERENCE__HEALTH_INTERVAL_S", "0", "inference.health_interval_s must be positive"),
        ("MESHGATE_MESH__TENANT_TOKEN_TTL_S", "-60", "mesh.tenant_token_ttl_s must be positive"),
        ("MESHGATE_ROUTER__DOWNSTREAM_TIMEOUT_S", "nan", "router.downstream_timeout_s must be positive"),
        ("MESHGATE_ROUTER__USAGE_RETENTION_DAYS", "-1", "router.usage_retention_days must be positive"),
        # At zero each day's usage totals expired as they were written.
        ("MESHGATE_ROUTER__USAGE_RETENTION_DAYS", "0", "router.usage_retention_days must be positive"),
        ("MESHGATE_ROUTER__USAGE_STREAM_MAX_LEN", "0", "router.usage_stream_max_len must be positive"),
        ("MESHGATE_INFERENCE__STREAM_INTERVAL_MS", "inf", "stream_interval_ms must be zero or more"),
        ("MESHGATE_MODELS__TINY-GPT__MAX_OUTPUT_TOKENS", "-5", "models.tiny-gpt.max_output_tokens"),
        ("MESHGATE_CACHE__MAX_BYTES_PER_TENANT", "-1", "cache.max_bytes_per_tenant must not be negative"),
        ("MESHGATE_CONTEXT__MAX_BYTES_PER_TENANT", "-1", "context.max_bytes_per_tenant must not be negative"),
    ],
)
def test_negative_infinite_or_meaningless_zero_numbers_are_refused_at_load(variable, value, refused):
    with pytest.raises(ConfigError, match=refused.replace(".", r"\.")):
        load_settings(environ={variable: value})


def test_zero_where_it_means_none_or_off_still_loads():
    settings = load_settings(
        environ={
            "MESHGATE_ROUTER__REPLAY_PAUSE_S": "0",
            "MESHGATE_CONTEXT__MAX_TURNS": "0",
            "MESHGATE_INFERENCE__STREAM_INTERVAL_MS": "0",
            "MESHGATE_ROUTER__HOT_EXACT_ENTRIES": "0",
            "MESHGATE_CACHE__MAX_BYTES_PER_TENANT": "0",
            "MESHGATE_CONTEXT__MAX_BYTES_PER_TENANT": "0",
        }
    )
    assert settings.router.replay_pause_s == 0 and settings.inference.stream_interval_ms == 0
    assert settings.cache.max_bytes_per_tenant == 0 and settings.context.max_bytes_per_tenant == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MESHGATE_ROUTER__LISTEN", '"127.0.0.1:99999"'),
        ("MESHGATE_CACHE__METRICS_LISTEN", '"127.0.0.1:-1"'),
        ("MESHGATE_ROUTER__HTTP_LISTEN", '"localhost"'),
        ("MESHGATE_ROUTER__CONTEXT_ADDRESS", '"context-a:50052,context-b:50052"'),
        ("MESHGATE_INFERENCE__TRITON_URLS", "[]"),
    ],
)
def test_an_address_no_process_could_listen_on_or_dial_is_refused_at_load(variable, value):
    """grpc binds a port above 65535 modulo 65536, and a list of names is only
    found out when a channel is made: at a reload, half-way through its hooks."""
    with pytest.raises(ConfigError, match=variable.removeprefix("MESHGATE_").split("__")[-1].lower()):
        load_settings(environ={variable: value})


def test_a_deployment_address_list_of_names_is_refused_at_load(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.big]\ndeployments = [{ name = "a", address = "inference-a:50054,inference-b:50054" }]\n'
    )
    with pytest.raises(ConfigError, match=r"models\.big\.deployments\.address"):
        load_settings(path, environ={})
    assert load_settings(environ={"MESHGATE_ROUTER__LISTEN": '"unix:/tmp/router.sock"'}).router.listen


@pytest.mark.parametrize(
    ("setting", "value", "refused"),
    [
        # A reviewer's channel to 127.0.0.1:99999 connected to port 34463.
        ("router.context_address", "127.0.0.1:99999", ": port 99999 is not 1-65535"),
        ("router.cache_address", "127.0.0.1:0", ": port 0 is not 1-65535"),
        # grpc dials an address without a port on 443.
        ("router.context_address", "127.0.0.1", ": '127.0.0.1' names no port"),
        (
            "context.inference_address",
            "dns:///inference",
            ": 'inference' in 'dns:///inference' names no port",
        ),
        (
            "router.cache_address",
            "10.0.0.5:50053,10.0.0.6:99999",
            ": port 99999 is not 1-65535 in '10.0.0.6:99999'",
        ),
        ("router.context_address", "ipv4:10.0.0.5:70000", ": port 70000 is not 1-65535"),
        ("router.context_address", "[::1]:1,[::1]:65536", ": port 65536 is not 1-65535"),
        ("router.context_address", "::1:50052", ": '::1:50052' is not host:port"),
        ("inference.triton_urls", '["127.0.0.1:99999"]', "[0]: port 99999 is not 1-65535"),
        (
            "inference.triton_urls",
            '["127.0.0.1:8001", "not an address"]',
            "[1]: 'not an address' names no port",
        ),
        ("inference.triton_urls", '["http://triton:8001"]', "[0]: 'http://triton:8001' is not host:port"),
        ("inference.triton_urls", '[""]', "[0] must not be empty"),
    ],
)
def test_a_dialled_address_grpc_would_dial_elsewhere_is_refused_at_load(setting, value, refused):
    """A review: each loaded, and grpc dialled a port above 65535 modulo
    65536, and one left out as 443."""
    section, field = setting.split(".")
    with pytest.raises(ConfigError, match=f"^{re.escape(setting + refused)}"):
        load_settings(environ={f"MESHGATE_{section.upper()}__{field.upper()}": value})


def test_a_deployment_or_otlp_address_out_of_range_is_refused_naming_its_setting(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[models.big]\ndeployments = [{ name = "a", address = "127.0.0.1:70000" }]\n')
    with pytest.raises(ConfigError, match=r"^models\.big\.deployments\.address: port 70000 is not 1-65535"):
        load_settings(path, environ={})
    # Every service exports its spans there: the exporter dials a URL's host:port.
    otlp = {
        "MESHGATE_TELEMETRY__EXPORTER": "otlp",
        "MESHGATE_TELEMETRY__OTLP_ENDPOINT": "http://collector:99999",
    }
    with pytest.raises(ConfigError, match=r"^telemetry\.otlp_endpoint: port 99999 is not 1-65535"):
        load_settings(environ=otlp)
    # Not dialled unless it is the exporter.
    assert load_settings(environ={**otlp, "MESHGATE_TELEMETRY__EXPORTER": "none"})


def test_every_form_of_dialled_address_that_worked_still_loads(tmp_path):
    forms = {
        "MESHGATE_ROUTER__CONTEXT_ADDRESS": "dns:///meshgate-context.ns.svc.cluster.local:50052",
        "MESHGATE_ROUTER__CACHE_ADDRESS": " 10.0.0.5:50053, 10.0.0.6:50053 ",
        "MESHGATE_CONTEXT__INFERENCE_ADDRESS": "unix:/run/meshgate/inference.sock",
        "MESHGATE_CACHE__EMBEDDER": "inference",
        "MESHGATE_CACHE__INFERENCE_ADDRESS": "[::1]:1,[::1]:65535",
        "MESHGATE_INFERENCE__TRITON_URLS": '["triton-a:8001", "[fe80::1%eth0]:8001", "ipv4:10.0.0.7:8001"]',
        "MESHGATE_TELEMETRY__EXPORTER": "otlp",
        "MESHGATE_TELEMETRY__OTLP_ENDPOINT": "collector:4317",
    }
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.big]\ndeployments = [{ name = "a", address = "dns://10.0.0.2/inference:50054" },'
        ' { name = "b", address = "ipv6:[::1]:50054,[::2]:50054" },'
        ' { name = "c", address = "unix-abstract:i" }]\n'
    )
    settings = load_settings(path, environ=forms)
    assert settings.router.context_address == forms["MESHGATE_ROUTER__CONTEXT_ADDRESS"]
    assert settings.inference.triton_urls[1] == "[fe80::1%eth0]:8001"
    assert [d.address for d in settings.models["big"].deployments][2] == "unix-abstract:i"


def test_two_deployments_of_one_alias_under_one_name_are_refused_at_load(tmp_path):
    """A hunt's finding: two unnamed deployments are both 'local', and
    session affinity (which hashes the name) sent every session to the first."""
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.big]\ndeployments = [{ address = "inference-a:50054" }, { address = "inference-b:50054" }]\n'
    )
    with pytest.raises(ConfigError, match=r"models\.big\.deployments: .*\['local'\]"):
        load_settings(path, environ={})
    path.write_text(
        '[models.big]\ndeployments = [{ name = "a", address = "inference-a:50054" },'
        ' { name = "b", address = "inference-b:50054" }]\n'
    )
    assert [d.name for d in load_settings(path, environ={}).models["big"].deployments] == ["a", "b"]


@pytest.mark.parametrize(
    "setting", ["router.listen", "context.metrics_listen", "router.http_listen", "mesh.health_listen"]
)
def test_a_listen_address_without_a_host_is_refused_naming_the_setting(setting):
    """grpc refuses ':50051' in words naming no setting; the HTTP and metrics
    servers took it for loopback, where Go's and Python's take every interface."""
    section, field = setting.split(".")
    variable = f"MESHGATE_{section.upper()}__{field.upper()}"
    with pytest.raises(ConfigError, match=rf"^{re.escape(setting)} must name a host; ':50051' names none"):
        load_settings(environ={variable: ":50051"})
    for address in ("0.0.0.0:50051", "[::]:50051", "127.0.0.1:50051"):
        settings = load_settings(environ={variable: address})
        assert getattr(getattr(settings, section), field) == address


@pytest.mark.parametrize(
    ("address", "bound"),
    [
        ("[::1]:50062", ("::1", 50062)),
        ("[::]:0", ("::", 0)),
        ("0.0.0.0:50062", ("0.0.0.0", 50062)),
        ("localhost:8080", ("localhost", 8080)),
    ],
)
def test_a_listen_address_the_settings_accept_is_what_the_http_servers_bind(address, bound):
    """The metrics and HTTP servers bind their own sockets: "[::1]" reached
    getaddrinfo as a name (gaierror) though check_listen had accepted it."""
    load_settings(environ={"MESHGATE_CACHE__METRICS_LISTEN": address})
    assert tcp_listen_address(address) == bound


@pytest.mark.parametrize(
    ("setting", "address"),
    [
        # grpc read it as ::0.1.0.0 on port 443, the TCP servers as ::1 port 0.
        ("router.listen", "::1:0"),
        ("cache.metrics_listen", "::1:0"),
        ("router.http_listen", "[::1:0"),
        ("context.metrics_listen", "http://127.0.0.1:9090"),
        ("router.listen", "[]:50051"),
        ("mesh.health_listen", "host]:50051"),
        ("router.http_listen", "vsock:3:5000"),
        ("router.listen", "[127.0.0.1]:0"),
        ("cache.metrics_listen", "[localhost]:0"),
        ("router.listen", "127.0.0.1:\u0665\u0660\u0660\u0665\u0661"),
        ("context.listen", "127.0.0.1:\u00b2"),
    ],
)
def test_a_listen_address_read_two_ways_is_refused_naming_the_setting(setting, address):
    """A review: these loaded, and were read differently by grpc and the TCP
    servers, or failed only at the start."""
    section, field = setting.split(".")
    with pytest.raises(ConfigError, match=rf"^{re.escape(setting)} must be host:port"):
        load_settings(environ={f"MESHGATE_{section.upper()}__{field.upper()}": address})


def test_a_tcp_only_port_refusal_does_not_offer_a_unix_socket():
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"MESHGATE_CACHE__METRICS_LISTEN": "127.0.0.1"})
    assert "unix" not in str(refused.value)
    with pytest.raises(ConfigError, match="or unix:path"):
        load_settings(environ={"MESHGATE_CACHE__LISTEN": "127.0.0.1"})
    # grpc's own forms stay: a vsock listener, an IPv4-mapped IPv6 host.
    settings = load_settings(
        environ={
            "MESHGATE_CACHE__LISTEN": "vsock:3:5000",
            "MESHGATE_CACHE__METRICS_LISTEN": "[::ffff:127.0.0.1]:0",
        }
    )
    assert settings.cache.listen == "vsock:3:5000"


def test_a_unix_socket_is_refused_at_load_where_the_server_listens_on_tcp_only():
    """metrics_listen and http_listen = "unix:..." loaded, then the start
    failed with int()'s ValueError and a traceback, naming no setting."""
    for setting in ("cache.metrics_listen", "router.http_listen"):
        section, field = setting.split(".")
        with pytest.raises(
            ConfigError, match=rf"^{re.escape(setting)} must be host:port \(it listens on TCP only"
        ):
            load_settings(environ={f"MESHGATE_{section.upper()}__{field.upper()}": "unix:/tmp/meshgate.sock"})
    settings = load_settings(
        environ={
            "MESHGATE_CACHE__LISTEN": "unix:/tmp/cache.sock",
            "MESHGATE_MESH__HEALTH_LISTEN": "unix:/tmp/health.sock",
        }
    )
    assert (settings.cache.listen, settings.mesh.health_listen) == (
        "unix:/tmp/cache.sock",
        "unix:/tmp/health.sock",
    )


def test_an_environment_override_finds_a_table_key_whatever_its_case(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.Llama3]\nmax_output_tokens = 512\ndeployments = [{ name = "a", address = "h:1" }]\n'
    )
    models = load_settings(path, environ={"MESHGATE_MODELS__LLAMA3__MAX_OUTPUT_TOKENS": "64"}).models
    assert models["Llama3"].max_output_tokens == 64
    assert "llama3" not in models


def test_an_environment_value_that_looks_like_a_number_is_text_where_the_setting_is_text():
    settings = load_settings(environ={"MESHGATE_ROUTER__DEV_API_KEY": "12345"})
    assert settings.router.dev_api_key == "12345"
    assert load_settings(environ={"MESHGATE_CACHE__TTL_S": "120"}).cache.ttl_s == 120


def test_a_table_set_whole_and_a_key_inside_it_both_apply_whatever_their_order():
    for order in (1, -1):
        variables = [
            ("MESHGATE_ROUTER__PRICES", "{smollm2 = {prompt_usd_per_million = 2.0}}"),
            ("MESHGATE_ROUTER__PRICES__TINY-GPT__PROMPT_USD_PER_MILLION", "1.0"),
        ][::order]
        prices = load_settings(environ=dict(variables)).router.prices
        assert prices["smollm2"].prompt_usd_per_million == 2.0
        assert prices["tiny-gpt"].prompt_usd_per_million == 1.0


def test_what_loaded_before_the_address_checks_still_loads():
    """An address a cache with the local embedder never dials may be empty,
    and grpc's abstract unix sockets are listen addresses too."""
    settings = load_settings(
        environ={
            "MESHGATE_CACHE__EMBEDDER": "local",
            "MESHGATE_CACHE__INFERENCE_ADDRESS": '""',
            "MESHGATE_CONTEXT__LISTEN": "unix-abstract:meshgate-context",
        }
    )
    assert settings.cache.inference_address == ""


def test_a_limit_too_large_for_the_counters_is_refused():
    with pytest.raises(ConfigError, match="cost_usd_per_day must be at most"):
        LimitSettings(cost_usd_per_day=1e300)
    with pytest.raises(ConfigError, match="tokens_per_day must be at most"):
        LimitSettings(tokens_per_day=10**30)
    assert LimitSettings(cost_usd_per_day=1e6, tokens_per_day=10**12).configured()


def test_a_limit_just_past_the_largest_is_refused_naming_the_largest_exactly():
    """A bug hunt's finding (CreateKey and a reload alike): the bound was
    written "9.0072e+15", 9007200000000000, above the value it refused."""
    with pytest.raises(ConfigError, match=r"at most 9007199254740992 \(2\^53\).*got 9007199254740993"):
        LimitSettings(tokens_per_day=2**53 + 1)


def test_a_cost_limit_under_one_nano_usd_is_refused_naming_the_smallest(tmp_path):
    """It rounded down to a budget of 0 nano-USD (admission.budget_nano_usd),
    so every priced turn was refused as exceeding it."""
    config = tmp_path / "meshgate.toml"
    config.write_text('[[router.tenants]]\nid = "a"\nlimits = { cost_usd_per_day = 5e-10 }\n')
    with pytest.raises(
        ConfigError, match=r"router\.tenants\[0\]\.limits: cost_usd_per_day must be at least 1e-09 .*5e-10"
    ):
        load_settings(str(config))
    with pytest.raises(ConfigError, match=r"cost_usd_per_month must be at least 1e-09"):
        LimitSettings(cost_usd_per_month=9.999999999999999e-10)
    assert LimitSettings(cost_usd_per_day=1e-9, cost_usd_per_month=0.000000001).configured()


def test_a_session_byte_cap_must_leave_the_session_readable_in_one_answer(tmp_path) -> None:
    # A session under the former 64 MiB default could be stored but never
    # read: GetSession's answer passed gRPC's 32 MiB bound.
    assert ContextSettings().max_session_bytes <= MAX_READABLE_SESSION_BYTES < serving.MAX_MESSAGE_BYTES
    config = tmp_path / "meshgate.toml"
    config.write_text(f"[context]\nmax_session_bytes = {64 * 1024 * 1024}\n")
    with pytest.raises(ConfigError, match="max_session_bytes must be at most"):
        load_settings(str(config))


def test_an_unknown_setting_is_named_in_its_table_without_a_stray_dot(tmp_path):
    # A bug hunt's finding: "router.tenants[0].limits.: unknown setting(s)".
    with pytest.raises(ConfigError, match=r"^router\.tenants\[0\]\.limits: unknown setting\(s\) \['rpm'\]$"):
        _tenants_toml(tmp_path, '[[router.tenants]]\nid = "acme"\nlimits = { rpm = 3 }\n')


def _tenants_toml(tmp_path, text: str):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return load_settings(path, environ={})


DIGEST_A, DIGEST_B = hash_api_key("key-a"), hash_api_key("key-b")


@pytest.mark.parametrize(
    ("tenant_id", "problem"),
    [
        ("", "1-128 characters"),
        ("x" * 129, "1-128 characters"),
        ("odd\\u001fname", "printable"),
        ("two words", "printable"),
        ("a{b}", "hash tag"),
        ("tenant-b}:x", "hash tag"),
    ],
    ids=["empty", "129", "unit separator", "space", "braces", "closing brace"],
)
def test_a_configured_tenant_id_follows_the_rule_createkey_applies(tmp_path, tenant_id, problem):
    """A bug hunt: an id with a unit separator was billed into another
    tenant's usage (the ledger strips it), an empty or 600-character one was
    loaded and every call of its key failed; ids with braces move the keys'
    Redis Cluster hash tag."""
    with pytest.raises(ConfigError, match=problem):
        _tenants_toml(tmp_path, f'[[router.tenants]]\nid = "{tenant_id}"\napi_key_sha256 = ["{DIGEST_A}"]\n')


def test_a_key_digest_must_be_a_sha256_hex_digest_and_is_read_in_lower_case(tmp_path):
    with pytest.raises(ConfigError, match="not a SHA-256 hex digest"):
        _tenants_toml(tmp_path, '[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["key-a"]\n')
    with pytest.raises(ConfigError, match="admin_api_key_sha256"):
        _tenants_toml(tmp_path, f'[router]\nadmin_api_key_sha256 = ["{DIGEST_A[:40]}"]\n')
    settings = _tenants_toml(
        tmp_path, f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A.upper()}"]\n'
    )
    assert settings.router.tenants[0].api_key_sha256 == [DIGEST_A]


def test_a_key_pasted_in_place_of_its_digest_is_refused_without_showing_it(tmp_path):
    """The refusal is logged (a start's, a reload's): it showed the pasted
    key, the very secret, for the admin credential (set from a Secret in
    deploy/k8s) as for a tenant's."""
    with pytest.raises(ConfigError, match=r"admin_api_key_sha256\[1\] is not a SHA-256") as refused:
        load_settings(environ={"MESHGATE_ROUTER__ADMIN_API_KEY_SHA256": f'["{DIGEST_A}", "mg-hunter2"]'})
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match="a string of 10 characters") as refused:
        _tenants_toml(tmp_path, '[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["mg-hunter2"]\n')
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n'
            f'[[router.tenants]]\nid = "globex"\napi_key_sha256 = ["{DIGEST_B}", "{DIGEST_A.upper()}"]\n',
            "both tenant 'acme' and tenant 'globex'",
        ),
        (
            f'[router]\nadmin_api_key_sha256 = ["{DIGEST_A}"]\n'
            f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n',
            "both the admin credential and tenant 'acme'",
        ),
        (
            '[router]\ndev_tenant = true\ndev_api_key = "key-a"\n'
            f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n',
            "both the dev tenant's key",
        ),
        (
            f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n'
            f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_B}"]\n',
            "'acme' appears twice",
        ),
        # The dev tenant (turned on beside tenants) is "dev": configured too,
        # its key authenticated as an unlimited "dev" beside the limited one.
        (
            "[router]\ndev_tenant = true\n"
            f'[[router.tenants]]\nid = "dev"\napi_key_sha256 = ["{DIGEST_A}"]\nmodels = ["tiny-gpt"]\n',
            "'dev' \\(the dev tenant's",
        ),
    ],
    ids=["two tenants", "tenant and admin", "tenant and dev key", "one id twice", "the dev tenant's id"],
)
def test_a_key_or_tenant_named_twice_is_refused_not_won_by_the_last(tmp_path, text, message):
    """A bug hunt: a digest under two tenants authenticated as the last one,
    and one also listed as the admin credential made the tenant's key admin."""
    with pytest.raises(ConfigError, match=message):
        _tenants_toml(tmp_path, text)


def test_a_tenant_allowed_a_model_alias_that_does_not_exist_is_refused_at_load(tmp_path):
    """A typo in a tenant's models loaded, and the tenant was refused the
    model it was meant to have on every request (MODEL_NOT_ALLOWED for the
    real name), with nothing at load to say why."""
    tenant = f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n'
    with pytest.raises(
        ConfigError, match=r"router\.tenants 'acme': models: unknown model alias\(es\) \['smolm2'\]"
    ):
        _tenants_toml(tmp_path, tenant + 'models = ["tiny-gpt", "smolm2"]\n')
    # "*" and configured aliases, selecting ones too, load.
    settings = _tenants_toml(
        tmp_path,
        "[models.tiny-gpt]\n[models.smollm2]\n"
        '[models.auto]\nselection = { fast = "tiny-gpt", strong = "smollm2" }\n'
        + tenant
        + 'models = ["*", "tiny-gpt", "smollm2", "auto"]\n',
    )
    assert settings.router.tenants[0].models == ["*", "tiny-gpt", "smollm2", "auto"]


@pytest.mark.parametrize(
    ("text", "on"),
    [
        ("", True),
        ('[router]\nlisten = "127.0.0.1:50051"\n', True),
        (f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n', False),
        (f'[router]\nadmin_api_key_sha256 = ["{DIGEST_A}"]\n', False),
        (f'[router]\ndev_tenant = true\nadmin_api_key_sha256 = ["{DIGEST_A}"]\n', True),
        (
            "[router]\ndev_tenant = true\n"
            f'[[router.tenants]]\nid = "acme"\napi_key_sha256 = ["{DIGEST_A}"]\n',
            True,
        ),
        ("[router]\ndev_tenant = false\n", False),
    ],
    ids=[
        "empty file",
        "no tenants",
        "a tenant",
        "an admin credential",
        "on beside admin",
        "on beside a tenant",
        "off",
    ],
)
def test_the_dev_tenant_is_on_unless_set_only_where_no_tenant_or_admin_is_configured(tmp_path, text, on):
    """A trust gap: on by default everywhere, a production file that named
    its tenants and admin credential but had no dev_tenant line served the
    docs' public key as tenant "dev", with every model and no limits."""
    assert _tenants_toml(tmp_path, text).router.dev_tenant is on


def test_an_admin_credential_given_in_the_environment_turns_the_dev_tenant_off(tmp_path):
    environ = {"MESHGATE_ROUTER__ADMIN_API_KEY_SHA256": f'["{DIGEST_A}"]'}
    assert load_settings(environ=environ).router.dev_tenant is False
    assert load_settings(environ={**environ, "MESHGATE_ROUTER__DEV_TENANT": "true"}).router.dev_tenant is True


def test_a_tenant_named_dev_is_fine_once_the_dev_tenant_is_off(tmp_path):
    settings = _tenants_toml(
        tmp_path,
        f'[router]\ndev_tenant = false\n[[router.tenants]]\nid = "dev"\napi_key_sha256 = ["{DIGEST_A}"]\n',
    )
    assert settings.router.tenants[0].id == "dev"


def test_a_tenants_queued_generations_leave_most_of_the_inference_call_bound_to_others():
    # At 256 a model, four tenants' queues filled the default 1,024 calls,
    # and every Embed was refused SERVICE_BUSY.
    inference = load_settings(environ={}).inference
    assert inference.max_concurrent_rpcs == 1024 and len(inference.models) == 2
    assert inference.queued_generations_cap() == 64
    with pytest.raises(ConfigError, match="max_queued_generations_per_tenant .* at most 64"):
        load_settings(environ={"MESHGATE_INFERENCE__MAX_QUEUED_GENERATIONS_PER_TENANT": "256"})
    assert (
        load_settings(
            environ={"MESHGATE_INFERENCE__MAX_QUEUED_GENERATIONS_PER_TENANT": "64"}
        ).inference.queued_generations_cap()
        == 64
    )
    unbounded = {"MESHGATE_INFERENCE__MAX_CONCURRENT_RPCS": "0"}
    assert load_settings(environ=unbounded).inference.queued_generations_cap() == 256
    set_high = unbounded | {"MESHGATE_INFERENCE__MAX_QUEUED_GENERATIONS_PER_TENANT": "5000"}
    assert load_settings(environ=set_high).inference.queued_generations_cap() == 5000


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        # Each loaded, and failed later: every turn of the alias UNAVAILABLE
        # (which clients retry), every turn without max_tokens refused as the
        # caller's INVALID_TOKEN_BUDGET, a start failing after Redis and the
        # HTTP edge had started with "invalid literal for int()", a service
        # "serving" on an abstract socket grpc named, every call to one
        # dialled so UNAVAILABLE.
        ("[models.tiny-gpt]\ndeployments = []\n", "models.tiny-gpt.deployments must name at least one"),
        (
            "[models.tiny-gpt]\ncontext_window_tokens = 64\ndefault_max_tokens = 64\n",
            r"models.tiny-gpt.default_max_tokens \(64\) must be below its context_window_tokens \(64\)",
        ),
        ('[router]\nlisten = ""\n', "router.listen must not be empty"),
        ('[context]\nlisten = ""\n', "context.listen must not be empty"),
        ('[router]\nlisten = "unix:"\n', "router.listen names no socket path"),
        ('[inference]\nlisten = "unix-abstract:"\n', "inference.listen names no socket path"),
        ('[router]\ncontext_address = "unix:"\n', "router.context_address: 'unix:' names no socket path"),
        ('[router]\ncache_address = "unix:///"\n', "router.cache_address: 'unix:///' names no socket path"),
    ],
    ids=[
        "an alias without deployments",
        "an answer that fills the window",
        "router.listen empty",
        "context.listen empty",
        "a unix listen without a path",
        "an abstract listen without a name",
        "a unix address dialled without a path",
        "a unix URL dialled without a path",
    ],
)
def test_settings_that_would_fail_later_are_refused_at_load_naming_the_setting(tmp_path, body, refusal):
    """A configuration review's findings: each of these loaded."""
    path = tmp_path / "meshgate.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=refusal):
        load_settings(path, environ={})


def test_what_those_refusals_leave_alone_still_loads(tmp_path):
    """The other side: a window one token above the answer, socket paths,
    and the optional endpoints left empty (not listened on)."""
    path = tmp_path / "meshgate.toml"
    path.write_text(
        # A window at the default max_output_tokens (256), a final read's: no error.
        "[models.tiny-gpt]\ncontext_window_tokens = 256\ndefault_max_tokens = 8\n"
        '[router]\nlisten = "unix:/tmp/router.sock"\ncontext_address = "unix:///tmp/context.sock"\n'
        'http_listen = ""\nmetrics_listen = ""\n[inference]\nlisten = "unix-abstract:meshgate-inference"\n'
    )
    settings = load_settings(path, environ={})
    assert settings.models["tiny-gpt"].context_window_tokens == 256
    assert settings.router.listen == "unix:/tmp/router.sock" and settings.router.http_listen == ""


def test_a_whole_section_given_in_one_variable_is_read_as_a_whole_table():
    """A docs review's finding: MESHGATE_ROUTER='{ ... }' (a whole section in
    one variable, as MESHGATE_MODELS__SMOLLM2='{ ... }' is a whole table)
    was skipped without a word: a router given its tenants so served the
    dev tenant instead. Keys inside it set by their own variables still
    apply on top; other MESHGATE_ names are no settings."""
    settings = load_settings(
        environ={
            "MESHGATE_ROUTER": "{ max_messages = 7, max_message_bytes = 4096 }",
            "MESHGATE_ROUTER__MAX_MESSAGES": "9",
            "MESHGATE_CACHE": "{ semantic_threshold = 0.95 }",
            "MESHGATE_SMOLLM2_FILES": "/opt/smollm2",
        }
    )
    assert (settings.router.max_messages, settings.router.max_message_bytes) == (9, 4096)
    assert settings.cache.semantic_threshold == 0.95
    with pytest.raises(ConfigError, match="router: expected a table"):
        load_settings(environ={"MESHGATE_ROUTER": "7"})


def test_the_two_aliases_apply_over_a_whole_section_variable():
    """A final read's finding: MESHGATE_ROUTER='{...}' replaced the router
    table after MESHGATE_DEV_API_KEY had set its key in it (the published
    mg-dev-local-key came back), and MESHGATE_REDIS='{...}' dropped
    REDIS_URL (the services dialled 127.0.0.1:6379). A key's own variable
    still wins over either."""
    settings = load_settings(
        environ={
            "MESHGATE_DEV_API_KEY": "prod-dev-key",
            "MESHGATE_ROUTER": "{ max_messages = 7 }",
            "REDIS_URL": "redis://redis.internal:6379/0",
            "MESHGATE_REDIS": "{ timeout_s = 1.5 }",
        }
    )
    assert (settings.router.dev_api_key, settings.router.max_messages) == ("prod-dev-key", 7)
    assert (settings.redis.url, settings.redis.timeout_s) == ("redis://redis.internal:6379/0", 1.5)
    settings = load_settings(
        environ={"MESHGATE_DEV_API_KEY": "prod-dev-key", "MESHGATE_ROUTER__DEV_API_KEY": "named-key"}
    )
    assert settings.router.dev_api_key == "named-key"
