"""Renders meshgate's Kubernetes manifests: one base, and an overlay per
environment (deploy/k8s/overlays/<name>.toml) that sets only what differs.

    python deploy/k8s/render.py production > meshgate.yaml
    kubectl apply -f meshgate.yaml

Plain Python instead of Helm or Kustomize: the rendered YAML is what gets
applied and validated (tests/unit/test_deploy_k8s.py, offline, against the
Kubernetes schemas that kubernetes-validate bundles), and no binary beyond
Python is needed to produce it. The base:

* per service (router, context, cache, inference): a Deployment (non-root,
  read-only root, Kubernetes' gRPC health probes, a preStop pause so endpoints drop the
  pod before it drains, resource requests), a Service (headless for the
  internal services, whose callers balance over the pods themselves), a
  PodDisruptionBudget, a HorizontalPodAutoscaler on CPU and on the service's
  own Prometheus metric, a NetworkPolicy, and a cert-manager Certificate
  for the mesh's mutual TLS named as meshgate/mesh_auth.py expects;
* one ConfigMap with the settings file every service reads (no credential:
  those come from Secrets the operator makes);
* Redis and Triton are external: Redis's URL comes from the Secret
  ``meshgate-redis`` (key ``url``), Triton's servers by DNS names in the overlay;
* the router's admin credential (its digest) from the Secret
  ``meshgate-router-admin`` (key ``admin_api_key_sha256``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tomllib
from typing import Any

import yaml

OVERLAYS_DIR = pathlib.Path(__file__).resolve().parent / "overlays"
SERVICES = ("router", "context", "cache", "inference")
GRPC_PORTS = {"router": 50051, "context": 50052, "cache": 50053, "inference": 50054}
# The router's OpenAI-compatible HTTP edge (router.http_listen), public like its gRPC port.
ROUTER_HTTP_PORT = 8080
METRICS_PORTS = {"router": 50061, "context": 50062, "cache": 50063, "inference": 50064}
# mesh.health_listen: the internal services' plain-text health port, for the
# kubelet's gRPC probe (their main port speaks only mutual TLS).
HEALTH_PORT = 50070
# Who may open a connection to whom (the callers each service's app.py
# admits through mesh_auth; the test checks the two agree). The router is
# the public door.
CALLERS = {
    "router": None,
    "context": ("router",),
    "cache": ("router",),
    "inference": ("router", "cache", "context"),
}
# The services that keep state in Redis.
USES_REDIS = ("router", "context", "cache")
# The services that verify the router's tenant tokens (meshgate/mesh_auth.py):
# they mount the router's certificate, never its key.
VERIFIES_TENANT_TOKENS = ("context", "cache", "inference")
# The metric each service scales on besides CPU, per pod, as the Prometheus
# adapter serves it (deploy/k8s/README.md has its rules): the work under way.
SCALING_METRICS = {
    "router": "meshgate_router_streams_in_flight",
    "context": "meshgate_rpc_requests_per_second",
    "cache": "meshgate_rpc_requests_per_second",
    "inference": "meshgate_inference_backend_in_flight",
}
# The series (meshgate/metrics.py) each of those is computed from by the
# adapter's rules in deploy/k8s/README.md.
SCALING_SERIES = {
    "meshgate_router_streams_in_flight": "meshgate_router_streams_in_flight",
    "meshgate_rpc_requests_per_second": "meshgate_rpc_requests_total",
    "meshgate_inference_backend_in_flight": "meshgate_inference_backend_in_flight",
}
# The router's admin credential (router.admin_api_key_sha256, a TOML array
# of digests) comes from this Secret's key.
ADMIN_SECRET = "meshgate-router-admin"
ADMIN_SECRET_KEY = "admin_api_key_sha256"
CONFIG_DIR = "/etc/meshgate/config"
CERTS_DIR = "/etc/meshgate/certs"
ROUTER_CERT_DIR = "/etc/meshgate/router-cert"
# Seconds a pod keeps serving after it is marked for deletion, so every
# endpoint watcher (and each client's DNS re-resolution) drops it first; then
# SIGTERM starts the service's own drain (meshgate/serving.py: NOT_SERVING,
# then in-flight calls finish within its grace).
# What docs/capacity.md gives a cache's resident row at most (2.9 KiB of
# arrays and graph, 1.3 KiB of ids and maps, up to 1 KiB of text), and the
# process beside its rows (the in-process embedding model, ~0.3 GB, and the
# rest: 290-336 MB idle in a review's run), rounded up.
CACHE_BYTES_PER_ROW = 5_325
CACHE_BASE_BYTES = 512 * 2**20
PRESTOP_PAUSE_S = 5
DRAIN_GRACE_S = 10


@dataclasses.dataclass
class ServiceSize:
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 2
    cpu: str = "250m"
    memory: str = "512Mi"
    memory_limit: str = "1Gi"
    # Target per pod of its SCALING_METRICS entry.
    metric_target: str = "8"


@dataclasses.dataclass
class Overlay:
    name: str
    namespace: str = "meshgate"
    image_registry: str = "ghcr.io/meshgate"
    image_tag: str = "0.1.0"
    # The router's Service: ClusterIP (reach it through an ingress or a port
    # forward) or LoadBalancer.
    router_service_type: str = "ClusterIP"
    triton_urls: list[str] = dataclasses.field(
        default_factory=lambda: ["triton.triton.svc.cluster.local:8001"]
    )
    cpu_utilization_percent: int = 70
    # Namespaces allowed to reach the router (empty: any).
    router_clients_namespaces: list[str] = dataclasses.field(default_factory=list)
    # Namespace of Prometheus, allowed to scrape the metrics ports.
    monitoring_namespace: str = "monitoring"
    services: dict[str, ServiceSize] = dataclasses.field(default_factory=dict)
    # cache.max_resident_rows where the cache's memory limit cannot hold the
    # default's (None: the default): each resident row takes up to
    # CACHE_BYTES_PER_ROW, and past its limit the pod is killed, where the
    # bound would have pushed rows out.
    cache_max_resident_rows: int | None = None

    @classmethod
    def load(cls, name: str) -> Overlay:
        raw = tomllib.loads((OVERLAYS_DIR / f"{name}.toml").read_text())
        sizes = raw.pop("services", {})
        overlay = cls(name=name, **raw)
        overlay.services = {s: ServiceSize(**sizes.get(s, {})) for s in SERVICES}
        return overlay


def overlay_names() -> list[str]:
    return sorted(p.stem for p in OVERLAYS_DIR.glob("*.toml"))


def _name(service: str) -> str:
    # Also the mesh identity (meshgate/mesh_auth.py: identity()), so a
    # Service's DNS name and its certificate's name are one.
    return f"meshgate-{service}"


def _labels(service: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/part-of": "meshgate"}
    if service:
        labels["app.kubernetes.io/name"] = _name(service)
    return labels


def _meta(name: str, overlay: Overlay, service: str | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": overlay.namespace, "labels": _labels(service)}


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings and arrays of strings are valid TOML


def settings_file(overlay: Overlay) -> str:
    """The settings every service reads: peers by their Services' DNS names,
    every service listening on all interfaces. Certificates and Redis's URL
    come from each pod's environment (the Deployment sets them)."""
    ns = overlay.namespace

    def address(service: str) -> str:
        # dns:/// of a headless Service: every ready pod's address, which the
        # callers' round_robin channels balance over (meshgate/serving.py).
        return f"dns:///{_name(service)}.{ns}.svc.cluster.local:{GRPC_PORTS[service]}"

    def deployments(model: str) -> str:
        where = f'name = "{overlay.name}", address = "{address("inference")}", model = "{model}"'
        return f"deployments = [{{ {where} }}]"

    lines = [
        "# Rendered by deploy/k8s/render.py; every service reads this file.",
        "[telemetry]",
        'log_level = "info"',
        "",
        "[mesh]",
        f'health_listen = "0.0.0.0:{HEALTH_PORT}"',
        "",
        # Each model keeps its built-in settings (meshgate/config.py; the
        # image's MESHGATE_SMOLLM2_FILES finds smollm2's tokenizer and
        # template) but for where it runs.
        "[models.smollm2]",
        deployments("smollm2"),
        "",
        '[models."tiny-gpt"]',
        deployments("tiny-gpt"),
        "",
        "[router]",
        f'listen = "0.0.0.0:{GRPC_PORTS["router"]}"',
        f'metrics_listen = "0.0.0.0:{METRICS_PORTS["router"]}"',
        f'http_listen = "0.0.0.0:{ROUTER_HTTP_PORT}"',
        f"context_address = {_toml_value(address('context'))}",
        f"cache_address = {_toml_value(address('cache'))}",
        # No built-in development tenant in a cluster: tenants come from the
        # settings file or from the AdminService's keys in Redis.
        "dev_tenant = false",
        "",
        "[context]",
        f'listen = "0.0.0.0:{GRPC_PORTS["context"]}"',
        f'metrics_listen = "0.0.0.0:{METRICS_PORTS["context"]}"',
        f"inference_address = {_toml_value(address('inference'))}",
        "",
        "[cache]",
        f'listen = "0.0.0.0:{GRPC_PORTS["cache"]}"',
        f'metrics_listen = "0.0.0.0:{METRICS_PORTS["cache"]}"',
        f"inference_address = {_toml_value(address('inference'))}",
        *(
            [f"max_resident_rows = {overlay.cache_max_resident_rows}"]
            if overlay.cache_max_resident_rows
            else []
        ),
        "",
        "[inference]",
        f'listen = "0.0.0.0:{GRPC_PORTS["inference"]}"',
        f'metrics_listen = "0.0.0.0:{METRICS_PORTS["inference"]}"',
        f"triton_urls = {_toml_value(overlay.triton_urls)}",
        "",
    ]
    return "\n".join(lines)


