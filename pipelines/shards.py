"""Input shards: glob expansion, format detection and the three readers.

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
- A gzip-compressed shard (`.tfrecord.gz`, `.tar.gz`) is inflated here and its gzip CRC-32
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
import gzip
import io
import json
import os
import posixpath
import struct
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING, NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from retrieval import schema as S
from retrieval.errors import ConfigError

if TYPE_CHECKING:  # TensorFlow is imported only when a TFRecord shard is read
    from tensorflow.core.example import feature_pb2

TFRECORD_MARKERS = (".tfrecord", ".tfrec")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# WebDataset members that can hold the image, in order of preference.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_WILDCARDS = "*?["
# TFRecord features tried for the id, in order, when --id_key is not given.
DEFAULT_ID_KEYS = ("image/key", "image/id", "image/source_id", "image/filename")
# 64 MiB: a 100-megapixel camera JPEG is 20-50 MB and even an uncompressed 24-bit TIFF at
# the default --max_pixels fits 300 MB; a record above the limit is a failure, never read.
DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024
# Pax and GNU long-name headers are read whole by tarfile; real ones are a few KB.
MAX_TAR_HEADER_BYTES = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1024 * 1024
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


class ChecksumError(Exception):
    """A TFRecord record whose data fails its CRC32C."""


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
    readers = {"tfrecord": _read_tfrecord, "webdataset": _read_webdataset, "images": _read_image_file}
    try:
        yield from readers[shard.format](shard, config)
    except Exception as exc:  # could not even open the shard
        yield S.Failure.of(shard.path, "read", exc)


def _too_large(size: int, config: ReaderConfig) -> str:
    return f"{size} bytes, above --max_record_bytes={config.max_record_bytes} (not read)"


def _read_image_file(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure]:
    rel = shard.path[len(shard.prefix) :] if shard.path.startswith(shard.prefix) else shard.path
    limit = config.max_record_bytes
    if shard.size is not None and shard.size > limit:
        yield S.Failure.of(
            shard.path, "read", RecordTooLarge(f"image file is {_too_large(shard.size, config)}"), id=rel
        )
        return
    with FileSystems.open(shard.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read(limit + 1)  # the file may have grown since it was listed
    if len(data) > limit:
        message = f"image file is more than {limit} bytes, above --max_record_bytes (not read)"
        yield S.Failure.of(shard.path, "read", RecordTooLarge(message), id=rel)
        return
    yield Record(rel, shard.path, data, {})


class _Stream:
    """A read-only byte stream that counts the bytes read through it and keeps the error that
    stopped it.

    `gzip_stream=True` inflates a gzip file (every member of a multi-member one) and checks
    each member's CRC-32 and length, as Python's `gzip` module does when it reaches a member's
    end: `gzip.BadGzipFile` or `zlib.error` then mean corrupt data, `EOFError` a truncated
    stream.
    """

    def __init__(self, raw: IO[bytes], *, gzip_stream: bool = False, size: int | None = None) -> None:
        self._raw = raw
        self._stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gzip_stream else raw
        self.gzip = gzip_stream
        self.size = None if gzip_stream else size  # known for a plain file: skipping is a seek
        self._raw_size = size
        self.count = 0
        self.ended = False
        self.error: BaseException | None = None  # what stopped the stream before its end

    def read(self, n: int = -1) -> bytes:
        if self.ended:
            return b""
        try:
            data = self._stream.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            self.ended, self.error = True, exc
            raise
        if not data and n != 0:
            self.ended = True
        self.count += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        """n bytes, or fewer at the end of the stream."""
        parts, want = [], n
        while want > 0:
            data = self.read(min(want, _CHUNK))
            if not data:
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Skips n bytes without keeping them; returns how many there were (fewer at the end)."""
        if self.size is not None:
            target = min(self.count + n, self.size)
            self._raw.seek(target)
            skipped, self.count = target - self.count, target
            return skipped
        done = 0
        while done < n:
            data = self.read(min(_CHUNK, n - done))
            if not data:
                break
            done += len(data)
        return done

    def raw_consumed(self) -> bool:
        """Whether every byte of the underlying file has been read (False when unknown)."""
        try:
            return self._raw_size is not None and self._raw.tell() >= self._raw_size
        except (OSError, ValueError):
            return False

    def drain(self) -> None:
        """Reads to the end (or to the error that stops the stream), keeping nothing."""
        if self.size is not None and not self.ended:
            self.count, self.ended = max(self.count, self.size), True
            return
        try:
            while self.read(_CHUNK):
                pass
        except (OSError, EOFError, zlib.error):
            pass  # kept in self.error


