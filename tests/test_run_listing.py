"""retrieval.output_root (listing the runs under an output root) and `imgindex runs`, on real
run directories."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgindex import cli
from retrieval import output_root, run_status, runs
from retrieval.errors import ConfigError, IndexFormatError
from tests.helpers.run_dirs import HOUR, T0, entry, make_damaged, make_incomplete, make_run

REPO = Path(__file__).resolve().parents[1]


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
    unknown_status = make_damaged(tmp_path, 7, json.dumps({**data, "status": "archived"}))
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
    assert "unknown status 'archived'" in by_id[unknown_status].reason
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


# --- a publish interrupted between its two manifest writes ----------------------------------


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _publishing(root, hours, **publisher):
    """A run whose manifest says "publishing", by `publisher` (default: a process that is gone)."""
    run_id = make_run(root, hours, "publishing")
    directory = runs.run_dir(str(root), run_id)
    manifest = runs.read_run_manifest(directory)
    record = {**run_status.publisher_record(), "pid": _dead_pid(), **publisher}
    manifest.publisher = record
    runs.write_run_manifest(directory, manifest)
    return run_id


def test_a_publishing_run_is_what_latest_and_its_publisher_say(tmp_path):
    named = _publishing(tmp_path, 0)
    run_status.publish(str(tmp_path), named)  # repairs nothing yet: it is the run being published
    # What a kill after LATEST was written leaves: LATEST names it, its manifest says publishing.
    directory = runs.run_dir(str(tmp_path), named)
    manifest = runs.read_run_manifest(directory)
    manifest.status = "publishing"
    runs.write_run_manifest(directory, manifest)
    killed = _publishing(tmp_path, 1)
    running = _publishing(tmp_path, 2, pid=os.getpid())
    stale = _publishing(tmp_path, 3, pid=os.getpid(), since="2020-01-01T00:00:00+00:00")
    elsewhere = _publishing(tmp_path, 4, host="another-machine")

    by_id = {r.run_id: r for r in output_root.list_runs(tmp_path)}

    assert by_id[named].status == "published" and by_id[named].is_latest
    assert "interrupted after LATEST was written" in by_id[named].reason
    assert by_id[killed].status == "failed" and "killed while publishing" in by_id[killed].reason
    assert by_id[running].status == "publishing" and "in progress" in by_id[running].reason
    assert by_id[stale].status == "failed"  # older than the publish timeout: killed, wherever
    assert by_id[elsewhere].status == "publishing"  # another machine's: only the timeout tells
    assert {r.recorded_status for r in by_id.values()} == {"publishing"}
    later = output_root.as_utc(datetime.datetime.now()) + datetime.timedelta(hours=1)
    assert {r.status for r in output_root.list_runs(tmp_path, now=later)} == {"published", "failed"}


def test_runs_command_shows_a_killed_publish_as_failed(tmp_path, capsys):
    make_run(tmp_path, 0, publish=True)
    killed = _publishing(tmp_path, 1)
    assert cli.main(["runs", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if killed in line)
    assert row.split()[3] == "failed" and "killed while publishing" in row
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    data = {d["run_id"]: d for d in json.loads(capsys.readouterr().out)}
    assert (data[killed]["status"], data[killed]["recorded_status"]) == ("failed", "publishing")


def test_publish_records_the_true_status_of_the_run_it_replaces(tmp_path):
    first = _publishing(tmp_path, 0)
    run_status.publish(str(tmp_path), first)
    assert runs.read_run_manifest(runs.run_dir(str(tmp_path), first)).status == "published"
    # Interrupted after LATEST: the next publish records it as published before moving on.
    directory = runs.run_dir(str(tmp_path), first)
    manifest = runs.read_run_manifest(directory)
    manifest.status = "publishing"
    runs.write_run_manifest(directory, manifest)
    second = _publishing(tmp_path, 1)
    written = run_status.publish(str(tmp_path), second)
    assert written.status == "published" and written.publisher is None
    for run_id in (first, second):
        m = runs.read_run_manifest(runs.run_dir(str(tmp_path), run_id))
        assert m.status == "published" and m.publisher is None
    assert runs.read_latest(str(tmp_path)) == runs.run_dir(str(tmp_path), second)
    for status in ("failed", "rejected"):
        refused = make_run(tmp_path, 2, status)
        with pytest.raises(IndexFormatError, match=f"not publishable .*'{status}'"):
            run_status.publish(str(tmp_path), refused)
    assert runs.read_latest(str(tmp_path)) == runs.run_dir(str(tmp_path), second)
