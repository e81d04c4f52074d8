"""Input shards: glob expansion, format detection and the three readers.

Every reader yields `Record`s, or `Failure`s for what it cannot read; a shard whose framing
breaks part-way (truncated TFRecord, corrupt tar) yields the records before the break and one
failure row for the unreadable rest.  Paths go through Beam's `FileSystems`, so any scheme
Beam knows (gs://, s3://, ...) works when its extra is installed.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from retrieval import schema as S
from retrieval.errors import ConfigError

if TYPE_CHECKING:  # TensorFlow is imported only when a TFRecord shard is read
    from tensorflow.core.example import feature_pb2

TFRECORD_MARKERS = (".tfrecord", ".tfrec")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# WebDataset members that can hold the image, in order of preference.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_WILDCARDS = "*?["
# TFRecord features tried for the id, in order, when --id_key is not given.
DEFAULT_ID_KEYS = ("image/key", "image/id", "image/source_id", "image/filename")


class Shard(NamedTuple):
    path: str
    format: str  # tfrecord | webdataset | images
    prefix: str  # the glob's fixed directory prefix, for relative ids of plain images


class Record(NamedTuple):
    id: str
    source: str
    data: bytes
    metadata: dict


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


def expand_inputs(globs: list[str], fmt: str = "auto") -> list[Shard]:
    """Matches every glob (a directory means everything below it); validates before any work."""
    if not globs:
        raise ConfigError("no --input given; pass one or more globs, e.g. --input 'shards/*.tfrecord'")
    shards, seen = [], set()
    for glob in globs:
        pattern = glob
        if not any(c in glob for c in _WILDCARDS) and FileSystems.exists(glob) and _is_dir(glob):
            pattern = glob.rstrip("/") + "/**"
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:
            raise ConfigError(f"--input {glob!r} cannot be listed: {exc}") from exc
        files = sorted(m.path for m in matched if not m.path.endswith("/"))
        if not files:
            raise ConfigError(f"--input {glob!r} matches no files")
        prefix = fixed_prefix(pattern)
        for path in files:
            if path in seen:
                continue
            seen.add(path)
            kind = fmt if fmt != "auto" else detect_format(path)
            if kind is None:
                raise ConfigError(
                    f"cannot tell the format of {path} from its name (known: *{', *'.join(TFRECORD_MARKERS)}*, "
                    f"*{', *'.join(TAR_SUFFIXES)}, image extensions {', '.join(IMAGE_EXTENSIONS)}); "
                    "pass --format tfrecord|webdataset|images or narrow the glob"
                )
            shards.append(Shard(path, kind, prefix))
    return shards


def _is_dir(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    return path.endswith("/")


class ReaderConfig(NamedTuple):
    image_key: str = "image/encoded"
    id_key: str | None = None
    metadata: tuple = ()  # MetadataColumn


def read_shard(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure]:
    """Yields Records, and Failures (rows of the failures table) for what cannot be read."""
    readers = {"tfrecord": _read_tfrecord, "webdataset": _read_webdataset, "images": _read_image_file}
    try:
        yield from readers[shard.format](shard, config)
    except Exception as exc:  # could not even open the shard
        yield S.Failure.of(shard.path, "read", exc)


def _read_image_file(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure]:
    with FileSystems.open(shard.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read()
    rel = shard.path[len(shard.prefix) :] if shard.path.startswith(shard.prefix) else shard.path
    yield Record(rel, shard.path, data, {})


def _read_tfrecord(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure]:
    from apache_beam.io.tfrecordio import _TFRecordUtil
    from tensorflow.core.example import example_pb2

    with FileSystems.open(shard.path) as f:  # AUTO compression: .gz shards are inflated
        index = 0
        while True:
            source = f"{shard.path}#{index}"
            try:
                raw = _TFRecordUtil.read_record(f)
            except Exception as exc:
                yield S.Failure.of(
                    source,
                    "read",
                    f"TFRecord framing broken at record {index} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); the rest of the shard "
                    "cannot be read",
                )
                return
            if raw is None:
                return
            index += 1
            try:
                features = example_pb2.Example.FromString(raw).features.feature
            except Exception as exc:
                yield S.Failure.of(source, "read", f"record is not a tf.train.Example: {exc}")
                continue
            yield _example_record(features, source, config)


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


def _read_webdataset(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure]:
    with FileSystems.open(shard.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        group_key, members, last = None, {}, None
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _wds_split(member.name)
                    if key != group_key:
                        if group_key is not None:
                            yield _wds_record(shard.path, group_key, members, config)
                        group_key, members = key, {}
                    members[ext] = tar.extractfile(member).read()
                    last = member.name
        except (tarfile.TarError, OSError, EOFError) as exc:
            if group_key is not None:
                yield _wds_record(shard.path, group_key, members, config)
            where = f"after member {last}" if last else "at the start"
            yield S.Failure.of(
                f"{shard.path}#{where}",
                "read",
                f"tar shard broken {where} ({type(exc).__name__}: {exc}); the rest of "
                "the shard cannot be read",
            )
            return
        if group_key is not None:
            yield _wds_record(shard.path, group_key, members, config)


def _wds_record(path: str, key: str, members: dict, config: ReaderConfig) -> Record | S.Failure:
    image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members), None)
    source = f"{path}#{key}.{image_ext}" if image_ext else f"{path}#{key}"
    if image_ext is None:
        return S.Failure.of(
            source,
            "read",
            f"sample {key!r} has no image member "
            f"(members: {', '.join('.' + e for e in sorted(members))}; "
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
