"""The byte streams under the TFRecord and tar readers (`pipelines.read_tfrecord`,
`pipelines.read_webdataset`): bytes counted and skipped, gzip inflated and its integrity
checked, and how much of a broken shard was lost.

A gzip-compressed shard is inflated here and each member's CRC-32 and length are checked.
When they fail, or the compressed data is invalid, the damage can be anywhere in what was read:
`integrity` yields `Untrusted` last.  A gzip stream that merely ends early (truncated) is a
framing break like any other.  Bytes after the last gzip member that are no gzip member do not
discard what came before them (it was checked).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.shards import Shard, Untrusted

GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1024 * 1024


class Stream:
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
            data = self.read(min(want, CHUNK))
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
            data = self.read(min(CHUNK, n - done))
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
            while self.read(CHUNK):
                pass
        except (OSError, EOFError, zlib.error):
            pass  # kept in self.error


def open_stream(path: str, *, gzip_stream: bool | None) -> tuple[IO[bytes], Stream]:
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
        head = raw.read(len(GZIP_MAGIC))
        gzip_stream = head == GZIP_MAGIC
        if size is not None:
            raw.seek(0)
        else:  # not seekable: give the peeked bytes back
            raw = _Prefixed(head, raw)
    return raw, Stream(raw, gzip_stream=gzip_stream, size=size)


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


def is_corrupt(exc: BaseException) -> bool:
    """A gzip integrity failure (CRC, length, invalid data), not a truncation, and not bytes
    after the last gzip member that are no gzip member (what came before them was checked)."""
    if isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file"):
        return False
    return isinstance(exc, (gzip.BadGzipFile, zlib.error)) or (
        isinstance(exc, tarfile.ReadError) and str(exc).startswith("zlib error")
    )


def lost_text(stream: Stream, start: int) -> str:
    """How many bytes from `start` to the end of the stream were lost (reads the rest)."""
    stream.drain()
    what = "inflated " if stream.gzip else ""
    if stream.error is None:
        return f"{stream.count - start} {what}bytes from byte {start} to the end of the shard are lost"
    return (
        f"at least {stream.count - start} {what}bytes from byte {start} on are lost (the rest cannot be "
        f"read: {error_text(stream.error)})"
    )


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def integrity(shard: Shard, stream: Stream) -> Iterator[Untrusted]:
    """Untrusted when a gzip stream fails its check; reads the stream to its end to check it."""
    if not stream.gzip:
        return
    stream.drain()
    if stream.error is not None and is_corrupt(stream.error):
        yield Untrusted(shard.path, error_text(stream.error))
