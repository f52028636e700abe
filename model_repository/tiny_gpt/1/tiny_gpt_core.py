"""A small decoder-only transformer (GPT-2 layout) in plain numpy.

Kept free of Triton imports so the maths can be unit-tested on its own.
Shapes: T tokens, B sequences, L layers, H heads, D model width, d head width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_context: int = 512

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GPTConfig:
        return cls(**json.loads(text))


def init_weights(config: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """GPT-2's initialisation: N(0, 0.02), residual projections scaled by
    1/sqrt(2L) so the residual stream keeps unit-order variance with depth."""
    rng = np.random.default_rng(seed)
    D, V = config.d_model, config.vocab_size

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    weights = {
        "wte": normal((V, D), 0.02),
        "wpe": normal((config.max_context, D), 0.01),
        "ln_f.g": np.ones(D, np.float32),
        "ln_f.b": np.zeros(D, np.float32),
    }
    for layer in range(config.n_layers):
        p = f"h{layer}."
        weights |= {
            p + "ln_1.g": np.ones(D, np.float32),
            p + "ln_1.b": np.zeros(D, np.float32),
            p + "attn.w_qkv": normal((D, 3 * D), 0.02),
            p + "attn.b_qkv": np.zeros(3 * D, np.float32),
            p + "attn.w_out": normal((D, D), residual_std),
            p + "attn.b_out": np.zeros(D, np.float32),
            p + "ln_2.g": np.ones(D, np.float32),
            p + "ln_2.b": np.zeros(D, np.float32),
            p + "mlp.w_in": normal((D, config.d_mlp), 0.02),
            p + "mlp.b_in": np.zeros(config.d_mlp, np.float32),
            p + "mlp.w_out": normal((config.d_mlp, D), residual_std),
            p + "mlp.b_out": np.zeros(D, np.float32),
        }
    return weights


def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gain + bias


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class KVCache:
    """Keys and values of every position one sequence has seen, per layer and head."""

    def __init__(self, config: GPTConfig):
        shape = (config.n_layers, config.n_heads, config.max_context, config.d_head)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.length = 0


class TinyGPT:
    def __init__(self, weights: Mapping[str, np.ndarray], config: GPTConfig):
        self.config = config
        self.w = {name: np.asarray(value, np.float32) for name, value in weights.items()}
        self.scale = np.float32(1.0 / math.sqrt(config.d_head))

    def new_cache(self, tokens: int) -> KVCache:
        """A cache for one sequence; the 512-token window is small enough to allocate whole."""
        return KVCache(self.config)

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] for every position, no cache: the reference the
        cached path must reproduce."""
        c, w = self.config, self.w
        T = len(token_ids)
        x = w["wte"][np.asarray(token_ids)] + w["wpe"][:T]
        future = np.triu(np.ones((T, T), dtype=bool), k=1)
        for layer in range(c.n_layers):
            p = f"h{layer}."
            qkv = layer_norm(x, w[p + "ln_1.g"], w[p + "ln_1.b"]) @ w[p + "attn.w_qkv"] + w[p + "attn.b_qkv"]
            q, k, v = (
                m.reshape(T, c.n_heads, c.d_head).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1)
            )
            scores = (q @ k.transpose(0, 2, 1)) * self.scale
            scores[:, future] = -np.inf
            heads = softmax(scores) @ v
            x = x + self._attention_out(heads.transpose(1, 0, 2).reshape(T, c.d_model), p)
            x = x + self._mlp(x, p)
        return self._logits(x)

    def prefill(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Feed prompt tokens after the cache's `length` positions (0, or a
        reused prefix from load_kv); logits [V] for the token after them."""
        c, w = self.config, self.w
        start, T = cache.length, cache.length + len(token_ids)
        if not start < T <= c.max_context:
            raise ValueError(
                f"prefill needs 1..{c.max_context - start} tokens after {start} cached, got {len(token_ids)}"
            )
        x = w["wte"][np.asarray(token_ids)] + w["wpe"][start:T]
        # Query i (at position start + i) sees keys 0..start + i.
        future = np.arange(T)[None, :] > np.arange(start, T)[:, None]
        for layer in range(c.n_layers):
            p = f"h{layer}."
            q, k, v = self._qkv(x, p)  # [T - start, H, d] each
            cache.keys[layer, :, start:T] = k.transpose(1, 0, 2)
            cache.values[layer, :, start:T] = v.transpose(1, 0, 2)
            scores = (q.transpose(1, 0, 2) @ cache.keys[layer, :, :T].transpose(0, 2, 1)) * self.scale
            scores[:, future] = -np.inf
            heads = softmax(scores) @ cache.values[layer, :, :T]
            x = x + self._attention_out(heads.transpose(1, 0, 2).reshape(T - start, c.d_model), p)
            x = x + self._mlp(x, p)
        cache.length = T
        return self._logits(x[-1:])[0]

    def kv_block(self, cache: KVCache, start: int, stop: int) -> np.ndarray:
        """One prefix-cache block: a copy of positions start..stop-1, [L, 2, H, stop - start, d]."""
        return np.stack([cache.keys[:, :, start:stop], cache.values[:, :, start:stop]], axis=1)

    def load_kv(self, cache: KVCache, blocks: Sequence[np.ndarray]) -> None:
        """Fill an empty cache with consecutive kv_block()s from position 0."""
        if cache.length != 0:
            raise ValueError("load_kv needs an empty cache")
        position = 0
        for block in blocks:
            stop = position + block.shape[3]
            cache.keys[:, :, position:stop] = block[:, 0]
            cache.values[:, :, position:stop] = block[:, 1]
            position = stop
        cache.length = position

    def decode(self, token_ids: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One step for B sequences at once: token_ids[i] is appended to caches[i].

        Everything but attention runs as one [B, D] matmul; attention is per
        sequence because each has its own history length. Returns logits [B, V].
        """
        c, w = self.config, self.w
        positions = np.array([cache.length for cache in caches])
        if positions.max() >= c.max_context:
            raise ValueError(f"a sequence would exceed the {c.max_context}-token context")
        x = w["wte"][np.asarray(token_ids)] + w["wpe"][positions]
        heads = np.empty((len(caches), c.n_heads, c.d_head), np.float32)
        for layer in range(c.n_layers):
            p = f"h{layer}."
            q, k, v = self._qkv(x, p)  # [B, H, d] each
            for i, (cache, pos) in enumerate(zip(caches, positions)):
                cache.keys[layer, :, pos] = k[i]
                cache.values[layer, :, pos] = v[i]
                keys = cache.keys[layer, :, : pos + 1]  # [H, t, d]
                scores = (keys @ q[i][:, :, None])[:, :, 0] * self.scale  # [H, t]
                heads[i] = (softmax(scores)[:, None, :] @ cache.values[layer, :, : pos + 1])[:, 0]
            x = x + self._attention_out(heads.reshape(len(caches), c.d_model), p)
            x = x + self._mlp(x, p)
        for cache in caches:
            cache.length += 1
        return self._logits(x)

    def _qkv(self, x: np.ndarray, p: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, c = self.w, self.config
        qkv = layer_norm(x, w[p + "ln_1.g"], w[p + "ln_1.b"]) @ w[p + "attn.w_qkv"] + w[p + "attn.b_qkv"]
        q, k, v = np.split(qkv, 3, axis=-1)
        shape = (len(x), c.n_heads, c.d_head)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _attention_out(self, heads: np.ndarray, p: str) -> np.ndarray:
        return heads @ self.w[p + "attn.w_out"] + self.w[p + "attn.b_out"]

    def _mlp(self, x: np.ndarray, p: str) -> np.ndarray:
        w = self.w
        h = layer_norm(x, w[p + "ln_2.g"], w[p + "ln_2.b"])
        return gelu(h @ w[p + "mlp.w_in"] + w[p + "mlp.b_in"]) @ w[p + "mlp.w_out"] + w[p + "mlp.b_out"]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        # Output projection tied to the token embedding.
        return layer_norm(x, self.w["ln_f.g"], self.w["ln_f.b"]) @ self.w["wte"].T
