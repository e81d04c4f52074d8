"""HTTP adapter: the real app under the real server (hypercorn, as `imgindex serve` runs it) on
127.0.0.1, called with the stdlib HTTP client.

The run served here has no image model (TensorFlow is not needed); successful image queries,
by JSON and multipart upload, are in test_http_images.py."""

import base64
import http.client
import inspect
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serving import Searcher
from serving.http import create_app
from serving.http_server import serve
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call, multipart, running

MAX_BODY = 64 * 1024
RUN_ID = "20260101T000000Z-http00"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run with two embedders, "tiny" (20 x 8) and "vec" (300 x 16), whose recorded image
    models do not exist on this machine; and 20 images that decode."""
    root = tmp_path_factory.mktemp("http_root")
    images = rf.colour_images(20, seed=3)
    rf.write_run(
        root,
        {
            "tiny": rf.vector_embedder("tiny", 20, 8, seed=3),
            "vec": rf.vector_embedder("vec", 300, 16, seed=4),
        },
        run_id=RUN_ID,
    )
    searcher = Searcher.open(root)
    with running(create_app(searcher, max_body_bytes=MAX_BODY)) as url:
        yield url, searcher, images


def test_healthz_and_index(served):
    url, searcher, _ = served
    assert call(url, "/v1/healthz") == (200, {"status": "ok", "run_id": RUN_ID})
    status, info = call(url, "/v1/index")
    assert status == 200 and info["run_id"] == RUN_ID
    assert {name: (e["n"], e["d"], e["distance"]) for name, e in info["embedders"].items()} == {
        "tiny": (20, 8, "cosine"),
        "vec": (300, 16, "cosine"),
    }


def test_search_by_vector_and_id(served):
    url, searcher, _ = served
    vector = np.random.default_rng(0).standard_normal(16).tolist()
    status, body = call(url, "/v1/search", {"vector": vector, "k": 7, "embedder": "vec"})
    assert status == 200
    assert (body["embedder"], body["run_id"], body["k"]) == ("vec", RUN_ID, 7)
    assert body["distance"] == "cosine" and body["higher_is_better"] is True
    assert body["took_ms"] >= 0
    expected = searcher.search_vector(vector, k=7, embedder="vec")
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert [h["rank"] for h in body["hits"]] == list(range(1, 8))
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h.score for h in expected], rtol=1e-6)
    # "source" (shard paths on the server) is not shown unless the operator asks.
    assert body["hits"][0]["metadata"] == {k: v for k, v in expected[0].metadata.items() if k != "source"}
    assert set(body["hits"][0]["metadata"]) == {"sha256", "width", "height", "label", "caption"}
    assert "source" in expected[0].metadata  # the Python API returns everything

    status, body = call(url, "/v1/search", {"id": "vec-00042", "embedder": "vec"})
    assert status == 200 and len(body["hits"]) == 10 and body["hits"][0]["id"] == "vec-00042"
    status, others = call(
        url, "/v1/search", {"id": "vec-00042", "embedder": "vec", "k": 9, "exclude_self": True}
    )
    assert [h["id"] for h in others["hits"]] == [h["id"] for h in body["hits"][1:]]


def test_bad_multipart_uploads_get_what_was_wrong(served):
    url, _, images = served
    for fields, code in (
        ({"k": "4", "embedder": "tiny"}, "query_kind"),
        ({"image": ("q.png", b"not an image"), "embedder": "tiny"}, "undecodable_image"),
        ({"image": ("q.png", images["img-011"]), "k": "x", "embedder": "tiny"}, "bad_k"),
        ({"image": ("q.png", images["img-011"]), "top": "3"}, "unknown_field"),
    ):
        data, content_type = multipart(fields)
        status, body = call(url, "/v1/search", data=data, headers={"Content-Type": content_type})
        assert body["error"]["code"] == code, body
        assert status == (422 if code == "undecodable_image" else 400)
    status, body = call(
        url, "/v1/search", data=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert status == 400 and body["error"]["code"] in ("bad_multipart", "query_kind")


def _error(url, payload=None, **kwargs):
    status, body = call(url, "/v1/search", payload, **kwargs)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return status, body["error"]["code"], body["error"]["message"]


def test_bad_requests_get_400_with_what_was_wrong(served):
    url, _, images = served
    ok = {"embedder": "vec"}
    status, code, message = _error(
        url, data=b'{"vector": [1, 2', headers={"Content-Type": "application/json"}
    )
    assert (status, code) == (400, "bad_json") and "not valid JSON" in message
    assert _error(url, [1, 2, 3])[:2] == (400, "bad_json")
    status, code, message = _error(url, {"k": 3, **ok})
    assert (status, code) == (400, "query_kind") and "got none" in message
    status, code, message = _error(url, {"vector": [1.0] * 16, "id": "vec-00001", **ok})
    assert (status, code) == (400, "query_kind") and "vector, id" in message
    status, code, message = _error(url, {"vector": [1.0] * 15, **ok})
    assert (status, code) == (400, "dimension_mismatch") and "dimension 16, got 15" in message
    for bad in ("NaN", "Infinity", "-Infinity", "1e999"):
        data = f'{{"embedder": "vec", "vector": [{bad}{", 1" * 15}]}}'.encode()
        status, code, message = _error(url, data=data, headers={"Content-Type": "application/json"})
        assert (status, code) == (400, "non_finite") and "NaN or infinite" in message
    for k in (0, 1001, -5, "5", 2.5, True, None):
        status, code, message = _error(url, {"vector": [1.0] * 16, "k": k, **ok})
        assert (status, code) == (400, "bad_k") and "1 to 1000" in message
    status, body = call(url, "/v1/search", {"vector": [1.0] * 16, "k": 1000, **ok})
    assert status == 200 and len(body["hits"]) == 300  # k is clamped to n
    status, code, message = _error(url, {"vector": ["a"] * 16, **ok})
    assert (status, code) == (400, "bad_vector")
    status, code, message = _error(url, {"vector": [0.0] * 16, **ok})
    assert (status, code) == (400, "zero_vector")
    status, code, message = _error(url, {"vector": [1.0] * 16, "top_k": 3, **ok})
    assert (status, code) == (400, "unknown_field") and "top_k" in message
    status, code, message = _error(url, {"vector": [1.0] * 16})
    assert (status, code) == (400, "embedder_required") and "tiny, vec" in message
    status, code, message = _error(url, {"vector": [1.0] * 16, "embedder": "big"})
    assert (status, code) == (400, "unknown_embedder") and "available: tiny, vec" in message
    status, code, message = _error(url, {"image": "@@not base64@@", "embedder": "tiny"})
    assert (status, code) == (400, "bad_base64")
    status, code, message = _error(url, {"id": 5, **ok})
    assert (status, code) == (400, "bad_id")
    status, code, message = _error(url, {"vector": [1.0] * 16, "exclude_self": True, **ok})
    assert (status, code) == (400, "bad_request") and "id queries only" in message
    status, code, message = _error(url, data=b"vector=1", headers={"Content-Type": "text/plain"})
    assert (status, code) == (415, "unsupported_media_type")


def test_unknown_id_404_and_undecodable_image_422(served):
    url, _, _ = served
    status, code, message = _error(url, {"id": "no-such-image", "embedder": "vec"})
    assert (status, code) == (404, "unknown_id") and "'no-such-image'" in message
    junk = base64.b64encode(b"GIF89a but not really").decode()
    status, code, message = _error(url, {"image": junk, "embedder": "tiny"})
    assert (status, code) == (422, "undecodable_image") and "cannot be used" in message
    # "vec" records a model that does not exist on this machine.
    image = base64.b64encode(served[2]["img-000"]).decode()
    status, code, message = _error(url, {"image": image, "embedder": "vec"})
    assert (status, code) == (503, "embedder_unavailable") and "/nonexistent/savedmodel" in message
    status, body = call(url, "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = call(url, "/v1/search")  # GET
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url + "/v1/search", timeout=30)
    with caught.value as response:
        assert response.code == 405 and response.headers["Allow"] == "POST"


def test_body_too_large_413(served):
    url, _, _ = served
    big = {"embedder": "vec", "vector": [0.123456789] * 6000}  # > 64 KiB
    status, code, message = _error(url, big)
    assert (status, code) == (413, "body_too_large") and str(MAX_BODY) in message
    # Without Content-Length (chunked): counted while reading.
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = [b'{"embedder": "vec", "vector": [' + b"0.5, " * 8000, b"0.5, " * 8000 + b"0.5]}"]
    conn.request(
        "POST",
        "/v1/search",
        body=iter(chunks),
        encode_chunked=True,
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and body["error"]["code"] == "body_too_large"
    # The server still answers afterwards.
    assert call(url, "/v1/healthz")[0] == 200


def test_background_refresh_follows_latest(tmp_path):
    run1, run2 = "20260101T000000Z-aaaa01", "20260102T000000Z-bbbb02"
    rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 200, 8, seed=1)}, run_id=run1)
    searcher = Searcher.open(tmp_path)
    with running(create_app(searcher, refresh_seconds=0.1)) as url:
        assert call(url, "/v1/healthz")[1]["run_id"] == run1
        rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 250, 8, seed=2)}, run_id=run2)
        deadline = time.monotonic() + 15
        while call(url, "/v1/healthz")[1]["run_id"] != run2:
            status, body = call(url, "/v1/search", {"id": "v-00001", "k": 3})
            assert status == 200, body  # queries keep working during the refresh
            assert time.monotonic() < deadline, "the refresh task did not pick up the new run"
            time.sleep(0.05)
        status, body = call(url, "/v1/search", {"id": "v-00220", "k": 3})
        assert status == 200 and body["run_id"] == run2
        assert call(url, "/v1/index")[1]["embedders"]["v"]["n"] == 250


def test_serve_binds_loopback_by_default():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_metadata_values_become_valid_json():
    import datetime

    from serving.http_json import SafeJSONResponse

    body = SafeJSONResponse(
        {
            "hits": [
                {
                    "score": 1.0,
                    "metadata": {
                        "nan": float("nan"),
                        "inf": float("inf"),
                        "blob": b"\x00\xff",
                        "when": datetime.date(2026, 1, 2),
                        "n": np.int64(3),
                        "x": np.float32(0.5),
                        "nested": [float("nan"), 1],
                    },
                }
            ]
        }
    ).body
    assert json.loads(body) == {
        "hits": [
            {
                "score": 1.0,
                "metadata": {
                    "nan": None,
                    "inf": None,
                    "blob": "AP8=",
                    "when": "2026-01-02",
                    "n": 3,
                    "x": 0.5,
                    "nested": [None, 1],
                },
            }
        ]
    }
