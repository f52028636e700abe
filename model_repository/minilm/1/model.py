"""minilm: all-MiniLM-L6-v2 sentence embeddings on onnxruntime, behind the
inference service's Embed (the context service's turns and questions, the
router's /v1/embeddings, the cache with cache.embedder = "inference").

Each request is [n, 1] strings; the dynamic batcher hands over several
requests at once and they run as one padded ONNX batch. The model itself
(tokenise, run, pool) is ``meshgate.minilm``, the copy the cache service
also runs in its own process: the two paths give the same vectors.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from meshgate.minilm import REVISION, MiniLM


class TritonPythonModel:
    def initialize(self, args):
        # One thread per op: Triton, tiny_gpt and this model share 2 cores.
        self.model = MiniLM(threads=1)

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

        vectors = self.model.embed(texts) if texts else None
        responses = []
        for index, (start, end) in enumerate(spans):
            if index in errors:
                error = pb_utils.TritonError(errors[index], pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                tensor = pb_utils.Tensor("embedding", vectors[start:end])
                # The revision of the code that ran (not of the caller's):
                # what the vectors may be compared with.
                revision = pb_utils.Tensor("revision", np.full((end - start, 1), REVISION.encode(), object))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor, revision]))
        return responses
