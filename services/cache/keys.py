"""What makes two prompts the same entry, and the Redis keys they live under.

Normalization (after Unicode NFC) drops blank lines at both ends and
spaces, tabs and carriage returns at each line's end (so a CRLF line break
reads as LF), and folds runs of spaces and tabs inside each line, but keeps
case, every other character (no-break and other spaces, other line
separators, form feeds), line breaks and, in a text of several lines, every
line's indentation, the first line's included (a one-line text loses its
leading spaces and tabs: a typing slip far more often than code). A bug
hunt: the whole text was trimmed, so "  if ready:\n  launch()" and "if
ready:\n  launch()", an IndentationError and a valid block, were one entry;
and Python's whitespace folding made 'a\xa0b' and 'a b' one. (Removing the
indentation all lines share instead, as textwrap.dedent, made an indented
block and the same block unindented one entry: the same error.) Normalizing
twice changes nothing.

The exact tier promises "this very prompt was answered before", and case
can change the right answer (``US`` vs ``us``, identifiers in code,
"convert 'HELLO' to lowercase"), as can indentation: folding all whitespace
made two Python functions that differ only in it one entry, and the second
was served "It returns 2." for a body that returns None. Nothing is lost by
keeping them: the embedding model is uncased and reads no whitespace, so a
question differing only in case or line breaks is a semantic hit with
similarity 1.0 whenever the caller allows semantic matches. Spaces inside a
line still fold (a string literal's ``'a    b'`` is ``'a b'``): rare next to
the typing slips the folding forgives.

Tenant and model appear hex-encoded in key names, so that Invalidate can SCAN
for them with a pattern no tenant id can break (``*``, ``?``, ``[`` and ``:``
never reach the pattern) and tenant ``a`` never matches tenant ``ab``.
Everything else that separates partitions (the generation parameters, the
embedding model; for exact entries the earlier messages) only enters the
hashed part of a key.

Each partition's keys carry its digest as a Redis Cluster hash tag
(``mg:cache:<tenant hex>:<model hex>:{<partition digest>}:...``): a
semantic store, a wrong-answer report and an eviction touch an exact entry
and its sub-partition's keys in one script, so those must share a slot,
while partitions spread over the cluster. The per-partition sequence
counter carries the same tag but sits outside the tenant's prefix, so an
Invalidate never resets it: a replica's index, synced up to some sequence
number, must never see a new entry numbered below it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import struct
import unicodedata
from collections.abc import Sequence

from meshgate.cache.v1 import cache_service_pb2
from meshgate.common.v1 import common_pb2

KEY_PREFIX = "mg:cache:"
# Hex never spells "stats", "seq", "invalidated" or "stored", so no tenant pattern reaches these.
STATS_KEY = KEY_PREFIX + "stats"
# Per counting process: the number of its last batch of counts added to
# STATS_KEY (stats.py). Its hash tag is STATS_KEY's whole name, whose slot
# that key (with no braces) hashes to, so one script reads both on a cluster.
_STATS_FLUSHED_PREFIX = KEY_PREFIX + "stats-flushed:{" + STATS_KEY + "}:"
_SEQUENCE_PREFIX = KEY_PREFIX + "seq:"
_INVALIDATED_PREFIX = KEY_PREFIX + "invalidated:"
_STORED_PREFIX = KEY_PREFIX + "stored:"
# Every exact-match entry of every tenant.
ENTRY_PATTERN = f"{KEY_PREFIX}*:*:x:*"

_DIGEST_BYTES = 16
# The digests of normalized texts, named for the normalization: when it
# changes, what the old one made equal must not stay so through the entries
# stored under it (a prompt that now differs would be served the other's
# answer until they expired), so every text-keyed name changes with it ("2":
# a text of several lines keeps every line's indentation, only spaces and
# tabs fold). Entries
# stored before are never served again and expire. So too when what binds a
# sub-partition changes ("3": every assistant message since the topic turn,
# or before a question with none, binds it: conversation.matched_exactly);
# the "2" ones hold answers given after messages that bound nothing then,
# which prompts without them would go on being served.
_ENTRY_PERSON = b"mg-cache-entry2"
_CONTEXT_PERSON = b"mg-cache-ctx3"
_CONVERSATION_PERSON = b"mg-cache-conv3"
_LENGTH = struct.Struct("<I")
_MESSAGE_HEADER = struct.Struct("<iI")


@dataclasses.dataclass(frozen=True, slots=True)
class Partition:
    """Tenant, model and generation parameters: entries never cross it."""

    digest: bytes
    # ``mg:cache:<tenant hex>:<model hex>:{<digest hex>}:``, shared by all
    # of its keys; the braces are the hash tag.
    key_prefix: str
    # For what names the partition outside its keys: the embedding memo's
    # per-tenant scope, a wrong-hit report's notice of its tenant and model.
    tenant_id: str
    model: str

    @property
    def sequence_key(self) -> str:
        """The last sequence number given to the partition's semantic
        entries (store.py's script: Redis's clock in microseconds, so numbers
        keep growing after this expires with the partition's entries)."""
        return f"{_SEQUENCE_PREFIX}{{{self.digest.hex()}}}"

    def exact_key(self, entry_id: str) -> str:
        return f"{self.key_prefix}x:{entry_id}"

    def order_key(self, context_id: str) -> str:
        return f"{self.key_prefix}o:{context_id}"

    def vectors_key(self, context_id: str) -> str:
        return f"{self.key_prefix}v:{context_id}"

    def strictness_key(self, context_id: str) -> str:
        return f"{self.key_prefix}w:{context_id}"

    def reported_key(self, context_id: str) -> str:
        return f"{self.key_prefix}r:{context_id}"


# What folds inside a line: spaces and tabs, nothing else.
_BLANKS = " \t"
# What a line's end loses: those, and the CR of a CRLF line break.
_LINE_END = " \t\r"
_RUN = re.compile(r"[ \t]+")


def normalize_text(text: str) -> str:
    lines = unicodedata.normalize("NFC", text).split("\n")
    start, end = 0, len(lines)
    while start < end and not lines[start].strip(_LINE_END):
        start += 1
    while end > start and not lines[end - 1].strip(_LINE_END):
        end -= 1
    lines = lines[start:end]
    if len(lines) == 1:
        lines = [lines[0].lstrip(_BLANKS)]
    normalized = []
    for line in lines:
        line = line.rstrip(_LINE_END)
        body = line.lstrip(_BLANKS)
        # A line's indentation as it is, the rest folded; a blank line empty.
        normalized.append(line[: len(line) - len(body)] + _RUN.sub(" ", body) if body else "")
    return "\n".join(normalized)


def tenant_prefix(tenant_id: str, model: str = "") -> str:
    """What every key of a tenant, or of one of its models, starts with."""
    if model:
        return f"{KEY_PREFIX}{tenant_id.encode().hex()}:{model.encode().hex()}:"
    return f"{KEY_PREFIX}{tenant_id.encode().hex()}:"


def stored_bytes_key(tenant_id: str, window_s: int, window: int) -> str:
    """The bytes the tenant's Stores charged in one window of ``window_s``
    seconds (store.py, ``charge``): the tenant's hex as the hash tag, so its
    windows share a slot; the window's length named too, so that another
    ttl_s never reads a count of windows of another length."""
    return f"{_STORED_PREFIX}{{{tenant_id.encode().hex()}}}:{window_s}:{window}"


def stats_flushed_key(counter_id: str) -> str:
    """The number of the last batch of counts that one counting process
    (``counter_id``) added to STATS_KEY."""
    return _STATS_FLUSHED_PREFIX + counter_id


def invalidated_key(tenant_id: str) -> str:
    """When the tenant's entries (field "") and each of its models' (the
    model's hex) were last invalidated: outside the tenant's prefix, so that
    an Invalidate's SCAN never deletes it (store.py, ``store_fence``)."""
    return f"{_INVALIDATED_PREFIX}{tenant_id.encode().hex()}"


def partition(scope: cache_service_pb2.CacheScope) -> Partition:
    # Callers send the same few scopes over and over: normalizing once per
    # distinct scope keeps the parameter copy and sort off the hot path.
    return _partition(scope.tenant_id, scope.model, scope.parameters.SerializeToString(), scope.route)


@functools.lru_cache(maxsize=4096)
def _partition(tenant_id: str, model: str, parameters: bytes, route: str = "") -> Partition:
    normalized = common_pb2.GenerationParameters.FromString(parameters)
    # Stop sequences are a set: order and repeats do not change an answer.
    stops = sorted(set(normalized.stop))
    del normalized.stop[:]
    normalized.stop.extend(stops)
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=b"mg-cache-part")
    parts = [tenant_id.encode(), model.encode(), normalized.SerializeToString(deterministic=True)]
    if route:
        # Only when set: the partitions of scopes without one stay as they were.
        parts.append(route.encode())
    for part in parts:
        digest.update(_LENGTH.pack(len(part)))
        digest.update(part)
    partition_digest = digest.digest()
    return Partition(
        partition_digest, f"{tenant_prefix(tenant_id, model)}{{{partition_digest.hex()}}}:", tenant_id, model
    )


