"""Serving from an object-store root (issue 17): `Searcher.open("s3://...")` against moto's
real S3 server on 127.0.0.1.  Runs are built locally by the usual fixtures, then published to
the bucket the way a build publishes to object storage: the run's files, its run manifest,
and LATEST last (a single-object put).  Most are marked slow: Beam makes a new S3 client for
every object it reads or writes (0.2-0.5 s each against moto here)."""

import os

import numpy as np
import pytest

from retrieval import run_cache, runs, storage
from retrieval.errors import ImgIndexError, IndexFormatError
from retrieval.storage import StorageError
from serving import Searcher
from tests.helpers import runs_fixture as rf
from tests.helpers.s3 import point_latest, upload_run

RUN2 = "20260102T000000Z-bbbbbb"
RUN3 = "20260103T000000Z-cccccc"


@pytest.fixture
def bucket(s3_server):
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    return s3_server.make_bucket("serving-test")


@pytest.fixture(scope="module")
def second_run(tmp_path_factory):
    """A local published run of embedder "a" alone (other vectors than vec_run's)."""
    root = tmp_path_factory.mktemp("second")
    return rf.write_run(root, {"a": rf.vector_embedder("a", 500, 32, seed=7)}, run_id=RUN2)


def open_s3(root, s3_server, cache, **kwargs):
    return Searcher.open(root, storage_flags=s3_server.beam_flags(), cache_dir=str(cache), **kwargs)


def same_answers(a, b, d, embedder):
    queries = np.random.default_rng(3).standard_normal((5, d)).astype(np.float32)
    for left, right in zip(
        a.search_vector(queries, k=10, embedder=embedder), b.search_vector(queries, k=10, embedder=embedder)
    ):
        assert [h.id for h in left] == [h.id for h in right]
        np.testing.assert_allclose([h.score for h in left], [h.score for h in right], rtol=1e-6)
        assert [h.metadata for h in left] == [h.metadata for h in right]


def files_under(directory):
    out = {}
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, directory)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.slow  # every object costs Beam a new S3 client: 15-30 s a test here
def test_an_s3_root_answers_as_the_local_root(vec_run, bucket, s3_server, tmp_path):
    local_root, run_dir, _data = vec_run
    root = storage.join(bucket, "out")
    run_id = upload_run(run_dir, root)
    searcher = open_s3(root, s3_server, tmp_path / "cache")
    local = Searcher.open(local_root)
    assert searcher.run_id == local.run_id == run_id
    assert searcher.embedders == ["a", "b"]
    same_answers(searcher, local, 32, "a")
    same_answers(searcher, local, 16, "b")  # tree-AH
    hit = local.search_vector(np.ones(16, np.float32), k=1, embedder="b")[0]
    assert [h.id for h in searcher.search_id(hit.id, k=3, embedder="b")] == [
        h.id for h in local.search_id(hit.id, k=3, embedder="b")
    ]
    info = searcher.info()
    expected_dir = os.path.join(str(tmp_path / "cache"), "runs", "s3", "serving-test", "out", "runs", run_id)
    assert info["root"] == root and info["refresh"]["follows_latest"]
    assert info["run_dir"] == expected_dir and info["status"] == "published"
    # Only what serving reads is copied, and read-only, with its completion marker.
    copied = files_under(expected_dir)
    assert run_cache.MARKER in copied and runs.RUN_MANIFEST in copied
    assert all(
        rel.startswith("index" + os.sep) for rel in copied if rel not in (run_cache.MARKER, runs.RUN_MANIFEST)
    )
    assert not any(os.stat(os.path.join(expected_dir, rel)).st_mode & 0o222 for rel in copied)
    # Nothing published: no refresh to do.
    assert searcher.refresh() is False


@pytest.mark.slow  # every object costs Beam a new S3 client: 15-30 s a test here
def test_a_cached_run_is_not_downloaded_again(vec_run, bucket, s3_server, tmp_path):
    _root, run_dir, _data = vec_run
    root = storage.join(bucket, "out")
    run_id = upload_run(run_dir, root)
    cache = tmp_path / "cache"
    first = open_s3(root, s3_server, cache)
    local_run = first.info()["run_dir"]
    before = files_under(local_run)
    # Take the run's files out of the bucket (LATEST stays): a reopen that downloaded
    # anything but LATEST would fail.
    assert storage.delete_prefix(storage.join(root, "runs")) > 0
    again = open_s3(root, s3_server, cache)
    assert again.run_id == run_id and again.info()["run_dir"] == local_run
    assert files_under(local_run) == before  # the same files, not rewritten
    same_answers(first, again, 32, "a")
    # The cache API says so too.
    copy = run_cache.RunCache(root, str(cache)).fetch(run_id)
    assert (copy.downloaded_files, copy.downloaded_bytes) == (0, 0) and copy.reused_files == len(before) - 1


