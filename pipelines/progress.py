"""Progress of the embedding pipeline on a terminal: records read, embedded, failed, rate, ETA.

The pipeline's DoFns call `count(name, n)` as they work (a lock and a dict: cheap).  On the
in-process runner (the default) they run in the driver's process, where `Display` shows the
counts on one line of stderr, redrawn twice a second.  With
`--direct_running_mode=multi_processing` or a distributed runner the DoFns count in other
processes: the line then says where the job runs and the time elapsed.  Beam metrics would
carry the counts across processes, but the FnApiRunner reports them only when the run is
over.

Counter names: `shards` (shards read), `read` (records read), `failed` (failure rows),
`dropped` (records read that failed before any model: duplicate ids, undecodable images),
`rows.<embedder>` (rows with a vector: embedded or reused), `reused.<embedder>` (of those,
reused), `failed.<embedder>` (rows that failed in that embedder's model).
"""

from __future__ import annotations

import collections
import shutil
import sys
import threading
import time
from typing import TextIO

_lock = threading.Lock()
_counts: collections.Counter[str] = collections.Counter()


def count(name: str, n: int = 1) -> None:
    """Adds n to a counter (called by the pipeline's DoFns)."""
    if n:
        with _lock:
            _counts[name] += n


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset() -> None:
    with _lock:
        _counts.clear()


def wanted(mode: str, stream: TextIO | None = None) -> bool:
    """--progress auto: on when the stream (stderr) is a terminal; on / off: as said."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Display:
    """Redraws one status line on `stream` every `interval` seconds from a daemon thread;
    `stop()` (or leaving the `with` block) erases it.

    shards: the number of input shards; embedders: their names; where: None when the DoFns
    run in this process, else a description of where they run (the counts are then not
    seen here)."""

    def __init__(
        self,
        *,
        shards: int,
        embedders: list[str],
        where: str | None = None,
        stream: TextIO | None = None,
        interval: float = 0.5,
    ) -> None:
        self._shards = shards
        self._embedders = list(embedders)
        self._where = where
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._embed_start: tuple[float, int] | None = None  # (time, rows done) when reading ended

    def __enter__(self) -> Display:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        reset()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="imgindex-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        self._write("\r\x1b[K")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._write(
                "\r" + self.line()[: max(20, shutil.get_terminal_size((100, 20)).columns - 1)] + "\x1b[K"
            )

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not break the run
            pass

    def line(self, now: float | None = None) -> str:
        """The status line for the counts as they are."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._started
        if self._where is not None:
            return f"imgindex: running on {self._where}, {_duration(elapsed)} elapsed"
        c = snapshot()
        shards, read, failed = c.get("shards", 0), c.get("read", 0), c.get("failed", 0)
        if shards < self._shards:
            rate = read / elapsed if elapsed > 0 else 0.0
            eta = elapsed * (self._shards - shards) / shards if shards else None
            return (
                f"imgindex: reading shards {shards}/{self._shards}: {read:,} records read, "
                f"{failed:,} failed, {rate:,.0f} records/s, "
                f"ETA {'?' if eta is None else _duration(eta)} (reading)"
            )
        done = min(
            (c.get(f"rows.{e}", 0) + c.get(f"failed.{e}", 0) for e in self._embedders), default=0
        ) + c.get("dropped", 0)
        if self._embed_start is None:
            self._embed_start = (now, done)
        since, done_then = self._embed_start
        rate = (done - done_then) / (now - since) if now > since else 0.0
        remaining = max(0, read - done)
        eta = _duration(remaining / rate) if rate > 0 else "?"
        rows = min((c.get(f"rows.{e}", 0) for e in self._embedders), default=0)
        reused = min((c.get(f"reused.{e}", 0) for e in self._embedders), default=0)
        vectors = f"{rows - reused:,} embedded" + (f", {reused:,} reused" if reused else "")
        return (
            f"imgindex: {read:,} records read, {vectors}, {failed:,} failed, {rate:,.1f} records/s, ETA {eta}"
        )
