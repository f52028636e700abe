"""A Llama decoder (SmolLM2-135M-Instruct) in plain numpy, read from a GGUF file.

Kept free of Triton imports so the maths can be unit-tested on its own.
Shapes: T tokens, B sequences, L layers, H query heads, G key/value heads
(grouped-query attention: each serves H/G query heads), d head width,
D model width, V vocabulary.

Weights are dequantized to float32 at load time, one tensor at a time, so
only one layer's temporaries exist at once (peak RSS ~0.8 GB instead of
~1.35 GB all at once). float32 on purpose: float16 matmuls in numpy are far
slower on CPU. Linear layers keep GGUF's [out, in] layout and compute
`(W @ x.T).T`, ~25% faster than `x @ W.T` for small batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Queries attended at once in a prefill: bounds the [G, H/G, T, t] score
# tensor (a full 8k-token prompt would otherwise need ~2.4 GB per layer).
PREFILL_QUERY_BLOCK = 256
# A new cache holds this many tokens beyond the prompt, then doubles as needed.
INITIAL_HEADROOM = 64


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_context: int
    rope_theta: float
    rms_eps: float

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_gguf(cls, reader) -> LlamaConfig:
        def field(key: str):
            return reader.fields[f"llama.{key}"].contents()

        return cls(
            vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
            d_model=int(field("embedding_length")),
            n_layers=int(field("block_count")),
            n_heads=int(field("attention.head_count")),
            n_kv_heads=int(field("attention.head_count_kv")),
            d_ff=int(field("feed_forward_length")),
            max_context=int(field("context_length")),
            rope_theta=float(field("rope.freq_base")),
            rms_eps=float(field("attention.layer_norm_rms_epsilon")),
        )


def load_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Config and float32 weights; Q, K and V (and gate and up) fused into one matrix each."""
    import gguf  # only the loader needs it; the maths and its tests do not

    reader = gguf.GGUFReader(str(path))
    if reader.fields["general.architecture"].contents() != "llama":
        raise ValueError(f"{path}: not a llama GGUF")
    config = LlamaConfig.from_gguf(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def dequantized(name: str) -> np.ndarray:
        tensor = tensors[name]
        # GGUF lists dims innermost first; numpy's shape is [out, in].
        return np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)

    weights = {
        "token_embd": dequantized("token_embd.weight"),
        "output_norm": dequantized("output_norm.weight"),
    }
    if "output.weight" in tensors:
        raise ValueError(f"{path}: an untied output layer is not supported")
    for layer in range(config.n_layers):
        p = f"blk.{layer}."
        weights[p + "attn_norm"] = dequantized(p + "attn_norm.weight")
        weights[p + "attn_qkv"] = np.concatenate(
            [dequantized(p + f"attn_{name}.weight") for name in ("q", "k", "v")]
        )
        weights[p + "attn_output"] = dequantized(p + "attn_output.weight")
        weights[p + "ffn_norm"] = dequantized(p + "ffn_norm.weight")
        weights[p + "ffn_gate_up"] = np.concatenate(
            [dequantized(p + f"ffn_{name}.weight") for name in ("gate", "up")]
        )
        weights[p + "ffn_down"] = dequantized(p + "ffn_down.weight")
    return config, weights


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [N, in] through weight [out, in]."""
    return (weight @ x.T).T


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * gain


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class KVCache:
    """Keys and values of every position one sequence has seen: [L, 2, G, capacity, d].

    Sized to what the sequence has needed so far (about 46 KB per token for
    SmolLM2-135M) and doubled when full, up to the context window; never
    preallocated to the whole window.
    """

    def __init__(self, config: LlamaConfig, capacity: int):
        self.max_context = config.max_context
        capacity = max(1, min(capacity, config.max_context))
        self.data = np.empty((config.n_layers, 2, config.n_kv_heads, capacity, config.d_head), np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    def reserve(self, tokens: int) -> None:
        if tokens > self.max_context:
            raise ValueError(f"a sequence would exceed the {self.max_context}-token context")
        if tokens <= self.capacity:
            return
        capacity = min(max(tokens, 2 * self.capacity), self.max_context)
        grown = np.empty(self.data.shape[:3] + (capacity,) + self.data.shape[4:], np.float32)
        grown[:, :, :, : self.length] = self.data[:, :, :, : self.length]
        self.data = grown


class Llama:
    def __init__(self, weights: dict[str, np.ndarray], config: LlamaConfig):
        self.config = config
        self.w = weights
        self.scale = np.float32(1.0 / math.sqrt(config.d_head))
        # Rotary embeddings rotate ADJACENT pairs (x[2i], x[2i+1]) (GPT-J
        # style): llama.cpp's converter permutes the Q and K rows so this
        # interleaved form is right for GGUF weights. The HF half-split form
        # makes this model emit end-of-turn at once.
        inverse_frequency = config.rope_theta ** (-np.arange(0, config.d_head, 2) / config.d_head)
        angles = np.outer(np.arange(config.max_context), inverse_frequency)  # [max_context, d/2]
        self.rope_cos = np.cos(angles).astype(np.float32)
        self.rope_sin = np.sin(angles).astype(np.float32)

    def new_cache(self, tokens: int) -> KVCache:
        """A cache for a sequence expected to reach at least `tokens` tokens soon."""
        return KVCache(self.config, tokens + INITIAL_HEADROOM)

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] for every position, no cache: the reference the
        cached path must reproduce."""
        return self._logits(self._prompt_states(token_ids, cache=None))

    def prefill(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Feed prompt tokens after the cache's `length` positions (0, or a
        reused prefix from load_kv); logits [V] for the token after them."""
        start, T = cache.length, cache.length + len(token_ids)
        if not start < T <= self.config.max_context:
            raise ValueError(
                f"prefill needs 1..{self.config.max_context - start} tokens after {start} cached, "
                f"got {len(token_ids)}"
            )
        cache.reserve(T)
        states = self._prompt_states(token_ids, cache)
        cache.length = T
        return self._logits(states[-1:])[0]

    def kv_block(self, cache: KVCache, start: int, stop: int) -> np.ndarray:
        """One prefix-cache block: a copy of positions start..stop-1, [L, 2, G, stop - start, d]."""
        return cache.data[:, :, :, start:stop].copy()

    def load_kv(self, cache: KVCache, blocks: Sequence[np.ndarray]) -> None:
        """Fill an empty cache with consecutive kv_block()s from position 0."""
        if cache.length != 0:
            raise ValueError("load_kv needs an empty cache")
        cache.reserve(sum(block.shape[3] for block in blocks))
        position = 0
        for block in blocks:
            stop = position + block.shape[3]
            cache.data[:, :, :, position:stop] = block
            position = stop
        cache.length = position

    def decode(self, token_ids: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One step for B sequences at once: token_ids[i] is appended to caches[i].

        Everything but attention runs as one batched matmul; attention is per
        sequence because each has its own history. Writes only at each
        cache's current length and advances the lengths last, so a step
        that raises can simply be retried. Returns logits [B, V].
        """
        c, w = self.config, self.w
        for cache in caches:
            cache.reserve(cache.length + 1)
        positions = np.array([cache.length for cache in caches])
        x = w["token_embd"][np.asarray(token_ids)]
        group = c.n_heads // c.n_kv_heads
        heads = np.empty((len(caches), c.d_model), np.float32)
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            q, k, v = self._qkv(x, p, positions)  # [B, H, d], [B, G, d], [B, G, d]
            for i, (cache, pos) in enumerate(zip(caches, positions)):
                cache.data[layer, 0, :, pos] = k[i]
                cache.data[layer, 1, :, pos] = v[i]
                keys = cache.data[layer, 0, :, : pos + 1]  # [G, t, d]
                values = cache.data[layer, 1, :, : pos + 1]
                queries = q[i].reshape(c.n_kv_heads, group, c.d_head)  # [G, H/G, d]
                scores = (queries @ keys.transpose(0, 2, 1)) * self.scale  # [G, H/G, t]
                heads[i] = (softmax(scores) @ values).reshape(c.d_model)
            x = x + linear(heads, w[p + "attn_output"])
            x = x + self._mlp(x, p)
        for cache in caches:
            cache.length += 1
        return self._logits(x)

    def _prompt_states(self, token_ids: Sequence[int], cache: KVCache | None) -> np.ndarray:
        """Final hidden states [N, D] of N prompt tokens at the positions after the cache's
        `length` (from 0 without a cache); their keys and values go into `cache`."""
        c, w = self.config, self.w
        start = 0 if cache is None else cache.length
        N = len(token_ids)
        T = start + N
        x = w["token_embd"][np.asarray(token_ids)]
        positions = np.arange(start, T)
        group = c.n_heads // c.n_kv_heads
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            q, k, v = self._qkv(x, p, positions)
            if cache is None:
                keys = k.transpose(1, 0, 2)[:, None]  # [G, 1, T, d]
                values = v.transpose(1, 0, 2)[:, None]
            else:
                cache.data[layer, 0, :, start:T] = k.transpose(1, 0, 2)
                cache.data[layer, 1, :, start:T] = v.transpose(1, 0, 2)
                # A reused prefix's keys and values are already there, before `start`.
                keys = cache.data[layer, 0, :, None, :T]
                values = cache.data[layer, 1, :, None, :T]
            queries = q.reshape(N, c.n_kv_heads, group, c.d_head).transpose(1, 2, 0, 3)  # [G, H/G, N, d]
            heads = np.empty((N, c.d_model), np.float32)
            for first in range(0, N, PREFILL_QUERY_BLOCK):
                last = min(first + PREFILL_QUERY_BLOCK, N)
                # Causal: the query at position start + i sees keys 0..start + i,
                # so keys past the block's last position are never needed.
                seen = start + last
                scores = (queries[:, :, first:last] @ keys[:, :, :seen].transpose(0, 1, 3, 2)) * self.scale
                future = np.arange(seen)[None, :] > np.arange(start + first, seen)[:, None]
                scores[..., future] = -np.inf
                block = softmax(scores) @ values[:, :, :seen]  # [G, H/G, block, d]
                heads[first:last] = block.transpose(2, 0, 1, 3).reshape(last - first, c.d_model)
            x = x + linear(heads, w[p + "attn_output"])
            x = x + self._mlp(x, p)
        return x

    def _qkv(self, x: np.ndarray, p: str, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        c = self.config
        qkv = linear(rms_norm(x, self.w[p + "attn_norm"], c.rms_eps), self.w[p + "attn_qkv"])
        kv_width = c.n_kv_heads * c.d_head
        q = qkv[:, : c.d_model].reshape(len(x), c.n_heads, c.d_head)
        k = qkv[:, c.d_model : c.d_model + kv_width].reshape(len(x), c.n_kv_heads, c.d_head)
        v = qkv[:, c.d_model + kv_width :].reshape(len(x), c.n_kv_heads, c.d_head)
        return self._rotate(q, positions), self._rotate(k, positions), v

    def _rotate(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Interleaved rotary embedding of x [N, heads, d] at positions [N]."""
        cos = self.rope_cos[positions][:, None, :]  # [N, 1, d/2]
        sin = self.rope_sin[positions][:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = np.empty_like(x)
        rotated[..., 0::2] = even * cos - odd * sin
        rotated[..., 1::2] = even * sin + odd * cos
        return rotated

    def _mlp(self, x: np.ndarray, p: str) -> np.ndarray:
        # SwiGLU: down(silu(gate(h)) * up(h)), gate and up fused in one matmul.
        h = rms_norm(x, self.w[p + "ffn_norm"], self.config.rms_eps)
        gate, up = np.split(linear(h, self.w[p + "ffn_gate_up"]), 2, axis=-1)
        return linear(gate / (1.0 + np.exp(-gate)) * up, self.w[p + "ffn_down"])

    def _logits(self, x: np.ndarray) -> np.ndarray:
        # Output projection tied to the token embedding.
        return linear(rms_norm(x, self.w["output_norm"], self.config.rms_eps), self.w["token_embd"])
