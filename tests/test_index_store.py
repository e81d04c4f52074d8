"""Index search, save and load, and damaged index directories (retrieval.index.store, directory, files)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.atomic_files import sha256_file
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.index import build_index, load_index
from retrieval.manifest import read_manifest
from tests.helpers.index_data import D

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- search ---------------------------------------------------------------------------------


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
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


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
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


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
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


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
def test_search_batch_rejects_wrong_dimension(tree_indexes):
    with pytest.raises(ConfigError, match=f"dimension {D}, got 3"):
        tree_indexes["squared_l2"].search_batch(np.ones((4, 3)))


# --- save / load ---------------------------------------------------------------------------


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
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


# --- stored vectors (id queries) -------------------------------------------------------------


def test_stored_vectors_are_read_row_by_row(damaged, small):
    vectors, _ = small
    stored = load_index(damaged).stored_vectors()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # cosine stores unit rows
    assert len(stored) == len(vectors) and stored.shape == vectors.shape
    for row in (0, 17, len(vectors) - 1, np.int64(5), -1):
        np.testing.assert_allclose(stored[row], unit[int(row)], atol=1e-6)
        assert stored[row].dtype == np.float32
    with pytest.raises(IndexError, match="out of range"):
        stored[len(vectors)]
    with pytest.raises(TypeError, match="one row at a time"):
        stored[1:3]


@pytest.mark.parametrize("damage", ["truncate", "rewrite"])
def test_a_dataset_changed_in_place_after_loading_is_an_error_not_a_crash(damaged, damage):
    index = load_index(damaged)
    stored = index.stored_vectors()
    first = stored[100]
    path = damaged / "scann" / "dataset.npy"
    with open(path, "r+b") as f:
        if damage == "truncate":  # what `cp other dataset.npy` does first: row 100 is gone
            f.truncate(1024)
        else:  # the same size, other bytes (a later mtime)
            f.seek(-8, os.SEEK_END)
            f.write(b"\0" * 8)
    with pytest.raises(IndexFormatError, match="dataset.npy .*modified in place while served"):
        stored[100]
    with pytest.raises(IndexFormatError, match="dataset.npy"):
        index.neighbours_of_row(100, k=3)
    assert index.search(first, k=1)[0] == ["s100"]  # ScaNN's own copy still answers