def container_environment(service: str) -> dict[str, str | dict]:
    """The container's environment: the certificate files cert-manager
    mounts, Redis's URL from its Secret, (context, cache, inference) the
    router's certificate that verifies tenant tokens, and (router) the admin
    credential's digest from its Secret."""
    env: dict[str, str | dict] = {
        "MESHGATE_CONFIG": f"{CONFIG_DIR}/meshgate.toml",
        "MESHGATE_MESH__CA_FILE": f"{CERTS_DIR}/ca.crt",
        "MESHGATE_MESH__CERT_FILE": f"{CERTS_DIR}/tls.crt",
        "MESHGATE_MESH__KEY_FILE": f"{CERTS_DIR}/tls.key",
    }
    if service in VERIFIES_TENANT_TOKENS:
        env["MESHGATE_MESH__ROUTER_CERT_FILE"] = f"{ROUTER_CERT_DIR}/tls.crt"
    if service in USES_REDIS:
        env["REDIS_URL"] = {"secretKeyRef": {"name": "meshgate-redis", "key": "url"}}
    if service == "router":
        # The one credential a cluster starts with (dev_tenant is off, the
        # settings name no tenant): its AdminService's CreateKey makes the
        # tenants' keys, kept in Redis. A digest, but kept in a Secret with
        # the other credentials, not in the ConfigMap every pod reads.
        # Optional: a router without it starts, and refuses admin calls.
        env["MESHGATE_ROUTER__ADMIN_API_KEY_SHA256"] = {
            "secretKeyRef": {"name": ADMIN_SECRET, "key": ADMIN_SECRET_KEY, "optional": True}
        }
    return env


