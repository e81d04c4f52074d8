"""Sharded index build on Beam against one index, side by side, same table.

Data: the build_memory table (N x D clustered synthetic unit vectors under benchmarks/out/).
Variants, each built in a fresh process:
  single      the unsharded index stage of `imgindex build` (pipelines.build.build_indexes)
  shards=1    pipelines.build_shards on the DirectRunner's multi_processing mode, 2 workers
  shards=S    the same with S shards (default 2)
Reported: build wall seconds (process start to index written, so Beam start-up counts),
peak RSS summed over the process tree and of the largest single process, then recall@10
against exact search and QPS (one thread, single queries and one batch) of each built
index on 1,000 held-out queries (table rows plus Gaussian noise), medians of rounds.
"""

import argparse
import json
import os
import shutil

import numpy as np

from benchmarks.build_memory import make_table
from benchmarks.common import environment, median_rate, run_child_rss

MODULE = "benchmarks.sharded_build"


def child(run_dir: str, variant: str, out_dir: str) -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import build, build_options, build_shards

    index_dir = os.path.join(run_dir, "index", "synthetic")
    shutil.rmtree(index_dir, ignore_errors=True)
    if variant == "single":
        opts = build_options.BuildOptions(flags=["--output=unused"]).view_as(build_options.BuildOptions)
        build.build_indexes(run_dir, {"embedders": {"synthetic": {}}}, opts)
    else:
        shards = int(variant.split("=")[1])
        options = PipelineOptions(flags=["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
        build_shards.build_sharded(
            options,
            run_dir,
            "synthetic",
            num_shards=shards,
            max_shard_vectors=None,
            distance="cosine",
            k=10,
            target_recall=0.95,
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.move(index_dir, out_dir)


def measure(index_dir: str, x: np.ndarray, rounds: int) -> dict:
    from retrieval import exact, metrics, sharded

    rng = np.random.default_rng(7)
    queries = x[rng.choice(len(x), 1000, replace=False)]
    queries = queries + 0.05 * rng.standard_normal(queries.shape).astype(np.float32)
    truth, _ = exact.exact_search(queries, x, 10, "cosine")
    index = sharded.open_index(index_dir, verify=False)
    got, _ = index.search_batch(queries, k=10)
    recall = metrics.recall_at_k([[int(i[1:]) for i in row] for row in got], truth, 10)
    single = median_rate(lambda: [index.search(q, k=10) for q in queries], len(queries), rounds, 1)
    batched = median_rate(lambda: index.search_batch(queries, k=10), len(queries), rounds, 1)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(index_dir) for f in fs)
    return {
        "recall": recall,
        "single_qps": single,
        "batched_qps": batched,
        "index_mb": size / 2**20,
        "build_recall": index.manifest.recall["value"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="build rounds (interleaved) and search rounds")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_dir = make_table(args.n, args.d)
    variants = ["single", "shards=1", f"shards={args.shards}"]
    builds = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            out_dir = os.path.join(run_dir, f"built-{variant.replace('=', '')}")
            wall, tree, largest, _ = run_child_rss(MODULE, ["--child", run_dir, variant, out_dir])
            builds[variant].append((wall, tree, largest))
    from retrieval import tables

    x = tables.read_embeddings(os.path.join(run_dir, "embeddings", "synthetic")).vectors
    matrix_mb = x.nbytes / 2**20
    print(
        f"# python -m benchmarks.sharded_build --n {args.n} --d {args.d} --shards {args.shards} "
        f"--rounds {args.rounds}"
    )
    print(
        f"# {environment()}; matrix {matrix_mb:.0f} MB; build figures are medians of {args.rounds} "
        "interleaved rounds, each build in a fresh process"
    )
    print(
        "| variant | build s | vs single | peak RSS tree MB | largest process MB (x matrix) | recall@10 | "
        "single QPS | batched QPS | index MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    base = np.median([b[0] for b in builds["single"]])
    for variant in variants:
        wall, tree, largest = (float(np.median(column)) for column in zip(*builds[variant]))
        m = measure(os.path.join(run_dir, f"built-{variant.replace('=', '')}"), x, args.rounds)
        results[variant] = {"build_s": wall, "tree_mb": tree, "largest_mb": largest, **m}
        print(
            f"| {variant} | {wall:.1f} | {base / wall:.2f}x | {tree:.0f} | {largest:.0f} ({largest / matrix_mb:.2f}x) | "
            f"{m['recall']:.3f} | {m['single_qps']:.0f} | {m['batched_qps']:.0f} | {m['index_mb']:.0f} |"
        )
    with open(os.path.join(run_dir, "sharded-build.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
