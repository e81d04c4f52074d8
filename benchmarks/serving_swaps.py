"""Hot swaps under query load: `imgindex serve` (127.0.0.1, --refresh_seconds 0.1) while
CLIENTS threads send vector and id queries without pause, PUBLISHES runs of N x D vectors
(brute force) published one after another, each waited for until it is served.  Prints the
failed queries and the server's RSS with the first run, right after the last swap and a few
seconds later, for `imgindex serve`'s malloc arena cap and for glibc's default (set with
MALLOC_ARENA_MAX=64, above glibc's 8 per core).

    python -m benchmarks.serving_swaps --publishes 40 --clients 8 --n 100000 --d 64

Uses the run writer and server runner of the tests (tests/helpers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import environment


def _publish(root: str, i: int, n: int, d: int) -> str:
    from retrieval.index import IndexConfig
    from tests.helpers import runs_fixture as rf

    data = rf.vector_embedder("vec", n, d, seed=100 + i)
    data.config = IndexConfig(method="brute_force")
    run_id = f"20260101T{i:06d}Z-swap{i % 100:02d}"
    rf.write_run(root, {"vec": data}, run_id=run_id)
    return run_id


def measure(arenas: str, args: argparse.Namespace) -> dict:
    from tests.helpers.http import call
    from tests.helpers.serve_process import serving

    root = tempfile.mkdtemp(prefix="serving-swaps-")
    _publish(root, 0, args.n, args.d)
    env = {"MALLOC_ARENA_MAX": "64"} if arenas == "glibc default" else {}
    with serving(root, "--refresh_seconds=0.1", env=env) as server:
        vector = np.random.default_rng(0).standard_normal(args.d).tolist()
        for _ in range(20):
            call(server.url, "/v1/search", {"vector": vector, "k": 10})
            call(server.url, "/v1/search", {"id": "vec-00001", "k": 10})
        first = server.rss_mb()
        stop, failed, answered, lock = threading.Event(), [0], [0], threading.Lock()

        def client(c: int) -> None:
            rng = np.random.default_rng(c)
            while not stop.is_set():
                if rng.random() < 0.5:
                    payload = {"vector": rng.standard_normal(args.d).tolist(), "k": 10}
                else:
                    payload = {"id": f"vec-{int(rng.integers(0, args.n)):05d}", "k": 10}
                try:
                    ok = call(server.url, "/v1/search", payload)[0] == 200
                except OSError:
                    ok = False
                with lock:
                    (answered if ok else failed)[0] += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        start = time.monotonic()
        peak = first
        for i in range(1, args.publishes + 1):
            run_id = _publish(root, i, args.n, args.d)
            while call(server.url, "/v1/healthz")[1]["run_id"] != run_id:
                time.sleep(0.02)
            peak = max(peak, server.rss_mb())
        stop.set()
        for t in threads:
            t.join()
        seconds = time.monotonic() - start
        time.sleep(0.5)
        after = server.rss_mb()
        time.sleep(5)
        later = server.rss_mb()
    return {
        "malloc_arenas": arenas,
        "publishes": args.publishes,
        "clients": args.clients,
        "run_matrix_mb": round(args.n * args.d * 4 / 2**20, 1),
        "queries": answered[0],
        "failed": failed[0],
        "seconds": round(seconds, 1),
        "rss_first_run_mb": round(first),
        "rss_peak_mb": round(peak),
        "rss_after_mb": round(after),
        "rss_5s_later_mb": round(later),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--publishes", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"# {environment()}")
    for _ in range(args.rounds):
        for arenas in ("imgindex serve (2)", "glibc default"):
            print(json.dumps(measure(arenas, args)), flush=True)


if __name__ == "__main__":
    main()
