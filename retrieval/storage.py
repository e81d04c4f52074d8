"""Object storage (gs://, s3://, any scheme Beam's FileSystems knows) for run roots, tables
and the files a run publishes.  Local paths keep their own code (atomic rename, fsync,
read-only modes: retrieval.runs); this module is for the paths that have a scheme.

Beam's FileSystems takes its client settings (endpoint, credentials, region, project) from
pipeline options, and only those handed to it: `configure()` does that once per process,
before anything is listed, checked, read or written.  Apache Beam is imported here, lazily, so
that serving a local root never imports it.

What the stores guarantee, and what this module relies on: a single-object put is atomic on
GCS and S3 (a reader sees the old object or the new one, never a part), and since 2020 both
give read-after-write consistency for puts, overwrites, deletes and listings.  Nothing here
needs rename, which object stores do not have."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrieval.errors import ConfigError, ImgIndexError

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

_CHUNK = 8 << 20


class StorageError(ImgIndexError):
    """An object store refused or failed an operation: credentials, bucket, network."""


def is_remote(path: str) -> bool:
    """True for a path with a scheme (gs://, s3://, ...); file:// is not supported."""
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def import_beam_quietly() -> None:
    """Import Beam's filesystems without the lines its import logs about BigQuery clients
    (a root-logger WARNING "apitools not found", an INFO): imgindex never uses them, and a
    command's error stays one line."""
    loggers = [logging.getLogger(), logging.getLogger("apache_beam")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import apache_beam.io.filesystems  # noqa: F401
        import apache_beam.options.pipeline_options  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def options_from_flags(flags: Sequence[str]) -> PipelineOptions:
    """Beam pipeline options from command-line flags (never from sys.argv)."""
    import_beam_quietly()
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(flags=list(flags))


def configure(options: PipelineOptions | None) -> None:
    """Hand `options` (endpoint, credentials, region, project flags) to Beam's FileSystems,
    which otherwise builds its S3 or GCS client without them."""
    from apache_beam.io.filesystems import FileSystems

    share_s3_clients()
    if options is not None:
        FileSystems.set_options(options)


_shared_s3_clients = False
_s3_lock = threading.Lock()


def share_s3_clients() -> None:
    """Make Beam's S3 filesystem reuse one boto3 client per process and settings.

    Beam 2.77 builds a new boto3 session and client for every S3 operation (each open,
    exists, size), which costs 0.1-0.3 s of CPU: more than reading and hashing an image.
    boto3 clients are thread-safe; Beam's wrapper keeps per-download state, so each wrapper
    stays its own object and only the boto3 client inside is shared.  Called where objects
    are opened per record (the readers, on every worker) and by configure().  A no-op when
    Beam's S3 support (boto3) is not installed."""
    global _shared_s3_clients
    if _shared_s3_clients:
        return
    import importlib.util
    import sys

    if importlib.util.find_spec("boto3") is None:
        return
    import apache_beam.io.filesystems  # noqa: F401  (registers S3FileSystem, imports its client)

    module = sys.modules.get("apache_beam.io.aws.clients.s3.boto3_client")
    with _s3_lock:
        if module is None or _shared_s3_clients:
            return
        original = module.Client.__init__
        templates: dict[tuple[Any, ...], dict[str, Any]] = {}

        def init(self: Any, options: Any) -> None:
            key = _s3_settings(options)
            with _s3_lock:
                template = templates.get(key)
            if template is None:
                original(self, options)
                with _s3_lock:
                    templates.setdefault(key, dict(vars(self)))
            else:
                vars(self).update(template)  # the shared client, fresh per-download state

        module.Client.__init__ = init
        _shared_s3_clients = True


def _s3_settings(options: Any) -> tuple[Any, ...]:
    """The settings Beam's S3 client is built from (options or a dict, as Beam accepts)."""
    names = (
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_session_token",
        "s3_endpoint_url",
        "s3_disable_ssl",
        "s3_region_name",
        "s3_api_version",
        "s3_verify",
    )
    if isinstance(options, dict):
        return tuple(options.get(n) for n in names)
    from apache_beam.options.pipeline_options import S3Options

    view = options.view_as(S3Options)
    return tuple(getattr(view, n, None) for n in names)


@contextlib.contextmanager
def _errors(path: str, action: str) -> Iterator[None]:
    """One clear line for a store's failure (no traceback): which path, which action, the
    store's own reason, and where the settings come from."""
    try:
        yield
    except (ImgIndexError, FileNotFoundError):
        raise
    except Exception as exc:  # boto3, google-cloud and Beam wrap failures in many types
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise StorageError(
            f"{path}: cannot {action}: {reason[:400]}. Check the bucket name and the store's "
            "settings (for S3: --s3_endpoint_url, --s3_access_key_id, --s3_secret_access_key, "
            "--s3_region_name, or the AWS_* environment; for GCS: --project and "
            "application-default credentials)"
        ) from None


def _fs() -> Any:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


@dataclass(frozen=True)
class ObjectInfo:
    path: str
    size: int


def exists(path: str) -> bool:
    with _errors(path, "check whether it exists"):
        return bool(_fs().exists(path))


def list_prefix(prefix: str) -> list[ObjectInfo]:
    """Every object whose path starts with `prefix` + "/" (recursive), sorted by path."""
    pattern = join(prefix, "**")
    with _errors(prefix, "list"):
        try:
            matched = _fs().match([pattern])[0].metadata_list
        except Exception as exc:
            if (
                "No files found" in str(exc)
                or type(exc).__name__ == "BeamIOError"
                and "matched 0" in str(exc)
            ):
                return []
            raise
    return sorted((ObjectInfo(m.path, int(m.size_in_bytes)) for m in matched), key=lambda o: o.path)


def check_bucket(path: str) -> None:
    """StorageError unless the bucket of `path` (s3:// or gs://; other schemes are not
    checked) exists and the configured credentials reach it.  Beam's own calls cannot say
    so: its S3 listing of a missing bucket is empty and a HEAD of an object in it a plain
    404, and it retries an unreachable endpoint for minutes (7 times, backoff from 5 s); this asks the bucket
    once, through the client Beam builds from the same options."""
    scheme, _, rest = path.partition("://")
    bucket = rest.split("/", 1)[0]
    with _errors(f"{scheme}://{bucket}", "use the bucket"):
        options = _fs()._pipeline_options
        if scheme == "s3":
            from apache_beam.io.aws.clients.s3 import boto3_client

            try:
                boto3_client.Client(options=options).client.head_bucket(Bucket=bucket)
            except Exception as exc:  # botocore's ClientError: a HEAD answer has a code, no text
                code = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket"):
                    raise LookupError(f"the bucket {bucket} does not exist (404)") from None
                if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise PermissionError(
                        f"access denied (403): wrong credentials, or no right to {bucket}"
                    ) from None
                raise
        elif scheme == "gs":
            from apache_beam.io.gcp import gcsio

            if gcsio.GcsIO(pipeline_options=options).get_bucket(bucket) is None:
                raise LookupError(f"the bucket {bucket} does not exist")


def read_bytes(path: str) -> bytes:
    """The whole object; FileNotFoundError when it does not exist."""
    if not exists(path):
        raise FileNotFoundError(path)
    with _errors(path, "read"):
        from apache_beam.io.filesystem import CompressionTypes

        with _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return bytes(f.read())


def put_bytes(path: str, data: bytes) -> None:
    """One single-object put: readers see the old object or the whole new one."""
    with _errors(path, "write"):
        from apache_beam.io.filesystem import CompressionTypes

        with _fs().create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)


def upload(local: str, path: str) -> str:
    """Copy local file `local` to object `path`; returns its SHA-256 (hex)."""
    digest = hashlib.sha256()
    with _errors(path, "upload to"):
        from apache_beam.io.filesystem import CompressionTypes

        with (
            open(local, "rb") as src,
            _fs().create(path, compression_type=CompressionTypes.UNCOMPRESSED) as dst,
        ):
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    return digest.hexdigest()


def download(path: str, local: str) -> str:
    """Copy object `path` to local file `local` (written beside it, then renamed); returns
    its SHA-256 (hex).  FileNotFoundError when the object does not exist."""
    if not exists(path):
        raise FileNotFoundError(path)
    digest = hashlib.sha256()
    directory = os.path.dirname(os.path.abspath(local))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".download-")
    try:
        with _errors(path, "download"):
            from apache_beam.io.filesystem import CompressionTypes

            with (
                os.fdopen(fd, "wb") as dst,
                _fs().open(path, compression_type=CompressionTypes.UNCOMPRESSED) as src,
            ):
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def delete_prefix(prefix: str) -> int:
    """Delete every object under `prefix` + "/"; returns how many."""
    objects = list_prefix(prefix)
    if objects:
        with _errors(prefix, "delete"):
            _fs().delete([o.path for o in objects])
    return len(objects)


