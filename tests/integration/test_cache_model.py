"""The cache servicer against a plain Python model of what it promises, step
by step (Hypothesis' stateful testing), on a real Redis with the real
in-process embedder (minilm) and the real verifier.

Two replicas share the Redis. Rules store answers for two tenants, two
models and parameter sets (two of them one partition: stop strings are a
set), with and without a system message, from a fixed pool of questions
(whitespace variants of one entry, paraphrases, a case variant, and trap
pairs the verifier must refuse), each alone or as the last question of a
conversation (small talk, which leaves it a single question; or a topic
turn it is matched with, among every multi-turn question of its partition:
two of one meaning, one a trap); look them up exactly and by meaning; Store
with a fence read before an Invalidate of the tenant or of one model, also
while that Invalidate runs; report served hits wrong, also while the served
entry's own prompt is stored again; and restart a replica (nothing
resident: its indexes rebuilt from Redis). The model says what every reply
may be: a hit is only ever a live entry of the same partition, system
message and candidate set (single or multi-turn questions), with its
latest answer, of the asked question's meaning and topic, and never one
reported wrong for that prompt; every live entry's prompt (its whole
conversation) is an exact hit; eviction keeps the newest entries of each
sub-partition (candidate set); an Invalidate
removes its scope's entries and reports; and GetStats' counters move as the
model's. Expiry is left out: the servicer reads the wall clock and Redis
expires keys itself, in whole seconds. A divergence is shrunk to its
shortest run of steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from meshgate import redis_access
from meshgate.cache.v1 import cache_service_pb2 as pb
from meshgate.common.v1 import common_pb2
from meshgate.config import CacheSettings
from meshgate.embedding import LocalEmbedder
from meshgate.errors import MeshgateError
from services.cache.embedding_memo import EmbeddingMemo
from services.cache.index import IndexRegistry
from services.cache.servicer import CacheServicer
from services.cache.stats import Stats
from services.cache.store import CacheStore
from services.cache.verifier import Verifier

pytestmark = pytest.mark.integration

FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"

# Small, so that eviction (the oldest entries of a sub-partition) is reached.
MAX_ENTRIES = 3
MODELS = ("tiny-gpt", "smollm2")
# The third is the second with its stop strings in another order: one partition.
PARAMETERS = (
    common_pb2.GenerationParameters(max_tokens=64),
    common_pb2.GenerationParameters(max_tokens=64, stop=["\n", "END"]),
    common_pb2.GenerationParameters(max_tokens=64, stop=["END", "\n", "END"]),
)
PARAMETER_PARTITION = (0, 1, 1)
SYSTEMS = (None, "Answer in one sentence.")


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    # Texts of one entry (keys.normalize_text folds runs of spaces).
    entry: str
    # Texts of one meaning: the only ones a semantic hit may serve.
    meaning: str


QUESTIONS = (
    Question("What is the quickest way to learn Python?", "python", "python"),
    Question("What is the quickest   way to learn Python? ", "python", "python"),
    Question("How can I learn Python fast?", "python fast", "python"),
    Question("what is the quickest way to learn python?", "python lower", "python"),
    # Trap pairs (tests/integration/test_cache_verification.py): vetoed at any bound.
    Question("How do I install Docker on Ubuntu?", "docker ubuntu", "docker ubuntu"),
    Question("How do I install Docker on Windows?", "docker windows", "docker windows"),
    Question("Is Python faster than Java?", "python java", "python java"),
    Question("Is Java faster than Python?", "java python", "java python"),
    Question("How do I reset my password?", "reset", "reset"),
    Question("How do I not reset my password?", "not reset", "not reset"),
)


# Questions near each other: one meaning's texts, or a trap pair.
NEIGHBOURS = ((0, 1, 2, 3), (4, 5), (6, 7), (8, 9))


@dataclasses.dataclass(frozen=True)
class History:
    """The turns before a prompt's question (services/cache/conversation.py)."""

    turns: tuple[tuple[int, str], ...]
    # Matched among multi-turn questions, with a topic turn: else it is a
    # single question (no history, or small talk only).
    conversational: bool
    # The topic's meaning: the only one a semantic hit may have been asked in.
    topic: str | None


