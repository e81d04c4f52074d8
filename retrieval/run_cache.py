"""A verified local copy of the run an object-store root (s3://, gs://) publishes, so that
readers that need local files (memory-mapped indexes: `serving`) can use a remote root.

Layout: a remote root is mirrored under <cache_dir>/runs/<scheme>/<bucket>/<path>/ with the
layout of an output root (`retrieval.runs`), holding only what serving reads:

    <mirror>/LATEST                          the run last copied and verified (written last)
    <mirror>/runs/<run_id>/run_manifest.json
    <mirror>/runs/<run_id>/index/<embedder>/...   every file the index manifests list
    <mirror>/runs/<run_id>/.imgindex-cached.json  the completion marker (below)
    <mirror>/.staging/<run_id>/              a copy in progress (kept for a retry)
    <mirror>/.lock                           held while copying or pruning (flock)

Being an output root, the mirror works with the local readers unchanged: its LATEST names
the copied run, so `run_status.effective_status` reads a "publishing" run that the remote
LATEST names as published, exactly as it would on the remote root.

Trust runs down the manifests, as for a local run: the run manifest names each embedder's
index and the SHA-256 of its manifest.json; that manifest (of a sharded index: each shard's
manifest.json, by SHA-256 again) lists every file with its size and SHA-256.  Each file is
hashed while it downloads and refused when either differs, so a copy is complete and intact
before anything opens it.  The copy is made in a staging directory, made read-only, given
its marker (every file's size and SHA-256) and renamed into runs/<run_id>: a run directory
in the mirror is therefore complete.  Opening an unchanged run again downloads nothing (the
marker and the files' sizes are checked); files already in the staging directory of an
interrupted copy are re-hashed locally instead of downloaded again.

The store must be configured first (`retrieval.storage.configure`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from retrieval import atomic_files, runs, sharded, storage
from retrieval import manifest as mf
from retrieval.errors import ConfigError, IndexFormatError

# The variable and default that the builtin models' cache uses too (retrieval.builtin).
CACHE_ENV = "IMGINDEX_CACHE_DIR"
MARKER = ".imgindex-cached.json"
STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# How long reading LATEST (or listing the root) may take.  Beam retries a failed call to
# an unreachable endpoint 7 times with exponential backoff from 5 s (apache_beam.utils.retry:
# several minutes) before it reports why; a server must not hang that long at start.
DEFAULT_STORE_TIMEOUT_SECONDS = 30.0
_T = TypeVar("_T")


def default_cache_dir() -> str:
    """$IMGINDEX_CACHE_DIR, else ~/.cache/imgindex."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "imgindex")


def mirror_dir(cache_dir: str, root: str) -> str:
    """Where remote root `root` is mirrored: <cache_dir>/runs/<scheme>/<bucket>/<path>."""
    scheme, _, rest = root.partition("://")
    parts = [p for p in rest.split("/") if p]
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not parts or {".", ".."} & set(parts):
        raise ConfigError(f"{root} is not an object-store root like s3://bucket/path or gs://bucket/path")
    return os.path.join(cache_dir, "runs", scheme, *parts)


@dataclasses.dataclass(frozen=True)
class CachedRun:
    """One `RunCache.fetch`: the local run directory, and what it took."""

    run_id: str
    run_dir: str
    downloaded_files: int
    downloaded_bytes: int
    reused_files: int  # already in the cache (or the staging of an interrupted copy)
    seconds: float


