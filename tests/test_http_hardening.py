"""HTTP findings of the adversarial review (issue 14), each with the test that would have caught
it: deeply nested JSON (a 400, not a 500), echoed input cut short, no absolute server paths in
/v1/index, hits' "source" only when the operator asks, cosine scores within [-1, 1], the
OpenAPI description lists every error code the app answers."""

import json
import os
import re

import numpy as np
import pytest

from serving import Searcher
from serving.errors import ECHO_MAX_CHARS, shorten
from serving.http import create_app
from serving.openapi import ERROR_CODES
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call, running

RUN_ID = "20260101T000000Z-hard01"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening_root")
    rf.write_run(root, {"vec": rf.vector_embedder("vec", 300, 16, seed=4)}, run_id=RUN_ID)
    return root


@pytest.fixture(scope="module")
def served(root):
    searcher = Searcher.open(root)
    with running(create_app(searcher)) as url:
        yield url, searcher


def _raw(url, body):
    return call(url, "/v1/search", data=body, headers={"Content-Type": "application/json"})


def test_deeply_nested_json_is_a_400(served):
    url, _ = served
    for depth in (100_000, 5_000):  # above the value limit; below it but past the parser's recursion
        body = b'{"vector": ' + b"[" * depth + b"]" * depth + b"}"
        status, answer = _raw(url, body)
        assert (status, answer["error"]["code"]) == (400, "bad_json"), (depth, answer)
    status, answer = _raw(url, b'{"vector": [' + b"[]," * 200_000 + b"[]]}")
    assert (status, answer["error"]["code"]) == (400, "bad_json")
    assert "at most 100000" in answer["error"]["message"]
    # A vector of an ordinary dimension is still fine, and the server is alive.
    status, answer = call(url, "/v1/search", {"vector": [0.5] * 16, "k": 3})
    assert status == 200 and len(answer["hits"]) == 3


def test_echoed_input_is_cut_short(served):
    url, _ = served
    huge = "x" * 1_000_000
    cases = [
        ({"id": huge}, 404, "unknown_id"),
        ({"vector": [1.0] * 16, "embedder": huge}, 400, "unknown_embedder"),
        ({"vector": [1.0] * 16, "k": huge}, 400, "bad_k"),
        ({"vector": [1.0] * 16, huge: 1}, 400, "unknown_field"),
        ({"vector": [1.0] * 16, **{f"f{i}": 1 for i in range(1000)}}, 400, "unknown_field"),
    ]
    for payload, status, code in cases:
        got, answer = call(url, "/v1/search", payload)
        assert (got, answer["error"]["code"]) == (status, code)
        message = answer["error"]["message"]
        assert len(message) < 2 * ECHO_MAX_CHARS + 200, (code, len(message))
        if payload.get("id") == huge or payload.get("embedder") == huge:
            assert "... (1000002 chars)" in message
    got, answer = call(url, "/v1/search", data=b"{}", headers={"Content-Type": "text/" + "y" * 8000})
    assert (got, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert len(answer["error"]["message"]) < 400
    # A short id is echoed whole.
    got, answer = call(url, "/v1/search", {"id": "no-such-image"})
    assert got == 404 and "'no-such-image' is not in the index" in answer["error"]["message"]


def test_shorten():
    assert shorten("abc") == "'abc'"
    cut = shorten("z" * 1000)
    assert cut == "'" + "z" * (ECHO_MAX_CHARS - 1) + "... (1002 chars)"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_index_shows_no_absolute_server_paths(served, root):
    url, searcher = served
    status, info = call(url, "/v1/index")
    assert status == 200
    assert searcher.info()["run_dir"].startswith(str(root))  # the Python API keeps them
    assert (info["root"], info["run_dir"]) == (".", f"runs/{RUN_ID}")
    emb = info["embedders"]["vec"]
    assert emb["index_dir"] == f"runs/{RUN_ID}/index/vec"
    assert emb["handle"] == "savedmodel"  # the recorded handle is /nonexistent/savedmodel
    assert "source" not in emb["metadata_columns"]
    leaked = [s for s in _strings(info) if s.startswith("/") or str(root) in s]
    assert leaked == []


def test_index_of_a_run_directory_and_a_failed_refresh(tmp_path):
    run_dir = rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 50, 8, seed=1)}, run_id=RUN_ID)
    with running(create_app(Searcher.open(run_dir))) as url:
        info = call(url, "/v1/index")[1]
        assert (info["root"], info["run_dir"], info["embedders"]["v"]["index_dir"]) == (None, ".", "index/v")
    searcher = Searcher.open(tmp_path)
    with open(os.path.join(tmp_path, "LATEST"), "w") as f:
        f.write("runs/20260102T000000Z-gone00\n")
    with pytest.raises(Exception):
        searcher.refresh()
    with running(create_app(searcher)) as url:
        info = call(url, "/v1/index")[1]
    assert info["refresh"]["failed_run"] == "runs/20260102T000000Z-gone00"
    assert "gone00" in info["refresh"]["last_error"]
    assert [s for s in _strings(info) if str(tmp_path) in s] == []


