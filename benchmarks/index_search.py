"""Default imgindex ScaNN index against exact NumPy search, side by side, same data.

Data: clustered Gaussian vectors (n x d, 1,000 clusters, L2-normalised), queries made the
same way from held-out points.  Reports build seconds, recall@10 against exact, and QPS
single-query (one at a time) and batched, as medians of rounds, with ratios to exact.
"""

import argparse
import time

from benchmarks.common import clustered, environment, median_rate, peak_rss_mb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from retrieval import exact, index, metrics

    data = clustered(args.n + args.queries, args.d, clusters=1000, seed=0, noise=0.35, chunk=None)
    x, queries = data[: args.n], data[args.n :]
    ids = [str(i) for i in range(args.n)]
    start = time.perf_counter()
    built = index.build_index(x, ids, distance="cosine")
    build_s = time.perf_counter() - start
    truth, _ = exact.exact_search(queries, x, 10, "dot_product")
    got, _ = built.search_batch(queries, k=10)
    recall = metrics.recall_at_k([[int(i) for i in row] for row in got], truth, 10)

    single_q = queries[:200]
    scann_single = median_rate(
        lambda: [built.search(q, k=10) for q in single_q], len(single_q), args.rounds, 1
    )
    scann_batch = median_rate(lambda: built.search_batch(queries, k=10), len(queries), args.rounds, 1)
    exact_single = median_rate(
        lambda: [exact.exact_search(q[None], x, 10, "dot_product") for q in single_q[:20]], 20, args.rounds, 1
    )
    exact_batch = median_rate(
        lambda: exact.exact_search(queries, x, 10, "dot_product"), len(queries), args.rounds, 1
    )
    print(f"# index search: n={args.n} d={args.d} cosine, {len(queries)} held-out queries, {environment()}")
    print(
        f"# default config: {built.manifest.index_config['method']}, search defaults "
        f"{built.search_defaults}, build {build_s:.1f}s, peak RSS {peak_rss_mb():.0f} MB"
    )
    print("| method | recall@10 | single-query QPS | batched QPS |\n|---|---:|---:|---:|")
    print(f"| exact NumPy (baseline) | 1.000 | {exact_single:.0f} | {exact_batch:.0f} |")
    print(
        f"| imgindex default ScaNN | {recall:.3f} | {scann_single:.0f} ({scann_single / exact_single:.0f}x) "
        f"| {scann_batch:.0f} ({scann_batch / exact_batch:.0f}x) |"
    )


if __name__ == "__main__":
    main()
