"""imgindex's default index against real peers (ScaNN autopilot, faiss, hnswlib, exact), side by side.

    python -m benchmarks.peers [--dataset real|scale|both] [--methods a,b,...] [--rounds 3] [--scale_n N]

Data (benchmarks/peer_data.py, made once under benchmarks/out/peers/): `real` = builtin
EfficientNet-Lite0 embeddings (1280-d) of the CIFAR-10 test set + UKBench56, 9,056 database
points and 1,000 held-out queries; `scale` = 1,000,000 x 256 points derived from them (PCA to
256-d, 110-111 Gaussian-noise copies of each real database point; see peer_data's docstring),
1,000 queries made the same way from the held-out points.  Ground truth: exact top-10 cosine.

Methods (benchmarks/peer_methods.py, adapters in peer_scann.py and peer_libraries.py, each in
its own fresh process, one after the other): the index `imgindex build` makes by default (tuned
to recall 0.95), ScaNN's own autopilot, faiss HNSW32 / IVF-Flat / IVF-PQ-fast-scan+refine,
hnswlib M16 / M32, exact search.  Builds may use
both cores; every search uses one thread.  For each method: build seconds, peak RSS (build:
getrusage in the child after the build; whole run: the process sampled every 0.1 s, including
the sweep), index size on disk (the library's own save), and per sweep point recall@10,
single-query QPS (1,000 queries one call each) and batched QPS (one call with all 1,000),
medians over interleaved rounds.

Output: markdown to stdout (the command line first), all numbers in
benchmarks/out/peers/results-<dataset>.json, and recall-vs-QPS plots (Pareto frontier per
method; single-query and batched panels) in benchmarks/out/peers/recall-qps-<dataset>.png.
For each recall target the table gives the best QPS among sweep points whose recall@10 (of
that search mode's results; recall is deterministic, not a median) reaches it, with the
parameters that did, and ratios of imgindex to the best HNSW and to ScaNN autopilot.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from benchmarks import peer_data
from benchmarks.common import environment, run_child
from benchmarks.peer_methods import METHODS

MODULE = "benchmarks.peer_methods"
TARGETS = (0.90, 0.95, 0.99)
HNSW = ("faiss-hnsw32", "hnswlib-m16", "hnswlib-m32")
SHORT = {
    "leaves_to_search": "L",
    "pre_reorder_num_neighbors": "R",
    "efSearch": "ef",
    "ef": "ef",
    "nprobe": "nprobe",
    "k_factor": "kf",
}


def ensure_data(dataset: str, scale_n: int) -> str:
    prefix = peer_data.prefix(dataset, scale_n)
    if not all(os.path.exists(f"{prefix}_{part}.npy") for part in ("base", "queries", "truth")):
        print(
            f"# making data set {peer_data.label(dataset, scale_n)} (benchmarks.peer_data)",
            file=sys.stderr,
            flush=True,
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run(
            [sys.executable, "-m", "benchmarks.peer_data", "--dataset", dataset, "--scale_n", str(scale_n)],
            check=True,
            stdout=sys.stderr,
            env=env,
        )
    return prefix


def versions() -> dict:
    from importlib import metadata

    out = {}
    for package in ("scann", "faiss-cpu", "hnswlib", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def run_method(method: str, prefix: str, rounds: int) -> dict:
    print(f"# {method} on {os.path.basename(prefix)} ...", file=sys.stderr, flush=True)
    try:
        wall, rss, out = run_child(MODULE, ["--method", method, "--data", prefix, "--rounds", str(rounds)])
    except RuntimeError as e:
        print(
            f"#   FAILED: {e}\n#   rerun `python -m {MODULE} --method {method} --data {prefix}` for the traceback",
            file=sys.stderr,
            flush=True,
        )
        return {"method": method, "error": str(e)}
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    result["peak_rss_mb"] = round(rss, 1)
    print(f"#   done in {wall:.0f} s (build {result['build_s']:.1f} s)", file=sys.stderr, flush=True)
    return result


def _fmt_recall(value):
    return "-" if value is None else f"{value:.3f}"


def _fmt_params(params: dict) -> str:
    return (
        ",".join(f"{SHORT.get(k, k)}={v}" if k != "impl" else str(v) for k, v in params.items() if k != "api")
        or "default"
    )


def best(result: dict, target: float, mode: str):
    """(qps, point) of the fastest sweep point whose recall (of this mode) >= target, or None."""
    recall_key = "recall" if mode == "single" else "recall_batched"
    ok = [p for p in result.get("points", []) if "api" not in p["params"] and p[recall_key] >= target]
    if not ok:
        return None
    point = max(ok, key=lambda p: p[f"{mode}_qps"])
    return point[f"{mode}_qps"], point


def _qps(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def table(label: str, results: list[dict], rounds: int) -> str:
    ok = [r for r in results if "error" not in r]
    lines = []
    if ok:
        r0 = ok[0]
        matrix_mb = r0["n"] * r0["d"] * 4 / 2**20
        lines.append(
            f"# {label}: n={r0['n']:,} d={r0['d']} cosine, {r0['queries']} queries, k={r0['k']}, "
            f"medians of {rounds} interleaved rounds, one search thread; {environment()}"
        )
        lines.append(
            f"# float32 matrix {matrix_mb:.0f} MB; peak RSS: build = getrusage after the build "
            "(input matrix included), run = sampled over the whole child process"
        )
    else:
        matrix_mb = 1.0
    head = [
        "method",
        "build s",
        "build peak RSS MB (x matrix)",
        "run peak RSS MB",
        "index MB on disk",
        "max recall",
    ]
    for t in TARGETS:
        head += [f"single QPS @{t:.2f}", f"batched QPS @{t:.2f}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 1))
    by_name = {r["method"]: r for r in results}
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['method']} | failed: {r['error'].splitlines()[0][:80]} |" + " |" * (len(head) - 2)
            )
            continue
        max_recall = max(p["recall"] for p in r["points"] if "api" not in p["params"])
        row = [
            r["method"],
            f"{r['build_s']:.1f}",
            f"{r['rss_build_mb']:.0f} ({r['rss_build_mb'] / matrix_mb:.2f}x)",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['index_bytes'] / 2**20:.1f}",
            f"{max_recall:.3f}",
        ]
        for t in TARGETS:
            for mode in ("single", "batched"):
                b = best(r, t, mode)
                row.append(f"{_qps(b[0])} ({_fmt_params(b[1]['params'])})" if b else "-")
        lines.append("| " + " | ".join(row) + " |")
    if "imgindex" in by_name and "error" not in by_name["imgindex"]:
        mine = by_name["imgindex"]
        for name, others in (("best HNSW", HNSW), ("scann-autopilot", ("scann-autopilot",))):
            others = [by_name[o] for o in others if o in by_name and "error" not in by_name[o]]
            if not others:
                continue
            row = [f"imgindex / {name}", "", "", "", "", ""]
            for t in TARGETS:
                for mode in ("single", "batched"):
                    mine_best = best(mine, t, mode)
                    theirs = [(b[0], o["method"]) for o in others for b in [best(o, t, mode)] if b]
                    top = max(theirs) if theirs else None
                    if mine_best and top:
                        who = f" vs {top[1]}" if len(others) > 1 else ""
                        row.append(f"{mine_best[0] / top[0]:.2f}x{who}")
                    else:
                        row.append("-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        cfg = mine["config"]
        api = [p for p in mine["points"] if "api" in p["params"]]
        defaults = {k: v for k, v in cfg["search_defaults"].items() if k not in ("k", "max_k")}
        if cfg["index_config"]["method"] == "brute_force":
            line = "imgindex default: exact brute force (n * d below retrieval.index.BRUTE_FORCE_MAX_ELEMENTS), no search knobs"
        else:
            line = (
                f"imgindex default: tree_ah, num_leaves {cfg['index_config']['num_leaves']}, tuned search "
                f"defaults {_fmt_params(defaults)}, build-time (leave-self-out) recall "
                f"{_fmt_recall(cfg['build_recall'].get('value'))}"
            )
        if api:
            p = api[0]
            line += (
                f"; through the Python API at those defaults: Index.search {_qps(p['single_qps'])} QPS "
                f"(recall {p['recall']:.3f}), Index.search_batch {_qps(p['batched_qps'])} QPS "
                f"(search_batched_parallel, CPU/wall {p['batched_cpu']:.2f})"
            )
        lines.append(line)
    multi = [
        (r["method"], _fmt_params(p["params"]), mode, p[f"{mode}_cpu"])
        for r in ok
        for p in r["points"]
        if "api" not in p["params"]
        for mode in ("single", "batched")
        if p[f"{mode}_cpu"] > 1.3
    ]
    if multi:
        lines.append(
            "WARNING: searches that used more than one core (CPU/wall > 1.3): "
            + "; ".join(f"{m} {pp} {mode} {c:.2f}" for m, pp, mode, c in multi[:10])
        )
    return "\n".join(lines)


def frontier(points: list[dict], mode: str) -> list[tuple[float, float]]:
    """Pareto frontier (recall, qps), recall ascending, of the non-api sweep points."""
    recall_key = "recall" if mode == "single" else "recall_batched"
    pts = sorted(
        ((p[recall_key], p[f"{mode}_qps"]) for p in points if "api" not in p["params"]),
        key=lambda x: (-x[0], -x[1]),
    )
    out, top = [], 0.0
    for rec, qps in pts:
        if qps > top:
            out.append((rec, qps))
            top = qps
    return out[::-1]


def plot(label: str, results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    ok = [r for r in results if "error" not in r]
    for ax, mode in zip(axes, ("single", "batched")):
        for r in ok:
            f = frontier(r["points"], mode)
            if not f:
                continue
            style = dict(linewidth=2.5, color="black") if r["method"] == "imgindex" else {}
            ax.plot(
                [x for x, _ in f], [y for _, y in f], marker="o", markersize=3, label=r["method"], **style
            )
        ax.set_yscale("log")
        ax.set_xlim(left=0.8, right=1.002)
        ax.set_xlabel("recall@10")
        ax.set_ylabel(f"{'single-query' if mode == 'single' else 'batched'} QPS (1 thread, log)")
        ax.set_title(f"{label}: {'single query' if mode == 'single' else 'batched (1,000 queries/call)'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if ok:
        fig.suptitle(f"{label}: n={ok[0]['n']:,} d={ok[0]['d']}, Pareto frontier of each method's sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=("real", "scale", "both"), default="both")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale_n", type=int, default=peer_data.SCALE_N)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    command = shlex.join(
        [sys.executable, "-m", "benchmarks.peers", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"# command (in {os.getcwd()}): {command}")
    sys.stdout.flush()
    for dataset in ("real", "scale") if args.dataset == "both" else (args.dataset,):
        label = peer_data.label(dataset, args.scale_n)
        start = time.perf_counter()
        prefix = ensure_data(dataset, args.scale_n)
        results = [run_method(m, prefix, args.rounds) for m in methods]
        wall = time.perf_counter() - start
        out = {
            "dataset": label,
            "command": command,
            "cwd": os.getcwd(),
            "environment": environment(),
            "versions": versions(),
            "rounds": args.rounds,
            "wall_s": round(wall, 1),
            "results": results,
        }
        path = os.path.join(peer_data.OUT, f"results-{label}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        png = os.path.join(peer_data.OUT, f"recall-qps-{label}.png")
        plot(label, results, png)
        print(table(label, results, args.rounds))
        print(f"\n(results: {os.path.relpath(path)}, plot: {os.path.relpath(png)}; total {wall:.0f} s)\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