HISTORIES = (
    History((), False, None),
    History(
        (
            (common_pb2.ROLE_USER, "Hi there!"),
            (common_pb2.ROLE_ASSISTANT, "Hello! How can I help you today?"),
        ),
        False,
        None,
    ),
    History(
        ((common_pb2.ROLE_USER, "I run Ubuntu on my laptop."), (common_pb2.ROLE_ASSISTANT, "Of course.")),
        True,
        "ubuntu",
    ),
    History(
        ((common_pb2.ROLE_USER, "I run Ubuntu on my computer."), (common_pb2.ROLE_ASSISTANT, "Noted.")),
        True,
        "ubuntu",
    ),
    # The trap: another system, said in other words than either Ubuntu turn
    # (verifier.topic_entity_veto refuses it at any bound, wherever the
    # names stand).
    History(
        ((common_pb2.ROLE_USER, "My laptop runs Windows."), (common_pb2.ROLE_ASSISTANT, "Of course.")),
        True,
        "windows",
    ),
)
# A history near each: of the same candidate set, a paraphrase or a trap.
NEAR_HISTORY = (1, 0, 3, 4, 2)


# Weighted to the first of each, so that prompts meet in one sub-partition
# often enough for semantic hits, reports and evictions.
def _mostly_first(count: int):
    return st.sampled_from([0] * count + list(range(1, count)))


questions = st.sampled_from([0, 0, 1, 2, 2, 3, 3, *range(4, len(QUESTIONS))])
# Mostly none; the multi-turn ones often enough to meet in their candidate set.
histories = st.sampled_from([0, 0, 0, 1, 2, 2, 3, 4])
systems = _mostly_first(len(SYSTEMS))
replicas = st.integers(0, 1)


@dataclasses.dataclass(frozen=True)
class Prompt:
    tenant: int
    model: int
    parameters: int
    system: int
    question: int
    history: int = 0

    @property
    def partition(self) -> tuple[int, int, int]:
        return self.tenant, self.model, PARAMETER_PARTITION[self.parameters]

    @property
    def sub_partition(self) -> tuple:
        """Its candidate set: what a semantic hit may come from."""
        return *self.partition, self.system, HISTORIES[self.history].conversational

    @property
    def key(self) -> tuple:
        """The model's name for the prompt's exact entry: its sub-partition, history and question's entry."""
        return *self.sub_partition, self.history, QUESTIONS[self.question].entry

    @property
    def meaning(self) -> tuple[str, str | None]:
        return QUESTIONS[self.question].meaning, HISTORIES[self.history].topic


def _sub_partition_of(key: tuple) -> tuple:
    return key[:-2]


def _prompt_of(key: tuple) -> Prompt:
    """A prompt of the entry the model names ``key``."""
    tenant, model, partition, system, _, history, entry = key
    question = next(i for i, q in enumerate(QUESTIONS) if q.entry == entry)
    return Prompt(tenant, model, PARAMETER_PARTITION.index(partition), system, question, history)


prompts = st.builds(
    Prompt,
    tenant=_mostly_first(2),
    model=_mostly_first(2),
    parameters=_mostly_first(len(PARAMETERS)),
    system=systems,
    question=questions,
    history=histories,
)


@dataclasses.dataclass(frozen=True)
class Fence:
    prompt: Prompt
    fence: str
    # The model's invalidation counts of the prompt's tenant and model when taken.
    marks: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Hit:
    """A lookup's outcome: the entry it was served, or "" for a miss. Every
    lookup adds one to the bundle, served or not: whether it is served can
    turn on a race's order earlier in the run (a report against a store),
    and a bundle whose size did made Hypothesis's replay of a case draw from
    another range than its first run (FlakyStrategyDefinition)."""

    prompt: Prompt
    entry_id: str


