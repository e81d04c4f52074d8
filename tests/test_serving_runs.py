"""Opening and refreshing runs: damaged, replaced, unpublished or missing runs are refused,
refresh swaps runs under concurrent queries and retries a failed run after a backoff."""

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval import run_status, runs
from retrieval.errors import ConfigError, IndexFormatError
from serving import Searcher
from tests.helpers import runs_fixture as rf


def _copy_run(vec_run, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(vec_run[0], root)
    return root, Path(runs.read_latest(str(root)))


def test_corrupted_index_file_is_refused_at_open(vec_run, tmp_path):
    root, run_dir = _copy_run(vec_run, tmp_path)
    path = run_dir / "index" / "a" / "scann" / "dataset.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=r"scann/dataset.npy is corrupted"):
        Searcher.open(root)
    # Opening only the intact embedder still works.
    assert Searcher.open(root, embedder="b").embedders == ["b"]


def test_replaced_index_and_unpublished_runs_are_refused(vec_run, tmp_path):
    root, run_dir = _copy_run(vec_run, tmp_path)
    manifest_path = run_dir / "index" / "b" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["build_seconds"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="index_manifest_sha256"):
        Searcher.open(root)
    run = runs.read_run_manifest(str(run_dir))
    run.status = "rejected"
    runs.write_run_manifest(str(run_dir), run)
    with pytest.raises(IndexFormatError, match="status 'rejected'"):
        Searcher.open(run_dir, embedder="a")
    assert Searcher.open(run_dir, embedder="a", allow_unpublished=True).embedders == ["a"]
    with pytest.raises(IndexFormatError, match="no run_manifest.json|run_manifest.json|LATEST"):
        Searcher.open(tmp_path / "empty-root")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: [e], "embedder 'a' entry is not an object"),
        (
            lambda e: {k: v for k, v in e.items() if k != "index_manifest_sha256"},
            "has no index_manifest_sha256",
        ),
        (lambda e: {**e, "index_manifest_sha256": ""}, "has no index_manifest_sha256"),
        (lambda e: {**e, "n": "2000"}, "embedder 'a': n has the wrong type"),
        (
            lambda e: {**e, "index": "../elsewhere"},
            "embedders.a.index is '../elsewhere', not a path relative",
        ),
    ],
)
def test_damaged_embedder_entry_is_refused_saying_what_is_wrong(vec_run, tmp_path, edit, message):
    root, run_dir = _copy_run(vec_run, tmp_path)
    path = run_dir / runs.RUN_MANIFEST
    data = json.loads(path.read_text())
    data["embedders"]["a"] = edit(data["embedders"]["a"])
    path.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match=message):
        Searcher.open(root, embedder="a")


def test_run_manifest_entries_keep_their_json(vec_run, tmp_path):
    """Reading a run manifest and writing it back gives the same bytes; optional entry fields
    are written when the build gave them, None included (a plain build's "pca_dim": null)."""
    path = Path(vec_run[1]) / runs.RUN_MANIFEST
    manifest = runs.read_run_manifest(vec_run[1])
    runs.write_run_manifest(str(tmp_path), manifest)
    assert (tmp_path / runs.RUN_MANIFEST).read_bytes() == path.read_bytes()
    entry = manifest.embedders["a"]
    assert set(entry.to_dict()) == set(json.loads(path.read_text())["embedders"]["a"])
    assert "pca_dim" not in entry.to_dict() and "shards" not in entry.to_dict()
    plain = dataclasses.replace(entry, explicit=frozenset({"pca_dim"}))
    assert plain.to_dict()["pca_dim"] is None
    sharded = dataclasses.replace(entry, shards=2)
    for made in (plain, sharded):
        again = runs.EmbedderEntry.from_dict(json.loads(json.dumps(made.to_dict())), "a")
        assert again == made and again.to_dict() == made.to_dict()


def test_refresh_while_four_threads_query(tmp_path):
    root = tmp_path / "root"
    run1 = "20260101T000000Z-111111"
    run2 = "20260102T000000Z-222222"
    rf.write_run(root, {"v": rf.vector_embedder("v", 600, 16, seed=1)}, run_id=run1)
    searcher = Searcher.open(root)
    # Run 2 is complete on disk before it is published, as `imgindex build` does.
    rf.write_run(root, {"v": rf.vector_embedder("v", 800, 16, seed=2)}, run_id=run2, publish=False)
    assert searcher.refresh() is False  # LATEST still names run 1

    stop = threading.Event()
    errors, seen, counts = [], [], [0] * 4

    def worker(t):
        rng = np.random.default_rng(t)
        while not stop.is_set():
            try:
                started = time.monotonic()
                if rng.random() < 0.5:
                    result = searcher.search_vector(rng.standard_normal(16), k=5)
                else:
                    result = searcher.search_id(f"v-{rng.integers(600):05d}", k=5)
                assert len(result) == 5
                seen.append((started, result.run_id))
                counts[t] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        run_status.publish(str(root), run2)
        assert searcher.refresh() is True
        swapped_at = time.monotonic()
        assert searcher.info()["run_id"] == run2
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[:3]
    assert min(counts) > 10
    assert {run_id for _, run_id in seen} == {run1, run2}
    # Queries started after the swap all ran on the new run.
    assert {run_id for started, run_id in seen if started > swapped_at} == {run2}
    assert searcher.refresh() is False

    # Rolling LATEST back is followed too, here in a background thread.
    run_status.publish(str(root), run1)
    assert searcher.refresh(background=True).result(timeout=30) is True
    assert searcher.run_id == run1

    # A broken new run leaves the old one served, and is reported.
    run_status.publish(str(root), run2)
    index_file = Path(runs.run_dir(str(root), run2)) / "index" / "v" / "ids.parquet"
    index_file.write_bytes(index_file.read_bytes()[:-3] + b"xyz")
    with pytest.raises(IndexFormatError, match="ids.parquet is corrupted"):
        searcher.refresh()
    assert searcher.run_id == run1
    info = searcher.info()["refresh"]
    assert "ids.parquet is corrupted" in info["last_error"] and info["failed_run"].endswith(run2)
    assert searcher.refresh() is False  # not retried before refresh_retry_seconds (60 s)
    assert len(searcher.search_id("v-00001", k=3)) == 3