def probe_port(service: str) -> int:
    """Where the kubelet's gRPC probe (grpc.health.v1, no TLS) asks: the
    router's public port; an internal service's plain-text health port,
    since its own port speaks only mutual TLS."""
    return GRPC_PORTS["router"] if service == "router" else HEALTH_PORT


# The health service name that stays SERVING while the process serves
# (meshgate/serving.py LIVENESS_SERVICE): what the startup and liveness
# probes ask. The readiness probe asks for the service's readiness (no
# name): NOT_SERVING while it cannot answer (an inference service with no
# Triton server ready) or drains, which must take it out of its Service's
# endpoints, not restart it.
LIVENESS_SERVICE = "liveness"


def _probe(service: str, failure_threshold: int, period_s: int, health_service: str = "") -> dict[str, Any]:
    return {
        "grpc": {"port": probe_port(service), **({"service": health_service} if health_service else {})},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    }


def deployment(service: str, overlay: Overlay) -> dict[str, Any]:
    size = overlay.services[service]
    env = [
        {"name": key, "valueFrom": value} if isinstance(value, dict) else {"name": key, "value": value}
        for key, value in container_environment(service).items()
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "mesh-cert", "mountPath": CERTS_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": "meshgate-config"}},
        {"name": "mesh-cert", "secret": {"secretName": f"{_name(service)}-tls"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if service in VERIFIES_TENANT_TOKENS:
        # Only the router's certificate (public), never its key.
        mounts.append({"name": "router-cert", "mountPath": ROUTER_CERT_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "router-cert",
                "secret": {
                    "secretName": "meshgate-router-tls",
                    "items": [{"key": "tls.crt", "path": "tls.crt"}],
                },
            }
        )
    container = {
        "name": service,
        "image": f"{overlay.image_registry}/meshgate-{service}:{overlay.image_tag}",
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORTS[service], "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORTS[service], "protocol": "TCP"},
            *(
                [{"name": "http", "containerPort": ROUTER_HTTP_PORT, "protocol": "TCP"}]
                if service == "router"
                else [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
            ),
        ],
        "env": env,
        "volumeMounts": mounts,
        "resources": {
            "requests": {"cpu": size.cpu, "memory": size.memory},
            "limits": {"memory": size.memory_limit},
        },
        # Loading tokenizers and (cache) vector indexes takes a while; liveness starts after it.
        "startupProbe": _probe(service, failure_threshold=30, period_s=2, health_service=LIVENESS_SERVICE),
        # Two misses: one probe slow past its 2 s under load (when capacity
        # is needed most) took the pod out of its endpoints for a period. A
        # deleted pod leaves its endpoints at once whatever its probe says.
        "readinessProbe": _probe(service, failure_threshold=2, period_s=5),
        "livenessProbe": _probe(service, failure_threshold=3, period_s=10, health_service=LIVENESS_SERVICE),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_PAUSE_S}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(_name(service), overlay, service),
        "spec": {
            "replicas": size.replicas,
            "selector": {"matchLabels": _labels(service)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": _labels(service),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORTS[service]),
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": PRESTOP_PAUSE_S + DRAIN_GRACE_S + 15,
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": _labels(service)},
                        }
                    ],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def service_object(service: str, overlay: Overlay) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": _labels(service),
        "ports": [{"name": "grpc", "port": GRPC_PORTS[service], "targetPort": "grpc", "protocol": "TCP"}],
    }
    if service == "router":
        spec["type"] = overlay.router_service_type
        spec["ports"].append(
            {"name": "http", "port": ROUTER_HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
        )
    else:
        # Headless: DNS answers with every ready pod, and the caller's gRPC
        # channel balances its calls over them (a ClusterIP would pin each
        # long-lived HTTP/2 connection, and so all its calls, to one pod).
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(_name(service), overlay, service),
        "spec": spec,
    }


def disruption_budget(service: str, overlay: Overlay) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(_name(service), overlay, service),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(service)}},
    }


