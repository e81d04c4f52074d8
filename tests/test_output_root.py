"""retrieval.output_root (listing runs, retention) and `imgindex runs`, on real run directories."""

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

from imgindex import cli
from retrieval import output_root, runs
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.manifest import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
T0 = datetime.datetime(2026, 11, 22, 12, tzinfo=datetime.timezone.utc)
HOUR = datetime.timedelta(hours=1)


def entry(name, n):
    """A run manifest's record of an embedder's index of n rows (no index is written)."""
    return runs.EmbedderEntry(
        spec=None,
        table=f"{runs.EMBEDDINGS_DIR}/{name}",
        index=f"{runs.INDEX_DIR}/{name}",
        index_manifest_sha256="0" * 64,
        n=n,
        d=8,
        distance="cosine",
        method="brute_force",
        search_defaults={"k": 10},
        recall={},
        build_seconds=0.0,
    )


def make_run(root, hours, status="published", publish=False, error=None, embedders=None) -> str:
    """A run directory whose manifest was written at T0 + hours (no index: retention needs none)."""
    when = T0 + hours * HOUR
    run_id = runs.new_run_id(when)
    directory = runs.run_dir(str(root), run_id)
    os.makedirs(f"{directory}/{runs.EMBEDDINGS_DIR}/clip")
    Path(f"{directory}/{runs.EMBEDDINGS_DIR}/clip/part-0.parquet").write_bytes(b"x" * 100)
    manifest = runs.RunManifest(
        run_id=run_id,
        status=status,
        inputs={"globs": ["test"]},
        counts={"records": 100, "failed_total": 2},
        embedders=embedders
        if embedders is not None
        else {"clip": entry("clip", 98), "dino": entry("dino", 97)},
        gates={"passed": status == "published", "reasons": []},
        timings={},
        created_at=when.isoformat(timespec="seconds"),
        error=error,
    )
    runs.write_run_manifest(directory, manifest)
    if publish:
        runs.publish(str(root), run_id)
    return run_id


def set_mtime(path, when) -> None:
    """Sets the mtime of `path` and everything under it."""
    stamp = when.timestamp()
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(parent, name), (stamp, stamp))
    os.utime(path, (stamp, stamp))


def make_incomplete(root, hours) -> str:
    """A run killed (or still running) before its manifest: files, no run_manifest.json."""
    run_id = runs.new_run_id(T0 + hours * HOUR)
    directory = runs.run_dir(str(root), run_id)
    os.makedirs(f"{directory}/embeddings/clip")
    Path(f"{directory}/embeddings/clip/part-0.parquet").write_bytes(b"partial")
    set_mtime(directory, T0 + hours * HOUR)
    return run_id


def make_damaged(root, hours, text="{not json") -> str:
    run_id = runs.new_run_id(T0 + hours * HOUR)
    directory = runs.run_dir(str(root), run_id)
    os.makedirs(directory)
    Path(directory, runs.RUN_MANIFEST).write_text(text)
    set_mtime(directory, T0 + hours * HOUR)
    return run_id


def count_files(directory) -> int:
    return sum(len(names) for _, _, names in os.walk(directory))


def run_ids(root) -> list[str]:
    return [r.run_id for r in output_root.list_runs(root)]


def trash_dirs(root) -> list[Path]:
    return sorted((Path(root) / runs.RUNS_DIR).glob(".trash-*"))


# --- list_runs ---------------------------------------------------------------------------


