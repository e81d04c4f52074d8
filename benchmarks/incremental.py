"""The nightly rebuild: a full `imgindex build` against an incremental one, side by side.

Data: N distinct 640x480 JPEGs (`benchmarks.pipeline_throughput.make_data`, from UKBench) as
night 1; night 2 is night 1 with 1% of the images replaced (new bytes under the same name),
0.5% deleted and 0.5% added.  Night 1 is built once (not timed) into an output root.

Methods, each `imgindex build` in a fresh process, rounds interleaved (full, incremental, ...):
  full         night 2 into an empty root with --reuse_from none: everything decoded and embedded
  incremental  night 2 with --reuse_from night 1's run: only the new content is decoded and
               embedded; every image is still read and hashed
Both use the builtin EfficientNet-Lite0 on the local runner.  Wall time counts everything
from process start to exit (imports, model load, Beam, the index build and its recall
measurement), as the nightly job experiences it; peak RSS is the largest sum over the
process tree, sampled every 0.1 s.  Figures are medians over rounds.

Also measured, for the projections: read + sha256 of every file on one core (no decode),
and the in-memory size of the per-record elements the keyed joins carry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import environment, run_child
from benchmarks.pipeline_throughput import OUT, make_data

MODULE = "benchmarks.incremental"
CHURN = {"replaced": 0.01, "deleted": 0.005, "added": 0.005}


def make_nights(n: int) -> tuple[str, str]:
    """Night 1 (make_data) and night 2 (its churned copy, hard links for unchanged files)."""
    from PIL import Image

    night1 = make_data(n)
    night2 = os.path.join(OUT, f"night2-{n}")
    if os.path.isdir(night2):
        return night1, night2
    names = sorted(os.listdir(night1))
    rng = np.random.default_rng(1)
    order = rng.permutation(len(names))
    replaced = {names[i] for i in order[: int(n * CHURN["replaced"])]}
    deleted = {names[i] for i in order[len(replaced) : len(replaced) + int(n * CHURN["deleted"])]}
    tmp = night2 + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in names:
        if name in deleted:
            continue
        if name in replaced:  # the same photo, flipped and re-encoded: new bytes
            image = Image.open(os.path.join(night1, name)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image.save(os.path.join(tmp, name), "JPEG", quality=80)
        else:
            os.link(os.path.join(night1, name), os.path.join(tmp, name))
    extra = make_data(int(n * CHURN["added"]), seed=7)
    for name in sorted(os.listdir(extra)):
        shutil.copyfile(os.path.join(extra, name), os.path.join(tmp, f"added-{name}"))
    os.rename(tmp, night2)
    return night1, night2


def build_argv(folder: str, root: str, *extra: str) -> list[str]:
    return ["build", f"--input={folder}/*.jpg", f"--output={root}", "--keep_runs=0", *extra]


def child_build(argv: list[str]) -> None:
    from imgindex import cli

    code = cli.main(argv)
    if code:
        raise SystemExit(code)


def read_hash_rate(folder: str) -> tuple[float, float]:
    """(files/s, MB/s) of reading and hashing every file on one core, files in page cache."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    for path in files:  # warm the page cache, as the build's second night finds it
        with open(path, "rb") as f:
            f.read()
    start, size = time.perf_counter(), 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        size += len(data)
        hashlib.sha256(data).hexdigest()
    seconds = time.perf_counter() - start
    return len(files) / seconds, size / seconds / 1e6


def element_bytes() -> dict[str, float]:
    """Bytes per record of what the keyed joins hold, as Python objects and pickled."""
    import pickle
    import tracemalloc

    from pipelines.content import Seen
    from pipelines.shards import Shard

    shard = Shard("/data/images/000123.jpg", "images", "/data/images/")
    count = 20_000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    seen = [
        Seen(
            f"{i:06d}.jpg",
            f"/data/images/{i:06d}.jpg",
            hashlib.sha256(str(i).encode()).hexdigest(),
            {},
            shard,
            (i, 0),
        )
        for i in range(count)
    ]
    keys = [(s.sha256, s) for s in seen]
    previous = [(s.sha256, "/data/out/runs/r/embeddings/lite/part-00000-of-00002.parquet") for s in seen]
    ids = [(s.id, None) for s in seen]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    in_memory = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
    pickled = statistics.mean(len(pickle.dumps(item)) for item in keys[:1000] + previous[:1000] + ids[:1000])
    del seen, keys, previous, ids
    return {"python_bytes_per_record": round(in_memory), "pickled_bytes_per_element": round(pickled)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_build(args.child)
        return

    night1, night2 = make_nights(args.images)
    work = tempfile.mkdtemp(prefix="imgindex-incremental-", dir=OUT)
    try:
        first_root = os.path.join(work, "night1")
        run_child(MODULE, ["--child", *build_argv(night1, first_root, "--reuse_from=none")])
        with open(os.path.join(first_root, "LATEST")) as f:
            previous = os.path.join(first_root, f.read().strip())
        results: dict[str, dict[str, list[float]]] = {
            m: {"wall": [], "rss": []} for m in ("full", "incremental")
        }
        counts = {}
        for round_ in range(args.rounds):
            for method in ("full", "incremental"):
                root = os.path.join(work, f"{method}-{round_}")
                reuse = "--reuse_from=none" if method == "full" else f"--reuse_from={previous}"
                wall, rss, _ = run_child(MODULE, ["--child", *build_argv(night2, root, reuse)])
                results[method]["wall"].append(wall)
                results[method]["rss"].append(rss)
                with open(os.path.join(root, "LATEST")) as f:
                    manifest = json.load(open(os.path.join(root, f.read().strip(), "run_manifest.json")))
                counts[method] = manifest["counts"]["embedders"]["lite"]
                counts[method + "_timings"] = manifest["timings"]
                print(f"# round {round_ + 1} {method}: {wall:.1f} s, peak RSS {rss:.0f} MB", flush=True)
                shutil.rmtree(root)
        files_per_s, mb_per_s = read_hash_rate(night2)
        sizes = element_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    full, incremental = (statistics.median(results[m]["wall"]) for m in ("full", "incremental"))
    print(f"# incremental nightly build: {args.images:,} images, churn {CHURN}, {environment()}")
    print("| build | wall s (median) | ratio | peak RSS MB (median) | reused | embedded | deleted |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, wall in (("full (--reuse_from none)", full), ("incremental", incremental)):
        key = "full" if method.startswith("full") else "incremental"
        c = counts[key]
        print(
            f"| {method} | {wall:.1f} | {wall / full:.3f} | {statistics.median(results[key]['rss']):.0f} | "
            f"{c['reused']} | {c['embedded']} | {c['deleted']} |"
        )
    print(f"# rounds: { {m: [round(w, 1) for w in r['wall']] for m, r in results.items()} }")
    print(
        f"# timings of the last round: full {counts['full_timings']}, incremental {counts['incremental_timings']}"
    )
    print(f"# read + sha256 on one core: {files_per_s:.0f} files/s, {mb_per_s:.0f} MB/s")
    print(f"# join elements: {sizes}")


if __name__ == "__main__":
    main()
