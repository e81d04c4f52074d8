"""One nearest-neighbour method on one data set, in its own process (a child of benchmarks/peers.py).

    python -m benchmarks.peer_methods --method NAME --data PREFIX [--rounds 3]

reads PREFIX_base.npy, PREFIX_queries.npy, PREFIX_truth.npy (benchmarks/peer_data.py), builds the
method's index over the base (both cores allowed), writes it to a scratch directory with the
library's own save to measure its size on disk (then deletes it), and measures every point of
the method's parameter sweep with ONE search thread.  Prints one JSON object on the last line.

Methods (all cosine = inner product on the L2-normalised vectors, k = 10; the ScaNN ones in
benchmarks/peer_scann.py, the others in benchmarks/peer_libraries.py):
  imgindex         retrieval.index.build_index(base, ids, distance="cosine", k=10,
                   target_recall=0.95) with base a memory map: what `imgindex build` configures and tunes
                   by default.  Tree-AH: a leaves_to_search x pre_reorder_num_neighbors grid
                   (leaves 1, 2, 3, 4, 6, 8, 12, ... up to num_leaves / 4 and 0.5-2x the tuned
                   default; reorder 20, 50, 100, 200, 400 and 0.5-2x the tuned default);
                   brute force (n * d < 1,000,000): one point.  Timed on the raw ScaNN pybind
                   searcher, like scann-autopilot; the tuned defaults are also timed through
                   Index.search / Index.search_batch
                   (points with "api", reported separately: search_batch is ScaNN's
                   search_batched_parallel and may use more than one thread).
  scann-autopilot  scann.builder(base, 10, "dot_product").autopilot().build() (pybind, no
                   TensorFlow); for a tree config the same kind of grid around its defaults
                   (max_spill_centers, approx_num_neighbors of its config).
  faiss-hnsw32     IndexHNSWFlat(d, 32, inner product), efConstruction 200; efSearch sweep.
  faiss-ivf-flat   IVF{4 sqrt(n)},Flat, inner product; nprobe sweep.
  faiss-ivf-pq     IVF{4 sqrt(n)},PQ{d/2}x4fs,RFlat (4-bit PQ fast scan over 2-dim
                   sub-spaces, as ScaNN's AH, plus exact float re-ranking); nprobe x k_factor.
  hnswlib-m16/-m32 hnswlib space "ip", M 16/32, ef_construction 200; ef sweep.
  exact            retrieval.exact.exact_search and plain NumPy (dot product + argpartition),
                   single-threaded BLAS.

faiss k-means (both IVF methods) trains on a sample of at most 256k points
(max_points_per_centroid = 256000 // nlist), like imgindex's 250k training sample.

Measurements, for every sweep point: recall@10 of the single-query results and of the batched
results against the exact top-10; single-query QPS (the queries one call each, one thread);
batched QPS (all queries in one call, one thread).  Rounds are interleaved (round 1: every
point, round 2: every point, ...) and medians over rounds are reported.  Each timing also
records CPU time / wall time, which stays ~1.0 when the search is really single-threaded.
For exact search the single-query loop uses the first SINGLE_BUDGET / (n d) queries (at
least 50, at most all) to keep its time bounded.

Memory: rss_loaded_mb is the process's peak RSS (getrusage ru_maxrss) after loading the data
(the float32 base matrix is in memory for every method but imgindex, which is given a
read-only memory map of the .npy file and streams it, as `imgindex build` streams its matrix
from a file); rss_build_mb the peak after building the index.  The parent also
samples the whole process's peak RSS (benchmarks.common.run_child).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.peer_base import BUILD_THREADS, K, Method
from benchmarks.peer_libraries import Exact, FaissMethod, Hnswlib
from benchmarks.peer_scann import Imgindex, ScannAutopilot

METHODS = (
    "imgindex",
    "scann-autopilot",
    "faiss-hnsw32",
    "faiss-ivf-flat",
    "faiss-ivf-pq",
    "hnswlib-m16",
    "hnswlib-m32",
    "exact",
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def numpy_blas_threads(n: int) -> None:
    """Sets NumPy's OpenBLAS thread count (found among the loaded libraries) without threadpoolctl."""
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            if hasattr(lib, name):
                getattr(lib, name)(n)
                break


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def make(method: str, base: np.ndarray, overrides=None) -> Method:
    if method == "imgindex":
        return Imgindex(base, overrides)
    if method == "scann-autopilot":
        return ScannAutopilot(base)
    if method.startswith("faiss-"):
        return FaissMethod(base, method[len("faiss-") :])
    if method.startswith("hnswlib-m"):
        return Hnswlib(base, int(method[len("hnswlib-m") :]))
    if method == "exact":
        return Exact(base)
    raise SystemExit(f"unknown method {method!r}; one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------


def recall(rows, truth) -> float:
    from retrieval.metrics import recall_at_k

    return recall_at_k([np.asarray(r, np.int64).tolist() for r in rows], truth.tolist(), K)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return out, wall, cpu


def run(method: str, data: str, rounds: int, overrides=None) -> dict:
    # imgindex streams its matrix from a file, as `imgindex build` does (retrieval.scann_assets);
    # every other method needs the matrix in memory to add it.
    base = np.load(data + "_base.npy", mmap_mode="r" if method == "imgindex" else None)
    queries = np.ascontiguousarray(np.load(data + "_queries.npy"), dtype=np.float32)
    truth = np.load(data + "_truth.npy")
    n_base = base.shape[0]
    rss_loaded = rss_mb()
    numpy_blas_threads(BUILD_THREADS)

    start, cpu = time.perf_counter(), time.process_time()
    m = make(method, base, overrides)
    build_s, build_cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_build = rss_mb()

    scratch = tempfile.mkdtemp(prefix=f"scratch-{method}-", dir=os.path.dirname(os.path.abspath(data)))
    try:
        start = time.perf_counter()
        m.save(scratch)
        save_s = time.perf_counter() - start
        index_bytes = dir_bytes(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if method != "exact":
        del base  # the indexes hold their own copies; exact search needs the matrix itself
    m.set_search_threads()
    numpy_blas_threads(1)
    points = m.points()
    n_single = min(len(queries), m.single_limit or len(queries))
    singles = [m.single_input(queries[i]) for i in range(n_single)]
    results = [
        {"params": p, "single_qps": [], "batched_qps": [], "single_cpu": [], "batched_cpu": []}
        for p in points
    ]

    def prepare(p):
        if hasattr(m, "_apply"):
            m._apply({k: v for k, v in p.items() if k != "api"})

    prepare(points[0])
    for q in singles[: min(50, n_single)]:  # warm-up
        m.single(q, points[0])
    for r in range(rounds):
        for p, res in zip(points, results):
            prepare(p)
            got, wall, cpu = _timed(lambda p=p: [m.single(q, p) for q in singles])
            res["single_qps"].append(n_single / wall)
            res["single_cpu"].append(cpu / wall)
            if r == 0:
                res["recall"] = recall(got, truth[:n_single])
            got, wall, cpu = _timed(lambda p=p: m.batch(queries, p))
            res["batched_qps"].append(len(queries) / wall)
            res["batched_cpu"].append(cpu / wall)
            if r == 0:
                res["recall_batched"] = recall(got, truth)
    for res in results:
        for key in ("single_qps", "batched_qps", "single_cpu", "batched_cpu"):
            res[key + "_rounds"] = [round(v, 3) for v in res[key]]
            res[key] = round(statistics.median(res[key]), 3)
    return {
        "method": method,
        "data": os.path.basename(data),
        "n": int(n_base),
        "d": int(queries.shape[1]),
        "queries": int(queries.shape[0]),
        "single_queries": n_single,
        "k": K,
        "rounds": rounds,
        "build_s": round(build_s, 3),
        "build_cpu_s": round(build_cpu, 3),
        "save_s": round(save_s, 3),
        "index_bytes": index_bytes,
        "rss_loaded_mb": round(rss_loaded, 1),
        "rss_build_mb": round(rss_build, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "config": m.config(),
        "points": results,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument(
        "--data", required=True, help="path prefix of <prefix>_base.npy, _queries.npy, _truth.npy"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--imgindex_config",
        type=json.loads,
        default=None,
        help="experiments: JSON IndexConfig overrides for the imgindex method (choose_config)",
    )
    args = parser.parse_args(argv)
    result = run(args.method, args.data, args.rounds, args.imgindex_config)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
