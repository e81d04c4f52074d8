"""build_index: exact brute force, the caller's array left alone, input checks (retrieval.index.build)."""

import numpy as np
import pyarrow as pa
import pytest

from retrieval.errors import ConfigError
from retrieval.index import IndexConfig, build_index
from tests.helpers.index_data import exact_ids


@pytest.mark.parametrize("distance", ["cosine", "dot_product", "squared_l2"])
def test_brute_force_is_exact(small, distance):
    vectors, ids = small
    index = build_index(vectors, ids, distance=distance)
    assert index.method == "brute_force" and index.manifest.recall["value"] == 1.0
    queries = vectors[:50] + 0.1
    got_ids, _ = index.search_batch(queries, k=5)
    assert got_ids == exact_ids(distance, vectors, queries, np.array(ids), 5)


def test_cosine_build_leaves_the_callers_array_alone(small):
    vectors, ids = small
    before = vectors.copy()
    build_index(vectors, ids, distance="cosine", num_queries=10)
    np.testing.assert_array_equal(vectors, before)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"vectors": np.zeros((0, 4), np.float32), "ids": []},
            r"vectors is empty \(shape \(0, 4\)\)",
        ),
        ({"vectors": np.zeros(4, np.float32)}, r"must be a 2-D array \(n, d\), got shape \(4,\)"),
        ({"vectors": np.array([[1.0, np.nan]] * 3)}, "row 0 contains NaN or infinite"),
        (
            {"vectors": np.array([[1.0, 1e39]] * 3)},
            "row 0 contains NaN or infinite",
        ),  # overflows float32
        ({"ids": ["a", "b"]}, "Got 2 ids for 3 vectors"),
        ({"ids": ["a", "b", "a"]}, "ids must be unique; 'a' occurs more than once"),
        ({"ids": ["a", "b", 3]}, r"ids\[2\] is 3 \(int\)"),
        ({"ids": pa.array(["a", "b"])}, "Got 2 ids for 3 vectors"),
        ({"ids": pa.chunked_array([["a", "b"], ["a"]])}, "ids must be unique; 'a' occurs more than once"),
        ({"ids": pa.array(["a", None, "c"])}, r"ids\[1\] is null"),
        ({"ids": pa.array([1, 2, 3])}, "ids must be strings; got an Arrow array of type int64"),
        (
            {"distance": "l2"},
            "Unknown distance 'l2'; allowed values: dot_product, cosine, squared_l2",
        ),
        ({"k": 0}, "k must be an integer >= 1, got 0"),
        (
            {"vectors": np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])},
            r"zero L2 norm \(first: row 1\)",
        ),
        ({"config": {"method": "tree_ah"}}, "config must be an IndexConfig"),
        (
            {"config": IndexConfig(method="hnsw")},
            "Unknown method 'hnsw'; allowed: brute_force, tree_ah",
        ),
    ],
)
def test_build_rejects_bad_input(change, message):
    args = {
        "vectors": np.eye(3, 2, dtype=np.float32) + 0.5,
        "ids": ["a", "b", "c"],
        "distance": "cosine",
        **change,
    }
    with pytest.raises(ConfigError, match=message):
        build_index(**args)


@pytest.mark.parametrize(
    "queries, message",
    [
        (np.zeros((3, 5), np.float32), r"tuning_queries must be a non-empty 2-D array \(q, 4\)"),
        (np.zeros((0, 4), np.float32), "non-empty"),
        (np.array([[1.0, np.nan, 0, 0]]), "tuning_queries: row 0 contains NaN"),
        (np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]), "zero L2 norm"),
    ],
)
def test_bad_tuning_queries_are_refused(queries, message):
    vectors = np.eye(4, dtype=np.float32) + 0.1
    with pytest.raises(ConfigError, match=message):
        build_index(vectors, list("abcd"), tuning_queries=queries)