def _open_stream(path: str, *, gzip_stream: bool | None) -> tuple[IO[bytes], _Stream]:
    """(raw file, stream over it).  gzip_stream None: gzip when the file starts with gzip's
    magic bytes."""
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    size = None
    try:
        if raw.seekable():
            size = raw.seek(0, io.SEEK_END)
            raw.seek(0)
    except (OSError, ValueError):
        size = None
    if gzip_stream is None:
        head = raw.read(len(_GZIP_MAGIC))
        gzip_stream = head == _GZIP_MAGIC
        if size is not None:
            raw.seek(0)
        else:  # not seekable: give the peeked bytes back
            raw = _Prefixed(head, raw)
    return raw, _Stream(raw, gzip_stream=gzip_stream, size=size)


class _Prefixed(io.RawIOBase):
    """`head` then the rest of `raw` (a stream that cannot seek back)."""

    def __init__(self, head: bytes, raw: IO[bytes]) -> None:
        super().__init__()
        self._head, self._raw = head, raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data if len(data) == n else data + self._raw.read(n - len(data))
        return self._raw.read(n)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _is_corrupt(exc: BaseException) -> bool:
    """A gzip integrity failure (CRC, length, invalid data), not a truncation, and not bytes
    after the last gzip member that are no gzip member (what came before them was checked)."""
    if isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file"):
        return False
    return isinstance(exc, (gzip.BadGzipFile, zlib.error)) or (
        isinstance(exc, tarfile.ReadError) and str(exc).startswith("zlib error")
    )


def _lost(stream: _Stream, start: int) -> str:
    """How many bytes from `start` to the end of the stream were lost (reads the rest)."""
    stream.drain()
    what = "inflated " if stream.gzip else ""
    if stream.error is None:
        return f"{stream.count - start} {what}bytes from byte {start} to the end of the shard are lost"
    return (
        f"at least {stream.count - start} {what}bytes from byte {start} on are lost (the rest cannot be "
        f"read: {_error_text(stream.error)})"
    )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _integrity(shard: Shard, stream: _Stream) -> Iterator[Untrusted]:
    """Untrusted when a gzip stream fails its check; reads the stream to its end to check it."""
    if not stream.gzip:
        return
    stream.drain()
    if stream.error is not None and _is_corrupt(stream.error):
        yield Untrusted(shard.path, _error_text(stream.error))


def _read_tfrecord(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure | Untrusted]:
    from apache_beam.io.tfrecordio import _TFRecordUtil
    from tensorflow.core.example import example_pb2

    def crc_ok(data: bytes, crc: bytes) -> bool:
        return _TFRecordUtil._masked_crc32c(data) == struct.unpack("<I", crc)[0]

    # .gz shards are inflated here (gzip checked); other compressions by Beam's AUTO detection.
    compression = CompressionTypes.detect_compression_type(shard.path)
    if compression in (CompressionTypes.GZIP, CompressionTypes.UNCOMPRESSED):
        raw, stream = _open_stream(shard.path, gzip_stream=compression == CompressionTypes.GZIP)
    else:
        raw = FileSystems.open(shard.path)
        stream = _Stream(raw)
    with raw:
        index = 0
        while True:
            source, start = f"{shard.path}#{index}", stream.count
            try:
                header = stream.read_exact(12)
                if not header:
                    break
                if len(header) < 12:
                    raise BrokenShard(f"the shard ends inside the header of record {index}")
                if not crc_ok(header[:8], header[8:]):
                    raise BrokenShard(f"the length of record {index} fails its CRC")
                (length,) = struct.unpack("<Q", header[:8])
                if length > config.max_record_bytes:
                    skipped = stream.skip(length + 4)
                    message = f"record {index} is {_too_large(length, config)}"
                    if skipped < length + 4:
                        message += f"; the shard ends {skipped} bytes into it"
                    yield S.Failure.of(source, "read", RecordTooLarge(message))
                    index += 1
                    if skipped < length + 4:
                        break
                    continue
                raw_record, crc = stream.read_exact(length), stream.read_exact(4)
                if len(crc) < 4:
                    raise BrokenShard(
                        f"the shard ends {len(raw_record) + len(crc)} bytes into record {index} "
                        f"(of {length + 4} declared)"
                    )
            except (BrokenShard, OSError, EOFError, zlib.error) as exc:
                if stream.count == start and _is_corrupt(exc) and stream.raw_consumed():
                    break  # the gzip check failed at the very end, between records: Untrusted
                reason = str(exc) if isinstance(exc, BrokenShard) else _error_text(exc)
                yield S.Failure.of(
                    source,
                    "read",
                    BrokenShard(
                        f"TFRecord framing broken at record {index} ({reason}); the rest of the shard "
                        f"cannot be read: {_lost(stream, start)}"
                    ),
                )
                break
            index += 1
            if not crc_ok(raw_record, crc):
                yield S.Failure.of(
                    source, "read", ChecksumError(f"record {index - 1} fails its CRC32C (damaged bytes)")
                )
                continue
            try:
                features = example_pb2.Example.FromString(raw_record).features.feature
            except Exception as exc:
                yield S.Failure.of(source, "read", f"record is not a tf.train.Example: {exc}")
                continue
            yield _example_record(features, source, config)
        yield from _integrity(shard, stream)


