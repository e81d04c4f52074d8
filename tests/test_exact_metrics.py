"""Exact search against a naive full-matrix reference, and metrics on hand-computed examples."""

import tracemalloc

import numpy as np
import pytest

from retrieval.errors import ConfigError
from retrieval.exact import DISTANCES, exact_search, normalize_rows
from retrieval.metrics import (
    average_precision,
    mean_average_precision,
    ns_score,
    precision_at_k,
    recall_at_k,
)


def _naive(queries, database, k, distance):
    """Full score matrix, stable sort: the reference exact_search must reproduce."""
    queries = queries.astype(np.float64)
    database = database.astype(np.float64)
    if distance == "cosine":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if distance == "squared_l2":
        scores = ((queries[:, None, :] - database[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1, kind="stable")
    else:
        scores = queries @ database.T
        order = np.argsort(-scores, axis=1, kind="stable")
    order = order[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((40, 12)).astype(np.float32), rng.standard_normal((301, 12)).astype(np.float32)


@pytest.mark.parametrize("distance", DISTANCES)
# 1 and 7 force many blocks whose edges fall inside the top-k (1: one score a block, slow);
# 40*301 is a single block.
@pytest.mark.parametrize("block_elements", [pytest.param(1, marks=pytest.mark.slow), 7, 64, 1000, 40 * 301])
@pytest.mark.parametrize("k", [1, 5, 301])
def test_exact_matches_naive_reference(data, distance, block_elements, k):
    queries, database = data
    if distance == "cosine":
        database = normalize_rows(database)
    indices, scores = exact_search(queries, database, k, distance, block_elements=block_elements)
    ref_indices, ref_scores = _naive(queries, database, k, distance)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    assert indices.shape == scores.shape == (len(queries), k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


def test_k_larger_than_n_is_clamped(data):
    queries, database = data
    indices, scores = exact_search(queries, database[:6], 50, "dot_product")
    assert indices.shape == scores.shape == (len(queries), 6)
    assert sorted(indices[0]) == list(range(6))


@pytest.mark.parametrize("distance", DISTANCES)
def test_ties_are_broken_by_index_across_blocks(distance):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 4)).astype(np.float32)
    database = normalize_rows(np.repeat(base, 4, axis=0))  # rows 4i..4i+3 are identical
    queries = database[[0, 9, 18]]
    # Blocks of 3 columns split every group of 4 duplicates across two blocks.
    indices, _ = exact_search(queries, database, 6, distance, block_elements=3)
    np.testing.assert_array_equal(indices, _naive(queries, database, 6, distance)[0])
    assert list(indices[1][:4]) == [8, 9, 10, 11]


@pytest.mark.parametrize("distance", DISTANCES)
def test_ties_at_the_cut_off_keep_the_lowest_indices(distance):
    # 12 copies of the query scattered in one block of 200 rows; only 3 fit in the
    # top-k, and they must be the 3 lowest-indexed copies.
    rng = np.random.default_rng(5)
    database = normalize_rows(rng.standard_normal((200, 6)))
    copies = np.sort(rng.choice(200, 12, replace=False))
    database[copies] = database[copies[0]]
    indices, _ = exact_search(database[copies[:1]], database, 3, distance)
    np.testing.assert_array_equal(indices[0], copies[:3])


@pytest.mark.parametrize("distance", ["dot_product", "squared_l2"])
def test_many_ties_across_many_blocks_match_the_reference(distance):
    # Small integers give exact float scores with many equal keys, so later blocks hold
    # keys equal to the current k-th best (they must not enter) and rows differ in how
    # many keys beat it (the padded candidate path).
    rng = np.random.default_rng(11)
    database = rng.integers(-2, 3, size=(2000, 3)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(30, 3)).astype(np.float32)
    for k, block_elements in ((1, 900), (7, 3000), (40, 30 * 64)):
        indices, _ = exact_search(queries, database, k, distance, block_elements=block_elements)
        np.testing.assert_array_equal(indices, _naive(queries, database, k, distance)[0])


def test_squared_l2_self_distance_is_exactly_zero():
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32) * 100
    indices, scores = exact_search(x, x, 1, "squared_l2")
    np.testing.assert_array_equal(indices[:, 0], np.arange(50))
    assert np.all(scores[:, 0] == 0) and not np.signbit(scores).any()


def test_cosine_ignores_query_scale(data):
    queries, database = data
    database = normalize_rows(database)
    a = exact_search(queries, database, 5, "cosine")
    b = exact_search(queries * 7.5, database, 5, "cosine")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    assert np.all(np.abs(a[1]) <= 1 + 1e-6)


def test_normalize_rows_survives_float32_overflow_and_underflow():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    unit = normalize_rows(x)
    # Squares of 1e20 overflow float32, squares of 1e-25 underflow it; the direction stays.
    scaled = x * np.array([1, 1e20, 1e-25, 3e38 / 5, 1e-35, 1], np.float32)[:, None]
    np.testing.assert_allclose(normalize_rows(scaled), unit, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(normalize_rows(scaled), axis=1), 1, atol=1e-6)
    scaled[4] = 0
    with pytest.raises(ConfigError, match="1 row.* zero L2 norm .first: row 4"):
        normalize_rows(scaled)


def test_memory_is_bounded_by_the_block_budget():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((200, 8)).astype(np.float32)
    database = rng.standard_normal((20_000, 8)).astype(np.float32)
    full_matrix_bytes = 200 * 20_000 * 4  # 16 MB
    tracemalloc.start()
    try:
        exact_search(queries, database, 10, "squared_l2", block_elements=10_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_matrix_bytes / 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distance": "euclidean"}, "allowed values: dot_product, cosine, squared_l2"),
        ({"k": 0}, "k must be >= 1"),
        ({"queries": np.zeros((2, 3), np.float32)}, "queries have 3 columns, database has 4"),
        ({"queries": np.zeros((2, 4), np.float32), "distance": "cosine"}, "zero L2 norm"),
        ({"queries": np.full((2, 4), np.nan, np.float32)}, "queries: row 0 contains NaN"),
        ({"database": np.zeros((0, 4), np.float32)}, "database is empty"),
        ({"database": np.zeros(4, np.float32)}, "must be 2-D"),
    ],
)
def test_exact_search_errors(kwargs, message):
    args = {
        "queries": np.ones((2, 4), np.float32),
        "database": np.eye(4, dtype=np.float32),
        "k": 2,
        "distance": "dot_product",
        **kwargs,
    }
    with pytest.raises(ConfigError, match=message):
        exact_search(**args)


