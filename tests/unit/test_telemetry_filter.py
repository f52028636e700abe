"""Which server calls get a span: everything but health probes and
reflection, exactly as the instrumentation library's own filters would say."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.instrumentation.grpc import filters

from meshgate import telemetry

LIBRARY_FILTER = filters.negate(
    filters.any_of(filters.service_prefix("grpc.health."), filters.service_prefix("grpc.reflection."))
)


class Details(grpc.HandlerCallDetails):
    """What the server interceptor hands its filter."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


@pytest.mark.parametrize(
    ("method", "traced"),
    [
        ("/meshgate.router.v1.RouterService/Chat", True),
        ("/meshgate.cache.v1.CacheService/Lookup", True),
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.healthy.Fake/Call", True),
    ],
)
def test_health_and_reflection_go_untraced(method, traced):
    assert telemetry._traced(Details(method)) is traced
    assert LIBRARY_FILTER(Details(method)) is traced
