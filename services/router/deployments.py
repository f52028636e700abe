"""Where a model alias is served: a routing strategy per alias, fallbacks,
circuit breaking, and health checks of each deployment's inference service."""

from __future__ import annotations

import asyncio

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshgate import balancing, mesh_auth, serving, watching
from meshgate.config import DeploymentSettings, ModelSettings
from meshgate.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

log = structlog.get_logger(__name__)

# A prefix strategy here hashes the prompt's characters (the router has no
# tokenizer on its path): ~4 characters a token, so blocks of about the
# models' 32 tokens.
PREFIX_BLOCK_CHARS = 128

# The health checks of an inference service (DeploymentTable.watch): each bounded by
# PROBE_TIMEOUT_S (a live service answers one in a millisecond or two, from
# its event loop), and PROBES_TO_MARK_DOWN failed in a row take its
# deployments out of rotation, as the inference service does with a Triton
# server (services/inference/backends.py): one late answer from a loaded
# service must not. A check of the service's name: it says NOT_SERVING while
# none of its Triton servers is ready, and while it drains.
PROBE_TIMEOUT_S = 2.0
PROBES_TO_MARK_DOWN = 3
_INFERENCE_SERVICE = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# A check that ended so got no answer at all: the service is stopped or
# wedged with its connections up (an answer of any kind, NOT_SERVING
# included, means it is running). Not UNAVAILABLE: that is an answer too,
# from a service draining on SIGTERM (it refuses new calls, health checks
# included, while it finishes those it has) or from a peer that refused the
# connection (gone: its calls fail by themselves); ending the calls then cut
# a draining inference service's streams after three checks, ~4.5 s of its
# 10 s grace (a bug hunt).
_SILENT = (grpc.StatusCode.DEADLINE_EXCEEDED,)


class OpenCalls:
    """The Generate and Embed calls open on one inference service, so that
    they can be ended when its health checks find it silent.

    An inference service that stops answering with its connections up (its
    host stopped, the process wedged) fails nothing fast: the kernel still
    accepts its connections, and when the keepalive drops one, the next
    hangs in its TLS handshake. Each call sent there waited out its whole
    deadline (max_generation_s, 300 s, without a client deadline), and with
    no failure to count its circuit never opened: about half of a
    two-deployment alias's turns. Such calls are cancelled instead and read
    as UNAVAILABLE (Deployments.generate): sent to the next deployment
    before any text, ended UNAVAILABLE after some; an Embed goes to the
    next inference service (Embeddings).

    add() and discard() are the whole cost on a call's path: a set each.
    """

    def __init__(self) -> None:
        self._open: set = set()
        self._ended: set = set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, call) -> None:
        self._open.add(call)

    def discard(self, call) -> None:
        self._open.discard(call)
        if self._ended:
            self._ended.discard(call)

    def end(self) -> int:
        """Cancels the open calls; returns how many. A call that already
        finished is not marked (cancel() is False): its own end stands."""
        ended = 0
        for call in list(self._open):
            if call.cancel():
                self._ended.add(call)
                ended += 1
        return ended

    def ended_by_probes(self, call) -> bool:
        """Whether ``call``'s cancellation (grpc raises CancelledError for a
        call cancelled here) was end()'s, not its caller's: a caller that
        leaves cancels the task, which then reads as cancelling, and that
        cancel must go on."""
        if call not in self._ended:
            return False
        task = asyncio.current_task()
        return not (task is not None and task.cancelling())


def left_rotation() -> grpc.aio.AioRpcError:
    """What a call OpenCalls.end() cancelled fails with: UNAVAILABLE, as on
    an inference service that died."""
    metadata = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        metadata,
        metadata,
        "the deployment left rotation with the call open: its health checks got no answer",
    )


