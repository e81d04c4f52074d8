"""A seeded corpus of hostile input records across TFRecord shards, WebDataset tars and image
folders, generated at test time (nothing binary is committed), with the outcome expected for
every record.

`corpus(root, scale, seed)` writes the inputs under `root` and returns a `Corpus`: the
`--input` globs, one `Expect` per generated record (keyed by the `source` the readers give
it), the shards whose framing breaks (one failure row each for the unreadable rest), and the
files and tar members the run must skip.  `reconcile(corpus, embedded, failures)` checks a
run's tables against it record by record.

Outcomes:
  EMBED            a row in every embedding table
  EMBED_OR_DECODE  a row, or a `decode` failure (bit flips, truncations: either is fine)
  FAIL             a failure row with that stage (and error type, when given)
  LOST             no row of its own: the shard's one "rest" row (BrokenShard) covers it
  CORRUPT          a CorruptShard failure row, or covered by the shard's rest row
  TAIL             kept as `keep` says, or covered by the rest row; the lost ones are a
                   suffix of the shard (a truncated gzip stream: where it breaks depends on
                   the deflate blocks)
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

from tests.helpers import images

EMBED, EMBED_OR_DECODE, FAIL, LOST, CORRUPT, TAIL = "embed", "embed|decode", "fail", "lost", "corrupt", "tail"
BROKEN = "BrokenShard"
MAX_RECORD_BYTES = 1 << 20  # the run's --max_record_bytes: "huge" records are just above it
HUGE_MEMBER_BYTES = 1 << 30  # the zero-filled member of huge.tar.gz


@dataclasses.dataclass
class Expect:
    source: str
    id: str | None
    outcome: str
    shard: str
    stage: str | None = None  # FAIL: the failure's stage
    error_type: str | None = None  # FAIL: its error_type (None: any)
    keep: str | None = None  # TAIL: the outcome when not lost (EMBED, EMBED_OR_DECODE, FAIL)


@dataclasses.dataclass
class Corpus:
    globs: list[str]
    records: list[Expect]
    rest_rows: dict[str, bool]  # shard -> True: exactly one rest row; False: at most one
    skipped_files: dict[str, int]
    skipped_members: dict[str, int]


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.records: list[Expect] = []
        self.rest_rows: dict[str, bool] = {}
        self.skipped_files = {"hidden": 0, "non_image": 0}
        self.skipped_members: dict[str, int] = {}
        self.n = 0

    def uid(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n:05d}"

    # --- payloads: (bytes, outcome, error type) --------------------------------------------

    def good(self) -> bytes:
        w, h = (int(v) for v in self.rng.integers(24, 72, 2))
        fmt = str(self.rng.choice(["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]))
        return images.encode(images.photo(w, h, seed=int(self.rng.integers(1 << 30))), fmt)

    def odd(self) -> bytes:
        """Odd modes, animation, EXIF rotation: all of them decode."""
        photo = images.photo(40, 30, seed=int(self.rng.integers(1 << 30)))
        kind = int(self.rng.integers(12))
        if kind == 0:
            return images.exif_rotated_jpeg(56, 40)
        if kind == 1:
            return images.multiframe_gif()
        if kind == 2:  # animated WebP
            buf = io.BytesIO()
            frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
            frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
            return buf.getvalue()
        if kind == 3:  # APNG
            buf = io.BytesIO()
            photo.save(buf, "PNG", save_all=True, append_images=[photo.rotate(90)])
            return buf.getvalue()
        modes = [("1", "PNG"), ("LA", "PNG"), ("P", "BMP"), ("CMYK", "JPEG"), ("I", "TIFF"), ("F", "TIFF")]
        modes += [("RGBA", "WEBP"), ("LAB", "TIFF")]
        mode, fmt = modes[kind - 4]
        return images.encode(photo.convert(mode), fmt)

    def bomb(self) -> bytes:
        """A small file declaring far more pixels than --max_pixels."""
        kind = int(self.rng.integers(5))
        if kind == 0:
            return images.huge_png(int(self.rng.integers(20_000, 200_000)), 60_000)
        if kind == 1:  # GIF logical screen 65535 x 65535
            data = bytearray(images.encode(images.photo(8, 8).convert("P"), "GIF"))
            data[6:10] = struct.pack("<HH", 65535, 65535)
            return _gif_frame_size(bytes(data), 65535, 65535)
        if kind == 2:  # BMP header 60000 x 60000
            data = bytearray(images.encode(images.photo(8, 8), "BMP"))
            data[18:26] = struct.pack("<ii", 60_000, 60_000)
            return bytes(data)
        if kind == 3:  # JPEG SOF 65000 x 65000
            return _jpeg_with_size(images.jpeg(16, 16), 65000, 65000)
        data = bytearray(images.encode(images.photo(8, 8), "TIFF"))  # TIFF width/length tags
        return _tiff_with_size(bytes(data), 100_000, 100_000)

    def other_format(self) -> bytes:
        photo = images.photo(24, 24, seed=int(self.rng.integers(1 << 30)))
        fmt = str(self.rng.choice(["EPS", "ICO", "PPM", "PCX", "SGI", "TGA", "DDS"]))
        return images.encode(photo, fmt)

    def damaged(self) -> bytes:
        data = bytearray(self.good())
        if self.rng.random() < 0.5:
            return bytes(data[: int(self.rng.integers(16, max(17, len(data) - 1)))])
        for _ in range(int(self.rng.integers(1, 9))):
            position = int(self.rng.integers(16, len(data)))
            data[position] ^= 1 << int(self.rng.integers(8))
        return bytes(data)

    def payload(self) -> tuple[bytes, str, str | None]:
        """Random hostile or good image bytes and what decoding them gives."""
        pick = self.rng.random()
        if pick < 0.30:
            return self.good(), EMBED, None
        if pick < 0.45:
            return self.odd(), EMBED, None
        if pick < 0.55:
            return self.bomb(), FAIL, "ImageDecodeError"
        if pick < 0.62:
            return self.other_format(), FAIL, "ImageDecodeError"
        if pick < 0.82:
            return self.damaged(), EMBED_OR_DECODE, None
        if pick < 0.90:
            return (
                images.random_bytes(int(self.rng.integers(1, 4096)), int(self.rng.integers(1 << 30))),
                FAIL,
                "ImageDecodeError",
            )
        if pick < 0.95:
            return b"", FAIL, "ImageDecodeError"
        return b"<html><body>404 Not Found</body></html>\n", FAIL, "ImageDecodeError"

    def expect(
        self,
        source: str,
        id: str | None,
        outcome: str,
        shard: str,
        error_type: str | None = None,
        stage: str | None = None,
    ) -> Expect:
        if outcome == FAIL and stage is None:
            stage = "decode"
        record = Expect(source, id, outcome, shard, stage, error_type)
        self.records.append(record)
        return record


def _gif_frame_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"\x2c")  # the image descriptor
    return data[: at + 5] + struct.pack("<HH", width, height) + data[at + 9 :]


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"\xff\xc0")  # baseline SOF0: marker, length (2), precision (1), height, width
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def _tiff_with_size(data: bytes, width: int, height: int) -> bytes:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    out = bytearray(data)
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack(endian + "HH", data[at : at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            out[at + 2 : at + 12] = struct.pack(endian + "HII", 4, 1, value)
    return bytes(out)


# --- TFRecord ---------------------------------------------------------------------------


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


def _tfrecords(b: _Builder, path: str, n: int, *, hostile: bool = True) -> list[tuple[bytes, Expect]]:
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


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _tfrecord_shards(b: _Builder, root: str, scale: int) -> None:
    d = f"{root}/tfr"
    for s in range(4 * scale):
        path = f"{d}/mixed-{s:03d}.tfrecord"
        _write(path, b"".join(frame for frame, _ in _tfrecords(b, path, 60)))
    # Cut in the middle of record 6: records 0-5 read, one rest row from record 6 on.
    path = f"{d}/cut.tfrecord"
    frames = _tfrecords(b, path, 10, hostile=False)
    data = b"".join(f for f, _ in frames)
    cut = sum(len(f) for f, _ in frames[:6]) + len(frames[6][0]) // 2
    _write(path, data[:cut])
    _lose(b, frames[6:], path)
    # The length of record 4 fails its CRC (garbage from there on): one rest row from record 4.
    path = f"{d}/badlength.tfrecord"
    frames = _tfrecords(b, path, 8, hostile=False)
    data = bytearray(b"".join(f for f, _ in frames))
    data[sum(len(f) for f, _ in frames[:4]) + 2] ^= 0x10
    _write(path, bytes(data))
    _lose(b, frames[4:], path)
    # gzip: a good one, one whose CRC-32 trailer is wrong, one truncated.
    path = f"{d}/good.tfrecord.gz"
    _write(path, gzip.compress(b"".join(f for f, _ in _tfrecords(b, path, 30))))
    path = f"{d}/crc.tfrecord.gz"
    frames = _tfrecords(b, path, 12, hostile=False)
    _write(path, _bad_crc(gzip.compress(b"".join(f for f, _ in frames))))
    _corrupt(b, frames, path)
    path = f"{d}/truncated.tfrecord.gz"
    frames = _tfrecords(b, path, 20, hostile=False)
    data = gzip.compress(b"".join(f for f, _ in frames))
    _write(path, data[: len(data) // 2])
    _tail(b, frames, path)


def _lose(b: _Builder, frames: list, path: str) -> None:
    for _, expect in frames:
        expect.outcome = LOST
    b.rest_rows[path] = True


def _corrupt(b: _Builder, frames: list, path: str) -> None:
    for _, expect in frames:
        expect.outcome = CORRUPT
    b.rest_rows[path] = False


def _tail(b: _Builder, frames: list, path: str) -> None:
    for _, expect in frames:
        expect.keep, expect.outcome = expect.outcome, TAIL
    b.rest_rows[path] = True


def stored_gzip(data: bytes) -> bytes:
    """A gzip file of `data` in stored (uncompressed) deflate blocks: a byte flipped in them
    inflates to altered data without any deflate error, so only the gzip CRC can tell."""
    blocks = [data[i : i + 65535] for i in range(0, len(data), 65535)] or [b""]
    body = b"".join(
        bytes([i == len(blocks) - 1]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
        for i, block in enumerate(blocks)
    )
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def _bad_crc(data: bytes) -> bytes:
    """A gzip file whose CRC-32 trailer no longer matches its (intact) data."""
    out = bytearray(data)
    out[-8] ^= 0xFF
    return bytes(out)


# --- WebDataset tars ----------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _member_bytes(name: str, data: bytes) -> bytes:
    """One regular member as tar bytes: header, data, padding to the block size."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _special(tar: tarfile.TarFile, name: str, kind: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "directory": tarfile.DIRTYPE}.get(
        kind, tarfile.FIFOTYPE
    )
    if kind in ("symlink", "hardlink"):
        info.linkname = "elsewhere.jpg"
    tar.addfile(info)


