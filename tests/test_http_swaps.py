"""Hot swaps under load (issue 14): runs published one after another while client threads
query `imgindex serve` (a subprocess on 127.0.0.1) without pause: no failed query, every
swap logged, and the server's RSS back to about one run's size afterwards (old runs freed).
`make stress` runs the larger version."""

import threading
import time

import numpy as np
import pytest

from retrieval.index import IndexConfig
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call
from tests.helpers.serve_process import serving


def _run(root, i, n, d):
    data = rf.vector_embedder("vec", n, d, seed=100 + i)
    data.config = IndexConfig(method="brute_force")
    rf.write_run(root, {"vec": data}, run_id=f"20260101T{i:06d}Z-swap{i:02d}")


def _swaps_under_load(root, publishes, clients, n, d):
    _run(root, 0, n, d)
    run_bytes = n * d * 4
    with serving(root, "--refresh_seconds=0.1") as server:
        vector = np.random.default_rng(0).standard_normal(d).tolist()
        for _ in range(20):  # warm up: both query kinds
            assert call(server.url, "/v1/search", {"vector": vector, "k": 10})[0] == 200
            assert call(server.url, "/v1/search", {"id": "vec-00001", "k": 10})[0] == 200
        rss_one_run = server.rss_mb()
        stop = threading.Event()
        failures, answers, seen = [], [0], set()
        lock = threading.Lock()

        def client(c):
            rng = np.random.default_rng(c)
            while not stop.is_set():
                if rng.random() < 0.5:
                    payload = {"vector": rng.standard_normal(d).tolist(), "k": 10}
                else:
                    payload = {"id": f"vec-{int(rng.integers(0, n)):05d}", "k": 10, "exclude_self": True}
                try:
                    status, body = call(server.url, "/v1/search", payload)
                except OSError as exc:
                    status, body = None, repr(exc)
                with lock:
                    if status != 200 or len(body["hits"]) != 10:
                        failures.append((status, body))
                    else:
                        answers[0] += 1
                        seen.add(body["run_id"])

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        try:
            for i in range(1, publishes + 1):
                _run(root, i, n, d)
                deadline = time.monotonic() + 30
                while call(server.url, "/v1/healthz")[1]["run_id"] != f"20260101T{i:06d}Z-swap{i:02d}":
                    assert time.monotonic() < deadline, f"run {i} was not swapped in"
                    time.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert failures == []
        assert answers[0] > 10 * publishes and len(seen) >= publishes // 2
        swaps = server.wait_for_line(r"INFO serving\.searcher: now serving run \S+, was \S+")
        assert len(swaps) == publishes
        time.sleep(0.5)
        rss_after = server.rss_mb()
        # A run holds its vectors twice (ScaNN's copy, the stored rows): had old runs been
        # kept, RSS would have grown by ~publishes x that.  What does stay is the C
        # allocator's (freed blocks kept in its arenas; `imgindex serve` caps them at 2):
        # +77 to +117 MB measured after 10 swaps of this size (BENCHMARKS.md, "Hot swaps").
        per_run = 2 * run_bytes / 2**20
        grown = rss_after - rss_one_run
        assert grown < 60 + 4 * per_run < publishes * per_run, (rss_one_run, rss_after)
        return rss_one_run, rss_after


@pytest.mark.slow
def test_publishes_under_query_load_fail_no_query(tmp_path):
    _swaps_under_load(tmp_path, publishes=10, clients=4, n=60_000, d=64)


@pytest.mark.stress
def test_stress_many_publishes_under_query_load(tmp_path):
    _swaps_under_load(tmp_path, publishes=40, clients=8, n=100_000, d=64)