# --- metrics ---------------------------------------------------------------------------


def test_recall_at_k_hand_computed():
    # Query 1: 2 of 3 found; query 2: 1 of 3 found -> (2/3 + 1/3) / 2.
    assert recall_at_k([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [7, 8, 6]], 3) == pytest.approx(0.5)
    # Only the first k of each list count: {9, 1} vs {1, 2}.
    assert recall_at_k([[9, 1, 2]], [[1, 2, 3]], 2) == pytest.approx(0.5)
    # A short approximate list counts its missing entries as misses.
    assert recall_at_k([["a"]], [["a", "b"]], 2) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="exact row has 1 < k=2"):
        recall_at_k([[1, 2]], [[1]], 2)


def test_precision_at_k_with_ids_and_with_labels():
    rankings = [["a", "b", "c", "d"]]
    assert precision_at_k(rankings, [{"a", "c"}], 2) == pytest.approx(0.5)
    assert precision_at_k(rankings, [{"a", "c"}], 1) == pytest.approx(1.0)
    # Labelled set: rankings hold the retrieved items' labels, relevant the query label.
    labels = [["cat", "dog", "cat"], ["dog", "dog", "dog"]]
    assert precision_at_k(labels, [{"cat"}, {"cat"}], 3) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ConfigError, match=r"wrap a single label in a set: \{'cat'\}"):
        precision_at_k(labels, ["cat", "cat"], 3)


def test_average_precision_hand_computed():
    # Hits at ranks 1, 3, 5 -> precisions 1, 2/3, 3/5; R = 4 (d is never retrieved).
    ap = average_precision(["a", "x", "b", "y", "c"], {"a", "b", "c", "d"})
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    # Labels: 3 database items are cats, hits at ranks 1 and 3.
    assert average_precision(["cat", "dog", "cat"], {"cat"}, n_relevant=3) == pytest.approx((1 + 2 / 3) / 3)
    with pytest.raises(ConfigError, match="holds 2 relevant items but n_relevant=1"):
        average_precision(["cat", "cat"], {"cat"})
    with pytest.raises(ConfigError, match="no relevant items"):
        average_precision(["a"], set())


def test_mean_average_precision_hand_computed():
    # AP 1 (hit at rank 1) and AP 1/2 (single hit at rank 2).
    assert mean_average_precision([["a", "b"], ["x", "b"]], [{"a"}, {"b"}]) == pytest.approx(0.75)
    assert mean_average_precision(
        [["cat", "dog"], ["dog", "dog"]], [{"cat"}, {"dog"}], n_relevant=[2, 2]
    ) == pytest.approx((1 / 2 + 1) / 2)
    with pytest.raises(ConfigError, match="differ in length: 2 != 1"):
        mean_average_precision([["a"], ["b"]], [{"a"}])


def test_ns_score_hand_computed():
    # 3 same-group items in the top 4 (the 5th result is ignored), then a perfect 4.
    retrieved = [[0, 0, 1, 0, 0], [1, 1, 1, 1]]
    assert ns_score(retrieved, [0, 1]) == pytest.approx(3.5)
    with pytest.raises(ConfigError, match="3 < top=4"):
        ns_score([[0, 0, 0]], [0])