def _feature_values(feature: feature_pb2.Feature) -> list:
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def _as_text(value: bytes | str | float) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _example_record(
    features: Mapping[str, feature_pb2.Feature], source: str, config: ReaderConfig
) -> Record | S.Failure:
    if config.image_key not in features or not _feature_values(features[config.image_key]):
        return S.Failure.of(
            source,
            "read",
            f"no {config.image_key!r} bytes feature in the example "
            f"(features: {sorted(features)[:10]}); set --image_key",
        )
    data = _feature_values(features[config.image_key])[0]
    record_id = None
    for key in [config.id_key] if config.id_key else DEFAULT_ID_KEYS:
        values = _feature_values(features[key]) if key in features else []
        if values and _as_text(values[0]):
            record_id = _as_text(values[0])
            break
    if record_id is None and config.id_key:
        return S.Failure.of(source, "read", f"no {config.id_key!r} feature (--id_key) in the example")
    try:
        metadata = {c.name: _convert(_first(features, c.name), c.type) for c in config.metadata}
    except (ValueError, TypeError) as exc:
        return S.Failure.of(source, "read", f"metadata column: {exc}", id=record_id)
    return Record(record_id or source, source, data, metadata)


def _first(features: Mapping[str, feature_pb2.Feature], name: str) -> bytes | float | None:
    values = _feature_values(features[name]) if name in features else []
    return values[0] if values else None


def _convert(value: bytes | str | float | None, typ: str) -> str | int | float | bool | None:
    """A passthrough value as its column type; None stays None (a null)."""
    if value is None:
        return None
    if typ == "string":
        return _as_text(value)
    if typ == "int64":
        return int(_as_text(value).strip()) if isinstance(value, (bytes, str)) else int(value)
    if typ == "float64":
        return float(_as_text(value).strip()) if isinstance(value, (bytes, str)) else float(value)
    text = _as_text(value).strip().lower()
    return text in ("1", "true", "yes") if isinstance(value, (bytes, str)) else bool(value)


def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower() if dot else ""


