"""Where a model alias is served: a routing strategy per alias, fallbacks, circuit breaking."""

from __future__ import annotations

from meshgate import balancing, mesh_auth, serving
from meshgate.config import DeploymentSettings, ModelSettings
from meshgate.inference.v1 import inference_service_pb2_grpc

# A prefix strategy here hashes the prompt's characters (the router has no
# tokenizer on its path): ~4 characters a token, so blocks of about the
# models' 32 tokens.
PREFIX_BLOCK_CHARS = 128


class Deployment:
    """One deployment as a balancing target (meshgate/balancing.Target)."""

    def __init__(self, settings: DeploymentSettings, stub, stream_stub=None) -> None:
        self.name = self.key = settings.name
        self.address = settings.address
        self.model = settings.model
        self.weight = settings.weight
        self.stub = stub
        # For Generate: a stub on an untraced channel (its caller makes the
        # span per call, not per streamed message); the traced one if none.
        self.stream_stub = stream_stub or stub
        self.in_flight = 0
        self.active_tokens = 0
        self.queued_prefill_tokens = 0
        self.ttft = balancing.Ewma()
        self.health = balancing.Health()

    def queue_ms(self, model: str) -> float:
        # An inference service reports no queue of its own; its Triton
        # servers' queues are the inference service's to weigh.
        return 0.0


class DeploymentTable:
    """Deployments per alias; one channel per inference address, shared."""

    def __init__(
        self, models: dict[str, ModelSettings], security: mesh_auth.ChannelSecurity | None = None
    ) -> None:
        self._security = security
        self._channels = {}
        self._stream_channels = {}
        self._by_alias: dict[str, list[Deployment]] = {}
        self._strategies: dict[str, balancing.Strategy] = {}
        self.reconfigure(models)

    def reconfigure(self, models: dict[str, ModelSettings]) -> None:
        """New routes from the next request on. A deployment configured as
        before keeps its circuit; channels are kept until close(), since a
        stream in flight may still use one that is no longer routed to."""
        previous = {
            (alias, d.name, d.model, d.address): d for alias, ds in self._by_alias.items() for d in ds
        }
        by_alias: dict[str, list[Deployment]] = {}
        strategies: dict[str, balancing.Strategy] = {}
        for alias, model in models.items():
            # The same strategy keeps what it learned (its prefix index).
            kept_strategy = self._strategies.get(alias)
            if kept_strategy is not None and kept_strategy.name == model.routing_strategy:
                strategies[alias] = kept_strategy
            else:
                strategies[alias] = balancing.build(model.routing_strategy, block_size=PREFIX_BLOCK_CHARS)
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
                    self._stream_channels[settings.address] = serving.client_channel(
                        settings.address, self._security, traced=False
                    )
                stream_channel = self._stream_channels[settings.address]
                deployments.append(
                    Deployment(
                        settings,
                        inference_service_pb2_grpc.InferenceServiceStub(channel),
                        inference_service_pb2_grpc.InferenceServiceStub(stream_channel),
                    )
                )
            by_alias[alias] = deployments
        self._by_alias = by_alias
        self._strategies = strategies

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

    def strategy(self, alias: str) -> balancing.Strategy | None:
        return self._strategies.get(alias)

    def candidates(self, alias: str, request: balancing.RouteRequest | None = None) -> list[Deployment]:
        """Deployments in the order to try them: the alias's strategy over
        those whose circuit admits traffic, then the rest as fallbacks."""
        strategy = self._strategies.get(alias)
        deployments = self._by_alias.get(alias, [])
        if strategy is None:
            return list(deployments)
        return balancing.order(strategy, deployments, request or balancing.RouteRequest())

    async def close(self) -> None:
        for channel in (*self._channels.values(), *self._stream_channels.values()):
            await channel.close()
