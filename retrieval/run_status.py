"""A run's publish and its true status: the window between the "publishing" and "published"
writes of run_manifest.json (`retrieval.runs` holds the manifest and the statuses).

`publish` makes the run's files read-only, points LATEST at it, then records it as published.
A kill between the writes of "publishing" and "published" leaves a run whose recorded status
is "publishing"; what it really is (`effective_status`) follows from LATEST: a "publishing"
run that LATEST names is published (the kill came after LATEST was written), one that LATEST
does not name is a failed run (killed before LATEST was written) unless its publisher is
still at work (`publisher_alive`).  The next `publish` and retention write the true status
into such a manifest (`repair_status`).

A published run is immutable: `publish` takes the write bits off every file of the run
before LATEST names it (its directories stay writable by their owner, for retention).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from retrieval import killpoints, storage
from retrieval.atomic_files import make_read_only, write_text_atomic
from retrieval.errors import IndexFormatError
from retrieval.manifest import utc_now
from retrieval.runs import (
    FAILED,
    LATEST,
    PUBLISHED,
    PUBLISHING,
    RUN_MANIFEST,
    RUNS_DIR,
    RunManifest,
    read_latest,
    read_run_manifest,
    run_dir,
    write_run_manifest,
)

# A publish writes LATEST (one small synced file) between its two manifest writes: a
# "publishing" manifest older than this whose run LATEST does not name was killed, whoever
# wrote it.
PUBLISH_TIMEOUT_SECONDS = 600.0
KILLED_WHILE_PUBLISHING = (
    "killed while publishing: its run_manifest.json says 'publishing' and LATEST does not name it"
)


def publisher_record() -> dict[str, Any]:
    """The `publisher` of a "publishing" manifest written by this process."""
    import socket  # only when publishing: `import serving` stays light

    return {"host": socket.gethostname(), "pid": os.getpid(), "since": utc_now()}


def publisher_alive(publisher: Any, now: datetime.datetime | None = None) -> bool:
    """Whether the process a "publishing" manifest names may still be publishing: False when
    it ran on this host and is gone, or began more than PUBLISH_TIMEOUT_SECONDS before `now`
    (default: the current time), or the record is missing or malformed."""
    if not isinstance(publisher, dict):
        return False
    try:
        since = datetime.datetime.fromisoformat(str(publisher.get("since")))
    except ValueError:
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if (now - since).total_seconds() > PUBLISH_TIMEOUT_SECONDS:
        return False
    pid = publisher.get("pid")
    import socket

    if publisher.get("host") != socket.gethostname():
        return True  # another machine's process: only the timeout tells
    return isinstance(pid, int) and not isinstance(pid, bool) and _process_alive(pid)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:  # a killed process its parent has not reaped yet is a zombie: gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _named_by_latest(run_directory: str, run_id: str) -> bool:
    """Whether the LATEST of the output root holding `run_directory` (<root>/runs/<id>) names it."""
    if storage.is_remote(run_directory):
        parent, _, name = run_directory.rstrip("/").rpartition("/")
        root, _, runs_dir = parent.rpartition("/")
        if runs_dir != RUNS_DIR or name != run_id:
            return False
        try:
            latest = read_latest(root)
        except (IndexFormatError, OSError, storage.StorageError):
            return False
        return latest is not None and latest.rstrip("/") == run_directory.rstrip("/")
    directory = Path(run_directory)
    if directory.parent.name != RUNS_DIR:
        return False
    try:
        latest = read_latest(str(directory.parent.parent))
    except (IndexFormatError, OSError):
        return False
    return latest is not None and Path(latest).name == run_id and Path(latest).parent.name == RUNS_DIR


def effective_status(
    run_directory: str, manifest: RunManifest, now: datetime.datetime | None = None
) -> tuple[str, str | None]:
    """(the run's true status, why it differs from the recorded one or None): the recorded
    status, except for a "publishing" run, which is "published" when LATEST names it,
    "publishing" while its publisher may be at work (`publisher_alive`), else "failed"."""
    if manifest.status != PUBLISHING:
        return manifest.status, None
    if _named_by_latest(run_directory, manifest.run_id):
        return PUBLISHED, (
            "LATEST names it; its publish was interrupted after LATEST was written "
            "(the next build records it as published)"
        )
    if publisher_alive(manifest.publisher, now):
        return PUBLISHING, "a publish in progress: LATEST is being pointed at it"
    return FAILED, KILLED_WHILE_PUBLISHING


def repair_status(run_directory: str, now: datetime.datetime | None = None) -> str | None:
    """Writes a "publishing" run's true status (`effective_status`) into its manifest, once
    it is known: "published" when LATEST names it, "failed" (with the error) when its publish
    was killed.  Returns the status written, or None when nothing changed."""
    manifest = read_run_manifest(run_directory)
    status, _ = effective_status(run_directory, manifest, now)
    if manifest.status != PUBLISHING or status == PUBLISHING:
        return None
    manifest.status, manifest.publisher = status, None
    if status == FAILED:
        manifest.error = KILLED_WHILE_PUBLISHING
    write_run_manifest(run_directory, manifest)
    return status


def publish(root: str, run_id: str) -> RunManifest:
    """Points LATEST at a run whose manifest says "publishing" (a build that passed its
    gates) or "published" (going back to an earlier run), and returns its manifest as
    written: the run's files are made read-only, the run LATEST named until now gets its
    true status if its own publish was interrupted (`repair_status`), LATEST is replaced
    (temporary file, then rename), and a "publishing" manifest is rewritten as "published".

    On an object store (`retrieval.storage`) there are no modes and no rename: every file of
    the run is already written, the run manifest last; LATEST is one single-object put
    (atomic on S3 and GCS, and read-after-write consistent), so a reader that sees it sees
    the complete run.
    """
    directory = run_dir(root, run_id)
    if storage.is_remote(root):
        return _publish_remote(root, run_id, directory)
    manifest = read_run_manifest(directory)
    if manifest.status not in (PUBLISHED, PUBLISHING):
        raise IndexFormatError(
            f"run {run_id} is not publishable (its manifest status is {manifest.status!r}, "
            f"not {PUBLISHING!r} or {PUBLISHED!r})"
        )
    make_read_only(directory)
    try:  # a damaged LATEST or previous run is retention's to report, not a reason not to publish
        previous = read_latest(root)
        if previous is not None and os.path.isfile(os.path.join(previous, RUN_MANIFEST)):
            repair_status(previous)
    except (IndexFormatError, OSError):
        pass
    killpoints.reached("publishing")
    write_text_atomic(Path(root) / LATEST, f"{RUNS_DIR}/{run_id}\n")
    killpoints.reached("latest-written")
    if manifest.status == PUBLISHING:
        manifest.status, manifest.publisher = PUBLISHED, None
        write_run_manifest(directory, manifest)
    return manifest


def _publish_remote(root: str, run_id: str, directory: str) -> RunManifest:
    """`publish` on an object store: the same order, with LATEST one single-object put."""
    manifest = read_run_manifest(directory)
    if manifest.status not in (PUBLISHED, PUBLISHING):
        raise IndexFormatError(
            f"run {run_id} is not publishable (its manifest status is {manifest.status!r}, "
            f"not {PUBLISHING!r} or {PUBLISHED!r})"
        )
    try:  # as locally: a damaged previous run is retention's to report
        previous = read_latest(root)
        if previous is not None and storage.exists(storage.join(previous, RUN_MANIFEST)):
            repair_status(previous)
    except (IndexFormatError, OSError, storage.StorageError):
        pass
    killpoints.reached("publishing")
    storage.put_bytes(storage.join(root, LATEST), f"{RUNS_DIR}/{run_id}\n".encode())
    killpoints.reached("latest-written")
    if manifest.status == PUBLISHING:
        manifest.status, manifest.publisher = PUBLISHED, None
        write_run_manifest(directory, manifest)
    return manifest