def autoscaler(service: str, overlay: Overlay) -> dict[str, Any]:
    size = overlay.services[service]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(_name(service), overlay, service),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": _name(service)},
            "minReplicas": size.min_replicas,
            "maxReplicas": size.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": overlay.cpu_utilization_percent,
                        },
                    },
                },
                {
                    # Served by the Prometheus adapter (deploy/k8s/README.md).
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": SCALING_METRICS[service]},
                        "target": {"type": "AverageValue", "averageValue": size.metric_target},
                    },
                },
            ],
            # Scale down slowly: a replica that goes drains its streams first.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def network_policy(service: str, overlay: Overlay) -> dict[str, Any]:
    callers = CALLERS[service]
    if callers is None:
        sources: list[dict[str, Any]] = [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
            for ns in overlay.router_clients_namespaces
        ]
    else:
        sources = [{"podSelector": {"matchLabels": _labels(caller)}} for caller in callers]
    public_ports = [GRPC_PORTS[service], *([ROUTER_HTTP_PORT] if service == "router" else [])]
    grpc_rule: dict[str, Any] = {"ports": [{"port": port, "protocol": "TCP"} for port in public_ports]}
    if sources:
        grpc_rule["from"] = sources
    metrics_rule = {
        "from": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": overlay.monitoring_namespace}
                }
            }
        ],
        "ports": [{"port": METRICS_PORTS[service], "protocol": "TCP"}],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(_name(service), overlay, service),
        "spec": {
            "podSelector": {"matchLabels": _labels(service)},
            "policyTypes": ["Ingress"],
            "ingress": [grpc_rule, metrics_rule],
        },
    }