class RunCache:
    """The mirror of one remote output root (module docstring)."""

    def __init__(
        self,
        root: str,
        cache_dir: str | None = None,
        store_timeout_seconds: float | None = DEFAULT_STORE_TIMEOUT_SECONDS,
    ):
        if store_timeout_seconds is not None and not 0 < store_timeout_seconds < float("inf"):
            raise ConfigError(f"store_timeout_seconds must be > 0 or None, got {store_timeout_seconds!r}")
        self.root = root.rstrip("/")
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.local_root = mirror_dir(self.cache_dir, self.root)
        self.store_timeout_seconds = store_timeout_seconds

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.local_root, runs.RUNS_DIR, run_id)

    def latest(self) -> str | None:
        """The run id the remote LATEST names, or None when there is no LATEST.  Raises
        StorageError (store unreachable, credentials, bucket) or IndexFormatError."""
        path = storage.join(self.root, runs.LATEST)
        try:
            data = self.within_timeout(path, lambda: storage.read_bytes(path))
        except FileNotFoundError:
            return None
        try:
            name = data.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise IndexFormatError(f"{path} is not text (it should hold runs/<run_id>): {exc}") from None
        head, _, run_id = name.partition("/")
        if head != runs.RUNS_DIR or not _RUN_ID.match(run_id):
            raise IndexFormatError(f"{path} holds {name[:200]!r}, not runs/<run_id>")
        return run_id

    def within_timeout(self, path: str, call: Callable[[], _T]) -> _T:
        """call() (a store call about `path`), refused with StorageError when it takes longer
        than store_timeout_seconds; it goes on in a daemon thread until Beam gives up."""
        if self.store_timeout_seconds is None:
            return call()
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["value"] = call()
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="imgindex-store", daemon=True).start()
        if not done.wait(self.store_timeout_seconds):
            raise storage.StorageError(
                f"{path}: the store did not answer within {self.store_timeout_seconds:g} s (Beam "
                "retries an unreachable or failing endpoint for minutes). Check that it is "
                "reachable and the store's settings (for S3: --s3_endpoint_url, "
                "--s3_access_key_id, --s3_secret_access_key, --s3_region_name, or the AWS_* "
                "environment; for GCS: --project and application-default credentials)"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def local_latest(self) -> str | None:
        """The run id the mirror's LATEST names (the run last copied), or None."""
        latest = runs.read_latest(self.local_root) if os.path.isdir(self.local_root) else None
        return None if latest is None else os.path.basename(latest)

    def fetch(self, run_id: str, allow_unpublished: bool = False) -> CachedRun:
        """Copy run `run_id` of the remote root into the mirror (unless a complete copy is
        there), verify it, and point the mirror's LATEST at it.  Refused with IndexFormatError
        (nothing replaced): a run whose files are missing or differ from its manifests, or
        whose status is not published (unless allow_unpublished).  StorageError: the store
        failed."""
        if not _RUN_ID.match(run_id):
            raise IndexFormatError(f"{self.root}: {run_id!r} is not a run id")
        start = time.perf_counter()
        final = self.run_dir(run_id)
        with self._locked():
            if _complete(final):
                copy = _Copy(self.root, run_id, "")
            else:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(final)  # a damaged copy (e.g. a file deleted by hand)
                copy = _Copy(self.root, run_id, os.path.join(self.local_root, STAGING_DIR, run_id))
                copy.run(allow_unpublished)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(copy.staging, final)
            atomic_files.write_text_atomic(Path(self.local_root, runs.LATEST), f"{runs.RUNS_DIR}/{run_id}\n")
        return CachedRun(
            run_id=run_id,
            run_dir=final,
            downloaded_files=copy.downloaded_files,
            downloaded_bytes=copy.downloaded_bytes,
            reused_files=copy.reused_files if copy.staging else len(_marker(final)["files"]),
            seconds=round(time.perf_counter() - start, 3),
        )

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete every copied run (and unfinished copy) of this mirror but those in `keep`
        (run ids); returns the run ids deleted.  A process that still memory-maps a deleted
        run keeps its pages (the files go when it lets them go)."""
        keep = set(keep)
        removed = []
        with self._locked():
            for parent in (
                os.path.join(self.local_root, runs.RUNS_DIR),
                os.path.join(self.local_root, STAGING_DIR),
            ):
                with contextlib.suppress(FileNotFoundError):
                    for name in sorted(os.listdir(parent)):
                        if name not in keep:
                            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                            removed.append(name)
        return sorted(set(removed))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One copy or prune at a time per mirror, across processes sharing the cache."""
        import fcntl

        os.makedirs(self.local_root, exist_ok=True)
        with open(os.path.join(self.local_root, LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class _Copy:
    """Copies one run into `staging`, verifying every file down the manifests."""

    def __init__(self, root: str, run_id: str, staging: str):
        self.remote = storage.join(root, runs.RUNS_DIR, run_id)
        self.run_id = run_id
        self.staging = staging
        self.files: dict[str, dict[str, Any]] = {}
        self.missing: list[str] = []  # objects the manifests list that are not in the store
        self.downloaded_files = self.downloaded_bytes = self.reused_files = 0

    def run(self, allow_unpublished: bool) -> None:
        os.makedirs(self.staging, exist_ok=True)
        if not self._get(runs.RUN_MANIFEST, None, None):
            self._incomplete()
        manifest = runs.read_run_manifest(self.staging)
        if manifest.run_id != self.run_id:
            raise IndexFormatError(
                f"{self.remote}/{runs.RUN_MANIFEST} is the manifest of run {manifest.run_id}, not "
                f"{self.run_id}; the run directory was copied or renamed, rebuild it"
            )
        # LATEST names this run: a "publishing" one was published (run_status.effective_status).
        status = runs.PUBLISHED if manifest.status == runs.PUBLISHING else manifest.status
        if status != runs.PUBLISHED and not allow_unpublished:
            raise IndexFormatError(
                f"run {self.run_id} ({self.remote}) has status {status!r}, not 'published'"
                f"{': ' + manifest.error if manifest.error else ''}; LATEST should not name it: "
                "point LATEST at a published run"
            )
        if not manifest.embedders:
            raise IndexFormatError(f"run {self.run_id} ({self.remote}) has no embedders to serve")
        for name, entry in sorted(manifest.embedders.items()):
            self._index(_relative(entry.index, f"embedders.{name}.index"), entry.index_manifest_sha256)
        if self.missing:
            self._incomplete()
        atomic_files.make_read_only(self.staging)
        marker = {
            "source": self.remote,
            "run_id": self.run_id,
            "verified_at": mf.utc_now(),
            "files": self.files,
        }
        atomic_files.write_json_atomic(Path(self.staging, MARKER), marker, read_only=True)

    def _index(self, rel: str, manifest_sha256: str) -> None:
        """An index directory (either layout) whose manifest.json has SHA-256 `manifest_sha256`."""
        if not self._get(f"{rel}/{mf.MANIFEST_NAME}", manifest_sha256, None):
            return
        local = Path(self.staging, rel)
        if sharded.manifest_kind(local) == sharded.KIND:
            source = local / mf.MANIFEST_NAME
            data = json.loads(source.read_text(encoding="utf-8"))
            manifest = sharded.ShardedManifest.from_dict(data, f"{self.remote}/{rel}/{mf.MANIFEST_NAME}")
            for number, shard in enumerate(manifest.shards):
                expected = sharded.shard_name(number, manifest.num_shards)
                if shard["dir"] != expected:
                    raise IndexFormatError(
                        f"{self.remote}/{rel}: shard {number} is recorded as {shard['dir']!r}, "
                        f"expected {expected!r}; rebuild the run"
                    )
                self._index(f"{rel}/{expected}", shard["manifest_sha256"])
            return
        index_manifest = mf.read_manifest(local)
        for name, expected_file in sorted(index_manifest.files.items()):
            if not isinstance(expected_file, dict) or not {"bytes", "sha256"} <= expected_file.keys():
                raise IndexFormatError(
                    f"{self.remote}/{rel}/{mf.MANIFEST_NAME}: the entry for {name} lacks "
                    "'bytes'/'sha256'; the manifest is damaged, rebuild the run"
                )
            file_rel = f"{rel}/{_relative(name, f'{rel}/{mf.MANIFEST_NAME}: a file')}"
            self._get(file_rel, expected_file["sha256"], expected_file["bytes"])

    def _incomplete(self) -> None:
        more = f" (and {len(self.missing) - 1} more of its files)" if len(self.missing) > 1 else ""
        raise IndexFormatError(
            f"run {self.run_id} is incomplete: {self.missing[0]} does not exist{more}: its "
            "upload is unfinished, or LATEST was written before the run's files; finish the "
            "upload or point LATEST at a complete run"
        )

    def _get(self, rel: str, sha256: str | None, size: int | None) -> bool:
        """File `rel` of the run into staging: kept when already there and matching, else
        downloaded; refused unless its SHA-256 (and size) are the ones expected.  False when
        the store does not have it (recorded in `missing`; the copy goes on, so that a
        retry downloads only what was missing)."""
        local = os.path.join(self.staging, *rel.split("/"))
        if sha256 is not None and os.path.isfile(local):
            if (size is None or os.path.getsize(local) == size) and atomic_files.sha256_file(local) == sha256:
                self.reused_files += 1
                self.files[rel] = {"sha256": sha256, "bytes": os.path.getsize(local)}
                return True
        remote = storage.join(self.remote, rel)
        try:
            digest = storage.download(remote, local)
        except FileNotFoundError:
            self.missing.append(remote)
            return False
        actual_size = os.path.getsize(local)
        self.downloaded_files += 1
        self.downloaded_bytes += actual_size
        problems = []
        if size is not None and actual_size != size:
            problems.append(f"{actual_size} bytes, expected {size}")
        if sha256 is not None and digest != sha256:
            problems.append("its SHA-256 differs")
        if problems:
            os.unlink(local)
            raise IndexFormatError(
                f"run {self.run_id}: {remote} does not match its manifest ({'; '.join(problems)}): "
                "the upload is corrupt or incomplete; upload the run again"
            )
        self.files[rel] = {"sha256": digest, "bytes": actual_size}
        return True


def _marker(run_directory: str) -> dict[str, Any]:
    with open(os.path.join(run_directory, MARKER), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError("not a completion marker")
    return data


def _complete(run_directory: str) -> bool:
    """Whether a mirrored run is complete: its marker, and every file it lists at its size
    (hashed when it was copied; `Searcher.open(verify=True)` hashes the index files again)."""
    try:
        files = _marker(run_directory)["files"]
        return all(
            os.path.getsize(os.path.join(run_directory, *rel.split("/"))) == entry["bytes"]
            for rel, entry in files.items()
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _relative(rel: Any, what: str) -> str:
    """A manifest's relative path, refused when it would leave the run directory."""
    pure = PurePosixPath(rel) if isinstance(rel, str) and rel else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise IndexFormatError(f"{what} is {rel!r}, not a path inside the run directory; rebuild the run")
    return pure.as_posix()
