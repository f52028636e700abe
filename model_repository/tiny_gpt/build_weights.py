"""Write tiny_gpt's weights (seeded random init) to 1/weights.npz.

The file is ~20 MB and fully determined by the seed, so it is built rather
than committed. Skips if the file exists unless --force.

    python model_repository/tiny_gpt/build_weights.py [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

VERSION_DIR = Path(__file__).resolve().parent / "1"
WEIGHTS_PATH = VERSION_DIR / "weights.npz"
# The vocabulary of the all-MiniLM-L6-v2 (BERT uncased) tokenizer the model uses.
VOCAB_SIZE = 30522


def _load_core():
    # "1" is not an importable package name, so load the module from its file.
    spec = importlib.util.spec_from_file_location("tiny_gpt_core", VERSION_DIR / "tiny_gpt_core.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build(path: Path = WEIGHTS_PATH, seed: int = 0, force: bool = False) -> bool:
    """Write the weights; returns False when an existing file was kept."""
    if path.exists() and not force:
        return False
    core = _load_core()
    config = core.GPTConfig(vocab_size=VOCAB_SIZE)
    weights = core.init_weights(config, seed)
    # Write then rename, so a concurrent reader never sees half a file.
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, config=np.array(config.to_json()), **weights)
    partial.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.add_argument("--output", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args(argv)
    written = build(args.output, args.seed, args.force)
    print(f"{'wrote' if written else 'kept existing'} {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
