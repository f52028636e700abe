"""Automatic prefix caching (model_repository/generation/prefix_cache.py) on the
real numpy maths of both text models: tiny_gpt (learned positions) and the
Llama of smollm2 (rotary positions), each small, seeded and random, so the
test is hermetic and fast. The real SmolLM2 weights are checked in
test_llama_math.py (heavy).

Tolerance, not bit-equality, between a reused prefix and a full prefill: the
cached keys and values of positions 0..31 were computed inside a matmul over
a different number of rows than a cold prefill of this prompt runs, and
BLAS may sum in another order for another shape, so the last bits can
differ. The greedy token ids must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit import model_repository_modules
from tests.unit.test_generation_engine import Recorder

VOCAB = 64
BLOCK = 16
# Logits are O(1) here; float32 noise of a different summation order is ~1e-6.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def prefix_cache():
    return model_repository_modules.load("generation/prefix_cache.py")


@pytest.fixture(scope="module")
def engine():
    return model_repository_modules.load("generation/engine.py")


def tiny_gpt():
    core = model_repository_modules.load("tiny_gpt/1/tiny_gpt_core.py")
    config = core.GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_context=160)
    return core.TinyGPT(core.init_weights(config, seed=5), config)


def small_llama():
    core = model_repository_modules.load("smollm2/1/llama_core.py")
    config = core.LlamaConfig(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_context=160,
        rope_theta=10000.0,
        rms_eps=1e-5,
    )
    rng = np.random.default_rng(7)
    d, kv = config.d_head, config.n_kv_heads * config.d_head

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    weights = {"token_embd": normal(VOCAB, 64), "output_norm": np.ones(64, np.float32)}
    for layer in range(config.n_layers):
        p = f"blk.{layer}."
        weights |= {
            p + "attn_norm": np.ones(64, np.float32),
            p + "attn_qkv": normal(config.n_heads * d + 2 * kv, 64),
            p + "attn_output": normal(64, 64),
            p + "ffn_norm": np.ones(64, np.float32),
            p + "ffn_gate_up": normal(2 * config.d_ff, 64),
            p + "ffn_down": normal(64, config.d_ff),
        }
    return core.Llama(weights, config)


@pytest.fixture(scope="module", params=["tiny_gpt", "llama"])
def model(request):
    return tiny_gpt() if request.param == "tiny_gpt" else small_llama()


def prompt(seed: int, length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, VOCAB, length)]


SHARED = prompt(1, 64)


def prefill(model, cache_or_none, token_ids):
    """What the scheduler does at admission; (logits of the last position, tokens reused)."""
    cache = model.new_cache(len(token_ids))
    if cache_or_none is not None:
        model.load_kv(cache, cache_or_none.lookup(token_ids))
    reused = cache.length
    logits = model.prefill(token_ids[reused:], cache)
    if cache_or_none is not None:
        cache_or_none.insert(token_ids, lambda start, stop: model.kv_block(cache, start, stop))
    return logits, reused


# 33: the suffix is one token at a block boundary (position 32: RoPE / wpe
# offset); 40: a partial 8-token tail recomputed; 64: the whole prompt is
# cached blocks, yet the last block is recomputed for the last position's logits.
@pytest.mark.parametrize("length, reused", [(33, 32), (40, 32), (64, 48), (15, 0)])
def test_a_reused_prefix_gives_the_logits_of_a_full_prefill(prefix_cache, model, length, reused):
    cache = prefix_cache.PrefixCache(64 << 20)
    prefill(model, cache, SHARED)  # cached: 4 blocks of SHARED
    target = SHARED[:length]

    cold, cold_reused = prefill(model, None, target)
    warm, warm_reused = prefill(model, cache, target)

    assert (cold_reused, warm_reused) == (0, reused)
    np.testing.assert_allclose(warm, cold, **TOLERANCE)
    np.testing.assert_allclose(cold, model.forward(target)[-1], **TOLERANCE)
    assert int(np.argmax(warm)) == int(np.argmax(cold))


def test_a_different_continuation_reuses_only_the_shared_blocks(prefix_cache, model):
    cache = prefix_cache.PrefixCache(64 << 20)
    prefill(model, cache, SHARED)
    # Shares 40 tokens: 2 whole blocks; the third differs from token 40 on.
    target = SHARED[:40] + prompt(2, 20)
    warm, reused = prefill(model, cache, target)

    assert reused == 32
    np.testing.assert_allclose(warm, model.forward(target)[-1], **TOLERANCE)
    # Both prompts' blocks are now cached; the shared two once.
    assert cache.stats.blocks == 4 + 1


def vocabulary(engine):
    return engine.Vocabulary(
        decode=lambda ids: "".join(f"<{i}>" for i in ids),
        stop_ids=frozenset({0}),
        never_sampled=np.array([0]),
    )


def generate(engine, scheduler, token_ids, max_tokens=12):
    generation = engine.Generation(
        request_id="g",
        sender=Recorder(),
        prompt="",
        prompt_ids=token_ids,
        params=engine.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        stream=True,
        prepend_prompt=False,
    )
    scheduler.submit(generation)
    assert generation.sender.done.wait(60), "never finished"
    assert generation.sender.error is None
    return "".join(generation.sender.texts), generation.sender.cached_tokens


def test_greedy_output_is_the_same_with_the_cache_cold_warm_and_disabled(engine, prefix_cache, model):
    first, second = SHARED[:50], SHARED[:40] + prompt(3, 10)
    reports = []
    cached = engine.Scheduler(
        "cached", model, vocabulary(engine), 4, prefix_cache.PrefixCache(64 << 20), lambda: reports.append(1)
    )
    disabled = engine.Scheduler("disabled", model, vocabulary(engine), 4)
    cached.start()
    disabled.start()
    try:
        first_cold = generate(engine, cached, first)
        second_warm = generate(engine, cached, second)
        second_again = generate(engine, cached, second)
        first_disabled = generate(engine, disabled, first)
        second_disabled = generate(engine, disabled, second)
    finally:
        cached.shutdown()
        disabled.shutdown()

    assert first_cold == (first_disabled[0], 0)
    assert second_warm == (second_disabled[0], 32)
    assert second_again == (second_disabled[0], 48)  # (50 - 1) // 16 whole blocks
    assert second_disabled[1] == 0
    assert first_cold[0] != second_warm[0], "different prompts, different continuations"
    stats = cached.prefix_cache.stats
    assert (stats.lookups, stats.queried_tokens, stats.hit_tokens) == (3, 150, 80)
    assert len(reports) == 3


class FakeKV:
    """kv_block for the bookkeeping tests: every block is `size` bytes, named by its position."""

    def __init__(self, size=1000):
        self.size = size
        self.made = 0

    def __call__(self, start, stop):
        self.made += 1
        return np.full(self.size, start, np.uint8)


def test_blocks_are_keyed_by_their_whole_prefix(prefix_cache):
    a = prefix_cache.block_keys(list(range(40)))
    b = prefix_cache.block_keys(list(range(32)) + [7] * 8)
    c = prefix_cache.block_keys([99] + list(range(1, 40)))
    assert len(a) == 2 and a == b  # the 8-token tails are no whole block
    assert c[0] != a[0] and c[1] != a[1], "the same second block after another first one is another key"


def test_two_prompts_sharing_a_prefix_share_its_blocks(prefix_cache):
    cache, kv = prefix_cache.PrefixCache(1 << 20), FakeKV()
    cache.insert(SHARED, kv)
    cache.insert(SHARED[:32] + prompt(4, 32), kv)
    assert kv.made == 4 + 2
    assert cache.stats.blocks == 6 and cache.stats.used_bytes == 6000
    reused = cache.lookup(SHARED[:32] + prompt(4, 32) + [1])
    assert [block[0] for block in reused] == [0, 16, 32, 48]


def test_blocks_are_shared_only_under_the_same_salt(prefix_cache):
    """A tenant's salt roots its chains: another tenant's prompt (or an
    unsalted one) reuses none of its blocks, so its prefill time tells it
    nothing of what that tenant sent."""
    cache, kv = prefix_cache.PrefixCache(1 << 20), FakeKV()
    cache.insert(SHARED, kv, salt=b"acme")
    assert cache.lookup(SHARED + [1], salt=b"globex") == []
    assert cache.lookup(SHARED + [1]) == []
    assert [block[0] for block in cache.lookup(SHARED + [1], salt=b"acme")] == [0, 16, 32, 48]
    cache.insert(SHARED, kv, salt=b"globex")
    assert kv.made == 4 + 4, "each salt keeps its own copy"
    assert prefix_cache.block_keys(SHARED, salt=b"acme")[0] not in prefix_cache.block_keys(SHARED)


def test_the_last_prompt_token_is_never_served_from_the_cache(prefix_cache):
    cache = prefix_cache.PrefixCache(1 << 20)
    cache.insert(SHARED[:32], FakeKV())
    assert len(cache.lookup(SHARED[:32])) == 1
    assert len(cache.lookup(SHARED[:33])) == 2
    assert cache.lookup(SHARED[:16]) == []


def test_eviction_keeps_within_the_byte_bound_and_takes_leaves_first(prefix_cache):
    cache, kv = prefix_cache.PrefixCache(5000), FakeKV(1000)
    other = prompt(5, 64)
    cache.insert(SHARED, kv)
    cache.insert(other, kv)

    assert cache.stats.used_bytes == 5000 and cache.stats.blocks == 5
    assert cache.stats.evicted_blocks == 3
    assert len(cache.lookup(other + [1])) == 4  # the newest prompt whole
    assert len(cache.lookup(SHARED + [1])) == 1  # the older one's root survives, its leaves went

    rng = np.random.default_rng(0)
    parents = {}
    for _ in range(200):
        # Prompts branching off a few shared roots, of every length.
        root = [int(rng.integers(1, 4))] * 16
        token_ids = root + [int(t) for t in rng.integers(1, 6, int(rng.integers(0, 80)))]
        chain = prefix_cache.block_keys(token_ids)
        parents |= dict(zip(chain[1:], chain[:-1]))
        cache.insert(token_ids, kv)
        assert cache.stats.used_bytes <= 5000
        assert cache.stats.used_bytes == 1000 * cache.stats.blocks
        # No block outlives its parent: each one cached is reachable by a lookup.
        assert all(parents.get(key) in cache._blocks for key in cache._blocks if key in parents)
    assert cache.stats.evicted_blocks > 100


def test_a_zero_byte_cache_holds_nothing(prefix_cache):
    cache, kv = prefix_cache.PrefixCache(0), FakeKV()
    cache.insert(SHARED, kv)
    assert kv.made == 0 and cache.lookup(SHARED) == [] and cache.stats.used_bytes == 0
    assert not cache.enabled
    small = prefix_cache.PrefixCache(999)
    small.insert(SHARED, kv)
    assert small.stats.blocks == 0, "a block larger than the whole cache is not kept"


class CannotCopyBlocks:
    """The real model, except that copying a block out for the cache fails."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def __getattr__(self, name):
        return getattr(self.model, name)

    def kv_block(self, cache, start, stop):
        raise MemoryError("no room for a copy")


