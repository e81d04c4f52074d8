"""The WebDataset tars of the fuzz corpus (`tests.helpers.fuzz`): hostile samples among
links, directories and dot-named members, tars cut or with a garbage header, gzip ones (good,
wrong CRC-32, a byte altered, truncated) and a .tar.gz with a 1 GiB member.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib

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
    stored_gzip,
    write_file,
)

HUGE_MEMBER_BYTES = 1 << 30  # the zero-filled member of huge.tar.gz


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
    b: Builder, tar: tarfile.TarFile, path: str, n: int, *, hostile: bool = True
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
    b: Builder, path: str, n: int, *, hostile: bool = True
) -> tuple[bytes, list[tuple[int, Expect]]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        samples = _samples(b, tar, path, n, hostile=hostile)
    return buf.getvalue(), samples


def wds_shards(b: Builder, root: str, scale: int) -> None:
    d = f"{root}/wds"
    for s in range(4 * scale):
        path = f"{d}/mixed-{s:03d}.tar"
        write_file(path, _tar_bytes(b, path, 60)[0])
    # Cut in the middle of sample 5's image: samples 0-4 read, one rest row from sample 5.
    path = f"{d}/cut.tar"
    data, samples = _tar_bytes(b, path, 9, hostile=False)
    write_file(path, data[: samples[5][0] + 512 + 100])
    mark_lost(b, samples[5:], path)
    # A garbage header where sample 4 starts: sample 3 (being read) and the rest are lost.
    path = f"{d}/garbage.tar"
    data, samples = _tar_bytes(b, path, 7, hostile=False)
    garbage = bytearray(data)
    garbage[samples[4][0] : samples[4][0] + 512] = images.random_bytes(512, 3)
    write_file(path, bytes(garbage))
    mark_lost(b, samples[3:], path)
    # Cut exactly where sample 6 starts (no end-of-archive marker): sample 5 and on are lost.
    path = f"{d}/boundary.tar"
    data, samples = _tar_bytes(b, path, 8, hostile=False)
    write_file(path, data[: samples[6][0]])
    mark_lost(b, samples[5:], path)
    # gzip: good, a wrong CRC-32 trailer, truncated, and a 1 GiB zero-filled member.
    path = f"{d}/good.tar.gz"
    write_file(path, gzip.compress(_tar_bytes(b, path, 30)[0]))
    path = f"{d}/crc.tar.gz"
    data, samples = _tar_bytes(b, path, 10, hostile=False)
    write_file(path, bad_crc(gzip.compress(data)))
    mark_corrupt(b, samples, path)
    # A byte of one image altered inside the gzip stream: only the CRC can tell (the review's case).
    path = f"{d}/altered.tar.gz"
    data, samples = _tar_bytes(b, path, 8, hostile=False)
    altered = bytearray(stored_gzip(data))
    altered[len(altered) // 2] ^= 0x01
    write_file(path, bytes(altered))
    mark_corrupt(b, samples, path)
    path = f"{d}/truncated.tgz"
    data, samples = _tar_bytes(b, path, 16, hostile=False)
    compressed = gzip.compress(data)
    write_file(path, compressed[: len(compressed) // 2])
    mark_tail(b, samples, path)
    path = f"{d}/huge.tar.gz"
    write_file(path, huge_member_tar_gz(b, path))


def huge_member_tar_gz(b: Builder, path: str, size: int = HUGE_MEMBER_BYTES) -> bytes:
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
