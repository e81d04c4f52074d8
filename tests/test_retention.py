"""retrieval.retention (deleting the runs an output root no longer needs), on real run
directories."""

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval import retention, run_status, runs
from retrieval.atomic_files import write_text_atomic
from retrieval.errors import ConfigError, IndexFormatError
from tests.helpers.run_dirs import (
    HOUR,
    T0,
    count_files,
    make_damaged,
    make_incomplete,
    make_run,
    run_ids,
    set_mtime,
    trash_dirs,
)

REPO = Path(__file__).resolve().parents[1]


# --- apply_retention: published runs ------------------------------------------------------


@pytest.mark.parametrize("keep_runs", [0, 2, 3, 10])
def test_latest_and_the_run_before_it_are_never_deleted(tmp_path, keep_runs):
    published = [make_run(tmp_path, h) for h in range(5)]
    run_status.publish(str(tmp_path), published[-1])
    report = retention.apply_retention(
        tmp_path, keep_runs=keep_runs, keep_failed_hours=0, now=T0 + 1000 * HOUR
    )
    left = run_ids(tmp_path)
    assert published[-1] in left and published[-2] in left
    expected = published if keep_runs in (0, 10) else published[-keep_runs:]
    assert left == expected
    assert report.latest == published[-1]
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), published[-1])
    reasons = {e.run_id: e.reason for e in report.kept}
    assert reasons[published[-1]] == "named by LATEST"
    assert "before LATEST" in reasons[published[-2]]


def test_keeps_the_newest_n_published_runs_counting_latest(tmp_path):
    published = [make_run(tmp_path, h) for h in range(6)]
    run_status.publish(str(tmp_path), published[-1])
    report = retention.apply_retention(tmp_path, keep_runs=3, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[3:]
    assert [(e.run_id, e.status) for e in report.deleted] == [(r, "published") for r in published[:3]]
    assert all("newest 3 published" in e.reason for e in report.deleted)
    assert [e.run_id for e in report.kept] == published[3:]
    assert "one of the newest 3" in report.kept[0].reason
    assert not trash_dirs(tmp_path) and not report.errors
    again = retention.apply_retention(tmp_path, keep_runs=3, keep_failed_hours=24, now=T0)
    assert again.deleted == [] and run_ids(tmp_path) == published[3:]


def test_the_run_before_latest_is_the_newest_published_one_older_than_latest(tmp_path):
    oldest = make_run(tmp_path, 0)
    before = make_run(tmp_path, 1)
    make_run(tmp_path, 2, "failed")
    make_run(tmp_path, 3, "rejected")
    latest = make_run(tmp_path, 4, publish=True)
    retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 5 * HOUR)
    left = run_ids(tmp_path)
    assert oldest not in left and before in left and latest in left and len(left) == 4


def test_published_runs_newer_than_latest_are_kept_and_count_towards_keep_runs(tmp_path):
    published = [make_run(tmp_path, h) for h in range(6)]
    # An operator pointed LATEST back, or a concurrent build is about to publish the newest.
    run_status.publish(str(tmp_path), published[2])
    report = retention.apply_retention(tmp_path, keep_runs=3, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[1:]
    assert all("newer than LATEST" in e.reason for e in report.kept if e.run_id in published[3:])
    retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[1:]
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), published[2])


def test_without_latest_the_newest_n_published_runs_are_kept(tmp_path):
    published = [make_run(tmp_path, h) for h in range(4)]
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[2:] and report.latest is None


def test_latest_is_kept_even_when_its_manifest_is_not_published(tmp_path):
    make_run(tmp_path, 0, publish=True)
    for status in ("failed", "damaged", "incomplete"):
        run_id = {
            "failed": lambda: make_run(tmp_path, 1, "failed"),
            "damaged": lambda: make_damaged(tmp_path, 1),
            "incomplete": lambda: make_incomplete(tmp_path, 1),
        }[status]()
        write_text_atomic(tmp_path / runs.LATEST, f"runs/{run_id}\n")  # what publish() refuses
        report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0 + 1000 * HOUR)
        assert run_id in run_ids(tmp_path), status
        assert any(e.run_id == run_id and e.reason == "named by LATEST" for e in report.kept)
        assert (tmp_path / runs.LATEST).read_text() == f"runs/{run_id}\n"


# --- apply_retention: failed, rejected, damaged, incomplete runs, scratch -----------------


