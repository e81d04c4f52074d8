"""The TFRecord reader: framing and CRC32C checked record by record, `tf.train.Example`
features to `Record`s.

A record above `--max_record_bytes` (by its length prefix) is a failure and is skipped unread;
a record whose data fails its CRC32C is a failure and the next record is read; a framing break
(a truncated shard, a length that fails its CRC) yields one failure row for the unreadable
rest.  `.tfrecord.gz` shards are inflated and checked by `pipelines.shard_stream`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.shard_stream import Stream, error_text, integrity, is_corrupt, lost_text, open_stream
from pipelines.shards import (
    DEFAULT_ID_KEYS,
    BrokenShard,
    ReaderConfig,
    Record,
    RecordTooLarge,
    Shard,
    Untrusted,
    as_text,
    convert_value,
    too_large,
)
from retrieval import schema as S

if TYPE_CHECKING:  # TensorFlow is imported only when a TFRecord shard is read
    from tensorflow.core.example import feature_pb2


class ChecksumError(Exception):
    """A TFRecord record whose data fails its CRC32C."""


def read_tfrecord(shard: Shard, config: ReaderConfig) -> Iterator[Record | S.Failure | Untrusted]:
    from apache_beam.io.tfrecordio import _TFRecordUtil
    from tensorflow.core.example import example_pb2

    def crc_ok(data: bytes, crc: bytes) -> bool:
        return _TFRecordUtil._masked_crc32c(data) == struct.unpack("<I", crc)[0]

    # .gz shards are inflated here (gzip checked); other compressions by Beam's AUTO detection.
    compression = CompressionTypes.detect_compression_type(shard.path)
    if compression in (CompressionTypes.GZIP, CompressionTypes.UNCOMPRESSED):
        raw, stream = open_stream(shard.path, gzip_stream=compression == CompressionTypes.GZIP)
    else:
        raw = FileSystems.open(shard.path)
        stream = Stream(raw)
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
                    message = f"record {index} is {too_large(length, config)}"
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
                if stream.count == start and is_corrupt(exc) and stream.raw_consumed():
                    break  # the gzip check failed at the very end, between records: Untrusted
                reason = str(exc) if isinstance(exc, BrokenShard) else error_text(exc)
                yield S.Failure.of(
                    source,
                    "read",
                    BrokenShard(
                        f"TFRecord framing broken at record {index} ({reason}); the rest of the shard "
                        f"cannot be read: {lost_text(stream, start)}"
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
        yield from integrity(shard, stream)


def _feature_values(feature: feature_pb2.Feature) -> list:
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


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
        if values and as_text(values[0]):
            record_id = as_text(values[0])
            break
    if record_id is None and config.id_key:
        return S.Failure.of(source, "read", f"no {config.id_key!r} feature (--id_key) in the example")
    try:
        metadata = {c.name: convert_value(_first(features, c.name), c.type) for c in config.metadata}
    except (ValueError, TypeError) as exc:
        return S.Failure.of(source, "read", f"metadata column: {exc}", id=record_id)
    return Record(record_id or source, source, data, metadata)


def _first(features: Mapping[str, feature_pb2.Feature], name: str) -> bytes | float | None:
    values = _feature_values(features[name]) if name in features else []
    return values[0] if values else None
