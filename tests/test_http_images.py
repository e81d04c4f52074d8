"""HTTP adapter, image queries that embed the image with the run's model (TensorFlow): by a
base64 JSON field and by a multipart upload."""

import base64
import time

import pytest

from serving import Searcher
from serving.http import create_app
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call, multipart, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, tiny_savedmodel):
    """The root of a run with an image embedder "tiny" (d=8, the test SavedModel), and the 20
    images it indexes."""
    root = tmp_path_factory.mktemp("http_images_root")
    images = rf.colour_images(20, seed=3)
    rf.write_run(root, {"tiny": rf.image_embedder(tiny_savedmodel, images)}, run_id="20260101T000000Z-http01")
    return root, images


@pytest.fixture(scope="module")
def served(image_root):
    root, images = image_root
    with running(create_app(Searcher.open(root))) as url:
        yield url, images


def test_search_by_image(served):
    url, images = served
    encoded = base64.b64encode(images["img-005"]).decode()
    status, body = call(url, "/v1/search", {"image": encoded, "k": 3, "embedder": "tiny"})
    assert status == 200 and body["hits"][0]["id"] == "img-005"
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert set(body["hits"][0]["metadata"]) == {"sha256", "width", "height"}  # no "source" by default


def test_search_by_multipart_upload(served):
    url, images = served
    data, content_type = multipart({"image": ("q.png", images["img-011"]), "k": "4", "embedder": "tiny"})
    status, body = call(url, "/v1/search", data=data, headers={"Content-Type": content_type})
    assert status == 200 and body["k"] == 4 and len(body["hits"]) == 4
    assert body["hits"][0]["id"] == "img-011"


def test_image_queries_with_query_expansion(served, image_root):
    """JSON "expand" and the form fields expand_n / expand_alpha give the Searcher's answer."""
    from serving import QueryExpansion

    url, images = served
    expected = Searcher.open(image_root[0]).search_image(images["img-007"], k=4, expand=QueryExpansion(3, 3))
    encoded = base64.b64encode(images["img-007"]).decode()
    status, body = call(url, "/v1/search", {"image": encoded, "k": 4, "expand": {"n": 3, "alpha": 3}})
    assert status == 200 and [h["id"] for h in body["hits"]] == [h.id for h in expected]
    fields = {"image": ("q.png", images["img-007"]), "k": "4", "expand_n": "3", "expand_alpha": "3"}
    data, content_type = multipart(fields)
    status, body = call(url, "/v1/search", data=data, headers={"Content-Type": content_type})
    assert status == 200 and [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert expected[0].id == "img-007"  # the indexed copy of the query image is among the hits


def _flat(fmt, mode, width, height):
    import io

    from PIL import Image

    colour = (90, 140, 200, 128) if mode == "RGBA" else (90, 140, 200)
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, fmt, **({"compress_level": 9} if fmt == "PNG" else {}))
    return buf.getvalue()


def test_concurrent_large_image_queries_keep_memory_bounded(tmp_path, tiny_savedmodel):
    """16 PNGs at once, each a few KB declaring 6 MP with alpha (~115 MB to decode): at most
    max_image_queries (2) decode at once, so RSS grows by about two decodes, not sixteen."""
    import threading

    from tests.helpers.serve_process import serving

    images = rf.colour_images(20, seed=3)
    rf.write_run(
        tmp_path, {"tiny": rf.image_embedder(tiny_savedmodel, images)}, run_id="20260101T000000Z-mem001"
    )
    bomb = base64.b64encode(_flat("PNG", "RGBA", 3000, 2000)).decode()
    assert len(bomb) < 60_000
    with serving(tmp_path, "--refresh_seconds=0") as server:
        small = base64.b64encode(images["img-003"]).decode()
        assert call(server.url, "/v1/search", {"image": small, "k": 1})[1]["hits"][0]["id"] == "img-003"
        with_model = server.rss_mb()
        peak, done = [with_model], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], server.rss_mb())
                time.sleep(0.02)

        answers = []

        def query():
            answers.append(call(server.url, "/v1/search", {"image": bomb, "k": 3}, timeout=120)[0])

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=query) for _ in range(16)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        done.set()
        sampler.join()
        assert answers == [200] * 16
        one_decode = 6 * 19  # MB: 19 MB a megapixel for PNG with alpha (BENCHMARKS.md)
        assert peak[0] - with_model < 2 * one_decode + 150, (with_model, peak[0])
        assert server.rss_mb() - with_model < one_decode + 100
        # Above the pixel limit: refused before decoding; a JPEG counts at its reduced size.
        big_png = base64.b64encode(_flat("PNG", "RGB", 5000, 4000)).decode()
        status, body = call(server.url, "/v1/search", {"image": big_png})
        assert (status, body["error"]["code"]) == (422, "undecodable_image")
        assert "above the query limit of 16000000 decoded pixels" in body["error"]["message"]
        big_jpeg = base64.b64encode(_flat("JPEG", "RGB", 5000, 4000)).decode()
        assert call(server.url, "/v1/search", {"image": big_jpeg, "k": 2})[0] == 200
        server.wait_for_line(r"refused POST /v1/search from [\d.:]+: 422 undecodable_image")
