"""What every format of the fuzz corpus (`tests.helpers.fuzz`) shares: the outcomes, one
`Expect` per generated record, and the `Builder` that draws hostile or good image bytes from
a seeded generator and records what each must give.  Also the byte tweaks the shard writers
use: image headers declaring huge sizes, gzip streams damaged on purpose.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

from tests.helpers import images

EMBED, EMBED_OR_DECODE, FAIL, LOST, CORRUPT, TAIL = "embed", "embed|decode", "fail", "lost", "corrupt", "tail"
BROKEN = "BrokenShard"
MAX_RECORD_BYTES = 1 << 20  # the run's --max_record_bytes: "huge" records are just above it


@dataclasses.dataclass
class Expect:
    source: str
    id: str | None
    outcome: str
    shard: str
    stage: str | None = None  # FAIL: the failure's stage
    error_type: str | None = None  # FAIL: its error_type (None: any)
    keep: str | None = None  # TAIL: the outcome when not lost (EMBED, EMBED_OR_DECODE, FAIL)


class Builder:
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


def write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


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


def bad_crc(data: bytes) -> bytes:
    """A gzip file whose CRC-32 trailer no longer matches its (intact) data."""
    out = bytearray(data)
    out[-8] ^= 0xFF
    return bytes(out)


# The records of a shard broken on purpose: (bytes, Expect) pairs, marked with what the break
# does to them.


def mark_lost(b: Builder, frames: list, path: str) -> None:
    for _, expect in frames:
        expect.outcome = LOST
    b.rest_rows[path] = True


def mark_corrupt(b: Builder, frames: list, path: str) -> None:
    for _, expect in frames:
        expect.outcome = CORRUPT
    b.rest_rows[path] = False


def mark_tail(b: Builder, frames: list, path: str) -> None:
    for _, expect in frames:
        expect.keep, expect.outcome = expect.outcome, TAIL
    b.rest_rows[path] = True
