"""Data for the peer benchmark (benchmarks/peers.py): real embeddings and a 1M-point set made from them.

Everything is written under benchmarks/out/peers/ as .npy files; a file that already exists is
not made again (delete it to rebuild).  All vectors are float32 and L2-normalised, so cosine
similarity is the dot product.

real (real_base.npy 9,056 x 1280, real_queries.npy 1,000 x 1280)
  The 10,000 CIFAR-10 test images (../shared/data/cifar10-test/<class>/NNNN.jpg) and the 56
  UKBench photos (../shared/data/ukbench56/images/*.jpg), sorted by path, embedded the way
  `imgindex embed` does with its default spec for `builtin:efficientnet-lite0`
  (`embedders.parse_embedder_arg` + `complete_spec`: 224 px, resize "pad", L2 normalisation):
  `imaging.decode(bytes, min_size=224)`, `imaging.resize(image, 224, "pad")`,
  `embedders.embed_batch` in batches of 32.  1,000 rows chosen with
  numpy.random.default_rng(0).choice(10056, 1000, replace=False) are the queries (in that
  order), the other 9,056 (in path order) the database.  real_ids.json lists the paths of
  both, in row order.

scale (scale_base.npy N x 256, N = --scale_n, default 1,000,000; scale_queries.npy 1,000 x 256)
  1. PCA to 256 dims fitted on the 9,056 real database points
     (`retrieval.projection.fit_pca(real_base, 256)`: mean removed, top-256 axes, no
     whitening); all 10,056 real points are projected with `projection.project`, which
     re-normalises every row to unit length.
  2. r_i = Euclidean distance from projected database point i to its exact nearest other
     projected database point; for each projected held-out (query) point, r_q = its exact
     nearest-neighbour distance among the projected database points.
  3. Database point j (j = 0..N-1) = projected real database point c = j mod 9056 (round
     robin) + Gaussian noise with per-dimension sigma = 0.3 * r_c / sqrt(256) (so the noise
     norm is about 0.3 * r_c: E|noise|^2 = (0.3 r_c)^2), then L2-normalised.  The noise is
     drawn in float32 from numpy.random.default_rng(1), in chunks of 65,536 rows, written
     straight into the output file (no float64 copy of the whole matrix ever exists).
  4. Query q (q = 0..999) = projected held-out real point q + Gaussian noise with
     sigma = 0.3 * r_q / sqrt(256), L2-normalised; noise from numpy.random.default_rng(2).
  So every real database point has ~N/9056 noisy copies (110-111 at N = 1M), spread over
  30% of the distance to its nearest real neighbour, and queries are noisy copies of real
  points that are not in the database.  With N != 1,000,000 the files are named
  scale<N>_*.npy.

truth (<set>_truth.npy, int64 1,000 x 10)
  Exact top-10 database rows of every query by dot product (= cosine), computed with
  `retrieval.exact.exact_search` (ties to the lower row).

Usage: python -m benchmarks.peer_data [--dataset real|scale|both] [--scale_n N]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out", "peers")
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
CIFAR = os.path.join(SHARED, "cifar10-test")
UKBENCH = os.path.join(SHARED, "ukbench56", "images")
HANDLE = "builtin:efficientnet-lite0"
BATCH = 32
N_QUERIES = 1000
SCALE_DIM = 256
SCALE_N = 1_000_000
NOISE = 0.3
K = 10
CHUNK = 65_536


def prefix(dataset: str, scale_n: int = SCALE_N) -> str:
    """Path prefix of a data set's files: <prefix>_base.npy, _queries.npy, _truth.npy."""
    if dataset == "real":
        return os.path.join(OUT, "real")
    return os.path.join(OUT, "scale" if scale_n == SCALE_N else f"scale{scale_n}")


def label(dataset: str, scale_n: int = SCALE_N) -> str:
    """Name of a data set in results: real, scale (1M) or scale-<n>."""
    return f"scale-{scale_n}" if dataset == "scale" and scale_n != SCALE_N else dataset


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def image_paths() -> list[str]:
    if not (os.path.isdir(CIFAR) and os.path.isdir(UKBENCH)):
        sys.exit(
            f"peer benchmark data needs the CIFAR-10 test images at {CIFAR} and the UKBench "
            f"photos at {UKBENCH} (the project's shared/ data folder beside the repository); "
            "not found"
        )
    paths = sorted(glob.glob(os.path.join(CIFAR, "*", "*.jpg"))) + sorted(
        glob.glob(os.path.join(UKBENCH, "*.jpg"))
    )
    if len(paths) != 10_056:
        sys.exit(
            f"expected 10,000 CIFAR-10 test images and 56 UKBench photos under {SHARED}, found {len(paths)}"
        )
    return paths


