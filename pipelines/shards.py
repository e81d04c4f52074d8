"""Input shards: glob expansion, format detection, the reader contract and `read_shard`.

The readers are `pipelines.read_tfrecord`, `pipelines.read_webdataset` and, for plain image
files, `read_image_file` here; `pipelines.shard_stream` holds the byte streams under the first
two (gzip inflation and its check, what a broken shard lost).

Every reader yields `Record`s, or `Failure`s (rows of the failures table) for what it cannot
read, so that every record of the input ends up in a table:

- A record above `--max_record_bytes` (a TFRecord record by its length prefix, a tar member
  by its header's size, an image file by its size) is a failure, and is never read: the
  reader skips its bytes and goes on with the next record.
- A shard whose framing breaks part-way (a truncated TFRecord, a tar cut mid-member or with
  a garbage header) yields the records before the break and one failure row for the
  unreadable rest, which says how many bytes were lost.  The WebDataset sample being read at
  the break is part of that rest (its other members may be lost).
- A TFRecord record whose data fails its CRC32C is a failure; the next record is read.
- A gzip-compressed shard (`.tfrecord.gz`, `.tar.gz`) is inflated and its gzip CRC-32
  and length are checked.  When they fail, or the compressed data is invalid, the damage can
  be anywhere in what was read: the reader ends with `Untrusted`, and every record it yielded
  from that shard must become a failure (`pipelines.content.ReadHashDoFn` does that).  A
  gzip stream that merely ends early (truncated) is a framing break like any other: the
  records before the cut inflate to exactly their original bytes and are kept.  Bytes after
  the last gzip member that are no gzip member do not discard what came before them (it was
  checked).
- Tar members that are not regular files (links, directories, devices) and dot-named
  members are not records: the reader yields a `Skipped` for each, which the run report
  counts.

Folder inputs take files by extension (case-insensitive) and skip dot-names and non-image
files, which `expand_inputs` returns counted by reason.  Paths go through Beam's
`FileSystems`, so any scheme Beam knows (gs://, s3://, ...) works when its extra is
installed.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Iterator
from typing import NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from retrieval import schema as S
from retrieval import storage
from retrieval.errors import ConfigError

# Objects are opened per record on every worker: one boto3 client per process, not per open.
storage.share_s3_clients()

TFRECORD_MARKERS = (".tfrecord", ".tfrec")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_WILDCARDS = "*?["
# TFRecord features tried for the id, in order, when --id_key is not given.
DEFAULT_ID_KEYS = ("image/key", "image/id", "image/source_id", "image/filename")
# 64 MiB: a 100-megapixel camera JPEG is 20-50 MB and even an uncompressed 24-bit TIFF at
# the default --max_pixels fits 300 MB; a record above the limit is a failure, never read.
DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024
# Reasons a matched file is not an input (expand_inputs), as counted in the run report.
SKIP_HIDDEN, SKIP_NON_IMAGE = "hidden", "non_image"


class Shard(NamedTuple):
    path: str
    format: str  # tfrecord | webdataset | images
    prefix: str  # the glob's fixed directory prefix, for relative ids of plain images
    size: int | None = None  # bytes, as listed when the inputs were expanded


class Record(NamedTuple):
    id: str
    source: str
    data: bytes
    metadata: dict


class Skipped(NamedTuple):
    """A tar member that is not a record: a link, directory, device or dot-named member."""

    kind: str  # symlink | hardlink | directory | hidden | other
    source: str


class Untrusted(NamedTuple):
    """The shard's gzip stream failed its integrity check: every Record the reader yielded
    from it is to be discarded as a failure (the reader yields this last)."""

    shard: str
    reason: str


class Inputs(NamedTuple):
    """What `--input` globs expand to: the shards, and the files skipped, by reason."""

    shards: list[Shard]
    skipped: dict[str, list[str]]  # SKIP_HIDDEN | SKIP_NON_IMAGE -> paths


class RecordTooLarge(Exception):
    """A record above --max_record_bytes (error_type of its failure row)."""


class BrokenShard(Exception):
    """The framing of a shard broke: the rest of it cannot be read."""


class CorruptShard(Exception):
    """A record read from a gzip stream that fails its integrity check."""


class MetadataColumn(NamedTuple):
    name: str
    type: str


def parse_metadata_columns(values: list[str] | None) -> list[MetadataColumn]:
    """`--metadata a,b:int64 --metadata c:float64` -> columns; validates names and types."""
    columns = []
    for value in values or []:
        for item in filter(None, (v.strip() for v in value.split(","))):
            name, _, typ = item.partition(":")
            typ = typ or "string"
            if typ not in S.METADATA_TYPES:
                raise ConfigError(f"--metadata {item!r}: type {typ!r} is not one of {list(S.METADATA_TYPES)}")
            if name in S.FIXED_COLUMNS:
                raise ConfigError(
                    f"--metadata {item!r}: {name!r} is a fixed column "
                    f"({', '.join(S.FIXED_COLUMNS)}); passthrough columns need other names"
                )
            columns.append(MetadataColumn(name, typ))
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ConfigError(f"--metadata names a column twice: {names}")
    return columns


def detect_format(path: str) -> str | None:
    name = posixpath.basename(path).lower()
    if any(marker in name for marker in TFRECORD_MARKERS):
        return "tfrecord"
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(IMAGE_EXTENSIONS):
        return "images"
    return None


def fixed_prefix(glob: str) -> str:
    """The directory part of a glob before its first wildcard, with a trailing slash."""
    cut = min((glob.find(c) for c in _WILDCARDS if c in glob), default=len(glob))
    head = glob[:cut]
    return head[: head.rfind("/") + 1] if "/" in head else ""


def is_hidden(path: str, prefix: str, pattern: str) -> bool:
    """Whether a file or directory below the glob's fixed prefix has a dot-name (.DS_Store,
    ._photo.jpg, .git/...) that the glob did not spell out itself (`dir/.*.jpg` asks for
    them)."""
    rel = path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)
    spelt = [c for c in pattern[len(prefix) :].split("/") if c.startswith(".")]
    return any(
        part.startswith(".")
        and part not in (".", "..")
        and not any(fnmatch.fnmatchcase(part, c) for c in spelt)
        for part in rel.split("/")
    )


def _input_kind(path: str, fmt: str) -> str | None:
    """The shard format of a file, or None when it is not an input (a non-image file)."""
    if fmt == "auto":
        return detect_format(path)
    if fmt == "images" and not posixpath.basename(path).lower().endswith(IMAGE_EXTENSIONS):
        return None
    return fmt


def expand_inputs(globs: list[str], fmt: str = "auto") -> Inputs:
    """Matches every glob (a directory means everything below it); validates before any work.

    Files are taken by extension (case-insensitive): with --format auto, TFRecord and tar
    shards by name and images by their extensions; with --format images, images only; with
    --format tfrecord|webdataset, every file.  Dot-named files and directories, and files that
    are no input by their extension, are skipped and returned counted; a glob matching only
    skipped files is an error."""
    if not globs:
        raise ConfigError("no --input given; pass one or more globs, e.g. --input 'shards/*.tfrecord'")
    shards: list[Shard] = []
    skipped: dict[str, list[str]] = {SKIP_HIDDEN: [], SKIP_NON_IMAGE: []}
    seen: set[str] = set()
    for glob in globs:
        pattern = glob
        if not any(c in glob for c in _WILDCARDS) and FileSystems.exists(glob) and _is_dir(glob):
            pattern = glob.rstrip("/") + "/**"
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:
            raise ConfigError(f"--input {glob!r} cannot be listed: {exc}") from exc
        files = sorted((m.path, m.size_in_bytes) for m in matched if not m.path.endswith("/"))
        if not files:
            raise ConfigError(f"--input {glob!r} matches no files")
        prefix = fixed_prefix(pattern)
        taken, left_out = 0, {SKIP_HIDDEN: [], SKIP_NON_IMAGE: []}
        for path, size in files:
            if path in seen:
                continue
            seen.add(path)
            kind = _input_kind(path, fmt)
            if is_hidden(path, prefix, pattern):
                left_out[SKIP_HIDDEN].append(path)
            elif kind is None:
                left_out[SKIP_NON_IMAGE].append(path)
            else:
                shards.append(Shard(path, kind, prefix, size))
                taken += 1
        for reason, paths in left_out.items():
            skipped[reason] += paths
        if not taken and any(left_out.values()):
            raise ConfigError(
                f"--input {glob!r} matches only files that are skipped: {_describe(left_out, fmt)}"
            )
    return Inputs(shards, {reason: paths for reason, paths in skipped.items() if paths})


def _describe(left_out: dict[str, list[str]], fmt: str) -> str:
    parts = []
    for reason, paths in left_out.items():
        if paths:
            names = ", ".join(posixpath.basename(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
            what = "dot-named (hidden)" if reason == SKIP_HIDDEN else "not images by their extension"
            parts.append(f"{len(paths)} {what} ({names})")
    known = f"image extensions {', '.join(IMAGE_EXTENSIONS)}"
    if fmt == "auto":
        known = f"*{'*, *'.join(TFRECORD_MARKERS)}*, *{', *'.join(TAR_SUFFIXES)}, {known}"
    return (
        f"{'; '.join(parts)}. Inputs are taken by extension ({known}); "
        "pass --format tfrecord|webdataset for shards named otherwise, or narrow the glob"
    )


def _is_dir(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    return path.endswith("/")


class ReaderConfig(NamedTuple):
    image_key: str = "image/encoded"
    id_key: str | None = None
    metadata: tuple = ()  # MetadataColumn
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


def read_shard(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure | Skipped | Untrusted]:
    """Yields Records, Failures (rows of the failures table) for what cannot be read,
    Skipped for tar members that are no records, and last, for a gzip shard that fails its
    integrity check, Untrusted (see the module docstring)."""
    # Imported here: the readers import this module's types.
    from pipelines.read_tfrecord import read_tfrecord
    from pipelines.read_webdataset import read_webdataset

    readers = {"tfrecord": read_tfrecord, "webdataset": read_webdataset, "images": read_image_file}
    try:
        yield from readers[shard.format](shard, config)
    except Exception as exc:  # could not even open the shard
        yield S.Failure.of(shard.path, "read", exc)


def too_large(size: int, config: ReaderConfig) -> str:
    return f"{size} bytes, above --max_record_bytes={config.max_record_bytes} (not read)"


def read_image_file(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure]:
    rel = shard.path[len(shard.prefix) :] if shard.path.startswith(shard.prefix) else shard.path
    limit = config.max_record_bytes
    if shard.size is not None and shard.size > limit:
        yield S.Failure.of(
            shard.path, "read", RecordTooLarge(f"image file is {too_large(shard.size, config)}"), id=rel
        )
        return
    with FileSystems.open(shard.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read(limit + 1)  # the file may have grown since it was listed
    if len(data) > limit:
        message = f"image file is more than {limit} bytes, above --max_record_bytes (not read)"
        yield S.Failure.of(shard.path, "read", RecordTooLarge(message), id=rel)
        return
    yield Record(rel, shard.path, data, {})


def as_text(value: bytes | str | float) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def convert_value(value: bytes | str | float | None, typ: str) -> str | int | float | bool | None:
    """A passthrough value as its column type; None stays None (a null)."""
    if value is None:
        return None
    if typ == "string":
        return as_text(value)
    if typ == "int64":
        return int(as_text(value).strip()) if isinstance(value, (bytes, str)) else int(value)
    if typ == "float64":
        return float(as_text(value).strip()) if isinstance(value, (bytes, str)) else float(value)
    text = as_text(value).strip().lower()
    return text in ("1", "true", "yes") if isinstance(value, (bytes, str)) else bool(value)