def test_failed_rejected_damaged_and_incomplete_runs_go_only_after_the_grace_period(tmp_path):
    latest = make_run(tmp_path, -1, publish=True)
    others = {
        "failed": make_run(tmp_path, 0, "failed", error="boom"),
        "rejected": make_run(tmp_path, 0, "rejected"),
        "damaged": make_damaged(tmp_path, 0),
        "incomplete": make_incomplete(tmp_path, 0),
    }
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 23 * HOUR)
    assert report.deleted == [] and len(run_ids(tmp_path)) == 5
    kept = {e.run_id: e.reason for e in report.kept}
    assert "younger than the grace period (24h)" in kept[others["failed"]]
    assert "maybe a build in progress" in kept[others["incomplete"]]

    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 25 * HOUR)
    assert run_ids(tmp_path) == [latest]
    assert sorted((e.status, e.run_id) for e in report.deleted) == sorted((s, r) for s, r in others.items())
    reasons = {e.status: e.reason for e in report.deleted}
    assert reasons["failed"] == "failed for more than 24h"
    assert reasons["incomplete"] == "nothing modified for more than 24h"
    assert not trash_dirs(tmp_path)


def test_an_incomplete_run_with_recently_written_files_is_kept(tmp_path):
    make_run(tmp_path, -1, publish=True)
    run_id = make_incomplete(tmp_path, 0)
    part = Path(runs.run_dir(str(tmp_path), run_id), "embeddings", "clip", "part-0.parquet")
    stamp = (T0 + 30 * HOUR).timestamp()
    os.utime(part, (stamp, stamp))  # the directory is old, but the build is still writing
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 40 * HOUR)
    assert run_id in run_ids(tmp_path)
    assert "files modified within the grace period" in {e.run_id: e.reason for e in report.kept}[run_id]
    retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 55 * HOUR)
    assert run_id not in run_ids(tmp_path)


def test_trash_leftovers_are_removed_at_once(tmp_path):
    latest = make_run(tmp_path, 0, publish=True)
    trash = tmp_path / "runs" / ".trash-20261121T000000Z-abcdef-0123abcd"
    (trash / "index" / "clip").mkdir(parents=True)
    (trash / "index" / "clip" / "manifest.json").write_text("{}")
    (tmp_path / "runs" / ".trash-stray-file").write_text("")
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=1000, now=T0)
    assert not trash_dirs(tmp_path)
    assert ("20261121T000000Z-abcdef", "trash") in [(e.run_id, e.status) for e in report.deleted]
    assert run_ids(tmp_path) == [latest]


def test_temporary_latest_files_go_after_the_grace_period_and_latest_is_untouched(tmp_path):
    latest = make_run(tmp_path, 0, publish=True)
    before = (tmp_path / runs.LATEST).read_bytes()
    old, young = tmp_path / ".LATEST.old123.tmp", tmp_path / ".LATEST.new456.tmp"
    for path, hours in ((old, 0), (young, 23)):
        path.write_text("runs/x\n")
        set_mtime(path, T0 + hours * HOUR)
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 25 * HOUR)
    assert not old.exists() and young.exists()
    assert [(e.run_id, e.status, e.path) for e in report.deleted] == [(None, "scratch", str(old))]
    assert (tmp_path / runs.LATEST).read_bytes() == before
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), latest)


def test_a_deletion_killed_half_way_is_finished_by_the_next_call(tmp_path):
    old = make_run(tmp_path, 0)
    previous = make_run(tmp_path, 1)
    latest = make_run(tmp_path, 2, publish=True)
    # What a kill -9 inside the deletion leaves: the renamed run, partly removed.
    trash = tmp_path / "runs" / f".trash-{old}-deadbeef"
    os.rename(runs.run_dir(str(tmp_path), old), trash)
    for i in range(20):
        (trash / "embeddings" / f"part-{i}").write_text("x")
    for i in range(10):
        (trash / "embeddings" / f"part-{i}").unlink()
    (trash / runs.RUN_MANIFEST).unlink()

    assert run_ids(tmp_path) == [previous, latest]  # gone from the listing, whole
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), latest)
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0)
    assert not trash_dirs(tmp_path) and report.deleted[0].run_id == old
    assert run_ids(tmp_path) == [previous, latest]
    assert runs.read_run_manifest(runs.run_dir(str(tmp_path), previous)).status == "published"


def test_an_unreadable_latest_stops_retention_before_it_deletes_anything(tmp_path):
    published = [make_run(tmp_path, h) for h in range(4)]
    (tmp_path / runs.LATEST).write_text("../elsewhere\n")
    (tmp_path / "runs" / ".trash-x-1").mkdir()
    with pytest.raises(IndexFormatError):
        retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0 + 1000 * HOUR)
    assert run_ids(tmp_path) == published and trash_dirs(tmp_path)


def test_a_latest_that_changes_during_retention_stops_the_deletions(tmp_path, monkeypatch):
    published = [make_run(tmp_path, h) for h in range(4)]
    run_status.publish(str(tmp_path), published[-1])
    monkeypatch.setattr(retention, "_latest_now", lambda root: "runs/something-newer")
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0)
    assert report.deleted == [] and run_ids(tmp_path) == published
    assert "LATEST changed" in report.errors[0]