def embed_paths(paths: list[str]) -> np.ndarray:
    from retrieval import embedders, imaging

    model, spec = embedders.complete_spec(embedders.parse_embedder_arg(HANDLE))
    out = np.empty((len(paths), spec.dim), np.float32)
    start = time.perf_counter()
    for i in range(0, len(paths), BATCH):
        pixels = []
        for path in paths[i : i + BATCH]:
            with open(path, "rb") as f:
                image = imaging.decode(f.read(), min_size=spec.input_size)
            pixels.append(imaging.resize(image.image, spec.input_size, spec.resizing()))
        out[i : i + BATCH] = embedders.embed_batch(model, spec, np.stack(pixels))
        if i % (BATCH * 50) == 0:
            _log(f"  embedded {i + len(pixels)}/{len(paths)} ({time.perf_counter() - start:.0f} s)")
    _log(
        f"  embedded {len(paths)} images with {spec.handle} (d={spec.dim}) in {time.perf_counter() - start:.0f} s"
    )
    return out


def truth(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    from retrieval.exact import exact_search

    rows, _ = exact_search(queries, base, K, "dot_product")
    return rows


def make_real() -> str:
    p = prefix("real")
    os.makedirs(OUT, exist_ok=True)
    if not os.path.exists(p + "_queries.npy"):
        paths = image_paths()
        _log(f"real: embedding {len(paths)} images (CIFAR-10 test + UKBench56)")
        vectors = embed_paths(paths)
        query_rows = np.random.default_rng(0).choice(len(paths), N_QUERIES, replace=False)
        base_rows = np.setdiff1d(np.arange(len(paths)), query_rows)
        rel = [os.path.relpath(x, SHARED) for x in paths]
        with open(p + "_ids.json", "w") as f:
            json.dump({"base": [rel[i] for i in base_rows], "queries": [rel[i] for i in query_rows]}, f)
        _save(p + "_base.npy", vectors[base_rows])
        _save(p + "_queries.npy", vectors[query_rows])  # written last: marks the set complete
    if not os.path.exists(p + "_truth.npy"):
        _save(p + "_truth.npy", truth(np.load(p + "_queries.npy"), np.load(p + "_base.npy")))
    return p


def _nn_distance(points: np.ndarray, database: np.ndarray, self_rows: np.ndarray | None) -> np.ndarray:
    """Euclidean distance from each row of `points` to its nearest database row (not itself)."""
    from retrieval.exact import exact_search

    rows, _ = exact_search(points, database, 2, "dot_product")
    nearest = rows[:, 0]
    if self_rows is not None:
        nearest = np.where(rows[:, 0] == self_rows, rows[:, 1], rows[:, 0])
    return np.linalg.norm(points - database[nearest], axis=1)


def _noisy(centres: np.ndarray, radii: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = (NOISE * radii / np.sqrt(centres.shape[1])).astype(np.float32)
    block = centres + rng.standard_normal(centres.shape, dtype=np.float32) * sigma[:, None]
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    return block


def make_scale(scale_n: int = SCALE_N) -> str:
    from retrieval import projection

    real = make_real()
    p = prefix("scale", scale_n)
    if not os.path.exists(p + "_queries.npy"):
        real_base, real_queries = np.load(real + "_base.npy"), np.load(real + "_queries.npy")
        start = time.perf_counter()
        pca = projection.fit_pca(real_base, SCALE_DIM)
        base = projection.project(real_base, pca)
        queries = projection.project(real_queries, pca)
        r_base = _nn_distance(base, base, np.arange(len(base)))
        r_queries = _nn_distance(queries, base, None)
        if (r_base <= 0).any():
            _log(
                f"  warning: {(r_base <= 0).sum()} real database points have an exact duplicate (r = 0): "
                "their copies are identical"
            )
        _log(
            f"scale: PCA {real_base.shape[1]} -> {SCALE_DIM}; nearest-neighbour distance median "
            f"{np.median(r_base):.3f} (database), {np.median(r_queries):.3f} (queries)"
        )
        tmp = p + "_base.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(scale_n, SCALE_DIM))
        rng = np.random.default_rng(1)
        for s in range(0, scale_n, CHUNK):
            centre = np.arange(s, min(s + CHUNK, scale_n)) % len(base)
            out[s : s + len(centre)] = _noisy(base[centre], r_base[centre], rng)
        out.flush()
        del out
        os.replace(tmp, p + "_base.npy")
        _save(p + "_queries.npy", _noisy(queries, r_queries, np.random.default_rng(2)))
        _log(f"  wrote {scale_n} x {SCALE_DIM} in {time.perf_counter() - start:.0f} s")
    if not os.path.exists(p + "_truth.npy"):
        start = time.perf_counter()
        _save(p + "_truth.npy", truth(np.load(p + "_queries.npy"), np.load(p + "_base.npy", mmap_mode="r")))
        _log(f"  exact top-{K} of {N_QUERIES} queries in {time.perf_counter() - start:.0f} s")
    return p


def ensure(dataset: str, scale_n: int = SCALE_N) -> str:
    return make_real() if dataset == "real" else make_scale(scale_n)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=("real", "scale", "both"), default="both")
    parser.add_argument("--scale_n", type=int, default=SCALE_N)
    args = parser.parse_args(argv)
    for dataset in ("real", "scale") if args.dataset == "both" else (args.dataset,):
        p = ensure(dataset, args.scale_n)
        print(f"{dataset}: {p}_base.npy {p}_queries.npy {p}_truth.npy")


if __name__ == "__main__":
    main()
