"""Re-ranking through serving: Searcher queries with expand=, a served DBA index, and the
HTTP fields (JSON "expand", form fields expand_n / expand_alpha) with their validation."""

import dataclasses

import numpy as np
import pytest

from retrieval.dba import DatabaseAugmentation
from serving import QueryError, QueryExpansion, Searcher
from serving.http import create_app
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call, multipart, running
from tests.test_rerank import numpy_expand, numpy_qe_search, numpy_top, unit

RUN_ID = "20260101T000000Z-rerank"


@pytest.fixture(scope="module")
def dba_run(tmp_path_factory):
    """A published run: "plain" (cosine, 400 x 16), "dba" (the same vectors, DBA n=3 alpha=3),
    "l2" (squared_l2, 100 x 16)."""
    base = rf.vector_embedder("plain", 400, 16, seed=7)
    l2 = rf.vector_embedder("l2", 100, 16, seed=8, distance="squared_l2")
    with_dba = dataclasses.replace(
        rf.vector_embedder("dba", 400, 16, seed=7), dba=DatabaseAugmentation(3, 3.0), metadata=None
    )
    root = tmp_path_factory.mktemp("rerank_root")
    rf.write_run(root, {"plain": base, "dba": with_dba, "l2": l2}, run_id=RUN_ID)
    return root, base.vectors


@pytest.fixture(scope="module")
def searcher(dba_run):
    return Searcher.open(dba_run[0])


@pytest.fixture(scope="module")
def url(searcher):
    with running(create_app(searcher)) as base_url:
        yield base_url


def test_expanded_vector_queries_match_numpy(searcher, dba_run):
    vectors = unit(dba_run[1])
    queries = rf.clustered(4, 16, seed=11)
    expand = QueryExpansion(5, 3)
    batch = searcher.search_vector(queries, k=6, embedder="plain", expand=expand)
    for q, result in zip(queries, batch):
        rows, scores = numpy_qe_search(q, vectors, 5, 6, 3.0)
        single = searcher.search_vector(q.tolist(), k=6, embedder="plain", expand=expand)
        assert [h.id for h in result] == [h.id for h in single] == [f"plain-{r:05d}" for r in rows]
        np.testing.assert_allclose([h.score for h in result], scores, atol=1e-5)
        assert [h.rank for h in result] == list(range(1, 7)) and result.embedder == "plain"
    plain = searcher.search_vector(queries[0], k=6, embedder="plain")
    assert plain.run_id == batch[0].run_id and plain.distance == batch[0].distance


def test_expanded_id_queries(searcher, dba_run):
    vectors = unit(dba_run[1])
    expand = QueryExpansion(3, 1)
    row = 17
    result = searcher.search_id("plain-00017", k=5, embedder="plain", expand=expand)
    expanded = numpy_expand(vectors[row], vectors[numpy_top(vectors[row], vectors, 3)], 1.0)
    assert [h.id for h in result] == [f"plain-{r:05d}" for r in numpy_top(expanded, vectors, 5)]
    others = searcher.search_id("plain-00017", k=5, embedder="plain", exclude_self=True, expand=expand)
    expanded = numpy_expand(vectors[row], vectors[numpy_top(vectors[row], vectors, 3, skip=row)], 1.0)
    assert [h.id for h in others] == [f"plain-{r:05d}" for r in numpy_top(expanded, vectors, 5, skip=row)]
    assert [h.rank for h in others] == [1, 2, 3, 4, 5]


def test_squared_l2_and_bad_expansions_are_refused(searcher):
    for call_it in (
        lambda: searcher.search_vector(np.ones(16), embedder="l2", expand=QueryExpansion(2, 1)),
        lambda: searcher.search_id("l2-00001", embedder="l2", expand=QueryExpansion(2, 1)),
        # before the image is decoded or its model (absent here) loaded
        lambda: searcher.search_image(b"not even an image", embedder="l2", expand=QueryExpansion(2, 1)),
    ):
        with pytest.raises(QueryError, match="squared_l2.*cosine and dot_product") as err:
            call_it()
        assert err.value.code == "expand_unsupported"
    with pytest.raises(QueryError, match="QueryExpansion") as err:
        searcher.search_vector(np.ones(16), embedder="plain", expand={"n": 2, "alpha": 1})
    assert err.value.code == "bad_expand"


