"""The Kubernetes manifests, as rendered for every overlay, checked offline:
built-in kinds against the Kubernetes schemas kubernetes-validate bundles,
cert-manager's kinds against the subset of its CRDs vendored in
deploy/k8s/schemas/, and the properties the deployment promises (probes,
drain, budgets, autoscaling, who may reach whom, mesh identities, a settings
file the services accept)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from meshgate import mesh_auth, metrics, serving
from meshgate.config import hash_api_key, load_settings
from services.cache import app as cache_app
from services.context import app as context_app
from services.inference import app as inference_app

K8S = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The newest Kubernetes release whose schemas the pinned validator bundles;
# preStop's `sleep` action needs 1.30+.
KUBERNETES_VERSION = "1.37.0"


def _load_renderer():
    spec = importlib.util.spec_from_file_location("meshgate_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while being made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_renderer()
OVERLAYS = render.overlay_names()
CERT_MANAGER = json.loads((K8S / "schemas" / "cert-manager-v1.json").read_text())


def _objects(overlay: str) -> list[dict]:
    # Through YAML and back: what `kubectl apply` would read, not the dicts.
    text = yaml.safe_dump_all(render.render(render.Overlay.load(overlay)), sort_keys=False)
    return list(yaml.safe_load_all(text))


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_there_are_overlays_for_a_small_cluster_and_for_production():
    assert {"dev", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_its_schema(overlay):
    objects = _objects(overlay)
    checked_builtin = checked_crd = 0
    for obj in objects:
        if obj["apiVersion"].startswith("cert-manager.io/"):
            schema = {**CERT_MANAGER, "$ref": f"#/$defs/{obj['kind']}"}
            jsonschema.validate(obj, schema)
            checked_crd += 1
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            checked_builtin += 1
    # Namespace, ConfigMap and five objects per service; 3 + 4 cert-manager objects.
    assert checked_builtin == 2 + 5 * len(render.SERVICES)
    assert checked_crd == 3 + len(render.SERVICES)


def test_the_validators_refuse_a_broken_object():
    """The checks above can fail: a misspelled field and a wrong type are refused."""
    deployment = render.deployment("router", render.Overlay.load("dev"))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    certificate = render.certificate_objects(render.Overlay.load("dev"))[-1]
    certificate["spec"]["usages"] = ["server auth", "clientauth"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(certificate, {**CERT_MANAGER, "$ref": "#/$defs/Certificate"})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_its_deployment_probes_drain_and_requests(overlay):
    deployments = _by_kind(_objects(overlay), "Deployment")
    assert set(deployments) == {f"meshgate-{s}" for s in render.SERVICES}
    for service in render.SERVICES:
        pod = deployments[f"meshgate-{service}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].endswith(f"/meshgate-{service}:{render.Overlay.load(overlay).image_tag}")
        # Kubernetes' own gRPC probe; an internal service's on its plain-text
        # health port. Readiness asks whether the service can answer; startup
        # and liveness whether the process serves (an inference service with
        # no Triton ready yet is not ready, and a restart would not help it).
        port = render.probe_port(service)
        assert container["readinessProbe"]["grpc"] == {"port": port}
        # A probe slow once under load does not take the pod out of its endpoints.
        assert container["readinessProbe"]["failureThreshold"] >= 2
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": serving.LIVENESS_SERVICE}
        assert port in {port["containerPort"] for port in container["ports"]}
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
        # The pause and the service's drain both fit before the kill.
        assert pod["terminationGracePeriodSeconds"] > render.PRESTOP_PAUSE_S + render.DRAIN_GRACE_S
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_budgets_and_autoscalers_select_each_deployment(overlay):
    objects = _objects(overlay)
    deployments = _by_kind(objects, "Deployment")
    budgets = _by_kind(objects, "PodDisruptionBudget")
    autoscalers = _by_kind(objects, "HorizontalPodAutoscaler")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        hpa = autoscalers[name]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
        kinds = {m["type"]: m for m in hpa["metrics"]}
        assert kinds["Resource"]["resource"]["name"] == "cpu"
        assert kinds["Pods"]["pods"]["metric"]["name"].startswith("meshgate_")


def test_the_autoscalers_metrics_come_from_series_the_services_export():
    exported = metrics.exported_series()
    adapter_rules = (K8S / "README.md").read_text()
    for service, name in render.SCALING_METRICS.items():
        series = render.SCALING_SERIES[name]
        assert series in exported, (service, series)
        assert f"seriesQuery: '{series}{{" in adapter_rules, f"no adapter rule reads {series}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_router_is_exposed_and_internal_services_admit_only_their_mesh_callers(overlay):
    objects = _objects(overlay)
    services = _by_kind(objects, "Service")
    policies = _by_kind(objects, "NetworkPolicy")
    admitted_in_code = {
        "context": context_app.CALLERS,
        "cache": cache_app.CALLERS,
        "inference": inference_app.CALLERS,
    }
    for service in render.SERVICES:
        name = f"meshgate-{service}"
        grpc_rule = next(
            rule
            for rule in policies[name]["spec"]["ingress"]
            if {"port": render.GRPC_PORTS[service], "protocol": "TCP"} in rule["ports"]
        )
        if service == "router":
            # Reached through the cluster's TLS-terminating ingress: its
            # ports speak plain text, and a LoadBalancer would carry bearer
            # keys across the network unencrypted (deploy/k8s/README.md).
            assert services[name]["spec"]["type"] == "ClusterIP"
            # gRPC and the OpenAI-compatible HTTP edge, both public.
            assert {p["port"] for p in services[name]["spec"]["ports"]} == {50051, render.ROUTER_HTTP_PORT}
            assert {p["port"] for p in grpc_rule["ports"]} == {50051, render.ROUTER_HTTP_PORT}
            continue
        assert grpc_rule["ports"] == [{"port": render.GRPC_PORTS[service], "protocol": "TCP"}]
        # Headless: callers balance over the pods themselves.
        assert services[name]["spec"]["clusterIP"] == "None"
        allowed = {
            source["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for source in grpc_rule["from"]
        }
        assert allowed == {mesh_auth.identity(caller) for caller in admitted_in_code[service]}
        assert all("namespaceSelector" not in source for source in grpc_rule["from"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_gets_a_certificate_for_its_mesh_identity(overlay):
    objects = _objects(overlay)
    certificates = _by_kind(objects, "Certificate")
    deployments = _by_kind(objects, "Deployment")
    for service in render.SERVICES:
        spec = certificates[mesh_auth.identity(service)]["spec"]
        assert spec["dnsNames"][0] == mesh_auth.identity(service)
        assert {"server auth", "client auth"} <= set(spec["usages"])
        # ES256 tenant tokens are signed with the router's key: P-256.
        assert spec["privateKey"]["algorithm"] == "ECDSA" and spec["privateKey"]["size"] == 256
        assert spec["issuerRef"]["name"] == "meshgate-ca"
        # Pods started before a renewal hold the router's old certificate:
        # only a kept key lets them verify the tokens signed after it.
        assert spec["privateKey"]["rotationPolicy"] == ("Never" if service == "router" else "Always")
        volumes = deployments[f"meshgate-{service}"]["spec"]["template"]["spec"]["volumes"]
        assert {"name": "mesh-cert", "secret": {"secretName": spec["secretName"]}} in volumes


# What the operator's Secrets hold (deploy/k8s/README.md), by Secret and key.
ADMIN_DIGEST = hash_api_key("mg-admin-example")
SECRETS = {
    ("meshgate-redis", "url"): "redis://redis.example:6379/0",
    ("meshgate-router-admin", "admin_api_key_sha256"): f'["{ADMIN_DIGEST}"]',
}


def _secret_value(source: dict) -> str:
    reference = source["secretKeyRef"]
    return SECRETS[reference["name"], reference["key"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", render.SERVICES)
def test_the_services_accept_the_rendered_settings(overlay, service, tmp_path):
    objects = _objects(overlay)
    config = _by_kind(objects, "ConfigMap")["meshgate-config"]["data"]["meshgate.toml"]
    (tmp_path / "meshgate.toml").write_text(config)
    container = _by_kind(objects, "Deployment")[f"meshgate-{service}"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    environ = {
        e["name"]: e["value"] if "value" in e else _secret_value(e["valueFrom"]) for e in container["env"]
    }
    settings = load_settings(tmp_path / "meshgate.toml", environ)
    assert settings.router.http_listen == f"0.0.0.0:{render.ROUTER_HTTP_PORT}"
    section = getattr(settings, service)
    assert section.listen == f"0.0.0.0:{render.GRPC_PORTS[service]}"
    assert settings.mesh.cert_file == f"{render.CERTS_DIR}/tls.crt"
    if service != "router":
        assert settings.mesh.health_listen.endswith(f":{render.probe_port(service)}")
    assert settings.router.dev_tenant is False
    if service in render.USES_REDIS:
        assert settings.redis.url == "redis://redis.example:6379/0"
    if service == "router":
        # The credential a cluster starts with (no dev tenant, no tenant in
        # the settings): without it no call could ever authenticate.
        assert settings.router.admin_api_key_sha256 == [ADMIN_DIGEST]
    namespace = render.Overlay.load(overlay).namespace
    assert settings.router.context_address == f"dns:///meshgate-context.{namespace}.svc.cluster.local:50052"
    assert settings.inference.triton_urls == render.Overlay.load(overlay).triton_urls
    assert tomllib.loads(config)  # plain TOML, no templating left in it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets_never_from_the_config_map_or_literals(overlay):
    objects = _objects(overlay)
    config = tomllib.loads(_by_kind(objects, "ConfigMap")["meshgate-config"]["data"]["meshgate.toml"])
    assert "redis" not in config
    assert not {"tenants", "admin_api_key_sha256", "dev_api_key"} & set(config["router"])
    for deployment in _by_kind(objects, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        # Literals name files only; every other value comes from a Secret.
        literal = {e["name"] for e in container["env"] if "value" in e}
        assert all(name.endswith("_FILE") or name == "MESHGATE_CONFIG" for name in literal), literal
        assert all("secretKeyRef" in e["valueFrom"] for e in container["env"] if "value" not in e)


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in the binary suffixes the overlays use."""
    for suffix, power in (("Ki", 10), ("Mi", 20), ("Gi", 30)):
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) << power
    return int(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_caches_memory_limit_holds_the_resident_rows_its_settings_allow(overlay, tmp_path):
    """Past its limit the pod is killed, where cache.max_resident_rows would
    have pushed rows out: the dev overlay's 1536Mi held ~290 k of the
    default's 1.2 M rows (a review)."""
    objects = _objects(overlay)
    (tmp_path / "meshgate.toml").write_text(
        _by_kind(objects, "ConfigMap")["meshgate-config"]["data"]["meshgate.toml"]
    )
    rows = load_settings(tmp_path / "meshgate.toml", {}).cache.max_resident_rows
    container = _by_kind(objects, "Deployment")["meshgate-cache"]["spec"]["template"]["spec"]["containers"][0]
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert rows * render.CACHE_BYTES_PER_ROW + render.CACHE_BASE_BYTES <= limit, (rows, limit)
