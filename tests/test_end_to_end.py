"""The whole product: `imgindex build` -> LATEST -> Searcher -> HTTP on loopback, real client."""

import base64
import csv
import os
import threading

import numpy as np
import pytest

from pipelines import build
from retrieval import metrics, runs
from serving import Searcher
from tests.helpers import images
from tests.helpers.data import SHARED_DATA
from tests.helpers.http import call, running
from tests.helpers.shards import mixed_inputs

UKBENCH = os.path.join(SHARED_DATA, "ukbench56")

pytestmark = pytest.mark.slow  # each test builds with Beam, then serves over HTTP


def test_build_publish_search_and_http_agree(tmp_path, tiny_savedmodel):
    root = str(tmp_path / "root")
    argv = [f"--output={root}", f"--embedder=tiny={tiny_savedmodel},size=32"]
    first = build.run(mixed_inputs(tmp_path / "in1", 0) + argv)
    searcher = Searcher.open(root)
    assert searcher.run_id == first.manifest.run_id

    query = images.jpeg(56, 44, seed=3)  # the bytes of indexed item w3
    by_image = searcher.search_image(query, k=5)
    by_id = searcher.search_id("w3", k=5)
    by_vector = searcher.search_vector(searcher.get_vector("w3"), k=5)
    assert by_image[0].id == by_id[0].id == by_vector[0].id == "w3"
    assert [h.id for h in by_id] == [h.id for h in by_vector] == [h.id for h in by_image]
    assert by_image[0].metadata["source"].endswith("w.tar#w3.jpg")

    create_app = pytest.importorskip("serving.http", reason="the serve extra is not installed").create_app
    with running(create_app(searcher, refresh_seconds=0.2)) as url:
        assert call(url, "/v1/healthz")[1]["run_id"] == first.manifest.run_id
        status, body = call(url, "/v1/search", {"image": base64.b64encode(query).decode(), "k": 5})
        assert status == 200 and [h["id"] for h in body["hits"]] == [h.id for h in by_image]
        status, body = call(url, "/v1/search", {"id": "w3", "k": 5})
        assert status == 200 and [h["id"] for h in body["hits"]] == [h.id for h in by_id]
        vector = searcher.get_vector("w3").tolist()
        assert [h["id"] for h in call(url, "/v1/search", {"vector": vector, "k": 5})[1]["hits"]] == [
            h.id for h in by_vector
        ]
        assert call(url, "/v1/search", {"vector": vector[:3]})[0] == 400
        assert call(url, "/v1/search", {"id": "nope"})[0] == 404

        # The nightly rebuild publishes a new run while clients query: none fails, and the
        # server swaps to the new run by itself.
        errors, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                status, _ = call(url, "/v1/search", {"vector": vector, "k": 3})
                if status != 200:
                    errors.append(status)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            second = build.run(mixed_inputs(tmp_path / "in2", 50) + argv)
            for _ in range(100):
                if call(url, "/v1/index")[1]["run_id"] == second.manifest.run_id:
                    break
                threading.Event().wait(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors
        assert call(url, "/v1/index")[1]["run_id"] == second.manifest.run_id
        assert runs.read_latest(root) == second.run_dir


@pytest.mark.skipif(not os.path.isdir(UKBENCH), reason=f"real-photo set not found at {UKBENCH}")
def test_ukbench_through_build_and_http(tmp_path):
    with open(os.path.join(UKBENCH, "groups.tsv")) as f:
        groups = {os.path.basename(r["image"]): int(r["group"]) for r in csv.DictReader(f, delimiter="\t")}
    root = str(tmp_path / "root")
    build.run([f"--input={UKBENCH}/images/*.jpg", f"--output={root}"])
    create_app = pytest.importorskip("serving.http", reason="the serve extra is not installed").create_app
    with running(create_app(Searcher.open(root))) as url:
        retrieved, queried = [], []
        for name in sorted(groups):
            with open(os.path.join(UKBENCH, "images", name), "rb") as f:
                data = base64.b64encode(f.read()).decode()
            status, body = call(url, "/v1/search", {"image": data, "k": 4})
            assert status == 200
            retrieved.append([groups[h["id"]] for h in body["hits"]])
            queried.append(groups[name])
    score = metrics.ns_score(np.array(retrieved), np.array(queried))
    assert score >= 3.8, score  # same-object views in the top 4 (query included), max 4