def upload_tree(local_dir: str, prefix: str) -> dict[str, str]:
    """Upload every file under `local_dir` to `prefix`/<relative path>; returns
    {relative path: SHA-256}."""
    if not os.path.isdir(local_dir):
        raise ConfigError(f"{local_dir} is not a directory")
    out = {}
    for dirpath, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            local = os.path.join(dirpath, name)
            rel = os.path.relpath(local, local_dir).replace(os.sep, "/")
            out[rel] = upload(local, join(prefix, rel))
    return out


def scratch_dir(prefix: str = "imgindex-") -> str:
    """A local working directory for files on their way to or from a store; the caller removes
    it (remove_scratch)."""
    return tempfile.mkdtemp(prefix=prefix)


def remove_scratch(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- used by the build's remote run root (pipelines.remote_stage, retrieval.remote_root) ---


@dataclass(frozen=True)
class ObjectStat:
    """An object with its last-modified time (seconds since the epoch; None when the store
    does not say): what retention measures the age of an unfinished remote run by."""

    path: str
    size: int
    modified: float | None


def list_with_times(prefix: str) -> list[ObjectStat]:
    """`list_prefix`, with each object's last-modified time."""
    pattern = join(prefix, "**")
    with _errors(prefix, "list"):
        try:
            matched = _fs().match([pattern])[0].metadata_list
        except Exception as exc:
            if "No files found" in str(exc) or "matched 0" in str(exc):
                return []
            raise
    out = [
        ObjectStat(m.path, int(m.size_in_bytes), getattr(m, "last_updated_in_seconds", None) or None)
        for m in matched
    ]
    return sorted(out, key=lambda o: o.path)


def has_objects(prefix: str) -> bool:
    """Whether any object lies under `prefix` + "/" (a "directory" of an object store)."""
    return bool(list_prefix(prefix))


def exists_any(path: str) -> bool:
    """Whether `path` is an object or a non-empty prefix (a file or a directory)."""
    return exists(path) or has_objects(path)


def delete(paths: Sequence[str]) -> None:
    """Delete these objects (one call; missing ones are an error of the store's choosing)."""
    if paths:
        with _errors(paths[0], "delete"):
            _fs().delete(list(paths))


def check_writable(prefix: str) -> None:
    """StorageError, in one line, unless objects can be listed, written and deleted under
    `prefix` (bucket, endpoint and credentials checked before any work): a small probe
    object is put and deleted."""
    import secrets

    check_bucket(prefix)
    list_prefix(prefix)
    probe = join(prefix, f".imgindex-write-check-{secrets.token_hex(4)}")
    put_bytes(probe, b"imgindex write check\n")
    delete([probe])