def key_rotation(service: str) -> str:
    """cert-manager's key policy at each renewal. A service takes a renewed
    certificate without a restart (its server at its next handshakes, its
    channels at their next calls, the router's tokens at once), and context,
    cache and inference follow the router's certificate they verify tenant
    tokens with, but they read it from the router's Secret, which kubelet
    refreshes in each pod at its own moment: a new router key would be
    signing before some replicas know it. So the router keeps its key across
    renewals; a change of it is staged (docs/mesh-trust.md, "The router's key
    changes without a restart"). Every other key is new at each renewal."""
    return "Never" if service == "router" else "Always"


def certificate_objects(overlay: Overlay) -> list[dict[str, Any]]:
    """cert-manager: a self-signed root for the mesh's CA, the CA issuer, and
    one certificate per service whose DNS name is its mesh identity."""
    ns = overlay.namespace

    def issuer(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Issuer",
            "metadata": _meta(name, overlay),
            "spec": spec,
        }

    private_key = {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"}
    objects = [
        issuer("meshgate-selfsigned", {"selfSigned": {}}),
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": _meta("meshgate-ca", overlay),
            "spec": {
                "isCA": True,
                "commonName": "meshgate mesh CA",
                "secretName": "meshgate-ca",
                "duration": "87600h",
                "privateKey": private_key,
                "issuerRef": {"name": "meshgate-selfsigned", "kind": "Issuer", "group": "cert-manager.io"},
            },
        },
        issuer("meshgate-ca", {"ca": {"secretName": "meshgate-ca"}}),
    ]
    for service in SERVICES:
        objects.append(
            {
                "apiVersion": "cert-manager.io/v1",
                "kind": "Certificate",
                "metadata": _meta(_name(service), overlay, service),
                "spec": {
                    "secretName": f"{_name(service)}-tls",
                    "commonName": _name(service),
                    # The first name is the identity peers ask for; the others
                    # are the Service's DNS names, for tools that dial it.
                    "dnsNames": [
                        _name(service),
                        f"{_name(service)}.{ns}.svc",
                        f"{_name(service)}.{ns}.svc.cluster.local",
                    ],
                    "duration": "2160h",
                    "renewBefore": "360h",
                    "privateKey": {**private_key, "rotationPolicy": key_rotation(service)},
                    "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
                    "issuerRef": {"name": "meshgate-ca", "kind": "Issuer", "group": "cert-manager.io"},
                },
            }
        )
    return objects


def render(overlay: Overlay) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": overlay.namespace, "labels": _labels()},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("meshgate-config", overlay),
            "data": {"meshgate.toml": settings_file(overlay)},
        },
        *certificate_objects(overlay),
    ]
    for service in SERVICES:
        objects += [
            deployment(service, overlay),
            service_object(service, overlay),
            disruption_budget(service, overlay),
            autoscaler(service, overlay),
            network_policy(service, overlay),
        ]
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render meshgate's Kubernetes manifests.")
    parser.add_argument("overlay", choices=overlay_names())
    args = parser.parse_args(argv)
    yaml.safe_dump_all(render(Overlay.load(args.overlay)), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
