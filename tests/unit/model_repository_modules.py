"""Import model code from model_repository/ the way Triton's stub does: by file.

A model's version directory ("1") is not an importable package name, and
these modules import their neighbours by bare name (`import engine`), so
each is registered in sys.modules under that name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def load(relative_path: str) -> ModuleType:
    path = MODEL_REPOSITORY / relative_path
    if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path):
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
