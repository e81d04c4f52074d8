"""A build and a serving cold start from an S3-compatible store against a local root, side by
side, with the bytes each moves.

Data: N distinct 640x480 JPEGs (`benchmarks.pipeline_throughput.make_data`, from UKBench),
once in a local folder and once as objects in a bucket of moto's S3 server on 127.0.0.1
(`tests.helpers.s3`, the server the tests use).  Methods, each in a fresh process, rounds
interleaved:
  build local   `imgindex build --input DIR/*.jpg --output LOCAL_ROOT`
  build s3      `imgindex build --input s3://bucket/in/*.jpg --output s3://bucket/root_i`
                with Beam's S3 flags
  open local    `Searcher.open(LOCAL_ROOT)` and one query
  open s3 cold  `Searcher.open(s3 root, cache_dir=<empty>)` and one query: download, verify,
                open
  open s3 warm  the same with the cache that the cold open filled
Both builds use the builtin EfficientNet-Lite0 on the local runner with --reuse_from none.
Bytes: inputs read (the objects' sizes), objects written under the run, and bytes a cold
open downloads (the cache's size).  Also measured: GET + sha256 of every input object
through Beam's FileSystems on one core, the per-record figure for the nightly projection in
docs/scaling.md.

moto on loopback has no network latency and no request costs: these figures bound the
client-side overhead (Beam's S3 client, our checks and uploads), not a real store's latency.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import environment, run_child
from benchmarks.pipeline_throughput import OUT, make_data

MODULE = "benchmarks.object_storage"
BUCKET = "bench"


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def child_open(root: str, cache_dir: str, flags: list[str]) -> None:
    start = time.perf_counter()
    from serving import Searcher

    searcher = (
        Searcher.open(root, storage_flags=flags, cache_dir=cache_dir)
        if "://" in root
        else Searcher.open(root)
    )
    opened = time.perf_counter()
    import numpy as np

    name, info = next(iter(searcher.info()["embedders"].items()))
    assert len(searcher.search_vector(np.ones(info["d"], np.float32), k=10, embedder=name)) == 10
    print(f"open {opened - start:.3f} total {time.perf_counter() - start:.3f}")


def child_read(prefix: str, flags: list[str]) -> None:
    from retrieval import storage

    storage.configure(storage.options_from_flags(flags))
    objects = storage.list_prefix(prefix)
    start, cpu, size = time.perf_counter(), time.process_time(), 0
    for obj in objects:
        data = storage.read_bytes(obj.path)
        size += len(data)
        hashlib.sha256(data).hexdigest()
    seconds = time.perf_counter() - start
    print(f"files {len(objects)} seconds {seconds:.3f} bytes {size} cpu {time.process_time() - cpu:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["open", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--read_only", action="store_true", help="only the GET + sha256 rate")
    args, rest = parser.parse_known_args(argv)
    if args.child == "open":
        return child_open(args.root, args.cache_dir, rest)
    if args.child == "read":
        return child_read(args.root, rest)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.helpers import s3

    folder = make_data(args.images)
    server = s3.start()
    work = tempfile.mkdtemp(prefix="imgindex-object-storage-", dir=OUT)
    try:
        flags = server.beam_flags()
        bucket = server.make_bucket(BUCKET)
        client = server.client()
        names = sorted(os.listdir(folder))
        input_bytes = 0
        for name in names:
            client.upload_file(os.path.join(folder, name), BUCKET, f"in/{name}")
            input_bytes += os.path.getsize(os.path.join(folder, name))
        if args.read_only:
            _, _, out = run_child(MODULE, ["--child", "read", "--root", f"{bucket}/in", *flags])
            read = dict(zip(out.split()[::2], map(float, out.split()[1::2])))
            print(
                f"# GET + sha256 through Beam's FileSystems, one core: "
                f"{read['files'] / read['seconds']:.0f} objects/s; the reader's own CPU "
                f"{read['cpu'] / read['files'] * 1000:.1f} ms per object"
            )
            return
        walls: dict[str, list[float]] = {m: [] for m in ("build local", "build s3")}
        rss: dict[str, list[float]] = {m: [] for m in walls}
        opens: dict[str, list[float]] = {m: [] for m in ("open local", "open s3 cold", "open s3 warm")}
        written: dict[str, int] = {}
        downloaded = 0
        for round_ in range(args.rounds):
            local_root = os.path.join(work, f"local-{round_}")
            s3_root = f"{bucket}/root-{round_}"
            common = ["build", "--keep_runs=0", "--reuse_from=none"]
            for method, argv_ in (
                ("build local", [*common, f"--input={folder}/*.jpg", f"--output={local_root}"]),
                ("build s3", [*common, f"--input={bucket}/in/*.jpg", f"--output={s3_root}", *flags]),
            ):
                wall, peak, _ = run_child("imgindex.cli", argv_)
                walls[method].append(wall)
                rss[method].append(peak)
                print(f"# round {round_ + 1} {method}: {wall:.1f} s, peak RSS {peak:.0f} MB", flush=True)
            written["build local"] = _dir_bytes(os.path.join(local_root, "runs"))
            written["build s3"] = sum(
                o["Size"]
                for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix=f"root-{round_}/"
                )
                for o in page.get("Contents", [])
            )
            cache = os.path.join(work, f"cache-{round_}")
            for method, root in (
                ("open local", local_root),
                ("open s3 cold", s3_root),
                ("open s3 warm", s3_root),
            ):
                _, _, out = run_child(
                    MODULE, ["--child", "open", "--root", root, "--cache_dir", cache, *flags]
                )
                opens[method].append(float(out.split()[3]))
                if method == "open s3 cold":
                    downloaded = _dir_bytes(cache)
        _, _, out = run_child(MODULE, ["--child", "read", "--root", f"{bucket}/in", *flags])
        read = dict(zip(out.split()[::2], map(float, out.split()[1::2])))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    mb = 1e6
    local_build = statistics.median(walls["build local"])
    print(
        f"# object storage: {args.images:,} images ({input_bytes / mb:.1f} MB), moto S3 on 127.0.0.1, {environment()}"
    )
    print("| build | wall s (median) | ratio | peak RSS MB | inputs read MB | objects written MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in walls:
        wall = statistics.median(walls[method])
        print(
            f"| {method} | {wall:.1f} | {wall / local_build:.2f} | {statistics.median(rss[method]):.0f} | "
            f"{input_bytes / mb:.1f} | {written[method] / mb:.1f} |"
        )
    local_open = statistics.median(opens["open local"])
    print("| serving start (open + first query) | s (median) | ratio | downloaded MB |")
    print("|---|---:|---:|---:|")
    for method, values in opens.items():
        moved = downloaded / mb if method == "open s3 cold" else 0.0
        print(
            f"| {method} | {statistics.median(values):.2f} | {statistics.median(values) / local_open:.2f} | {moved:.1f} |"
        )
    print(f"# rounds: { {m: [round(w, 1) for w in v] for m, v in {**walls, **opens}.items()} }")
    print(
        f"# GET + sha256 through Beam's FileSystems, one core: {read['files'] / read['seconds']:.0f} objects/s, "
        f"{read['bytes'] / read['seconds'] / mb:.0f} MB/s; the reader's own CPU "
        f"{read['cpu'] / read['files'] * 1000:.1f} ms per object (the rest is moto on the same cores)"
    )


if __name__ == "__main__":
    main()
