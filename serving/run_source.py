"""Where a `Searcher` that follows LATEST finds its runs: an output root on this machine
(`LocalRoot`), or one on object storage (`RemoteRoot`: s3://, gs://, any scheme Beam's
FileSystems knows), whose published run is copied to a local cache and verified there
(`retrieval.run_cache`) before it is opened like a local run (memory-mapped).

Both give the Searcher local run directories: `latest()` the one LATEST names now,
`prepare()` makes sure it is there in full before it is loaded, `served()` is told which run
is served (the remote root then prunes its cache).  Apache Beam is imported only for a
remote root (`retrieval.storage`), so that serving a local root stays light.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from retrieval import runs
from retrieval.errors import IndexFormatError
from serving.run_state import check_run_exists, same_dir

if TYPE_CHECKING:
    from retrieval.run_cache import RunCache

log = logging.getLogger(__name__)

# Beam's filesystem options that `imgindex serve` accepts for a remote root (value flags);
# Beam reads them, `retrieval.storage.configure` hands them to its FileSystems.
STORE_FLAGS = (
    ("s3_endpoint_url", "S3: endpoint of an S3-compatible server (e.g. http://127.0.0.1:9000)"),
    ("s3_access_key_id", "S3: access key id (default: the AWS_* environment, ~/.aws)"),
    ("s3_secret_access_key", "S3: secret access key"),
    ("s3_session_token", "S3: session token of temporary credentials"),
    ("s3_region_name", "S3: region"),
    ("project", "GCS: the Google Cloud project (credentials: application-default)"),
)


def resolve(
    path: str,
    cache_dir: str | None,
    storage_flags: Sequence[str] | None,
    allow_unpublished: bool,
    store_timeout_seconds: float | None = None,
) -> tuple[str, RunSource | None]:
    """(the local run directory to open, the source that follows LATEST; None for a run
    directory, which is served as it is).  A remote root's run is copied and verified."""
    if "://" in path:  # retrieval.storage.is_remote, without importing it for local roots
        remote = RemoteRoot(path, cache_dir, storage_flags, allow_unpublished, store_timeout_seconds)
        run_dir = remote.latest_or_fail()
        remote.prepare(run_dir)
        return run_dir, remote
    run_dir = runs.resolve_run(path)
    check_run_exists(path, run_dir)
    return run_dir, None if same_dir(run_dir, path) else LocalRoot(path)


class RunSource(Protocol):
    root: str
    local_root: str  # the root on this machine whose run directories are served

    def latest(self) -> str | None: ...
    def prepare(self, run_dir: str) -> None: ...
    def served(self, run_dir: str, previous: str | None) -> None: ...


class LocalRoot:
    """An output root on this machine: runs are served where they are."""

    def __init__(self, root: str):
        self.root = self.local_root = root

    def latest(self) -> str | None:
        return runs.read_latest(self.root)

    def prepare(self, run_dir: str) -> None:
        check_run_exists(self.root, run_dir)

    def served(self, run_dir: str, previous: str | None) -> None:
        pass


class RemoteRoot:
    """An output root on object storage, served from verified copies in `cache_dir`
    (default: $IMGINDEX_CACHE_DIR, else ~/.cache/imgindex; runs/<scheme>/<bucket>/<path>/
    under it).  storage_flags: Beam's filesystem options (`STORE_FLAGS`, e.g.
    ["--s3_endpoint_url=http://127.0.0.1:9000"]); none: the store's own defaults."""

    def __init__(
        self,
        root: str,
        cache_dir: str | None = None,
        storage_flags: Sequence[str] | None = None,
        allow_unpublished: bool = False,
        store_timeout_seconds: float | None = None,
    ):
        from retrieval import storage
        from retrieval.run_cache import DEFAULT_STORE_TIMEOUT_SECONDS, RunCache

        # Beam's S3 and GCS clients take their settings only from options set here; without
        # them its S3 client cannot even be made (ValueError: 'Must provide one of client or
        # options').  Process-wide, as Beam's FileSystems is.
        storage.configure(storage.options_from_flags(list(storage_flags or [])))
        self.root = root.rstrip("/")
        timeout = DEFAULT_STORE_TIMEOUT_SECONDS if store_timeout_seconds is None else store_timeout_seconds
        self.cache: RunCache = RunCache(self.root, cache_dir, timeout)
        self.local_root = self.cache.local_root
        self._allow_unpublished = allow_unpublished
        self._previous = self.cache.local_latest()  # served before this process, if any

    def latest(self) -> str | None:
        run_id = self.cache.latest()
        if run_id is None:
            self.check_bucket()  # a missing bucket looks like a missing LATEST (a HEAD's 404)
        return None if run_id is None else self.cache.run_dir(run_id)

    def check_bucket(self) -> None:
        """StorageError saying why, when the root's bucket is missing or out of reach."""
        from retrieval import storage

        self.cache.within_timeout(self.root, lambda: storage.check_bucket(self.root))

    def latest_or_fail(self) -> str:
        self.check_bucket()  # fails fast (Beam's own calls retry an unreachable store for minutes)
        run_dir = self.latest()
        if run_dir is None:
            raise IndexFormatError(
                f"{self.root} has no {runs.LATEST}: no run is published there yet; run "
                f"`imgindex build --output {self.root}` first, or check the root's path"
            )
        return run_dir

    def prepare(self, run_dir: str) -> None:
        copy = self.cache.fetch(os.path.basename(run_dir), self._allow_unpublished)
        if copy.downloaded_files:
            log.info(
                "copied run %s of %s to %s: %d files, %d bytes downloaded, %d already there, %.1f s",
                copy.run_id,
                self.root,
                copy.run_dir,
                copy.downloaded_files,
                copy.downloaded_bytes,
                copy.reused_files,
                copy.seconds,
            )

    def served(self, run_dir: str, previous: str | None) -> None:
        """Keep the served run and the one before it (for a rollback); prune the rest."""
        keep = {os.path.basename(run_dir)}
        before = os.path.basename(previous) if previous else self._previous
        if before:
            keep.add(before)
        removed = self.cache.prune(keep)
        if removed:
            log.info("pruned cached runs of %s: %s", self.root, ", ".join(removed))
