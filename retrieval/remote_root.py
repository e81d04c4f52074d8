"""An output root on an object store (s3://, gs://): its runs listed, and retention applied
(`retrieval.output_root` and `retrieval.retention` hand remote roots to this module).

The rules are retention's own (`retention._decide`: the run LATEST names, the published run
before it and any newer published run are never deleted).  What differs is how a store is
read and changed:

- A run is the objects under `runs/<run_id>/`; one listing of `runs/` finds them all.  An
  unfinished run (no run_manifest.json) is as old as its newest object: a build still
  writing keeps it young.
- A deletion removes the run's run_manifest.json first, then every other object.  A kill
  half way leaves an unfinished run whose objects are old: the next retention deletes the
  rest.  It never leaves a manifest that names files which are gone.
- A kept run that has finished loses its scratch (objects under a dot-named part, e.g. a
  killed sharded build's `index/<embedder>/.partitions/`).
- There are no trash directories and no temporary LATEST files: LATEST is one put.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections import defaultdict

from retrieval import killpoints, output_root, retention, run_status, runs, storage
from retrieval.errors import IndexFormatError
from retrieval.output_root import DAMAGED, INCOMPLETE, INCOMPLETE_REASON, EmbedderRows, RunInfo
from retrieval.retention import SCRATCH, RetentionEntry, RetentionReport

log = logging.getLogger(__name__)


def run_id_of(root: str, latest: str | None) -> str | None:
    """The run id of `latest` (a run URI under `root`), or None."""
    if latest is None:
        return None
    prefix = storage.join(root, runs.RUNS_DIR) + "/"
    rest = latest.rstrip("/")[len(prefix) :] if latest.startswith(prefix) else ""
    return rest if rest and "/" not in rest else None


def latest_run_id(root: str) -> str | None:
    return run_id_of(root, runs.read_latest(root))


def _objects_by_run(root: str) -> dict[str, list[storage.ObjectStat]]:
    prefix = storage.join(root, runs.RUNS_DIR)
    by_run: dict[str, list[storage.ObjectStat]] = defaultdict(list)
    for obj in storage.list_with_times(prefix):
        run_id = obj.path[len(prefix) + 1 :].split("/", 1)[0]
        if run_id and not run_id.startswith("."):
            by_run[run_id].append(obj)
    return by_run


def _newest(objects: list[storage.ObjectStat], now: datetime.datetime) -> datetime.datetime:
    times = [o.modified for o in objects if o.modified is not None]
    if not times:  # a store that gives no times: young, so never deleted as abandoned
        return now
    return datetime.datetime.fromtimestamp(max(times), datetime.timezone.utc)


def list_runs(root: str, now: datetime.datetime | None = None) -> list[RunInfo]:
    """`output_root.list_runs` for a remote root: every run under `<root>/runs/`, oldest first."""
    return [info for info, _ in _listing(root.rstrip("/"), now)]


def _listing(root: str, now: datetime.datetime | None) -> list[tuple[RunInfo, list[storage.ObjectStat]]]:
    try:
        latest = latest_run_id(root)
    except IndexFormatError:
        latest = None
    when = now or datetime.datetime.now(datetime.timezone.utc)
    out = []
    for run_id, objects in sorted(_objects_by_run(root).items()):
        path = runs.run_dir(root, run_id)
        newest = _newest(objects, when)
        info = RunInfo(
            run_id=run_id,
            path=path,
            status=INCOMPLETE,
            created_at=newest,
            created_from="mtime",
            records=None,
            failed_total=None,
            embedders=(),
            is_latest=run_id == latest,
            error=None,
            reason=INCOMPLETE_REASON,
        )
        if storage.join(path, runs.RUN_MANIFEST) in {o.path for o in objects}:
            info = _with_manifest(info, now)
        out.append((info, objects))
    return out


def _with_manifest(info: RunInfo, now: datetime.datetime | None) -> RunInfo:
    try:
        m = runs.read_run_manifest(info.path)
    except (IndexFormatError, FileNotFoundError) as exc:
        return dataclasses.replace(info, status=DAMAGED, reason=str(exc))
    if m.status not in runs.STATUSES:
        return dataclasses.replace(
            info, status=DAMAGED, reason=f"its manifest has an unknown status {m.status!r}"
        )
    status, why = run_status.effective_status(info.path, m, now)
    created = output_root.parse_time(m.created_at)
    counts = m.counts
    return dataclasses.replace(
        info,
        status=status,
        recorded_status=m.status,
        created_at=created or info.created_at,
        created_from="manifest" if created else "mtime",
        records=output_root.count_of(counts.get("records")),
        failed_total=output_root.count_of(counts.get("failed_total")),
        embedders=tuple(EmbedderRows(str(name), e.n) for name, e in m.embedders.items()),
        error=m.error if isinstance(m.error, str) else None,
        reason=why,
    )


def apply_retention(
    root: str, *, keep_runs: int, keep_failed_hours: float, now: datetime.datetime | None = None
) -> RetentionReport:
    """`retention.apply_retention` for a remote root (same rules, same report)."""
    root = root.rstrip("/")
    now = output_root.as_utc(now) if now is not None else datetime.datetime.now(datetime.timezone.utc)
    raw_latest = runs.read_latest(root)  # an unreadable LATEST: refuse before deleting anything
    report = RetentionReport(root, keep_runs, keep_failed_hours, now.isoformat(timespec="seconds"), None)
    listing = _listing(root, now)
    report.latest = latest = run_id_of(root, raw_latest)
    infos = [info for info, _ in listing]
    deletions = retention._decide(infos, latest, keep_runs, keep_failed_hours, now, report)
    for info, reason in deletions:
        if runs.read_latest(root) != raw_latest:
            report.errors.append("LATEST changed during retention: stopped; the next call continues")
            log.warning("retention: LATEST changed while deleting; stopped (the next call continues)")
            break
        _delete_run(info, reason, report)
    kept = {e.run_id for e in report.kept}
    for info, objects in listing:
        if info.run_id in kept:
            retention._repair(info, now, report)
            if info.status in retention.FINISHED:
                _remove_scratch(info, objects, report)
    return report


def _delete_run(info: RunInfo, reason: str, report: RetentionReport) -> None:
    manifest = storage.join(info.path, runs.RUN_MANIFEST)
    try:
        if storage.exists(manifest):  # first: a half-deleted run is never taken for a whole one
            storage.delete([manifest])
        report.deleted.append(RetentionEntry(info.run_id, info.status, reason, info.path))
        killpoints.reached("retention")
        storage.delete_prefix(info.path)
    except storage.StorageError as exc:
        report.errors.append(f"could not delete run {info.run_id}: {exc}")
        log.warning("retention: could not delete run %s: %s", info.run_id, exc)
        return
    log.info("retention: deleted run %s (%s, %s)", info.run_id, info.status, reason)


def _remove_scratch(info: RunInfo, objects: list[storage.ObjectStat], report: RetentionReport) -> None:
    prefix = info.path.rstrip("/") + "/"
    scratch = [o.path for o in objects if any(p.startswith(".") for p in o.path[len(prefix) :].split("/"))]
    if not scratch:
        return
    try:
        storage.delete(scratch)
    except storage.StorageError as exc:
        report.errors.append(f"{info.path}: scratch is left for the next retention: {exc}")
        return
    reason = f"scratch of a {info.status} run"
    report.deleted.append(RetentionEntry(info.run_id, SCRATCH, reason, prefix + f"({len(scratch)} objects)"))
    log.info("retention: deleted %d scratch objects of run %s", len(scratch), info.run_id)
