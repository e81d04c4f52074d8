"""imgindex on Beam's portable runner, compared with the same run on the local runner.

`--runner=PortableRunner --job_endpoint=embed` submits the job to Beam's job server, run
in-process; where the Python code runs is the environment:
- EXTERNAL: an SDK worker pool started by the test (`python -m
  apache_beam.runners.worker.worker_pool_main`, tests.helpers.worker_pool), the harness
  that Flink and Spark task managers start.  Its workers are separate processes that import
  imgindex as the installed package; they share the test's file system, as a cluster's
  workers share a mount.  `imgindex build --index_shards 2` runs both of its pipelines
  there (embedding, then the sharded index build).
- LOOPBACK: the workers run in the submitting process (`imgindex embed`).

Each must publish what the local runner (FnApiRunner, the default) publishes from the same
input: the same ids, the same vectors (float32 rounding at most, see the tolerance below),
each id in the same shard, the same merged recall and the same answers to queries.
Real Beam, real Parquet, real ScaNN, the tiny real SavedModel of conftest.py.
"""

import json
import os

import numpy as np
import pytest

from imgindex import cli
from retrieval import runs, sharded, tables
from serving import Searcher
from tests.helpers import images
from tests.helpers import worker_pool as wp

pytestmark = pytest.mark.slow

N_IMAGES = 300
EMBEDDER = "tiny"
# Vectors of the same model on the same machine, computed in another process and possibly
# in other batches: equal up to float32 rounding (README: within one runtime, 1 - cosine
# <= 3e-13).  The tiny model's components are O(1).
ATOL = 1e-6


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return images.write_folder(tmp_path_factory.mktemp("portable") / "in", N_IMAGES)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A worker pool for this module's tests, stopped (with its workers) at the end, also
    when a test fails."""
    try:
        started = wp.start(tmp_path_factory.mktemp("worker_pool"))
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"Beam's SDK worker pool could not start: {exc}")
    yield started
    started.stop()


def _build(root, photos, tiny, *runner_flags):
    argv = [
        "build",
        f"--input={photos}",
        f"--output={root}",
        f"--embedder={EMBEDDER}={tiny},size=32",
        "--index_shards=2",
        *runner_flags,
    ]
    assert cli.main(argv) == 0
    return runs.resolve_run(str(root))


def _table(directory):
    """id -> (sha256, vector) of an embedder's Parquet table."""
    data = tables.read_embeddings(directory, with_columns=True)
    rows = data.columns.to_pylist()
    return {row["id"]: (row["sha256"], data.vectors[i]) for i, row in enumerate(rows)}


def _shards(run_dir):
    """The published sharded index: [{id: stored vector}] per shard, and its merged recall."""
    index = sharded.open_index(runs.index_dir(run_dir, EMBEDDER))
    assert isinstance(index, sharded.ShardedIndex) and index.num_shards == 2
    contents = []
    for shard in index.shards:
        stored = shard.stored_vectors()
        contents.append({item_id: np.asarray(stored[row]) for row, item_id in enumerate(shard.ids)})
    return contents, index.recall


def _assert_same_vectors(got, expected, what):
    assert sorted(got) == sorted(expected), f"{what}: other ids"
    worst = max(float(np.max(np.abs(got[i] - expected[i]))) for i in expected)
    assert worst <= ATOL, f"{what}: vectors differ by up to {worst}"


def test_build_on_an_external_worker_pool_publishes_what_the_local_runner_does(
    tmp_path, photos, tiny_savedmodel, pool
):
    local = _build(tmp_path / "local", photos, tiny_savedmodel)
    portable = _build(
        tmp_path / "portable",
        photos,
        tiny_savedmodel,
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=EXTERNAL",
        f"--environment_config={pool.address}",
    )
    # The pool did the work: it started workers (it logs each command it starts).
    assert "Starting worker with command" in pool.output(), pool.output()[-2000:]
    assert runs.read_run_manifest(portable).status == "published"
    with open(os.path.join(portable, "run_report.json")) as f:
        assert json.load(f)["runner"] == "PortableRunner"

    # The embedding tables: the same rows.
    table_local = _table(os.path.join(local, runs.EMBEDDINGS_DIR, EMBEDDER))
    table_portable = _table(os.path.join(portable, runs.EMBEDDINGS_DIR, EMBEDDER))
    assert len(table_local) == N_IMAGES
    assert {k: v[0] for k, v in table_portable.items()} == {k: v[0] for k, v in table_local.items()}

    # The index: every id in the same shard with the same stored vector, the same recall.
    shards_local, recall_local = _shards(local)
    shards_portable, recall_portable = _shards(portable)
    for number, (got, expected) in enumerate(zip(shards_portable, shards_local)):
        _assert_same_vectors(got, expected, f"shard {number}")
    assert sum(len(s) for s in shards_portable) == N_IMAGES and all(shards_portable)
    assert recall_portable == recall_local

    # Serving both roots: the same answers.
    a, b = Searcher.open(str(tmp_path / "local")), Searcher.open(str(tmp_path / "portable"))
    assert a.info()["embedders"][EMBEDDER]["n"] == b.info()["embedders"][EMBEDDER]["n"] == N_IMAGES
    rng = np.random.default_rng(0)
    queries = [a.get_vector(f"img{i:03d}.jpg") for i in (0, 57, 123, 299)]
    queries += list(rng.standard_normal((4, a.get_vector("img000.jpg").shape[0])).astype(np.float32))
    for query in queries:
        hits_a, hits_b = a.search_vector(query, k=10), b.search_vector(query, k=10)
        assert [h.id for h in hits_b] == [h.id for h in hits_a]
        np.testing.assert_allclose([h.score for h in hits_b], [h.score for h in hits_a], atol=ATOL)
    for item_id in ("img000.jpg", "img150.jpg"):
        assert [h.id for h in b.search_id(item_id, k=5)] == [h.id for h in a.search_id(item_id, k=5)]


def test_embed_on_loopback_writes_what_the_local_runner_writes(tmp_path, photos, tiny_savedmodel):
    def embed(output, *runner_flags):
        argv = [
            "embed",
            f"--input={photos}",
            f"--output={output}",
            f"--embedder={EMBEDDER}={tiny_savedmodel},size=32",
        ]
        assert cli.main([*argv, *runner_flags]) == 0
        return _table(os.path.join(output, "embeddings", EMBEDDER))

    local = embed(tmp_path / "local")
    loopback = embed(
        tmp_path / "loopback",
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=LOOPBACK",
    )
    assert len(local) == N_IMAGES
    assert {k: v[0] for k, v in loopback.items()} == {k: v[0] for k, v in local.items()}
    _assert_same_vectors({k: v[1] for k, v in loopback.items()}, {k: v[1] for k, v in local.items()}, "table")
