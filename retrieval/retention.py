"""Retention: deleting the runs an output root no longer needs (`apply_retention`, run by
`imgindex build` after each publish).

- Published runs: the run LATEST names, the published run just before it (a serving
  process may still be opening it) and any published run newer than LATEST's (a build
  about to publish it, or LATEST pointed back) are never deleted; of the older published
  runs the newest are kept until `keep_runs` runs (counting those) are kept, the rest are
  deleted.  `keep_runs=0` never deletes a published run.  Without LATEST, the newest
  `keep_runs` published runs are kept.
- Failed, rejected, damaged and incomplete runs are deleted once older than
  `keep_failed_hours`.  An incomplete run (no run_manifest.json: a build still running, or
  one that was killed; nothing on disk tells which) is deleted only when nothing in it was
  modified within the grace period.  A run killed while publishing (its manifest says
  "publishing", LATEST does not name it, its publisher is gone) is a failed run; a publish
  in progress is kept.
- Statuses: a kept run whose manifest says "publishing" gets its true status written
  (`retrieval.run_status.repair_status`): "published" when LATEST names it, "failed" when its
  publish was killed.
- Scratch: `runs/.trash-*` directories (left by an interrupted deletion) are removed at
  once; temporary LATEST files (`<root>/.LATEST.*.tmp`) once older than the grace period.
  Inside a kept run, the scratch a killed build leaves (dot-entries: the index stage's
  `index/.read-*`, ScaNN's `index/.imgindex-build-*`, a sharded build's
  `index/<embedder>/.partitions`, unfinished index directories and temporary manifests)
  is removed at once when the run has finished (published, rejected or failed: nothing
  writes there any more), otherwise once nothing in it was modified within the grace
  period.

The runs are those `retrieval.output_root.list_runs` lists.  A deletion renames
`runs/<run_id>` to `runs/.trash-<run_id>-<random>` (one atomic rename: the run is listed
whole or not at all), then removes that directory.  A kill -9 at any point leaves LATEST and
every kept run intact; the next `apply_retention` removes the leftover.  LATEST itself is
never modified.  A root on an object store follows the same rules, deleting by prefix
(`retrieval.remote_root`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from retrieval import killpoints, output_root, run_status, runs, storage
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.output_root import INCOMPLETE, PUBLISHED, RunInfo

log = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"
TRASH = "trash"  # status of a leftover .trash-* directory in a RetentionReport
SCRATCH = "scratch"  # status of a temporary LATEST file or a run's scratch in a RetentionReport
# Runs whose builder is done: nothing writes their scratch any more.
FINISHED = (PUBLISHED, "rejected", runs.FAILED)


@dataclasses.dataclass(frozen=True)
class RetentionEntry:
    """A directory or file retention deleted, kept or repaired, and why.  run_id is None for
    a temporary LATEST file; status is the run's, or "trash" / "scratch" for leftovers (a
    run's scratch carries its run id)."""

    run_id: str | None
    status: str
    reason: str
    path: str


@dataclasses.dataclass
class RetentionReport:
    """What one `apply_retention` call deleted and kept (`to_dict()` for a run manifest);
    `repaired`: runs whose manifest got its true status (the status written);
    `errors`: deletions that failed or were left half done, for the next call to finish."""

    root: str
    keep_runs: int
    keep_failed_hours: float
    now: str
    latest: str | None  # the run id LATEST named when retention decided
    deleted: list[RetentionEntry] = dataclasses.field(default_factory=list)
    kept: list[RetentionEntry] = dataclasses.field(default_factory=list)
    repaired: list[RetentionEntry] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        runs_deleted = sum(1 for e in self.deleted if e.status not in (TRASH, SCRATCH))
        text = (
            f"retention: deleted {runs_deleted} run(s) and {len(self.deleted) - runs_deleted} "
            f"leftover(s), kept {len(self.kept)} run(s)"
        )
        if self.repaired:
            text += f", recorded the status of {len(self.repaired)} interrupted publish(es)"
        return text + (f", {len(self.errors)} error(s)" if self.errors else "")