class _HeaderLimit(tarfile.TarInfo):
    """A TarInfo that records on the TarFile why its last header could not be read (tarfile
    ends the archive silently on a truncated or garbage header after the first member), and
    refuses pax and GNU long-name headers above MAX_TAR_HEADER_BYTES (tarfile reads them
    whole into memory)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.imgindex_header_error = exc  # type: ignore[attr-defined]
            raise

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
        if self.type in extended and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.ReadError(
                f"an extended (pax or GNU long-name) header of {self.size} bytes, above the "
                f"{MAX_TAR_HEADER_BYTES} bytes imgindex reads"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isdir():
        return "directory"
    return "other"


class _Sample:
    """The members of one WebDataset sample read so far."""

    def __init__(self, key: str, start: int, first: str) -> None:
        self.key, self.start, self.first = key, start, first
        self.members: dict[str, bytes] = {}
        self.too_large: dict[str, int] = {}
        self.twice: list[str] = []
        self.skipped: list[str] = []  # names of its members that are no regular files

    def names(self) -> str:
        exts = sorted({*self.members, *self.too_large})
        return ", ".join("." + e for e in exts) or "none"


_HEADER_ENDS = {
    tarfile.EmptyHeaderError: "the shard ends without the tar end-of-archive marker (cut?)",
    tarfile.TruncatedHeaderError: "the shard ends inside a member header",
}


def _read_webdataset(
    shard: Shard, config: ReaderConfig
) -> Iterator[Record | S.Failure | Skipped | Untrusted]:
    raw, stream = _open_stream(shard.path, gzip_stream=None)
    with raw:
        tar: tarfile.TarFile | None = None
        sample: _Sample | None = None
        last = None  # the last sample yielded
        pending: tuple[str | None, list[str]] = (None, [])  # skipped members named for a later sample
        broken: str | None = None
        try:
            # gzip is inflated (and checked) by `stream`; tarfile detects bzip2 and xz itself.
            tar = tarfile.open(fileobj=stream, mode="r|" if stream.gzip else "r|*", tarinfo=_HeaderLimit)
            for member in tar:
                base = posixpath.basename(member.name)
                if not member.isfile() or base.startswith("."):
                    kind = "hidden" if member.isfile() else _member_kind(member)
                    note = f"{base} ({kind})"
                    skipped_key = _wds_split(member.name)[0]
                    if sample is not None and skipped_key == sample.key:
                        sample.skipped.append(note)
                    else:  # named for a sample that may come next
                        pending = pending if pending[0] == skipped_key else (skipped_key, [])
                        pending[1].append(note)
                    yield Skipped(kind, f"{shard.path}#{member.name}")
                    continue
                key, ext = _wds_split(member.name)
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield _wds_record(shard.path, sample, config)
                        last = sample
                    sample = _Sample(key, member.offset, member.name)
                    if pending[0] == key:
                        sample.skipped += pending[1]
                    pending = (None, [])
                if ext in sample.members or ext in sample.too_large:
                    sample.twice.append(ext)
                if member.size > config.max_record_bytes:
                    sample.too_large[ext] = member.size  # tarfile skips its data
                    continue
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                sample.members[ext] = data
        except Exception as exc:  # tarfile raises more than TarError on hostile headers
            broken = _error_text(exc)
        else:
            header_error = getattr(tar, "imgindex_header_error", None) if tar is not None else None
            if header_error is not None and not isinstance(header_error, tarfile.EOFHeaderError):
                broken = _HEADER_ENDS.get(
                    type(header_error), f"{type(header_error).__name__}: {header_error}"
                )
        if broken is None:
            if sample is not None:
                yield _wds_record(shard.path, sample, config)
        else:
            start = sample.start if sample is not None else tar.offset if tar is not None else 0
            lost = _lost(stream, start)
            inner = getattr(tar.fileobj, "comptype", "tar") if tar is not None else "tar"
            if inner != "tar":  # offsets are in the inflated stream, `stream` counts the file's bytes
                lost = f"the rest of the {inner}-compressed shard, from inflated byte {start} on, is lost"
            if sample is not None:
                where = sample.first
                lost_sample = f", with sample {sample.key!r} (members read: {sample.names()})"
            else:
                where = f"after {last.key}" if last is not None else "at the start"
                lost_sample = ""
            yield S.Failure.of(
                f"{shard.path}#{where}",
                "read",
                BrokenShard(
                    f"tar shard broken ({broken}); the rest of the shard cannot be read: {lost}{lost_sample}"
                ),
            )
        yield from _integrity(shard, stream)


def _wds_record(path: str, sample: _Sample, config: ReaderConfig) -> Record | S.Failure:
    key, members = sample.key, sample.members
    image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members or e in sample.too_large), None)
    source = f"{path}#{key}.{image_ext}" if image_ext else f"{path}#{key}"
    if sample.too_large:
        ext, size = next(iter(sample.too_large.items()))
        return S.Failure.of(
            source, "read", RecordTooLarge(f"member {key}.{ext} is {_too_large(size, config)}"), id=key
        )
    if sample.twice:
        return S.Failure.of(
            source,
            "read",
            f"sample {key!r} has more than one .{sample.twice[0]} member: which one is meant is unclear",
            id=key,
        )
    if image_ext is None:
        skipped = f"; skipped: {', '.join(sample.skipped)}" if sample.skipped else ""
        return S.Failure.of(
            source,
            "read",
            f"sample {key!r} has no image member "
            f"(members: {sample.names()}{skipped}; "
            f"expected one of {', '.join('.' + e for e in WDS_IMAGE_EXTENSIONS)})",
            id=key,
        )
    try:
        metadata = {c.name: _sidecar_value(members.get(c.name), c) for c in config.metadata}
    except (ValueError, TypeError) as exc:
        return S.Failure.of(source, "read", f"metadata sidecar: {exc}", id=key)
    return Record(key, source, members[image_ext], metadata)


def _sidecar_value(raw: bytes | None, column: MetadataColumn) -> str | int | float | bool | None:
    if raw is not None and column.name == "json" and column.type == "string":
        # Normalised JSON text, so equal objects compare equal in the table.
        return json.dumps(json.loads(raw), sort_keys=True)
    return _convert(raw, column.type)