@pytest.mark.slow  # every object costs Beam a new S3 client: 15-30 s a test here
def test_latest_moving_hot_swaps_and_old_runs_are_pruned(vec_run, second_run, bucket, s3_server, tmp_path):
    _root, run_dir, _data = vec_run
    root = storage.join(bucket, "out")
    run1 = upload_run(run_dir, root)
    cache = tmp_path / "cache"
    searcher = open_s3(root, s3_server, cache)
    old = searcher.search_vector(np.ones(32, np.float32), k=5, embedder="a")
    upload_run(second_run, root)
    assert searcher.refresh() is True
    assert searcher.run_id == RUN2 and searcher.embedders == ["a"]
    same_answers(searcher, Searcher.open(second_run), 32, None)
    assert old.run_id == run1  # a result made before the swap keeps its run
    mirror = run_cache.mirror_dir(str(cache), root)
    assert sorted(os.listdir(os.path.join(mirror, "runs"))) == [run1, RUN2]
    # A third run: the one serving and the one before it stay cached.
    third = rf.write_run(tmp_path / "third", {"a": rf.vector_embedder("a", 300, 32, seed=9)}, run_id=RUN3)
    upload_run(third, root)
    assert searcher.refresh() is True and searcher.run_id == RUN3
    assert sorted(os.listdir(os.path.join(mirror, "runs"))) == [RUN2, RUN3]
    # A rollback is followed too.
    point_latest(root, RUN2)
    assert searcher.refresh() is True and searcher.run_id == RUN2


@pytest.mark.slow  # every object costs Beam a new S3 client: 15-30 s a test here
def test_an_incomplete_or_corrupt_run_is_refused_and_the_old_one_keeps_serving(
    vec_run, second_run, bucket, s3_server, tmp_path
):
    _root, run_dir, _data = vec_run
    root = storage.join(bucket, "out")
    run1 = upload_run(run_dir, root)
    cache = tmp_path / "cache"
    searcher = open_s3(root, s3_server, cache, refresh_retry_seconds=0)
    ids = "index/a/ids.parquet"
    # LATEST written before one of the run's files.
    upload_run(second_run, root, skip=(ids,))
    with pytest.raises(
        IndexFormatError, match=rf"run {RUN2} is incomplete: .*/runs/{RUN2}/{ids} does not exist"
    ):
        searcher.refresh()
    assert searcher.run_id == run1
    status = searcher.info()["refresh"]
    assert status["failed_run"].endswith(RUN2) and "is incomplete" in status["last_error"]
    # The file uploaded with other bytes (same size).
    data = bytearray(open(os.path.join(second_run, ids), "rb").read())
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(storage.join(root, "runs", RUN2, ids), bytes(data))
    with pytest.raises(IndexFormatError, match=rf"{ids} does not match its manifest \(its SHA-256 differs\)"):
        searcher.refresh()
    assert (
        searcher.run_id == run1
        and searcher.search_vector(np.ones(32, np.float32), k=3, embedder="a").run_id == run1
    )
    # Fixed: the swap happens, and the files already copied are not downloaded again.
    storage.upload(os.path.join(second_run, ids), storage.join(root, "runs", RUN2, ids))
    assert searcher.refresh() is True and searcher.run_id == RUN2
    assert searcher.info()["refresh"]["last_error"] is None


def test_a_resumed_copy_downloads_only_what_is_missing(second_run, bucket, s3_server, tmp_path):
    root = storage.join(bucket, "out")
    ids = "index/a/ids.parquet"
    upload_run(second_run, root, skip=(ids,))
    cache = run_cache.RunCache(root, str(tmp_path / "cache"))
    with pytest.raises(IndexFormatError, match="is incomplete"):
        cache.fetch(RUN2)
    assert not os.path.exists(cache.run_dir(RUN2)) and cache.local_latest() is None
    storage.upload(os.path.join(second_run, ids), storage.join(root, "runs", RUN2, ids))
    copy = cache.fetch(RUN2)
    # Only the missing file and the run manifest (which has no checksum of its own) again.
    assert copy.downloaded_files == 2 and copy.reused_files >= 3
    assert cache.local_latest() == RUN2 and not os.listdir(os.path.join(cache.local_root, ".staging"))


