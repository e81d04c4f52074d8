"""The other methods of benchmarks/peer_methods.py: faiss (HNSW32, IVF-Flat, IVF-PQ fast scan with
exact re-ranking), hnswlib (M 16 / 32) and exact search (retrieval.exact and plain NumPy)."""

from __future__ import annotations

import math
import os

import numpy as np

from benchmarks.peer_base import BUILD_THREADS, K, Method, ladder

SINGLE_BUDGET = 2e10  # multiply-adds one exact single-query loop may cost (n * d per query)
HNSW_EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
IVF_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
IVFPQ_NPROBES = (4, 8, 16, 32, 64, 128, 256)
IVFPQ_K_FACTORS = (2, 4, 8, 16, 32, 64)
IVF_TRAINING_SAMPLE = 256_000


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