def test_list_runs_reports_every_status_oldest_first(tmp_path):
    first = make_run(tmp_path, 0)
    failed = make_run(tmp_path, 1, "failed", error="ValueError: out of disk")
    rejected = make_run(tmp_path, 2, "rejected", error="recall 0.80 < 0.90")
    latest = make_run(tmp_path, 3, publish=True)
    killed = make_incomplete(tmp_path, 4)
    bad_json = make_damaged(tmp_path, 5)
    wrong_kind = make_damaged(tmp_path, 6, json.dumps({"kind": "something else"}))
    data = runs.read_run_manifest(runs.run_dir(str(tmp_path), first)).to_dict()
    unknown_status = make_damaged(tmp_path, 7, json.dumps({**data, "status": "publishing"}))
    (tmp_path / "runs" / ".trash-x-1234").mkdir()  # a deletion in progress: not a run
    (tmp_path / "runs" / "notes.txt").write_text("not a run")

    listed = output_root.list_runs(str(tmp_path))

    assert [r.run_id for r in listed] == [
        first,
        failed,
        rejected,
        latest,
        killed,
        bad_json,
        wrong_kind,
        unknown_status,
    ]
    by_id = {r.run_id: r for r in listed}
    assert [r.status for r in listed] == [
        "published",
        "failed",
        "rejected",
        "published",
        "incomplete",
        "damaged",
        "damaged",
        "damaged",
    ]
    assert [r.run_id for r in listed if r.is_latest] == [latest]
    assert by_id[first].created_at == T0 and by_id[first].created_from == "manifest"
    assert (by_id[first].records, by_id[first].failed_total) == (100, 2)
    assert by_id[first].embedders == (
        output_root.EmbedderRows("clip", 98),
        output_root.EmbedderRows("dino", 97),
    )
    assert by_id[first].path == runs.run_dir(str(tmp_path), first)
    assert by_id[failed].error == "ValueError: out of disk" and by_id[failed].reason is None
    assert by_id[killed].created_at == T0 + 4 * HOUR and by_id[killed].created_from == "mtime"
    assert "cannot tell which" in by_id[killed].reason and by_id[killed].records is None
    assert "unreadable" in by_id[bad_json].reason
    assert "not an imgindex run manifest" in by_id[wrong_kind].reason
    assert "publishing" in by_id[unknown_status].reason
    assert by_id[bad_json].created_at == T0 + 5 * HOUR


def test_list_runs_reads_each_embedders_rows_from_the_manifest(tmp_path):
    run_id = make_run(tmp_path, 0, embedders={"clip": entry("clip", 3)})
    (run,) = output_root.list_runs(tmp_path)
    assert run.run_id == run_id and run.embedders == (output_root.EmbedderRows("clip", 3),)


def test_list_runs_of_a_root_without_runs_and_of_a_file(tmp_path):
    assert output_root.list_runs(tmp_path) == []
    (tmp_path / "runs").mkdir()
    assert output_root.list_runs(tmp_path) == []
    with pytest.raises(ConfigError, match="not a directory"):
        output_root.list_runs(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        output_root.list_runs(tmp_path / "file")


def test_list_runs_survives_an_unreadable_latest(tmp_path):
    run_id = make_run(tmp_path, 0, publish=True)
    (tmp_path / runs.LATEST).write_text("/etc/passwd\n")
    (run,) = output_root.list_runs(tmp_path)
    assert run.run_id == run_id and not run.is_latest
    with pytest.raises(IndexFormatError):
        output_root.latest_run_id(tmp_path)


# --- apply_retention: published runs ------------------------------------------------------


@pytest.mark.parametrize("keep_runs", [0, 2, 3, 10])
def test_latest_and_the_run_before_it_are_never_deleted(tmp_path, keep_runs):
    published = [make_run(tmp_path, h) for h in range(5)]
    runs.publish(str(tmp_path), published[-1])
    report = output_root.apply_retention(
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
    runs.publish(str(tmp_path), published[-1])
    report = output_root.apply_retention(tmp_path, keep_runs=3, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[3:]
    assert [(e.run_id, e.status) for e in report.deleted] == [(r, "published") for r in published[:3]]
    assert all("newest 3 published" in e.reason for e in report.deleted)
    assert [e.run_id for e in report.kept] == published[3:]
    assert "one of the newest 3" in report.kept[0].reason
    assert not trash_dirs(tmp_path) and not report.errors
    again = output_root.apply_retention(tmp_path, keep_runs=3, keep_failed_hours=24, now=T0)
    assert again.deleted == [] and run_ids(tmp_path) == published[3:]


def test_the_run_before_latest_is_the_newest_published_one_older_than_latest(tmp_path):
    oldest = make_run(tmp_path, 0)
    before = make_run(tmp_path, 1)
    make_run(tmp_path, 2, "failed")
    make_run(tmp_path, 3, "rejected")
    latest = make_run(tmp_path, 4, publish=True)
    output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 5 * HOUR)
    left = run_ids(tmp_path)
    assert oldest not in left and before in left and latest in left and len(left) == 4


def test_published_runs_newer_than_latest_are_kept_and_count_towards_keep_runs(tmp_path):
    published = [make_run(tmp_path, h) for h in range(6)]
    # An operator pointed LATEST back, or a concurrent build is about to publish the newest.
    runs.publish(str(tmp_path), published[2])
    report = output_root.apply_retention(tmp_path, keep_runs=3, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[1:]
    assert all("newer than LATEST" in e.reason for e in report.kept if e.run_id in published[3:])
    output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0)
    assert run_ids(tmp_path) == published[1:]
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), published[2])