class _Address:
    """One inference service address: its health checks' state and its open
    calls, shared by every deployment there."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.health = health_pb2_grpc.HealthStub(channel)
        self.calls = OpenCalls()
        # Checks in a row that failed (any way), and that got no answer at all.
        self.failed = 0
        self.silent = 0
        self.down = False


class Deployment:
    """One deployment as a balancing target (meshgate/balancing.Target)."""

    def __init__(self, settings: DeploymentSettings, stub, stream_stub=None, calls=None) -> None:
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
        # Its inference service's open Generate calls (shared by every
        # deployment at its address), which its health checks may end.
        self.calls = calls if calls is not None else OpenCalls()

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
        self._addresses: dict[str, _Address] = {}
        self._by_alias: dict[str, list[Deployment]] = {}
        self._strategies: dict[str, balancing.Strategy] = {}
        self.reconfigure(models)

    def reconfigure(self, models: dict[str, ModelSettings]) -> None:
        """New routes from the next request on. A deployment at the same
        place as before (name, model, address) stays the same target: its
        circuit, its requests in flight and its TTFT, under its new weight.
        Rebuilt for a new weight, it came back with a closed circuit and none
        in flight, so a re-weight (draining one to 0 included) sent traffic
        to a deployment whose circuit was open, and least_outstanding sent
        the re-weighted one every request until its old streams ended, as
        if idle; those streams counted down on the object no longer routed.
        Channels are kept until close(), since a stream in flight may still
        use one that is no longer routed to."""
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
                if kept is not None:
                    kept.weight = settings.weight
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
                    # Checked over the channel the generations use: its
                    # connection is the one that may hang.
                    self._addresses[settings.address] = _Address(self._stream_channels[settings.address])
                stream_channel = self._stream_channels[settings.address]
                address = self._addresses[settings.address]
                deployment = Deployment(
                    settings,
                    inference_service_pb2_grpc.InferenceServiceStub(channel),
                    inference_service_pb2_grpc.InferenceServiceStub(stream_channel),
                    address.calls,
                )
                if address.down:
                    deployment.health.mark_down()
                deployments.append(deployment)
            by_alias[alias] = deployments
        self._by_alias = by_alias
        self._strategies = strategies

    def inference_services(self) -> list[tuple[object, OpenCalls]]:
        """One stub per inference service the deployments reach, with its
        open calls (which its health checks end once it answers nothing),
        for calls that name no model alias (Embed): those in rotation first,
        those whose health checks failed (_Address.down) last. Listed in the
        configuration's order alone, a service gone silent stayed first, and
        every embeddings request waited its whole max_generation_s there
        (300 s) before any other was tried, its checks having long taken it
        out of rotation."""
        one_per_address, seen = [], set()
        for deployments in self._by_alias.values():
            for deployment in deployments:
                if deployment.address not in seen:
                    seen.add(deployment.address)
                    one_per_address.append(deployment)
        # Stable: the configuration's order within each group.
        one_per_address.sort(key=lambda deployment: self._addresses[deployment.address].down)
        return [(deployment.stub, deployment.calls) for deployment in one_per_address]

    def embedding_stub(self, aliases: tuple[str, ...]):
        """The stub of the first deployment of ``aliases`` (in that order,
        each alias's in the configuration's) that admits traffic, else of
        their first; None where they have none: where model selection asks
        for a prompt's embedding. Not candidates(): ranking turns a
        strategy's rotation of ties, so a turn that asked for its embedding
        and then generated on that alias turned it twice, and under
        least_outstanding every idle turn selected onto a two-deployment
        alias went to the same deployment."""
        deployments = [d for alias in aliases for d in self._by_alias.get(alias, [])]
        admitting = (d for d in deployments if d.health.admits)
        chosen = next(admitting, deployments[0] if deployments else None)
        return None if chosen is None else chosen.stub

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

    def next_to_try(
        self,
        alias: str,
        request: balancing.RouteRequest,
        ranked: list[Deployment],
        tried: list[Deployment],
    ) -> Deployment | None:
        """The deployment a generation tries next: the first of ``ranked``
        (its candidates() at the start) not in ``tried`` that the alias still
        routes to; where none is left, one a reload added since, ranked
        then. A reload takes effect for a generation under way too: with
        the list taken at its start alone, a turn whose first try failed
        after a reload went on to a deployment that reload had removed
        (perhaps being retired), and never to one it added."""
        routed = self._by_alias.get(alias, [])
        for deployment in ranked:
            if deployment in routed and deployment not in tried:
                return deployment
        # Ranked again only where a reload added one: every other end of the
        # list would turn the strategy's rotation (or draw) once more.
        if all(deployment in ranked for deployment in routed):
            return None
        return next((d for d in self.candidates(alias, request) if d not in tried), None)

    def routed_addresses(self) -> set[str]:
        """The inference services a deployment is routed to: those whose
        health is checked."""
        return {d.address for deployments in self._by_alias.values() for d in deployments}

    async def probe(self, address: str) -> None:
        """One health check of the inference service at ``address``; takes
        its deployments out of rotation or back in (_Address)."""
        state = self._addresses[address]
        try:
            answer = await state.health.Check(
                health_pb2.HealthCheckRequest(service=_INFERENCE_SERVICE), timeout=PROBE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            serving, silent, failure = False, error.code() in _SILENT, error.code().name
        else:
            serving = answer.status == health_pb2.HealthCheckResponse.SERVING
            silent, failure = False, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        state.failed = 0 if serving else state.failed + 1
        state.silent = state.silent + 1 if silent else 0
        deployments = [d for ds in self._by_alias.values() for d in ds if d.address == address]
        if serving:
            if state.down:
                state.down = False
                for deployment in deployments:
                    deployment.health.mark_up()
                log.info("deployment back in rotation", address=address)
            return
        if state.failed < PROBES_TO_MARK_DOWN:
            return
        if not state.down:
            state.down = True
            for deployment in deployments:
                deployment.health.mark_down()
            log.warning(
                "deployment out of rotation: its health checks failed", address=address, check=failure
            )
        # Only a service that answers nothing strands its calls; one that
        # says NOT_SERVING (no Triton ready, or draining) still ends them
        # itself, and they may yet finish. Every round while it stays
        # silent: a call sent there as a last resort is ended too.
        if state.silent >= PROBES_TO_MARK_DOWN and (ended := state.calls.end()):
            log.warning("calls ended on a deployment that answers nothing", address=address, calls=ended)

    async def watch(self, interval_s: float) -> None:
        """Checks each routed inference service on a schedule of its own
        until cancelled: a silent one must not delay the others' checks
        (meshgate/watching.py). In one round of all of them, a service that
        answered nothing held every round PROBE_TIMEOUT_S, and a healthy
        one's deployments left rotation or came back that much later."""
        await watching.watch_each(self.routed_addresses, self.probe, interval_s)

    async def close(self) -> None:
        for channel in (*self._channels.values(), *self._stream_channels.values()):
            await channel.close()