def test_a_failure_to_cache_blocks_does_not_fail_the_request(engine, prefix_cache, model):
    scheduler = engine.Scheduler(
        "cached", CannotCopyBlocks(model), vocabulary(engine), 4, prefix_cache.PrefixCache(64 << 20)
    )
    plain = engine.Scheduler("plain", model, vocabulary(engine), 4)
    scheduler.start()
    plain.start()
    try:
        answers = [generate(engine, scheduler, SHARED) for _ in range(2)]
        expected = generate(engine, plain, SHARED)
    finally:
        scheduler.shutdown()
        plain.shutdown()
    assert answers == [expected, expected]
    assert scheduler.prefix_cache.stats.blocks == 0


# --- Many sequences admitted in one scheduler step, with and without the cache ---
#
# The scheduler prefills the requests it admits one after the other, each
# looking up what the ones before it (in the same step) inserted, while the
# earlier ones already sit in the running batch. Each case runs the same
# batch twice: through a scheduler with a prefix cache, and through one
# without; the same batch in the same order, so every decoding step has the
# same shape and the only difference is the reused prefix. Greedy text,
# token counts, finish reasons and cancellations must be identical.

WINDOW = 160  # max_context of both test models


def context_sensitive_tiny_gpt():
    """tiny_gpt with GPT-2's small initialisation scaled up. As initialised, its
    greedy choice hardly depends on the context (changing one of 40 prompt
    tokens changed it in 0 of 60 tries), so a wrongly reused prefix would go
    unseen; scaled, in 13 of 60 (the small Llama: 19 of 60)."""
    core = model_repository_modules.load("tiny_gpt/1/tiny_gpt_core.py")
    config = core.GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_context=WINDOW)
    weights = core.init_weights(config, seed=5)
    for name in weights:
        if name.endswith("attn.w_qkv"):
            weights[name] *= 20  # peaked attention: each position's keys and values matter
        elif name.endswith(("attn.w_out", "mlp.w_in", "mlp.w_out")) or name in ("wte", "wpe"):
            weights[name] *= 10
    return core.TinyGPT(weights, config)


