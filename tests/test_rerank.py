"""Re-ranking in retrieval/: alpha-QE maths and expanded search, DBA builds, against NumPy."""

import json

import numpy as np
import pytest

from retrieval import dba as dba_lib
from retrieval import manifest as mf
from retrieval import rerank
from retrieval.errors import ConfigError, IndexFormatError, QueryError
from retrieval.index import IndexConfig, build_index, load_index
from retrieval.index.training import previous_training
from tests.helpers import runs_fixture as rf


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_expand(q, hits, alpha):
    """The TPAMI 2018 alpha-QE formula in float64: q + sum max(cos, 0)^alpha x, normalised."""
    q, hits = unit(q), unit(hits)
    w = np.clip(hits @ q, 0, 1) ** alpha
    return unit(q + w @ hits)


def numpy_top(q, database, n, skip=None):
    """Rows of the n highest dot products of q with database rows (skip: a row left out)."""
    order = np.argsort(-(database @ q), kind="stable")
    return [r for r in order if r != skip][:n]


def numpy_qe_search(q, database, n, k, alpha):
    """alpha-QE by exact search in NumPy: rows and scores of the k best for the expanded query."""
    q = unit(q)
    expanded = numpy_expand(q, database[numpy_top(q, database, n)], alpha)
    rows = numpy_top(expanded, database, k)
    return rows, database[rows] @ expanded


def numpy_dba(x, n, alpha):
    x = unit(x)
    return np.stack([numpy_expand(x[i], x[numpy_top(x[i], x, n, skip=i)], alpha) for i in range(len(x))])


@pytest.fixture(scope="module")
def data():
    vectors = rf.clustered(600, 24, seed=3, n_clusters=30)
    return vectors, [f"v{i:04d}" for i in range(len(vectors))]


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """A saved brute-force cosine index of `data`."""
    path = tmp_path_factory.mktemp("rerank") / "plain"
    build_index(*data, distance="cosine").save(path)
    return load_index(path)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0, 7.5])
