"""Peak memory of the index stage of `imgindex build` against the float32 matrix it indexes.

Writes an embedding table of N x D clustered synthetic vectors (L2-normalised, as the
pipeline writes them) once under benchmarks/out/, then runs the real index stage
(`pipelines.build.build_indexes`: read Parquet into one matrix, build and tune the ScaNN
index, save it with metadata) in a fresh process and samples that process's RSS.
"""

import argparse
import os
import shutil

from benchmarks.common import clustered, environment, run_child
from benchmarks.pipeline_throughput import OUT

MODULE = "benchmarks.build_memory"


def make_table(n: int, d: int) -> str:
    from retrieval import tables
    from retrieval.embedders import EmbedderSpec

    run_dir = os.path.join(OUT, f"build-memory-{n}x{d}")
    table_dir = os.path.join(run_dir, "embeddings", "synthetic")
    if os.path.isdir(table_dir):
        return run_dir
    os.makedirs(table_dir)
    x = clustered(n, d)
    spec = EmbedderSpec(name="synthetic", handle="synthetic", fingerprint="synthetic", dim=d)
    tables.write_embeddings(
        os.path.join(table_dir, "part-0.parquet"),
        spec,
        [f"v{i}" for i in range(n)],
        x,
        sha256s=["0" * 64] * n,
        sources=[f"synthetic#{i}" for i in range(n)],
        widths=[1] * n,
        heights=[1] * n,
    )
    return run_dir


def _rss_line(step: str, seconds: float | None = None) -> None:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    mb = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}
    took = "" if seconds is None else f"  took {seconds:6.1f} s"
    print(
        f"step {step:<24} RSS {mb['VmRSS']:7.0f} MB  peak so far {mb['VmHWM']:7.0f} MB  "
        f"anonymous {mb['RssAnon']:7.0f} MB{took}",
        flush=True,
    )


def _probe_steps() -> None:
    """Print this process's RSS and the time of each step of the index stage (the --steps view)."""
    import time

    from retrieval import scann_assets, tables
    from retrieval.index import build, recall, store

    def after(owner, name, label):
        inner = getattr(owner, name)

        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            _rss_line(label, time.perf_counter() - start)
            return result

        setattr(owner, name, wrapped)

    _rss_line("imports")
    after(tables, "read_embeddings", "read tables")
    after(build, "_check_ids", "ids checked")
    for name in ("write_dataset", "train", "hash_rows"):
        after(scann_assets, name, name)
    after(recall.RecallProbe, "sample", "recall probe (exact)")
    after(scann_assets, "load_searcher", "searcher loaded")
    after(build, "choose_search_defaults", "tuned")
    after(store.Index, "save", "saved")


def child(run_dir: str, steps: bool = False) -> None:
    from pipelines import build, build_options

    if steps:
        _probe_steps()
    shutil.rmtree(os.path.join(run_dir, "index"), ignore_errors=True)
    opts = build_options.BuildOptions(flags=["--output=unused"]).view_as(build_options.BuildOptions)
    entry = build.build_indexes(run_dir, {"embedders": {"synthetic": {}}}, opts)["synthetic"]
    print(f"method {entry.method} recall {entry.recall['value']} build_seconds {entry.build_seconds}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument(
        "--steps",
        action="store_true",
        help="also print the build process's RSS and time after each step (read, ids, "
        "dataset file, training, hashing, exact recall probe, searcher load, tuning, save)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.steps)
    run_dir = make_table(args.n, args.d)
    wall, rss, out = run_child(MODULE, ["--child", run_dir] + (["--steps"] if args.steps else []))
    if args.steps:
        print("\n".join(line for line in out.splitlines() if line.startswith("step ")))
    matrix_mb = args.n * args.d * 4 / 2**20
    print(f"# index stage of imgindex build: n={args.n} d={args.d}, {environment()}")
    print(
        f"| {out.strip().splitlines()[-1]} | wall {wall:.1f} s | peak RSS {rss:.0f} MB | matrix {matrix_mb:.0f} MB | "
        f"{rss / matrix_mb:.2f}x |"
    )


if __name__ == "__main__":
    main()
