"""Retrieval quality of the product end to end: `imgindex build` over the shared photo sets,
then `Searcher` queries, per quality setting.  `make bench-quality` runs it.

For each set (`benchmarks.quality_data`) and each configuration (`CONFIGS`: the default and
the documented quality flags), it builds an output root with the real CLI (the embeddings
of one model are made once and reused by the other builds of that model through
`--reuse_from`), opens it with `serving.Searcher`, and queries every query image by id
(its stored vector, left out of its own ranking).  Reported per set and configuration:

- mAP@100 through the index, and mAP@100 of exact search over the same vectors (the index's
  cost in quality), both over the 100 first hits (AP's denominator: min(relevant, 100));
- recall@10 and recall@100 of the index against exact search on those queries, and the
  recall per k the build recorded in its manifest;
- P@10 (relevant among the first 10 hits);
- the median query latency (ms, one query at a time, after a warm-up).

It writes `benchmarks/out/quality/quality.json` and a plot of mAP against query latency
(`quality.svg`, matplotlib from the `bench` extra).

    python -m benchmarks.quality --sets ukbench,holidays,varied-aspect,cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import quality_data

OUT = os.path.join(os.path.dirname(__file__), "out", "quality")
K = 100


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    model: str  # the embedding a build reuses from the first build of the same model
    build_flags: tuple[str, ...] = ()
    expand: tuple[int, float] | None = None  # query expansion (n, alpha) at query time
    index_of: str | None = None  # query the index another configuration built (no build)


# The re-ranking settings are the ones BENCHMARKS.md ("Re-ranking") recommends trying first.
CONFIGS = {
    "default": Config("default", "lite0"),
    "pca128": Config("pca128", "lite0", ("--pca_dim=128",)),
    "fit+crop": Config(
        "fit+crop", "lite0-fit+crop", ("--embedder=lite=builtin:efficientnet-lite0,resize=fit+crop",)
    ),
    "lite2": Config("lite2", "lite2", ("--embedder=lite=builtin:efficientnet-lite2",)),
    "dba": Config("dba", "lite0", ("--dba_n=2", "--dba_alpha=3")),
    "qe": Config("qe", "lite0", expand=(1, 3.0), index_of="default"),
    "dba+qe": Config("dba+qe", "lite0", expand=(1, 3.0), index_of="dba"),
}


@dataclasses.dataclass
class Measured:
    set: str
    config: str
    images: int
    queries: int
    map_index: float
    map_exact: float
    p10: float
    recall_10: float
    recall_100: float
    latency_ms: float
    manifest_recall: dict  # k -> recall the build measured and recorded (recall.per_k)
    build_s: float


class NotApplicable(Exception):
    """The build refused the configuration for this set (exit status 2: bad configuration)."""


def build(task, config: Config, roots: dict[str, str]) -> tuple[str, float]:
    root = os.path.join(OUT, f"{task.name}-{config.name}")
    shutil.rmtree(root, ignore_errors=True)
    argv = [os.path.join(os.path.dirname(sys.executable), "imgindex"), "build", f"--output={root}"]
    argv += [f"--input={g}" for g in task.globs] + list(config.build_flags) + ["--progress=off"]
    if config.model in roots:
        argv.append(f"--reuse_from={roots[config.model]}")
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode == 2:
        raise NotApplicable(done.stderr.strip().splitlines()[-1])
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(root, "LATEST")) as f:  # the run whose tables the next builds reuse
        roots.setdefault(config.model, os.path.join(root, f.read().strip()))
    return root, time.perf_counter() - start


def average_precision_at(ranking: list[int], relevant: frozenset[int], k: int) -> float:
    hits, total = 0, 0.0
    for rank, row in enumerate(ranking[:k], 1):
        if row in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k)


def measure(task, config: Config, root: str, build_s: float) -> Measured:
    from serving import Searcher

    searcher = Searcher.open(root)
    ids = task.ids()
    rows = {item_id: row for row, item_id in enumerate(ids)}
    kwargs = {}
    if config.expand:
        from retrieval.rerank import QueryExpansion

        kwargs["expand"] = QueryExpansion(*config.expand)
    k = min(K, len(task.files) - 1)
    vectors = np.stack([searcher.get_vector(ids[q]) for q in task.queries])
    all_vectors = np.stack([searcher.get_vector(i) for i in ids])
    aps_index, aps_exact, p10, recall10, recall100, latencies = [], [], [], [], [], []
    for _ in range(3):  # warm-up
        searcher.search_id(ids[task.queries[0]], k=k, exclude_self=True, **kwargs)
    for position, query in enumerate(task.queries):
        start = time.perf_counter()
        hits = searcher.search_id(ids[query], k=k, exclude_self=True, **kwargs)
        latencies.append(time.perf_counter() - start)
        ranking = [rows[hit.id] for hit in hits]
        sims = all_vectors @ vectors[position]
        sims[query] = -np.inf
        exact = list(np.argsort(-sims, kind="stable")[:k])
        relevant = task.relevant[position]
        aps_index.append(average_precision_at(ranking, relevant, k))
        aps_exact.append(average_precision_at(exact, relevant, k))
        p10.append(sum(r in relevant for r in ranking[:10]) / 10)
        recall10.append(len(set(ranking[:10]) & set(exact[:10])) / 10)
        recall100.append(len(set(ranking[:k]) & set(exact[:k])) / k)
    recall = next(iter(searcher.info()["embedders"].values())).get("recall") or {}
    recorded = {entry["k"]: round(entry["value"], 4) for entry in recall.get("per_k") or []}
    return Measured(
        task.name,
        config.name,
        len(task.files),
        len(task.queries),
        float(np.mean(aps_index)),
        float(np.mean(aps_exact)),
        float(np.mean(p10)),
        float(np.mean(recall10)),
        float(np.mean(recall100)),
        1000 * statistics.median(latencies),
        recorded,
        build_s,
    )


def plot(results: list[Measured], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r.set for r in results})
    figure, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 4), squeeze=False)
    for axis, name in zip(axes[0], sets):
        for r in (r for r in results if r.set == name):
            axis.scatter(r.latency_ms, 100 * r.map_index)
            axis.annotate(r.config, (r.latency_ms, 100 * r.map_index), fontsize=8)
        axis.set_title(name)
        axis.set_xlabel("median query latency (ms)")
        axis.set_ylabel(f"mAP@{K} through the index")
    figure.tight_layout()
    figure.savefig(path)


def save(results: list[Measured]) -> None:
    """quality.json (this run's results replace those of the same set and configuration of an
    earlier run, so one set can be rerun alone) and the plot, after every measurement."""
    path = os.path.join(OUT, "quality.json")
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [Measured(**r) for r in json.load(f)]
    mine = {(r.set, r.config) for r in results}
    merged = [r for r in kept if (r.set, r.config) not in mine] + results
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in merged], f, indent=1)
    try:
        plot(merged, os.path.join(OUT, "quality.svg"))
    except ImportError:
        pass  # matplotlib comes with the bench extra (make bench-quality installs it)


def markdown(results: list[Measured]) -> str:
    """quality.json as the tables BENCHMARKS.md shows: mAP@100 through the index (exact in
    brackets), then P@10, recall@10/@100 and p50 per set."""
    sets = list(dict.fromkeys(r.set for r in results))
    configs = list(dict.fromkeys(r.config for r in results))
    by = {(r.set, r.config): r for r in results}
    lines = [
        "| setting | " + " | ".join(f"{s} mAP@{K} (exact)" for s in sets) + " |",
        "|---|" + "---:|" * len(sets),
    ]
    for c in configs:
        cells = []
        for name in sets:
            r = by.get((name, c))
            cells.append("n/a" if r is None else f"{100 * r.map_index:.2f} ({100 * r.map_exact:.2f})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| setting | " + " | ".join(f"{s} P@10 / r@10 / r@{K} / p50 ms / build s" for s in sets) + " |",
    ]
    lines.append("|---|" + "---:|" * len(sets))
    for c in configs:
        cells = []
        for name in sets:
            r = by.get((name, c))
            cells.append(
                "n/a"
                if r is None
                else f"{100 * r.p10:.1f} / {r.recall_10:.3f} / {r.recall_100:.3f} / {r.latency_ms:.2f} / {r.build_s:.0f}"
            )
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", default="ukbench,holidays,varied-aspect,cifar10")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--cifar_per_class", type=int, default=300)
    parser.add_argument("--table", action="store_true", help="print quality.json as markdown tables and stop")
    parser.add_argument(
        "--query_only",
        action="store_true",
        help="query the output roots an earlier run built (e.g. to time queries on a quiet machine); "
        "build seconds are kept from its quality.json",
    )
    args = parser.parse_args(argv)
    previous: dict[tuple[str, str], float] = {}
    if args.query_only and os.path.exists(os.path.join(OUT, "quality.json")):
        with open(os.path.join(OUT, "quality.json")) as f:
            previous = {(r["set"], r["config"]): r["build_s"] for r in json.load(f)}
    if args.table:
        with open(os.path.join(OUT, "quality.json")) as f:
            print(markdown([Measured(**r) for r in json.load(f)]))
        return
    if not quality_data.available():
        sys.exit(f"the shared data is not at {quality_data.SHARED}; see ../shared/data/README.md")
    os.makedirs(OUT, exist_ok=True)
    results = []
    for name in args.sets.split(","):
        task = quality_data.load(name, cifar_per_class=args.cifar_per_class, cifar_queries_per_class=100)
        roots: dict[str, str] = {}  # model -> the run whose embeddings later builds reuse
        built: dict[str, str] = {}  # configuration -> its output root
        for config_name in args.configs.split(","):
            config = CONFIGS[config_name]
            try:
                if config.index_of:
                    if config.index_of not in built:
                        raise NotApplicable(f"configuration {config.index_of!r} was not built")
                    root, build_s = built[config.index_of], 0.0
                elif args.query_only:
                    root = os.path.join(OUT, f"{task.name}-{config.name}")
                    if not os.path.exists(os.path.join(root, "LATEST")):
                        raise NotApplicable(f"--query_only: {root} was not built")
                    build_s = previous.get((name, config_name), 0.0)
                    built[config_name] = root
                else:
                    root, build_s = build(task, config, roots)
                    built[config_name] = root
            except NotApplicable as exc:
                print(f"{name:14s} {config_name:10s} not applicable: {exc}", flush=True)
                continue
            result = measure(task, config, root, build_s)
            results.append(result)
            save(results)
            print(
                f"{name:14s} {config_name:10s} mAP@{K} index {100 * result.map_index:6.2f} exact "
                f"{100 * result.map_exact:6.2f}  P@10 {100 * result.p10:6.2f}  recall@10 "
                f"{result.recall_10:.3f} @{K} {result.recall_100:.3f}  p50 {result.latency_ms:.3f} ms"
                f"  build {build_s:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