class _Clock:
    """A monotonic clock for Searcher.open(clock=...) that moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _point_latest(root, run_id):
    """Writes LATEST as a mirror sync would: whether or not the run exists yet."""
    (Path(root) / runs.LATEST).write_text(f"{runs.RUNS_DIR}/{run_id}\n")


def test_refresh_retries_a_failed_run_after_a_backoff_and_keeps_reporting_it(tmp_path):
    clock = _Clock()
    root = tmp_path / "root"
    run1, run2, run3 = "20260101T000000Z-rtry01", "20260102T000000Z-rtry02", "20260103T000000Z-rtry03"
    rf.write_run(root, {"v": rf.vector_embedder("v", 300, 8, seed=1)}, run_id=run1)
    searcher = Searcher.open(root, refresh_retry_seconds=10, clock=clock)

    # A sync copies LATEST before the run: the refresh fails and says so.
    _point_latest(root, run2)
    with pytest.raises(IndexFormatError, match=f"names run {run2} .*does not exist"):
        searcher.refresh()
    rf.write_run(root, {"v": rf.vector_embedder("v", 350, 8, seed=2)}, run_id=run2, publish=False)
    clock.now += 9
    assert searcher.refresh() is False  # within the backoff: not retried, still reported
    status = searcher.info()["refresh"]
    assert status["failed_run"].endswith(run2) and "does not exist" in status["last_error"]
    assert status["retry_at"]
    clock.now += 1.5
    assert searcher.refresh() is True and searcher.run_id == run2  # retried after the backoff
    assert searcher.info()["refresh"] | {"last_checked_at": None} == {
        "follows_latest": True,
        "last_checked_at": None,
        "last_error": None,
        "failed_run": None,
        "retry_at": None,
    }

    # Each further failure of the same run doubles the wait; force retries at once.
    _point_latest(root, run3)
    for wait in (10, 20, 40):
        with pytest.raises(IndexFormatError, match="does not exist"):
            searcher.refresh()
        clock.now += wait - 0.5
        assert searcher.refresh() is False
        clock.now += 1
    with pytest.raises(IndexFormatError, match="does not exist"):
        searcher.refresh()  # the 4th failure: the next attempt in 80 s ...
    assert searcher.refresh() is False
    with pytest.raises(IndexFormatError, match="does not exist"):
        searcher.refresh(force=True)  # ... unless forced

    # LATEST moved to the served run: nothing is wrong any more.  Moved back: retried at once.
    _point_latest(root, run2)
    assert searcher.refresh() is False
    assert searcher.info()["refresh"]["last_error"] is None
    assert searcher.info()["refresh"]["failed_run"] is None
    _point_latest(root, run3)
    with pytest.raises(IndexFormatError, match="does not exist"):
        searcher.refresh()
    rf.write_run(root, {"v": rf.vector_embedder("v", 400, 8, seed=3)}, run_id=run3, publish=False)
    assert searcher.refresh() is False  # backing off again (the first failure: 10 s)
    _point_latest(root, run1)  # LATEST moves to another run, then back: both tried at once
    assert searcher.refresh() is True and searcher.run_id == run1
    _point_latest(root, run3)
    assert searcher.refresh() is True and searcher.run_id == run3

    # A broken run while another (older) one is served stays reported while it backs off.
    _point_latest(root, run2)
    index_file = Path(runs.run_dir(str(root), run2)) / "index" / "v" / "ids.parquet"
    index_file.write_bytes(index_file.read_bytes()[:-3] + b"xyz")
    with pytest.raises(IndexFormatError, match="ids.parquet is corrupted"):
        searcher.refresh()
    assert searcher.refresh() is False
    assert "ids.parquet is corrupted" in searcher.info()["refresh"]["last_error"]
    assert searcher.run_id == run3 and len(searcher.search_id("v-00399", k=2)) == 2
    with pytest.raises(ConfigError, match="refresh_retry_seconds"):
        Searcher.open(root, refresh_retry_seconds=-1)


def test_open_refuses_latest_naming_a_missing_run(tmp_path):
    rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 50, 8)}, run_id="20260101T000000Z-here00")
    _point_latest(tmp_path, "20260102T000000Z-gone00")
    with pytest.raises(
        IndexFormatError,
        match=r"LATEST names run 20260102T000000Z-gone00 .*does not "
        r"exist.*point LATEST at an existing run",
    ):
        Searcher.open(tmp_path)
