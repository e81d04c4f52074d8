"""Image queries: embedding the query image with the run's model, the model cache (kept
while the served run uses it), refusal of other weights, handle overrides.  TensorFlow:
every test here loads a SavedModel."""

import concurrent.futures
import dataclasses
import threading
import time

import pytest

from retrieval.errors import HandleError, QueryError
from serving import BadImageError, Searcher
from tests.helpers import runs_fixture as rf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_savedmodel):
    root = tmp_path_factory.mktemp("img_root")
    images = rf.colour_images(24)
    data = rf.image_embedder(tiny_savedmodel, images)
    rf.write_run(root, {"tiny": data}, run_id="20260101T000000Z-image0")
    return root, images, data


def test_image_query_finds_the_indexed_image_and_agrees_with_id_query(image_run):
    root, images, data = image_run
    searcher = Searcher.open(root)
    for item_id in ("img-000", "img-007", "img-023"):
        by_image = searcher.search_image(images[item_id], k=5)
        assert by_image[0].id == item_id
        assert by_image[0].score == pytest.approx(1.0, abs=1e-5)
        assert by_image[1].score < by_image[0].score - 1e-4
        by_id = searcher.search_id(item_id, k=5)
        assert [h.id for h in by_image] == [h.id for h in by_id]
        assert by_image[0].metadata["width"] == 40 and by_image[0].metadata["height"] == 30
        assert by_image[0].metadata["source"] == f"file:///images/{item_id}.png"
    assert searcher.info()["embedders"]["tiny"]["model_loaded"] is True
    with pytest.raises(BadImageError, match="cannot be used"):
        searcher.search_image(b"definitely not an image")
    with pytest.raises(BadImageError):
        searcher.search_image(b"")


class _Loads(list):
    """The handles of the image models loaded (calls of retrieval.embedders.load).  With
    `gate` set to an Event, a load waits for it; `loading` is set once a load has started."""

    def __init__(self):
        super().__init__()
        self.gate = None
        self.loading = threading.Event()


@pytest.fixture
def loads(monkeypatch):
    from retrieval import embedders

    real_load = embedders.load
    calls = _Loads()

    def load(handle, cache_dir=None):
        calls.append(handle)
        if calls.gate is not None:
            calls.loading.set()
            assert calls.gate.wait(30), "the test never released the load"
        return real_load(handle, cache_dir=cache_dir)

    monkeypatch.setattr(embedders, "load", load)
    return calls


def test_refresh_keeps_the_model_a_new_run_uses_and_drops_the_others(image_run, tmp_path, loads):
    _, images, data = image_run
    rf.write_run(tmp_path, {"tiny": data}, run_id="20260101T000000Z-model1")
    searcher = Searcher.open(tmp_path)
    assert searcher.info()["embedders"]["tiny"]["model_loaded"] is False
    assert searcher.search_image(images["img-003"], k=1)[0].id == "img-003"
    assert len(loads) == 1 and searcher.info()["embedders"]["tiny"]["model_loaded"] is True
    # The next run was built with the same model: it stays loaded (not loaded again).
    rf.write_run(tmp_path, {"tiny": data}, run_id="20260102T000000Z-model2")
    assert searcher.refresh() is True
    assert searcher.info()["embedders"]["tiny"]["model_loaded"] is True
    assert searcher.search_image(images["img-004"], k=1)[0].id == "img-004"
    assert len(loads) == 1
    # A run built with other weights: the old model is dropped.
    other = dataclasses.replace(data, spec={**data.spec, "fingerprint": "sha256-tree:" + "1" * 64})
    rf.write_run(tmp_path, {"tiny": other}, run_id="20260103T000000Z-model3")
    assert searcher.refresh() is True
    assert searcher.info()["embedders"]["tiny"]["model_loaded"] is False