@pytest.fixture(scope="module", params=["tiny_gpt", "llama"])
def batch_model(request):
    return context_sensitive_tiny_gpt() if request.param == "tiny_gpt" else small_llama()


class LeavingClient(Recorder):
    """A client that goes away after `checks` is_cancelled() calls (None: stays).

    The scheduler asks once at admission, before the prefill, then once per
    step: with checks=1 the prompt is prefilled (and its blocks cached), then
    the request is cancelled before its first token. It also asks before each
    piece of the prompt (engine.PREFILL_CHUNK_TOKENS a pass, shared by the
    prompts being read): how many depends on what the cache holds, so those
    checks find the client still there and count for nothing, and a batch
    ends the same with the cache on and off.
    """

    def __init__(self, checks: int | None):
        super().__init__()
        self.checks = checks
        self.generation = self.scheduler = None  # set once the request is made

    def is_cancelled(self) -> bool:
        if self.checks is None or any(g is self.generation for g in self.scheduler._prefilling):
            return False
        self.checks -= 1
        return self.checks < 0


def admitted_together(engine, model, cache, requests, max_active=None) -> list[tuple]:
    """Run `requests` [(token_ids, max_tokens, checks)] admitted in one step (with max_active,
    that many at first, the rest as sequences finish); each one's outcome."""
    scheduler = engine.Scheduler("batch", model, vocabulary(engine), max_active or len(requests), cache)
    generations = [
        engine.Generation(
            request_id=str(i),
            sender=LeavingClient(checks),
            prompt="",
            prompt_ids=list(token_ids),
            params=engine.SamplingParams(max_tokens=max_tokens, temperature=0.0),
            stream=True,
            prepend_prompt=False,
        )
        for i, (token_ids, max_tokens, checks) in enumerate(requests)
    ]
    # Queued before the thread starts, so its first admission takes them all.
    for generation in generations:
        generation.sender.generation, generation.sender.scheduler = generation, scheduler
        scheduler.submit(generation)
    scheduler.start()
    try:
        for generation in generations:
            assert generation.sender.done.wait(60), f"request {generation.request_id} never finished"
    finally:
        scheduler.shutdown()
    return [
        (g.sender.error, "".join(g.sender.texts), g.sender.tokens, g.sender.finish_reason)
        + (g.sender.cached_tokens,)
        for g in generations
    ]


