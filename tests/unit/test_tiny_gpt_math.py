"""tiny_gpt's KV-cached decoding must compute what a full forward pass computes."""

import numpy as np
import pytest

from tests.unit import model_repository_modules


@pytest.fixture(scope="module")
def core():
    return model_repository_modules.load("tiny_gpt/1/tiny_gpt_core.py")


@pytest.fixture(scope="module")
def model(core):
    config = core.GPTConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, max_context=24)
    return core.TinyGPT(core.init_weights(config, seed=3), config)


def test_prefill_then_decode_matches_full_forward(core, model):
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=20).tolist()
    reference = model.forward(tokens)

    cache = core.KVCache(model.config)
    prompt_length = 7
    incremental = [model.prefill(tokens[:prompt_length], cache)]
    for token in tokens[prompt_length:]:
        incremental.append(model.decode([token], [cache])[0])

    np.testing.assert_allclose(np.stack(incremental[:-1]), reference[prompt_length - 1 : -1], atol=1e-4)
    np.testing.assert_allclose(incremental[-1], reference[-1], atol=1e-4)
    assert cache.length == len(tokens)


def test_batched_decode_of_uneven_sequences_matches_each_alone(core, model):
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (3, 9, 14)]
    caches = [core.KVCache(model.config) for _ in sequences]
    for cache, tokens in zip(caches, sequences):
        model.prefill(tokens[:-1], cache)

    batched = model.decode([tokens[-1] for tokens in sequences], caches)

    for row, tokens in zip(batched, sequences):
        np.testing.assert_allclose(row, model.forward(tokens)[-1], atol=1e-4)


def test_activations_stay_sane_at_full_size(core):
    config = core.GPTConfig(vocab_size=30522)
    model = core.TinyGPT(core.init_weights(config, seed=0), config)
    logits = model.forward(list(range(1000, 1064)))
    assert np.isfinite(logits).all()
    assert 0.05 < logits.std() < 10