def _samples(
    b: _Builder, tar: tarfile.TarFile, path: str, n: int, *, hostile: bool = True
) -> list[tuple[int, Expect]]:
    """n samples into `tar`; returns (offset of the sample's first header, expectation).
    hostile=False: good samples with plain keys (no pax headers), for shards broken on purpose
    at known offsets."""
    out = []
    for _ in range(n):
        prefixes = ["s/", "s/ünï-", "s/nl\n", "deep/" + "x" * 120 + "/"] if hostile else ["s/"]
        key = b.uid(str(b.rng.choice(prefixes)))
        offset = tar.offset
        pick = b.rng.random() if hostile else 0.0
        if pick < 0.78:
            data, outcome, error = b.payload() if hostile else (b.good(), EMBED, None)
            ext = str(b.rng.choice(["jpg", "jpeg", "png", "webp"]))
            _member(tar, f"{key}.{ext}", data)
            _member(tar, f"{key}.json", b'{"caption": "x"}')
            out.append((offset, b.expect(f"{path}#{key}.{ext}", key, outcome, path, error)))
        elif pick < 0.84:  # no image member; a symlink posing as its image is skipped
            _member(tar, f"{key}.json", b"{}")
            _special(tar, f"{key}.jpg", "symlink")
            b.skipped_members["symlink"] = b.skipped_members.get("symlink", 0) + 1
            out.append((offset, b.expect(f"{path}#{key}", key, FAIL, path, "Invalid", "read")))
        elif pick < 0.88:  # two image members of the same extension
            _member(tar, f"{key}.jpg", b.good())
            _member(tar, f"{key}.jpg", b.good())
            out.append((offset, b.expect(f"{path}#{key}.jpg", key, FAIL, path, "Invalid", "read")))
        elif pick < 0.92:  # image member above --max_record_bytes
            _member(tar, f"{key}.png", images.random_bytes(MAX_RECORD_BYTES + 1, 1))
            out.append((offset, b.expect(f"{path}#{key}.png", key, FAIL, path, "RecordTooLarge", "read")))
        else:  # a good sample between link, directory, fifo and dot-named members
            kind = str(b.rng.choice(["hardlink", "directory", "other", "hidden"]))
            if kind == "hidden":
                _member(tar, f"._{b.uid('apple')}.jpg", b"\0\5\26\7")
            else:
                _special(tar, f"{b.uid('link')}/", kind) if kind == "directory" else _special(
                    tar, b.uid("link"), kind
                )
            b.skipped_members[kind] = b.skipped_members.get(kind, 0) + 1
            offset = tar.offset
            _member(tar, f"{key}.jpg", b.good())
            out.append((offset, b.expect(f"{path}#{key}.jpg", key, EMBED, path)))
    return out


