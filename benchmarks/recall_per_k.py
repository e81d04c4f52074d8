"""Recall at every served k (issue 15): knobs tuned at k=10 only vs tuned per k.

    python -m benchmarks.recall_per_k --embeddings DIR      # tables from `imgindex embed`
    python -m benchmarks.recall_per_k --synthetic 20000,64  # benchmarks.common.clustered

Held-out queries (every max(10, n/1000)-th row: about 1,000) are taken out; the rest is
indexed with the defaults (cosine, recall_k 10, target 0.95) and --serve_max_k 1000, so the
build tunes the knobs at k = 10, 100 and 1000.  "before" is that same index with its
manifest as imgindex wrote it before recall per k (no recall.per_k, no max_k): it searches
with the knobs tuned at k=10 at every k, the reorder depth raised to k, which is what an
index built before this change does (the knobs at k=10 are the same: same probe rows, same
tuning).  "after" is the index as built.  For each: recall@10/100/1000 of the held-out
queries against exact search, and single-query latency (`Index.search`, one query at a
time, p50 over the queries; median of --rounds rounds, the two indexes taking turns) at
k = 10, 100 and 1000.  Build time is the median of --builds builds (interleaved) at each
--serve_max_k of 10 (the ladder of the old build: k=10 only), 100 (the default) and 1000.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import clustered, environment

KS = (10, 100, 1000)


def _data(args):
    if args.embeddings:
        from retrieval import tables

        data = tables.read_embeddings(args.embeddings)
        return np.asarray(data.vectors, dtype=np.float32), f"{args.embeddings} (n={len(data.ids)})"
    n, d = (int(v) for v in args.synthetic.split(","))
    return clustered(n, d, seed=0), f"clustered({n}, {d}, clusters=2000, noise=0.5)"


def _as_old(index_dir):
    """The manifest as written before recall per k (the rest of it was the same)."""
    path = os.path.join(index_dir, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    del data["recall"]["per_k"], data["search_defaults"]["max_k"]
    with open(path, "w") as f:
        json.dump(data, f)


def _latency_ms(indexes, queries, k, rounds):
    """{name: p50 ms of one query at k}, median over rounds; the indexes take turns in every
    round, first one then the other first, so that a busy machine slows them alike."""
    p50s: dict = {name: [] for name in indexes}
    for index in indexes.values():  # warm-up: first touches of the index's pages
        for q in queries[:50]:
            index.search(q, k=k)
    for turn in range(rounds):
        names = list(indexes) if turn % 2 == 0 else list(indexes)[::-1]
        for name in names:
            index = indexes[name]
            times = []
            for q in queries:
                start = time.perf_counter()
                index.search(q, k=k)
                times.append(time.perf_counter() - start)
            p50s[name].append(statistics.median(times) * 1000)
    return {name: statistics.median(values) for name, values in p50s.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="Parquet embedding tables (imgindex embed's embeddings/<name>)")
    source.add_argument("--synthetic", help="N,D of benchmarks.common.clustered")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (median)")
    parser.add_argument("--builds", type=int, default=3, help="builds per --serve_max_k (median)")
    args = parser.parse_args(argv)
    from retrieval.exact import exact_search, normalize_rows
    from retrieval.index import build_index, load_index
    from retrieval.metrics import recall_at_k

    x, what = _data(args)
    held = np.zeros(len(x), bool)
    held[:: max(10, len(x) // 1000)] = True
    base, queries = normalize_rows(x[~held]), normalize_rows(x[held])
    ids = [str(i) for i in range(len(base))]
    truth, _ = exact_search(queries, base, max(KS), "dot_product")
    print(
        f"# {what}: {len(base)} indexed x {base.shape[1]}, {len(queries)} held-out queries; {environment()}"
    )

    build_times: dict = {10: [], 100: [], 1000: []}
    for _ in range(args.builds):  # interleaved, so that a busy machine slows each alike
        for serve_max_k, times in build_times.items():
            start = time.perf_counter()
            built = build_index(base, ids, distance="cosine", serve_max_k=serve_max_k)
            times.append(round(time.perf_counter() - start, 2))
    print(f"build s by --serve_max_k (median of {args.builds} interleaved; all): ", end="")
    print({k: (statistics.median(times), times) for k, times in build_times.items()})
    print(f"method {built.method}, {built.manifest.index_config['num_leaves']} leaves")
    print("per_k as built: " + json.dumps(built.manifest.recall["per_k"]))

    with tempfile.TemporaryDirectory() as scratch:
        built.save(os.path.join(scratch, "after"))
        built.save(os.path.join(scratch, "before"))
        _as_old(os.path.join(scratch, "before"))
        indexes = {name: load_index(os.path.join(scratch, name)) for name in ("before", "after")}
        rows: dict = {name: {} for name in indexes}
        for k in KS:
            for name, p50 in _latency_ms(indexes, queries, k, args.rounds).items():
                rows[name][f"p50 ms k={k}"] = p50
            for name, index in indexes.items():
                found, _ = index.search_batch(queries, k=k)
                rows[name][f"recall@{k}"] = recall_at_k([[int(i) for i in f] for f in found], truth[:, :k], k)
                rows[name][f"knobs k={k}"] = index.knobs_at(k)  # "before": its search defaults at any k
    print(
        "| | "
        + " | ".join(f"recall@{k}" for k in KS)
        + " | "
        + " | ".join(f"p50 ms k={k}" for k in KS)
        + " |"
    )
    print("|---" * (1 + 2 * len(KS)) + "|")
    for name, row in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{row[f'recall@{k}']:.3f}" for k in KS)
            + " | "
            + " | ".join(f"{row[f'p50 ms k={k}']:.3f}" for k in KS)
            + " |"
        )
    for name, row in rows.items():
        print(f"{name} knobs: " + ", ".join(f"k={k}: {row[f'knobs k={k}']}" for k in KS))


if __name__ == "__main__":
    main()