def test_without_latest_the_newest_n_published_runs_are_kept(tmp_path):
    published = [make_run(tmp_path, h) for h in range(4)]
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0)
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
        report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0 + 1000 * HOUR)
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
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 23 * HOUR)
    assert report.deleted == [] and len(run_ids(tmp_path)) == 5
    kept = {e.run_id: e.reason for e in report.kept}
    assert "younger than the grace period (24h)" in kept[others["failed"]]
    assert "maybe a build in progress" in kept[others["incomplete"]]

    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 25 * HOUR)
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
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 40 * HOUR)
    assert run_id in run_ids(tmp_path)
    assert "files modified within the grace period" in {e.run_id: e.reason for e in report.kept}[run_id]
    output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 55 * HOUR)
    assert run_id not in run_ids(tmp_path)


def test_trash_leftovers_are_removed_at_once(tmp_path):
    latest = make_run(tmp_path, 0, publish=True)
    trash = tmp_path / "runs" / ".trash-20261121T000000Z-abcdef-0123abcd"
    (trash / "index" / "clip").mkdir(parents=True)
    (trash / "index" / "clip" / "manifest.json").write_text("{}")
    (tmp_path / "runs" / ".trash-stray-file").write_text("")
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=1000, now=T0)
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
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0 + 25 * HOUR)
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
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24, now=T0)
    assert not trash_dirs(tmp_path) and report.deleted[0].run_id == old
    assert run_ids(tmp_path) == [previous, latest]
    assert runs.read_run_manifest(runs.run_dir(str(tmp_path), previous)).status == "published"


def test_an_unreadable_latest_stops_retention_before_it_deletes_anything(tmp_path):
    published = [make_run(tmp_path, h) for h in range(4)]
    (tmp_path / runs.LATEST).write_text("../elsewhere\n")
    (tmp_path / "runs" / ".trash-x-1").mkdir()
    with pytest.raises(IndexFormatError):
        output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0 + 1000 * HOUR)
    assert run_ids(tmp_path) == published and trash_dirs(tmp_path)


def test_a_latest_that_changes_during_retention_stops_the_deletions(tmp_path, monkeypatch):
    published = [make_run(tmp_path, h) for h in range(4)]
    runs.publish(str(tmp_path), published[-1])
    monkeypatch.setattr(output_root, "_latest_now", lambda root: "runs/something-newer")
    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=0, now=T0)
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
        output_root.apply_retention(tmp_path, keep_runs=keep_runs, keep_failed_hours=keep_failed_hours)
    with pytest.raises(ConfigError, match="not a directory"):
        output_root.apply_retention(tmp_path / "missing", keep_runs=2, keep_failed_hours=24)