def apply_retention(
    root: str | os.PathLike[str],
    *,
    keep_runs: int,
    keep_failed_hours: float,
    now: datetime.datetime | None = None,
) -> RetentionReport:
    """Deletes what the rules in this module's docstring say; see RetentionReport.

    `now` (default: the current time; a naive datetime is taken as UTC) is the time ages
    are measured from.  ConfigError on bad arguments; IndexFormatError, before anything is
    deleted, when LATEST cannot be read.  A deletion that fails is logged and listed in
    `errors`, not raised: the next call retries it.
    """
    check_retention(keep_runs, keep_failed_hours)
    if storage.is_remote(str(root)):  # same rules; deleted by prefix (retrieval.remote_root)
        from retrieval import remote_root

        return remote_root.apply_retention(
            str(root), keep_runs=keep_runs, keep_failed_hours=keep_failed_hours, now=now
        )
    root_path = output_root.check_root(root)
    output_root.latest_run_id(root_path)  # an unreadable LATEST: refuse before deleting anything
    now = output_root.as_utc(now) if now is not None else datetime.datetime.now(datetime.timezone.utc)
    grace = datetime.timedelta(hours=keep_failed_hours)
    report = RetentionReport(str(root), keep_runs, keep_failed_hours, now.isoformat(timespec="seconds"), None)
    _remove_leftovers(root_path, now - grace, report)
    listing = output_root.list_runs(root_path, now)
    raw_latest = runs.read_latest(str(root_path))  # re-read just before deciding
    report.latest = latest = output_root.run_id_of(root_path, raw_latest)
    deletions = _decide(listing, latest, keep_runs, keep_failed_hours, now, report)
    for info, reason in deletions:
        if _latest_now(root_path) != raw_latest:
            report.errors.append("LATEST changed during retention: stopped; the next call continues")
            log.warning("retention: LATEST changed while deleting; stopped (the next call continues)")
            break
        _delete_run(root_path, info, reason, report)
    kept = {e.run_id for e in report.kept}
    for info in listing:
        if info.run_id in kept and _latest_now(root_path) == raw_latest:
            _repair(info, now, report)
            _remove_scratch(info, now - grace, report)
    return report


def check_retention(keep_runs: object, keep_failed_hours: object) -> None:
    """ConfigError unless the retention settings are usable (checked before any work)."""
    if isinstance(keep_runs, bool) or not isinstance(keep_runs, int) or keep_runs < 0 or keep_runs == 1:
        raise ConfigError(
            f"keep_runs must be 0 (never delete published runs) or an integer >= 2 (the run "
            f"LATEST names and the one before it are always kept); got {keep_runs!r}"
        )
    if (
        isinstance(keep_failed_hours, bool)
        or not isinstance(keep_failed_hours, (int, float))
        or not math.isfinite(keep_failed_hours)
        or keep_failed_hours < 0
    ):
        raise ConfigError(
            f"keep_failed_hours must be a finite number of hours >= 0 (0 deletes failed, "
            f"rejected and killed runs at once); got {keep_failed_hours!r}"
        )


def _latest_now(root: Path) -> str | None:
    try:
        return runs.read_latest(str(root))
    except IndexFormatError as exc:
        return f"unreadable: {exc}"


def _decide(
    listing: list[RunInfo],
    latest: str | None,
    keep_runs: int,
    keep_failed_hours: float,
    now: datetime.datetime,
    report: RetentionReport,
) -> list[tuple[RunInfo, str]]:
    """Which runs to delete (oldest first) and why; records the kept ones in `report`."""
    protected: dict[str, str] = {}
    if latest is not None:
        protected[latest] = "named by LATEST"
        before = [r.run_id for r in listing if r.status == PUBLISHED and r.run_id < latest]
        if before:
            protected[before[-1]] = "the published run before LATEST's (a server may still be opening it)"
        for r in listing:
            if r.status == PUBLISHED and r.run_id > latest:
                protected[r.run_id] = "newer than LATEST's run (a build about to publish it, or a rollback)"
    slots = keep_runs - sum(1 for r in listing if r.run_id in protected)
    decided: dict[str, str | None] = {}  # run id -> reason to delete, or None when kept
    for info in reversed(listing):  # newest first
        if info.run_id in protected:
            kept = protected[info.run_id]
        elif info.status != PUBLISHED:
            continue
        elif keep_runs == 0:
            kept = "keep_runs=0: published runs are never deleted"
        elif slots > 0:
            slots -= 1
            kept = f"one of the newest {keep_runs} published runs"
        else:
            decided[info.run_id] = f"older than the newest {keep_runs} published runs"
            continue
        decided[info.run_id] = None
        report.kept.append(RetentionEntry(info.run_id, info.status, kept, info.path))
    grace = datetime.timedelta(hours=keep_failed_hours)
    for info in listing:
        if info.run_id in decided:
            continue
        age = now - info.created_at
        if info.status == runs.PUBLISHING:
            kept = "a publish in progress"
        elif age <= grace:
            kept = f"younger than the grace period ({keep_failed_hours:g}h)"
            if info.status == INCOMPLETE:
                kept += ": maybe a build in progress"
        elif info.status == INCOMPLETE and _active_since(Path(info.path), now - grace):
            kept = (
                f"files modified within the grace period ({keep_failed_hours:g}h): maybe a build in progress"
            )
        else:
            what = "nothing modified" if info.status == INCOMPLETE else info.status
            decided[info.run_id] = f"{what} for more than {keep_failed_hours:g}h"
            continue
        report.kept.append(RetentionEntry(info.run_id, info.status, kept, info.path))
    report.kept.sort(key=lambda e: e.run_id or "")
    return [(r, reason) for r in listing if (reason := decided.get(r.run_id)) is not None]