def test_source_only_when_the_operator_asks(root):
    searcher = Searcher.open(root)
    assert "source" in searcher.search_id("vec-00001", k=1)[0].metadata  # Python API: everything
    with running(create_app(searcher, expose_source=True)) as url:
        status, body = call(url, "/v1/search", {"id": "vec-00001", "k": 2})
        assert status == 200
        assert body["hits"][0]["metadata"]["source"].startswith("file:///shards/")
        assert "source" in call(url, "/v1/index")[1]["embedders"]["vec"]["metadata_columns"]


def test_cosine_scores_stay_within_minus_one_and_one(served, root):
    url, searcher = served
    # Unit vectors in float32: a vector with itself gave 1.0000002 before the clamp.
    vectors = rf.vector_embedder("vec", 300, 16, seed=4).vectors
    top = [searcher.search_vector(v, k=1)[0].score for v in vectors[:100]]
    assert max(top) == 1.0 and min(top) > 0.99
    batch = searcher.search_vector(vectors[:100], k=3)
    assert max(hit.score for hits in batch for hit in hits) <= 1.0
    assert searcher.search_id("vec-00007", k=1)[0].score == 1.0
    body = call(url, "/v1/search", {"vector": vectors[7].tolist(), "k": 1})[1]
    assert body["hits"][0]["score"] == 1.0
    body = call(url, "/v1/search", {"vector": (-vectors[7]).tolist(), "k": 300})[1]
    scores = [hit["score"] for hit in body["hits"]]
    assert len(scores) == 300 and all(-1.0 <= s <= 1.0 for s in scores)
    assert scores[-1] < -0.99  # the item itself, opposite to the query


@pytest.mark.slow
def test_sharded_cosine_scores_stay_within_minus_one_and_one(sharded_build):
    searcher = Searcher.open(sharded_build.root)
    ids = searcher._state.embedders["tiny"].index.ids[:20]
    scores = [searcher.search_id(item, k=1)[0].score for item in ids]
    assert max(scores) <= 1.0 and min(scores) > 0.99


def test_openapi_is_served_and_lists_every_error_code(served):
    url, _ = served
    status, document = call(url, "/v1/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {"/v1/search", "/v1/healthz", "/v1/index", "/v1/openapi.json"}
    listed = {code for codes in ERROR_CODES.values() for code in codes}
    # Every code the serving code can answer, found in its source.
    here = os.path.join(os.path.dirname(__file__), "..")
    source = ""
    for directory in ("serving", "retrieval"):
        for name in os.listdir(os.path.join(here, directory)):
            if name.endswith(".py"):
                with open(os.path.join(here, directory, name)) as f:
                    source += f.read()
    found = set(re.findall(r'code ?= ?"([a-z_]+)"', source))
    found |= set(re.findall(r'ApiError\(\s*\d{3},\s*"([a-z_]+)"', source))
    found |= {"not_found", "method_not_allowed", "http_error"} - {"http_error"}
    assert found and found <= listed, found - listed
    statuses = {code: status for status, codes in ERROR_CODES.items() for code in codes}
    for status_text, response in document["paths"]["/v1/search"]["post"]["responses"].items():
        if status_text != "200":
            schema = response["content"]["application/json"]["schema"]
            codes = schema["properties"]["error"]["properties"]["code"]["enum"]
            assert {statuses[c] for c in codes} == {int(status_text)}
    assert json.dumps(document)  # JSON-serialisable as served


def test_vector_queries_are_unchanged_by_the_limits(served):
    url, searcher = served
    vector = np.random.default_rng(1).standard_normal(16).tolist()
    status, body = call(url, "/v1/search", {"vector": vector, "k": 5})
    assert status == 200
    assert [h["id"] for h in body["hits"]] == [h.id for h in searcher.search_vector(vector, k=5)]