class CacheMachine(RuleBasedStateMachine):
    stored = Bundle("stored")
    fences = Bundle("fences")
    hits = Bundle("hits")

    def __init__(self, redis_url: str, embedder: LocalEmbedder, verifier: Verifier) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = redis_access.connect(redis_url)
        self.embedder = embedder
        self.verifier = verifier
        run = uuid.uuid4().hex[:10]
        self.tenants = (f"model-a-{run}", f"model-b-{run}")
        self.settings = CacheSettings(max_entries_per_partition=MAX_ENTRIES, max_false_hit_rate=0.1)
        # Two replicas on the one Redis, each with its own resident indexes.
        self.replicas = [self._start(), self._start()]
        self.stats_before = self.run(self.replicas[0][1].totals())
        # The model: each live entry's answer (by Prompt.key), each
        # sub-partition's semantic entries oldest first, the pairs (asked
        # key, served key) and entries reported, each sub-partition's count
        # of reports, the invalidations of each tenant (model None) and
        # model, the entry ids the Stores returned, and the counters.
        self.answers: dict[tuple, str] = {}
        self.order: dict[tuple, list[tuple]] = {}
        self.reported_pairs: set[tuple[tuple, tuple]] = set()
        self.reported_entries: set[tuple] = set()
        self.reports: dict[tuple, int] = {}
        self.invalidations: dict[tuple[int, int | None], int] = {}
        self.keys_by_id: dict[str, tuple] = {}
        self.meaning_by_key: dict[tuple, tuple[str, str | None]] = {}
        self.counts = dict.fromkeys(
            ("exact_hits", "semantic_hits", "misses", "stores", "wrong_hit_reports"), 0
        )
        self.answers_given = 0

    def _start(self) -> tuple[CacheServicer, Stats]:
        stats = Stats(self.redis)
        servicer = CacheServicer(
            self.settings,
            CacheStore(self.redis, MAX_ENTRIES),
            EmbeddingMemo(self.embedder, self.settings.embedding_model, self.settings.embedding_memo_entries),
            stats,
            IndexRegistry(MAX_ENTRIES, self.settings.max_resident_rows, self.settings.approximate_index_from),
            self.verifier,
        )
        return servicer, stats

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self._stop())
        self.run(self.redis.aclose())
        self.loop.close()

    async def _stop(self, replica: int | None = None) -> None:
        # As the service's cleanup: the servicer, then the counters flushed.
        for servicer, stats in self.replicas if replica is None else [self.replicas[replica]]:
            await servicer.close()
            await stats.close()

    # -- requests -------------------------------------------------------------

    def _scope(self, prompt: Prompt) -> pb.CacheScope:
        return pb.CacheScope(
            tenant_id=self.tenants[prompt.tenant],
            model=MODELS[prompt.model],
            parameters=PARAMETERS[prompt.parameters],
        )

    @staticmethod
    def _messages(prompt: Prompt) -> list[common_pb2.Message]:
        messages = []
        if SYSTEMS[prompt.system] is not None:
            messages.append(common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=SYSTEMS[prompt.system]))
        for role, content in HISTORIES[prompt.history].turns:
            messages.append(common_pb2.Message(role=role, content=content))
        messages.append(
            common_pb2.Message(role=common_pb2.ROLE_USER, content=QUESTIONS[prompt.question].text)
        )
        return messages

    def _marks(self, prompt: Prompt) -> tuple[int, int]:
        return (
            self.invalidations.get((prompt.tenant, None), 0),
            self.invalidations.get((prompt.tenant, prompt.model), 0),
        )

    # -- rules ----------------------------------------------------------------

    @rule(target=fences, replica=replicas, prompt=prompts, fence_only=st.booleans())
    def take_fence(self, replica, prompt, fence_only):
        """The fence a generation's Store carries: from an exact-only miss
        (semantic_follows: the semantic lookup after it counts the prompt),
        or a fence-only lookup."""
        if not fence_only and prompt.key in self.answers:
            fence_only = True  # an exact hit carries no fence
        request = pb.LookupRequest(
            scope=self._scope(prompt),
            messages=[] if fence_only else self._messages(prompt),
            fence_only=fence_only,
            semantic_follows=True,
        )
        response = self.run(self.replicas[replica][0].Lookup(request, None))
        assert response.status == pb.LOOKUP_STATUS_MISS
        assert response.store_fence
        return Fence(prompt, response.store_fence, self._marks(prompt))

    @rule(target=stored, replica=replicas, prompt=prompts)
    def store_unfenced(self, replica, prompt):
        self._store(replica, prompt, "", fresh=True)
        return prompt

    @rule(target=stored, replica=replicas, fence=fences)
    def store_fenced(self, replica, fence):
        self._store(replica, fence.prompt, fence.fence, fresh=fence.marks == self._marks(fence.prompt))
        return fence.prompt

    def _store_request(self, prompt: Prompt, store_fence: str) -> pb.StoreRequest:
        self.answers_given += 1
        text = f"answer {self.answers_given} to {QUESTIONS[prompt.question].entry}"
        return pb.StoreRequest(
            scope=self._scope(prompt),
            messages=self._messages(prompt),
            answer=pb.CachedAnswer(text=text, deployment="local", finish_reason="stop"),
            store_fence=store_fence,
        )

    def _store(self, replica: int, prompt: Prompt, store_fence: str, fresh: bool) -> None:
        request = self._store_request(prompt, store_fence)
        response = self.run(self.replicas[replica][0].Store(request, None))
        self._note_id(response.entry_id, prompt)
        assert response.invalidated_since_lookup == (not fresh)
        if not fresh:
            event("store undone by an invalidation")
            return
        self.counts["stores"] += 1
        self._stored(prompt, request.answer.text)

    def _note_id(self, entry_id: str, prompt: Prompt) -> None:
        known = self.keys_by_id.setdefault(entry_id, prompt.key)
        assert known == prompt.key, f"{prompt.key} stored under the id of {known}"

    def _stored(self, prompt: Prompt, text: str) -> None:
        self.answers[prompt.key] = text
        self.meaning_by_key[prompt.key] = prompt.meaning
        order = self.order.setdefault(prompt.sub_partition, [])
        if prompt.key in order:
            order.remove(prompt.key)
        order.append(prompt.key)
        while len(order) > MAX_ENTRIES:
            del self.answers[order.pop(0)]

    @rule(replica=replicas, other=replicas, fence=fences, whole_tenant=st.booleans())
    def store_racing_an_invalidate(self, replica, other, fence, whole_tenant):
        """A Store whose fence was read before an Invalidate of its scope,
        sent while that Invalidate runs (on another replica or the same):
        whichever comes first, the answer is not left stored."""
        prompt = fence.prompt
        model = None if whole_tenant else prompt.model
        store = self._store_request(prompt, fence.fence)
        invalidate = pb.InvalidateRequest(
            tenant_id=self.tenants[prompt.tenant], model="" if model is None else MODELS[model]
        )

        async def race():
            return await asyncio.gather(
                self.replicas[replica][0].Store(store, None),
                self.replicas[other][0].Invalidate(invalidate, None),
            )

        stored, invalidated = self.run(race())
        self._note_id(stored.entry_id, prompt)
        if not stored.invalidated_since_lookup:
            # Stored before the Invalidate's mark: its SCAN deletes it.
            self.counts["stores"] += 1
            self._stored(prompt, store.answer.text)
            self._invalidated(prompt.tenant, model, invalidated.entries_removed)
        else:
            event("raced store undone")
            # Written and undone, or not written: the SCAN may have counted
            # it, or missed an entry its write evicted (both gone either way).
            self._invalidated(prompt.tenant, model, invalidated.entries_removed, slack=1)
        lookup = pb.LookupRequest(scope=self._scope(prompt), messages=self._messages(prompt))
        response = self.run(self.replicas[replica][0].Lookup(lookup, None))
        assert response.status == pb.LOOKUP_STATUS_MISS, f"{prompt.key} left stored past an Invalidate"
        self.counts["misses"] += 1

    @rule(
        target=hits,
        replica=replicas,
        near=stored,
        question=st.integers(0, 3),
        moved=st.sampled_from(["none", "none", "none", "tenant", "model", "parameters", "system", "history"]),
    )
    def lookup_near_a_stored_prompt(self, replica, near, question, moved):
        """A semantic lookup of a question near one stored (its own, a
        paraphrase, its trap), in its sub-partition or one field away (a
        history: another of its candidate set, or small talk added or
        taken away)."""
        group = next(group for group in NEIGHBOURS if near.question in group)
        prompt = dataclasses.replace(near, question=group[question % len(group)])
        if moved == "parameters":
            prompt = dataclasses.replace(prompt, parameters=(near.parameters + 1) % len(PARAMETERS))
        elif moved == "history":
            prompt = dataclasses.replace(prompt, history=NEAR_HISTORY[near.history])
        elif moved != "none":
            bound = len(SYSTEMS) if moved == "system" else 2
            prompt = dataclasses.replace(prompt, **{moved: (getattr(near, moved) + 1) % bound})
        return self.lookup(replica, prompt, semantic=True)

    @rule(target=hits, replica=replicas, prompt=prompts, semantic=st.booleans())
    def lookup(self, replica, prompt, semantic):
        request = pb.LookupRequest(
            scope=self._scope(prompt), messages=self._messages(prompt), semantic=semantic
        )
        response = self.run(self.replicas[replica][0].Lookup(request, None))
        if prompt.key in self.answers:
            assert response.status == pb.LOOKUP_STATUS_EXACT_HIT, f"{prompt.key} is stored: {response}"
            assert response.answer.text == self.answers[prompt.key]
            assert self.keys_by_id[response.entry_id] == prompt.key
            self.counts["exact_hits"] += 1
            return Hit(prompt, response.entry_id)
        if response.status == pb.LOOKUP_STATUS_MISS:
            self.counts["misses"] += 1
            return Hit(prompt, "")
        assert semantic and response.status == pb.LOOKUP_STATUS_SEMANTIC_HIT, response
        served = self.keys_by_id.get(response.entry_id)
        assert served in self.answers, f"{prompt.key} served {served}, not a live entry: {response}"
        assert _sub_partition_of(served) == prompt.sub_partition, (
            f"{prompt.key} served {served} across a partition"
        )
        assert response.answer.text == self.answers[served], f"{served}: an answer not its latest"
        assert (prompt.key, served) not in self.reported_pairs, (
            f"{prompt.key} served {served}, reported wrong"
        )
        assert self.meaning_by_key[served] == prompt.meaning, (
            f"{prompt.key} served {served}: a trap the verifier let through"
        )
        self.counts["semantic_hits"] += 1
        event("semantic hit")
        return Hit(prompt, response.entry_id)

    @rule(replica=replicas, hit=hits)
    def report_wrong_hit(self, replica, hit):
        if not hit.entry_id:
            return
        served = self.keys_by_id[hit.entry_id]
        request = pb.ReportWrongHitRequest(
            scope=self._scope(hit.prompt), messages=self._messages(hit.prompt), entry_id=hit.entry_id
        )
        sub_partition = hit.prompt.sub_partition
        known = (
            served in self.answers
            or served in self.reported_entries
            or (hit.prompt.key, served) in self.reported_pairs
        )
        try:
            response = self.run(self.replicas[replica][0].ReportWrongHit(request, None))
        except MeshgateError as error:
            assert not known, f"report of {served} for {hit.prompt.key} refused: {error}"
            assert str(error.reason) == "CACHE_ENTRY_NOT_FOUND"
            return
        event("report taken")
        assert known, f"report of {served} for {hit.prompt.key} taken, the model knows no such entry"
        assert response.entry_removed == (served in self.answers)
        # The counts are of distinct pairs: a resent report adds none.
        if (hit.prompt.key, served) not in self.reported_pairs:
            self.reports[sub_partition] = self.reports.get(sub_partition, 0) + 1
            self.counts["wrong_hit_reports"] += 1
        assert response.reports_in_partition == self.reports.get(sub_partition, 0)
        self.reported_pairs.add((hit.prompt.key, served))
        self.reported_entries.add(served)
        self._removed(served)

    @rule(target=stored, replica=replicas, hit=hits)
    def store_a_served_entry_again(self, replica, hit):
        """The served entry's own prompt answered again (after a report: stored
        under its id again); a miss's, the asked prompt's answer stored."""
        own = _prompt_of(self.keys_by_id[hit.entry_id]) if hit.entry_id else hit.prompt
        self._store(replica, own, "", fresh=True)
        return own

    @rule(target=hits, replica=replicas, hit=hits)
    def ask_a_hit_again(self, replica, hit):
        return self.lookup(replica, hit.prompt, semantic=True)

    @rule(replica=replicas, other=replicas, hit=hits)
    def report_racing_a_store_of_its_entry(self, replica, other, hit):
        """A wrong hit reported while the served entry's own prompt stores
        a new answer: in either order the pair stays reported."""
        if not hit.entry_id:
            return
        served = self.keys_by_id[hit.entry_id]
        own = _prompt_of(served)
        report = pb.ReportWrongHitRequest(
            scope=self._scope(hit.prompt), messages=self._messages(hit.prompt), entry_id=hit.entry_id
        )
        store = self._store_request(own, "")
        known = (
            served in self.answers
            or served in self.reported_entries
            or (hit.prompt.key, served) in self.reported_pairs
        )
        was_live = served in self.answers

        async def race():
            return await asyncio.gather(
                self.replicas[replica][0].ReportWrongHit(report, None),
                self.replicas[other][0].Store(store, None),
                return_exceptions=True,
            )

        reported, stored = self.run(race())
        assert isinstance(stored, pb.StoreResponse), stored
        assert stored.entry_id == hit.entry_id
        self.counts["stores"] += 1
        lookup = pb.LookupRequest(scope=self._scope(own), messages=self._messages(own))
        after = self.run(self.replicas[replica][0].Lookup(lookup, None))
        if isinstance(reported, MeshgateError):
            # Only before the Store: it names an entry after.
            assert not known and str(reported.reason) == "CACHE_ENTRY_NOT_FOUND", reported
            self._stored(own, store.answer.text)
        else:
            assert isinstance(reported, pb.ReportWrongHitResponse), reported
            sub_partition = hit.prompt.sub_partition
            if (hit.prompt.key, served) not in self.reported_pairs:
                self.reports[sub_partition] = self.reports.get(sub_partition, 0) + 1
                self.counts["wrong_hit_reports"] += 1
            assert reported.reports_in_partition == self.reports.get(sub_partition, 0)
            self.reported_pairs.add((hit.prompt.key, served))
            self.reported_entries.add(served)
            if after.status == pb.LOOKUP_STATUS_EXACT_HIT:
                event("report, then the store")
                assert reported.entry_removed == was_live
                self._removed(served)
                self._stored(own, store.answer.text)
            else:
                event("store, then the report")
                assert reported.entry_removed
                self._stored(own, store.answer.text)
                self._removed(served)
        if own.key in self.answers:
            assert after.status == pb.LOOKUP_STATUS_EXACT_HIT, after
            assert after.answer.text == self.answers[own.key]
            self.counts["exact_hits"] += 1
        else:
            assert after.status == pb.LOOKUP_STATUS_MISS, after
            self.counts["misses"] += 1

    def _removed(self, key: tuple) -> None:
        self.answers.pop(key, None)
        order = self.order.get(_sub_partition_of(key), [])
        if key in order:
            order.remove(key)

    @rule(replica=replicas, tenant=st.integers(0, 1), model=st.none() | st.integers(0, 1))
    def invalidate(self, replica, tenant, model):
        request = pb.InvalidateRequest(
            tenant_id=self.tenants[tenant], model="" if model is None else MODELS[model]
        )
        response = self.run(self.replicas[replica][0].Invalidate(request, None))

        self._invalidated(tenant, model, response.entries_removed)

    def _invalidated(self, tenant: int, model: int | None, entries_removed: int, slack: int = 0) -> None:
        def covered(key) -> bool:
            return key[0] == tenant and (model is None or key[1] == model)

        gone = [key for key in self.answers if covered(key)]
        assert abs(entries_removed - len(gone)) <= slack, (gone, entries_removed)
        for key in gone:
            del self.answers[key]
        # Every key of the scope goes, the reports' too (the sub-partitions end).
        self.order = {sub: keys for sub, keys in self.order.items() if not covered(sub)}
        self.reports = {sub: n for sub, n in self.reports.items() if not covered(sub)}
        self.reported_pairs = {pair for pair in self.reported_pairs if not covered(pair[0])}
        self.reported_entries = {key for key in self.reported_entries if not covered(key)}
        self.invalidations[(tenant, model)] = self.invalidations.get((tenant, model), 0) + 1

    @rule(replica=replicas)
    def restart(self, replica):
        """A new process on the same Redis: nothing resident, the counters flushed."""
        self.run(self._stop(replica))
        self.replicas[replica] = self._start()

    # -- invariants -----------------------------------------------------------

    @invariant()
    def every_live_entry_is_an_exact_hit(self):
        for number, (key, text) in enumerate(list(self.answers.items())):
            prompt = _prompt_of(key)
            servicer = self.replicas[number % 2][0]
            response = self.run(
                servicer.Lookup(
                    pb.LookupRequest(scope=self._scope(prompt), messages=self._messages(prompt)), None
                )
            )
            assert response.status == pb.LOOKUP_STATUS_EXACT_HIT, f"{key} is stored: {response}"
            assert response.answer.text == text
            self.counts["exact_hits"] += 1

    @invariant()
    def counters_moved_as_the_model(self):
        # GetStats flushes its own replica's counts; the other's flush once a second.
        self.run(self.replicas[1][1].flush())
        totals = self.run(self.replicas[0][0].GetStats(pb.GetStatsRequest(), None))
        moved = {name: getattr(totals, name) - self.stats_before[name] for name in self.counts}
        assert moved == self.counts


@pytest.fixture(scope="module")
def embedder():
    embedder = LocalEmbedder.load("minilm")
    yield embedder
    embedder.close()


def test_the_cache_keeps_to_its_model(redis_url, embedder):
    """Every Lookup, Store, report and Invalidate answers as the model of
    the cache's promises says, across restarts on the same Redis."""
    verifier = Verifier.load(0.1)
    run_state_machine_as_test(
        lambda: CacheMachine(redis_url, embedder, verifier),
        settings=settings(
            # 40 in `make test` (76 s of one CI worker at 60 once Invalidate
            # walked its scripts); HYPOTHESIS_PROFILE=fuzz takes 300.
            max_examples=int(os.environ.get("MESHGATE_FUZZ_EXAMPLES") or (300 if FUZZING else 40)),
            stateful_step_count=50,
            deadline=None,
            derandomize=not FUZZING,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