def block_bytes(model) -> int:
    return model.kv_block(model.new_cache(BLOCK), 0, BLOCK).nbytes


def check_bookkeeping(cache):
    held = list(cache._blocks.values())
    assert cache.stats.blocks == len(held)
    assert cache.stats.used_bytes == sum(block.kv.nbytes for block in held) <= cache.capacity_bytes


def compare_with_the_cache_off(engine, prefix_cache, model, requests, capacity_blocks, max_active=None):
    """Two waves through one cache (cold, then warm) against the same batch with no cache;
    each wave's prompt tokens reused, per request."""
    capacity = 64 << 20 if capacity_blocks is None else capacity_blocks * block_bytes(model)
    cache = prefix_cache.PrefixCache(capacity)
    uncached = admitted_together(engine, model, None, requests, max_active)
    assert all(outcome[0] is None or outcome[0][1] == "cancelled" for outcome in uncached)
    reused = []
    for wave in ("cold", "warm"):
        cached = admitted_together(engine, model, cache, requests, max_active)
        for request, with_cache, without in zip(requests, cached, uncached):
            assert with_cache[:4] == without[:4], f"{wave} wave, prompt of {len(request[0])} tokens"
            if with_cache[0] is None:  # cached_tokens travels with every response sent
                assert with_cache[4] % BLOCK == 0 and with_cache[4] < len(request[0])
        check_bookkeeping(cache)
        reused.append([outcome[4] for outcome in cached])
    return reused, cache


def test_identical_prompts_admitted_together_answer_as_with_the_cache_off(engine, prefix_cache, batch_model):
    # 33 tokens: two whole blocks reusable; 32: an exact multiple, the second
    # block recomputed; 48 + 112 = the window, filled to its last position.
    requests = (
        [(SHARED[:33], 20, None)] * 6 + [(SHARED[:32], 20, None)] * 4 + [(SHARED[:48], WINDOW - 48, None)] * 3
    )
    (cold, warm), cache = compare_with_the_cache_off(engine, prefix_cache, batch_model, requests, None)
    # The first of each prompt misses; the rest hit what it inserted in the same step.
    assert cold == [0] + [32] * 5 + [16] * 4 + [32] * 3
    assert warm == [32] * 6 + [16] * 4 + [32] * 3
    assert cache.stats.blocks == 3