def _conversation_digest(
    partition: Partition, messages: Sequence[common_pb2.Message], person: bytes, extra: bytes
) -> str:
    digest = hashlib.blake2b(partition.digest, digest_size=_DIGEST_BYTES, person=person)
    digest.update(_LENGTH.pack(len(extra)))
    digest.update(extra)
    for message in messages:
        content = normalize_text(message.content).encode()
        digest.update(_MESSAGE_HEADER.pack(message.role, len(content)))
        digest.update(content)
    return digest.hexdigest()


def is_entry_id(text: str) -> bool:
    """Whether ``text`` has the shape of an entry id (what entry_id returns)."""
    return len(text) == 2 * _DIGEST_BYTES and all(c in "0123456789abcdef" for c in text)


def entry_id(partition: Partition, messages: Sequence[common_pb2.Message]) -> str:
    """Names the entry of a whole prompt: its exact-match key."""
    return _conversation_digest(partition, messages, _ENTRY_PERSON, b"")


def context_id(
    partition: Partition,
    embedder: str,
    conversational: bool = False,
    exact: Sequence[common_pb2.Message] = (),
) -> str:
    """Names the sub-partition a question is matched in semantically: one
    for single questions and one for the last questions of multi-turn
    prompts, which are matched together with the topic turn they refer to
    (conversation.py) rather than by their exact history; each apart by
    the earlier messages that must be the same for an answer to hold
    (``exact``: conversation.matched_exactly, such as a system message).
    None gives the same name as before there were any.

    The embedder is part of it (meshgate.embedding.embedder_name: the
    model and the revision that embedded the question, as the embedding
    names it): vectors of two models, or of two revisions of one, are not
    comparable, so a new revision starts new sub-partitions instead of
    matching against the old vectors, whose entries expire unread.
    """
    person = _CONVERSATION_PERSON if conversational else _CONTEXT_PERSON
    return _conversation_digest(partition, exact, person, embedder.encode())