def test_every_deletion_is_logged_and_the_report_is_json(tmp_path, caplog):
    old = make_run(tmp_path, 0)
    failed = make_run(tmp_path, 1, "failed")
    make_run(tmp_path, 2)
    make_run(tmp_path, 3, publish=True)
    with caplog.at_level(logging.INFO, logger="retrieval.output_root"):
        report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=1, now=T0 + 10 * HOUR)
    messages = [r.getMessage() for r in caplog.records if r.name == "retrieval.output_root"]
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
        "from retrieval import output_root\n"
        "output_root.apply_retention(sys.argv[1], keep_runs=2, keep_failed_hours=24)\n"
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

    report = output_root.apply_retention(tmp_path, keep_runs=2, keep_failed_hours=24)
    assert not trash_dirs(tmp_path) and not report.errors
    assert [(e.run_id, e.status) for e in report.deleted] == [(big, "trash")]
    assert run_ids(tmp_path) == [previous, latest]
    assert runs.resolve_run(str(tmp_path)) == runs.run_dir(str(tmp_path), latest)
    for run_id in (previous, latest):
        assert runs.read_run_manifest(runs.run_dir(str(tmp_path), run_id)).status == "published"


# --- imgindex runs -------------------------------------------------------------------------


@pytest.fixture
def mixed_root(tmp_path):
    ids = {
        "old": make_run(tmp_path, 0),
        "failed": make_run(tmp_path, 1, "failed", error="boom"),
        "latest": make_run(tmp_path, 2, publish=True),
        "incomplete": make_incomplete(tmp_path, 3),
        "damaged": make_damaged(tmp_path, 4),
    }
    return tmp_path, ids


def test_runs_command_prints_one_line_per_run_oldest_first(mixed_root, capsys):
    root, ids = mixed_root
    assert cli.main(["runs", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "run id" in lines[0] and "status" in lines[0] and "embedders" in lines[0]
    rows = lines[1:]
    assert [row[2:].split()[0] for row in rows] == list(ids.values())
    latest_row = rows[2]
    assert latest_row.startswith("* ") and not any(r.startswith("*") for r in rows if r != latest_row)
    assert latest_row[2:].split()[1:7] == ["2026-11-22", "14:00:00", "published", "100", "2", "clip=98"]
    assert "dino=97" in latest_row
    assert "failed" in rows[1] and "(boom)" in rows[1]
    assert "incomplete" in rows[3] and "damaged" in rows[4]


def test_runs_command_json(mixed_root, capsys):
    root, ids = mixed_root
    assert cli.main(["runs", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["run_id"] for d in data] == list(ids.values())
    assert [d["status"] for d in data] == ["published", "failed", "published", "incomplete", "damaged"]
    latest = data[2]
    assert latest["is_latest"] and sum(d["is_latest"] for d in data) == 1
    assert latest["created_at"] == "2026-11-22T14:00:00+00:00"
    assert (latest["records"], latest["failed_total"]) == (100, 2)
    assert latest["embedders"] == {"clip": 98, "dino": 97}
    assert data[1]["error"] == "boom" and data[3]["reason"] and data[4]["reason"]


def test_runs_command_on_a_root_without_runs(tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no runs under {tmp_path}\n"
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_runs_command_says_when_latest_names_no_listed_run(tmp_path, capsys):
    make_run(tmp_path, 0)
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert "LATEST names no run" in capsys.readouterr().out
    (tmp_path / runs.LATEST).write_text("runs/20200101T000000Z-gone00\n")
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert "runs/20200101T000000Z-gone00, which is missing" in capsys.readouterr().out


def test_runs_command_on_a_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    assert cli.main(["runs", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgindex runs: error:") and "not a directory" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["runs", "--help"], ["runs", "ROOT"], ["runs", "ROOT", "--json"]])
def test_runs_command_does_not_import_tensorflow_or_beam(mixed_root, argv):
    root, _ = mixed_root
    argv = [str(root) if a == "ROOT" else a for a in argv]
    heavy = ("tensorflow", "tensorflow_hub", "scann", "apache_beam")
    code = (
        "import sys\n"
        "from imgindex.cli import main\n"
        "try:\n"
        f"    assert main({argv!r}) == 0\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"heavy = [m for m in {heavy!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr
