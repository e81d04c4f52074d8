"""HTTP adapter, image queries that embed the image with the run's model (TensorFlow): by a
base64 JSON field and by a multipart upload."""

import base64

import pytest

from serving import Searcher
from serving.http import create_app
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call, multipart, running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_savedmodel):
    """A run with an image embedder "tiny" (d=8, the test SavedModel) and the 20 images it
    indexes."""
    root = tmp_path_factory.mktemp("http_images_root")
    images = rf.colour_images(20, seed=3)
    rf.write_run(root, {"tiny": rf.image_embedder(tiny_savedmodel, images)}, run_id="20260101T000000Z-http01")
    with running(create_app(Searcher.open(root))) as url:
        yield url, images


def test_search_by_image(served):
    url, images = served
    encoded = base64.b64encode(images["img-005"]).decode()
    status, body = call(url, "/v1/search", {"image": encoded, "k": 3, "embedder": "tiny"})
    assert status == 200 and body["hits"][0]["id"] == "img-005"
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert body["hits"][0]["metadata"]["source"] == "file:///images/img-005.png"


def test_search_by_multipart_upload(served):
    url, images = served
    data, content_type = multipart({"image": ("q.png", images["img-011"]), "k": "4", "embedder": "tiny"})
    status, body = call(url, "/v1/search", data=data, headers={"Content-Type": content_type})
    assert status == 200 and body["k"] == 4 and len(body["hits"]) == 4
    assert body["hits"][0]["id"] == "img-011"
