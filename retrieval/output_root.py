"""An output root's runs, as `imgindex runs` lists them.

`list_runs` describes every run directory under `<root>/runs/` (see `retrieval.runs` for
the layout): its status, creation time, counts and each embedder's rows;
`latest_run_id` names the run LATEST points at.  Deleting the runs an output root no
longer needs is `retrieval.retention`'s.  A root on an object store (s3://, gs://) is
listed by `retrieval.remote_root`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any

from retrieval import run_status, runs, storage
from retrieval.errors import ConfigError, IndexFormatError

PUBLISHED = "published"
INCOMPLETE = "incomplete"
DAMAGED = "damaged"
INCOMPLETE_REASON = f"no {runs.RUN_MANIFEST}: a build still running or a killed one (cannot tell which)"


@dataclasses.dataclass(frozen=True)
class EmbedderRows:
    name: str
    n: int | None  # rows in the embedder's index; None when the manifest does not say


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One run directory under `<root>/runs/`.

    status: what the run is: "published", "rejected" or "failed" (from run_manifest.json),
    "publishing" (a publish in progress), "incomplete" (no run_manifest.json) or "damaged"
    (a run_manifest.json that cannot be read; `reason` says why).  A manifest that says
    "publishing" gives the run's true status (`retrieval.run_status.effective_status`): published
    when LATEST names it, failed when its publish was killed (`reason` says why);
    `recorded_status` is the manifest's own.  created_at: the manifest's, or the directory's
    mtime (`created_from` "mtime") for incomplete and damaged runs and manifests without a
    readable time.
    """

    run_id: str
    path: str
    status: str
    created_at: datetime.datetime
    created_from: str  # "manifest" or "mtime"
    records: int | None
    failed_total: int | None
    embedders: tuple[EmbedderRows, ...]
    is_latest: bool
    error: str | None  # the manifest's error
    reason: str | None  # why a run is incomplete or damaged, or its status not the recorded one
    recorded_status: str | None = None  # the manifest's status (None without a readable manifest)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["created_at"] = self.created_at.isoformat(timespec="seconds")
        data["embedders"] = {e.name: e.n for e in self.embedders}
        return data


def list_runs(root: str | os.PathLike[str], now: datetime.datetime | None = None) -> list[RunInfo]:
    """Every run directory under `<root>/runs/`, oldest first (by run id, which starts with
    its UTC start time).  Dot-directories (deletions in progress) and files are ignored.
    `now` (default: the current time) decides whether an old "publishing" manifest's
    publish was killed (`retrieval.run_status.publisher_alive`).  A root on an object store
    is listed by `retrieval.remote_root`."""
    if storage.is_remote(str(root)):
        from retrieval import remote_root

        return remote_root.list_runs(str(root), now)
    root_path = check_root(root)
    try:
        latest = _latest_id(root_path)
    except IndexFormatError:
        latest = None
    directory = root_path / runs.RUNS_DIR
    try:
        entries = [e for e in os.scandir(directory) if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    described = (
        _describe(Path(e.path), latest, now) for e in sorted(entries, key=lambda e: e.name) if e.is_dir()
    )
    return [info for info in described if info is not None]


def latest_run_id(root: str | os.PathLike[str]) -> str | None:
    """The run id LATEST names, or None when there is no LATEST or it names a directory
    outside `runs/`; IndexFormatError when LATEST is unreadable."""
    if storage.is_remote(str(root)):
        from retrieval import remote_root

        return remote_root.latest_run_id(str(root))
    return _latest_id(check_root(root))


def check_root(root: str | os.PathLike[str]) -> Path:
    """`root` as a Path; ConfigError unless it is a directory."""
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(
            f"{root} is not a directory (an output root holds {runs.LATEST} and {runs.RUNS_DIR}/)"
        )
    return path


def _latest_id(root: Path) -> str | None:
    return run_id_of(root, runs.read_latest(str(root)))


def run_id_of(root: Path, latest: str | None) -> str | None:
    """The run id of `latest` (what `runs.read_latest` returned for `root`), or None when it is
    None or names a directory outside `runs/`."""
    if latest is None:
        return None
    parts = Path(os.path.relpath(os.path.normpath(latest), os.path.normpath(root))).parts
    return parts[1] if len(parts) == 2 and parts[0] == runs.RUNS_DIR else None


def _describe(path: Path, latest: str | None, now: datetime.datetime | None) -> RunInfo | None:
    try:
        mtime = modified_at(path)
    except FileNotFoundError:  # deleted since it was listed
        return None
    info = RunInfo(
        run_id=path.name,
        path=str(path),
        status=INCOMPLETE,
        created_at=mtime,
        created_from="mtime",
        records=None,
        failed_total=None,
        embedders=(),
        is_latest=path.name == latest,
        error=None,
        reason=INCOMPLETE_REASON,
    )
    if not (path / runs.RUN_MANIFEST).exists():
        return info
    try:
        m = runs.read_run_manifest(str(path))
    except IndexFormatError as exc:
        return dataclasses.replace(info, status=DAMAGED, reason=str(exc))
    if m.status not in runs.STATUSES:
        return dataclasses.replace(
            info, status=DAMAGED, reason=f"its manifest has an unknown status {m.status!r}"
        )
    status, why = run_status.effective_status(str(path), m, now)
    created = parse_time(m.created_at)
    return dataclasses.replace(
        info,
        status=status,
        recorded_status=m.status,
        created_at=created or mtime,
        created_from="manifest" if created else "mtime",
        records=count_of(m.counts.get("records")),
        failed_total=count_of(m.counts.get("failed_total")),
        embedders=tuple(EmbedderRows(str(name), e.n) for name, e in m.embedders.items()),
        error=m.error if isinstance(m.error, str) else None,
        reason=why,
    )


def count_of(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_time(text: object) -> datetime.datetime | None:
    try:
        return as_utc(datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")))
    except ValueError:
        return None


def as_utc(when: datetime.datetime) -> datetime.datetime:
    """`when` in UTC; a naive datetime is taken as UTC."""
    utc = datetime.timezone.utc
    return when.replace(tzinfo=utc) if when.tzinfo is None else when.astimezone(utc)


def modified_at(path: Path) -> datetime.datetime:
    """The mtime of `path` itself (not following a link), in UTC."""
    return datetime.datetime.fromtimestamp(path.lstat().st_mtime, datetime.timezone.utc)
