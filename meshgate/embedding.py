"""Text embeddings from the inference service, for the services that match
by meaning: the cache (questions) and the context service (turns)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import structlog

from meshgate.errors import from_rpc_error
from meshgate.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

log = structlog.get_logger(__name__)

# A lookup without embeddings is still a useful exact lookup: better to give
# up on a slow inference service than to hold the caller's request.
EMBED_TIMEOUT_S = 3.0
# While the inference service stays down, one warning per this many seconds
# instead of one per request.
_WARNING_INTERVAL_S = 10.0
_FLOAT32_LE = np.dtype("<f4")


class EmbeddingUnavailable(Exception):
    pass


class Embedder:
    def __init__(
        self, stub: inference_service_pb2_grpc.InferenceServiceStub, timeout_s: float = EMBED_TIMEOUT_S
    ) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._last_warning = float("-inf")

    async def embed(self, texts: list[str], timeout_s: float | None = None) -> np.ndarray:
        """One L2-normalized float32 row per text."""
        try:
            response = await self._stub.Embed(
                inference_service_pb2.EmbedRequest(texts=texts),
                timeout=self._timeout_s if timeout_s is None else timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error, "inference")
            raise EmbeddingUnavailable(f"{failure.reason}: {failure.message}") from error
        dimensions = response.dimensions
        if dimensions <= 0 or len(response.vectors) != len(texts) * dimensions * _FLOAT32_LE.itemsize:
            raise EmbeddingUnavailable(
                f"Embed returned {len(response.vectors)} bytes of {dimensions}-dimensional "
                f"vectors for {len(texts)} texts"
            )
        return np.frombuffer(response.vectors, _FLOAT32_LE).reshape(len(texts), dimensions)

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> np.ndarray | None:
        """The text's vector, or None (with a throttled warning) when the
        inference service cannot give one: the caller falls back to matching
        without meaning (exact keys, words)."""
        vectors = await self.embed_all_or_none([text], timeout_s)
        return None if vectors is None else vectors[0]

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None) -> np.ndarray | None:
        """One row per text, or None, as :meth:`embed_or_none`."""
        try:
            return await self.embed(texts, timeout_s)
        except EmbeddingUnavailable as error:
            now = time.monotonic()
            if now - self._last_warning >= _WARNING_INTERVAL_S:
                self._last_warning = now
                log.warning("embeddings unavailable, matching without them", error=str(error))
            return None