@pytest.mark.parametrize(
    "keep_runs, keep_failed_hours, message",
    [
        (1, 24, "keep_runs must be 0 .* or an integer >= 2"),
        (-1, 24, "keep_runs"),
        (2.5, 24, "keep_runs"),
        (True, 24, "keep_runs"),
        ("3", 24, "keep_runs"),
        (3, -1, "keep_failed_hours must be a finite number of hours >= 0"),
        (3, float("nan"), "keep_failed_hours"),
        (3, float("inf"), "keep_failed_hours"),
        (3, "24", "keep_failed_hours"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, keep_runs, keep_failed_hours, message):
    make_run(tmp_path, 0, publish=True)
    with pytest.raises(ConfigError, match=message):
        retention.apply_retention(tmp_path, keep_runs=keep_runs, keep_failed_hours=keep_failed_hours)
    with pytest.raises(ConfigError, match="not a directory"):
        retention.apply_retention(tmp_path / "missing", keep_runs=2, keep_failed_hours=24)


def test_every_deletion_is_logged_and_the_report_is_json(tmp_path, caplog):
    old = make_run(tmp_path, 0)
    failed = make_run(tmp_path, 1, "failed")
    make_run(tmp_path, 2)
    make_run(tmp_path, 3, publish=True)
    with caplog.at_level(logging.INFO, logger="retrieval.retention"):
        report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=1, now=T0 + 10 * HOUR)
    messages = [r.getMessage() for r in caplog.records if r.name == "retrieval.retention"]
    assert f"retention: deleted run {old} (published, older than the newest 2 published runs)" in messages
    assert f"retention: deleted run {failed} (failed, failed for more than 1h)" in messages
    data = json.loads(json.dumps(report.to_dict()))
    assert [d["run_id"] for d in data["deleted"]] == [old, failed]
    assert data["keep_runs"] == 2 and data["latest"] == report.latest
    assert report.summary() == "retention: deleted 2 run(s) and 0 leftover(s), kept 2 run(s)"


def test_a_kill_9_during_retention_leaves_latest_valid_and_the_next_call_finishes(tmp_path):
    big = make_run(tmp_path, 0)
    previous = make_run(tmp_path, 1)
    latest = make_run(tmp_path, 2, publish=True)
    for d in range(20):
        part = Path(runs.run_dir(str(tmp_path), big), "embeddings", f"e{d}")
        part.mkdir(parents=True)
        for i in range(100):
            (part / f"part-{i:05d}.parquet").write_bytes(b"x" * 64)
    files = count_files(runs.run_dir(str(tmp_path), big))
    latest_bytes = (tmp_path / runs.LATEST).read_bytes()
    # The kill is real; unlink is slowed (1 ms a file) so that it lands inside the deletion.
    child = (
        "import os, shutil, sys, time\n"
        "unlink = os.unlink\n"
        "def slow_unlink(*args, **kwargs):\n"
        "    time.sleep(0.001)\n"
        "    return unlink(*args, **kwargs)\n"
        "os.unlink = slow_unlink\n"
        "from retrieval import retention\n"
        "retention.apply_retention(sys.argv[1], keep_runs=2, keep_failed_hours=24)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (trash := trash_dirs(tmp_path)) or count_files(trash[0]) >= files:
            assert proc.poll() is None, "the child finished before it was killed"
            assert time.monotonic() < deadline, "the deletion did not start"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert 0 < count_files(trash_dirs(tmp_path)[0]) < files  # killed half-way
    assert (tmp_path / runs.LATEST).read_bytes() == latest_bytes
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), latest)
    assert run_ids(tmp_path) == [previous, latest]

    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24)
    assert not trash_dirs(tmp_path) and not report.errors
    assert [(e.run_id, e.status) for e in report.deleted] == [(big, "trash")]
    assert run_ids(tmp_path) == [previous, latest]
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), latest)
    for run_id in (previous, latest):
        assert runs.read_run_manifest(runs.run_dir(str(tmp_path), run_id)).status == "published"


# --- a publish interrupted between its two manifest writes; scratch of kept runs -----------


def _publishing(root, hours, pid=None, since=None):
    """A run whose manifest says "publishing", its publisher gone (or `pid`, from `since`)."""
    run_id = make_run(root, hours, "publishing")
    directory = runs.run_dir(str(root), run_id)
    manifest = runs.read_run_manifest(directory)
    if pid is None:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        pid = child.pid
    manifest.publisher = {**run_status.publisher_record(), "pid": pid, **({"since": since} if since else {})}
    runs.write_run_manifest(directory, manifest)
    return run_id


