"""Where a model alias is served: weighted choice, fallbacks, circuit breaking."""

from __future__ import annotations

import random
import time

from meshgate import mesh_auth, serving
from meshgate.config import DeploymentSettings, ModelSettings
from meshgate.inference.v1 import inference_service_pb2_grpc

# Consecutive failures that open a deployment's circuit, and for how long.
FAILURES_TO_OPEN = 3
OPEN_FOR_S = 10.0


class Deployment:
    def __init__(self, settings: DeploymentSettings, stub) -> None:
        self.name = settings.name
        self.address = settings.address
        self.model = settings.model
        self.weight = settings.weight
        self.stub = stub
        self._failures = 0
        self._open_until = 0.0

    @property
    def available(self) -> bool:
        return self._open_until <= time.monotonic()

    def record_success(self) -> None:
        self._failures = 0

    def record_failure(self) -> None:
        self._failures += 1
        if self._failures >= FAILURES_TO_OPEN:
            self._open_until = time.monotonic() + OPEN_FOR_S
            self._failures = 0


class DeploymentTable:
    """Deployments per alias; one channel per inference address, shared."""

    def __init__(
        self, models: dict[str, ModelSettings], security: mesh_auth.ChannelSecurity | None = None
    ) -> None:
        self._security = security
        self._channels = {}
        self._by_alias: dict[str, list[Deployment]] = {}
        self.reconfigure(models)

    def reconfigure(self, models: dict[str, ModelSettings]) -> None:
        """New routes from the next request on. A deployment configured as
        before keeps its circuit; channels are kept until close(), since a
        stream in flight may still use one that is no longer routed to."""
        previous = {
            (alias, d.name, d.model, d.address): d for alias, ds in self._by_alias.items() for d in ds
        }
        by_alias: dict[str, list[Deployment]] = {}
        for alias, model in models.items():
            deployments = []
            for settings in model.deployments:
                kept = previous.get((alias, settings.name, settings.model, settings.address))
                if kept is not None and kept.weight == settings.weight:
                    deployments.append(kept)
                    continue
                channel = self._channels.get(settings.address)
                if channel is None:
                    channel = self._channels[settings.address] = serving.client_channel(
                        settings.address, self._security
                    )
                deployments.append(
                    Deployment(settings, inference_service_pb2_grpc.InferenceServiceStub(channel))
                )
            by_alias[alias] = deployments
        self._by_alias = by_alias

    def inference_stubs(self) -> list:
        """One stub per inference service the deployments reach, for calls
        that name no model alias (Embed): routed models' services first."""
        stubs, seen = [], set()
        for deployments in self._by_alias.values():
            for deployment in deployments:
                if deployment.address not in seen:
                    seen.add(deployment.address)
                    stubs.append(deployment.stub)
        return stubs

    def candidates(self, alias: str) -> list[Deployment]:
        """Deployments in the order to try them: a weighted draw among those
        with a closed circuit, then the rest as fallbacks."""
        deployments = self._by_alias.get(alias, [])
        healthy = [d for d in deployments if d.available]
        ordered = []
        while healthy:
            pick = random.choices(healthy, weights=[max(d.weight, 1e-9) for d in healthy])[0]
            ordered.append(pick)
            healthy.remove(pick)
        return ordered + [d for d in deployments if d not in ordered]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
