"""kill -9 of `imgindex build` at each stage, in a real subprocess on tiny inputs.

The build is stopped at a named stage by the test hook `retrieval.killpoints` (the process
writes its pid to a file and sleeps there), then killed with SIGKILL.  After each kill:
LATEST resolves to a complete published run that a Searcher serves, every run's status
(`imgindex runs --json`) is true, a rerun publishes, and the rerun's retention (with
--keep_failed_hours 0) removes the killed run's remains: its directory and scratch, or, for
a run that LATEST named, its stale status and the deletion it was killed in.

`make test` runs the two halves of the publish window (killed before LATEST is written, and
after it but before the manifest says "published"); every stage runs under the `stress`
marker (`make stress`).  A stage costs about 10 s: the killed build imports TensorFlow and
Beam and plans its run before it gets anywhere.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgindex import cli
from pipelines import build
from retrieval import killpoints, retention, runs
from tests.helpers import images
from tests.helpers.run_dirs import make_run

REPO = Path(__file__).resolve().parents[1]
BASE, KILLED, RERUN = "20260101T000000Z-base00", "20260101T000001Z-kill00", "20260101T000002Z-again0"


def _argv(tiny, inputs, root, run_id):
    return [
        f"--input={inputs}",
        f"--output={root}",
        f"--embedder=tiny={tiny},size=32",
        f"--run_id={run_id}",
        "--keep_failed_hours=0",
    ]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_savedmodel):
    """(inputs, root): an output root whose LATEST names a published run of 8 photos, and
    an old failed run that a build's retention deletes.  Read-only: copy it."""
    base = tmp_path_factory.mktemp("kill_build")
    inputs = images.write_folder(base / "in", 8)
    root = base / "root"
    build.run(_argv(tiny_savedmodel, inputs, root, BASE))
    make_run(root, -1000, "failed", error="an old failure")  # for the retention stage
    return inputs, root


def _kill_at(stage, tiny, inputs, root, tmp_path):
    """Runs `imgindex build` in a subprocess until it reaches `stage`, then kills it (-9)."""
    flag = tmp_path / "reached"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        killpoints.ENV: stage,
        killpoints.FILE_ENV: str(flag),
    }
    argv = [sys.executable, "-m", "imgindex.cli", "build", *_argv(tiny, inputs, root, KILLED)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not flag.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"the build ended ({proc.returncode}) before {stage!r}: {proc.stderr.read().decode()}"
                )
            assert time.monotonic() < deadline, f"the build did not reach {stage!r}"
            time.sleep(0.05)
        assert int(flag.read_text()) == proc.pid
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _listing(root, capsys):
    """{run id: run} as `imgindex runs --json` prints them."""
    capsys.readouterr()
    assert cli.main(["runs", str(root), "--json"]) == 0
    return {d["run_id"]: d for d in json.loads(capsys.readouterr().out)}


def _statuses(root, capsys):
    """{run id: (status, recorded status)} as `imgindex runs --json` prints them."""
    return {run_id: (d["status"], d["recorded_status"]) for run_id, d in _listing(root, capsys).items()}


def _check_latest(root, expected_run):
    """LATEST names `expected_run`, complete and published, and a Searcher serves it."""
    from serving import Searcher

    assert runs.resolve_run(str(root)) == runs.run_dir(str(root), expected_run)
    searcher = Searcher.open(str(root))
    assert searcher.run_id == expected_run and searcher.info()["run_id"] == expected_run
    assert searcher.search_id("img003.jpg", k=3)[0].id == "img003.jpg"


def _leftovers(root):
    """Everything a killed build or deletion may leave: trash, temporary LATEST files and the
    scratch inside runs."""
    found = [p.name for p in Path(root).glob(".LATEST.*")]
    found += [p.name for p in Path(root, runs.RUNS_DIR).glob(".*")]
    for run in Path(root, runs.RUNS_DIR).iterdir():
        if not run.name.startswith("."):
            found += [str(p.relative_to(root)) for p in retention.scratch_of(run)]
    return found


# stage -> (status of the killed run after the kill: (effective, recorded), whether LATEST
# names it, what the kill leaves besides the run itself)
STAGES = {
    "reading": (("incomplete", None), False, None),
    "embedding": (("incomplete", None), False, None),
    "index": (("incomplete", None), False, "scratch"),
    "replace run_manifest.json": (("incomplete", None), False, "scratch"),
    "publishing": (("failed", "publishing"), False, None),
    "replace LATEST": (("failed", "publishing"), False, "latest-tmp"),
    "latest-written": (("published", "publishing"), True, None),
    "retention": (("published", "published"), True, "trash"),
}
KEY_STAGES = ("publishing", "latest-written")  # both halves of the publish window


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param(
            stage, marks=pytest.mark.slow if stage in KEY_STAGES else [pytest.mark.slow, pytest.mark.stress]
        )
        for stage in STAGES
    ],
)
def test_kill_9_at_a_stage_leaves_latest_valid_statuses_true_and_a_rerun_cleans_up(
    stage, baseline, tiny_savedmodel, tmp_path, capsys
):
    inputs, base_root = baseline
    root = tmp_path / "root"
    shutil.copytree(base_root, root, symlinks=True)
    old_failed = next(r for r in os.listdir(root / runs.RUNS_DIR) if r not in (BASE,))
    killed_status, named, leaves = STAGES[stage]

    _kill_at(stage, tiny_savedmodel, inputs, root, tmp_path)

    # LATEST valid: the previous run, or the killed one when the kill came after LATEST.
    _check_latest(root, KILLED if named else BASE)
    statuses = _statuses(root, capsys)
    assert statuses[BASE] == ("published", "published")
    assert statuses[KILLED] == killed_status
    left = _leftovers(root)
    if leaves == "scratch":
        assert left and all(p.startswith(f"{runs.RUNS_DIR}/{KILLED}/") for p in left), left
    elif leaves == "latest-tmp":
        assert len(left) == 1 and left[0].startswith(".LATEST."), left
    elif leaves == "trash":
        assert [p for p in left if p.startswith(".trash-")] and old_failed not in statuses
    else:
        assert left == []
    if killed_status[0] == "failed":
        assert "killed while publishing" in _listing(root, capsys)[KILLED]["reason"]

    result = build.run(_argv(tiny_savedmodel, inputs, root, RERUN))

    assert result.manifest.status == "published"
    _check_latest(root, RERUN)
    statuses = _statuses(root, capsys)
    assert statuses[RERUN] == ("published", "published")
    if named:  # the killed run was published: kept as the run before LATEST, recorded so
        assert statuses[KILLED] == ("published", "published")
        assert set(statuses) == {BASE, KILLED, RERUN}
    else:  # a failed or unfinished run: gone (no grace period), with the old failure
        assert set(statuses) == {BASE, RERUN}
    assert _leftovers(root) == []
    deleted = {(e["run_id"], e["status"]) for e in result.manifest.retention["deleted"]}
    assert (old_failed, "failed") in deleted or stage == "retention"