def _tar_bytes(
    b: _Builder, path: str, n: int, *, hostile: bool = True
) -> tuple[bytes, list[tuple[int, Expect]]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        samples = _samples(b, tar, path, n, hostile=hostile)
    return buf.getvalue(), samples


def _wds_shards(b: _Builder, root: str, scale: int) -> None:
    d = f"{root}/wds"
    for s in range(4 * scale):
        path = f"{d}/mixed-{s:03d}.tar"
        _write(path, _tar_bytes(b, path, 60)[0])
    # Cut in the middle of sample 5's image: samples 0-4 read, one rest row from sample 5.
    path = f"{d}/cut.tar"
    data, samples = _tar_bytes(b, path, 9, hostile=False)
    _write(path, data[: samples[5][0] + 512 + 100])
    _lose(b, samples[5:], path)
    # A garbage header where sample 4 starts: sample 3 (being read) and the rest are lost.
    path = f"{d}/garbage.tar"
    data, samples = _tar_bytes(b, path, 7, hostile=False)
    garbage = bytearray(data)
    garbage[samples[4][0] : samples[4][0] + 512] = images.random_bytes(512, 3)
    _write(path, bytes(garbage))
    _lose(b, samples[3:], path)
    # Cut exactly where sample 6 starts (no end-of-archive marker): sample 5 and on are lost.
    path = f"{d}/boundary.tar"
    data, samples = _tar_bytes(b, path, 8, hostile=False)
    _write(path, data[: samples[6][0]])
    _lose(b, samples[5:], path)
    # gzip: good, a wrong CRC-32 trailer, truncated, and a 1 GiB zero-filled member.
    path = f"{d}/good.tar.gz"
    _write(path, gzip.compress(_tar_bytes(b, path, 30)[0]))
    path = f"{d}/crc.tar.gz"
    data, samples = _tar_bytes(b, path, 10, hostile=False)
    _write(path, _bad_crc(gzip.compress(data)))
    _corrupt(b, samples, path)
    # A byte of one image altered inside the gzip stream: only the CRC can tell (the review's case).
    path = f"{d}/altered.tar.gz"
    data, samples = _tar_bytes(b, path, 8, hostile=False)
    altered = bytearray(stored_gzip(data))
    altered[len(altered) // 2] ^= 0x01
    _write(path, bytes(altered))
    _corrupt(b, samples, path)
    path = f"{d}/truncated.tgz"
    data, samples = _tar_bytes(b, path, 16, hostile=False)
    compressed = gzip.compress(data)
    _write(path, compressed[: len(compressed) // 2])
    _tail(b, samples, path)
    path = f"{d}/huge.tar.gz"
    _write(path, huge_member_tar_gz(b, path))


def huge_member_tar_gz(b: _Builder, path: str, size: int = HUGE_MEMBER_BYTES) -> bytes:
    """A .tar.gz of about (1 + size / 230,000) MB: a good sample, a sample whose image member
    is `size` zero bytes, then another good sample.  The deflate stream of the zeros is one
    compressed MiB block repeated (made once, after a full flush), so nothing of `size` is
    ever held in memory here either."""
    first, second = b.uid("s/"), b.uid("s/")
    huge_key = b.uid("s/huge-")
    huge = tarfile.TarInfo(f"{huge_key}.jpg")
    huge.size = size
    prefix = _member_bytes(f"{first}.jpg", b.good()) + huge.tobuf(tarfile.PAX_FORMAT)
    suffix = _member_bytes(f"{second}.jpg", b.good()) + bytes(2 * tarfile.BLOCKSIZE)  # end marker
    chunk = bytes(1 << 20)
    assert size % len(chunk) == 0 and size % tarfile.BLOCKSIZE == 0
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = [compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)]
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    body += [block] * (size // len(chunk))
    body.append(compressor.compress(suffix) + compressor.flush(zlib.Z_FINISH))
    crc = zlib.crc32(prefix)
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(suffix, crc)
    length = len(prefix) + size + len(suffix)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    b.expect(f"{path}#{first}.jpg", first, EMBED, path)
    b.expect(f"{path}#{huge_key}.jpg", huge_key, FAIL, path, "RecordTooLarge", "read")
    b.expect(f"{path}#{second}.jpg", second, EMBED, path)
    return header + b"".join(body) + struct.pack("<II", crc, length & 0xFFFFFFFF)


# --- image folders --------------------------------------------------------------------------


def _folder(b: _Builder, root: str, scale: int) -> None:
    d = f"{root}/img"
    names = ["a", "ünïcödé-ファイル", "new\nline", "space name", "🙂", "UPPER"]
    exts = [".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".webp", ".gif", ".bmp", ".tif", ".TIFF"]
    for i in range(450 * scale):
        name = f"{b.rng.choice(names)}-{b.uid('')}{b.rng.choice(exts)}"
        rel = f"sub{i % 3}/{name}" if i % 2 else name
        pick = b.rng.random()
        if pick < 0.04:  # above --max_record_bytes
            data, outcome, error, stage = (
                images.random_bytes(MAX_RECORD_BYTES + 1, i),
                FAIL,
                "RecordTooLarge",
                "read",
            )
        else:
            (data, outcome, error), stage = b.payload(), None
        _write(f"{d}/{rel}", data)
        b.expect(f"{d}/{rel}", rel, outcome, f"{d}/{rel}", error, stage)
    for hidden in [".DS_Store", "._photo.jpg", ".git/objects/aa.jpg", "sub1/.thumbs/t.jpg", ".hidden.png"]:
        _write(f"{d}/{hidden}", b.good())
        b.skipped_files["hidden"] += 1
    for other in ["notes.txt", "README", "data.bin", "sub2/Thumbs.db", "index.html", "photo.jpg.part"]:
        _write(f"{d}/{other}", b"not an image\n")
        b.skipped_files["non_image"] += 1


def _duplicates(b: _Builder, root: str) -> None:
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
    _write(path, b"".join(frames))


def corpus(root: str, scale: int = 1, seed: int = 0) -> Corpus:
    """Writes the corpus under root (about 930 records per unit of scale, plus 150 in the
    broken shards); returns what every record must give."""
    root = str(root)
    b = _Builder(seed)
    _tfrecord_shards(b, root, scale)
    _wds_shards(b, root, scale)
    _folder(b, root, scale)
    _duplicates(b, root)
    globs = [f"{root}/tfr/*.tfrecord*", f"{root}/wds", f"{root}/img"]
    members = {k: v for k, v in b.skipped_members.items() if v}
    return Corpus(globs, b.records, b.rest_rows, dict(b.skipped_files), members)


def reconcile(c: Corpus, embedded: dict[str, set[str]], failures: list[dict]) -> dict[str, int]:
    """Checks a run's tables against the corpus, record by record; returns counts.

    embedded: embedder -> the `source`s in its table; failures: the failures table's rows.
    Raises AssertionError naming the first record that does not match."""
    by_source: dict[str, list[dict]] = {}
    rest: dict[str, list[dict]] = {}
    for row in failures:
        if row["error_type"] == BROKEN:
            shard = row["source"].split("#", 1)[0]
            rest.setdefault(shard, []).append(row)
        else:
            by_source.setdefault(row["source"], []).append(row)
    with_rest = set()
    for shard, expected in c.rest_rows.items():
        rows = rest.pop(shard, [])
        assert len(rows) == 1 if expected else len(rows) <= 1, (shard, rows)
        assert all("bytes" in r["message"] for r in rows), rows  # says how many bytes were lost
        with_rest.update(shard for _ in rows)
    assert not rest, f"rest rows for shards that were not broken: {rest}"
    tables = list(embedded.values())
    counts = {"embedded": 0, "failed": 0, "lost": 0}
    lost_seen: dict[str, bool] = {}
    for record in c.records:
        rows = by_source.pop(record.source, [])
        in_tables = [record.source in t for t in tables]
        where = f"{record.source!r} ({record.outcome})"
        assert len(rows) <= 1, f"{where}: {len(rows)} failure rows {rows}"
        assert all(in_tables) or not any(in_tables), f"{where}: in some tables only"
        outcome = record.outcome
        if outcome == TAIL:
            if not rows and not any(in_tables):
                assert record.shard in with_rest, f"{where}: neither a row nor a rest row"
                lost_seen[record.shard] = True
                counts["lost"] += 1
                continue
            assert not lost_seen.get(record.shard), f"{where}: read after a lost record of its shard"
            outcome = record.keep
        if outcome == EMBED:
            assert all(in_tables) and not rows, f"{where}: not embedded; failure {rows}"
        elif outcome == EMBED_OR_DECODE:
            assert bool(rows) != all(in_tables), f"{where}: rows {rows}"
            assert not rows or rows[0]["stage"] == "decode", f"{where}: {rows}"
        elif outcome == FAIL:
            assert rows and not any(in_tables), f"{where}: no failure row"
            assert rows[0]["stage"] == record.stage, f"{where}: {rows}"
            assert record.error_type is None or rows[0]["error_type"] == record.error_type, f"{where}: {rows}"
        elif outcome == LOST:
            assert not rows and not any(in_tables), f"{where}: has a row of its own {rows}"
            counts["lost"] += 1
            continue
        elif outcome == CORRUPT:
            assert not any(in_tables), f"{where}: embedded from a corrupt gzip shard"
            assert not rows or rows[0]["error_type"] == "CorruptShard", f"{where}: {rows}"
            if not rows:
                assert record.shard in with_rest, f"{where}: neither a row of its own nor a rest row"
                counts["lost"] += 1
                continue
        counts["embedded" if all(in_tables) and tables else "failed"] += 1
    assert not by_source, f"failure rows matching no generated record: {list(by_source.values())[:3]}"
    return counts