def test_shared_prefixes_admitted_together_answer_as_with_the_cache_off(engine, prefix_cache, batch_model):
    requests = [(SHARED[:40] + prompt(20 + i, 4 + 5 * i), 16, None) for i in range(8)]
    (cold, warm), _ = compare_with_the_cache_off(engine, prefix_cache, batch_model, requests, None)
    assert cold == [0] + [32] * 7  # the 40 shared tokens hold two whole blocks
    assert warm == [(len(token_ids) - 1) // BLOCK * BLOCK for token_ids, _, _ in requests]


def test_blocks_evicted_while_the_sequences_that_loaded_them_still_run(engine, prefix_cache, batch_model):
    # Room for 3 blocks: each admission evicts what the one before it loaded
    # and inserted, while that one is still decoding from its own copy.
    requests = [(prompt(30 + i, 50), 30, None) for i in range(4)] + [(prompt(30, 50), 30, None)] * 2
    compare_with_the_cache_off(engine, prefix_cache, batch_model, requests, capacity_blocks=3)


def test_a_client_gone_during_its_prefill_leaves_correct_blocks_behind(engine, prefix_cache, batch_model):
    # The first leaves right after its prefill, the second before it, the third after 2 tokens.
    requests = [(SHARED, 12, checks) for checks in (1, 0, 3, None)] + [(SHARED[:40], 12, None)]
    (cold, _), _ = compare_with_the_cache_off(engine, prefix_cache, batch_model, requests, None)
    assert cold == [None, None, 48, 48, 32]  # None: no response ever sent


ROOTS = [prompt(40 + i, 96) for i in range(3)]


@st.composite
def concurrent_batches(draw):
    """Requests branching off a few shared roots at block edges and between them,
    some identical, some filling the window, some whose client leaves early."""

    def one():
        root = draw(st.sampled_from(ROOTS))
        shared = draw(st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 64, 96]))
        tail = draw(st.lists(st.integers(1, VOCAB - 1), max_size=20))
        token_ids = tuple(root[:shared] + tail) or (1,)
        max_tokens = draw(st.one_of(st.integers(1, 10), st.just(WINDOW - len(token_ids))))
        checks = draw(st.one_of(st.none(), st.integers(0, 4)))
        return token_ids, max_tokens, checks

    batch = [one() for _ in range(draw(st.integers(1, 6)))]
    return batch + draw(st.lists(st.sampled_from(batch), max_size=4))  # identical requests


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    requests=concurrent_batches(),
    capacity_blocks=st.sampled_from([1, 2, 5, None]),
    max_active=st.sampled_from([None, 1, 3]),  # None: all at once; else admitted as others finish
)
def test_any_batch_admitted_together_answers_as_with_the_cache_off(
    engine, prefix_cache, batch_model, requests, capacity_blocks, max_active
):
    compare_with_the_cache_off(engine, prefix_cache, batch_model, requests, capacity_blocks, max_active)


@pytest.mark.parametrize("name", ["tiny_gpt", "llama"])
def test_cached_blocks_are_copies_never_views_of_a_sequence_cache(prefix_cache, name):
    model = tiny_gpt() if name == "tiny_gpt" else small_llama()
    cache = prefix_cache.PrefixCache(64 << 20)
    first = model.new_cache(len(SHARED))
    model.prefill(SHARED, first)
    cache.insert(SHARED, lambda start, stop: model.kv_block(first, start, stop))
    blocks = cache.lookup(SHARED + [1])
    kept = [block.copy() for block in blocks]

    second = model.new_cache(len(SHARED) + 1)
    model.load_kv(second, blocks)
    model.prefill([1, 2, 3], second)
    model.decode([4], [second])
    # Scribble over both sequences' caches: no cached block may change.
    for sequence in (first, second):
        for array in vars(sequence).values():
            if isinstance(array, np.ndarray):
                assert not any(np.shares_memory(array, block) for block in blocks)
                array[...] = np.nan
    for block, before in zip(cache.lookup(SHARED + [1]), kept):
        np.testing.assert_array_equal(block, before)
