"""Serving: index build cost, in-process and HTTP query latency, image-query breakdown.

Data: N x D clustered synthetic vectors (2,000 Gaussian clusters, L2-normalised; default
1,000,000 x 256), built into a published run with the default index configuration.
Measured, each part in its own process where it matters:
  build     seconds and peak RSS (whole process tree) of build_index + save
  open      Searcher.open of the published root (checksums verified)
  in-process  latency of single vector queries (batch of 1, k=10), p50 and p99
  http      `imgindex serve` on 127.0.0.1; C client threads send R requests each (bounded),
            p50 / p99 latency and throughput
  image     decode, embed (builtin model) and search times of single image queries, p50
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

from benchmarks.common import clustered, environment, run_child
from benchmarks.pipeline_throughput import OUT

MODULE = "benchmarks.serving_latency"
UKBENCH = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ukbench56", "images")
)


def child_build(root: str, n: int, d: int) -> None:
    """Builds and publishes the benchmark run (called in a fresh process)."""
    import pyarrow as pa

    from retrieval import index, run_status, runs

    x = clustered(n, d)
    ids = [f"v{i}" for i in range(n)]
    start = time.perf_counter()
    built = index.build_index(x, ids, distance="cosine")
    seconds = time.perf_counter() - start
    run_id = runs.new_run_id()
    run_directory = runs.run_dir(root, run_id)
    path = runs.index_dir(run_directory, "synthetic")
    meta = pa.table({"id": ids, "source": [f"synthetic#{i}" for i in range(n)]})
    built.save(path, tables={index.METADATA_FILE: meta})
    m = built.manifest
    spec = {"name": "synthetic", "handle": "synthetic", "fingerprint": "synthetic", "dim": d}
    runs.write_run_manifest(
        run_directory,
        runs.RunManifest(
            run_id=run_id,
            status="published",
            inputs={},
            counts={"records": n},
            gates={"passed": True},
            timings={},
            embedders={"synthetic": runs.embedder_entry(run_directory, "synthetic", built, spec)},
        ),
    )
    run_status.publish(root, run_id)
    print(f"build {seconds:.2f} recall {m.recall['value']} method {built.method} search {m.search_defaults}")


def _percentiles(ms):
    return statistics.median(ms), float(np.percentile(ms, 99))


def child_inprocess(root: str, queries: int) -> None:
    start = time.perf_counter()
    from serving import Searcher

    imported = time.perf_counter()
    searcher = Searcher.open(root)
    opened = time.perf_counter()
    d = searcher.info()["embedders"]["synthetic"]["d"]
    q = clustered(queries, d, seed=1)
    for v in q[:50]:
        searcher.search_vector(v, k=10)
    times = []
    for v in q:
        t = time.perf_counter()
        searcher.search_vector(v, k=10)
        times.append((time.perf_counter() - t) * 1000)
    p50, p99 = _percentiles(times)
    print(f"import {imported - start:.3f} open {opened - imported:.2f} p50 {p50:.3f} p99 {p99:.3f}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_load(root: str, clients: int, requests_each: int, d: int) -> dict:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "imgindex.cli", "serve", root, "--port", str(port), "--refresh_seconds", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/healthz", timeout=2).read()
                break
            except OSError as exc:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start") from exc
                time.sleep(0.5)
        q = clustered(clients * requests_each, d, seed=2)
        latencies: list[float] = []
        lock = threading.Lock()

        def client(c):
            mine = []
            for v in q[c * requests_each : (c + 1) * requests_each]:
                body = json.dumps({"vector": v.tolist(), "k": 10}).encode()
                req = urllib.request.Request(f"{url}/v1/search", body, {"Content-Type": "application/json"})
                t = time.perf_counter()
                urllib.request.urlopen(req, timeout=30).read()
                mine.append((time.perf_counter() - t) * 1000)
            with lock:
                latencies.extend(mine)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        p50, p99 = _percentiles(latencies)
        return {"p50": p50, "p99": p99, "qps": len(latencies) / wall, "requests": len(latencies)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def child_image(images: int) -> None:
    from retrieval import embedders, imaging, index

    model, spec = embedders.complete_spec(embedders.parse_embedder_arg("lite=builtin:efficientnet-lite0"))
    files = sorted(os.path.join(UKBENCH, f) for f in os.listdir(UKBENCH))[:images]
    data = [open(p, "rb").read() for p in files]
    x = clustered(100_000, spec.dim, seed=3)
    built = index.build_index(x, [str(i) for i in range(len(x))], distance="cosine", num_queries=200)
    decode_ms, embed_ms, search_ms = [], [], []
    for raw in data[:3] + data:
        t0 = time.perf_counter()
        pixels = imaging.resize(
            imaging.decode(raw, min_size=spec.input_size).image, spec.input_size, spec.resizing()
        )
        t1 = time.perf_counter()
        vector = embedders.embed_batch(model, spec, pixels[None])[0]
        t2 = time.perf_counter()
        built.search(vector, k=10)
        t3 = time.perf_counter()
        decode_ms.append((t1 - t0) * 1000)
        embed_ms.append((t2 - t1) * 1000)
        search_ms.append((t3 - t2) * 1000)
    med = lambda v: statistics.median(v[3:])  # noqa: E731  (first 3 are warm-up)
    print(
        f"decode {med(decode_ms):.2f} embed {med(embed_ms):.2f} search {med(search_ms):.3f} "
        f"method {built.method}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=250, help="requests per HTTP client")
    parser.add_argument("--child", choices=["build", "inprocess", "image"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "build":
        return child_build(args.root, args.n, args.d)
    if args.child == "inprocess":
        return child_inprocess(args.root, args.queries)
    if args.child == "image":
        return child_image(56)

    root = os.path.join(OUT, f"serving-{args.n}x{args.d}")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    wall, rss, out = run_child(
        MODULE, ["--child", "build", "--root", root, "--n", str(args.n), "--d", str(args.d)]
    )
    build = out.split()
    matrix_mb = args.n * args.d * 4 / 2**20
    _, _, out = run_child(MODULE, ["--child", "inprocess", "--root", root, "--queries", str(args.queries)])
    inproc = dict(zip(out.split()[::2], map(float, out.split()[1::2])))
    http = http_load(root, args.clients, args.requests, args.d)
    image = {}
    if os.path.isdir(UKBENCH):
        _, _, out = run_child(MODULE, ["--child", "image"])
        image = dict(zip(out.split()[::2], out.split()[1::2]))

    print(f"# serving: n={args.n} d={args.d} cosine, default config ({' '.join(build[4:])}), {environment()}")
    print("| measure | value |\n|---|---:|")
    print(f"| index build (build_index incl. recall tuning) | {float(build[1]):.1f} s |")
    print(
        f"| build process peak RSS / float32 matrix | {rss:.0f} MB / {matrix_mb:.0f} MB ({rss / matrix_mb:.2f}x) |"
    )
    print(f"| recall@10 recorded in the manifest | {build[3]} |")
    print(f"| `import serving` | {inproc['import'] * 1000:.0f} ms |")
    print(f"| Searcher.open (verify checksums, load) | {inproc['open']:.2f} s |")
    print(f"| in-process vector query, k=10, p50 / p99 | {inproc['p50']:.3f} / {inproc['p99']:.3f} ms |")
    print(
        f"| HTTP POST /v1/search, {args.clients} clients x {args.requests}, p50 / p99 | "
        f"{http['p50']:.2f} / {http['p99']:.2f} ms |"
    )
    print(f"| HTTP throughput | {http['qps']:.0f} requests/s |")
    if image:
        print(
            f"| image query: decode / embed / search (100k x 1280 {image['method']}), p50 | "
            f"{image['decode']} / {image['embed']} / {image['search']} ms |"
        )


if __name__ == "__main__":
    main()