def test_a_query_on_a_swapped_out_run_gets_its_model_without_caching_it(image_run, tmp_path, loads):
    _, images, data = image_run
    run2 = "20260102T000000Z-swap02"
    rf.write_run(tmp_path, {"tiny": data}, run_id="20260101T000000Z-swap01")
    searcher = Searcher.open(tmp_path)
    other = dataclasses.replace(data, spec={**data.spec, "fingerprint": "sha256-tree:" + "1" * 64})
    rf.write_run(tmp_path, {"tiny": other}, run_id=run2)  # published: LATEST names it
    loads.gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A query starts on the served run and loads its model; meanwhile run 2 is swapped in.
        query = pool.submit(searcher.search_image, images["img-005"], k=1)
        assert loads.loading.wait(30)
        refresh = searcher.refresh(background=True)
        deadline = time.monotonic() + 30
        while searcher.run_id != run2:
            assert time.monotonic() < deadline, "the refresh did not swap in run 2"
            time.sleep(0.01)
        loads.gate.set()
        result = query.result(timeout=30)
    assert refresh.result(timeout=30) is True
    # The query ran on the old run with the old run's model ...
    assert result.run_id == "20260101T000000Z-swap01" and result[0].id == "img-005"
    assert len(loads) == 1
    # ... which the new run does not use, so it was not kept.
    assert searcher.info()["embedders"]["tiny"]["model_loaded"] is False


def test_image_query_refuses_other_weights(image_run, tmp_path, tiny_savedmodel):
    _, images, data = image_run
    data = dataclasses.replace(data, spec={**data.spec, "fingerprint": "sha256-tree:" + "0" * 64})
    rf.write_run(tmp_path, {"tiny": data}, run_id="20260101T000000Z-other0")
    searcher = Searcher.open(tmp_path)
    for _ in range(2):  # the second refusal comes from the remembered failure
        with pytest.raises(HandleError, match="built with other weights"):
            searcher.search_image(images["img-001"])
    assert searcher.search_id("img-001", k=1)[0].id == "img-001"  # vectors still served


OLD_PIXELS = "pillow-rgb/1: EXIF upright, alpha on white, JPEG draft, bilinear, pad 127"


def test_an_index_from_before_pad_and_filter_is_queried_with_its_own_preprocessing(tmp_path, tiny_savedmodel):
    images = rf.colour_images(6, size=(60, 20))  # wide: a pad and a crop see other pixels
    old = rf.image_embedder(tiny_savedmodel, images, options=",resize=pad,pad=grey,filter=bilinear")
    new = rf.image_embedder(tiny_savedmodel, images)
    assert float(old.vectors[2] @ new.vectors[2]) < 0.999  # the default is not what the index holds
    spec = {k: v for k, v in old.spec.items() if k not in ("pad", "filter")}  # as recorded then
    rf.write_run(tmp_path, {"tiny": dataclasses.replace(old, spec={**spec, "pixels": OLD_PIXELS})})
    hit = Searcher.open(tmp_path).search_image(images["img-002"], k=1)[0]
    assert hit.id == "img-002" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_image_queries_of_a_two_view_index_embed_both_views(tmp_path, tiny_savedmodel):
    images = rf.colour_images(6, size=(60, 20))
    data = rf.image_embedder(tiny_savedmodel, images, options=",resize=pad+crop")
    rf.write_run(tmp_path, {"tiny": data})
    hit = Searcher.open(tmp_path).search_image(images["img-004"], k=1)[0]
    assert hit.id == "img-004" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_image_queries_are_refused_for_pixels_this_version_does_not_make(image_run, tmp_path):
    _, images, data = image_run
    future = "pillow-rgb/2: some rule this version does not know, bilinear, pad 127"
    rf.write_run(tmp_path, {"tiny": dataclasses.replace(data, spec={**data.spec, "pixels": future})})
    searcher = Searcher.open(tmp_path)
    with pytest.raises(QueryError, match="image queries are unavailable.*must not be mixed") as err:
        searcher.search_image(images["img-001"])
    assert err.value.code == "image_queries_unavailable" and future in str(err.value)
    assert searcher.search_id("img-001", k=1)[0].id == "img-001"  # vectors still served


def test_handle_override_loads_the_model_from_elsewhere(image_run, tmp_path, tiny_savedmodel):
    _, images, data = image_run
    # The handle recorded at build time does not exist on this machine.
    data = dataclasses.replace(data, spec={**data.spec, "handle": str(tmp_path / "moved-away")})
    rf.write_run(tmp_path, {"tiny": data}, run_id="20260101T000000Z-moved0")
    with pytest.raises(HandleError, match="moved-away"):
        Searcher.open(tmp_path).search_image(images["img-002"])
    searcher = Searcher.open(tmp_path, handles={"tiny": tiny_savedmodel})
    assert searcher.search_image(images["img-002"], k=1)[0].id == "img-002"