def _repair(info: RunInfo, now: datetime.datetime, report: RetentionReport) -> None:
    """Writes the true status of a kept run whose manifest says "publishing"."""
    if info.recorded_status != runs.PUBLISHING:
        return
    try:
        written = run_status.repair_status(info.path, now)
    except (IndexFormatError, OSError) as exc:
        report.errors.append(f"could not record the status of run {info.run_id}: {exc}")
        log.warning("retention: could not record the status of run %s: %s", info.run_id, exc)
        return
    if written is not None:
        report.repaired.append(RetentionEntry(info.run_id, written, info.reason or "", info.path))
        log.info("retention: run %s recorded as %s (%s)", info.run_id, written, info.reason)


def scratch_of(run_directory: str | os.PathLike[str]) -> list[Path]:
    """The scratch a build leaves in a run directory when killed: the dot-entries of the run
    directory, of `index/`, of each `index/<embedder>/` and of each sharded index's shard
    directory (no file an intact run needs starts with a dot)."""
    run = Path(run_directory)
    found: list[Path] = []
    levels = [run, run / runs.INDEX_DIR]
    index_dirs = _subdirectories(run / runs.INDEX_DIR)
    levels += index_dirs + [shard for d in index_dirs for shard in _subdirectories(d)]
    for level in levels:
        try:
            with os.scandir(level) as entries:
                found += [Path(e.path) for e in entries if e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return sorted(found)


def _subdirectories(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [
                Path(e.path)
                for e in entries
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_scratch(info: RunInfo, older_than: datetime.datetime, report: RetentionReport) -> None:
    """Removes a kept run's scratch: at once when the run has finished, else what was not
    modified since `older_than`."""
    finished = info.status in FINISHED
    for path in scratch_of(info.path):
        if not finished and (
            output_root.modified_at(path) >= older_than
            or (path.is_dir() and not path.is_symlink() and _active_since(path, older_than))
        ):
            continue
        reason = (
            f"scratch of a {info.status} run" if finished else "scratch not modified within the grace period"
        )
        if _remove_tree(path, report):
            report.deleted.append(RetentionEntry(info.run_id, SCRATCH, reason, str(path)))
            log.info("retention: deleted %s of run %s (%s)", path.name, info.run_id, reason)


def _active_since(path: Path, since: datetime.datetime) -> bool:
    """Whether anything under `path` (not following links) was modified after `since`."""
    threshold = since.timestamp()
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.stat(follow_symlinks=False).st_mtime > threshold:
                        return True
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return False


def _delete_run(root: Path, info: RunInfo, reason: str, report: RetentionReport) -> None:
    source = Path(info.path)
    trash = root / runs.RUNS_DIR / f"{TRASH_PREFIX}{info.run_id}-{secrets.token_hex(4)}"
    try:
        os.rename(source, trash)
    except FileNotFoundError:  # deleted by someone else meanwhile
        return
    except OSError as exc:
        report.errors.append(f"could not delete run {info.run_id}: {exc}")
        log.warning("retention: could not delete run %s: %s", info.run_id, exc)
        return
    _sync_directory(trash.parent)
    report.deleted.append(RetentionEntry(info.run_id, info.status, reason, info.path))
    killpoints.reached("retention")
    _remove_tree(trash, report)
    log.info("retention: deleted run %s (%s, %s)", info.run_id, info.status, reason)


def _remove_leftovers(root: Path, older_than: datetime.datetime, report: RetentionReport) -> None:
    for trash in sorted((root / runs.RUNS_DIR).glob(f"{TRASH_PREFIX}*")):
        run_id = trash.name[len(TRASH_PREFIX) :].rpartition("-")[0] or trash.name
        reason = "left by an interrupted deletion"
        if _remove_tree(trash, report):
            report.deleted.append(RetentionEntry(run_id, TRASH, reason, str(trash)))
            log.info("retention: deleted run %s (%s, %s: %s)", run_id, TRASH, reason, trash.name)
    for tmp in sorted(root.glob(f".{runs.LATEST}.*.tmp")):
        try:
            if output_root.modified_at(tmp) >= older_than or not tmp.is_file():
                continue
            tmp.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.errors.append(f"could not delete {tmp}: {exc}")
            log.warning("retention: could not delete %s: %s", tmp, exc)
            continue
        reason = "a temporary LATEST file older than the grace period"
        report.deleted.append(RetentionEntry(None, SCRATCH, reason, str(tmp)))
        log.info("retention: deleted %s (%s, %s)", tmp.name, SCRATCH, reason)


def _remove_tree(path: Path, report: RetentionReport) -> bool:
    """Removes a trash directory (or file); False, with errors in `report`, if some is left."""
    problems: list[str] = []

    def record(function: object, name: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            problems.append(f"{name}: {exc}")

    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        elif sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=record)
        else:
            shutil.rmtree(path, onerror=lambda f, name, info: record(f, name, info[1]))
    except OSError as exc:
        problems.append(f"{path}: {exc}")
    if problems:
        report.errors.append(f"{path} is left for the next retention: {'; '.join(problems[:3])}")
        log.warning("retention: could not remove all of %s: %s", path, problems[0])
    return not problems


def _sync_directory(path: Path) -> None:
    """Makes a rename in `path` survive a power loss (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