def test_a_killed_publish_is_a_failed_run_recorded_so_and_deleted_after_the_grace_period(tmp_path):
    latest = make_run(tmp_path, 0, publish=True)
    killed = _publishing(tmp_path, 1)
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 2 * HOUR)
    assert run_ids(tmp_path) == [latest, killed]
    assert [(e.run_id, e.status) for e in report.repaired] == [(killed, "failed")]
    manifest = runs.read_run_manifest(runs.run_dir(str(tmp_path), killed))
    assert manifest.status == "failed" and "killed while publishing" in manifest.error
    assert manifest.publisher is None and "recorded the status of 1" in report.summary()

    other = _publishing(tmp_path, 2)
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 30 * HOUR)
    assert run_ids(tmp_path) == [latest]
    assert {(e.run_id, e.status) for e in report.deleted} == {(killed, "failed"), (other, "failed")}


def test_a_publish_in_progress_is_kept_even_without_a_grace_period(tmp_path):
    latest = make_run(tmp_path, 0, publish=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    running = _publishing(tmp_path, 1, pid=os.getpid(), since=now.isoformat(timespec="seconds"))
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=now)
    assert run_ids(tmp_path) == [latest, running] and not report.repaired
    assert {e.run_id: e.reason for e in report.kept}[running] == "a publish in progress"
    assert runs.read_run_manifest(runs.run_dir(str(tmp_path), running)).status == "publishing"


def test_a_publish_killed_after_latest_is_protected_and_recorded_as_published(tmp_path):
    previous = make_run(tmp_path, 0, publish=True)
    named = _publishing(tmp_path, 1)
    write_text_atomic(tmp_path / runs.LATEST, f"runs/{named}\n")  # the kill came after this
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0 + 1000 * HOUR)
    assert run_ids(tmp_path) == [previous, named]
    kept = {e.run_id: e.reason for e in report.kept}
    assert kept[named] == "named by LATEST" and "before LATEST" in kept[previous]
    assert [(e.run_id, e.status) for e in report.repaired] == [(named, "published")]
    assert runs.read_run_manifest(runs.run_dir(str(tmp_path), named)).status == "published"


def _scratch(directory, *names):
    for name in names:
        path = Path(directory, name)
        path.mkdir(parents=True)
        (path / "vectors.npy").write_bytes(b"x" * 64)


def test_scratch_of_finished_runs_goes_at_once_and_of_unfinished_ones_after_the_grace_period(tmp_path):
    latest = make_run(tmp_path, 0, publish=True)
    failed = make_run(tmp_path, 1, "failed")
    running = make_incomplete(tmp_path, 2)
    scratch = [
        ".read-clip-x1",
        ".imgindex-build-x2",
        "clip/.partitions",
        "clip/shard-00000-of-00002/.x.tmp-3",
    ]
    for run_id in (latest, failed, running):
        _scratch(Path(runs.run_dir(str(tmp_path), run_id), runs.INDEX_DIR), *scratch)
        Path(runs.run_dir(str(tmp_path), run_id), ".run_manifest.json.abc.tmp").write_text("{")
    intact = Path(runs.run_dir(str(tmp_path), latest), runs.INDEX_DIR, "clip", "manifest.json")
    intact.write_text("{}")
    set_mtime(runs.run_dir(str(tmp_path), running), T0 + 2 * HOUR)

    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 3 * HOUR)
    assert run_ids(tmp_path) == [latest, failed, running]
    for run_id in (latest, failed):
        assert retention.scratch_of(runs.run_dir(str(tmp_path), run_id)) == []
    assert len(retention.scratch_of(runs.run_dir(str(tmp_path), running))) == 5  # maybe being built
    assert intact.exists() and (intact.parent / "shard-00000-of-00002").is_dir()
    gone = [e for e in report.deleted if e.status == "scratch"]
    assert len(gone) == 10 and {e.run_id for e in gone} == {latest, failed}
    assert all("scratch of a published run" == e.reason for e in gone if e.run_id == latest)

    # A kept incomplete run (written to recently) loses only scratch untouched for the grace period.
    old = T0 + 2 * HOUR
    recent = Path(runs.run_dir(str(tmp_path), running), runs.INDEX_DIR, ".read-clip-x1", "vectors.npy")
    stamp = (T0 + 40 * HOUR).timestamp()
    os.utime(recent, (stamp, stamp))
    report = retention.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=old + 30 * HOUR)
    assert run_ids(tmp_path) == [latest, running]  # the failed run is past its grace period
    left = retention.scratch_of(runs.run_dir(str(tmp_path), running))
    assert [p.name for p in left] == [".read-clip-x1"]
