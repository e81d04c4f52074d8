"""ScaNN tree-AH build settings tried against each other on a peer-benchmark data set (exploration).

    python -m benchmarks.config_variants PREFIX '{"sample": 50000}'

PREFIX names the .npy files of benchmarks/peer_data.py (e.g. benchmarks/out/peers/scale200000,
made by `python -m benchmarks.peer_data --dataset scale --scale_n 200000`).  The variant (JSON)
sets: num_leaves (default sqrt(n)), sample (partitioner training sample, default min(n, 250k)),
ah_sample (AH training sample, default = sample), random_init, iters (k-means iterations),
quantize_centroids, spherical (spherical k-means partitioning), avq (the partitioner's
anisotropic centroid update, ScaNN's `avq` eta), soar (SOAR lambda), dpb (AH dims per block), aniso (AH anisotropic
threshold, default 0.2; NaN turns it off), reorder_q (BFLOAT16 / INT8);
autopilot: true builds ScaNN's autopilot instead (the other keys are then ignored).
Builds once, then for a grid of leaves_to_search x reorder depth measures recall@10 against the
ground truth and QPS with one thread (single queries one call each; one batched call), one
round; prints the build seconds and the best QPS reaching recall 0.90 / 0.95 / 0.99.  Used to
pick retrieval.index's training-sample defaults; single rounds, so only large gaps count.
"""

import json
import os
import sys
import time

import numpy as np


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from benchmarks.peer_scann import num_leaves_of
    from retrieval.scann_import import import_scann_pybind

    prefix, variant = argv[0], json.loads(argv[1] if len(argv) > 1 else "{}")
    base, queries, truth = (np.load(f"{prefix}_{part}.npy") for part in ("base", "queries", "truth"))
    n = base.shape[0]
    scann = import_scann_pybind()
    leaves = variant.get("num_leaves", round(n**0.5))
    sample = variant.get("sample", min(n, 250_000))
    start = time.perf_counter()
    if variant.get("autopilot"):
        searcher = scann.builder(base, 10, "dot_product").autopilot().build()
        leaves = num_leaves_of(searcher.config())
    else:
        searcher = _build(scann, base, leaves, sample, variant)
    build_s = time.perf_counter() - start
    best = {}
    for lv in sorted({1, 2, 3, 4, 6, 8, 11, 16, 22, 32, 45, 64, 90, 128} & set(range(1, leaves + 1))):
        for reorder in (10, 20, 30, 50, 80, 120, 200, 300, 450, 650):
            rows, _ = searcher.search_batched(queries, leaves_to_search=lv, pre_reorder_num_neighbors=reorder)
            recall = np.mean([len(set(r[:10]) & set(t[:10])) / 10 for r, t in zip(rows, truth)])
            if recall < 0.85:
                continue
            t0 = time.perf_counter()
            for q in queries:
                searcher.search(q, leaves_to_search=lv, pre_reorder_num_neighbors=reorder)
            single = len(queries) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            searcher.search_batched(queries, leaves_to_search=lv, pre_reorder_num_neighbors=reorder)
            batched = len(queries) / (time.perf_counter() - t0)
            for target in (0.9, 0.95, 0.99):
                if recall >= target:
                    old = best.get(str(target), [0, 0, ""])
                    best[str(target)] = [
                        max(old[0], round(single)),
                        max(old[1], round(batched)),
                        f"L{lv}/R{reorder}" if single > old[0] else old[2],
                    ]
    print(json.dumps({"variant": variant, "leaves": leaves, "build_s": round(build_s, 1), "best": best}))


def _build(scann, base, leaves, sample, variant):
    builder = scann.builder(base, 10, "dot_product").tree(
        num_leaves=leaves,
        num_leaves_to_search=10,
        training_sample_size=sample,
        random_init=variant.get("random_init", False),
        training_iterations=variant.get("iters", 12),
        quantize_centroids=variant.get("quantize_centroids", False),
        soar_lambda=variant.get("soar"),
        spherical=variant.get("spherical", False),
        avq=variant.get("avq"),
    )
    builder = builder.score_ah(
        variant.get("dpb", 2),
        anisotropic_quantization_threshold=variant.get("aniso", 0.2),
        training_sample_size=variant.get("ah_sample", sample),
    )
    if variant.get("reorder_q"):
        from scann.scann_ops.py.scann_builder import ReorderType

        builder = builder.reorder(100, quantize=getattr(ReorderType, variant["reorder_q"]))
    else:
        builder = builder.reorder(100)
    searcher = builder.build()
    return searcher


if __name__ == "__main__":
    main()
