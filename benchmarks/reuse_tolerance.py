"""How far apart are two embeddings of the same image? The basis of the reuse verification.

The incremental build reuses a vector only if today's model, embedding the same bytes again,
comes within cosine 1 - pipelines.reuse.VERIFY_TOLERANCE of it.  This measures, on real
photos (the Holidays set in ../shared/data) and the builtin EfficientNet-Lite0:

- within one runtime, what varies between runs of the nightly job: the batch an image is in
  (batch size and position) and the number of TensorFlow intra-op threads (a process each);
- across code paths, what the check must catch: the bfloat16 variant of the same weights.

It prints the largest 1 - cosine (computed in float64) and the largest absolute difference.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HOLIDAYS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "holidays", "images"))


def _pixels(n: int) -> np.ndarray:
    from retrieval import imaging

    paths = sorted(glob.glob(os.path.join(HOLIDAYS, "*.jpg")))[:n]
    if not paths:
        sys.exit(f"needs the Holidays photos at {HOLIDAYS}")
    images = []
    for path in paths:
        with open(path, "rb") as f:
            images.append(imaging.resize(imaging.decode(f.read(), min_size=224).image, 224, "pad"))
    return np.stack(images)


def child(handle: str, threads: int, batches: list[int], n: int, out: str) -> None:
    """Embeds the first n photos once per batch size; saves {batch: vectors} to `out` (.npz)."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    from retrieval import embedders

    model, spec = embedders.complete_spec(embedders.parse_embedder_arg(f"e={handle}"))
    pixels = _pixels(n)
    vectors = {}
    for batch in batches:
        parts = [embedders.embed_batch(model, spec, pixels[i : i + batch]) for i in range(0, n, batch)]
        vectors[f"b{batch}"] = np.concatenate(parts)
    # The same images, shifted by 5 places in their batches of 32.
    shifted = [embedders.embed_batch(model, spec, pixels[i : i + 32]) for i in range(5, n - 31, 32)]
    vectors["shifted"] = np.concatenate(shifted)
    np.savez(out, **vectors)


def _distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cosine = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float((1 - cosine).max()), float(np.abs(a - b).max())


def _run(handle: str, threads: int, batches: list[int], n: int, folder: str) -> dict:
    out = os.path.join(folder, f"{handle.replace(':', '_')}-{threads}.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    args = [
        sys.executable,
        "-m",
        "benchmarks.reuse_tolerance",
        "--child",
        json.dumps([handle, threads, batches, n, out]),
    ]
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    return dict(np.load(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*json.loads(args.child))
        return
    batches = [32, 1, 7, 16, 31, 64]
    with tempfile.TemporaryDirectory() as folder:
        fp32 = _run("builtin:efficientnet-lite0", 0, batches, args.images, folder)
        one_thread = _run("builtin:efficientnet-lite0", 1, [32], args.images, folder)
        bf16 = _run("builtin:efficientnet-lite0-bf16", 0, [32], args.images, folder)
    ref = fp32["b32"]
    rows = [(f"batch {b} vs batch 32", _distance(ref, fp32[f"b{b}"])) for b in batches[1:]]
    rows.append(
        ("position in the batch shifted by 5", _distance(ref[5 : 5 + len(fp32["shifted"])], fp32["shifted"]))
    )
    rows.append(("1 intra-op thread vs the default", _distance(ref, one_thread["b32"])))
    rows.append(("bfloat16 variant vs float32 (another code path)", _distance(ref, bf16["b32"])))
    print(f"# the same {args.images} Holidays photos embedded twice, builtin efficientnet-lite0")
    print("| compared | max 1 - cosine | max abs difference |\n|---|---:|---:|")
    for name, (cosine, absolute) in rows:
        print(f"| {name} | {cosine:.2e} | {absolute:.2e} |")


if __name__ == "__main__":
    main()
