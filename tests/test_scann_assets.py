"""Tree-AH built through ScaNN's asset files chunk by chunk (retrieval.scann_assets): identical
to ScaNN's own build, streamed from memory maps, and cleaned up."""

import gc
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import npy_stream, scann_assets, tables
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError
from retrieval.exact import exact_search, exact_search_by_chunks, normalize_rows
from retrieval.index import build_index, choose_config, load_index
from retrieval.scann_import import import_scann_pybind

D = 32


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((60, D)).astype(np.float32)
    x = centres[rng.integers(0, 60, 6000)] + 0.3 * rng.standard_normal((6000, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _configure(builder):
    return builder.tree(num_leaves=40, num_leaves_to_search=6, training_sample_size=6000).score_ah(
        2, anisotropic_quantization_threshold=0.2, training_sample_size=6000
    )


def test_chunked_hashing_is_byte_identical_to_scann_build(clustered, tmp_path):
    scann = import_scann_pybind()
    reference = tmp_path / "reference"
    reference.mkdir()
    built = _configure(scann.builder(clustered, 10, "dot_product")).reorder(50).build()
    built.serialize(str(reference), relative_path=True)

    staged = tmp_path / "staged"
    staged.mkdir()
    trained = scann_assets.read_config(reference / scann_assets.CONFIG_FILE)
    reorder = type(trained)()
    reorder.CopyFrom(trained)
    trained.ClearField("exact_reordering")
    for _, name in (scann_assets.PARTITIONER, scann_assets.AH_CENTERS):
        (staged / name).write_bytes((reference / name).read_bytes())
    np.save(staged / "dataset.npy", clustered)
    # Several chunks of uneven sizes, so that appending is exercised.
    scann_assets.hash_rows(trained, staged, chunk_rows=1700)
    for _, name in (scann_assets.TOKENIZATION, scann_assets.AH_DATASET):
        np.testing.assert_array_equal(np.load(staged / name), np.load(reference / name))
    assert sorted(p.name for p in staged.iterdir()) == sorted(
        [
            "dataset.npy",
            "datapoint_to_token.npy",
            "hashed_dataset.npy",
            "ah_codebook.pb",
            "serialized_partitioner.pb",
        ]
    )

    scann_assets.finish(trained, reorder, staged)
    loaded = scann.load_searcher(str(staged), assets_backcompat_shim=False)
    queries = clustered[:200] + 0.01
    expected_rows, expected_scores = built.search_batched(queries)
    rows, scores = loaded.search_batched(queries)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.parametrize("size", [2500, 6000])
def test_hashing_reuses_the_training_samples_codes_byte_identically(clustered, tmp_path, size):
    def configure(builder):
        return builder.tree(num_leaves=40, num_leaves_to_search=6, training_sample_size=size).score_ah(
            2, anisotropic_quantization_threshold=0.2, training_sample_size=size
        )

    rows = scann_assets.sample_indices(len(clustered), size, seed=3)
    reused, encoded = tmp_path / "reused", tmp_path / "encoded"
    reused.mkdir()
    np.save(reused / "dataset.npy", clustered)
    trained = scann_assets.train(
        scann_assets.sample_rows(clustered, rows),
        reused,
        scann_distance="dot_product",
        k=10,
        configure=configure,
    )
    assert sorted(p.name for p in reused.iterdir() if p.name.startswith("sample-")) == sorted(
        scann_assets.SAMPLE_HASHES.values()
    )
    shutil.copytree(reused, encoded)
    scann_assets.hash_rows(trained, reused, sample=rows, chunk_rows=1700)
    scann_assets.hash_rows(trained, encoded, chunk_rows=1700)  # every row through ScaNN's upsert
    for _, name in (scann_assets.TOKENIZATION, scann_assets.AH_DATASET):
        np.testing.assert_array_equal(np.load(reused / name), np.load(encoded / name))
    for directory in (reused, encoded):
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            [
                "dataset.npy",
                "datapoint_to_token.npy",
                "hashed_dataset.npy",
                "ah_codebook.pb",
                "serialized_partitioner.pb",
            ]
        )


def test_memory_mapped_input_gives_the_same_index_and_is_not_modified(clustered, tmp_path):
    raw = clustered * 3.0  # not unit length: cosine normalises, but never the caller's file
    path = tmp_path / "vectors.npy"
    np.save(path, raw)
    mapped = np.load(path, mmap_mode="r")
    ids = [f"v{i}" for i in range(len(raw))]
    config = choose_config(len(raw), D, "cosine", method="tree_ah")
    from_file = build_index(mapped, ids, config=config, work_dir=tmp_path / "work")
    in_memory = build_index(raw, ids, config=config)
    np.testing.assert_array_equal(np.load(path), raw)
    assert from_file.manifest.search_defaults == in_memory.manifest.search_defaults
    assert from_file.manifest.recall["value"] == in_memory.manifest.recall["value"] >= 0.95
    queries = clustered[::97] + 0.02
    assert from_file.search_batch(queries)[0] == in_memory.search_batch(queries)[0]


def test_saving_links_the_built_assets_and_the_work_directory_goes_with_the_index(clustered, tmp_path):
    work = tmp_path / "work"
    index = build_index(
        clustered,
        [f"v{i}" for i in range(len(clustered))],
        config=choose_config(len(clustered), D, "cosine", method="tree_ah"),
        work_dir=work,
    )
    (build_dir,) = work.iterdir()
    index.save(tmp_path / "index")
    saved = tmp_path / "index" / "scann"
    assert {p.name for p in saved.iterdir()} == {
        "scann_config.pb",
        "scann_assets.pbtxt",
        "ah_codebook.pb",
        "serialized_partitioner.pb",
        "datapoint_to_token.npy",
        "hashed_dataset.npy",
        "dataset.npy",
    }
    # Same file, not a copy: saving costs no second dataset on disk or in memory.
    assert (saved / "dataset.npy").stat().st_ino == (build_dir / "dataset.npy").stat().st_ino
    loaded = load_index(tmp_path / "index")
    queries = clustered[:50] + 0.01
    assert loaded.search_batch(queries)[0] == index.search_batch(queries)[0]
    del index
    gc.collect()
    assert not build_dir.exists()
    assert loaded.search(queries[0])[0]  # the loaded index owns its own files


def test_a_failed_build_leaves_no_work_files(clustered, tmp_path):
    bad = clustered.copy()
    bad[4321, 3] = np.nan
    with pytest.raises(ConfigError, match="row 4321 contains NaN"):
        build_index(
            bad,
            [f"v{i}" for i in range(len(bad))],
            config=choose_config(len(bad), D, "cosine", method="tree_ah"),
            work_dir=tmp_path,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "row, value, message",
    [
        (70_000, np.nan, "row 70000 contains NaN"),  # in the second chunk: numbered in the whole matrix
        (65_535, 0.0, r"zero L2 norm \(first: row 65535\)"),
    ],
)
def test_write_dataset_names_rows_of_the_whole_matrix(tmp_path, row, value, message):
    x = np.ones((70_001, 2), np.float32)
    x[row] = value
    with pytest.raises(ConfigError, match=message):
        scann_assets.write_dataset(x, tmp_path / "dataset.npy", normalize=True)


@pytest.mark.parametrize("chunk_rows", [5, 17])  # chunks smaller than k, and triples split by chunks
def test_exact_search_by_chunks_equals_exact_search_with_ties(chunk_rows):
    # Rows of four +-1 and four 0: every norm is 2, so normalised components (+-0.5) and all
    # scores are exact in float32 whatever order a BLAS kernel sums in, and equal rows tie
    # exactly (with random floats, a GEMM may score identical rows a last bit apart).
    rng = np.random.default_rng(3)
    base = np.zeros((40, 8), np.float32)
    for row in base:
        row[rng.choice(8, size=4, replace=False)] = rng.choice([-1.0, 1.0], size=4)
    x = np.repeat(base, 3, axis=0)  # every row 3 times
    queries = x[::7].copy()
    for distance in ("dot_product", "squared_l2", "cosine"):
        database = normalize_rows(x) if distance == "cosine" else x
        expected_rows, expected_scores = exact_search(queries, database, 9, distance)
        rows, scores = exact_search_by_chunks(
            queries, x, 9, distance, normalize_database=distance == "cosine", chunk_rows=chunk_rows
        )
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


def test_exact_search_by_chunks_over_several_query_blocks_and_a_memory_map(tmp_path):
    # More queries than one query block (256), and enough rows per chunk that later chunks
    # take the path that only gathers keys beating the carried k-th best.
    rng = np.random.default_rng(5)
    x = normalize_rows(rng.standard_normal((6000, 16)).astype(np.float32))
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    queries = rng.standard_normal((600, 16)).astype(np.float32)
    for distance in ("dot_product", "cosine"):
        expected_rows, expected_scores = exact_search(queries, x, 11, distance)
        rows, scores = exact_search_by_chunks(queries, mapped, 11, distance, chunk_rows=1400)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    bad = x.copy()
    bad[4321, 3] = np.nan
    with pytest.raises(ConfigError, match="row 4321 contains NaN"):
        exact_search_by_chunks(queries, bad, 11, "dot_product", chunk_rows=1400)


def test_npy_writer_checks_the_row_count(tmp_path):
    with pytest.raises(ValueError, match="wrote 2 rows, the header says 3"):
        with npy_stream.NpyWriter(tmp_path / "a.npy", (3, 2), np.float32) as out:
            out.append(np.zeros((2, 2)))
    with npy_stream.NpyWriter(tmp_path / "b.npy", (3, 2), np.float32) as out:
        with pytest.raises(ValueError, match="do not fit"):
            out.append(np.zeros((4, 2)))
        out.append(np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.arange(6, dtype=np.float32).reshape(3, 2))
    assert npy_stream.chunk_bounds(10, 4) == [(0, 3), (3, 7), (7, 10)]
    assert npy_stream.chunk_bounds(0, 4) == [(0, 0)]


def test_read_embeddings_into_a_file_matches_the_in_memory_read(tmp_path, clustered):
    spec = EmbedderSpec(name="t", handle="t", fingerprint="f", dim=D)
    n = 1000
    source = tmp_path / "tables"
    source.mkdir()
    tables.write_embeddings(
        str(source / "part-0.parquet"),
        spec,
        [f"v{i}" for i in range(n)],
        clustered[:n],
        sha256s=["0" * 64] * n,
        sources=[f"s{i}" for i in range(n)],
        widths=[1] * n,
        heights=[1] * n,
    )
    in_memory = tables.read_embeddings(str(source), with_columns=True)
    from_file = tables.read_embeddings(str(source), with_columns=True, vectors_path=str(tmp_path / "v.npy"))
    assert isinstance(from_file.vectors, np.memmap) and isinstance(from_file.ids, pa.StringArray)
    assert from_file.ids.to_pylist() == in_memory.ids
    np.testing.assert_array_equal(from_file.vectors, in_memory.vectors)
    assert from_file.columns.equals(in_memory.columns)
    streamed = tables.read_embeddings(
        str(source), with_columns=True, columns_path=str(tmp_path / "c.parquet")
    )
    assert streamed.columns == tmp_path / "c.parquet"
    assert pq.read_table(streamed.columns).equals(in_memory.columns)
    # An index saved with the file as its metadata holds the same rows; a wrong row count is refused.
    # Arrow ids stay Arrow through build and save (no Python string per id) and answer searches.
    built = build_index(from_file.vectors, from_file.ids)
    assert isinstance(built._ids, pa.StringArray)
    built.save(tmp_path / "index", tables={"metadata.parquet": streamed.columns})
    assert isinstance(built._ids, pa.StringArray)
    assert pq.read_table(tmp_path / "index" / "metadata.parquet").equals(in_memory.columns)
    assert pq.read_table(tmp_path / "index" / "ids.parquet").column("id").to_pylist() == in_memory.ids
    assert built.search(in_memory.vectors[7], k=1)[0] == ["v7"]
    assert list(built.ids) == in_memory.ids == list(load_index(tmp_path / "index").ids)
    short = tmp_path / "short.parquet"
    pq.write_table(in_memory.columns.slice(0, 10), short)
    with pytest.raises(ConfigError, match="must have one row per vector"):
        built.save(tmp_path / "index2", tables={"metadata.parquet": short})


def test_training_sample_is_seeded_and_sorted(clustered):
    rows = scann_assets.sample_indices(len(clustered), 500, seed=0)
    np.testing.assert_array_equal(rows, scann_assets.sample_indices(len(clustered), 500, seed=0))
    assert len(np.unique(rows)) == 500 and np.all(np.diff(rows) > 0)
    a = scann_assets.sample_rows(clustered, rows, chunk_rows=1000)
    b = scann_assets.sample_rows(clustered, rows, chunk_rows=333)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, clustered[rows])
    assert math.isclose(float(np.linalg.norm(a[0])), 1.0, rel_tol=1e-5)
