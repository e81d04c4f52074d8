"""The ScaNN methods of benchmarks/peer_methods.py: `imgindex` (retrieval.index.build_index, what
`imgindex build` configures and tunes) and `scann-autopilot` (ScaNN's own autopilot), both timed
on the raw pybind searcher over a leaves_to_search x pre_reorder_num_neighbors grid."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.peer_base import K, Method, ladder

# ScaNN grids (imgindex and autopilot alike): leaves_to_search = 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
# up to a quarter of the leaves, plus the searcher's default x these factors;
# pre_reorder_num_neighbors = these depths plus the default x these factors.
SCANN_LEAF_FACTORS = (0.5, 0.75, 1, 1.5, 2)
SCANN_REORDERS = (20, 50, 100, 200, 400, 800, 1600)
SCANN_REORDER_FACTORS = (0.5, 1, 2)


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
        tuned = {k: v for k, v in self.index.search_defaults.items() if k not in ("k", "max_k")}
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
