"""tiny_gpt's KV-cached decoding must compute what a full forward pass computes."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

CORE_PATH = Path(__file__).resolve().parents[2] / "model_repository" / "tiny_gpt" / "1" / "tiny_gpt_core.py"


@pytest.fixture(scope="module")
def core():
    # The model's version directory "1" is not an importable package name.
    spec = importlib.util.spec_from_file_location("tiny_gpt_core", CORE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


def test_greedy_is_argmax_and_sampling_is_seeded(core):
    logits = np.array([0.1, 3.0, 0.2, 2.9], np.float32)
    assert core.sample(logits, 0.0, 1.0, 0, np.random.default_rng()) == 1

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [core.sample(logits, 1.0, 0.9, 0, rng) for _ in range(50)]

    assert draws(5) == draws(5)
    # top_p=0.9 keeps only the two large logits (they hold >90% of the mass).
    assert set(draws(5)) == {1, 3}
    rng = np.random.default_rng(0)
    assert {core.sample(logits, 1.0, 1.0, 1, rng) for _ in range(20)} == {1}