def test_weighted_directions_match_the_numpy_formula(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    queries = rng.standard_normal((5, 16)).astype(np.float32) * 7
    hits = [rng.standard_normal((m, 16)).astype(np.float32) for m in (1, 3, 5, 0, 10)]
    got = rerank.weighted_directions(queries, hits, alpha, keep_length=False)
    for i, h in enumerate(hits):
        want = unit(queries[i]) if len(h) == 0 else numpy_expand(queries[i], h, alpha)
        np.testing.assert_allclose(got[i], want, atol=2e-6)
    # dot product: the same direction at the query's own length
    kept = rerank.weighted_directions(queries, hits, alpha, keep_length=True)
    np.testing.assert_allclose(np.linalg.norm(kept, axis=1), np.linalg.norm(queries, axis=1), rtol=1e-5)
    np.testing.assert_allclose(unit(kept), got, atol=2e-6)


def test_weighted_directions_of_a_3d_array_with_absent_rows_match_the_lists():
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    hits = rng.standard_normal((4, 3, 8)).astype(np.float32)
    present = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    lists = [h[p] for h, p in zip(hits, present)]
    for keep in (False, True):
        np.testing.assert_allclose(
            rerank.weighted_directions(queries, hits, 3.0, keep, present=present),
            rerank.weighted_directions(queries, lists, 3.0, keep),
            atol=1e-6,
        )


def test_weights_ignore_dissimilar_hits_and_never_overflow():
    s = np.array([-0.5, 0.0, 0.5, 1.0000001], dtype=np.float32)
    assert rerank.weights(s, 3).tolist() == [0.0, 0.0, 0.125, 1.0]
    assert rerank.weights(s, 0).tolist() == [1.0, 1.0, 1.0, 1.0]  # alpha 0: average QE
    assert np.isfinite(rerank.weights(s, 1e300)).all()


@pytest.mark.parametrize(
    "n, alpha",
    [
        (0, 1),
        (101, 1),
        (2.0, 1),
        (True, 1),
        ("3", 1),
        (3, -1),
        (3, float("nan")),
        (3, float("inf")),
        (3, "1"),
    ],
)
def test_query_expansion_is_validated(n, alpha):
    with pytest.raises(QueryError, match="query expansion") as err:
        rerank.QueryExpansion(n, alpha)
    assert err.value.code == "bad_expand"
    assert rerank.QueryExpansion(np.int64(3), 2).to_dict() == {"n": 3, "alpha": 2.0}


@pytest.mark.parametrize("n, alpha", [(1, 0.0), (3, 3.0), (10, 1.0)])
def test_expanded_search_matches_numpy_qe(saved, data, n, alpha):
    vectors = unit(data[0])
    queries = rf.clustered(8, 24, seed=9, n_clusters=30)
    prepared = saved.prepare_queries(queries)
    rows, scores = rerank.expanded_search_rows(saved, prepared, 7, rerank.QueryExpansion(n, alpha))
    for i, q in enumerate(queries):
        want_rows, want_scores = numpy_qe_search(q, vectors, n, 7, alpha)
        assert rows[i].tolist() == want_rows
        np.testing.assert_allclose(scores[i], want_scores, atol=1e-5)


def test_expanded_search_can_leave_a_row_out_of_both_rounds(saved, data):
    vectors = unit(data[0])
    expansion = rerank.QueryExpansion(3, 3)
    rows, scores = rerank.expanded_search_rows(saved, vectors[[5, 9]], 4, expansion, exclude_rows=[5, 9])
    for i, row in enumerate([5, 9]):
        expanded = numpy_expand(vectors[row], vectors[numpy_top(vectors[row], vectors, 3, skip=row)], 3)
        assert rows[i].tolist() == numpy_top(expanded, vectors, 4, skip=row)
        np.testing.assert_allclose(scores[i], vectors[rows[i]] @ expanded, atol=1e-5)


def test_squared_l2_and_indexes_without_vectors_refuse_expansion(data):
    l2 = build_index(*data, distance="squared_l2")
    with pytest.raises(QueryError, match="squared_l2.*cosine and dot_product") as err:
        rerank.expanded_search_rows(l2, data[0][:1], 3, rerank.QueryExpansion(2, 1))
    assert err.value.code == "expand_unsupported"
    unsaved = build_index(*data, distance="cosine")  # vectors are read from the saved directory
    with pytest.raises(QueryError, match="stores no vectors") as err:
        rerank.expanded_search_rows(unsaved, data[0][:1], 3, rerank.QueryExpansion(2, 1))
    assert err.value.code == "expand_unsupported"


# --- DBA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "dot_product"])
def test_dba_build_indexes_augmented_vectors_and_stores_the_originals(data, tmp_path, distance):
    vectors, ids = data
    if distance == "dot_product":
        vectors = (
            unit(vectors).astype(np.float32) * np.linspace(0.5, 2, len(vectors), dtype=np.float32)[:, None]
        )
    built = build_index(vectors, ids, distance=distance, dba=dba_lib.DatabaseAugmentation(3, 3))
    built.save(tmp_path / "index")
    index = load_index(tmp_path / "index")
    assert index.dba["n"] == 3 and index.dba["alpha"] == 3.0 and index.dba["neighbours"] == "exact"
    assert index.dba["neighbours_found"] == 3 and index.dba["seconds"] >= 0
    want = numpy_dba(vectors, 3, 3.0)
    if distance == "dot_product":  # neighbours by dot product, each row keeps its length
        x = unit(vectors)
        lengths = np.linalg.norm(vectors, axis=1)
        want = np.stack(
            [
                numpy_expand(x[i], x[numpy_top(vectors[i], vectors, 3, skip=i)], 3.0) * lengths[i]
                for i in range(len(x))
            ]
        )
        originals = vectors
    else:
        originals = unit(vectors)
    indexed = np.stack([index.indexed_vectors()[r] for r in range(index.n)])
    stored = np.stack([index.stored_vectors()[r] for r in range(index.n)])
    np.testing.assert_allclose(indexed, want, atol=2e-6)
    np.testing.assert_allclose(stored, originals, atol=2e-6)
    # searches run over the augmented rows, exactly (brute force)
    q = vectors[:5] + 0.1
    rows, scores = index.search_batch_rows(q, 4)
    for i in range(5):
        query = unit(q[i]) if distance == "cosine" else q[i]
        assert rows[i].tolist() == numpy_top(query, want, 4)
        np.testing.assert_allclose(scores[i], want[rows[i]] @ query, rtol=1e-5, atol=1e-5)
    assert index.recall["value"] == 1.0  # recall against exact search over the augmented rows


def test_dba_neighbours_from_an_index_of_the_originals(tmp_path):
    """Above EXACT_MAX_WORK the neighbours come from a tree-AH index of the originals: at a
    high recall they are (nearly) the exact ones."""
    vectors = unit(rf.clustered(3000, 32, seed=4, n_clusters=40)).astype(np.float32)
    dba = dba_lib.DatabaseAugmentation(2, 3)
    exact, record = dba_lib.augment(vectors, dba, "cosine", tmp_path / "exact.npy")
    approx, approx_record = dba_lib.augment(
        vectors,
        dba,
        "cosine",
        tmp_path / "index.npy",
        neighbours="index",
        work_dir=tmp_path,
        target_recall=0.99,
    )
    assert (record["neighbours"], approx_record["neighbours"]) == ("exact", "index")
    want = [
        numpy_expand(vectors[i], vectors[numpy_top(vectors[i], vectors, 2, skip=i)], 3.0) for i in range(50)
    ]
    np.testing.assert_allclose(exact[:50], np.stack(want), atol=2e-6)
    same = np.isclose(np.asarray(exact), np.asarray(approx), atol=1e-5).all(axis=1).mean()
    assert same > 0.95
    with pytest.raises(ConfigError, match="neighbours must be one of"):
        dba_lib.augment(vectors, dba, "cosine", tmp_path / "x.npy", neighbours="magic")


def test_dba_is_checked(data):
    for n, alpha in [(0, 1), (101, 1), (3, -1), (3, float("nan")), (True, 1)]:
        with pytest.raises(ConfigError, match="DBA"):
            dba_lib.DatabaseAugmentation(n, alpha)
    with pytest.raises(ConfigError, match="DBA averages vectors.*squared_l2"):
        build_index(*data, distance="squared_l2", dba=dba_lib.DatabaseAugmentation(2, 1))


def test_tiny_dba_index_uses_the_neighbours_there_are(tmp_path):
    vectors = np.eye(3, dtype=np.float32) + 0.1
    built = build_index(vectors, ["a", "b", "c"], dba=dba_lib.DatabaseAugmentation(5, 1))
    assert built.manifest.dba["neighbours_found"] == 2
    single = build_index(vectors[:1], ["a"], dba=dba_lib.DatabaseAugmentation(5, 1))
    single.save(tmp_path / "one")
    assert load_index(tmp_path / "one").indexed_vectors()[0].tolist() == pytest.approx(
        unit(vectors[0]).tolist()
    )


def test_manifest_round_trip_and_old_manifests_without_dba(data, saved, tmp_path):
    built = build_index(*data, dba=dba_lib.DatabaseAugmentation(2, 0.5))
    built.save(tmp_path / "dba")
    on_disk = json.loads((tmp_path / "dba" / "manifest.json").read_text())
    assert on_disk["dba"]["n"] == 2 and on_disk["dba"]["alpha"] == 0.5
    assert dba_lib.ORIGINALS_FILE in on_disk["files"]
    assert mf.read_manifest(tmp_path / "dba").to_dict() == on_disk  # byte for byte
    # an index written before DBA existed has no "dba" key, and opens as it did
    plain = json.loads((saved.directory / "manifest.json").read_text())
    assert "dba" not in plain and saved.dba is None
    assert saved.stored_vectors() is saved.indexed_vectors()
    assert dba_lib.DatabaseAugmentation.from_record(None) is None
    with pytest.raises(IndexFormatError, match="dba record"):
        dba_lib.DatabaseAugmentation.from_record({"n": "x"})


def test_training_is_reused_only_with_the_same_dba(tmp_path):
    vectors = rf.clustered(6000, 32, seed=1)
    ids = [f"r{i}" for i in range(len(vectors))]
    config = IndexConfig(
        method="tree_ah",
        num_leaves=20,
        training_sample_size=3000,
        leaves_to_search=20,
        pre_reorder_num_neighbors=200,
    )
    build_index(vectors, ids, config=config, dba=dba_lib.DatabaseAugmentation(2, 3), num_queries=50).save(
        tmp_path / "night1"
    )
    same, note = previous_training(
        tmp_path / "night1", distance="cosine", d=32, n=6000, dba=dba_lib.DatabaseAugmentation(2, 3)
    )
    assert same is not None and note == ""
    for today, words in [
        (None, "DBA n=2 alpha=3, this one off"),
        (dba_lib.DatabaseAugmentation(3, 3), "this one n=3"),
    ]:
        previous, note = previous_training(tmp_path / "night1", distance="cosine", d=32, n=6000, dba=today)
        assert previous is None and "retrained" in note and words in note