@pytest.mark.slow  # every object costs Beam a new S3 client: 15-30 s a test here
def test_only_a_published_run_is_served(second_run, bucket, s3_server, tmp_path):
    root = storage.join(bucket, "out")
    # A run LATEST names whose publish was interrupted after LATEST was written ("publishing"):
    # published, as on a local root (retrieval.run_status.effective_status).
    publishing = rf.write_run(
        tmp_path / "p",
        {"a": rf.vector_embedder("a", 100, 32)},
        run_id=RUN3,
        status="publishing",
        publish=False,
    )
    upload_run(publishing, root)
    searcher = open_s3(root, s3_server, tmp_path / "cache", refresh_retry_seconds=0)
    assert searcher.run_id == RUN3 and searcher.info()["status"] == "published"
    # LATEST pointed at a failed run: refused before its index is downloaded.
    failed = rf.write_run(
        tmp_path / "f", {"a": rf.vector_embedder("a", 100, 32)}, run_id=RUN2, status="failed", publish=False
    )
    upload_run(failed, root)
    with pytest.raises(IndexFormatError, match=rf"run {RUN2} .* has status 'failed', not 'published'"):
        searcher.refresh()
    assert searcher.run_id == RUN3
    mirror = run_cache.mirror_dir(str(tmp_path / "cache"), root)
    assert not os.path.exists(os.path.join(mirror, ".staging", RUN2, "index"))
    with pytest.raises(IndexFormatError, match="has status 'failed'"):
        open_s3(root, s3_server, tmp_path / "cache2")
    assert open_s3(root, s3_server, tmp_path / "cache3", allow_unpublished=True).run_id == RUN2


def test_store_errors_are_one_clear_line(bucket, s3_server, tmp_path):
    flags = s3_server.beam_flags()
    cache = str(tmp_path / "cache")
    with pytest.raises(
        StorageError,
        match=r"^s3://no-such-bucket-s3s: cannot use the bucket: the bucket no-such-bucket-s3s does not exist",
    ) as exc:
        Searcher.open("s3://no-such-bucket-s3s/out", storage_flags=flags, cache_dir=cache)
    assert "\n" not in str(exc.value) and "--s3_endpoint_url" in str(exc.value)
    with pytest.raises(IndexFormatError, match=r"s3://serving-test/empty has no LATEST: no run is published"):
        Searcher.open("s3://serving-test/empty", storage_flags=flags, cache_dir=cache)
    unreachable = [f for f in flags if not f.startswith("--s3_endpoint_url")] + [
        "--s3_endpoint_url=http://127.0.0.1:9"
    ]
    try:
        # Beam retries an unreachable endpoint for ~10 minutes; the read of LATEST has a deadline.
        with pytest.raises(
            StorageError, match=r"^s3://serving-test: cannot use the bucket: Could not connect"
        ) as exc:
            Searcher.open(
                "s3://serving-test/out", storage_flags=unreachable, cache_dir=cache, store_timeout_seconds=2
            )
        assert "\n" not in str(exc.value) and "--s3_endpoint_url" in str(exc.value)
    finally:
        storage.configure(storage.options_from_flags(flags))
    with pytest.raises(ImgIndexError, match="not an object-store root"):
        Searcher.open("s3://", storage_flags=flags, cache_dir=cache)


@pytest.mark.slow  # every object costs Beam a new S3 client: 15-30 s a test here
def test_a_store_failure_during_refresh_keeps_serving(vec_run, bucket, s3_server, tmp_path):
    _root, run_dir, _data = vec_run
    root = storage.join(bucket, "out")
    run1 = upload_run(run_dir, root)
    searcher = open_s3(root, s3_server, tmp_path / "cache", store_timeout_seconds=2)
    unreachable = [f for f in s3_server.beam_flags() if not f.startswith("--s3_endpoint_url")]
    storage.configure(storage.options_from_flags([*unreachable, "--s3_endpoint_url=http://127.0.0.1:9"]))
    try:
        with pytest.raises(StorageError, match="did not answer within 2 s"):
            searcher.refresh()
    finally:
        storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    assert searcher.run_id == run1 and "StorageError" in searcher.info()["refresh"]["last_error"]
    assert searcher.refresh() is False and searcher.info()["refresh"]["last_error"] is None


@pytest.mark.slow
def test_a_sharded_run_is_copied_shard_by_shard(sharded_build, bucket, s3_server, tmp_path):
    root = storage.join(bucket, "sharded")
    run_dir = runs.read_latest(str(sharded_build.root))
    upload_run(run_dir, root)
    searcher = open_s3(root, s3_server, tmp_path / "cache")
    local = Searcher.open(sharded_build.root)
    same_answers(searcher, local, 8, "tiny")
    copied = files_under(searcher.info()["run_dir"])
    assert any("shard-00001-of-00002" in rel for rel in copied)
    assert not any(rel.startswith("embeddings") for rel in copied)