def test_dba_index_serves_originals_and_searches_augmented_vectors(searcher, dba_run):
    vectors = unit(dba_run[1])
    augmented = np.stack(
        [numpy_expand(vectors[i], vectors[numpy_top(vectors[i], vectors, 3, skip=i)], 3) for i in range(400)]
    )
    np.testing.assert_allclose(searcher.get_vector("dba-00005", embedder="dba"), vectors[5], atol=2e-6)
    # an id query asks with the stored original; the index answers over the augmented rows
    result = searcher.search_id("dba-00005", k=4, embedder="dba")
    assert [h.id for h in result] == [f"dba-{r:05d}" for r in numpy_top(vectors[5], augmented, 4)]
    np.testing.assert_allclose(
        [h.score for h in result], augmented[numpy_top(vectors[5], augmented, 4)] @ vectors[5], atol=1e-5
    )
    # with expansion, the hits' vectors are the augmented ones (the index's own)
    expanded = numpy_expand(vectors[5], augmented[numpy_top(vectors[5], augmented, 2)], 3)
    result = searcher.search_id("dba-00005", k=4, embedder="dba", expand=QueryExpansion(2, 3))
    assert [h.id for h in result] == [f"dba-{r:05d}" for r in numpy_top(expanded, augmented, 4)]
    info = searcher.info()["embedders"]
    assert info["dba"]["dba"]["n"] == 3 and info["dba"]["dba"]["alpha"] == 3.0
    assert info["plain"]["dba"] is None
    assert (
        info["plain"]["query_expansion"],
        info["dba"]["query_expansion"],
        info["l2"]["query_expansion"],
    ) == (True, True, False)


def test_http_expand_matches_the_searcher(url, searcher):
    vector = rf.clustered(1, 16, seed=12)[0].tolist()
    status, body = call(
        url, "/v1/search", {"vector": vector, "k": 5, "embedder": "plain", "expand": {"n": 4, "alpha": 3}}
    )
    assert status == 200
    expected = searcher.search_vector(vector, k=5, embedder="plain", expand=QueryExpansion(4, 3))
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    status, body = call(
        url,
        "/v1/search",
        {
            "id": "plain-00003",
            "k": 3,
            "embedder": "plain",
            "exclude_self": True,
            "expand": {"n": 2, "alpha": 0},
        },
    )
    expected = searcher.search_id(
        "plain-00003", k=3, embedder="plain", exclude_self=True, expand=QueryExpansion(2, 0)
    )
    assert status == 200 and [h["id"] for h in body["hits"]] == [h.id for h in expected]
    status, body = call(url, "/v1/search", {"vector": vector, "embedder": "plain", "expand": None})
    assert status == 200 and len(body["hits"]) == 10  # null: no expansion
    status, info = call(url, "/v1/index")
    assert info["embedders"]["dba"]["dba"]["n"] == 3 and info["embedders"]["dba"]["query_expansion"] is True


@pytest.mark.parametrize(
    "expand, words",
    [
        ({"n": 0, "alpha": 1}, "from 1 to 100"),
        ({"n": 101, "alpha": 1}, "from 1 to 100"),
        ({"n": 2.5, "alpha": 1}, '"n" is 2.5'),
        ({"n": True, "alpha": 1}, '"n" is True'),
        ({"n": 3, "alpha": -1}, "finite number >= 0"),
        ({"n": 3, "alpha": "3"}, "\"alpha\" is '3'"),
        ({"n": 3}, "got {'n': 3}"),
        ({"n": 3, "alpha": 1, "beta": 2}, "'beta': 2"),
        ([5, 3], "got [5, 3]"),
    ],
)
def test_http_bad_expand_is_400_with_the_allowed_values(url, expand, words):
    status, body = call(url, "/v1/search", {"vector": [0.5] * 16, "embedder": "plain", "expand": expand})
    assert status == 400 and body["error"]["code"] == "bad_expand", body
    assert words in body["error"]["message"]
    assert body["error"]["message"].startswith(
        '"expand" must be {"n": an integer from 1 to 100, "alpha": a finite number >= 0}; '
    )


def test_http_expand_on_squared_l2_is_refused(url):
    status, body = call(
        url, "/v1/search", {"vector": [0.5] * 16, "embedder": "l2", "expand": {"n": 2, "alpha": 1}}
    )
    assert status == 400 and body["error"]["code"] == "expand_unsupported"
    assert "squared_l2" in body["error"]["message"] and "cosine and dot_product" in body["error"]["message"]


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"expand_n": "3"}, "bad_expand"),
        ({"expand_n": "0", "expand_alpha": "1"}, "bad_expand"),
        ({"expand_n": "x", "expand_alpha": "1"}, "bad_expand"),
        ({"expand_n": "3", "expand_alpha": "nan"}, "bad_expand"),
        ({"expand_n": "3", "expand_alpha": "-2"}, "bad_expand"),
    ],
)
def test_http_form_expand_fields_are_checked(url, fields, code):
    data, content_type = multipart({"image": ("q.png", b"\x89PNG not really"), "embedder": "plain", **fields})
    status, body = call(url, "/v1/search", data=data, headers={"Content-Type": content_type})
    assert status == 400 and body["error"]["code"] == code, body
    assert body["error"]["message"].startswith(
        'form fields "expand_n" (an integer from 1 to 100) and "expand_alpha"'
    )


def test_http_form_expand_on_squared_l2_is_refused_before_decoding(url):
    fields = {"image": ("q.png", b"not an image"), "embedder": "l2", "expand_n": "2", "expand_alpha": "1.5"}
    data, content_type = multipart(fields)
    status, body = call(url, "/v1/search", data=data, headers={"Content-Type": content_type})
    assert status == 400 and body["error"]["code"] == "expand_unsupported"
