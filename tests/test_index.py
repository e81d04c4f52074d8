"""ScaNN index: recall against exact search, save/load, input and file-format errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import retrieval.index as index_module
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.exact import exact_search, normalize_rows
from retrieval.index import (
    BRUTE_FORCE_MAX_ELEMENTS,
    RANDOM_INIT_MIN_ROWS,
    TUNING_MARGIN_SE,
    IndexConfig,
    build_index,
    choose_config,
    load_index,
)
from retrieval.manifest import read_manifest, sha256_file
from retrieval.metrics import recall_at_k

REPO_ROOT = Path(__file__).resolve().parents[1]
D = 64


@pytest.fixture(scope="module")
def clusters():
    """Sampler of points around 100 fixed Gaussian cluster centres in D dimensions."""
    rng = np.random.default_rng(1234)
    centres = rng.standard_normal((100, D)).astype(np.float32)

    def sample(n):
        labels = rng.integers(0, len(centres), n)
        return (centres[labels] + 0.3 * rng.standard_normal((n, D))).astype(np.float32)

    return sample


@pytest.fixture(scope="module")
def large(clusters):
    """20k database vectors (tree-AH by default), their ids, and 500 fresh queries."""
    vectors = clusters(20_000)
    return vectors, np.array([f"img{i:05d}" for i in range(len(vectors))]), clusters(500)


@pytest.fixture(scope="module")
def tree_indexes(large):
    vectors, ids, _ = large
    return {
        distance: build_index(vectors, ids.tolist(), distance=distance)
        for distance in ("cosine", "dot_product", "squared_l2")
    }


@pytest.fixture(scope="module")
def small(clusters):
    vectors = clusters(3_000)
    return vectors, [f"s{i}" for i in range(len(vectors))]


@pytest.fixture(scope="module")
def saved_small(small, tmp_path_factory):
    """A saved brute-force index, copied by tests that damage it."""
    path = tmp_path_factory.mktemp("saved") / "index"
    build_index(*small, distance="cosine").save(path)
    return path


@pytest.fixture
def damaged(saved_small, tmp_path):
    path = tmp_path / "index"
    shutil.copytree(saved_small, path)
    return path


def _exact_ids(index_distance, database, queries, ids, k):
    if index_distance == "cosine":
        database = normalize_rows(database)
    rows, _ = exact_search(queries, database, k, index_distance)
    return ids[rows].tolist()


# --- configuration ---------------------------------------------------------------------


def test_choose_config_thresholds():
    assert BRUTE_FORCE_MAX_ELEMENTS == 15_625 * D
    assert choose_config(15_624, D, "cosine").method == "brute_force"
    assert choose_config(15_625, D, "cosine").method == "tree_ah"
    assert choose_config(800, 1280, "cosine").method == "tree_ah"  # 1.02M numbers
    assert choose_config(20_000, 32, "cosine").method == "brute_force"  # 640k numbers
    config = choose_config(20_000, D, "cosine")
    assert config.method == "tree_ah" and config.tune
    assert config.num_leaves == 141  # round(sqrt(20000))
    assert config.training_sample_size == 20_000
    assert config.anisotropic_quantization_threshold == 0.2
    assert choose_config(20_000, D, "squared_l2").anisotropic_quantization_threshold is None
    huge = choose_config(10_000_000, D, "dot_product")
    assert huge.training_sample_size == 250_000 and huge.num_leaves == 3162
    # k-means++ (reproducible) below RANDOM_INIT_MIN_ROWS, random initialisation (faster) above.
    assert config.deterministic_training and not huge.deterministic_training
    assert choose_config(RANDOM_INIT_MIN_ROWS - 1, D, "cosine").deterministic_training
    assert not choose_config(RANDOM_INIT_MIN_ROWS, D, "cosine").deterministic_training
    assert choose_config(10_000_000, D, "cosine", deterministic_training=True).deterministic_training


def test_choose_config_overrides():
    fixed = choose_config(50_000, D, "cosine", leaves_to_search=7)
    assert fixed.leaves_to_search == 7 and not fixed.tune
    assert choose_config(50_000, D, "cosine", leaves_to_search=7, tune=True).tune
    assert choose_config(500, D, "cosine", method="tree_ah").num_leaves == 10  # 500 // 50
    with pytest.raises(ConfigError, match="Unknown IndexConfig field.*leaves; allowed: method"):
        choose_config(50_000, D, "cosine", leaves=3)
    with pytest.raises(ConfigError, match=r"num_leaves only apply to method='tree_ah'.*n\*d=6400 < 1000000"):
        choose_config(100, D, "cosine", num_leaves=4)
    with pytest.raises(ConfigError, match=r"leaves_to_search \(500\) must be <= num_leaves \(224\)"):
        choose_config(50_000, D, "cosine", leaves_to_search=500)


# --- recall against exact search -------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "dot_product", "squared_l2"])
def test_default_tree_ah_reaches_recall_on_fresh_queries(tree_indexes, large, distance):
    vectors, ids, queries = large
    index = tree_indexes[distance]
    assert index.method == "tree_ah"
    recall = index.manifest.recall
    # Half the 1,000 sampled rows tune the search knobs, the other half measure recall.
    assert recall["k"] == 10 and recall["n_queries"] == recall["n_tuning_queries"] == 500
    assert recall["value"] >= 0.95 and recall["reached_target"]

    got_ids, scores = index.search_batch(queries)
    assert recall_at_k(got_ids, _exact_ids(distance, vectors, queries, ids, 10), 10) >= 0.95
    assert scores.shape == (len(queries), 10)
    # Best first: similarities descend, squared distances ascend.
    steps = np.diff(scores, axis=1)
    assert np.all(steps >= 0) if distance == "squared_l2" else np.all(steps <= 0)


def test_tuning_picks_the_first_candidate_reaching_the_target(tree_indexes):
    index = tree_indexes["squared_l2"]
    trials = index.manifest.recall["tuning"]
    chosen = trials[-1]

    def lower_bound(trial):
        return trial["recall"] - TUNING_MARGIN_SE * trial["standard_error"]

    assert lower_bound(chosen) >= 0.95 and all(lower_bound(t) < 0.95 for t in trials[:-1])
    assert all(t["standard_error"] > 0 for t in trials if t["recall"] < 1)
    assert [t["cost"] for t in trials] == sorted(t["cost"] for t in trials)
    defaults = index.search_defaults
    assert (defaults["leaves_to_search"], defaults["pre_reorder_num_neighbors"]) == (
        chosen["leaves_to_search"],
        chosen["pre_reorder_num_neighbors"],
    )


def test_tuning_falls_back_to_best_found(small, monkeypatch):
    # Two reorder depths and an unreachable target: every candidate is tried and
    # the highest recall wins.
    monkeypatch.setattr(index_module, "REORDER_MULTIPLES", (2, 3))
    config = choose_config(3_000, D, "squared_l2", method="tree_ah")
    index = build_index(*small, distance="squared_l2", config=config, target_recall=1.0)
    recall = index.manifest.recall
    assert not recall["reached_target"]
    best = max(recall["tuning"], key=lambda t: t["recall"])
    assert best["recall"] < 1.0 and recall["value"] < 1.0
    assert (
        index.search_defaults["leaves_to_search"],
        index.search_defaults["pre_reorder_num_neighbors"],
    ) == (best["leaves_to_search"], best["pre_reorder_num_neighbors"])


@pytest.mark.parametrize("distance", ["cosine", "dot_product", "squared_l2"])
def test_brute_force_is_exact(small, distance):
    vectors, ids = small
    index = build_index(vectors, ids, distance=distance)
    assert index.method == "brute_force" and index.manifest.recall["value"] == 1.0
    queries = vectors[:50] + 0.1
    got_ids, _ = index.search_batch(queries, k=5)
    assert got_ids == _exact_ids(distance, vectors, queries, np.array(ids), 5)


def test_search_options(tree_indexes, large):
    vectors, _, _ = large
    index = tree_indexes["cosine"]
    ids, scores = index.search(vectors[7] * 3.0, k=3)  # cosine ignores the query scale
    assert ids[0] == "img00007" and len(ids) == 3 and scores[0] == pytest.approx(1.0, abs=1e-5)
    for scale in (1e20, 1e-30):  # beyond float32's range for a sum of squares
        assert index.search(vectors[7] * np.float32(scale), k=3)[0] == ids
    assert index.search_batch(vectors[7:8] * np.float32(1e20), k=3)[0][0] == ids
    wide, _ = index.search(vectors[7], k=30, leaves_to_search=20, pre_reorder_num_neighbors=300)
    assert len(wide) == 30 and wide[:3] == ids
    with pytest.raises(
        ConfigError,
        match=r"Unknown search option\(s\) leaves for a tree_ah index; allowed: leaves_to_search",
    ):
        index.search(vectors[7], leaves=3)


def test_k_above_n_is_clamped_and_brute_force_has_no_knobs(small):
    vectors, ids = small
    index = build_index(vectors[:5], ids[:5], distance="squared_l2")
    found, scores = index.search(vectors[0], k=50)
    assert sorted(found) == sorted(ids[:5]) and scores[0] == 0
    with pytest.raises(ConfigError, match="for a brute_force index; allowed: none"):
        index.search(vectors[0], leaves_to_search=2)


def test_cosine_build_leaves_the_callers_array_alone(small):
    vectors, ids = small
    before = vectors.copy()
    build_index(vectors, ids, distance="cosine", num_queries=10)
    np.testing.assert_array_equal(vectors, before)


# --- input validation --------------------------------------------------------------------


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
    "query, message",
    [
        (np.ones(D - 1), f"holds vectors of dimension {D}, got {D - 1}"),
        (np.ones((2, D)), r"search\(\) takes one query of shape \(64,\)"),
        (np.full(D, np.nan), "query vector contains NaN"),
        (np.zeros(D), "is all zeros: a zero vector has no direction"),
        (np.r_[np.full(D - 1, 0.1), np.inf], "query vector contains NaN or infinite"),
        (np.full(D, 1e39), "query vector contains NaN or infinite"),  # beyond float32
    ],
)
def test_search_rejects_bad_queries(tree_indexes, query, message):
    with pytest.raises(ConfigError, match=message):
        tree_indexes["cosine"].search(query)


@pytest.mark.parametrize("distance", ["cosine", "dot_product", "squared_l2"])
def test_single_query_scores_are_exact_for_any_numeric_input(tree_indexes, large, distance):
    index = tree_indexes[distance]
    vectors, ids, queries = large
    row_of = {i: r for r, i in enumerate(ids.tolist())}
    query = np.round(queries[3] * 70)  # unnormalised, integral values
    expected_ids, _ = index.search(query.astype(np.float32))
    for variant in (query.astype(np.float64), query.astype(np.int32), query.astype(np.int64)):
        found, scores = index.search(variant)
        assert found == expected_ids
        x = vectors[[row_of[i] for i in found]].astype(np.float64)
        q = query.astype(np.float64)
        if distance == "cosine":
            exact = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
        elif distance == "dot_product":
            exact = x @ q
        else:
            exact = ((x - q) ** 2).sum(axis=1)
        # Reordered tree-AH scores are exact float32 scores of the returned rows.
        np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-3)


def test_search_batch_rejects_wrong_dimension(tree_indexes):
    with pytest.raises(ConfigError, match=f"dimension {D}, got 3"):
        tree_indexes["squared_l2"].search_batch(np.ones((4, 3)))


# --- save / load ---------------------------------------------------------------------------


def test_save_load_round_trip_is_identical(tree_indexes, large, tmp_path, monkeypatch):
    _, _, queries = large
    index = tree_indexes["cosine"]
    index.save(tmp_path / "built")
    # Moving the directory and loading from another working directory proves that
    # the ScaNN assets are referenced relative to the index, not by absolute path.
    moved = tmp_path / "moved"
    os.rename(tmp_path / "built", moved)
    assert str(tmp_path) not in (moved / "scann" / "scann_assets.pbtxt").read_text()
    monkeypatch.chdir(tmp_path.parent)
    loaded = load_index(moved)

    assert (loaded.n, loaded.d, loaded.distance) == (20_000, D, "cosine")
    assert loaded.manifest == index.manifest
    expected_ids, expected_scores = index.search_batch(queries)
    got_ids, got_scores = loaded.search_batch(queries)
    assert got_ids == expected_ids
    np.testing.assert_array_equal(got_scores, expected_scores)
    assert loaded.search(queries[0])[0] == expected_ids[0]
    # The row answers name the same hits as the id answers.
    rows, row_scores = loaded.search_batch_rows(queries)
    assert [loaded.ids[r].tolist() for r in rows] == expected_ids
    np.testing.assert_array_equal(row_scores, expected_scores)
    single_rows, _ = loaded.search_rows(queries[0])
    assert single_rows.dtype.kind in "iu" and loaded.ids[single_rows].tolist() == expected_ids[0]


def test_saved_directory_layout_and_checksums(saved_small):
    names = {p.relative_to(saved_small).as_posix() for p in saved_small.rglob("*") if p.is_file()}
    manifest = read_manifest(saved_small)
    assert "manifest.json" in names and set(manifest.files) == names - {"manifest.json"}
    assert {"ids.parquet", "scann/scann_assets.pbtxt"} <= names
    for rel, entry in manifest.files.items():
        assert entry == {
            "sha256": sha256_file(saved_small / rel),
            "bytes": (saved_small / rel).stat().st_size,
        }
    assert manifest.kind == "imgindex.index" and manifest.format_version == 1
    assert manifest.n == 3_000 and manifest.d == D and manifest.recall["value"] == 1.0
    # Nothing is left behind next to the published directory.
    assert [p.name for p in saved_small.parent.iterdir()] == ["index"]


def test_save_refuses_to_overwrite(saved_small, tmp_path):
    index = load_index(saved_small)
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        index.save(saved_small)
    target = tmp_path / "index"
    shutil.copytree(saved_small, target)
    (target / "stale.txt").write_text("from the old index")
    index.save(target, overwrite=True)
    assert not (target / "stale.txt").exists() and load_index(target).n == 3_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an imgindex index.*refusing to delete it"):
        index.save(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_loading_and_searching_do_not_import_tensorflow(saved_small):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from retrieval.index import load_index
        index = load_index({str(saved_small)!r})
        ids, scores = index.search(np.ones({D}, np.float32), k=3)
        assert len(ids) == 3, ids
        assert "tensorflow" not in sys.modules, "TensorFlow was imported"
        print("ok")
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# --- damaged directories -----------------------------------------------------------------


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_file(damaged):
    _flip_byte(damaged / "scann" / "dataset.npy", -5)
    with pytest.raises(
        IndexFormatError, match=r"scann/dataset.npy is corrupted \(SHA-256.*Rebuild the index"
    ):
        load_index(damaged)


def test_truncated_file(damaged):
    ids_file = damaged / "ids.parquet"
    ids_file.write_bytes(ids_file.read_bytes()[:100])
    with pytest.raises(
        IndexFormatError, match=r"ids.parquet has 100 bytes, the manifest says \d+ \(truncated"
    ):
        load_index(damaged, verify=False)  # sizes are checked even without hashing


def test_missing_file(damaged):
    (damaged / "scann" / "scann_assets.pbtxt").unlink()
    with pytest.raises(IndexFormatError, match="scann/scann_assets.pbtxt listed in the manifest is missing"):
        load_index(damaged)


def test_not_an_index_directory(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(IndexFormatError, match="not an imgindex index directory: it has no manifest.json"):
        load_index(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(IndexFormatError, match=r"Index directory .*nowhere does not exist"):
        load_index(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: {**m, "format_version": 2},
            "unsupported format_version 2; this imgindex .* reads format_version 1",
        ),
        (
            lambda m: {**m, "kind": "something.else"},
            "kind is 'something.else', expected 'imgindex.index'",
        ),
        (
            lambda m: {k: v for k, v in m.items() if k != "n"},
            "missing field.* n; the manifest is incomplete",
        ),
        (lambda m: {**m, "n": 2_999}, "holds 3000 ids but the manifest says n=2999"),
        (
            lambda m: {**m, "files": {**m["files"], "../escape": {"sha256": "0", "bytes": 0}}},
            "invalid file path '../escape'",
        ),
    ],
)
def test_bad_manifest(damaged, edit, message):
    path = damaged / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(IndexFormatError, match=message):
        load_index(damaged)


def test_unparseable_manifest(damaged):
    (damaged / "manifest.json").write_text('{"kind": "imgindex.index", ')
    with pytest.raises(IndexFormatError, match="manifest.json is unreadable .*Rebuild the index"):
        load_index(damaged)


def _near_duplicates(rng, groups=200, copies=30, d=32, noise=0.01):
    centres = normalize_rows(rng.standard_normal((groups, d)).astype(np.float32))
    rows = np.repeat(centres, copies, axis=0) + noise * rng.standard_normal((groups * copies, d))
    return normalize_rows(rows.astype(np.float32))


def test_held_out_tuning_queries_measure_and_tune_on_outside_queries():
    # Every row has 29 near-copies, so leave-self-out finds them in the query's own leaf;
    # random outside queries have their neighbours spread over many leaves.
    rng = np.random.default_rng(4)
    vectors = _near_duplicates(rng)
    ids = [f"v{i}" for i in range(len(vectors))]
    queries = rng.standard_normal((300, vectors.shape[1])).astype(np.float32) * 3.0
    config = choose_config(len(vectors), vectors.shape[1], "cosine", method="tree_ah")
    self_tuned = build_index(vectors, ids, config=config, target_recall=0.9)
    held_out = build_index(vectors, ids, config=config, target_recall=0.9, tuning_queries=queries)
    recall = held_out.manifest.recall
    assert recall["method"].startswith("held-out: 300 query vectors")
    assert recall["n_queries"] + recall["n_tuning_queries"] == 300
    assert self_tuned.manifest.recall["method"].startswith("leave-self-out")
    # The recorded value is the recall of the reporting half (odd queries) at the defaults
    # (within float noise: the build re-normalises the rows, which can swap near-ties).
    report = normalize_rows(queries[1::2])
    found, _ = held_out.search_batch(report)
    exact_rows, _ = exact_search(report, vectors, 10, "dot_product")
    row_of = {item: row for row, item in enumerate(ids)}
    approx = [[row_of[item] for item in hits] for hits in found]
    assert recall["value"] == pytest.approx(recall_at_k(approx, exact_rows, 10), abs=0.005)
    assert recall["reached_target"] and recall["value"] >= 0.9
    assert held_out.search_defaults["leaves_to_search"] > self_tuned.search_defaults["leaves_to_search"]


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
