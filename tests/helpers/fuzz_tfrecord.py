"""The TFRecord shards of the fuzz corpus (`tests.helpers.fuzz`): hostile records, a shard
cut mid-record, one whose length fails its CRC, gzip ones (good, wrong CRC-32, truncated),
and a shard of duplicate ids.
"""

from __future__ import annotations

import gzip
import io

from tests.helpers import images
from tests.helpers.fuzz_records import (
    EMBED,
    FAIL,
    MAX_RECORD_BYTES,
    Builder,
    Expect,
    bad_crc,
    mark_corrupt,
    mark_lost,
    mark_tail,
    write_file,
)


def _example(features: dict) -> bytes:
    from tensorflow.core.example import example_pb2, feature_pb2

    example = example_pb2.Example()
    for key, value in features.items():
        feature = example.features.feature[key]
        if isinstance(value, bytes):
            feature.bytes_list.value.append(value)
        elif isinstance(value, int):
            feature.int64_list.value.append(value)
        else:
            assert isinstance(feature, feature_pb2.Feature)
    return example.SerializeToString()


def _frame(payload: bytes) -> bytes:
    from apache_beam.io.tfrecordio import _TFRecordUtil

    buf = io.BytesIO()
    _TFRecordUtil.write_record(buf, payload)
    return buf.getvalue()


def _tfrecords(b: Builder, path: str, n: int, *, hostile: bool = True) -> list[tuple[bytes, Expect]]:
    """n framed records of shard `path` with their expectations (not yet written)."""
    out = []
    for index in range(n):
        source = f"{path}#{index}"
        pick = b.rng.random() if hostile else 0.0
        if pick < 0.80:
            data, outcome, error = b.payload() if hostile else (b.good(), EMBED, None)
            key = b.uid(str(b.rng.choice(["tf-", "tf/ünï-", "tf\nnl-", "tf 🙂 "] if hostile else ["tf-"])))
            expect = b.expect(source, key, outcome, path, error)
            out.append((_frame(_example({"image/encoded": data, "image/key": key.encode()})), expect))
        elif pick < 0.85:  # not a tf.train.Example
            payload = images.random_bytes(64, int(b.rng.integers(1 << 30)))
            out.append((_frame(payload), b.expect(source, None, FAIL, path, None, "read")))
        elif pick < 0.90:  # no image feature
            key = b.uid("tf-noimage-")
            expect = b.expect(source, key, FAIL, path, "Invalid", "read")
            out.append((_frame(_example({"image/format": b"jpeg", "image/key": key.encode()})), expect))
        elif pick < 0.95:  # data fails its CRC32C
            framed = bytearray(
                _frame(_example({"image/encoded": b.good(), "image/key": b.uid("tf-crc-").encode()}))
            )
            framed[20] ^= 0x40
            out.append((bytes(framed), b.expect(source, None, FAIL, path, "ChecksumError", "read")))
        else:  # above --max_record_bytes: skipped unread
            payload = _example({"image/encoded": images.random_bytes(MAX_RECORD_BYTES + 100, index)})
            out.append((_frame(payload), b.expect(source, None, FAIL, path, "RecordTooLarge", "read")))
    return out


def tfrecord_shards(b: Builder, root: str, scale: int) -> None:
    d = f"{root}/tfr"
    for s in range(4 * scale):
        path = f"{d}/mixed-{s:03d}.tfrecord"
        write_file(path, b"".join(frame for frame, _ in _tfrecords(b, path, 60)))
    # Cut in the middle of record 6: records 0-5 read, one rest row from record 6 on.
    path = f"{d}/cut.tfrecord"
    frames = _tfrecords(b, path, 10, hostile=False)
    data = b"".join(f for f, _ in frames)
    cut = sum(len(f) for f, _ in frames[:6]) + len(frames[6][0]) // 2
    write_file(path, data[:cut])
    mark_lost(b, frames[6:], path)
    # The length of record 4 fails its CRC (garbage from there on): one rest row from record 4.
    path = f"{d}/badlength.tfrecord"
    frames = _tfrecords(b, path, 8, hostile=False)
    data = bytearray(b"".join(f for f, _ in frames))
    data[sum(len(f) for f, _ in frames[:4]) + 2] ^= 0x10
    write_file(path, bytes(data))
    mark_lost(b, frames[4:], path)
    # gzip: a good one, one whose CRC-32 trailer is wrong, one truncated.
    path = f"{d}/good.tfrecord.gz"
    write_file(path, gzip.compress(b"".join(f for f, _ in _tfrecords(b, path, 30))))
    path = f"{d}/crc.tfrecord.gz"
    frames = _tfrecords(b, path, 12, hostile=False)
    write_file(path, bad_crc(gzip.compress(b"".join(f for f, _ in frames))))
    mark_corrupt(b, frames, path)
    path = f"{d}/truncated.tfrecord.gz"
    frames = _tfrecords(b, path, 20, hostile=False)
    data = gzip.compress(b"".join(f for f, _ in frames))
    write_file(path, data[: len(data) // 2])
    mark_tail(b, frames, path)


def duplicates(b: Builder, root: str) -> None:
    """Ids that occur twice: the first in input order is kept, the later is a DuplicateId."""
    path = f"{root}/tfr/zz-duplicates.tfrecord"
    frames = []
    kept = [
        r for r in b.records if r.outcome == EMBED and r.shard.endswith(".tfrecord") and "mixed" in r.shard
    ]
    for index, first in enumerate(kept[:5]):
        source = f"{path}#{index}"
        frames.append(_frame(_example({"image/encoded": b.good(), "image/key": first.id.encode()})))
        b.expect(source, first.id, FAIL, path, "DuplicateId", "read")
    write_file(path, b"".join(frames))
