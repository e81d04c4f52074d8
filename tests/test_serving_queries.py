"""Searcher queries: opening a run, vector and id queries, metadata, query errors, imports."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.exact import exact_search, normalize_rows
from serving import (
    DimensionMismatchError,
    EmbedderRequiredError,
    NonFiniteQueryError,
    QueryError,
    Searcher,
    UnknownEmbedderError,
    UnknownIdError,
)
from tests.helpers import runs_fixture as rf

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def searcher(vec_run):
    return Searcher.open(vec_run[0])


def test_open_root_follows_latest_and_run_dir_opens_directly(vec_run, searcher):
    root, run_dir, _ = vec_run
    assert searcher.run_id == "20260101T000000Z-aaaaaa"
    assert searcher.embedders == ["a", "b"]
    fixed = Searcher.open(run_dir)
    assert fixed.run_id == searcher.run_id
    assert fixed.refresh() is False  # a run directory is never swapped
    info = searcher.info()
    assert info["run_id"] == searcher.run_id and info["refresh"]["follows_latest"] is True
    a, b = info["embedders"]["a"], info["embedders"]["b"]
    assert (a["n"], a["d"], a["distance"], a["method"]) == (2000, 32, "cosine", "brute_force")
    assert (b["n"], b["d"], b["distance"], b["method"]) == (1500, 16, "squared_l2", "tree_ah")
    assert a["recall"]["value"] == 1.0 and a["fingerprint"].startswith("sha256-tree:")
    assert a["metadata_columns"] == ["sha256", "source", "width", "height", "label", "caption"]
    assert a["id_queries"] and info["loaded_at"]
    json.dumps(info)  # serialisable as is
    only_b = Searcher.open(root, embedder="b")
    assert only_b.embedders == ["b"]
    assert only_b.search_id("b-00007", k=1)[0].id == "b-00007"  # no embedder= needed


@pytest.mark.parametrize("name", ["a", "b"])
def test_vector_queries_match_exact_search(searcher, vec_run, name):
    data = vec_run[2][name]
    rng = np.random.default_rng(5)
    queries = data.vectors[rng.choice(len(data.ids), 20, replace=False)] + 0.05 * rng.standard_normal(
        (20, data.vectors.shape[1])
    ).astype(np.float32)
    database = normalize_rows(data.vectors) if data.distance == "cosine" else data.vectors
    exact_rows, exact_scores = exact_search(queries, database, 10, data.distance)
    batch = searcher.search_vector(queries, k=10, embedder=name)
    assert len(batch) == 20
    for q, result in enumerate(batch):
        assert [hit.id for hit in result] == [data.ids[r] for r in exact_rows[q]]
        np.testing.assert_allclose([hit.score for hit in result], exact_scores[q], rtol=1e-4, atol=1e-4)
        assert [hit.rank for hit in result] == list(range(1, 11))
        assert result.run_id == searcher.run_id and result.embedder == name
    single = searcher.search_vector(queries[0].tolist(), k=10, embedder=name)
    assert [h.id for h in single] == [h.id for h in batch[0]]
    scores = [h.score for h in single]
    if name == "a":  # cosine: similarities, highest first
        assert single.higher_is_better and scores == sorted(scores, reverse=True)
    else:  # squared_l2: distances, lowest first
        assert not single.higher_is_better and scores == sorted(scores)


def test_id_query_equals_vector_query_and_returns_metadata(searcher, vec_run):
    data = vec_run[2]["a"]
    row = 123
    by_id = searcher.search_id(data.ids[row], k=5, embedder="a")
    by_vector = searcher.search_vector(data.vectors[row], k=5, embedder="a")
    assert [h.id for h in by_id] == [h.id for h in by_vector]
    np.testing.assert_allclose([h.score for h in by_id], [h.score for h in by_vector], atol=1e-5)
    assert by_id[0].id == data.ids[row] and by_id[0].score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(
        searcher.get_vector(data.ids[row], embedder="a"),
        normalize_rows(data.vectors[row : row + 1])[0],
        atol=1e-6,
    )
    expected = rf.default_metadata(data.ids).to_pylist()
    for hit in by_id:
        want = dict(expected[data.ids.index(hit.id)])
        del want["id"]
        assert hit.metadata == want
    others = searcher.search_id(data.ids[row], k=4, embedder="a", exclude_self=True)
    assert [h.id for h in others] == [h.id for h in by_id[1:]]
    assert [h.rank for h in others] == [1, 2, 3, 4]


def test_id_lookup_finds_every_row_and_resolves_hash_collisions():
    from serving.id_lookup import IdLookup

    ids = np.array(["b", "a", "ccc", "dd", "ee", "", "fff", "é"], dtype=object)
    # len() as the hash makes most ids collide; the lookup must compare the ids themselves.
    for lookup in (IdLookup(ids), IdLookup(ids, hash_fn=len)):
        assert len(lookup) == len(ids)
        assert [lookup.get(i) for i in ids] == list(range(len(ids)))
        for missing in ("x", "gg", "cccc", "e", "é "):
            assert lookup.get(missing) is None
    empty = IdLookup(np.array([], dtype=object))
    assert len(empty) == 0 and empty.get("a") is None


def test_metadata_types_and_nulls_round_trip(tmp_path):
    import datetime

    import pyarrow as pa

    data = rf.vector_embedder("m", 4, 8, seed=3)
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5)
    data.metadata = pa.table(
        {
            "id": data.ids,
            "score": pa.array([0.5, float("nan"), None, 2.0], pa.float64()),
            "count": pa.array([1, None, 3, 4], pa.int64()),
            "flag": pa.array([True, False, None, True]),
            "taken": pa.array([stamp] * 4, pa.timestamp("s")),
            "blob": pa.array([b"\x00\x01", None, b"", b"z"], pa.binary()),
        }
    )
    rf.write_run(tmp_path, {"m": data}, run_id="20260101T000000Z-meta00")
    searcher = Searcher.open(tmp_path)
    got = {hit.id: hit.metadata for hit in searcher.search_id("m-00000", k=4)}
    assert got["m-00000"] == {"score": 0.5, "count": 1, "flag": True, "taken": stamp, "blob": b"\x00\x01"}
    assert got["m-00002"] == {"score": None, "count": 3, "flag": None, "taken": stamp, "blob": b""}
    assert np.isnan(got["m-00001"]["score"]) and got["m-00001"]["count"] is None


def test_query_errors_say_what_was_wrong(searcher):
    with pytest.raises(UnknownIdError, match="'nope'") as err:
        searcher.search_id("nope", embedder="a")
    assert isinstance(err.value, KeyError) and "nope" in str(err.value)
    with pytest.raises(EmbedderRequiredError, match="a, b"):
        searcher.search_vector(np.ones(32))
    with pytest.raises(UnknownEmbedderError, match="available: a, b"):
        searcher.search_vector(np.ones(32), embedder="c")
    with pytest.raises(DimensionMismatchError, match="dimension 32, got 31") as err:
        searcher.search_vector(np.ones(31), embedder="a")
    assert (err.value.expected, err.value.got) == (32, 31)
    for bad in (np.nan, np.inf, 1e39):  # 1e39 overflows float32
        vector = np.ones(32)
        vector[3] = bad
        with pytest.raises(NonFiniteQueryError, match="NaN or infinite"):
            searcher.search_vector(vector, embedder="a")
    for k in (0, -1, 2.5, True):
        with pytest.raises(QueryError, match="k must be an integer") as err:
            searcher.search_vector(np.ones(32), k=k, embedder="a")
        assert err.value.code == "bad_k"
    with pytest.raises(QueryError, match="zero vector"):
        searcher.search_vector(np.zeros(32), embedder="a")
    with pytest.raises(QueryError, match="numbers"):
        searcher.search_vector(["x"] * 32, embedder="a")
    # k up to the index's max_k is served (clamped to n), more is refused.
    assert len(searcher.search_vector(np.ones(16), k=1000, embedder="b")) == 1000
    with pytest.raises(
        QueryError, match="k=5000 is above the most the index of embedder 'b' serves, 1000"
    ) as err:
        searcher.search_vector(np.ones(16), k=5000, embedder="b")
    assert err.value.code == "bad_k"


def test_cosine_queries_of_any_magnitude_have_a_direction(searcher, vec_run):
    from retrieval.queries import prepare_queries

    data = vec_run[2]["a"]
    v = data.vectors[42] + 0.1 * np.random.default_rng(1).standard_normal(32).astype(np.float32)
    want = searcher.search_vector(v, k=10, embedder="a")
    assert want[0].score > 0.5
    # 1e20: float32's sum of squares overflows; 1e-30: it underflows to 0; 1e-50: float64
    # values that are 0 in float32.
    for scaled in (v * np.float32(1e20), v * np.float32(1e-30), v.astype(np.float64) * 1e-50):
        got = searcher.search_vector(scaled, k=10, embedder="a")
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    signs = np.sign(v).astype(np.float32)
    subnormal = searcher.search_vector(signs * np.float32(1e-44), k=10, embedder="a")
    assert [h.id for h in subnormal] == [h.id for h in searcher.search_vector(signs, k=10, embedder="a")]
    # What the index searches with is the unit direction, in float32.
    queries = prepare_queries(np.stack([v * 1e20, v * 1e-30]), dim=32, distance="cosine")
    assert queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(queries[0], queries[1], atol=1e-7)
    # Only a vector that is all zeros is refused.
    with pytest.raises(QueryError, match="all zeros") as err:
        searcher.search_vector(np.zeros(32), embedder="a")
    assert err.value.code == "zero_vector"
    with pytest.raises(QueryError, match=r"\(row 1\) is all zeros") as err:
        searcher.search_vector(np.stack([v, np.zeros(32, np.float32)]), embedder="a")
    assert err.value.code == "zero_vector"
    assert len(searcher.search_vector(np.zeros(16), k=3, embedder="b")) == 3  # squared_l2


def _chunked_metadata_table():
    import pyarrow as pa

    sizes = [3, 0, 4, 1, 5]  # an empty chunk too
    n = sum(sizes)

    def chunked(values, type_):
        out, at = [], 0
        for size in sizes:
            out.append(pa.array(values[at : at + size], type_))
            at += size
        return pa.chunked_array(out, type_)

    return pa.table(
        {
            "sha256": chunked([f"{i:064x}" for i in range(n)], pa.string()),
            "blob": chunked([bytes([i]) * i if i % 4 else None for i in range(n)], pa.binary()),
            "width": chunked(list(range(100, 100 + n)), pa.int32()),
            "score": chunked([i / 3 for i in range(n)], pa.float64()),
            "count": chunked([i if i % 3 else None for i in range(n)], pa.int64()),
            "flag": chunked([bool(i % 2) if i % 5 else None for i in range(n)], pa.bool_()),
            "tags": chunked([[f"t{i}", "x"] if i % 2 else [] for i in range(n)], pa.list_(pa.string())),
        }
    ), n


def test_metadata_columns_too_big_to_combine_stay_chunked():
    """A string column over 2 GiB cannot be combined into one `string` array (nor taken from
    with ChunkedArray.take); such columns stay chunked.  The threshold is lowered to 0 here
    to run that path on a small table; the fetched rows are the same."""
    import pyarrow as pa

    from serving.metadata import MetadataColumns

    table, n = _chunked_metadata_table()
    combined = MetadataColumns(table)
    chunked = MetadataColumns(table, combine_max_bytes=0)
    sha = chunked.column_chunks("sha256")
    assert [len(c) for c in sha] == [3, 4, 1, 5]  # not combined, empty chunk dropped
    assert all(c.type == pa.string() for c in sha)
    assert len(combined.column_chunks("sha256")) == 1
    assert chunked.column_chunks("width") is None  # numeric fast path kept
    rng = np.random.default_rng(0)
    for rows in (
        [0],
        [n - 1],
        [2, 3, 7, 8],
        [12, 0, 5, 5, 3],
        list(range(n))[::-1],
        rng.integers(0, n, 20),
        [3, 4, 5, 6],
        [],
    ):
        want = table.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()
        assert chunked.rows(rows) == want
        assert combined.rows(rows) == want


def test_vector_path_never_imports_tensorflow(vec_run):
    code = textwrap.dedent(f"""
        import sys, time
        t = time.perf_counter()
        import serving
        import_ms = (time.perf_counter() - t) * 1000
        assert "scann" not in sys.modules and "pyarrow" not in sys.modules, "import serving is not cheap"
        s = serving.Searcher.open({str(vec_run[0])!r})
        assert s.search_vector([1.0] * 32, k=3, embedder="a")[0].id
        assert s.search_id("b-00001", k=3, embedder="b")[0].id == "b-00001"
        s.info()
        import serving.http
        serving.http.create_app(s)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_hub", "keras")))
        print(round(import_ms, 1))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules, _ = proc.stdout.strip().splitlines()[-2:]
    assert modules == "[]"


def test_serving_knows_no_index_file_names():
    """Serving reads an index only through retrieval.searchable.SearchableIndex."""
    from retrieval import index, projection, scann_assets

    names = {
        index.IDS_FILE,
        index.METADATA_FILE,
        index.DATASET_FILE,
        index.SCANN_DIR + "/",
        projection.PROJECTION_FILE,
        scann_assets.DATASET[1],
        "manifest.json",
    }
    serving_dir = os.path.join(REPO_ROOT, "serving")
    for module in sorted(os.listdir(serving_dir)):
        if module.endswith(".py"):
            with open(os.path.join(serving_dir, module)) as f:
                text = f.read()
            assert not [name for name in names if name in text], module
