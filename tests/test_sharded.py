"""Sharded index: the Beam build (pipelines.build_shards), the merged search, the layout checks."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import build, build_shards, shard_recall
from retrieval import exact, metrics, runs, sharded, tables
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError, DimensionMismatchError, IndexFormatError, QueryError
from retrieval.index import METADATA_FILE, build_index
from retrieval.searchable import SearchableIndex
from serving import Searcher
from tests.helpers.runs_fixture import clustered

SPEC = EmbedderSpec(name="vec", handle="synthetic", fingerprint="synthetic:1", dim=16)


def _run_with_table(tmp_path, n, d=16, seed=0, files=2):
    """A run directory holding an embedding table of n clustered unit vectors in `files` files."""
    run_dir = str(tmp_path / "run")
    table_dir = os.path.join(run_dir, runs.EMBEDDINGS_DIR, "vec")
    os.makedirs(table_dir)
    x = clustered(n, d, seed=seed, n_clusters=50)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"img-{i:06d}" for i in range(n)]
    spec = EmbedderSpec(name="vec", handle="synthetic", fingerprint="synthetic:1", dim=d)
    for part, rows in enumerate(np.array_split(np.arange(n), files)):
        tables.write_embeddings(
            os.path.join(table_dir, f"part-{part}.parquet"),
            spec,
            [ids[r] for r in rows],
            x[rows],
            sha256s=["0" * 64] * len(rows),
            sources=[f"src#{r}" for r in rows],
            widths=[1] * len(rows),
            heights=[1] * len(rows),
            row_group_size=1000,
        )
    return run_dir, x, ids


def _build(run_dir, num_shards=None, max_shard_vectors=None, flags=(), k=10, target=0.95):
    return build_shards.build_sharded(
        PipelineOptions(flags=list(flags)),
        run_dir,
        "vec",
        num_shards=num_shards,
        max_shard_vectors=max_shard_vectors,
        distance="cosine",
        k=k,
        target_recall=target,
    )


def test_shard_of_is_a_stable_hash_of_the_id_alone():
    ids = [f"id-{i}" for i in range(5000)]
    shards = sharded.shard_of(ids, 7)
    expected = [
        int.from_bytes(
            hashlib.blake2b(i.encode(), digest_size=8, person=b"imgindex-shard").digest(), "little"
        )
        % 7
        for i in ids[:50]
    ]
    assert shards[:50].tolist() == expected
    assert sharded.shard_of(ids[::-1], 7).tolist() == shards[::-1].tolist()  # order does not matter
    counts = np.bincount(shards, minlength=7)
    assert counts.min() > 600 and counts.max() < 830  # ~714 each
    with pytest.raises(ConfigError, match="num_shards"):
        sharded.shard_of(ids, 0)


def test_shards_for_keeps_six_sigma_headroom_below_the_budget():
    assert sharded.shards_for(1000, 1000) == 1
    assert sharded.shards_for(1000, 999) >= 2
    for n, budget in [(10_000, 3_000), (1_000_000, 300_000), (123_457, 10_000)]:
        shards = sharded.shards_for(n, budget)
        mean = n / shards
        assert mean + 6 * np.sqrt(mean * (1 - 1 / shards)) <= budget
        smaller = n / (shards - 1)
        assert shards == 1 or smaller + 6 * np.sqrt(smaller * (1 - 1 / (shards - 1))) > budget


def test_merge_top_k_orders_by_score_and_skips_padding():
    ids, scores = sharded.merge_top_k([["a", "b"], ["c"], []], [[0.9, 0.1], [0.5, np.nan], []], 2, True)
    assert ids == ["a", "c"] and scores.tolist() == pytest.approx([0.9, 0.5])
    ids, _ = sharded.merge_top_k([["a", "b"], ["c"]], [[0.9, 1.1], [0.5]], 3, False)
    assert ids == ["c", "a", "b"]


@pytest.mark.slow
def test_sharded_build_partitions_by_id_and_merged_search_is_exact_for_brute_force_shards(tmp_path):
    run_dir, x, ids = _run_with_table(tmp_path, 3000)
    built = _build(run_dir, num_shards=3)
    index_dir = runs.index_dir(run_dir, "vec")
    assert sorted(os.listdir(index_dir)) == ["manifest.json"] + [sharded.shard_name(i, 3) for i in range(3)]
    loaded = sharded.open_index(index_dir)
    assert isinstance(loaded, sharded.ShardedIndex) and loaded.n == 3000 and loaded.num_shards == 3
    for number, shard in enumerate(loaded.shards):
        assert set(sharded.shard_of(list(shard.ids), 3)) == {number}
    assert sorted(loaded.ids) == ids
    # Brute-force shards: the merged top k is the exact top k.
    queries = x[:50] + 0.01
    got, scores = loaded.search_batch(queries, k=10)
    truth, truth_scores = exact.exact_search(queries, x, 10, "cosine")
    assert [[ids[r] for r in row] for row in truth] == got
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    single_ids, single_scores = loaded.search(queries[0], k=10)
    assert single_ids == got[0]
    # Row answers are global rows (shard 0's rows first) naming the same hits.
    rows, row_scores = loaded.search_batch_rows(queries, k=10)
    assert [loaded.ids[r].tolist() for r in rows] == got
    np.testing.assert_array_equal(row_scores, scores)
    single_rows, _ = loaded.search_rows(queries[0], k=10)
    assert loaded.ids[single_rows].tolist() == got[0]
    assert (single_rows >= loaded.offsets[1]).any()  # hits outside shard 0 carry its offset
    m = built.manifest
    assert m.recall["value"] == 1.0 and m.recall["n_queries"] > 500 and m.recall["reached_target"]
    assert [(e["k"], e["value"]) for e in m.recall["per_k"]] == [(10, 1.0), (100, 1.0)]
    assert m.search_defaults == {"k": 10, "max_k": 100} and loaded.max_k == 100
    with pytest.raises(QueryError, match="k=101 is above the most the index of embedder 'vec' serves, 100"):
        loaded.search(queries[0], k=101)
    assert len(loaded.neighbours_of_row(0, k=101)[0]) == 101  # an id query without itself
    assert [s["n"] for s in m.shards] == [shard.n for shard in loaded.shards]
    assert not os.path.exists(os.path.join(index_dir, build_shards.PARTITIONS))


@pytest.mark.slow
def test_both_layouts_offer_readers_one_interface(tmp_path):
    run_dir, x, ids = _run_with_table(tmp_path, 3000)
    _build(run_dir, num_shards=3)
    many = sharded.open_index(runs.index_dir(run_dir, "vec"))
    data = tables.read_embeddings(os.path.join(run_dir, runs.EMBEDDINGS_DIR, "vec"), with_columns=True)
    build_index(data.vectors, data.ids, distance="cosine", k=10).save(
        tmp_path / "one", tables={METADATA_FILE: data.columns}
    )
    one = sharded.open_index(tmp_path / "one")
    for index in (one, many):
        assert isinstance(index, SearchableIndex)
        assert (index.n, index.d, index.input_dim, index.projection) == (3000, 16, 16, None)
        row = index.ids.tolist().index("img-000042")
        metadata = index.metadata()
        assert metadata.num_rows == 3000 and "id" not in metadata.column_names
        assert metadata.column("source")[row].as_py() == "src#42"
        np.testing.assert_allclose(index.stored_vectors()[row], x[42], atol=1e-6)
        rows, scores = index.neighbours_of_row(row, k=5)
        assert rows[0] == row and scores[0] == pytest.approx(1.0, abs=1e-5)
        by_vector, _ = index.search_rows(x[42] * 7.0, k=5)  # cosine: the scale does not matter
        assert by_vector.tolist() == rows.tolist()
        with pytest.raises(DimensionMismatchError, match="dimension 16, got 15"):
            index.search_rows(x[42][:15])


@pytest.mark.slow
def test_sharded_tree_ah_index_agrees_with_exact_search_like_a_single_index(tmp_path):
    n, d = 40_000, 64  # 20k x 64 per shard: tree-AH
    run_dir, x, ids = _run_with_table(tmp_path, n, d, seed=3)
    built = _build(run_dir, num_shards=2, target=0.95)
    assert all(s["method"] == "tree_ah" for s in built.manifest.shards)
    single = build_index(x, ids, distance="cosine", k=10, target_recall=0.95)
    rng = np.random.default_rng(1)
    queries = x[rng.choice(n, 300, replace=False)] + 0.05 * rng.standard_normal((300, d)).astype(np.float32)
    truth, _ = exact.exact_search(queries, x, 10, "cosine")
    truth_ids = [[ids[r] for r in row] for row in truth]
    sharded_recall = metrics.recall_at_k(built.open().search_batch(queries, k=10)[0], truth_ids, 10)
    single_recall = metrics.recall_at_k(single.search_batch(queries, k=10)[0], truth_ids, 10)
    assert sharded_recall >= 0.95 and single_recall >= 0.95
    # The recall recorded by the build (merged, leave-self-out) is in line with the measured one.
    assert built.manifest.recall["value"] >= 0.95
    assert abs(built.manifest.recall["value"] - sharded_recall) < 0.04
    # At every k of the ladder: each shard tuned per k, the merged recall measured per k.
    merged = {e["k"]: e["value"] for e in built.manifest.recall["per_k"]}
    assert sorted(merged) == [10, 100] and min(merged.values()) >= 0.95
    for shard in built.open().shards:
        assert [e["k"] for e in shard.manifest.recall["per_k"]] == [10, 100] and shard.max_k == 100
    truth_100, _ = exact.exact_search(queries, x, 100, "cosine")
    at_100 = metrics.recall_at_k(
        built.open().search_batch(queries, k=100)[0], [[ids[r] for r in row] for row in truth_100], 100
    )
    assert at_100 >= 0.94 and abs(merged[100] - at_100) < 0.04


@pytest.mark.slow
def test_sharded_build_with_held_out_tuning_queries(tmp_path):
    n, d = 40_000, 64  # tree-AH shards
    run_dir, x, ids = _run_with_table(tmp_path, n, d, seed=5)
    rng = np.random.default_rng(2)
    queries = x[rng.choice(n, 400, replace=False)] + 0.3 * rng.standard_normal((400, d)).astype(np.float32)
    built = build_shards.build_sharded(
        PipelineOptions(flags=[]),
        run_dir,
        "vec",
        num_shards=2,
        max_shard_vectors=None,
        distance="cosine",
        k=10,
        target_recall=0.9,
        tuning_queries=queries[:200],
    )
    recall = built.manifest.recall
    assert recall["method"].startswith("held-out over the merged shards: 200 query vectors")
    assert recall["n_queries"] == 200 and len(recall["per_shard"]) == 2
    opened = built.open()
    for shard in opened.shards:
        assert shard.manifest.recall["method"].startswith("held-out: 200 query vectors")
    # The recorded merged recall predicts the recall of other queries of the same kind.
    truth, _ = exact.exact_search(queries[200:], x, 10, "cosine")
    measured = metrics.recall_at_k(
        opened.search_batch(queries[200:], k=10)[0], [[ids[r] for r in row] for row in truth], 10
    )
    assert abs(recall["value"] - measured) < 0.05


@pytest.mark.slow
def test_max_shard_vectors_picks_the_shard_count_and_bounds_every_shard(tmp_path):
    run_dir, _, _ = _run_with_table(tmp_path, 3000, files=3)
    built = _build(run_dir, max_shard_vectors=1000)
    assert built.num_shards == sharded.shards_for(3000, 1000) > 3
    assert built.method == f"sharded({built.num_shards}x brute_force)"
    sizes = [shard.n for shard in built.open().shards]
    assert sum(sizes) == 3000 and max(sizes) <= 1000
    # Each shard's matrix is all a build worker held: the shard index's own row count.
    assert sizes == [s["n"] for s in built.manifest.shards]


@pytest.mark.slow
def test_a_shard_above_the_budget_or_empty_is_refused(tmp_path):
    run_dir, _, _ = _run_with_table(tmp_path, 200)
    with pytest.raises(Exception, match="above --max_shard_vectors 90"):
        _build(run_dir, num_shards=2, max_shard_vectors=90)
    shutil.rmtree(runs.index_dir(run_dir, "vec"))
    tiny_dir, _, _ = _run_with_table(tmp_path / "tiny", 3, files=1)
    with pytest.raises(Exception, match="got no rows; use fewer --index_shards"):
        _build(tiny_dir, num_shards=40)


@pytest.mark.slow
def test_missing_or_corrupted_shard_is_a_clear_error(tmp_path):
    run_dir, _, _ = _run_with_table(tmp_path, 600)
    _build(run_dir, num_shards=2)
    index_dir = runs.index_dir(run_dir, "vec")
    shard1 = os.path.join(index_dir, sharded.shard_name(1, 2))
    broken = str(tmp_path / "broken")
    shutil.copytree(index_dir, broken)
    with open(os.path.join(broken, sharded.shard_name(1, 2), "ids.parquet"), "r+b") as f:
        f.seek(10)
        f.write(b"XXXX")
    with pytest.raises(IndexFormatError, match="corrupted"):
        sharded.open_index(broken)
    shutil.rmtree(shard1)
    with pytest.raises(IndexFormatError, match="shard 1 of 2 .* is missing"):
        sharded.open_index(index_dir)
    # A shard swapped for another index (its manifest differs from the recorded one).
    other = str(tmp_path / "other")
    shutil.copytree(broken, other)
    manifest = json.load(open(os.path.join(other, "manifest.json")))
    manifest["shards"][0]["manifest_sha256"] = "0" * 64
    with open(os.path.join(other, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(IndexFormatError, match="shard 0 .* replaced or modified"):
        sharded.open_index(other)


@pytest.mark.slow
def test_sharded_build_in_multi_processing_mode_gives_the_same_index(tmp_path):
    run_dir, _, _ = _run_with_table(tmp_path, 1200)
    local = _build(run_dir, num_shards=2).open()
    other_dir = str(tmp_path / "mp")
    shutil.copytree(os.path.join(run_dir, runs.EMBEDDINGS_DIR), os.path.join(other_dir, runs.EMBEDDINGS_DIR))
    mp = _build(
        other_dir, num_shards=2, flags=["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    ).open()
    assert sorted(mp.ids) == sorted(local.ids)
    assert [set(s.ids) for s in mp.shards] == [set(s.ids) for s in local.shards]
    assert mp.manifest.recall["value"] == local.manifest.recall["value"]


@pytest.mark.slow
def test_imgindex_build_with_shards_is_served_by_the_searcher(sharded_build):
    result = sharded_build
    root = result.root
    entry = result.manifest.embedders["tiny"]
    assert entry.shards == 2 and entry.method == "sharded(2x brute_force)" and entry.n == 40
    searcher = Searcher.open(root)
    info = searcher.info()["embedders"]["tiny"]
    assert info["n"] == 40 and info["id_queries"] and "source" in info["metadata_columns"]
    some_id = searcher.search_vector(np.ones(8, np.float32), k=40)[5].id
    hits = searcher.search_id(some_id, k=5)
    assert hits[0].id == some_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata["source"].endswith(some_id.split("/")[-1])
    # The same scores as an exact search over all 40 stored vectors (brute-force shards).
    all_ids = [h.id for h in searcher.search_vector(np.ones(8, np.float32), k=100)]
    assert len(all_ids) == 40
    stored = np.stack([searcher.get_vector(i) for i in all_ids])
    expected = np.sort(stored @ searcher.get_vector(some_id))[::-1][:5]
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)


def test_bad_shard_options_fail_before_work(tmp_path):
    for flags, words in [
        (["--index_shards=-1"], "must be >= 0"),
        (["--index_shards=2", "--pca_dim=8"], "cannot be combined"),
    ]:
        with pytest.raises(ConfigError, match=words):
            build.run(["--input=x", f"--output={tmp_path}", *flags])


def test_sharded_build_refuses_bad_tuning_queries_before_work(tmp_path):
    run_dir, _, _ = _run_with_table(tmp_path, 200, d=16)
    with pytest.raises(ConfigError, match=r"tuning_queries must be a non-empty 2-D array \(q, 16\)"):
        build_shards.build_sharded(
            PipelineOptions(flags=[]),
            run_dir,
            "vec",
            num_shards=2,
            max_shard_vectors=None,
            distance="cosine",
            k=10,
            target_recall=0.9,
            tuning_queries=np.ones((5, 8), np.float32),
        )
    assert not os.path.exists(runs.index_dir(run_dir, "vec"))


def test_merged_recall_is_measured_at_every_k_of_the_ladder():
    # Two shards, two leave-self-out probes ("a0" and "b0"); each shard answers exactly with 4
    # neighbours (the largest k, 3, plus the query itself) and with its index at k=1 and k=3.
    def answer(ids, scores):
        return [ids, scores]

    exact_a = [
        answer(["a0", "a1", "a2", "a3"], [1.0, 0.9, 0.7, 0.5]),
        answer(["a1", "a2", "a3", "a4"], [0.8, 0.6, 0.4, 0.2]),
    ]
    exact_b = [
        answer(["b1", "b2", "b3", "b4"], [0.85, 0.65, 0.45, 0.25]),
        answer(["b0", "b1", "b2", "b3"], [1.0, 0.9, 0.7, 0.5]),
    ]
    shard_a = {
        "probe_ids": ["a0", "b0"],
        "exact": exact_a,
        "approx": {"1": [answer(["a0", "a2"], [1.0, 0.7]), answer(["a1"], [0.8])], "3": exact_a},
        "recall": {"value": 0.5},
    }
    shard_b = {
        "probe_ids": ["a0", "b0"],
        "exact": exact_b,
        "approx": {"1": [answer(["b1"], [0.85]), answer(["b0", "b2"], [1.0, 0.7])], "3": exact_b},
        "recall": {"value": 1.0},
    }
    record = shard_recall.merged_recall([shard_a, shard_b], (1, 3), True, 0.9)
    # k=1: a0's best other is a1 (0.9), found only at k=3; b0's is b1, missed at k=1.
    assert [(e.k, e.value, e.n_queries) for e in record.per_k] == [(1, 0.0, 2), (3, 1.0, 2)]
    assert (record.k, record.value, record.per_shard) == (1, 0.0, (0.5, 1.0))
    assert [e.k for e in record.missed] == [1] and not record.reached_target
