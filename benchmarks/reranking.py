"""Re-ranking (issue 15): alpha query expansion and DBA, mAP and query latency on real sets.

Input: the embedding tables `imgindex embed` writes for the three shared sets (builtin
efficientnet-lite0, the default embedder), under --embeddings_root:

    imgindex embed --input ../shared/data/holidays/images --output ROOT/holidays
    imgindex embed --input ../shared/data/ukbench56/images --output ROOT/ukbench
    imgindex embed --input ../shared/data/cifar10-test --output ROOT/cifar

What is measured, through the product's code (`retrieval.index`, `retrieval.dba`,
`retrieval.rerank`: what `imgindex build --dba_n` and `Searcher.search_*(expand=...)` run):

  quality   for every DBA setting (none, --dba_n x --dba_alpha) a brute-force index (exact, so
            that only the re-ranking moves the figures) is built with `build_index(dba=...)`;
            every query is an indexed item queried with its stored (original) vector, as
            `search_id(exclude_self=True)` does, for every QE setting (none, --qe_n x
            --qe_alpha).  holidays: mAP over its 300 queries, the query left out of its own
            ranking (relevant: the groundtruth's); ukbench: N-S score (top 4, the query
            included) and mAP (query left out); cifar: mAP over --queries sampled queries,
            relevant = same class.  Rankings are of the whole set.
  latency   the index `imgindex build` would make (default config: tree-AH for holidays
            and cifar, brute force for ukbench), single queries at k=10: plain, and with QE
            (n in --latency_n, alpha 3); median per round over --latency_queries queries,
            median of --rounds rounds.  DBA adds nothing at query time (one row shows it).
  DBA cost  the seconds `build_index` spent on DBA (exact neighbours at these sizes); and with
            --dba_cost NxD,..., `retrieval.dba.augment` (n=3, alpha=3) of synthetic clustered
            unit vectors, exact neighbours (skipped above --exact_max_work) against
            neighbours from a tree-AH index of the originals, and how many rows the two agree on.

Caveat: the queries of holidays and ukbench are items of the database, so with DBA a
query's own vector is one of its relevant items' neighbours (the usual protocol on these
sets).  The set "holidays-external" measures without that: the 511 other images are the
database, and the 300 query images query it from outside (`search_vector` of their vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import environment
from retrieval import rerank, tables
from retrieval.dba import DatabaseAugmentation
from retrieval.index import IndexConfig, build_index, load_index

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def load_set(name: str, root: str, queries: int) -> dict:
    """The database (unit rows x, ids, labels: relevant = same label) and its queries: query
    vectors and labels, and the database rows they are (None: queries from outside)."""
    if name == "holidays-external":
        data = load_set("holidays", root, queries)
        outside = np.zeros(len(data["x"]), bool)
        outside[data["rows"]] = True
        return {
            "x": data["x"][~outside],
            "ids": data["ids"][~outside],
            "labels": data["labels"][~outside],
            "query_x": data["x"][outside],
            "query_labels": data["labels"][outside],
            "rows": None,
            "handle": data["handle"],
        }
    data = tables.read_embeddings(os.path.join(root, name.split("-")[0], "embeddings", "lite"))
    ids = np.asarray(data.ids, dtype=object)
    x = np.asarray(data.vectors, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if name == "holidays":
        labels = np.array([i[:4] for i in ids])  # a scene's images share their first 4 digits
        with open(os.path.join(SHARED, "holidays", "groundtruth.tsv")) as f:
            rows = [line.split("\t") for line in f.read().splitlines()[1:]]
        position = {item: row for row, item in enumerate(ids)}
        query_rows = np.array(sorted(position[q] for q, _ in rows))
        for q, relevant in rows:  # the labels give the groundtruth's relevant sets
            same = {ids[r] for r in np.flatnonzero(labels == q[:4])} - {q}
            assert same == set(relevant.split()), q
    elif name == "ukbench":
        labels = np.array([int(i.split(".")[0][-5:]) // 4 for i in ids])
        query_rows = np.arange(len(ids))
    else:
        labels = np.array([i.split("/")[0] for i in ids])
        rng = np.random.default_rng(0)
        query_rows = np.sort(rng.choice(len(ids), size=min(queries, len(ids)), replace=False))
    return {
        "x": x,
        "ids": ids,
        "labels": labels,
        "query_x": x[query_rows],
        "query_labels": labels[query_rows],
        "rows": query_rows,
        "handle": data.spec.handle,
    }


def rankings(index, queries, rows, k, expansion):
    """(q, k) result rows of `queries` (in the index's space) through the product's search
    paths; rows: per query its own database row, left out (as search_id(exclude_self=True)),
    or None."""
    exclude = None if rows is None else rows.tolist()
    if expansion is None:
        found, _ = index.search_prepared_rows(queries, k + (0 if rows is None else 1))
        if rows is not None:
            found = [f[f != r][:k] for f, r in zip(found, rows)]
    else:
        found, _ = rerank.expanded_search_rows(index, queries, k, expansion, exclude_rows=exclude)
    return np.stack([np.asarray(f)[:k] for f in found])


def average_precisions(found, labels, query_labels, in_database):
    """AP of each query's full ranking (a query in the database left out); relevant = same label."""
    relevant = labels[found] == query_labels[:, None]
    totals = np.array([np.count_nonzero(labels == label) for label in query_labels]) - int(in_database)
    precision = np.cumsum(relevant, axis=1) / np.arange(1, found.shape[1] + 1)
    return (precision * relevant).sum(axis=1) / totals


def quality(data, dba, qe_grid, work):
    """{qe key: {"map": ..., "ns": ...}} for one DBA setting, and its build's dba record."""
    x, labels, rows = data["x"], data["labels"], data["rows"]
    queries, query_labels = data["query_x"], data["query_labels"]
    n = len(x)
    built = build_index(x, list(data["ids"]), config=IndexConfig("brute_force"), dba=dba, work_dir=work)
    path = tempfile.mkdtemp(dir=work)
    os.rmdir(path)
    built.save(path)
    index = load_index(path, verify=False)
    out = {}
    for expansion in qe_grid:
        found = rankings(index, queries, rows, n - (0 if rows is None else 1), expansion)
        ap = average_precisions(found, labels, query_labels, rows is not None)
        result = {"map": float(ap.mean()), "ap": ap.tolist()}
        if len(x) < 100:  # ukbench: the N-S score, the query included
            top = rankings(index, queries, None, 4, expansion)
            result["ns"] = float(np.mean((labels[top] == query_labels[:, None]).sum(axis=1)))
        out[key(expansion)] = result
    return out, built.manifest.dba


def latency(data, dba, expansions, args, work):
    """Median single-query latency (ms) at k=10 of the default index, per expansion."""
    x = data["x"]
    built = build_index(x, list(data["ids"]), dba=dba, work_dir=work)
    path = tempfile.mkdtemp(dir=work)
    os.rmdir(path)
    built.save(path)
    index = load_index(path, verify=False)
    queries = data["query_x"][: args.latency_queries]
    out = {"method": index.method}
    for expansion in expansions:
        rounds = []
        for _ in range(args.rounds):
            times = []
            for q in queries:
                start = time.perf_counter()
                if expansion is None:
                    index.search_rows(q, 10)
                else:
                    rerank.expanded_search_rows(index, index.prepare_query(q)[None], 10, expansion)
                times.append(time.perf_counter() - start)
            rounds.append(statistics.median(times) * 1000)
        out[key(expansion)] = statistics.median(rounds)
    return out


def dba_cost(sizes, exact_max_work):
    """Seconds of DBA (n=3, alpha=3) by neighbour search, on synthetic data of each NxD size."""
    from benchmarks.common import clustered
    from retrieval import dba

    print("\n| vectors | n^2 d | exact s | index s | rows equal |\n|---|---:|---:|---:|---:|")
    for size in sizes.split(","):
        n, d = (int(v) for v in size.split("x"))
        x = clustered(n, d)
        setting = DatabaseAugmentation(3, 3)
        with tempfile.TemporaryDirectory(prefix="rerank-dba-") as work:
            approx, record = dba.augment(
                x, setting, "cosine", f"{work}/index.npy", neighbours="index", work_dir=work
            )
            exact_s, agree = "-", "-"
            if float(n) * n * d <= exact_max_work:
                exact, exact_record = dba.augment(
                    x, setting, "cosine", f"{work}/exact.npy", neighbours="exact"
                )
                exact_s = f"{exact_record['seconds']:.1f}"
                same = np.isclose(np.asarray(exact), np.asarray(approx), atol=1e-5).all(axis=1).mean()
                agree = f"{100 * same:.1f}%"
            print(f"| {n:,} x {d} | {float(n) * n * d:.2g} | {exact_s} | {record['seconds']:.1f} | {agree} |")


# Settings compared across the sets, with their paired standard errors: (DBA, QE).
CANDIDATES = [
    ("n=1 alpha=3", "none"),
    ("n=2 alpha=3", "none"),
    ("n=3 alpha=3", "none"),
    ("none", "n=1 alpha=3"),
    ("none", "n=2 alpha=0"),
    ("none", "n=10 alpha=0"),
    ("n=2 alpha=3", "n=1 alpha=3"),
    ("n=2 alpha=3", "n=10 alpha=0"),
]


def describe(dba_key, qe_key):
    return " + ".join([f"DBA {dba_key}"] * (dba_key != "none") + [f"QE {qe_key}"] * (qe_key != "none"))


def change(results, dba_key, qe_key):
    """Points of mAP against the baseline, +- the standard error of the paired differences."""
    base = np.array(results["none"]["qe"]["none"]["ap"])
    diff = np.array(results[dba_key]["qe"][qe_key]["ap"]) - base
    return f"{100 * diff.mean():+.2f} +- {100 * diff.std(ddof=1) / np.sqrt(len(diff)):.2f}"


def print_summary(everything, args):
    """The sets side by side: mAP changes of the grids, the candidates, latency."""
    names = list(everything)
    base = {name: everything[name]["quality"]["none"]["qe"]["none"] for name in names}

    def points(name, dba_key, qe_key):
        r = everything[name]["quality"][dba_key]["qe"][qe_key]
        text = f"{100 * (r['map'] - base[name]['map']):+.2f}"
        return text + (f" ({r['ns']:.3f})" if "ns" in r else "")

    head = "| setting | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)
    print("\n## All sets: mAP, and its change in points (ukbench: N-S score in brackets)\n")
    print(head)
    cells = [f"{b['map']:.4f}" + (f" ({b['ns']:.3f})" if "ns" in b else "") for b in base.values()]
    print("| baseline: no re-ranking | " + " | ".join(cells) + " |")
    for n in ints(args.qe_n):
        for a in floats(args.qe_alpha):
            qe_key = f"n={n} alpha={a:g}"
            print(f"| QE {qe_key} | " + " | ".join(points(name, "none", qe_key) for name in names) + " |")
    for n in ints(args.dba_n):
        for a in floats(args.dba_alpha):
            dba_key = f"n={n} alpha={a:g}"
            print(f"| DBA {dba_key} | " + " | ".join(points(name, dba_key, "none") for name in names) + " |")
    print("\n## All sets: candidates, change in mAP points +- standard error of the per-query differences\n")
    print(head)
    for dba_key, qe_key in CANDIDATES:
        row = " | ".join(change(everything[name]["quality"], dba_key, qe_key) for name in names)
        print(f"| {describe(dba_key, qe_key)} | {row} |")
    print("\n## All sets: single-query latency at k=10, median ms (vs plain)\n")
    print(
        "| setting | "
        + " | ".join(f"{name} ({everything[name]['latency']['plain']['method']})" for name in names)
        + " |"
    )
    print("|---|" + "---:|" * len(names))
    for setting in [k for k in everything[names[0]]["latency"]["plain"] if k != "method"]:
        row = []
        for name in names:
            lat = everything[name]["latency"]["plain"]
            row.append(f"{lat[setting]:.3f} ({lat[setting] / lat['none']:.2f}x)")
        print(f"| {'plain' if setting == 'none' else 'QE ' + setting} | " + " | ".join(row) + " |")
    row = []
    for name in names:
        lat = everything[name]["latency"]
        row.append(f"{lat['dba']['none']:.3f} ({lat['dba']['none'] / lat['plain']['none']:.2f}x)")
    print(
        f"| DBA {everything[names[0]]['latency']['dba_setting']}, plain queries | " + " | ".join(row) + " |"
    )


def key(setting) -> str:
    return "none" if setting is None else f"n={setting.n} alpha={setting.alpha:g}"


def floats(text):
    return [float(v) for v in text.split(",")]


def ints(text):
    return [int(v) for v in text.split(",")]


def print_tables(name, data, results, lat, args):
    base = results["none"]["qe"]["none"]
    metric = "map"
    where = "outside the database" if data["rows"] is None else "each an image of the database"
    print(
        f"\n### {name}: {len(data['x'])} images, {len(data['query_x'])} queries ({where}), {data['handle']}\n"
    )
    if "ns" in base:
        print(f"baseline N-S score {base['ns']:.3f}, mAP {base['map']:.4f}\n")
    else:
        print(f"baseline mAP {base['map']:.4f}\n")

    def cell(r):
        text = f"{r[metric]:.4f} ({100 * (r[metric] - base[metric]):+.2f})"
        return text + (f", N-S {r['ns']:.3f}" if "ns" in r else "")

    qe_alphas, dba_alphas = floats(args.qe_alpha), floats(args.dba_alpha)
    print("QE alone: mAP (points vs baseline) by n (rows) and alpha (columns)\n")
    print("| QE n | " + " | ".join(f"alpha {a:g}" for a in qe_alphas) + " |")
    print("|---|" + "---:|" * len(qe_alphas))
    for n in ints(args.qe_n):
        print(
            f"| {n} | "
            + " | ".join(cell(results["none"]["qe"][f"n={n} alpha={a:g}"]) for a in qe_alphas)
            + " |"
        )
    print("\nDBA alone, and DBA with the best QE of the grid for it\n")
    print("| DBA n | " + " | ".join(f"alpha {a:g}" for a in dba_alphas) + " | best QE with it | DBA s |")
    print("|---|" + "---:|" * len(dba_alphas) + "---|---:|")
    for n in ints(args.dba_n):
        cells, best_text, seconds = [], [], []
        for a in dba_alphas:
            setting = f"n={n} alpha={a:g}"
            cells.append(cell(results[setting]["qe"]["none"]))
            best = max(results[setting]["qe"].items(), key=lambda kv: kv[1][metric])
            best_text.append(f"a{a:g}: QE {best[0]} {best[1][metric]:.4f}")
            seconds.append(f"{results[setting]['dba']['seconds']:.2f}")
        print(f"| {n} | " + " | ".join(cells) + f" | {'; '.join(best_text)} | {' / '.join(seconds)} |")
    print("\nCandidates: mAP change in points, +- the standard error of the per-query differences\n")
    print("| setting | change |\n|---|---:|")
    for dba_key, qe_key in CANDIDATES:
        print(f"| {describe(dba_key, qe_key)} | {change(results, dba_key, qe_key)} |")
    print(f"\nLatency, single queries at k=10 ({lat['plain']['method']} index), median ms\n")
    print("| setting | ms | vs plain |\n|---|---:|---:|")
    plain = lat["plain"]["none"]
    for setting, ms in lat["plain"].items():
        if setting != "method":
            print(f"| QE {setting} | {ms:.3f} | {ms / plain:.2f}x |")
    print(
        f"| DBA {key(lat['dba_setting'])}, no QE | {lat['dba']['none']:.3f} | {lat['dba']['none'] / plain:.2f}x |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--embeddings_root", required=True, help="holds holidays/, ukbench/, cifar/ embed runs"
    )
    parser.add_argument("--sets", default="holidays,holidays-external,ukbench,cifar")
    parser.add_argument("--queries", type=int, default=1000, help="cifar queries (sampled, seed 0)")
    parser.add_argument("--qe_n", default="1,2,3,5,10")
    parser.add_argument("--qe_alpha", default="0,1,3")
    parser.add_argument("--dba_n", default="1,2,3,5")
    parser.add_argument("--dba_alpha", default="0,3")
    parser.add_argument("--latency_n", default="1,3,5,10")
    parser.add_argument("--latency_queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write every figure as JSON here")
    parser.add_argument("--dba_cost", default=None, help="only measure DBA's cost on synthetic NxD sets")
    parser.add_argument("--from_json", default=None, help="print the tables of an earlier --out only")
    parser.add_argument("--exact_max_work", type=float, default=3e12, help="--dba_cost: largest exact n^2 d")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            print_summary(json.load(f), args)
        return
    if args.dba_cost:
        print(f"# DBA cost by neighbour search ({environment()})")
        dba_cost(args.dba_cost, args.exact_max_work)
        return
    qe_grid = [None] + [rerank.QueryExpansion(n, a) for n in ints(args.qe_n) for a in floats(args.qe_alpha)]
    dba_grid = [None] + [DatabaseAugmentation(n, a) for n in ints(args.dba_n) for a in floats(args.dba_alpha)]
    print(f"# Re-ranking: alpha-QE and DBA ({environment()})")
    everything = {}
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as work:
        for name in args.sets.split(","):
            data = load_set(name, args.embeddings_root, args.queries)
            results = {}
            for dba in dba_grid:
                by_qe, record = quality(data, dba, qe_grid, work)
                results[key(dba)] = {"qe": by_qe, "dba": record}
            expansions = [None] + [rerank.QueryExpansion(n, 3) for n in ints(args.latency_n)]
            dba_setting = DatabaseAugmentation(3, 3)
            lat = {
                "plain": latency(data, None, expansions, args, work),
                "dba": latency(data, dba_setting, [None], args, work),
                "dba_setting": dba_setting,
            }
            print_tables(name, data, results, lat, args)
            lat["dba_setting"] = key(dba_setting)
            everything[name] = {"quality": results, "latency": lat}
    print_summary(everything, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
