"""One nearest-neighbour method on one data set, in its own process (a child of benchmarks/peers.py).

    python -m benchmarks.peer_methods --method NAME --data PREFIX [--rounds 3]

reads PREFIX_base.npy, PREFIX_queries.npy, PREFIX_truth.npy (benchmarks/peer_data.py), builds the
method's index over the base (both cores allowed), writes it to a scratch directory with the
library's own save to measure its size on disk (then deletes it), and measures every point of
the method's parameter sweep with ONE search thread.  Prints one JSON object on the last line.

Methods (all cosine = inner product on the L2-normalised vectors, k = 10):
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
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

K = 10
BUILD_THREADS = 2
SINGLE_BUDGET = 2e10  # multiply-adds one exact single-query loop may cost (n * d per query)
HNSW_EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
IVF_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
IVFPQ_NPROBES = (4, 8, 16, 32, 64, 128, 256)
IVFPQ_K_FACTORS = (2, 4, 8, 16, 32, 64)
# ScaNN grids (imgindex and autopilot alike): leaves_to_search = 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
# up to a quarter of the leaves, plus the searcher's default x these factors;
# pre_reorder_num_neighbors = these depths plus the default x these factors.
SCANN_LEAF_FACTORS = (0.5, 0.75, 1, 1.5, 2)
SCANN_REORDERS = (20, 50, 100, 200, 400, 800, 1600)
SCANN_REORDER_FACTORS = (0.5, 1, 2)
IVF_TRAINING_SAMPLE = 256_000
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


def ladder(values, lo: int, hi: int) -> list[int]:
    return sorted({min(hi, max(lo, int(round(v)))) for v in values})


# ---------------------------------------------------------------------------------------------
# Methods.  Each: build(base) in __init__ (timed by the caller), save(directory), points()
# -> list of parameter dicts, single(q, params) -> ids of one query, batch(queries, params)
# -> (q, k) ids.  `single_input` shapes one query as the library's single-query call wants it.


class Method:
    single_limit = None  # max queries in the single-query loop (None: all)

    def single_input(self, q):
        return q

    def set_search_threads(self):
        pass

    def config(self) -> dict:
        return {}


class _ScannBase(Method):
    """Raw pybind ScannNumpy calls: search(q, k, pre_reorder, leaves), search_batched(..., False, 0)."""

    def _init_knobs(self, searcher, leaves, reorder):
        self.raw = searcher.searcher if hasattr(searcher, "searcher") else searcher
        self.n = searcher.size()
        self.num_leaves, self.leaves, self.reorder = num_leaves_of(searcher.config()), leaves, reorder

    def points(self):
        if not self.num_leaves:
            return [{}]
        steps = [m * 2**i for i in range(32) for m in (1, 3) if m * 2**i <= max(1, self.num_leaves // 4)]
        leaves = ladder(steps + [self.leaves * f for f in SCANN_LEAF_FACTORS], 1, self.num_leaves)
        reorders = ladder(list(SCANN_REORDERS) + [self.reorder * f for f in SCANN_REORDER_FACTORS], K, self.n)
        return [{"leaves_to_search": lv, "pre_reorder_num_neighbors": r} for lv in leaves for r in reorders]

    def single(self, q, p):
        rows, _ = self.raw.search(q, K, p.get("pre_reorder_num_neighbors", -1), p.get("leaves_to_search", -1))
        return rows

    def batch(self, queries, p):
        rows, scores = self.raw.search_batched(
            queries, K, p.get("pre_reorder_num_neighbors", -1), p.get("leaves_to_search", -1), False, 0
        )
        rows = np.asarray(rows, np.int64)
        rows[np.isnan(scores)] = -1  # ScaNN pads missing neighbours with row 0 and a NaN score
        return rows


def num_leaves_of(config_text: str) -> int | None:
    """num_children of a ScaNN tree config (None: no partitioning, i.e. brute force)."""
    value = _config_int(config_text, "num_children")
    return value if "partitioning" in config_text else None


def _config_int(config_text: str, key: str) -> int | None:
    for line in config_text.splitlines():
        name, _, value = line.strip().partition(":")
        if name == key:
            return int(value.strip())
    return None


class Imgindex(_ScannBase):
    def __init__(self, base, overrides=None):
        from retrieval import index

        config = index.choose_config(*base.shape, "cosine", k=K, **overrides) if overrides else None
        self.index = index.build_index(
            base,
            [str(i) for i in range(len(base))],
            distance="cosine",
            k=K,
            config=config,
            target_recall=0.95,
            work_dir=os.path.dirname(os.path.abspath(base.filename)),
        )
        defaults = self.index.search_defaults
        self._init_knobs(
            self.index._searcher, defaults.get("leaves_to_search"), defaults.get("pre_reorder_num_neighbors")
        )
        if self.index.method != "tree_ah":
            self.num_leaves = None

    def config(self):
        m = self.index.manifest
        return {
            "index_config": m.index_config,
            "search_defaults": m.search_defaults,
            "build_recall": {k: v for k, v in m.recall.items() if k != "tuning"},
            "tuning_trials": len(m.recall.get("tuning", [])),
        }

    def save(self, directory):
        self.index.save(os.path.join(directory, "index"))

    def points(self):
        tuned = {k: v for k, v in self.index.search_defaults.items() if k != "k"}
        return super().points() + [{**tuned, "api": "Index.search/search_batch"}]

    def single(self, q, p):
        if "api" in p:
            ids, _ = self.index.search(q, k=K)
            return [int(i) for i in ids]
        return super().single(q, p)

    def batch(self, queries, p):
        if "api" in p:
            ids, _ = self.index.search_batch(queries, k=K)
            return [[int(i) for i in row] for row in ids]
        return super().batch(queries, p)


class ScannAutopilot(_ScannBase):
    def __init__(self, base):
        from retrieval.scann_import import import_scann_pybind

        scann = import_scann_pybind()
        self.searcher = scann.builder(base, K, "dot_product").autopilot().build()
        text = self.searcher.config()
        self._init_knobs(
            self.searcher, _config_int(text, "max_spill_centers"), _config_int(text, "approx_num_neighbors")
        )

    def config(self):
        text = self.searcher.config()
        return {
            "num_leaves": self.num_leaves,
            "leaves_to_search": self.leaves,
            "pre_reorder_num_neighbors": self.reorder,
            "scann_config": text,
        }

    def save(self, directory):
        self.searcher.serialize(directory, relative_path=True)


class FaissMethod(Method):
    def __init__(self, base, kind):
        import faiss

        self.faiss = faiss
        faiss.omp_set_num_threads(BUILD_THREADS)
        n, d = base.shape
        self.kind = kind
        if kind == "hnsw32":
            self.index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 200
        else:
            self.nlist = max(1, int(round(4 * math.sqrt(n))))
            desc = f"IVF{self.nlist},Flat" if kind == "ivf-flat" else f"IVF{self.nlist},PQ{d // 2}x4fs,RFlat"
            self.index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(self.index)
            ivf.cp.max_points_per_centroid = max(39, IVF_TRAINING_SAMPLE // self.nlist)
            self.index.train(base)
        self.index.add(base)
        self.params = faiss.ParameterSpace()

    def config(self):
        if self.kind == "hnsw32":
            return {"factory": "HNSW32,Flat", "efConstruction": 200}
        cp = self.faiss.extract_index_ivf(self.index).cp
        return {
            "nlist": self.nlist,
            "training_sample": min(self.nlist * cp.max_points_per_centroid, self.index.ntotal),
        }

    def set_search_threads(self):
        self.faiss.omp_set_num_threads(1)

    def save(self, directory):
        self.faiss.write_index(self.index, os.path.join(directory, "index.faiss"))

    def points(self):
        if self.kind == "hnsw32":
            return [{"efSearch": ef} for ef in HNSW_EFS]
        if self.kind == "ivf-flat":
            return [{"nprobe": p} for p in ladder(IVF_NPROBES, 1, self.nlist)]
        return [
            {"nprobe": p, "k_factor": kf}
            for p in ladder(IVFPQ_NPROBES, 1, self.nlist)
            for kf in IVFPQ_K_FACTORS
        ]

    def _apply(self, p):
        for name, value in p.items():
            if name == "k_factor":  # IndexRefineFlat's; ParameterSpace knows it as k_factor_rf
                self.faiss.downcast_index(self.index).k_factor = value
            else:
                self.params.set_index_parameter(self.index, name, value)

    def single_input(self, q):
        return q[None, :]

    def single(self, q, p):
        return self.index.search(q, K)[1][0]

    def batch(self, queries, p):
        return self.index.search(queries, K)[1]


class Hnswlib(Method):
    def __init__(self, base, m):
        import hnswlib

        self.m = m
        self.index = hnswlib.Index(space="ip", dim=base.shape[1])
        self.index.init_index(max_elements=len(base), ef_construction=200, M=m, random_seed=100)
        self.index.add_items(base, np.arange(len(base)), num_threads=BUILD_THREADS)

    def config(self):
        return {"M": self.m, "ef_construction": 200}

    def set_search_threads(self):
        self.index.set_num_threads(1)

    def save(self, directory):
        self.index.save_index(os.path.join(directory, "index.bin"))

    def points(self):
        return [{"ef": ef} for ef in HNSW_EFS]

    def _apply(self, p):
        self.index.set_ef(max(p["ef"], K))

    def single(self, q, p):
        return self.index.knn_query(q, k=K)[0][0]

    def batch(self, queries, p):
        return self.index.knn_query(queries, k=K)[0]


class Exact(Method):
    def __init__(self, base):
        self.base = base
        self.single_limit = int(min(1e9, max(50, SINGLE_BUDGET // base.size)))
        # NumPy batched: query blocks of at most 2^24 scores (64 MiB) at a time.
        self.block = max(1, (1 << 24) // len(base))

    def config(self):
        return {"single_queries": self.single_limit, "numpy_query_block": self.block}

    def save(self, directory):
        np.save(os.path.join(directory, "base.npy"), self.base)

    def points(self):
        return [{"impl": "retrieval.exact"}, {"impl": "numpy"}]

    def single(self, q, p):
        if p["impl"] == "numpy":
            scores = self.base @ q
            top = np.argpartition(-scores, K)[:K]
            return top[np.argsort(-scores[top])]
        from retrieval.exact import exact_search

        return exact_search(q[None, :], self.base, K, "dot_product")[0][0]

    def batch(self, queries, p):
        if p["impl"] == "numpy":
            out = np.empty((len(queries), K), np.int64)
            for s in range(0, len(queries), self.block):
                scores = queries[s : s + self.block] @ self.base.T
                top = np.argpartition(-scores, K, axis=1)[:, :K]
                order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
                out[s : s + self.block] = np.take_along_axis(top, order, axis=1)
            return out
        from retrieval.exact import exact_search

        return exact_search(queries, self.base, K, "dot_product")[0]


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
