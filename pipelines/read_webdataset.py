"""The WebDataset reader: a tar shard (plain, gzip, bzip2 or xz) read member by member and
grouped into samples by key, each sample a `Record` of its image member and metadata sidecars.

A member above `--max_record_bytes` (by its header's size) makes its sample a failure and is
skipped unread.  A tar cut mid-member or with a garbage header yields the samples before the
break and one failure row for the unreadable rest, the sample being read at the break with
it.  Members that are not regular files (links, directories, devices) and dot-named members
are not records: the reader yields a `Skipped` for each, which the run report counts.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

from pipelines.shard_stream import error_text, integrity, lost_text, open_stream
from pipelines.shards import (
    BrokenShard,
    MetadataColumn,
    ReaderConfig,
    Record,
    RecordTooLarge,
    Shard,
    Skipped,
    Untrusted,
    convert_value,
    too_large,
)
from retrieval import schema as S

# WebDataset members that can hold the image, in order of preference.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Pax and GNU long-name headers are read whole by tarfile; real ones are a few KB.
MAX_TAR_HEADER_BYTES = 1024 * 1024


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


def read_webdataset(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure | Skipped | Untrusted]:
    raw, stream = open_stream(shard.path, gzip_stream=None)
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
            broken = error_text(exc)
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
            lost = lost_text(stream, start)
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
        yield from integrity(shard, stream)


def _wds_record(path: str, sample: _Sample, config: ReaderConfig) -> Record | S.Failure:
    key, members = sample.key, sample.members
    image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members or e in sample.too_large), None)
    source = f"{path}#{key}.{image_ext}" if image_ext else f"{path}#{key}"
    if sample.too_large:
        ext, size = next(iter(sample.too_large.items()))
        return S.Failure.of(
            source, "read", RecordTooLarge(f"member {key}.{ext} is {too_large(size, config)}"), id=key
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
    return convert_value(raw, column.type)
