"""Does the recall a build records hold for outside queries?  Leave-self-out vs held-out tuning.

    python -m benchmarks.tuning_queries [--data benchmarks/out/peers/scale]

On a peer-benchmark data set (benchmarks/peer_data.py: base, held-out queries, exact truth)
the index is built twice from the same rows, one build after the other in this process:
with the default leave-self-out probe, and with `tuning_queries` = the even-numbered
held-out queries.  Each build's tuned defaults are then evaluated on the odd-numbered
queries (never seen by either build): recall@10 against the exact truth, and single-query
QPS through `Index.search`.
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import environment


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default="benchmarks/out/peers/scale",
        help="path prefix of <prefix>_base.npy, _queries.npy, _truth.npy",
    )
    args = parser.parse_args(argv)
    from retrieval import index
    from retrieval.metrics import recall_at_k

    base = np.load(f"{args.data}_base.npy", mmap_mode="r")
    queries, truth = np.load(f"{args.data}_queries.npy"), np.load(f"{args.data}_truth.npy")
    ids = [str(i) for i in range(len(base))]
    evaluation, evaluation_truth = queries[1::2], truth[1::2, :10]
    print(
        f"# {args.data}: n={len(base)} d={base.shape[1]}, {len(queries[0::2])} tuning / "
        f"{len(evaluation)} evaluation queries; {environment()}"
    )
    for label, tuning in (
        ("leave-self-out (default)", None),
        ("tuning_queries=queries[0::2]", queries[0::2]),
    ):
        start = time.perf_counter()
        built = index.build_index(
            base,
            ids,
            distance="cosine",
            k=10,
            target_recall=0.95,
            tuning_queries=tuning,
            work_dir=os.path.dirname(os.path.abspath(args.data)),
        )
        build_s = time.perf_counter() - start
        found, _ = built.search_batch(evaluation)
        recall = recall_at_k([[int(i) for i in row] for row in found], evaluation_truth, 10)
        start = time.perf_counter()
        for q in evaluation:
            built.search(q)
        qps = len(evaluation) / (time.perf_counter() - start)
        print(
            json.dumps(
                {
                    "probe": label,
                    "build_s": round(build_s, 1),
                    "defaults": built.search_defaults,
                    "recorded_recall": built.manifest.recall["value"],
                    "recall_on_evaluation_queries": round(recall, 4),
                    "single_qps_at_defaults": round(qps),
                }
            ),
            flush=True,
        )
        del built


if __name__ == "__main__":
    main()
