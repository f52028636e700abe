"""Every failure leaves a service as a status with ErrorInfo: shown on the
inference service in-process, with no Triton behind it."""

import grpc
import pytest

from meshgate import serving
from meshgate.config import Settings
from meshgate.errors import error_info
from meshgate.inference.v1 import inference_service_pb2 as pb
from meshgate.inference.v1 import inference_service_pb2_grpc
from services.inference import app
from tests.mesh import mesh_settings, router_channel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def channel():
    settings = Settings(mesh=mesh_settings())
    settings.inference.triton_urls = ["127.0.0.1:1"]  # nothing listens there
    service = serving.Service("inference", app.SERVICE_NAMES)
    cleanup = await app.setup(service, settings)
    port = await serving.start(service, "127.0.0.1:0", cleanup)
    channel = router_channel(f"127.0.0.1:{port}", "inference")
    yield channel
    await channel.close()
    await serving.stop(service, grace_s=1)


@pytest.fixture
def stub(channel):
    return inference_service_pb2_grpc.InferenceServiceStub(channel)


async def failure(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    assert info is not None, f"no ErrorInfo on {caught.value}"
    assert info.domain == "meshgate"
    return caught.value.code(), info.reason


async def test_unknown_model_is_not_found(stub):
    call = stub.Generate(pb.GenerateRequest(model="nope"))
    assert await failure(call.read()) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_no_ready_backend_is_unavailable(stub):
    call = stub.Embed(pb.EmbedRequest(texts=["x"]))
    assert await failure(call) == (grpc.StatusCode.UNAVAILABLE, "NO_READY_BACKEND")


async def test_invalid_utf8_is_invalid_argument_not_internal(channel):
    # Field 1 (texts) as length-delimited bytes that are not UTF-8.
    raw = bytes([0x0A, 2, 0xC3, 0x28])
    call = channel.unary_unary(
        "/meshgate.inference.v1.InferenceService/Embed",
        request_serializer=lambda data: data,
        response_deserializer=pb.EmbedResponse.FromString,
    )(raw)
    assert await failure(call) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


async def test_health_reports_not_serving_without_a_ready_backend(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    # No Triton is ready, so the service says so instead of taking work.
    answer = await health.Check(health_pb2.HealthCheckRequest(service=app.SERVICE_NAMES[0]))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
