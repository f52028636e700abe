"""Automatic prefix caching for the text-generation models, as vLLM does it.

A prompt's token ids are cut into blocks of BLOCK_TOKENS. Each full block is
keyed by a digest of (its parent block's key, its own tokens), so one key
names the whole prefix up to the end of that block and two prompts that
share a prefix share its blocks. A lookup walks the chain from the first
block and reuses the longest run it finds; the value of a block is the
model's keys and values for those positions (a numpy array whose layout only
the model knows: `model.kv_block` makes it, `model.load_kv` reads it back).

A request may carry a cache salt (vLLM's ``cache_salt``): the root of its
chain, so that only requests with the same salt share blocks. The
inference service salts each tenant's generations with the tenant's id: a
prefix one tenant sent is never reused for another's, whose prefill time
would tell it someone had sent that prefix (the side channel of prompt
leakage attacks on shared KV caches, which recover a prompt block by
block). Unsalted requests (the mesh's own work) share the unsalted chains.

Memory is bounded in bytes and freed least recently used first. Every
lookup and insert touches a chain's blocks from the last to the first, so a
parent is always more recently used than its children: eviction takes
leaves first and never leaves a block whose prefix is gone (unreachable,
yet holding memory).

Not thread-safe on purpose: the scheduler thread owns the cache, as it owns
every sequence's KV cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# vLLM's default block size: small enough that a chat turn's shared system
# prompt and history are reused almost to the token, large enough that the
# per-block bookkeeping (a digest, a dict entry) is noise next to its KV.
BLOCK_TOKENS = 16
_ROOT = b""


@dataclass
class PrefixCacheStats:
    """Cumulative since the model loaded (the Triton metrics report them)."""

    lookups: int = 0  # prompts looked up
    queried_tokens: int = 0  # prompt tokens of those lookups
    hit_tokens: int = 0  # of those, served from the cache
    evicted_blocks: int = 0
    used_bytes: int = 0
    blocks: int = 0


@dataclass(frozen=True)
class _Block:
    tokens: tuple[int, ...]  # kept to rule out a digest collision handing back another prefix's KV
    kv: np.ndarray


def block_keys(token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS, salt: bytes = b"") -> list[bytes]:
    """The chain of keys of the full blocks of `token_ids` under `salt`; key i
    names tokens [0, (i+1) * block_tokens). A salt's root is a digest, never
    the empty unsalted root, so no salted key is an unsalted one."""
    keys = []
    parent = hashlib.blake2b(salt, digest_size=16, person=b"mg-prefix-salt").digest() if salt else _ROOT
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        block = np.asarray(token_ids[start : start + block_tokens], dtype=np.int64)
        parent = hashlib.blake2b(parent + block.tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if capacity_bytes < 0 or block_tokens < 1:
            raise ValueError(
                f"need capacity_bytes >= 0 and block_tokens >= 1, got {capacity_bytes}, {block_tokens}"
            )
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def lookup(self, token_ids: Sequence[int], salt: bytes = b"") -> list[np.ndarray]:
        """KV blocks of the longest cached prefix of `token_ids` under `salt`, in order.

        Never the whole prompt: at least its last token is left to prefill,
        since that position's logits choose the first new token.
        """
        usable_blocks = (len(token_ids) - 1) // self.block_tokens
        keys = block_keys(token_ids[: usable_blocks * self.block_tokens], self.block_tokens, salt)
        found: list[bytes] = []
        for index, key in enumerate(keys):
            block = self._blocks.get(key)
            start = index * self.block_tokens
            if block is None or block.tokens != tuple(token_ids[start : start + self.block_tokens]):
                break
            found.append(key)
        self._touch(found)
        self.stats.lookups += 1
        self.stats.queried_tokens += len(token_ids)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return [self._blocks[key].kv for key in found]

    def insert(
        self, token_ids: Sequence[int], kv_block: Callable[[int, int], np.ndarray], salt: bytes = b""
    ) -> None:
        """Cache every full block of `token_ids` under `salt` not cached yet;
        kv_block(start, stop) copies one out."""
        if not self.enabled:
            return
        keys = block_keys(token_ids, self.block_tokens, salt)
        for index, key in enumerate(keys):
            if key in self._blocks:
                continue
            start, stop = index * self.block_tokens, (index + 1) * self.block_tokens
            kv = kv_block(start, stop)
            if kv.nbytes > self.capacity_bytes:
                return  # not even one block fits; neither would its children
            self._blocks[key] = _Block(tuple(token_ids[start:stop]), kv)
            self.stats.used_bytes += kv.nbytes
            self.stats.blocks += 1
            self._touch(keys[: index + 1])  # the new block is newest but older than its ancestors
            self._evict_to_fit()
            if key not in self._blocks:
                return  # evicted at once (the chain was the least recent): the rest cannot be reached
        self._touch(keys)

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict_to_fit(self) -> None:
        while self.stats.used_bytes > self.capacity_bytes:
            _, block = self._blocks.popitem(last=False)
            self.stats.used_bytes -= block.kv.nbytes
            self.stats.blocks -= 1
            self.stats.evicted_blocks += 1
